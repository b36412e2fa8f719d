"""``edgectl ingest --url`` into a real edge that syncs to a real cloud.

Each real sensor file in ../shared/data goes in through the command line and
the edge's device API; the cloud must end up holding what the file holds,
device by device and key by key. What a file holds is worked out here from
SOURCES.md with the csv module and plain string handling, not with
``edgectl.ingest``: a shared parser would hide its own bugs from the check.
"""

from __future__ import annotations

import csv
import re
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pytest
from conftest import REPO, shared_path, wait_for
from typer.testing import CliRunner

from edgectl import remote
from edgectl.cli import app

MAPPINGS = REPO / "tests" / "data" / "ingest"
KEY, SECRET = "site-1-key", "site-1-secret"
_INTEGER = re.compile(r"[+-]?[0-9]+")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UTC_PLUS_ONE = timezone(timedelta(hours=1))


# --- what a file holds, read independently ----------------------------------------


@dataclass
class FileContents:
    """What a file holds: ``values`` maps (device, key, ts) to the value the
    cloud must store, ``rows`` counts data rows, ``rows_with_values`` those with
    a value left to send, ``missing`` the values the file marks as missing and
    ``blank_lines`` the lines without any field."""

    values: dict[tuple[str, str, int], int | float | str] = field(default_factory=dict)
    rows: int = 0
    rows_with_values: int = 0
    missing: int = 0
    blank_lines: int = 0

    def add_row(self, device, ts, fields, *, decimal_comma=False, missing=None):
        self.rows += 1
        kept = 0
        for key, text in fields:
            value = _number_or_text(text, decimal_comma)
            if missing is not None and value == missing:
                self.missing += 1
                continue
            self.values[(device, key, ts)] = value
            kept += 1
        self.rows_with_values += kept > 0

    @property
    def devices(self) -> set[str]:
        return {device for device, _, _ in self.values}


def _number_or_text(text, decimal_comma):
    """An integer stays an integer, a decimal becomes a float, the rest is text;
    the padding around a number is not part of it."""
    text = text.strip()
    number = text.replace(",", ".") if decimal_comma else text
    if _INTEGER.fullmatch(number):
        return int(number)
    try:
        return float(number)
    except ValueError:
        return text


def _ms(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _wall_ms(text: str, fmt: str, zone=UTC) -> int:
    return _ms(datetime.strptime(text, fmt).replace(tzinfo=zone))


def occupancy_contents(path: Path) -> FileContents:
    """datatraining.txt: the header names 7 columns but every row has 8 fields,
    the first an unnamed row number. Dates are read as UTC (no zone given)."""
    contents = FileContents()
    with path.open(newline="", encoding="ascii") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        for row in reader:
            assert len(row) == len(header) + 1
            _row_number, date, *fields = row
            ts = _wall_ms(date, "%Y-%m-%d %H:%M:%S")
            contents.add_row(path.stem, ts, zip(header[1:], fields, strict=True))
    return contents


def air_quality_contents(path: Path) -> FileContents:
    """AirQualityUCI.csv: ';' separators, decimal commas, DD/MM/YYYY HH.MM.SS
    read as UTC+1 (the mapping's assumption), -200 (also written -200,0) for
    missing, two empty columns at the end of each line, 114 lines of only ';'."""
    contents = FileContents()
    with path.open(newline="", encoding="ascii") as handle:
        reader = csv.reader(handle, delimiter=";")
        header = next(reader)
        assert header[-2:] == ["", ""]
        for row in reader:
            if not any(row):
                contents.blank_lines += 1
                continue
            date, clock, *fields = row[:-2]
            ts = _wall_ms(f"{date} {clock}", "%d/%m/%Y %H.%M.%S", _UTC_PLUS_ONE)
            named = zip(header[2:-2], fields, strict=True)
            contents.add_row(path.stem, ts, named, decimal_comma=True, missing=-200)
    return contents


R1_COLUMNS = (
    "sequence",
    "internal_temperature",
    "internal_voltage",
    "humidity",
    "temperature",
    "par",
    "tsr",
)


def motes_contents(path: Path) -> FileContents:
    """R1.txt: no header, one space between fields: epoch ms, node id, then
    seven readings (names from the dataset's ReadMe) with decimal commas."""
    contents = FileContents()
    for line in path.read_text(encoding="ascii").splitlines():
        ts, node, *fields = line.split(" ")
        named = zip(R1_COLUMNS, fields, strict=True)
        contents.add_row(f"mote-{node}", int(ts), named, decimal_comma=True)
    return contents


def appliances_contents(path: Path) -> FileContents:
    """testing.csv: every field quoted, numbers padded with spaces or written
    with exponents, two text columns. Dates are read as UTC."""
    contents = FileContents()
    with path.open(newline="", encoding="ascii") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        for date, *fields in reader:
            ts = _wall_ms(date, "%Y-%m-%d %H:%M:%S")
            contents.add_row(path.stem, ts, zip(header[1:], fields, strict=True))
    return contents


@dataclass(frozen=True)
class SensorFile:
    """One file of ../shared/data, how to ingest it and what to expect."""

    name: str
    options: tuple[str, ...]
    read: object
    devices: int
    device_type: str = "default"


SENSOR_FILES = [
    SensorFile("datatraining.txt", (), occupancy_contents, devices=1),
    SensorFile(
        "AirQualityUCI.csv",
        ("--mapping", str(MAPPINGS / "AirQualityUCI.yaml")),
        air_quality_contents,
        devices=1,
        device_type="air-quality-multisensor",
    ),
    SensorFile(
        "R1.txt",
        ("--mapping", str(MAPPINGS / "R1.yaml")),
        motes_contents,
        devices=19,
        device_type="tmote-sky",
    ),
    SensorFile("testing.csv", (), appliances_contents, devices=1),
]


# --- a cloud, an edge syncing to it, and what they hold ---------------------------


@pytest.fixture
def cloud_and_edge(roles):
    """A cloud with one registered edge, and that edge syncing to it."""
    cloud = roles("cloud")
    body = {"name": "site-1", "key": KEY, "secret": SECRET}
    remote.call(cloud.url, "POST", "/api/edgectl/edges", body)
    edge = roles(
        "edge",
        *("--cloud", cloud.url, "--edge-key", KEY),
        env={"EDGECTL_EDGE_SECRET": SECRET},
    )
    return cloud, edge


def table_rows(role, table: str) -> int:
    overview = remote.call(role.url, "GET", "/api/edgectl/tables")
    return next(item["rows"] for item in overview["tables"] if item["table"] == table)


def queue_state(role) -> tuple[int, int]:
    """(pending, dead letters) over the role's outgoing queues."""
    queues = remote.call(role.url, "GET", "/api/edgectl/tables")["queues"]
    return (
        sum(queue["pending"] for queue in queues),
        sum(queue["dead_letters"] for queue in queues),
    )


def stopped_role_readings(role) -> dict[tuple[str, str, int], int | float | str]:
    """Stop the role and read its ts_kv with plain SQL as (device, key, ts) ->
    value; each row must have exactly one value column set."""
    # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
    assert role.stop() in (0, -signal.SIGTERM)
    with duckdb.connect(str(role.db), read_only=True) as connection:
        rows = connection.execute(
            "SELECT e.name, k.key, t.ts, t.bool_v, t.long_v, t.dbl_v, t.str_v, "
            "t.json_v FROM ts_kv t JOIN entity e ON e.id = t.entity_id "
            "AND e.entity_type = 'DEVICE' JOIN key_dictionary k ON k.key_id = t.key"
        ).fetchall()
    readings = {}
    for device, key, ts, *columns in rows:
        values = [value for value in columns if value is not None]
        assert len(values) == 1, (device, key, ts, columns)
        assert (device, key, ts) not in readings, f"{device} {key} {ts} stored twice"
        readings[(device, key, ts)] = values[0]
    return readings


def per_series(readings) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(device, key) -> (row count, first ts, last ts)."""
    series: dict[tuple[str, str], tuple[int, int, int]] = {}
    for device, key, ts in readings:
        count, first, last = series.get((device, key), (0, ts, ts))
        series[(device, key)] = (count + 1, min(first, ts), max(last, ts))
    return series


def typed(value):
    """A value with its type, so that 45.0 stored for "45" counts as wrong."""
    return (type(value).__name__, value)


def summary_counts(output: str) -> dict[str, int]:
    """The rows of the printed ingest summary table, as label -> count."""
    counts = {}
    for line in output.splitlines():
        match = re.fullmatch(r"\W*([a-z][a-z ()]*[a-z)])\W+([0-9][0-9,]*)\W*", line)
        if match:
            counts[match.group(1)] = int(match.group(2).replace(",", ""))
    return counts


def ingest(*args: str):
    return CliRunner().invoke(app, ["ingest", *args])


# --- the real files, end to end ---------------------------------------------------


@pytest.mark.parametrize("sensor_file", SENSOR_FILES, ids=lambda item: item.name)
def test_cloud_holds_every_value_of_the_real_file_after_ingest_through_the_edge(
    cloud_and_edge, sensor_file
):
    cloud, edge = cloud_and_edge
    path = shared_path("data", sensor_file.name)
    expected = sensor_file.read(path)
    assert len(expected.devices) == sensor_file.devices

    started = time.monotonic()
    result = ingest(str(path), "--url", edge.url, *sensor_file.options)
    ingested = time.monotonic() - started
    assert result.exit_code == 0, result.output
    wait_for(
        lambda: table_rows(cloud, "ts_kv") >= len(expected.values),
        timeout=60,
        interval=0.2,
        what=f"{len(expected.values):,} readings on the cloud",
    )
    synced = time.monotonic() - started
    devices = remote.call(cloud.url, "GET", "/api/edgectl/devices")
    edge_queue = queue_state(edge)
    stored = stopped_role_readings(cloud)

    assert summary_counts(result.stdout) == {
        "rows read": expected.rows,
        "rows sent": expected.rows_with_values,
        "values sent": len(expected.values),
        "values missing (skipped)": expected.missing,
        "rows with no value": expected.rows - expected.rows_with_values,
        "blank lines": expected.blank_lines,
        "rows rejected": 0,
        "devices": sensor_file.devices,
    }
    assert edge_queue == (0, 0)
    assert devices == [
        {"name": name, "type": sensor_file.device_type, "edge": "site-1"}
        for name in sorted(expected.devices)
    ]
    assert per_series(stored) == per_series(expected.values)
    differing = [
        (key, typed(value), typed(stored.get(key)))
        for key, value in expected.values.items()
        if typed(stored.get(key)) != typed(value)
    ]
    assert not differing, f"{len(differing):,} values differ, first: {differing[:5]}"
    print(
        f"\n{sensor_file.name}: {expected.rows:,} rows, "
        f"{len(expected.devices)} device(s), {len(stored):,} values on the cloud, "
        f"{expected.missing:,} missing values skipped, 0 rejected rows; "
        f"ingest {ingested:.1f} s, cloud complete after {synced:.1f} s"
    )


# --- the printed summary ----------------------------------------------------------

# Line 2, the first data row, has a value past the last column: it is rejected
# alone, and must not make the other rows read as if an index column led them.
PLANT = (
    "time;probe;temp;rh\n"
    "2024-03-01 00:00:00;a;21,5;40;9\n"
    "2024-03-01 00:01:00;a;21,75;-999\n"
    "yesterday;a;22;42\n"
    "\n"
    "2024-03-01 00:03:00;b;23;43\n"
    "2024-03-01 00:04:00;b;-999;-999\n"
    "2024-03-01 00:05:00;;24;44\n"
    "2024-03-01 00:06:00;b;24,25;44,5\n"
)
PLANT_OPTIONS = (
    *("--separator", ";", "--decimal-comma", "--missing", "-999"),
    *("--timestamp-column", "time", "--timestamp-format", "%Y-%m-%d %H:%M:%S"),
    *("--device-column", "probe", "--device-type", "probe"),
)


def test_ingest_prints_counts_and_each_rejected_line_and_sends_the_rest(
    cloud_and_edge, tmp_path
):
    cloud, edge = cloud_and_edge
    path = tmp_path / "plant.csv"
    path.write_text(PLANT, encoding="utf-8")

    result = ingest(str(path), "--url", edge.url, *PLANT_OPTIONS)

    assert result.exit_code == 0, result.output
    assert summary_counts(result.stdout) == {
        "rows read": 7,
        "rows sent": 3,
        "values sent": 5,
        "values missing (skipped)": 3,
        "rows with no value": 1,
        "blank lines": 1,
        "rows rejected": 3,
        "devices": 2,
    }
    assert re.search(r"^took [0-9]+\.[0-9]{2} s$", result.stdout, re.MULTILINE)
    assert result.stdout.splitlines()[-3:] == [
        "line 2: 5 fields, expected 4: a value after the last named column "
        "(check the separator and quotes on this line)",
        "line 4: timestamp 'yesterday' does not match the format '%Y-%m-%d %H:%M:%S'",
        "line 8: the device column is empty",
    ]
    wait_for(lambda: table_rows(cloud, "ts_kv") >= 5, what="5 readings on the cloud")
    assert stopped_role_readings(cloud) == {
        ("a", "temp", _wall_ms("2024-03-01 00:01:00", "%Y-%m-%d %H:%M:%S")): 21.75,
        ("b", "temp", _wall_ms("2024-03-01 00:03:00", "%Y-%m-%d %H:%M:%S")): 23,
        ("b", "rh", _wall_ms("2024-03-01 00:03:00", "%Y-%m-%d %H:%M:%S")): 43,
        ("b", "temp", _wall_ms("2024-03-01 00:06:00", "%Y-%m-%d %H:%M:%S")): 24.25,
        ("b", "rh", _wall_ms("2024-03-01 00:06:00", "%Y-%m-%d %H:%M:%S")): 44.5,
    }


def test_summary_says_how_many_rejected_lines_it_does_not_list(tmp_path):
    path = tmp_path / "late.csv"
    lines = [f"{number}:00;1" for number in range(150)]
    path.write_text("ts;v\n" + "\n".join(lines) + "\n", encoding="utf-8")

    result = ingest(str(path), "--dry-run", "--separator", ";")

    assert result.exit_code == 0, result.output
    assert summary_counts(result.stdout)["rows rejected"] == 150
    printed = result.stdout.splitlines()
    listed = [at for at, line in enumerate(printed) if line.startswith("line ")]
    assert len(listed) == 100
    assert re.search(r"\b50\b", "\n".join(printed[listed[-1] + 1 :]))
