"""The local event queues: ``cloud_event`` on an edge, ``edge_event`` on a cloud.

Each event gets a 64-bit sequence number when its batch commits, in the order
the incoming messages arrived; the delivery cursor is that number, never a
clock. Delivered events are deleted in sequence ranges. An event the peer
rejects for good moves to ``dead_letter`` with its error, and stays there until
a user re-queues or purges it.

An event's id is derived from the file's instance id and its sequence, so it is
unique and stable without storing sixteen random bytes per event.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa  # type: ignore[import-untyped]  # ships no type hints

from edgectl.changes import PendingEvent
from edgectl.message import EntityRef, now_ms
from edgectl.values import dumps

if TYPE_CHECKING:
    from edgectl.storage import Store

CLOUD_QUEUE = "cloud_event"
EDGE_QUEUE = "edge_event"
_EVENT_FIELDS = (
    "seq, created_ts, action, entity_type, entity_name, body, ts, attempts, last_error"
)


@dataclass(frozen=True, slots=True)
class Event:
    """A queued event as stored; ``body`` is JSON text."""

    seq: int
    created_ts: int
    action: str
    entity_type: str
    entity_name: str
    body: str
    ts: int
    attempts: int
    last_error: str | None
    edge: str | None = None

    def event_id(self, instance: str) -> str:
        """The event's id: a UUID built from the file instance and sequence."""
        return str(uuid.UUID(int=(int(instance, 16) << 64) | self.seq))

    @property
    def entity(self) -> EntityRef:
        """The event's originator."""
        return EntityRef(self.entity_type, self.entity_name)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """The state of one queue (for one edge on the cloud)."""

    queue: str
    edge: str | None
    pending: int
    oldest_pending_ts: int | None
    dead_letters: int
    delivered_seq: int
    last_seq: int


def queue_for(peer: str | None) -> str:
    """The queue table events for this peer go to."""
    return CLOUD_QUEUE if peer is None else EDGE_QUEUE


def last_sequence(store: Store) -> int:
    """The highest sequence ever given out in this file."""

    def query(con: duckdb.DuckDBPyConnection) -> int:
        row = con.execute(
            "SELECT greatest((SELECT max(seq) FROM cloud_event), "
            "(SELECT max(seq) FROM edge_event), (SELECT max(seq) FROM dead_letter), "
            "(SELECT max(delivered_seq) FROM queue_cursor), 0)"
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    return store.read("reading the queue of", query)


def append_events(
    con: duckdb.DuckDBPyConnection,
    store: Store,
    events: list[PendingEvent],
    entity_id: Callable[[EntityRef], int],
) -> int:
    """Number and append a batch's events; returns the next free sequence."""
    ordered = sorted(events, key=lambda event: event.order)
    seq = store.next_seq
    created = now_ms()
    for queue in (CLOUD_QUEUE, EDGE_QUEUE):
        chosen = [e for e in ordered if queue_for(e.peer) == queue]
        if not chosen:
            continue
        columns = _event_columns(chosen, seq, created)
        seq += len(chosen)
        if queue == EDGE_QUEUE:
            columns["edge"] = pa.array([e.peer for e in chosen], pa.string())
        event_batch = pa.table(columns)  # noqa: F841 (read by name in the query)
        con.execute(f"INSERT INTO {queue} SELECT * FROM event_batch")
    return seq


def _event_columns(
    events: list[PendingEvent], first: int, created: int
) -> dict[str, Any]:
    count = len(events)
    return {
        "seq": pa.array(range(first, first + count), pa.int64()),
        "created_ts": pa.array([created] * count, pa.int64()),
        "action": pa.array([e.action for e in events], pa.string()),
        "entity_type": pa.array([e.entity.entity_type for e in events], pa.string()),
        "entity_name": pa.array([e.entity.name for e in events], pa.string()),
        "body": pa.array([_body_text(e.body) for e in events], pa.string()),
        "ts": pa.array([e.ts for e in events], pa.int64()),
        "attempts": pa.array([0] * count, pa.int32()),
        "last_error": pa.array([None] * count, pa.string()),
    }


def _body_text(body: Any) -> str:
    return body if isinstance(body, str) else dumps(body)


def _edge_filter(queue: str, edge: str | None) -> tuple[str, list[Any]]:
    if queue == EDGE_QUEUE and edge is not None:
        return " AND edge = ?", [edge]
    return "", []


def read_pending(
    store: Store, queue: str, edge: str | None, after: int, limit: int
) -> list[Event]:
    """Up to ``limit`` events with sequence above ``after``, in sequence order."""
    where, params = _edge_filter(queue, edge)
    # Each event names its own edge, also when ``edge`` is None (every edge).
    edge_column = "edge" if queue == EDGE_QUEUE else "NULL"
    rows = store.read(
        "reading the queue of",
        lambda con: con.execute(
            f"SELECT {_EVENT_FIELDS}, {edge_column} FROM {queue} WHERE seq > ?{where} "
            "ORDER BY seq LIMIT ?",
            [after, *params, limit],
        ).fetchall(),
    )
    return [Event(*row) for row in rows]


@dataclass(frozen=True, slots=True)
class WireBatch:
    """Events read for a push, already in their wire form (see ``encode_event``)."""

    count: int
    first: int
    last: int
    items: bytes  # the events' JSON objects, comma-separated


# Each event's wire object is built by DuckDB, its stored JSON body set in as
# it is: turning thousands of rows into Python objects and back to JSON took
# about a fifth of the edge's CPU while a backlog drained.
_WIRE_EVENT = (
    """'{"seq":' || seq || ',"action":' || COALESCE(to_json(action)::VARCHAR, 'null')"""
    """ || ',"entity_type":' || COALESCE(to_json(entity_type)::VARCHAR, 'null')"""
    """ || ',"entity_name":' || COALESCE(to_json(entity_name)::VARCHAR, 'null')"""
    """ || ',"ts":' || COALESCE(ts::VARCHAR, 'null')"""
    """ || ',"body":' || COALESCE(body, 'null') || '}'"""
)


def read_pending_wire(
    store: Store, queue: str, after: int, limit: int
) -> WireBatch | None:
    """Like ``read_pending`` for every edge, in wire form; None when empty."""
    row = store.read(
        "reading the queue of",
        lambda con: con.execute(
            f"SELECT count(*), min(seq), max(seq), string_agg({_WIRE_EVENT}, ',' "
            f"ORDER BY seq) FROM (SELECT * FROM {queue} WHERE seq > ? "
            "ORDER BY seq LIMIT ?)",
            [after, limit],
        ).fetchall(),
    )[0]
    count, first, last, items = row
    if not count:
        return None
    return WireBatch(int(count), int(first), int(last), str(items).encode())


def delivered_seq(store: Store, queue: str, edge: str | None) -> int:
    """The last sequence the peer acknowledged."""
    row = store.read(
        "reading the queue cursor of",
        lambda con: con.execute(
            "SELECT delivered_seq FROM queue_cursor WHERE queue = ? "
            "AND edge IS NOT DISTINCT FROM ?",
            [queue, edge],
        ).fetchone(),
    )
    return int(row[0]) if row else 0


def mark_delivered(
    con: duckdb.DuckDBPyConnection,
    queue: str,
    edge: str | None,
    through: int,
    *,
    keep: bool = False,
) -> None:
    """Advance the cursor to ``through`` and delete what it passed, in bulk.

    With ``keep`` the passed events are copied to ``delivered_event`` first,
    for ``edgectl replay resend``. The cursor never moves back: an
    acknowledgement that arrives after the queue dropped events beyond it
    (age or byte limit) leaves it where it is, or the sender would wait for
    the dropped events forever.
    """
    where, params = _edge_filter(queue, edge)
    current = con.execute(
        "SELECT max(delivered_seq) FROM queue_cursor WHERE queue = ? "
        "AND edge IS NOT DISTINCT FROM ?",
        [queue, edge],
    ).fetchone()
    stored = current[0] if current else None
    if stored is not None:
        through = max(through, int(stored))
    if keep:
        edge_column = "edge" if queue == EDGE_QUEUE else "NULL"
        con.execute(
            f"INSERT INTO delivered_event SELECT ?, {edge_column}, {_EVENT_FIELDS}, ? "
            f"FROM {queue} WHERE seq <= ?{where}",
            [queue, now_ms(), through, *params],
        )
    con.execute(f"DELETE FROM {queue} WHERE seq <= ?{where}", [through, *params])
    if stored is not None:
        con.execute(
            "UPDATE queue_cursor SET delivered_seq = ? WHERE queue = ? "
            "AND edge IS NOT DISTINCT FROM ?",
            [through, queue, edge],
        )
    else:
        con.execute("INSERT INTO queue_cursor VALUES (?, ?, ?)", [queue, edge, through])


def record_failure(
    con: duckdb.DuckDBPyConnection, queue: str, edge: str | None, seq: int, error: str
) -> int:
    """Count a failed attempt on one event; returns its attempts so far."""
    where, params = _edge_filter(queue, edge)
    row = con.execute(
        f"UPDATE {queue} SET attempts = attempts + 1, last_error = ? "
        f"WHERE seq = ?{where} RETURNING attempts",
        [error, seq, *params],
    ).fetchone()
    return int(row[0]) if row else 0


def dead_letter(
    con: duckdb.DuckDBPyConnection, queue: str, edge: str | None, seq: int
) -> None:
    """Move one event to the dead letters, with its attempts and last error."""
    where, params = _edge_filter(queue, edge)
    edge_column = "edge" if queue == EDGE_QUEUE else "NULL"
    con.execute(
        f"INSERT INTO dead_letter SELECT ?, {edge_column}, {_EVENT_FIELDS}, ? "
        f"FROM {queue} WHERE seq = ?{where}",
        [queue, now_ms(), seq, *params],
    )
    con.execute(f"DELETE FROM {queue} WHERE seq = ?{where}", [seq, *params])


def queue_stats(store: Store, queue: str) -> list[QueueStats]:
    """Pending count, lag, dead letters and cursor per queue (and per edge)."""

    def query(con: duckdb.DuckDBPyConnection) -> list[QueueStats]:
        edges = [None]
        if queue == EDGE_QUEUE:
            edges = [
                row[0]
                for row in con.execute(
                    "SELECT DISTINCT edge FROM edge_event UNION SELECT name FROM edge "
                    "UNION SELECT edge FROM queue_cursor WHERE queue = 'edge_event' "
                    "ORDER BY 1"
                ).fetchall()
            ]
        return [_stats(con, queue, edge) for edge in edges]

    return store.read("reading the queue of", query)


def _stats(con: duckdb.DuckDBPyConnection, queue: str, edge: str | None) -> QueueStats:
    where, params = _edge_filter(queue, edge)
    cursor = con.execute(
        "SELECT delivered_seq FROM queue_cursor WHERE queue = ? "
        "AND edge IS NOT DISTINCT FROM ?",
        [queue, edge],
    ).fetchone()
    delivered = int(cursor[0]) if cursor else 0
    pending, oldest, last = con.execute(
        f"SELECT count(*), min(created_ts), max(seq) FROM {queue} WHERE seq > ?{where}",
        [delivered, *params],
    ).fetchone() or (0, None, None)
    dead = con.execute(
        "SELECT count(*) FROM dead_letter WHERE queue = ? "
        "AND edge IS NOT DISTINCT FROM ?",
        [queue, edge],
    ).fetchone()
    return QueueStats(
        queue,
        edge,
        int(pending),
        oldest,
        int(dead[0]) if dead else 0,
        delivered,
        int(last) if last is not None else delivered,
    )


# Each waiting event counts its JSON body plus this much for its other columns,
# so a flood of tiny events still reaches the byte limit.
EVENT_OVERHEAD_BYTES = 64


@dataclass(frozen=True, slots=True)
class DroppedRange:
    """Events dropped unsent from one queue (one edge's part of it on a cloud)."""

    queue: str
    edge: str | None
    count: int
    first_seq: int
    last_seq: int
    first_created_ts: int
    last_created_ts: int


def queue_size(store: Store, queue: str) -> tuple[int, int | None]:
    """The bytes a queue counts against its limit (see EVENT_OVERHEAD_BYTES),
    and the creation time of its oldest event (None when it is empty).

    Delivered events are deleted, so every row of the queue table is waiting.
    """
    return store.read("measuring the queue of", lambda con: measure(con, queue))


def measure(con: duckdb.DuckDBPyConnection, queue: str) -> tuple[int, int | None]:
    """``queue_size`` on a given cursor, inside a caller's transaction."""
    row = con.execute(
        f"SELECT coalesce(sum(strlen(body)), 0) + count(*) * ?, min(created_ts) "
        f"FROM {queue}",
        [EVENT_OVERHEAD_BYTES],
    ).fetchone()
    if row is None:
        return 0, None
    return int(row[0]), None if row[1] is None else int(row[1])


def head_of_bytes(con: duckdb.DuckDBPyConnection, queue: str, size: int) -> int | None:
    """The sequence through which the oldest events add up to ``size`` bytes.

    None when the whole queue holds less.
    """
    row = con.execute(
        "SELECT seq FROM (SELECT seq, sum(strlen(body) + ?) OVER (ORDER BY seq) "
        f"AS running FROM {queue}) WHERE running >= ? ORDER BY seq LIMIT 1",
        [EVENT_OVERHEAD_BYTES, size],
    ).fetchone()
    return int(row[0]) if row else None


def head_older_than(
    con: duckdb.DuckDBPyConnection, queue: str, cutoff: int
) -> int | None:
    """The last sequence of the leading run of events created before ``cutoff``.

    Only a leading run is dropped: after a clock step back a younger event may
    sit before an older one, and it ends the run rather than being dropped.
    """
    row = con.execute(
        f"SELECT max(seq) FROM {queue} WHERE created_ts < ? AND seq < "
        f"coalesce((SELECT min(seq) FROM {queue} WHERE created_ts >= ?), "
        "9223372036854775807)",
        [cutoff, cutoff],
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def drop_through(
    con: duckdb.DuckDBPyConnection, queue: str, through: int
) -> list[DroppedRange]:
    """Drop every waiting event up to ``through`` unsent, moving each cursor past.

    Returns what was dropped, per edge on a cloud, for counting and logging.
    """
    edge_column = "edge" if queue == EDGE_QUEUE else "NULL"
    rows = con.execute(
        f"SELECT {edge_column}, count(*), min(seq), max(seq), min(created_ts), "
        f"max(created_ts) FROM {queue} WHERE seq <= ? GROUP BY 1 ORDER BY 3",
        [through],
    ).fetchall()
    for row in rows:
        mark_delivered(con, queue, row[0], int(row[3]))
    return [DroppedRange(queue, *row) for row in rows]


def prune_delivered(store: Store, before: int) -> int:
    """Forget kept delivered events acknowledged before ``before`` (epoch ms)."""
    with store.transaction() as con:
        row = con.execute(
            "DELETE FROM delivered_event WHERE delivered_ts < ?", [before]
        ).fetchall()
    return int(row[0][0]) if row else 0


def rewind(store: Store, queue: str, edge: str | None, first: int) -> int:
    """Queue kept delivered events from ``first`` on again and move the cursor
    back before them; returns how many will be sent again.

    The peer applies each event once, so sending again changes nothing there
    unless it lost what it had applied.
    """
    where = " AND edge IS NOT DISTINCT FROM ?" if queue == EDGE_QUEUE else ""
    params: list[Any] = [queue, first, *([edge] if queue == EDGE_QUEUE else [])]
    columns = _EVENT_FIELDS + (", edge" if queue == EDGE_QUEUE else "")
    with store.transaction() as con:
        moved = con.execute(
            f"INSERT INTO {queue} SELECT {columns} FROM delivered_event "
            f"WHERE queue = ? AND seq >= ?{where} ORDER BY seq",
            params,
        ).fetchall()
        con.execute(
            f"DELETE FROM delivered_event WHERE queue = ? AND seq >= ?{where}", params
        )
        count = int(moved[0][0]) if moved else 0
        if count:
            con.execute(
                "DELETE FROM queue_cursor WHERE queue = ? "
                "AND edge IS NOT DISTINCT FROM ?",
                [queue, edge],
            )
            con.execute(
                "INSERT INTO queue_cursor VALUES (?, ?, ?)", [queue, edge, first - 1]
            )
    if count:
        store.queue_epoch += 1
    return count
