"""``edgectl inspect tables --db FILE`` on a stopped file: the overview with row
counts and queue state, one table's rows (text and JSON) and its errors."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import RULECHAINS
from typer.testing import CliRunner

from edgectl import cli, outbox
from edgectl.checks import load_chain
from edgectl.cli import app
from edgectl.engine import Engine, Run
from edgectl.message import EntityRef, Message
from edgectl.outbox import CLOUD_QUEUE, dead_letter, mark_delivered
from edgectl.storage import SCHEMA_VERSION, Store

DEVICE = EntityRef("DEVICE", "boiler-1")
OTHER = EntityRef("DEVICE", "boiler-2")
NOW = 1_700_000_000_000


def telemetry(data, ts: int, device: EntityRef = DEVICE) -> Message:
    return Message("POST_TELEMETRY_REQUEST", device, data, {"ts": str(ts)})


def posted_attributes(data, ts: int, **metadata) -> Message:
    return Message("POST_ATTRIBUTES_REQUEST", DEVICE, data, {"ts": str(ts), **metadata})


@pytest.fixture(scope="module")
def written_file(tmp_path_factory) -> Path:
    """An edge's file, written through the edge root chain, then closed.

    Eight temperatures 0..7 at ts 1000..1007 from boiler-1, a few typed values,
    attributes in two scopes, twelve cloud events: one delivered, one dead.
    """
    with pytest.MonkeyPatch.context() as clock:
        clock.setattr(outbox, "now_ms", lambda: NOW)
        return write_edge_file(tmp_path_factory.mktemp("written") / "edge.duckdb")


@pytest.fixture
def stopped_file(written_file, tmp_path) -> Path:
    """A copy of ``written_file`` for one test."""
    path = tmp_path / "edge.duckdb"
    shutil.copyfile(written_file, path)
    return path


def write_edge_file(path: Path) -> Path:
    store = Store(path)
    engine = Engine(load_chain(RULECHAINS / "edge_root.yaml"))
    messages = [telemetry({"temperature": n}, ts=1000 + n) for n in range(8)]
    messages += [
        telemetry({"温度 °C": 21.5, "big": 2**64, "on": True, "cfg": {"a": [1]}}, 2000),
        telemetry({"temperature": 99}, ts=1500, device=OTHER),
        posted_attributes({"fw": "00042", "rate": 1.0}, ts=3000),
        posted_attributes({"fw": 7}, ts=4000, scope="SHARED_SCOPE"),
    ]
    for order, message in enumerate(messages):
        message.order = order
    run = Run(store=store)
    engine.run(messages, run)
    store.apply(run.changes)
    engine.close()
    with store.transaction() as con:
        mark_delivered(con, CLOUD_QUEUE, None, 1)
        dead_letter(con, CLOUD_QUEUE, None, 2)
        mark_delivered(con, CLOUD_QUEUE, None, 2)
    store.add_entity(EntityRef("DEVICE", "with-token"), token="s3cret-token")
    store.close()
    return path


def inspect(*args: str):
    # Wide enough that rich truncates no table name.
    result = CliRunner().invoke(
        app, ["inspect", "tables", *args], env={"COLUMNS": "160"}
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.exception
    )
    return result


def inspect_json(*args: str):
    result = inspect(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the installed entry point (its error boundary included)."""
    monkeypatch.setattr(sys, "argv", ["edgectl", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return exited.value.code, capsys.readouterr().err


# -- the overview ---------------------------------------------------------------------


def test_overview_lists_every_table_with_its_row_count(stopped_file):
    result = inspect("--db", str(stopped_file))

    assert result.exit_code == 0, result.output
    counts = dict(re.findall(r"│ (\w+)\s+│\s+([\d,]+) │", result.stdout))
    assert counts == {
        "ts_kv": "13",
        "ts_kv_latest": "6",
        "attribute_kv": "3",
        "entity": "3",
        "edge": "0",
        "key_dictionary": "7",
        "cloud_event": "10",
        "edge_event": "0",
        "dead_letter": "1",
    }
    assert "queues" in result.stdout
    queue_row = r"│ cloud_event │\s+- │\s+10 │ [\d.]+ h │\s+1 │\s+2 │\s+12 │"
    assert re.search(queue_row, result.stdout), result.stdout


def test_overview_as_json_gives_counts_and_queue_state(stopped_file):
    data = inspect_json("--db", str(stopped_file))

    assert data["file"] == str(stopped_file)
    assert {item["table"]: item["rows"] for item in data["tables"]}["ts_kv"] == 13
    assert data["queues"] == [
        {
            "queue": "cloud_event",
            "edge": None,
            "pending": 10,
            "oldest_pending_ts": NOW,
            "dead_letters": 1,
            "delivered_seq": 2,
            "last_seq": 12,
        }
    ]


# -- one table's rows -----------------------------------------------------------------


def test_timeseries_rows_as_json_are_newest_first_with_values_in_their_type(
    stopped_file,
):
    found = inspect_json(
        "ts_kv",
        "--db",
        str(stopped_file),
        "--device",
        "boiler-1",
        "--key",
        "temperature",
    )

    assert found == [
        {
            "device": "boiler-1",
            "key": "temperature",
            "ts": 1000 + n,
            "value": n,
            "type": "long",
        }
        for n in reversed(range(8))
    ]


def test_values_keep_their_json_type_in_json_output(stopped_file):
    found = inspect_json("ts_kv", "--db", str(stopped_file), "--since", "2000")

    by_key = {row["key"]: (row["value"], row["type"]) for row in found}
    assert by_key == {
        "温度 °C": (21.5, "double"),
        "big": (2**64, "json"),
        "on": (True, "boolean"),
        "cfg": ({"a": [1]}, "json"),
    }
    assert {row["ts"] for row in found} == {2000}


def test_unicode_key_filter_finds_its_rows(stopped_file):
    found = inspect_json("ts_kv_latest", "--db", str(stopped_file), "--key", "温度 °C")

    assert [(row["key"], row["value"]) for row in found] == [("温度 °C", 21.5)]


def test_time_range_device_and_limit_narrow_the_rows(stopped_file):
    found = inspect_json(
        "ts_kv",
        "--db",
        str(stopped_file),
        "--key",
        "temperature",
        "--since",
        "1002",
        "--until",
        "1600",
        "--limit",
        "3",
    )

    assert [(row["device"], row["ts"]) for row in found] == [
        ("boiler-2", 1500),
        ("boiler-1", 1007),
        ("boiler-1", 1006),
    ]


def test_attribute_rows_as_json_include_scope_and_last_update_ts(stopped_file):
    found = inspect_json("attribute_kv", "--db", str(stopped_file))

    assert found == [
        {
            "device": "boiler-1",
            "key": "fw",
            "ts": 4000,
            "value": 7,
            "type": "long",
            "scope": "shared",
            "last_update_ts": 4000,
        },
        {
            "device": "boiler-1",
            "key": "fw",
            "ts": 3000,
            "value": "00042",
            "type": "string",
            "scope": "client",
            "last_update_ts": 3000,
        },
        {
            "device": "boiler-1",
            "key": "rate",
            "ts": 3000,
            "value": 1.0,
            "type": "double",
            "scope": "client",
            "last_update_ts": 3000,
        },
    ]


@pytest.mark.parametrize("scope", ["shared", "SHARED_SCOPE"])
def test_scope_filter_takes_edgectl_and_thingsboard_names(stopped_file, scope):
    found = inspect_json("attribute_kv", "--db", str(stopped_file), "--scope", scope)

    assert [(row["scope"], row["key"], row["value"]) for row in found] == [
        ("shared", "fw", 7)
    ]


def test_rows_as_text_show_a_sparkline_of_a_numeric_history(stopped_file):
    result = inspect(
        "ts_kv",
        "--db",
        str(stopped_file),
        "--device",
        "boiler-1",
        "--key",
        "temperature",
    )

    assert result.exit_code == 0, result.output
    assert "temperature: ▁▂▃▄▅▆▇█" in result.stdout
    ts_column = re.findall(r"│ boiler-1 │ temperature │ (\d+) │", result.stdout)
    assert ts_column == [str(1000 + n) for n in reversed(range(8))]


def test_event_and_dead_letter_rows_are_listed_newest_first(stopped_file):
    events = inspect_json("cloud_event", "--db", str(stopped_file), "--limit", "2")
    dead = inspect_json("dead_letter", "--db", str(stopped_file))

    assert [event["seq"] for event in events] == [12, 11]
    assert [(row["seq"], row["queue"], row["action"]) for row in dead] == [
        (2, "cloud_event", "TIMESERIES_UPDATED")
    ]


def test_access_tokens_are_hidden(stopped_file):
    found = inspect_json("entity", "--db", str(stopped_file))

    tokens = {row["name"]: row["token"] for row in found}
    assert tokens == {"boiler-1": None, "boiler-2": None, "with-token": "(hidden)"}


# -- errors --------------------------------------------------------------------------


def test_unknown_table_exits_1_with_the_table_list(stopped_file, monkeypatch, capsys):
    code, err = run_main(
        monkeypatch,
        capsys,
        "inspect",
        "tables",
        "ts_kv_history",
        "--db",
        str(stopped_file),
    )

    assert code == 1
    assert err.strip() == (
        "error: no table 'ts_kv_history'; tables: ts_kv, ts_kv_latest, attribute_kv, "
        "entity, edge, key_dictionary, cloud_event, edge_event, dead_letter"
    )


def test_unknown_scope_exits_1_naming_the_scopes(stopped_file, monkeypatch, capsys):
    code, err = run_main(
        monkeypatch,
        capsys,
        *("inspect", "tables", "attribute_kv", "--db", str(stopped_file)),
        *("--scope", "global"),
    )

    assert code == 1
    assert "no scope 'global'; use client, server, shared" in err


def test_missing_file_exits_1_and_is_not_created(tmp_path, monkeypatch, capsys):
    path = tmp_path / "nothing.duckdb"

    code, err = run_main(monkeypatch, capsys, "inspect", "tables", "--db", str(path))

    assert code == 1
    assert f"{path} does not exist" in err
    assert not path.exists()


def test_file_that_is_not_a_database_exits_1_and_is_kept(tmp_path, monkeypatch, capsys):
    path = tmp_path / "edge.duckdb"
    path.write_bytes(b"\x00garbage" * 512)

    code, err = run_main(monkeypatch, capsys, "inspect", "tables", "--db", str(path))

    assert code == 1
    assert err.startswith(f"error: opening {path} failed: ")
    assert "Traceback" not in err
    assert path.read_bytes() == b"\x00garbage" * 512


def test_file_from_a_newer_edgectl_exits_1_with_the_reason(
    stopped_file, monkeypatch, capsys
):
    import duckdb

    with duckdb.connect(str(stopped_file)) as con:
        con.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'",
            [str(SCHEMA_VERSION + 1)],
        )

    code, err = run_main(
        monkeypatch, capsys, "inspect", "tables", "--db", str(stopped_file)
    )

    assert code == 1
    assert (
        f"was written by a newer edgectl (schema version {SCHEMA_VERSION + 1})" in err
    )
