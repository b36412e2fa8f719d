"""What a file holds, for ``edgectl inspect tables``: counts, queue state, rows."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import duckdb

from edgectl.errors import ConfigError
from edgectl.message import SCOPES, normalize_scope
from edgectl.outbox import CLOUD_QUEUE, EDGE_QUEUE, queue_stats
from edgectl.storage import Store, typed_value
from edgectl.values import TYPE_NAMES, decode

TABLES = (
    "ts_kv",
    "ts_kv_latest",
    "attribute_kv",
    "entity",
    "edge",
    "key_dictionary",
    "cloud_event",
    "edge_event",
    "dead_letter",
)
VALUE_TABLES = ("ts_kv", "ts_kv_latest", "attribute_kv")
EVENT_TABLES = ("cloud_event", "edge_event", "dead_letter")
# Credentials are never shown: a running role serves these rows over HTTP.
SECRET_COLUMNS = frozenset({"token", "secret"})
HIDDEN = "(hidden)"


@dataclass(frozen=True, slots=True)
class RowFilter:
    """Which rows to show: by device, key, scope, time range, newest first."""

    device: str | None = None
    key: str | None = None
    scope: str | None = None
    since: int | None = None
    until: int | None = None
    limit: int = 50


def overview(store: Store, journal_unstored: int = 0) -> dict[str, Any]:
    """Row counts of every table, per queue its pending count, lag, dead
    letters and last delivered sequence, and how many answered requests the
    ingest journal holds that are not stored yet."""

    def counts(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
        result = []
        for table in TABLES:
            row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
            result.append({"table": table, "rows": int(row[0]) if row else 0})
        return result

    tables = store.read("counting rows in", counts)
    queues = [
        asdict(stats)
        for queue in (CLOUD_QUEUE, EDGE_QUEUE)
        for stats in queue_stats(store, queue)
    ]
    return {
        "file": str(store.path),
        "tables": tables,
        "queues": queues,
        "journal_unstored": journal_unstored,
    }


def rows(store: Store, table: str, where: RowFilter) -> list[dict[str, Any]]:
    """Rows of one table, newest first, values in their JSON type.

    Access tokens and edge secrets show as ``(hidden)``. Raises ConfigError for
    an unknown table name or scope.
    """
    if table not in TABLES:
        raise ConfigError(f"no table {table!r}; tables: {', '.join(TABLES)}")
    if table in VALUE_TABLES:
        return _value_rows(store, table, where)
    if table in EVENT_TABLES:
        return _event_rows(store, table, where)
    found = store.read(
        "reading",
        lambda con: _dicts(
            con.execute(f"SELECT * FROM {table} LIMIT ?", [where.limit])
        ),
    )
    return [_hide_secrets(row) for row in found]


def _hide_secrets(row: dict[str, Any]) -> dict[str, Any]:
    return {
        name: HIDDEN if name in SECRET_COLUMNS and value is not None else value
        for name, value in row.items()
    }


def _scope(raw: str) -> str:
    scope = normalize_scope(raw)
    if scope is None:
        raise ConfigError(
            f"no scope {raw!r}; use {', '.join(SCOPES)} "
            "(or CLIENT_SCOPE, SERVER_SCOPE, SHARED_SCOPE)"
        )
    return scope


def _dicts(result: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [column[0] for column in result.description or []]
    return [dict(zip(names, row, strict=True)) for row in result.fetchall()]


def _value_rows(store: Store, table: str, where: RowFilter) -> list[dict[str, Any]]:
    is_attribute = table == "attribute_kv"
    ts_column = "last_update_ts" if is_attribute else "ts"
    # A user coming from ThingsBoard writes SHARED_SCOPE; the file says shared.
    scope_name = _scope(where.scope) if is_attribute and where.scope else None
    clauses: list[str] = ["TRUE"]
    params: list[Any] = []
    for column, value in (
        ("e.name", where.device),
        ("k.key", where.key),
        ("t.scope", scope_name),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if where.since is not None:
        clauses.append(f"t.{ts_column} >= ?")
        params.append(where.since)
    if where.until is not None:
        clauses.append(f"t.{ts_column} <= ?")
        params.append(where.until)
    scope = "t.scope, " if is_attribute else ""
    query = (
        f"SELECT e.name, k.key, t.{ts_column}, {scope}t.bool_v, t.long_v, t.dbl_v, "
        f"t.str_v, t.json_v FROM {table} t JOIN entity e ON e.id = t.entity_id "
        f"JOIN key_dictionary k ON k.key_id = t.key WHERE {' AND '.join(clauses)} "
        f"ORDER BY t.{ts_column} DESC, e.name, k.key LIMIT ?"
    )
    found = store.read(
        "reading", lambda con: con.execute(query, [*params, where.limit]).fetchall()
    )
    return [_value_row(row, is_attribute) for row in found]


def _value_row(row: tuple[Any, ...], is_attribute: bool) -> dict[str, Any]:
    values = row[4:9] if is_attribute else row[3:8]
    kind, stored = typed_value(values)
    item: dict[str, Any] = {
        "device": row[0],
        "key": row[1],
        "ts": row[2],
        "value": decode(kind, stored),
        "type": TYPE_NAMES[kind],
    }
    if is_attribute:
        item["scope"] = row[3]
        item["last_update_ts"] = row[2]
    return item


def _event_rows(store: Store, table: str, where: RowFilter) -> list[dict[str, Any]]:
    clauses: list[str] = ["TRUE"]
    params: list[Any] = []
    if where.device is not None:
        clauses.append("entity_name = ?")
        params.append(where.device)
    if where.since is not None:
        clauses.append("ts >= ?")
        params.append(where.since)
    if where.until is not None:
        clauses.append("ts <= ?")
        params.append(where.until)
    query = (
        f"SELECT * FROM {table} WHERE {' AND '.join(clauses)} ORDER BY seq DESC LIMIT ?"
    )
    return store.read(
        "reading", lambda con: _dicts(con.execute(query, [*params, where.limit]))
    )
