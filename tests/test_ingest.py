"""Tests for edgectl.ingest: real sensor files, real parsing, real HTTP."""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from ruamel.yaml import YAML

from edgectl import ingest
from edgectl.errors import IngestError
from edgectl.ingest import (
    IngestMapping,
    Reading,
    RowProblem,
    ingest_http,
    load_mapping,
    parse_separator,
    read_rows,
    sniff_mapping,
    summarize_file,
    typed_value,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MAPPINGS = Path(__file__).resolve().parent / "data" / "ingest"


def shared_file(name):
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(
            f"{name} is absent from {SHARED_DATA}: the real sensor files are "
            "shared beside the repository, not stored in it"
        )
    return path


def ms(text, utc_offset_hours=0):
    zone = timezone(timedelta(hours=utc_offset_hours))
    moment = datetime.fromisoformat(text).replace(tzinfo=zone)
    return round(moment.timestamp() * 1000)


def readings_of(path, mapping):
    items = list(read_rows(path, mapping))
    assert [item for item in items if isinstance(item, RowProblem)] == []
    return items


def per_device(readings):
    ranges = {}
    for reading in readings:
        count, first, last = ranges.get(reading.device, (0, reading.ts, reading.ts))
        ranges[reading.device] = (
            count + 1,
            min(first, reading.ts),
            max(last, reading.ts),
        )
    return ranges


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- datatraining.txt (UCI occupancy) --------------------------------------------


@pytest.fixture(scope="module")
def occupancy():
    path = shared_file("datatraining.txt")
    return path, readings_of(path, sniff_mapping(path))


def test_sniff_reads_occupancy_file_shape_without_options():
    mapping = sniff_mapping(shared_file("datatraining.txt"))

    assert mapping.separator == ","
    assert mapping.decimal_comma is False
    assert mapping.has_header is True
    assert mapping.timestamp_columns == ("date",)
    assert mapping.timestamp_format == "%Y-%m-%d %H:%M:%S"


def test_occupancy_file_counts_match_sources():
    path = shared_file("datatraining.txt")

    summary = summarize_file(path, sniff_mapping(path))

    assert summary.rows_read == 8143
    assert summary.readings_sent == 8143
    assert summary.values_sent == 8143 * 6
    assert (summary.values_missing, summary.blank_lines, summary.rejected) == (0, 0, 0)
    assert summary.devices == {"datatraining": 8143}
    assert summary.first_ts == ms("2015-02-04 17:51:00")
    assert summary.last_ts == ms("2015-02-10 09:33:00")


def test_occupancy_unnamed_index_column_is_not_sent_and_values_are_typed(occupancy):
    _, readings = occupancy

    first = readings[0]

    assert (first.line, first.device, first.ts) == (
        2,
        "datatraining",
        ms("2015-02-04 17:51:00"),
    )
    assert first.values == {
        "Temperature": 23.18,
        "Humidity": 27.272,
        "Light": 426,
        "CO2": 721.25,
        "HumidityRatio": 0.00479298817650529,
        "Occupancy": 1,
    }
    assert type(first.values["Temperature"]) is float
    assert type(first.values["Light"]) is int
    assert type(first.values["Occupancy"]) is int
    assert readings[-1].line == 8144
    assert readings[-1].values["CO2"] == 821


def test_occupancy_timestamps_keep_their_jitter_and_labels(occupancy):
    _, readings = occupancy

    seconds = Counter(reading.ts % 60_000 for reading in readings)
    occupied = Counter(reading.values["Occupancy"] for reading in readings)

    assert seconds == {0: 5609, 59_000: 2534}
    assert occupied == {1: 1729, 0: 6414}
    assert max(reading.values["Light"] for reading in readings) == 1546.33333333333


# --- testing.csv (UCI appliances energy) -----------------------------------------


@pytest.fixture(scope="module")
def appliances():
    path = shared_file("testing.csv")
    return path, readings_of(path, sniff_mapping(path))


def test_sniff_reads_appliances_file_shape_without_options():
    mapping = sniff_mapping(shared_file("testing.csv"))

    assert (mapping.separator, mapping.decimal_comma, mapping.has_header) == (
        ",",
        False,
        True,
    )
    assert mapping.timestamp_columns == ("date",)
    assert mapping.timestamp_format == "%Y-%m-%d %H:%M:%S"


def test_appliances_file_counts_match_sources():
    path = shared_file("testing.csv")

    summary = summarize_file(path, sniff_mapping(path))

    assert summary.rows_read == 4932
    assert summary.readings_sent == 4932
    assert summary.values_sent == 4932 * 31
    assert (summary.values_missing, summary.blank_lines, summary.rejected) == (0, 0, 0)
    assert summary.devices == {"testing": 4932}
    assert summary.first_ts == ms("2016-01-11 17:30:00")
    assert summary.last_ts == ms("2016-05-27 17:40:00")


def test_appliances_padded_quoted_numbers_become_numbers(appliances):
    _, readings = appliances

    first, last = readings[0], readings[-1]

    assert first.values["Appliances"] == 50  # written "  50"
    assert type(first.values["Appliances"]) is int
    assert first.values["lights"] == 40
    assert first.values["T6"] == 6.43333333333333  # " 6.433333333333330017"
    assert first.values["T_out"] == 6.25  # " 6.2500000000000000e+00"
    assert type(first.values["Tdewpoint"]) is float  # " 5.0000000000000000e+00"
    assert first.values["T1"] == 19.89
    assert first.values["NSM"] == 63000
    assert first.values["WeekStatus"] == "Weekday"
    assert first.values["Day_of_week"] == "Monday"
    assert last.values["Appliances"] == 270  # written " 270"
    assert last.line == 4933


def test_appliances_steps_are_whole_multiples_of_ten_minutes(appliances):
    _, readings = appliances

    steps = {b.ts - a.ts for a, b in zip(readings, readings[1:], strict=False)}

    assert all(step % 600_000 == 0 for step in steps)
    assert max(steps) == 270 * 60_000


def test_wall_times_inside_a_daylight_saving_gap_are_reported_not_merged():
    path = shared_file("testing.csv")
    mapping = dataclasses.replace(sniff_mapping(path), timezone="Europe/Brussels")

    summary = summarize_file(path, mapping)

    assert summary.rejected == 3
    assert [problem.line for problem in summary.problems] == [2681, 2682, 2683]
    assert summary.problems[0].reason == (
        "local time 2016-03-27 02:10:00 does not exist in Europe/Brussels "
        "(a daylight-saving gap); if the file's clock ignores daylight saving, "
        "use a fixed-offset zone such as 'Etc/GMT-1'"
    )
    assert summary.first_ts == ms("2016-01-11 17:30:00", utc_offset_hours=1)


# --- AirQualityUCI.csv -----------------------------------------------------------


@pytest.fixture(scope="module")
def air_quality():
    path = shared_file("AirQualityUCI.csv")
    return path, load_mapping(MAPPINGS / "AirQualityUCI.yaml")


def test_sniff_finds_air_quality_separator_decimal_comma_and_split_timestamp():
    mapping = sniff_mapping(shared_file("AirQualityUCI.csv"))

    assert (mapping.separator, mapping.decimal_comma, mapping.has_header) == (
        ";",
        True,
        True,
    )
    assert mapping.timestamp_columns == ("Date", "Time")
    assert mapping.timestamp_format == "%d/%m/%Y %H.%M.%S"
    assert mapping.missing_values == ()


def test_air_quality_counts_and_sentinels_match_sources(air_quality):
    summary = summarize_file(*air_quality)

    assert summary.rows_read == 9357
    assert summary.blank_lines == 114
    assert summary.rejected == 0
    assert summary.values_missing == 16_701
    assert summary.missing_by_column == {
        "CO(GT)": 1683,
        "NMHC(GT)": 8443,
        "NO2(GT)": 1642,
        "NOx(GT)": 1639,
        **{
            name: 366
            for name in (
                "PT08.S1(CO)",
                "C6H6(GT)",
                "PT08.S2(NMHC)",
                "PT08.S3(NOx)",
                "PT08.S4(NO2)",
                "PT08.S5(O3)",
                "T",
                "RH",
                "AH",
            )
        },
    }
    assert summary.empty_rows == 31
    assert summary.readings_sent == 9357 - 31
    assert summary.values_sent == 9357 * 13 - 16_701
    assert summary.devices == {"AirQualityUCI": 9326}
    assert summary.first_ts == ms("2004-03-10 18:00:00", utc_offset_hours=1)
    assert summary.last_ts == ms("2005-04-04 14:00:00", utc_offset_hours=1)


def test_air_quality_is_strictly_hourly_with_decimal_commas_read(air_quality):
    readings = readings_of(*air_quality)

    steps = Counter(b.ts - a.ts for a, b in zip(readings, readings[1:], strict=False))
    only_co = [r for r in readings if set(r.values) <= {"CO(GT)"}]

    assert len(readings) == 9357
    assert steps == {3_600_000: 9356}
    assert readings[0].values["CO(GT)"] == 2.6
    assert readings[0].values["PT08.S1(CO)"] == 1360
    assert type(readings[0].values["PT08.S1(CO)"]) is int
    assert readings[0].values["AH"] == 0.7578
    assert (readings[0].line, readings[-1].line) == (2, 9358)
    assert len(only_co) == 43


def test_sentinel_matches_the_same_number_written_with_a_decimal_comma(air_quality):
    readings = readings_of(*air_quality)

    co_missing = sum(1 for reading in readings if "CO(GT)" in reading.missing)

    # 457 of the 1,683 missing CO(GT) values are written "-200,0", not "-200".
    assert co_missing == 1683
    assert all(reading.values.get("CO(GT)") != -200 for reading in readings)


# --- R1.txt (ULB library motes) --------------------------------------------------

R1_DEVICES = {
    "mote-1": (397, 1163438042171, 1163462343781),
    "mote-2": (393, 1163438042015, 1163462343875),
    "mote-3": (389, 1163438043296, 1163462343781),
    "mote-4": (399, 1163438041812, 1163462343609),
    "mote-5": (398, 1163438042000, 1163462343796),
    "mote-7": (398, 1163438042031, 1163462343687),
    "mote-8": (397, 1163438047843, 1163462348593),
    "mote-9": (395, 1163438042109, 1163462284937),
    "mote-10": (406, 1163438041468, 1163462343203),
    "mote-11": (406, 1163438041625, 1163462343375),
    "mote-12": (405, 1163438041796, 1163462343531),
    "mote-13": (402, 1163438041984, 1163462343593),
    "mote-14": (398, 1163438102093, 1163462343781),
    "mote-15": (378, 1163438042000, 1163462343593),
    "mote-16": (398, 1163438041984, 1163462343656),
    "mote-17": (404, 1163438103328, 1163462345109),
    "mote-18": (392, 1163438042187, 1163462344937),
    "mote-19": (405, 1163438043281, 1163462345046),
    "mote-20": (403, 1163438041250, 1163462342906),
}


@pytest.fixture(scope="module")
def motes():
    path = shared_file("R1.txt")
    return path, load_mapping(MAPPINGS / "R1.yaml")


def test_sniff_reads_mote_file_as_headerless_epoch_ms_space_separated():
    mapping = sniff_mapping(shared_file("R1.txt"))

    assert (mapping.separator, mapping.decimal_comma, mapping.has_header) == (
        " ",
        True,
        False,
    )
    assert mapping.timestamp_columns == ("column_1",)
    assert mapping.timestamp_format == "epoch_ms"


def test_mote_file_has_nineteen_devices_with_their_time_ranges(motes):
    readings = readings_of(*motes)

    assert len(readings) == 7563
    assert per_device(readings) == R1_DEVICES
    assert min(r.ts for r in readings) == ms("2006-11-13 17:14:01.250")
    assert max(r.ts for r in readings) == ms("2006-11-13 23:59:08.593")


def test_mote_file_summary_counts(motes):
    summary = summarize_file(*motes)

    assert summary.rows_read == 7563
    assert summary.values_sent == 7563 * 7
    assert (summary.values_missing, summary.blank_lines, summary.rejected) == (0, 0, 0)
    assert summary.devices == {
        name: count for name, (count, _, _) in R1_DEVICES.items()
    }


def test_mote_values_mix_ints_and_decimal_comma_floats_in_one_column(motes):
    readings = readings_of(*motes)

    first, second = readings[0], readings[1]

    assert first == Reading(
        line=1,
        device="mote-20",
        ts=1163438041250,
        values={
            "sequence": 1,
            "internal_temperature": 21.21,
            "internal_voltage": 2.81,
            "humidity": 51.53,
            "temperature": 22.08,
            "par": 20,
            "tsr": 28,
        },
    )
    assert second.values["internal_voltage"] == 3
    assert type(second.values["internal_voltage"]) is int
    assert max(r.values["sequence"] for r in readings) == 406


# --- bad rows --------------------------------------------------------------------


def test_bad_rows_are_reported_with_their_line_numbers(tmp_path):
    path = write(
        tmp_path,
        "plant.csv",
        "ts,a,b\n"
        "2024-01-01 00:00:00,1,2\n"
        "2024-01-01 00:01:00,1\n"
        "yesterday,1,2\n"
        ",,\n"
        "2024-01-01 00:02:00,1,2,3\n"
        "2024-01-01 00:03:00,1,2,,\n"
        ",4,5\n"
        "2024-01-01 00:04:00,NA,\n",
    )
    mapping = IngestMapping(
        timestamp_format="%Y-%m-%d %H:%M:%S", missing_values=("NA",)
    )

    summary = summarize_file(path, mapping)

    assert summary.problems == [
        RowProblem(3, "2 fields, expected 3"),
        RowProblem(
            4, "timestamp 'yesterday' does not match the format '%Y-%m-%d %H:%M:%S'"
        ),
        RowProblem(
            6,
            "4 fields, expected 3: a value after the last named column "
            "(check the separator and quotes on this line)",
        ),
        RowProblem(8, "the timestamp is empty"),
    ]
    assert (summary.rows_read, summary.rejected, summary.blank_lines) == (7, 4, 1)
    assert (summary.readings_sent, summary.empty_rows, summary.values_missing) == (
        2,
        1,
        2,
    )


def test_empty_device_field_is_a_problem_and_devices_split_by_column(tmp_path):
    path = write(tmp_path, "fleet.csv", "ts;dev;t\n1000;a;1,5\n2000;;2\n3000;b;3\n")
    mapping = IngestMapping(separator=";", decimal_comma=True, device_column="dev")

    items = list(read_rows(path, mapping))

    assert items == [
        Reading(2, "a", 1000, {"t": 1.5}),
        RowProblem(3, "the device column is empty"),
        Reading(4, "b", 3000, {"t": 3}),
    ]


def test_epoch_seconds_with_fractions_become_milliseconds(tmp_path):
    path = write(tmp_path, "s.csv", "time,v\n1700000000,1\n1700000000.25,2\nsoon,3\n")
    mapping = IngestMapping(timestamp_columns=("time",), timestamp_format="epoch_s")

    items = list(read_rows(path, mapping))

    assert [getattr(item, "ts", None) for item in items] == [
        1_700_000_000_000,
        1_700_000_000_250,
        None,
    ]
    assert items[2] == RowProblem(
        4, "timestamp 'soon' is not a number of seconds since 1970"
    )


def test_quoted_line_break_keeps_the_record_and_later_line_numbers(tmp_path):
    path = write(tmp_path, "notes.csv", 'ts,note\n1,"two\nlines"\n2,x\n')

    items = list(read_rows(path, IngestMapping()))

    assert items == [
        Reading(2, "notes", 1, {"note": "two\nlines"}),
        Reading(4, "notes", 2, {"note": "x"}),
    ]


def test_mapped_column_missing_from_file_names_the_known_columns(tmp_path):
    path = write(tmp_path, "x.csv", "time,v\n1,2\n")

    with pytest.raises(IngestError) as caught:
        list(read_rows(path, IngestMapping()))

    assert str(caught.value) == (
        f"{path}: no column is named 'ts'; the columns are 'time', 'v'. Fix the "
        "column name in the mapping (timestamp_columns, device_column or "
        "skip_columns)"
    )


def test_missing_file_is_an_ingest_error(tmp_path):
    with pytest.raises(
        IngestError, match=r"absent\.csv: cannot open the file: No such file"
    ):
        list(read_rows(tmp_path / "absent.csv", IngestMapping()))


def test_rows_stream_before_an_undecodable_byte_far_into_the_file(tmp_path):
    path = tmp_path / "long.csv"
    good = "".join(f"{n},{n}\n" for n in range(10_000))
    path.write_bytes(b"ts,v\n" + good.encode() + b"1,\xff\n")

    rows = read_rows(path, IngestMapping())
    first = next(rows)

    assert first == Reading(2, "long", 0, {"v": 0})
    with pytest.raises(
        IngestError, match="the bytes are not utf-8-sig text; set encoding"
    ):
        list(rows)


def test_skip_columns_are_not_sent(tmp_path):
    path = write(tmp_path, "k.csv", "ts,keep,drop\n5,1,2\n")
    mapping = IngestMapping(skip_columns=("drop",), device_name="boiler")

    assert list(read_rows(path, mapping)) == [Reading(2, "boiler", 5, {"keep": 1})]


# --- value typing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "decimal_comma", "expected"),
    [
        ("  50", False, 50),
        (" 6.2500000000000000e+00", False, 6.25),
        ("19.890000000000001", False, 19.89),
        ("-200", False, -200),
        ("+5", False, 5),
        ("007", False, 7),
        (".5", False, 0.5),
        ("5.", False, 5.0),
        ("2,6", True, 2.6),
        ("-0,7578", True, -0.7578),
        ("1,2,3", True, "1,2,3"),
        ("2,6", False, "2,6"),
        ("nan", False, "nan"),
        ("inf", False, "inf"),
        ("1e999", False, "1e999"),
        ("1_000", False, "1_000"),
        ("99999999999999999999", False, "99999999999999999999"),
        (" Weekday ", False, "Weekday"),
        ("", False, None),
        ("   ", False, None),
    ],
)
def test_typed_value(text, decimal_comma, expected):
    value = typed_value(text, decimal_comma=decimal_comma)

    assert value == expected
    assert type(value) is type(expected)


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_every_long_is_read_back_as_the_same_int(number):
    assert typed_value(f" {number} ") == number


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_every_finite_float_is_read_back_exactly(number):
    value = typed_value(repr(number))

    assert value == number
    assert isinstance(value, float)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_every_finite_float_with_a_decimal_comma_is_read_back(number):
    assert typed_value(repr(number).replace(".", ","), decimal_comma=True) == number


# --- mapping files ---------------------------------------------------------------


def test_every_mapping_field_round_trips_through_a_yaml_file(tmp_path):
    mapping = IngestMapping(
        separator="\t",
        decimal_comma=True,
        has_header=False,
        columns=("when", "day", "who", "x", "y"),
        timestamp_columns=("when", "day"),
        timestamp_format="%H:%M %d.%m.%Y",
        timezone="Europe/Berlin",
        device_column="who",
        device_prefix="site-",
        device_type="meter",
        skip_columns=("y",),
        missing_values=("-999", "n/a"),
        encoding="latin-1",
    )
    document = {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in dataclasses.asdict(mapping).items()
    }
    text = io.StringIO()
    YAML(typ="safe").dump(document, text)
    path = write(tmp_path, "all.yaml", text.getvalue())

    assert load_mapping(path) == mapping


def test_shipped_mapping_files_load():
    for path in sorted(MAPPINGS.glob("*.yaml")):
        assert isinstance(load_mapping(path), IngestMapping)


def test_mapping_keys_left_out_keep_the_base_values(tmp_path):
    path = write(tmp_path, "m.yaml", "missing_values: -200\ntimezone: Etc/GMT-1\n")
    base = IngestMapping(separator=";", decimal_comma=True)

    mapping = load_mapping(path, base=base)

    assert mapping == dataclasses.replace(
        base, missing_values=("-200",), timezone="Etc/GMT-1"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "separator: ';'\nseperator: ','\n",
            "{path}:2:1: unknown key 'seperator'; did you mean 'separator'?",
        ),
        (
            "flavour: red\n",
            "{path}:1:1: unknown key 'flavour'; known keys are columns, decimal_comma, "
            "device_column, device_name, device_prefix, device_type, encoding, "
            "has_header, missing_values, separator, skip_columns, timestamp_columns, "
            "timestamp_format, timezone",
        ),
        (
            "separator: ';'\ntimezone: Europe/Rom\n",
            "{path}:2:11: timezone: 'Europe/Rom' is not an IANA time zone name; "
            "use one such as 'UTC', 'Europe/Rome' or 'Etc/GMT-1'",
        ),
        (
            "decimal_comma: yes\n",
            "{path}:1:16: decimal_comma: expected true or false (got 'yes')",
        ),
        (
            "timestamp_columns: {a: 1}\n",
            "{path}:1:20: timestamp_columns: expected a string or a list of strings "
            "(got {{'a': 1}})",
        ),
        (
            "timestamp_format: '%Y-%m-%d'\ntimestamp_columns: [d, t]\n"
            "timestamp_format: epoch_s\n",
            None,  # a duplicate key is a YAML error, checked below
        ),
        (
            "separator: ';;'\n",
            "{path}:1:12: separator: ';;' is not one character other than a quote "
            "or newline; use for example ';', ',', 'tab' or 'space'",
        ),
        (
            "decimal_comma: true\n",
            "{path}:1:16: decimal_comma: cannot be true when the separator is ','; "
            "set the real separator",
        ),
        (
            "timestamp_format: Y-m-d\n",
            "{path}:1:19: timestamp_format: 'Y-m-d' is neither epoch_ms, epoch_s nor "
            "a strptime format; write for example '%Y-%m-%d %H:%M:%S'",
        ),
        (
            "device_column: node\ndevice_name: boiler\n",
            "{path}:2:14: device_name: give either device_column or device_name, "
            "not both",
        ),
        (
            "encoding: klingon\n",
            "{path}:1:11: encoding: 'klingon' is not a known text encoding; "
            "try 'latin-1'",
        ),
        (
            "- separator\n",
            "{path}:1:1: a mapping file holds 'key: value' lines, but this one holds "
            "a CommentedSeq",
        ),
    ],
)
def test_mapping_file_errors_name_file_position_key_and_fix(tmp_path, text, message):
    path = write(tmp_path, "bad.yaml", text)

    with pytest.raises(IngestError) as caught:
        load_mapping(path)

    if message is None:
        assert str(caught.value).startswith(f"{path}:3:1: not valid YAML")
    else:
        assert str(caught.value) == message.format(path=path)


def test_mapping_file_lists_every_bad_key_in_file_order(tmp_path):
    path = write(tmp_path, "bad.yaml", "has_header: 1\nseparator: ';'\ntimezon: UTC\n")

    with pytest.raises(IngestError) as caught:
        load_mapping(path)

    assert str(caught.value) == (
        f"{path}:1:13: has_header: expected true or false (got 1)\n"
        f"{path}:3:1: unknown key 'timezon'; did you mean 'timezone'?"
    )


def test_mapping_file_syntax_error_is_located(tmp_path):
    path = write(tmp_path, "broken.yaml", "separator: ';'\ncolumns: [a, b\n")

    with pytest.raises(IngestError) as caught:
        load_mapping(path)

    assert re.fullmatch(
        rf"{re.escape(str(path))}:3:1: not valid YAML: .+", str(caught.value)
    )


def test_unreadable_mapping_file_is_an_ingest_error(tmp_path):
    with pytest.raises(IngestError, match=r"nope\.yaml: cannot read the mapping file"):
        load_mapping(tmp_path / "nope.yaml")


def test_yaml_python_tags_build_no_objects(tmp_path):
    path = write(
        tmp_path, "evil.yaml", "device_name: !!python/object/apply:os.getcwd []\n"
    )

    with pytest.raises(IngestError, match=r"device_name: expected a string"):
        load_mapping(path)


@pytest.mark.parametrize(
    ("text", "separator"),
    [("tab", "\t"), ("\\t", "\t"), ("Space", " "), (";", ";"), ("semicolon", ";")],
)
def test_parse_separator_accepts_names(text, separator):
    assert parse_separator(text) == separator


def test_sniff_rejects_an_empty_file(tmp_path):
    path = write(tmp_path, "empty.csv", "\n\n")

    with pytest.raises(IngestError, match=r"empty\.csv: the file is empty"):
        sniff_mapping(path)


# --- posting to a real HTTP edge -------------------------------------------------


@dataclass
class FakeEdge:
    """A loopback edge with the device API and edgectl's registration API."""

    url: str = ""
    tokens: dict[str, str] = field(default_factory=dict)
    registered: list[dict] = field(default_factory=list)
    posts: list[tuple[str, list]] = field(default_factory=list)
    telemetry_attempts: int = 0
    failures: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    register_answer: bytes | None = None
    connections: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def device_of(self, token):
        return next(
            (name for name, known in self.tokens.items() if known == token), None
        )


class _EdgeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so one client connection serves all
    # One buffered write per answer: split header and body writes would meet
    # the client's delayed ACK and cost about 40 ms each.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True

    def do_POST(self):  # noqa: N802 - the name http.server dispatches to
        edge = self.server.edge
        body = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with edge.lock:
            edge.connections.add(self.client_address)
            if self.path == "/api/edgectl/devices":
                return self._register(edge, body)
            match = re.fullmatch(r"/api/v1/([^/]+)/telemetry", self.path)
            if match:
                return self._telemetry(edge, match.group(1), body)
        self._answer(404, {"message": "no such endpoint"})

    def _register(self, edge, body):
        edge.registered.append(body)
        if edge.register_answer is not None:
            return self._answer(200, edge.register_answer)
        token = edge.tokens.setdefault(body["name"], f"token-{len(edge.tokens)}")
        self._answer(200, {**body, "token": token})

    def _telemetry(self, edge, token, body):
        edge.telemetry_attempts += 1
        if edge.failures:
            status, headers = edge.failures.pop(0)
            return self._answer(status, {"message": "busy"}, headers)
        device = edge.device_of(token)
        if device is None:
            return self._answer(401, {"status": 401, "message": "Invalid device token"})
        edge.posts.append((device, body))
        self._answer(200, b"")

    def _answer(self, status, payload, headers=None):
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass


@pytest.fixture
def edge() -> Iterator[FakeEdge]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EdgeHandler)
    server.daemon_threads = True
    server.edge = FakeEdge(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.edge
    server.shutdown()
    server.server_close()


@pytest.fixture
def sleeps(monkeypatch):
    """Record retry waits instead of sleeping (the clock is ours to fake)."""
    waits = []
    monkeypatch.setattr(ingest.time, "sleep", waits.append)
    return waits


@pytest.fixture
def two_devices(tmp_path):
    return write(
        tmp_path,
        "site.csv",
        "ts,dev,t,state\n"
        "1000,a,1.5,on\n"
        "1000,b,2,off\n"
        "2000,a,-200,on\n"
        "3000,a,3.25,\n"
        "4000,b,4,on\n",
    )


TWO_DEVICES = IngestMapping(
    device_column="dev", device_type="probe", missing_values=("-200",)
)


def test_ingest_registers_devices_and_posts_thingsboard_json_batches(edge, two_devices):
    progress = []

    summary = ingest_http(
        two_devices, TWO_DEVICES, url=edge.url, batch_size=2, progress=progress.append
    )

    assert edge.registered == [
        {"name": "a", "type": "probe"},
        {"name": "b", "type": "probe"},
    ]
    assert edge.posts == [
        (
            "a",
            [
                {"ts": 1000, "values": {"t": 1.5, "state": "on"}},
                {"ts": 2000, "values": {"state": "on"}},
            ],
        ),
        (
            "b",
            [
                {"ts": 1000, "values": {"t": 2, "state": "off"}},
                {"ts": 4000, "values": {"t": 4, "state": "on"}},
            ],
        ),
        ("a", [{"ts": 3000, "values": {"t": 3.25}}]),
    ]
    assert (summary.rows_read, summary.readings_sent, summary.values_sent) == (5, 5, 8)
    assert summary.values_missing == 2
    assert summary.devices == {"a": 3, "b": 2}
    assert (summary.first_ts, summary.last_ts) == (1000, 4000)
    assert progress == [2, 4, 5]
    assert len(edge.connections) == 1


def test_ingest_uses_given_tokens_without_registering(edge, two_devices):
    edge.tokens.update({"a": "secret-a", "b": "secret-b"})

    ingest_http(
        two_devices, TWO_DEVICES, url=edge.url, token_for=lambda name: f"secret-{name}"
    )

    assert edge.registered == []
    assert [device for device, _ in edge.posts] == ["a", "b"]


def test_ingest_retries_503_and_429_honouring_retry_after(edge, two_devices, sleeps):
    edge.failures = [
        (503, {"Retry-After": "7"}),
        (429, {"Retry-After": "120"}),
        (503, {}),
    ]

    summary = ingest_http(two_devices, TWO_DEVICES, url=edge.url)

    assert sleeps == [7.0, 30.0, 2.0]
    assert edge.telemetry_attempts == 5  # four for device a, one for b
    assert [device for device, _ in edge.posts] == ["a", "b"]
    assert summary.readings_sent == 5


def test_ingest_gives_up_on_a_server_that_stays_busy(edge, two_devices, sleeps):
    edge.failures = [(503, {"Retry-After": "0"})] * 5

    with pytest.raises(IngestError) as caught:
        ingest_http(two_devices, TWO_DEVICES, url=edge.url)

    assert str(caught.value) == (
        f"telemetry for device 'a': the edge at {edge.url} still failed after 5 "
        "attempts (HTTP 503); check that the edge is running and reachable, then "
        "run the ingest again"
    )
    assert sleeps == [0.0] * 4


def test_ingest_reports_a_4xx_with_status_and_server_message(edge, two_devices, sleeps):
    with pytest.raises(IngestError) as caught:
        ingest_http(two_devices, TWO_DEVICES, url=edge.url, token_for=lambda _: "stale")

    assert str(caught.value) == (
        f"telemetry for device 'a': the edge at {edge.url} answered HTTP 401: "
        "Invalid device token; the device token is not known to this edge; "
        "check the token source"
    )
    assert sleeps == []


def test_ingest_failure_says_how_many_rows_were_already_posted(edge, two_devices):
    edge.tokens["a"] = "token-a"

    with pytest.raises(IngestError) as caught:
        ingest_http(
            two_devices,
            TWO_DEVICES,
            url=edge.url,
            token_for="token-{}".format,
            batch_size=1,
        )

    assert str(caught.value) == (
        f"telemetry for device 'b': the edge at {edge.url} answered HTTP 401: "
        "Invalid device token; the device token is not known to this edge; "
        "check the token source\n"
        "1 of the rows were posted before this failure; posting the whole file "
        "again is safe"
    )
    assert edge.posts == [("a", [{"ts": 1000, "values": {"t": 1.5, "state": "on"}}])]


def test_ingest_retries_then_reports_an_unreachable_edge(two_devices, sleeps):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"

    with pytest.raises(IngestError) as caught:
        ingest_http(two_devices, TWO_DEVICES, url=url)

    assert str(caught.value).startswith(
        f"registering device 'a': the edge at {url} still failed after 5 attempts "
        "(ConnectError"
    )
    assert sleeps == [0.5, 1.0, 2.0, 4.0]


def test_ingest_rejects_a_registration_answer_without_token(edge, two_devices):
    edge.register_answer = b'{"name": "a"}'

    with pytest.raises(IngestError) as caught:
        ingest_http(two_devices, TWO_DEVICES, url=edge.url)

    assert str(caught.value) == (
        f"registering device 'a': the answer from {edge.url} has no token; check "
        "that the URL points at an edgectl edge"
    )


@pytest.mark.parametrize(
    ("url", "batch_size", "message"),
    [
        ("localhost:8080", 500, "edge URL 'localhost:8080' must start with http://"),
        ("http://127.0.0.1:1", 0, "batch size must be at least 1, got 0"),
    ],
)
def test_ingest_checks_url_and_batch_size_first(two_devices, url, batch_size, message):
    with pytest.raises(IngestError, match=re.escape(message)):
        ingest_http(two_devices, TWO_DEVICES, url=url, batch_size=batch_size)


def test_ingest_never_logs_device_tokens(edge, two_devices, caplog):
    caplog.set_level(logging.DEBUG, logger="edgectl")

    ingest_http(two_devices, TWO_DEVICES, url=edge.url, batch_size=1)

    ours = [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("edgectl")
    ]
    assert len(ours) >= 5
    assert not any("token-" in message for message in ours)


def test_ingest_posts_every_mote_reading_of_the_real_file(edge, motes):
    summary = ingest_http(*motes, url=edge.url)

    posted = [(device, item) for device, body in edge.posts for item in body]
    by_device = Counter(device for device, _ in posted)

    assert len(edge.registered) == 19
    assert {entry["type"] for entry in edge.registered} == {"tmote-sky"}
    assert len(edge.posts) == 19
    assert by_device == {name: count for name, (count, _, _) in R1_DEVICES.items()}
    assert summary.readings_sent == 7563
    assert posted[0] == (
        "mote-20",
        {
            "ts": 1163438041250,
            "values": {
                "sequence": 1,
                "internal_temperature": 21.21,
                "internal_voltage": 2.81,
                "humidity": 51.53,
                "temperature": 22.08,
                "par": 20,
                "tsr": 28,
            },
        },
    )


def test_ingest_and_dry_run_count_the_same(edge, air_quality):
    sent = ingest_http(*air_quality, url=edge.url, batch_size=1000)
    counted = summarize_file(*air_quality)

    for name in ("rows_read", "readings_sent", "values_sent", "values_missing"):
        assert getattr(sent, name) == getattr(counted, name)
    assert sent.devices == counted.devices
    assert sum(len(body) for _, body in edge.posts) == 9326
    assert [len(body) for _, body in edge.posts] == [1000] * 9 + [326]
