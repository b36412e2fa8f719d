"""What the DuckDB file keeps: values in their type, Unicode keys, one row per
(entity, key, ts), latest values that never regress, attribute scopes, deletes,
TTL expiry, entities and edges, schema versions and files that will not open.

Messages go the real way (a chain from edgectl/rulechains or a small one written
here, run by the Engine and stored by Store.apply); a ChangeSet is built by hand
only where a chain would add nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pytest
from conftest import RULECHAINS

from edgectl import storage
from edgectl.changes import AttributeValue, ChangeSet, PendingEvent
from edgectl.checks import load_chain
from edgectl.engine import Engine, Run
from edgectl.errors import SchemaVersionError, StorageError
from edgectl.message import (
    POST_ATTRIBUTES_REQUEST,
    POST_TELEMETRY_REQUEST,
    TIMESERIES_DELETED,
    EntityRef,
    Message,
)
from edgectl.storage import SCHEMA_VERSION, Store
from edgectl.tables import RowFilter, rows
from edgectl.values import DOUBLE, LONG, STRING, parse_json

EDGE_ROOT = RULECHAINS / "edge_root.yaml"
HISTORY_ONLY = RULECHAINS / "edge_history_only.yaml"
DEVICE = EntityRef("DEVICE", "sensor-1")
OTHER_DEVICE = EntityRef("DEVICE", "sensor-2")
VALUE_COLUMNS = ("bool_v", "long_v", "dbl_v", "str_v", "json_v")


def telemetry(body, ts: int = 1000, device: EntityRef = DEVICE, **metadata) -> Message:
    """A POST_TELEMETRY_REQUEST; a str or bytes body is parsed as JSON text."""
    data = parse_json(body) if isinstance(body, str | bytes) else body
    return Message(POST_TELEMETRY_REQUEST, device, data, {"ts": str(ts), **metadata})


def attributes(body, ts: int = 1000, device: EntityRef = DEVICE, **metadata):
    """A POST_ATTRIBUTES_REQUEST; a str or bytes body is parsed as JSON text."""
    data = parse_json(body) if isinstance(body, str | bytes) else body
    return Message(POST_ATTRIBUTES_REQUEST, device, data, {"ts": str(ts), **metadata})


def delete_timeseries(keys, start: int, end: int, device: EntityRef = DEVICE):
    data = {"keys": keys, "startTs": start, "endTs": end}
    return Message(TIMESERIES_DELETED, device, data, {"ts": "99999"})


@contextmanager
def opened(path: Path) -> Iterator[Store]:
    """A Store on ``path`` that is closed (checkpointed) on the way out."""
    store = Store(path)
    try:
        yield store
    finally:
        store.close()


def store_through(store: Store, chain_path: Path, messages: list[Message]) -> Run:
    """Run one batch through a chain file and commit it, as the writer does."""
    engine = Engine(load_chain(chain_path))
    try:
        for order, message in enumerate(messages):
            message.order = order
        run = Run(store=store)
        engine.run(messages, run)
        store.apply(run.changes)
    finally:
        engine.close()
    return run


def raw_values(store: Store, table: str, key: str, **where) -> list[dict]:
    """The set value columns of each row of ``key``, as DuckDB holds them.

    Each row becomes ``{column: (value, DuckDB type)}`` of its non-null value
    columns only, so a row with two columns set shows both.
    """
    clauses = "".join(f" AND t.{column} = ?" for column in where)
    order = "t.last_update_ts" if table == "attribute_kv" else "t.ts"
    selected = ", ".join(f"t.{c}, typeof(t.{c})" for c in VALUE_COLUMNS)
    found = store.connection.execute(
        f"SELECT {selected} FROM {table} t JOIN key_dictionary k ON k.key_id = t.key "
        f"WHERE k.key = ?{clauses} ORDER BY {order} DESC",
        [key, *where.values()],
    ).fetchall()
    return [
        {
            column: (row[2 * index], row[2 * index + 1])
            for index, column in enumerate(VALUE_COLUMNS)
            if row[2 * index] is not None
        }
        for row in found
    ]


def same(left, right) -> bool:
    """Equal and of the same JSON type all the way down (1 == 1.0 == True)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(
            same(left[k], right[k]) for k in left
        )
    if isinstance(left, list):
        return len(left) == len(right) and all(map(same, left, right))
    return left == right


def one_row(store: Store, table: str, key: str = "v", **filters) -> dict:
    found = rows(store, table, RowFilter(device="sensor-1", key=key, **filters))
    assert len(found) == 1, found
    return found[0]


# -- values keep their type and value --------------------------------------------

# (JSON text of the value, type name, value read back, raw column, raw value)
FIDELITY = [
    ("true", "boolean", True, "bool_v", True),
    ("false", "boolean", False, "bool_v", False),
    ("9007199254740993", "long", 9007199254740993, "long_v", 9007199254740993),
    ("-9223372036854775808", "long", -(2**63), "long_v", -(2**63)),
    ("9223372036854775807", "long", 2**63 - 1, "long_v", 2**63 - 1),
    ("0", "long", 0, "long_v", 0),
    ("1.0", "double", 1.0, "dbl_v", 1.0),
    ("12e3", "double", 12000.0, "dbl_v", 12000.0),
    ("4.2e1", "double", 42.0, "dbl_v", 42.0),
    ("-0.5", "double", -0.5, "dbl_v", -0.5),
    # Digits beyond a double's precision round to the nearest double.
    (
        "3.14159265358979323846264338",
        "double",
        3.141592653589793,
        "dbl_v",
        3.141592653589793,
    ),
    ('"00042"', "string", "00042", "str_v", "00042"),
    ('"true"', "string", "true", "str_v", "true"),
    ('"12e3"', "string", "12e3", "str_v", "12e3"),
    ('"null"', "string", "null", "str_v", "null"),
    ('""', "string", "", "str_v", ""),
    ('"温度 ünïcödé"', "string", "温度 ünïcödé", "str_v", "温度 ünïcödé"),
    ('"🔥 fire"', "string", "🔥 fire", "str_v", "🔥 fire"),
    ('"\\ud83d\\udd25 escaped"', "string", "🔥 escaped", "str_v", "🔥 escaped"),
    (
        '" spaced\\t\\"quoted\\"\\n"',
        "string",
        ' spaced\t"quoted"\n',
        "str_v",
        ' spaced\t"quoted"\n',
    ),
    ('"nul\\u0000inside"', "string", "nul\x00inside", "str_v", "nul\x00inside"),
    (
        '{"a": {"b": [1, 2.5, "x", true, null]}}',
        "json",
        {"a": {"b": [1, 2.5, "x", True, None]}},
        "json_v",
        '{"a":{"b":[1,2.5,"x",true,null]}}',
    ),
    ('[1, "two", 3.0]', "json", [1, "two", 3.0], "json_v", '[1,"two",3.0]'),
    ("{}", "json", {}, "json_v", "{}"),
    ("[]", "json", [], "json_v", "[]"),
    # Integers beyond 64 bits are kept exactly, as the JSON text of the number.
    ("9223372036854775808", "json", 2**63, "json_v", "9223372036854775808"),
    ("-9223372036854775809", "json", -(2**63) - 1, "json_v", "-9223372036854775809"),
    (
        "123456789012345678901234567890",
        "json",
        123456789012345678901234567890,
        "json_v",
        "123456789012345678901234567890",
    ),
    (
        '{"big": 18446744073709551616}',
        "json",
        {"big": 18446744073709551616},
        "json_v",
        '{"big":18446744073709551616}',
    ),
]
DUCKDB_TYPES = {
    "bool_v": "BOOLEAN",
    "long_v": "BIGINT",
    "dbl_v": "DOUBLE",
    "str_v": "VARCHAR",
    "json_v": "VARCHAR",
}


@pytest.mark.parametrize(
    ("text", "kind", "expected", "column", "raw"),
    FIDELITY,
    ids=[case[0][:30] for case in FIDELITY],
)
def test_value_keeps_its_type_and_value_in_every_table_after_reopening(
    tmp_path, text, kind, expected, column, raw
):
    path = tmp_path / "edge.duckdb"
    with opened(path) as store:
        body = f'{{"v": {text}}}'
        run = store_through(store, EDGE_ROOT, [telemetry(body), attributes(body)])
        assert run.failures == []

    with opened(path) as store:
        for table in ("ts_kv", "ts_kv_latest", "attribute_kv"):
            row = one_row(store, table)
            assert row["type"] == kind, table
            assert same(row["value"], expected), (table, row["value"])
            assert raw_values(store, table, "v") == [
                {column: (raw, DUCKDB_TYPES[column])}
            ]
        # What the cloud will receive is the same value of the same type.
        bodies = [
            parse_json(body)
            for (body,) in store.connection.execute(
                "SELECT body FROM cloud_event ORDER BY seq"
            ).fetchall()
        ]
        assert same(bodies[0]["data"]["v"], expected)
        assert same(bodies[1]["kv"]["v"], expected)


def test_double_written_with_a_point_stays_a_double_in_the_event_body(store):
    store_through(store, EDGE_ROOT, [telemetry(b'{"t": 1.0, "n": 1}')])

    [(body,)] = store.connection.execute("SELECT body FROM cloud_event").fetchall()
    assert body == '{"data":{"t":1.0,"n":1},"ts":1000}'


def test_null_value_rejects_the_message_with_the_reason_and_stores_nothing(store):
    messages = [
        telemetry(b'{"good": 1, "bad": null}', ts=1000),
        telemetry(b'{"good": 2}', ts=2000),
        attributes(b'{"fw": null}', ts=3000),
    ]

    run = store_through(store, EDGE_ROOT, messages)

    errors = [(failure.node, failure.error) for failure in run.failures]
    assert errors == [
        ("save-telemetry", "key 'bad': null is not a value; leave the key out instead"),
        (
            "save-client-attributes",
            "key 'fw': null is not a value; leave the key out instead",
        ),
    ]
    assert [
        (r["key"], r["ts"], r["value"]) for r in rows(store, "ts_kv", RowFilter())
    ] == [("good", 2000, 2)]
    assert rows(store, "attribute_kv", RowFilter()) == []
    events = store.connection.execute("SELECT ts FROM cloud_event").fetchall()
    assert events == [(2000,)]


# -- keys are any Unicode string ---------------------------------------------------

KEYS = [
    "Active+ Sum",
    "a/b?c",
    "温度",
    "🔥",
    "x.y",
    'say "hi"',
    "it's",
    "  two  spaces  ",
    "back\\slash",
    "new\nline",
    "é",  # composed
    "e\u0301",  # decomposed: a different key, byte for byte
    "Temp",
    "temp",
    "%_like_wildcards_%",
]


def test_unicode_keys_round_trip_exactly_in_every_table(tmp_path):
    path = tmp_path / "edge.duckdb"
    body = json.dumps(
        {key: index for index, key in enumerate(KEYS)}, ensure_ascii=False
    )
    with opened(path) as store:
        run = store_through(store, EDGE_ROOT, [telemetry(body), attributes(body)])
        assert run.failures == []

    with opened(path) as store:
        assert sorted(store.key_ids) == sorted(KEYS)
        for table in ("ts_kv", "ts_kv_latest", "attribute_kv"):
            found = rows(store, table, RowFilter(limit=100))
            assert sorted((r["key"], r["value"]) for r in found) == sorted(
                (key, index) for index, key in enumerate(KEYS)
            )
            for index, key in enumerate(KEYS):
                assert one_row(store, table, key=key)["value"] == index
        assert store.read_attributes(DEVICE, "client") == {
            key: AttributeValue(LONG, index, 1000) for index, key in enumerate(KEYS)
        }


# -- one row per (entity, key, ts) -------------------------------------------------


def test_type_change_at_one_instant_within_a_batch_leaves_one_row_the_last(store):
    store_through(
        store,
        EDGE_ROOT,
        [
            telemetry(b'{"v": 5}', ts=1000),
            telemetry(b'{"v": 5.5}', ts=1000),
            telemetry(b'{"w": 5.5}', ts=1000),
            telemetry(b'{"w": 5}', ts=1000),
        ],
    )

    assert raw_values(store, "ts_kv", "v") == [{"dbl_v": (5.5, "DOUBLE")}]
    assert raw_values(store, "ts_kv", "w") == [{"long_v": (5, "BIGINT")}]
    assert raw_values(store, "ts_kv_latest", "v") == [{"dbl_v": (5.5, "DOUBLE")}]
    assert raw_values(store, "ts_kv_latest", "w") == [{"long_v": (5, "BIGINT")}]


def test_type_change_at_one_instant_within_one_message_leaves_the_last(store):
    body = b'[{"ts": 1000, "values": {"v": 1}}, {"ts": 1000, "values": {"v": 2.0}}]'

    store_through(store, EDGE_ROOT, [telemetry(body)])

    assert raw_values(store, "ts_kv", "v") == [{"dbl_v": (2.0, "DOUBLE")}]


def test_type_change_at_one_instant_across_batches_leaves_one_row(tmp_path):
    path = tmp_path / "edge.duckdb"
    bodies = [b'{"v": 7}', b'{"v": 7.25}', b'{"v": "seven"}', b'{"v": true}']
    with opened(path) as store:
        for body in bodies:
            store_through(store, EDGE_ROOT, [telemetry(body, ts=1000)])
            assert len(raw_values(store, "ts_kv", "v")) == 1
        store_through(store, EDGE_ROOT, [telemetry(b'{"v": {"n": 7}}', ts=1000)])

    with opened(path) as store:
        assert raw_values(store, "ts_kv", "v") == [{"json_v": ('{"n":7}', "VARCHAR")}]
        assert one_row(store, "ts_kv_latest")["value"] == {"n": 7}


def test_same_key_and_ts_of_other_devices_and_other_instants_are_separate_rows(
    store,
):
    store_through(
        store,
        EDGE_ROOT,
        [
            telemetry(b'{"v": 1}', ts=1000),
            telemetry(b'{"v": 2}', ts=1000, device=OTHER_DEVICE),
            telemetry(b'{"v": 3}', ts=1001),
        ],
    )
    store_through(store, EDGE_ROOT, [telemetry(b'{"v": 4.5}', ts=1000)])

    found = rows(store, "ts_kv", RowFilter(key="v"))
    assert [(r["device"], r["ts"], r["value"]) for r in found] == [
        ("sensor-1", 1001, 3),
        ("sensor-1", 1000, 4.5),
        ("sensor-2", 1000, 2),
    ]


def test_large_batch_keeps_one_row_per_instant_the_last_to_arrive(store):
    # Past some thousands of readings the store checks for repeated instants
    # before folding them; both outcomes must store the same rows.
    count = 12_000
    changes = ChangeSet()
    for ts in range(count):
        changes.add_reading(DEVICE, "v", ts, (LONG, ts), None, True)
    changes.add_reading(DEVICE, "v", 5, (DOUBLE, 5.5), None, True)
    changes.add_reading(DEVICE, "v", 7, (STRING, "seven"), None, False)
    unique = ChangeSet()
    for ts in range(count):
        unique.add_reading(OTHER_DEVICE, "v", ts, (DOUBLE, ts / 2), None, ts % 2 == 0)

    store.apply(changes)
    store.apply(unique)

    stored = dict(
        store.connection.execute(
            "SELECT entity_id, count(*) FROM ts_kv GROUP BY entity_id"
        ).fetchall()
    )
    assert stored == {1: count, 2: count}
    assert [
        (r["ts"], r["value"])
        for r in rows(
            store, "ts_kv", RowFilter(device="sensor-1", key="v", since=5, until=7)
        )
    ] == [(7, "seven"), (6, 6), (5, 5.5)]
    found = rows(store, "ts_kv_latest", RowFilter(key="v"))
    assert [(r["device"], r["ts"], r["value"]) for r in found] == [
        ("sensor-1", count - 1, count - 1),
        ("sensor-2", count - 2, (count - 2) / 2),
    ]


# -- latest values never regress ---------------------------------------------------


def latest(store: Store, key: str = "v") -> tuple[int, object]:
    row = one_row(store, "ts_kv_latest", key=key)
    return row["ts"], row["value"]


def test_late_older_reading_never_replaces_a_newer_latest_value(store):
    store_through(store, EDGE_ROOT, [telemetry(b'{"v": 2}', ts=2000)])

    store_through(store, EDGE_ROOT, [telemetry(b'{"v": 1}', ts=1000)])

    assert latest(store) == (2000, 2)
    history = rows(store, "ts_kv", RowFilter(key="v"))
    assert [(r["ts"], r["value"]) for r in history] == [(2000, 2), (1000, 1)]


def test_older_reading_later_in_the_same_batch_does_not_win_latest(store):
    store_through(
        store,
        EDGE_ROOT,
        [telemetry(b'{"v": 3}', ts=3000), telemetry(b'{"v": 1}', ts=1000)],
    )

    assert latest(store) == (3000, 3)


def test_reading_with_an_equal_ts_replaces_latest_even_with_another_type(store):
    store_through(store, EDGE_ROOT, [telemetry(b'{"v": 2}', ts=2000)])

    store_through(store, EDGE_ROOT, [telemetry(b'{"v": "two"}', ts=2000)])

    assert latest(store) == (2000, "two")
    assert raw_values(store, "ts_kv_latest", "v") == [{"str_v": ("two", "VARCHAR")}]


def test_equal_ts_within_a_batch_the_last_arrival_is_latest(store):
    store_through(
        store,
        EDGE_ROOT,
        [telemetry(b'{"v": 1}', ts=2000), telemetry(b'{"v": 9}', ts=2000)],
    )

    assert latest(store) == (2000, 9)


def test_newer_reading_replaces_latest(store):
    store_through(store, EDGE_ROOT, [telemetry(b'{"v": 1}', ts=1000)])

    store_through(store, EDGE_ROOT, [telemetry(b'{"v": 2.5}', ts=1001)])

    assert latest(store) == (1001, 2.5)


def test_latest_skip_keeps_history_and_leaves_latest_untouched(store):
    store_through(store, EDGE_ROOT, [telemetry(b'{"v": 1, "w": 1}', ts=1000)])

    store_through(store, HISTORY_ONLY, [telemetry(b'{"v": 2, "x": 2}', ts=5000)])

    assert latest(store) == (1000, 1)
    assert latest(store, "w") == (1000, 1)
    assert rows(store, "ts_kv_latest", RowFilter(key="x")) == []
    history = rows(store, "ts_kv", RowFilter(key="v"))
    assert [(r["ts"], r["value"]) for r in history] == [(5000, 2), (1000, 1)]


# -- attributes ----------------------------------------------------------------------


def test_attribute_scopes_are_separate_with_their_own_last_update_ts(store):
    store_through(
        store,
        EDGE_ROOT,
        [
            attributes(b'{"mode": "client-mode"}', ts=1000),
            attributes(b'{"mode": 2}', ts=2000, scope="SHARED_SCOPE"),
            attributes(b'{"mode": 3.5}', ts=3000, scope="SERVER_SCOPE"),
        ],
    )

    found = rows(store, "attribute_kv", RowFilter(key="mode"))
    assert [
        (r["scope"], r["value"], r["type"], r["last_update_ts"]) for r in found
    ] == [
        ("server", 3.5, "double", 3000),
        ("shared", 2, "long", 2000),
        ("client", "client-mode", "string", 1000),
    ]
    assert store.read_attribute(DEVICE, "client", "mode") == AttributeValue(
        STRING, "client-mode", 1000
    )
    assert store.read_attribute(DEVICE, "shared", "mode") == AttributeValue(
        LONG, 2, 2000
    )


def test_changed_attribute_replaces_its_row_and_last_update_ts(store):
    store_through(store, EDGE_ROOT, [attributes(b'{"fw": "1.0", "hw": "a"}', ts=1000)])

    store_through(store, EDGE_ROOT, [attributes(b'{"fw": "1.1", "hw": "a"}', ts=2000)])

    assert raw_values(store, "attribute_kv", "fw") == [{"str_v": ("1.1", "VARCHAR")}]
    assert one_row(store, "attribute_kv", key="fw")["last_update_ts"] == 2000
    # update_only_on_change (the edge root chain's setting): "hw" was not rewritten.
    assert one_row(store, "attribute_kv", key="hw")["last_update_ts"] == 1000


DELETE_ATTRIBUTES_CHAIN = """\
name: Delete attributes
entry: route
nodes:
  - id: route
    type: message_type_switch
    next:
      Post attributes: save
      Other: delete
  - id: save
    type: save_attributes
    config:
      scope: shared
  - id: delete
    type: delete_attributes
    config:
      scope: shared
      keys: ["mode", "${extraKey}"]
"""


def test_deleting_an_attribute_removes_it_from_that_scope_only(store, write_chain):
    chain = write_chain(DELETE_ATTRIBUTES_CHAIN)
    store_through(
        store,
        chain,
        [
            attributes(b'{"mode": "eco", "level": 3, "keep": true}', ts=1000),
            attributes(b'{"mode": "client"}', ts=1000, scope="CLIENT_SCOPE"),
        ],
    )
    delete = Message("DELETE_REQUEST", DEVICE, {}, {"ts": "2000", "extraKey": "level"})

    run = store_through(store, chain, [delete])

    assert run.failures == []
    found = rows(store, "attribute_kv", RowFilter())
    assert sorted((r["scope"], r["key"], r["value"]) for r in found) == [
        ("client", "mode", "client"),
        ("shared", "keep", True),
    ]
    assert store.read_attribute(DEVICE, "shared", "mode") is None


def test_deleting_attributes_of_an_unknown_device_registers_nothing(store, write_chain):
    chain = write_chain(DELETE_ATTRIBUTES_CHAIN)
    delete = Message("DELETE_REQUEST", OTHER_DEVICE, {}, {"extraKey": "level"})

    run = store_through(store, chain, [delete])

    assert run.failures == []
    assert store.entity(OTHER_DEVICE) is None
    assert store.key_ids == {}


def test_attribute_deleted_and_written_by_hand_keeps_one_row_per_scope(store):
    changes = ChangeSet()
    changes.set_attribute(DEVICE, "server", "a", AttributeValue(LONG, 1, 10))
    changes.set_attribute(DEVICE, "shared", "a", AttributeValue(LONG, 2, 10))
    store.apply(changes)
    changes = ChangeSet()
    changes.delete_attribute(DEVICE, "server", "a")
    changes.set_attribute(DEVICE, "shared", "a", AttributeValue(STRING, "x", 20))
    store.apply(changes)

    assert store.read_attributes(DEVICE, "server") == {}
    assert store.read_attributes(DEVICE, "shared") == {
        "a": AttributeValue(STRING, "x", 20)
    }
    assert len(raw_values(store, "attribute_kv", "a")) == 1


# -- deleting a timeseries range -----------------------------------------------------


def readings(store: Store, key: str = "v", device: str = "sensor-1") -> list[tuple]:
    found = rows(store, "ts_kv", RowFilter(device=device, key=key))
    return [(r["ts"], r["value"]) for r in found]


def test_deleting_a_range_that_holds_latest_falls_back_to_what_remains(store):
    store_through(
        store,
        EDGE_ROOT,
        [telemetry({"v": n, "w": n}, ts=n * 1000) for n in (1, 2, 3)]
        + [telemetry({"v": 30}, ts=3000, device=OTHER_DEVICE)],
    )

    run = store_through(store, EDGE_ROOT, [delete_timeseries(["v"], 2000, 3000)])

    assert run.failures == []
    assert readings(store) == [(1000, 1)]
    assert latest(store) == (1000, 1)
    # Other keys and other devices keep everything.
    assert latest(store, "w") == (3000, 3)
    assert readings(store, "v", "sensor-2") == [(3000, 30)]


def test_deleting_a_range_below_latest_leaves_latest_as_it_was(store):
    store_through(
        store, EDGE_ROOT, [telemetry({"v": n}, ts=n * 1000) for n in (1, 2, 3)]
    )

    store_through(store, EDGE_ROOT, [delete_timeseries(["v"], 0, 1500)])

    assert readings(store) == [(3000, 3), (2000, 2)]
    assert latest(store) == (3000, 3)


def test_deleting_every_reading_of_a_key_removes_its_latest_value(tmp_path):
    path = tmp_path / "edge.duckdb"
    with opened(path) as store:
        store_through(store, EDGE_ROOT, [telemetry({"v": 1, "w": 1}, ts=1000)])
        store_through(store, EDGE_ROOT, [delete_timeseries(["v"], 0, 10**12)])

    with opened(path) as store:
        assert readings(store) == []
        assert rows(store, "ts_kv_latest", RowFilter(key="v")) == []
        assert latest(store, "w") == (1000, 1)


def test_delete_removes_readings_of_a_device_and_key_new_in_the_same_batch(store):
    store_through(
        store,
        EDGE_ROOT,
        [
            telemetry({"v": 1, "w": 2}, ts=1000, device=OTHER_DEVICE),
            delete_timeseries(["v"], 0, 10**12, device=OTHER_DEVICE),
        ],
    )

    assert readings(store, "v", "sensor-2") == []
    assert rows(store, "ts_kv_latest", RowFilter(key="v")) == []
    assert readings(store, "w", "sensor-2") == [(1000, 2)]


def test_reading_that_arrives_after_a_delete_in_the_same_batch_is_kept(store):
    store_through(store, EDGE_ROOT, [telemetry({"v": 1}, ts=1000)])

    store_through(
        store,
        EDGE_ROOT,
        [delete_timeseries(["v"], 0, 10**12), telemetry({"v": 2}, ts=2000)],
    )

    assert readings(store) == [(2000, 2)]


# -- TTL -------------------------------------------------------------------------------

TTL_CHAIN = """\
name: Save with a TTL
entry: save
nodes:
  - id: save
    type: save_timeseries
    config:
      ttl: 60
"""


def test_readings_past_their_ttl_expire_and_others_stay(store, write_chain):
    with_ttl = write_chain(TTL_CHAIN, "ttl.yaml")
    store_through(store, with_ttl, [telemetry({"t": 1}, ts=10_000)])
    store_through(store, with_ttl, [telemetry({"t": 2}, ts=20_000, TTL="5")])
    store_through(store, EDGE_ROOT, [telemetry({"t": 3}, ts=30_000)])
    expires = store.connection.execute(
        "SELECT ts, expires FROM ts_kv ORDER BY ts"
    ).fetchall()
    assert expires == [(10_000, 70_000), (20_000, 25_000), (30_000, None)]

    assert store.expire(25_000) == 0
    assert store.expire(25_001) == 1
    assert readings(store, "t") == [(30_000, 3), (10_000, 1)]
    assert store.expire(70_001) == 1
    assert store.expire(10**15) == 0

    assert readings(store, "t") == [(30_000, 3)]
    # As in ThingsBoard, TTL trims history; the latest value stays.
    assert latest(store, "t") == (30_000, 3)


def test_server_ts_and_ttl_follow_the_run_clock(run_chain, store):
    chain = """
        name: Server time
        entry: save
        nodes:
          - id: save
            type: save_timeseries
            config:
              use_server_ts: true
              ttl: 1
    """

    run_chain(chain, [telemetry({"t": 1}, ts=5)])

    now = run_chain.now
    assert store.connection.execute("SELECT ts, expires FROM ts_kv").fetchall() == [
        (now, now + 1000)
    ]
    assert store.expire(now + 1000) == 0
    assert store.expire(now + 1001) == 1


# -- entities and edges --------------------------------------------------------------


def test_device_keeps_name_type_token_and_edge_and_is_found_by_token(tmp_path):
    path = tmp_path / "cloud.duckdb"
    with opened(path) as store:
        added = store.add_entity(
            DEVICE, type="thermometer", token="tok-Ωmega", edge="edge-a"
        )
        again = store.add_entity(DEVICE, type="other", token="other-token")
        assert again == added

    with opened(path) as store:
        found = store.entity(DEVICE)
        assert found is not None
        assert (found.name, found.type, found.token, found.edge) == (
            "sensor-1",
            "thermometer",
            "tok-Ωmega",
            "edge-a",
        )
        assert store.entity_by_token("tok-Ωmega") == found
        assert store.entity_by_token("tok-Ωmeg") is None
        assert store.entity_by_token("other-token") is None
        assert store.owner_edge(DEVICE) == "edge-a"
        count = store.connection.execute("SELECT count(*) FROM entity").fetchone()
        assert count == (1,)


def test_telemetry_from_an_unknown_device_registers_it_without_a_token(store):
    store_through(store, EDGE_ROOT, [telemetry({"t": 1}, device=OTHER_DEVICE)])

    found = store.entity(OTHER_DEVICE)
    assert found is not None
    assert (found.type, found.token, found.edge) == ("default", None, None)
    assert store.owner_edge(OTHER_DEVICE) is None


def test_edges_keep_their_credentials_and_an_existing_name_keeps_its_own(tmp_path):
    path = tmp_path / "cloud.duckdb"
    with opened(path) as store:
        store.add_edge("edge-b", "key-b", "secret-b")
        store.add_edge("edge-a", "key-a", "secret-a")
        store.add_edge("edge-a", "key-new", "secret-new")

    with opened(path) as store:
        edges = [(e.name, e.routing_key, e.secret) for e in store.edges()]
        assert edges == [
            ("edge-a", "key-a", "secret-a"),
            ("edge-b", "key-b", "secret-b"),
        ]


# -- a batch is all or nothing ---------------------------------------------------------


def test_failed_batch_stores_nothing_and_the_next_batch_still_works(store):
    changes = ChangeSet()
    changes.add_reading(DEVICE, "ok", 1000, (LONG, 1), None, True)
    changes.set_attribute(DEVICE, "client", "fw", AttributeValue(STRING, "1", 1000))
    # An event body that cannot be written as JSON fails the batch after its
    # readings and attributes were written inside the transaction.
    changes.add_event(PendingEvent(0, "TIMESERIES_UPDATED", DEVICE, object(), 1000))

    with pytest.raises(TypeError):
        store.apply(changes)

    assert rows(store, "ts_kv", RowFilter()) == []
    assert rows(store, "attribute_kv", RowFilter()) == []
    assert store.key_ids == {}
    assert store.entity(DEVICE) is None
    store_through(store, EDGE_ROOT, [telemetry({"ok": 1})])
    assert readings(store, "ok") == [(1000, 1)]
    assert store.connection.execute("SELECT seq FROM cloud_event").fetchall() == [(1,)]


# -- schema versions -----------------------------------------------------------------


def set_schema_version(path: Path, version: int) -> None:
    with duckdb.connect(str(path)) as con:
        con.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(version)]
        )


def schema_version(path: Path) -> str:
    with duckdb.connect(str(path), read_only=True) as con:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'")
        return row.fetchone()[0]


def test_new_file_records_the_current_schema_version(tmp_path):
    path = tmp_path / "edge.duckdb"
    with opened(path):
        pass

    assert schema_version(path) == str(SCHEMA_VERSION)


def test_file_from_a_newer_edgectl_is_refused_and_left_as_it_was(tmp_path):
    path = tmp_path / "edge.duckdb"
    with opened(path) as store:
        store_through(store, EDGE_ROOT, [telemetry({"t": 1})])
    set_schema_version(path, SCHEMA_VERSION + 1)

    with pytest.raises(SchemaVersionError) as refused:
        Store(path)

    assert str(refused.value) == (
        f"{path} was written by a newer edgectl (schema version "
        f"{SCHEMA_VERSION + 1}); this edgectl reads up to version {SCHEMA_VERSION}. "
        "Upgrade edgectl to open it."
    )
    # The file is closed again (not locked) and untouched.
    assert schema_version(path) == str(SCHEMA_VERSION + 1)
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM ts_kv").fetchone() == (1,)


def add_note_column(con) -> None:
    """A migration to version SCHEMA_VERSION + 1, registered only in tests."""
    con.execute("ALTER TABLE entity ADD COLUMN note VARCHAR")
    con.execute("UPDATE entity SET note = 'migrated ' || name")


def test_file_from_an_older_edgectl_is_migrated_once(tmp_path, monkeypatch):
    path = tmp_path / "edge.duckdb"
    with opened(path) as store:
        store_through(store, EDGE_ROOT, [telemetry({"t": 1})])
    calls = []

    def migrate(con) -> None:
        calls.append(1)
        add_note_column(con)

    monkeypatch.setattr(storage, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(storage.MIGRATIONS, SCHEMA_VERSION, migrate)

    with opened(path) as store:
        notes = store.connection.execute("SELECT name, note FROM entity").fetchall()
        assert notes == [("sensor-1", "migrated sensor-1")]
        assert readings(store, "t") == [(1000, 1)]
    with opened(path):
        pass

    assert calls == [1]
    assert schema_version(path) == str(SCHEMA_VERSION + 1)


def test_migration_sees_the_old_layout_and_may_create_new_tables(tmp_path, monkeypatch):
    path = tmp_path / "edge.duckdb"
    with opened(path) as store:
        store_through(store, EDGE_ROOT, [telemetry({"t": 1})])
    seen = []

    def migrate(con) -> None:
        found = con.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_name = 'device_note'"
        ).fetchone()
        seen.append(found[0])
        con.execute("CREATE TABLE device_note (entity_id INTEGER, note VARCHAR)")
        con.execute("INSERT INTO device_note SELECT id, name FROM entity")

    tables = {**storage._TABLES, "device_note": "entity_id INTEGER, note VARCHAR"}
    monkeypatch.setattr(storage, "_TABLES", tables)
    monkeypatch.setattr(storage, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(storage.MIGRATIONS, SCHEMA_VERSION, migrate)

    with opened(path) as store:
        notes = store.connection.execute("SELECT * FROM device_note").fetchall()

    assert seen == [0]
    assert notes == [(1, "sensor-1")]


def test_failed_migration_leaves_the_file_at_its_old_version(tmp_path, monkeypatch):
    path = tmp_path / "edge.duckdb"
    with opened(path) as store:
        store_through(store, EDGE_ROOT, [telemetry({"t": 1})])

    def migrate(con) -> None:
        add_note_column(con)
        con.execute("SELECT * FROM no_such_table")

    monkeypatch.setattr(storage, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(storage.MIGRATIONS, SCHEMA_VERSION, migrate)

    with pytest.raises(StorageError) as failed:
        Store(path)

    assert str(failed.value).startswith(f"preparing {path} failed: ")
    assert "no_such_table" in str(failed.value)
    assert schema_version(path) == str(SCHEMA_VERSION)
    with duckdb.connect(str(path), read_only=True) as con:
        columns = [row[0] for row in con.execute("DESCRIBE entity").fetchall()]
    assert "note" not in columns


def test_file_with_no_migration_for_its_version_is_refused_clearly(
    tmp_path, monkeypatch
):
    path = tmp_path / "edge.duckdb"
    with opened(path):
        pass
    monkeypatch.setattr(storage, "SCHEMA_VERSION", SCHEMA_VERSION + 1)

    with pytest.raises(SchemaVersionError) as refused:
        Store(path)

    assert str(refused.value) == (
        f"{path} has schema version {SCHEMA_VERSION}, and this edgectl (schema "
        f"version {SCHEMA_VERSION + 1}) has no migration from version "
        f"{SCHEMA_VERSION}. The file was not changed; please report this."
    )
    assert schema_version(path) == str(SCHEMA_VERSION)


# -- files that will not open ----------------------------------------------------------


def test_file_that_is_not_a_database_gives_a_storage_error_and_is_kept(tmp_path):
    path = tmp_path / "edge.duckdb"
    garbage = b"this is not a DuckDB file\x00\xff" * 200
    path.write_bytes(garbage)

    with pytest.raises(StorageError) as failed:
        Store(path)

    message = str(failed.value)
    assert message.startswith(f"opening {path} failed: ")
    assert "not a valid DuckDB database file" in message
    assert "left as it is" in message
    assert path.read_bytes() == garbage
