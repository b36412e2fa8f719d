"""The event queues in the DuckDB file: sequence numbers that only grow, events
in arrival order, delivery, failed attempts, dead letters and queue stats.

Events are queued the real way, by the push nodes of the shipped root chains;
delivery and failures use the outbox functions the sender and receiver call.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
from conftest import RULECHAINS

from edgectl import outbox
from edgectl.checks import load_chain
from edgectl.devices import register_device
from edgectl.engine import Engine, Run
from edgectl.message import EntityRef, Message
from edgectl.outbox import (
    CLOUD_QUEUE,
    EDGE_QUEUE,
    QueueStats,
    dead_letter,
    delivered_seq,
    mark_delivered,
    queue_stats,
    read_pending,
    record_failure,
)
from edgectl.replay import Selection, purge, requeue_dead
from edgectl.storage import Store
from edgectl.sync import encode_event

EDGE_ROOT = RULECHAINS / "edge_root.yaml"
CLOUD_ROOT = RULECHAINS / "cloud_root.yaml"
DEVICE = EntityRef("DEVICE", "pump-1")
NOW = 1_700_000_000_000


@pytest.fixture
def clock(monkeypatch) -> list[int]:
    """The queue's clock (created and dead-letter times), frozen at ``clock[0]``."""
    now = [NOW]
    monkeypatch.setattr(outbox, "now_ms", lambda: now[0])
    return now


@contextmanager
def opened(path: Path) -> Iterator[Store]:
    store = Store(path)
    try:
        yield store
    finally:
        store.close()


def queue_through(store: Store, chain_path: Path, messages: list[Message]) -> Run:
    """Run one batch through a chain and commit it, as the writer does."""
    engine = Engine(load_chain(chain_path))
    try:
        for order, message in enumerate(messages):
            message.order = order
        run = Run(store=store)
        engine.run(messages, run)
        store.apply(run.changes)
    finally:
        engine.close()
    assert run.failures == []
    return run


def telemetry(value, ts: int = 1000, device: EntityRef = DEVICE) -> Message:
    return Message("POST_TELEMETRY_REQUEST", device, {"v": value}, {"ts": str(ts)})


def posted_attributes(value, ts: int = 1000) -> Message:
    return Message("POST_ATTRIBUTES_REQUEST", DEVICE, {"a": value}, {"ts": str(ts)})


def queued(store: Store, queue: str = CLOUD_QUEUE) -> list[tuple]:
    """``(seq, action, entity name, body, ts)`` of a queue's rows, by seq."""
    return store.connection.execute(
        "SELECT seq, action, entity_name, body, ts FROM " + queue + " ORDER BY seq"
    ).fetchall()


def seqs(store: Store, queue: str = CLOUD_QUEUE) -> list[int]:
    return [row[0] for row in queued(store, queue)]


def deliver(store: Store, queue: str, edge: str | None, through: int) -> None:
    with store.transaction() as con:
        mark_delivered(con, queue, edge, through)


# -- numbering -----------------------------------------------------------------


def test_events_are_numbered_in_arrival_order_whatever_path_they_took(store, clock):
    messages = [
        posted_attributes("x", ts=1),
        telemetry(1, ts=2),
        posted_attributes("y", ts=3),
        telemetry(2.5, ts=4),
        Message("TIMESERIES_DELETED", DEVICE, {"keys": ["v"]}, {"ts": "5"}),
    ]

    queue_through(store, EDGE_ROOT, messages)

    assert queued(store) == [
        (1, "POST_ATTRIBUTES", "pump-1", '{"kv":{"a":"x"},"ts":1,"scope":"client"}', 1),
        (2, "TIMESERIES_UPDATED", "pump-1", '{"data":{"v":1},"ts":2}', 2),
        (3, "POST_ATTRIBUTES", "pump-1", '{"kv":{"a":"y"},"ts":3,"scope":"client"}', 3),
        (4, "TIMESERIES_UPDATED", "pump-1", '{"data":{"v":2.5},"ts":4}', 4),
        (5, "TIMESERIES_DELETED", "pump-1", '{"data":{"keys":["v"]},"ts":5}', 5),
    ]
    pending = read_pending(store, CLOUD_QUEUE, None, 0, 10)
    assert [(e.seq, e.created_ts, e.attempts, e.last_error) for e in pending] == [
        (seq, NOW, 0, None) for seq in range(1, 6)
    ]


def test_sequence_grows_across_batches_and_reopening_after_delivery_emptied_it(
    tmp_path, clock
):
    path = tmp_path / "edge.duckdb"
    with opened(path) as store:
        queue_through(store, EDGE_ROOT, [telemetry(n, ts=n) for n in range(3)])
        queue_through(store, EDGE_ROOT, [telemetry(n, ts=n) for n in range(3, 5)])
        assert seqs(store) == [1, 2, 3, 4, 5]
        deliver(store, CLOUD_QUEUE, None, 5)
        assert seqs(store) == []

    with opened(path) as store:
        queue_through(store, EDGE_ROOT, [telemetry(9, ts=9)])
        assert seqs(store) == [6]
        assert delivered_seq(store, CLOUD_QUEUE, None) == 5


def test_device_registration_queues_entity_created_in_the_same_commit(store, clock):
    device, created = register_device(store, "pump-1", type="pump", token="t-1")
    queue_through(store, EDGE_ROOT, [telemetry(1)])

    assert created
    assert [(seq, action) for seq, action, *_ in queued(store)] == [
        (1, "ENTITY_CREATED"),
        (2, "TIMESERIES_UPDATED"),
    ]
    assert json.loads(queued(store)[0][3]) == {"type": "pump"}


def test_event_ids_are_unique_and_stable_across_reopening(tmp_path, clock):
    path = tmp_path / "edge.duckdb"
    with opened(path) as store:
        queue_through(store, EDGE_ROOT, [telemetry(n) for n in range(3)])
        before = [
            e.event_id(store.instance)
            for e in read_pending(store, CLOUD_QUEUE, None, 0, 10)
        ]

    with opened(path) as store:
        after = [
            e.event_id(store.instance)
            for e in read_pending(store, CLOUD_QUEUE, None, 0, 10)
        ]

    assert before == after
    assert len(set(before)) == 3


# -- delivery ------------------------------------------------------------------


def test_mark_delivered_deletes_through_a_seq_and_keeps_the_rest_in_order(store, clock):
    queue_through(store, EDGE_ROOT, [telemetry(n, ts=n) for n in range(5)])

    deliver(store, CLOUD_QUEUE, None, 2)

    assert seqs(store) == [3, 4, 5]
    assert delivered_seq(store, CLOUD_QUEUE, None) == 2
    pending = read_pending(store, CLOUD_QUEUE, None, 2, 2)
    assert [event.seq for event in pending] == [3, 4]


def test_record_failure_counts_attempts_and_keeps_the_last_error(tmp_path, clock):
    path = tmp_path / "edge.duckdb"
    with opened(path) as store:
        queue_through(store, EDGE_ROOT, [telemetry(1), telemetry(2)])
        with store.transaction() as con:
            assert record_failure(con, CLOUD_QUEUE, None, 1, "timeout") == 1
            assert record_failure(con, CLOUD_QUEUE, None, 1, "HTTP 400: bad") == 2
            assert record_failure(con, CLOUD_QUEUE, None, 99, "no such") == 0

    with opened(path) as store:
        pending = read_pending(store, CLOUD_QUEUE, None, 0, 10)
    assert [(e.seq, e.attempts, e.last_error) for e in pending] == [
        (1, 2, "HTTP 400: bad"),
        (2, 0, None),
    ]


def test_dead_letter_keeps_the_event_with_its_error_until_purged(tmp_path, clock):
    path = tmp_path / "edge.duckdb"
    with opened(path) as store:
        queue_through(store, EDGE_ROOT, [telemetry(1, ts=11), telemetry(2, ts=22)])
        clock[0] = NOW + 5000
        # As the sender does for an event the peer refuses for good.
        with store.transaction() as con:
            record_failure(con, CLOUD_QUEUE, None, 1, "rejected: bad key")
            dead_letter(con, CLOUD_QUEUE, None, 1)
            mark_delivered(con, CLOUD_QUEUE, None, 1)

    with opened(path) as store:
        assert seqs(store) == [2]
        dead = store.connection.execute(
            "SELECT queue, edge, seq, action, body, ts, attempts, last_error, "
            "created_ts, dead_ts FROM dead_letter"
        ).fetchall()
        assert dead == [
            (
                CLOUD_QUEUE,
                None,
                1,
                "TIMESERIES_UPDATED",
                '{"data":{"v":1},"ts":11}',
                11,
                1,
                "rejected: bad key",
                NOW,
                NOW + 5000,
            )
        ]
        assert purge(store, Selection(state="dead")) == 1

    with opened(path) as store:
        assert store.connection.execute("SELECT * FROM dead_letter").fetchall() == []
        queue_through(store, EDGE_ROOT, [telemetry(3)])
        assert seqs(store) == [2, 3]


def test_requeued_dead_letter_gets_a_new_sequence_after_every_other(store, clock):
    queue_through(store, EDGE_ROOT, [telemetry(n, ts=n) for n in range(3)])
    with store.transaction() as con:
        dead_letter(con, CLOUD_QUEUE, None, 1)
        mark_delivered(con, CLOUD_QUEUE, None, 1)

    assert requeue_dead(store, Selection(state="dead")) == 1
    queue_through(store, EDGE_ROOT, [telemetry(9, ts=9)])

    assert [(seq, ts) for seq, _, _, _, ts in queued(store)] == [
        (2, 1),
        (3, 2),
        (4, 0),
        (5, 9),
    ]


# -- queue stats ---------------------------------------------------------------


def test_queue_stats_show_pending_lag_dead_letters_and_cursor(store, clock):
    queue_through(store, EDGE_ROOT, [telemetry(1), telemetry(2)])
    clock[0] = NOW + 1000
    queue_through(store, EDGE_ROOT, [telemetry(3), telemetry(4)])
    with store.transaction() as con:
        mark_delivered(con, CLOUD_QUEUE, None, 1)
        dead_letter(con, CLOUD_QUEUE, None, 2)
        mark_delivered(con, CLOUD_QUEUE, None, 2)

    assert queue_stats(store, CLOUD_QUEUE) == [
        QueueStats(
            queue=CLOUD_QUEUE,
            edge=None,
            pending=2,
            oldest_pending_ts=NOW + 1000,
            dead_letters=1,
            delivered_seq=2,
            last_seq=4,
        )
    ]
    deliver(store, CLOUD_QUEUE, None, 4)
    assert queue_stats(store, CLOUD_QUEUE) == [
        QueueStats(CLOUD_QUEUE, None, 0, None, 1, 4, 4)
    ]


# -- the cloud's queue, one cursor per edge ------------------------------------


def shared_attributes(device: EntityRef, value) -> Message:
    return Message(
        "ATTRIBUTES_UPDATED",
        device,
        {"target": value},
        {"ts": "1000", "scope": "SHARED_SCOPE"},
    )


def test_edge_events_share_one_sequence_and_are_delivered_per_edge(tmp_path, clock):
    path = tmp_path / "cloud.duckdb"
    first, second = EntityRef("DEVICE", "a-1"), EntityRef("DEVICE", "b-1")
    with opened(path) as store:
        store.add_edge("edge-a", "key-a", "secret-a")
        store.add_edge("edge-b", "key-b", "secret-b")
        store.add_entity(first, edge="edge-a")
        store.add_entity(second, edge="edge-b")
        queue_through(
            store,
            CLOUD_ROOT,
            [
                shared_attributes(first, 1),
                shared_attributes(second, 2),
                shared_attributes(first, 3),
                shared_attributes(EntityRef("DEVICE", "no-edge"), 4),
            ],
        )
        every = read_pending(store, EDGE_QUEUE, None, 0, 10)
        assert [(e.seq, e.edge, e.entity_name) for e in every] == [
            (1, "edge-a", "a-1"),
            (2, "edge-b", "b-1"),
            (3, "edge-a", "a-1"),
        ]
        deliver(store, EDGE_QUEUE, "edge-a", 3)

    with opened(path) as store:
        assert read_pending(store, EDGE_QUEUE, "edge-a", 0, 10) == []
        [left] = read_pending(store, EDGE_QUEUE, "edge-b", 0, 10)
        assert (left.seq, left.edge, json.loads(left.body)["kv"]) == (
            2,
            "edge-b",
            {"target": 2},
        )
        assert queue_stats(store, EDGE_QUEUE) == [
            QueueStats(EDGE_QUEUE, "edge-a", 0, None, 0, 3, 3),
            QueueStats(EDGE_QUEUE, "edge-b", 1, NOW, 0, 0, 2),
        ]
        queue_through(store, CLOUD_ROOT, [shared_attributes(second, 5)])
        assert [e.seq for e in read_pending(store, EDGE_QUEUE, "edge-b", 0, 10)] == [
            2,
            4,
        ]


# -- checkpoints ---------------------------------------------------------------


def test_checkpoint_still_works_after_a_failed_attempt_while_readers_idle(store):
    queue_through(store, EDGE_ROOT, [telemetry(1), telemetry(2)])
    # A reader thread (as the HTTP API uses) reads, then stays idle.
    has_read, finish = threading.Event(), threading.Event()

    def read_then_idle() -> None:
        queue_stats(store, CLOUD_QUEUE)
        has_read.set()
        finish.wait(10)

    reader = threading.Thread(target=read_then_idle)
    reader.start()
    try:
        has_read.wait(10)
        with store.transaction() as con:
            record_failure(con, CLOUD_QUEUE, None, 1, "HTTP 503")

        store.checkpoint()
    finally:
        finish.set()
        reader.join()

    assert [e.attempts for e in read_pending(store, CLOUD_QUEUE, None, 0, 9)] == [1, 0]


def test_file_closes_cleanly_after_a_failed_attempt(tmp_path):
    path = tmp_path / "edge.duckdb"
    store = Store(path)
    queue_through(store, EDGE_ROOT, [telemetry(1)])
    with store.transaction() as con:
        record_failure(con, CLOUD_QUEUE, None, 1, "HTTP 503")

    store.close()

    with opened(path) as store:
        [event] = read_pending(store, CLOUD_QUEUE, None, 0, 9)
        assert (event.attempts, event.last_error) == (1, "HTTP 503")


def test_the_wire_read_gives_what_encoding_each_read_event_gives(store, clock):
    # Names a JSON string must escape, and values JSON must keep exact.
    names = ['quo"te\\back', "nl\nand\ttab", "nul\x00ctl\x1f", "😀 שלום é\u2028"]
    devices = [EntityRef("DEVICE", name) for name in names]
    for device in devices:
        register_device(store, device.name)
    values = [12345678901234567890123, -0.0, 1e300, "x\x7f", {"deep": [None, True]}]
    messages = [
        telemetry(value, ts=n, device=devices[n % len(devices)])
        for n, value in enumerate(values)
    ]
    queue_through(store, EDGE_ROOT, messages)

    events = read_pending(store, CLOUD_QUEUE, None, 2, 6)
    wire = outbox.read_pending_wire(store, CLOUD_QUEUE, 2, 6)

    assert wire is not None
    assert (wire.count, wire.first, wire.last) == (6, 3, 8)
    assert json.loads(b"[" + wire.items + b"]") == [
        json.loads(orjson.dumps(encode_event(event))) for event in events
    ]
    assert outbox.read_pending_wire(store, CLOUD_QUEUE, 9, 6) is None
