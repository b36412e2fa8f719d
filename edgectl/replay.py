"""``edgectl replay``: look at queued and dead-lettered events, re-queue, purge.

These functions write, so on a running role they run on its writer thread
(through the admin API); on a stopped file the CLI calls them directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb

from edgectl.errors import ConfigError
from edgectl.message import now_ms
from edgectl.outbox import (
    CLOUD_QUEUE,
    EDGE_QUEUE,
    delivered_seq,
    mark_delivered,
    rewind,
)
from edgectl.storage import Store

STATES = ("pending", "dead", "delivered", "all")


@dataclass(frozen=True, slots=True)
class Selection:
    """Which events: queue, state, sequence and time ranges, device, action."""

    queue: str = CLOUD_QUEUE
    state: str = "pending"
    first: int | None = None
    last: int | None = None
    since: int | None = None
    until: int | None = None
    device: str | None = None
    action: str | None = None
    edge: str | None = None
    limit: int = 1000

    def check(self) -> None:
        """Raise ConfigError for a queue or state that does not exist."""
        if self.queue not in (CLOUD_QUEUE, EDGE_QUEUE):
            raise ConfigError(
                f"queue must be {CLOUD_QUEUE} or {EDGE_QUEUE}, got {self.queue!r}"
            )
        if self.state not in STATES:
            raise ConfigError(
                f"state must be one of {', '.join(STATES)}, got {self.state!r}"
            )


def _where(selection: Selection, dead: bool) -> tuple[str, list[Any]]:
    clauses: list[str] = ["TRUE"]
    params: list[Any] = []
    if dead:
        clauses.append("queue = ?")
        params.append(selection.queue)
    for clause, value in (
        ("seq >= ?", selection.first),
        ("seq <= ?", selection.last),
        ("created_ts >= ?", selection.since),
        ("created_ts <= ?", selection.until),
        ("entity_name = ?", selection.device),
        ("action = ?", selection.action),
        ("edge = ?", selection.edge if selection.queue == EDGE_QUEUE else None),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return " AND ".join(clauses), params


def list_events(store: Store, selection: Selection) -> list[dict[str, Any]]:
    """Events matching the selection, oldest first, with their state."""
    selection.check()

    def query(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
        found = []
        if selection.state in ("pending", "all"):
            found += _select(con, selection, dead=False)
        if selection.state in ("dead", "all"):
            found += _select(con, selection, dead=True)
        if selection.state in ("delivered", "all"):
            found += _select(con, selection, dead=True, table="delivered_event")
        return sorted(found, key=lambda item: item["seq"])[: selection.limit]

    return store.read("reading events from", query)


def _select(
    con: duckdb.DuckDBPyConnection,
    selection: Selection,
    *,
    dead: bool,
    table: str = "dead_letter",
) -> list[dict[str, Any]]:
    # Dead letters and kept delivered events share a layout with a queue column.
    where, params = _where(selection, dead)
    table = table if dead else selection.queue
    state = (
        {"dead_letter": "dead", "delivered_event": "delivered"}[table]
        if dead
        else "pending"
    )
    result = con.execute(
        f"SELECT * FROM {table} WHERE {where} ORDER BY seq LIMIT ?",
        [*params, selection.limit],
    )
    names = [column[0] for column in result.description or []]
    rows = [dict(zip(names, row, strict=True)) for row in result.fetchall()]
    for row in rows:
        row["state"] = state
    return rows


def requeue_dead(store: Store, selection: Selection, *, dry_run: bool = False) -> int:
    """Put dead letters back at the end of their queue, with new sequences.

    Returns how many were (or, with ``dry_run``, would be) re-queued.
    """
    selection.check()
    where, params = _where(selection, dead=True)
    if dry_run:
        return _count(store, f"SELECT count(*) FROM dead_letter WHERE {where}", params)
    with store.transaction() as con:
        rows = con.execute(
            "SELECT seq, created_ts, action, entity_type, entity_name, body, ts, edge "
            f"FROM dead_letter WHERE {where} ORDER BY seq",
            params,
        ).fetchall()
        first = store.next_seq
        for offset, row in enumerate(rows):
            _insert_again(con, selection.queue, first + offset, row)
        con.execute(f"DELETE FROM dead_letter WHERE {where}", params)
    store.next_seq = first + len(rows)
    return len(rows)


def _insert_again(
    con: duckdb.DuckDBPyConnection, queue: str, seq: int, row: tuple[Any, ...]
) -> None:
    _, _, action, entity_type, entity_name, body, ts, edge = row
    values = [seq, now_ms(), action, entity_type, entity_name, body, ts, 0, None]
    if queue == EDGE_QUEUE:
        values.append(edge)
    marks = ", ".join("?" for _ in values)
    con.execute(f"INSERT INTO {queue} VALUES ({marks})", values)


def purge(store: Store, selection: Selection, *, dry_run: bool = False) -> int:
    """Delete dead letters, or pending events through ``selection.last``.

    Pending events are purged only from the head of the queue (everything up
    to a sequence), so what stays pending has no holes. Returns the count.
    """
    selection.check()
    if selection.state == "dead":
        where, params = _where(selection, dead=True)
        count = _count(store, f"SELECT count(*) FROM dead_letter WHERE {where}", params)
        if not dry_run:
            with store.transaction() as con:
                con.execute(f"DELETE FROM dead_letter WHERE {where}", params)
        return count
    if selection.last is None:
        raise ConfigError(
            "purging pending events needs --last SEQ: everything up to it is dropped"
        )
    newest = store.next_seq - 1
    if selection.last > newest:
        # A cursor past the newest event would hide every event queued after
        # the purge: it would get a lower sequence and never be sent.
        raise ConfigError(
            f"--last {selection.last} is past the newest event, seq {newest}; "
            f"give --last {newest} to drop everything pending"
        )
    edge = selection.edge if selection.queue == EDGE_QUEUE else None
    delivered = delivered_seq(store, selection.queue, edge)
    extra = " AND edge = ?" if edge else ""
    count = _count(
        store,
        f"SELECT count(*) FROM {selection.queue} WHERE seq > ? AND seq <= ?{extra}",
        [delivered, selection.last, *([edge] if edge else [])],
    )
    if not dry_run and selection.last > delivered:
        with store.transaction() as con:
            mark_delivered(con, selection.queue, edge, selection.last)
    return count


def _count(store: Store, query: str, params: list[Any]) -> int:
    row = store.read(
        "counting events in", lambda con: con.execute(query, params).fetchone()
    )
    return int(row[0]) if row else 0


def resend(store: Store, selection: Selection, *, dry_run: bool = False) -> int:
    """Send kept delivered events again, from ``selection.first`` on.

    Returns how many (would) go again. The peer applies each event once, so
    this is safe; it matters when the peer lost what it had applied. Needs
    ``keep_delivered_seconds`` on the role, or nothing is kept to resend.
    """
    selection.check()
    if selection.first is None:
        raise ConfigError("resend needs --first SEQ: events from it on are sent again")
    edge = selection.edge if selection.queue == EDGE_QUEUE else None
    if selection.queue == EDGE_QUEUE and edge is None:
        raise ConfigError("resend on a cloud needs --edge NAME")
    if dry_run:
        extra = " AND edge = ?" if edge else ""
        return _count(
            store,
            f"SELECT count(*) FROM delivered_event WHERE queue = ? AND seq >= ?{extra}",
            [selection.queue, selection.first, *([edge] if edge else [])],
        )
    return rewind(store, selection.queue, edge, selection.first)
