"""Storage in one embedded DuckDB file: telemetry, attributes, entities, queues.

Layout (names as in ThingsBoard where it has one):

- ``ts_kv``: history, one row per (entity, key, ts), the value in the column of
  its kind; ``expires`` is set for readings with a TTL.
- ``ts_kv_latest``: per (entity, key), the reading with the newest ts.
- ``attribute_kv``: per (entity, scope, key), with ``last_update_ts``.
- ``key_dictionary`` and ``entity``: integer ids for keys and entities, which
  keep the hot tables narrow; ``edge``: the edges a cloud knows.
- ``cloud_event`` / ``edge_event``: the outgoing queues (see ``outbox``).
- ``meta``: the schema version and this file's instance id.

Design rules from DuckDB's behaviour as a queue: no indexes or primary keys
(WAL replay with ART indexes has failed after crashes), no DDL after start-up,
every batch in one transaction, and all writes from one thread. Upserts are
"delete what the batch replaces, then append", with a ts range on the delete so
DuckDB's zone maps skip the row groups a batch cannot touch.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa  # type: ignore[import-untyped]  # ships no type hints

from edgectl.changes import DELETED, AttributeValue, ChangeSet, TimeseriesDelete
from edgectl.errors import SchemaVersionError, StorageError
from edgectl.message import EntityRef, now_ms
from edgectl.values import BOOLEAN, DOUBLE, JSON, LONG, STRING

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEVICE = "DEVICE"

_VALUE_COLUMNS = (
    "bool_v BOOLEAN, long_v BIGINT, dbl_v DOUBLE, str_v VARCHAR, json_v VARCHAR"
)
_EVENT_COLUMNS = (
    "seq BIGINT, created_ts BIGINT, action VARCHAR, entity_type VARCHAR, "
    "entity_name VARCHAR, body VARCHAR, ts BIGINT, attempts INTEGER, last_error VARCHAR"
)
_TABLES = {
    "meta": "key VARCHAR, value VARCHAR",
    "key_dictionary": "key VARCHAR, key_id INTEGER",
    "entity": (
        "id INTEGER, entity_type VARCHAR, name VARCHAR, type VARCHAR, "
        "token VARCHAR, edge VARCHAR, created_ts BIGINT"
    ),
    "edge": "name VARCHAR, routing_key VARCHAR, secret VARCHAR, created_ts BIGINT",
    "ts_kv": (
        f"entity_id INTEGER, key INTEGER, ts BIGINT, {_VALUE_COLUMNS}, expires BIGINT"
    ),
    "ts_kv_latest": f"entity_id INTEGER, key INTEGER, ts BIGINT, {_VALUE_COLUMNS}",
    "attribute_kv": (
        f"entity_id INTEGER, scope VARCHAR, key INTEGER, {_VALUE_COLUMNS}, "
        "last_update_ts BIGINT"
    ),
    "cloud_event": _EVENT_COLUMNS,
    "edge_event": f"{_EVENT_COLUMNS}, edge VARCHAR",
    "dead_letter": f"queue VARCHAR, edge VARCHAR, {_EVENT_COLUMNS}, dead_ts BIGINT",
    "queue_cursor": "queue VARCHAR, edge VARCHAR, delivered_seq BIGINT",
    # Delivered events kept for ``keep_delivered_seconds``, so a range can be
    # sent again; empty unless that setting is on.
    "delivered_event": (
        f"queue VARCHAR, edge VARCHAR, {_EVENT_COLUMNS}, delivered_ts BIGINT"
    ),
    "sync_applied": "peer VARCHAR, applied_seq BIGINT",
}

# Migrations from version N to N+1, run at open inside one transaction. A file
# at SCHEMA_VERSION needs none; each new layout adds one function here.
MIGRATIONS: dict[int, Callable[[duckdb.DuckDBPyConnection], None]] = {}

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Entity:
    """A registered entity (a device, on both roles) and the edge that owns it."""

    id: int
    entity_type: str
    name: str
    type: str
    token: str | None
    edge: str | None
    created_ts: int

    @property
    def ref(self) -> EntityRef:
        """The (entity type, name) pair messages use."""
        return EntityRef(self.entity_type, self.name)


@dataclass(frozen=True, slots=True)
class Edge:
    """An edge registered on the cloud, with its credentials."""

    name: str
    routing_key: str
    secret: str
    created_ts: int


# Errors of the file or the machine rather than of what was written: a disk
# that is full or failing, memory that ran out. The same write may work later.
_TRANSIENT = (
    OSError,
    duckdb.IOException,
    duckdb.TransactionException,
    duckdb.OutOfMemoryException,
)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) may pass when tried again."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, _TRANSIENT):
            return True
        seen = seen.__cause__
    return False


@contextmanager
def storage_errors(action: str, path: Path) -> Iterator[None]:
    """Turn DuckDB errors raised inside into StorageError naming the file."""
    try:
        yield
    except duckdb.Error as error:
        raise StorageError(f"{action} {path} failed: {error}") from error


class Store:
    """One DuckDB file opened read-write by this process.

    Writes go through ``apply`` and the other write methods, from one thread at
    a time (the roles keep a single writer thread). Reads may come from any
    thread; each thread gets its own cursor.
    """

    def __init__(self, path: Path, *, memory_limit: str = "1GB") -> None:
        self.path = path
        # How long acknowledged events stay for ``edgectl replay resend``; 0
        # deletes them at once.
        self.keep_delivered_ms = 0
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.connection = duckdb.connect(
                str(path), config={"memory_limit": memory_limit}
            )
        except duckdb.Error as error:
            # A file that will not open is evidence: never delete or replace it.
            raise StorageError(
                f"opening {path} failed: {error}. The file was left as it is; "
                "if another edgectl uses it, stop that one first, else move the "
                "file aside (or restore a backup) to start with a new one."
            ) from error
        try:
            self._prepare()
        except BaseException:
            self.connection.close()
            raise
        self._load_caches()
        # Counts moves of a queue cursor back (a replay resending delivered
        # events), so a sender can drop acknowledgements read before one.
        self.queue_epoch = 0

    def _prepare(self) -> None:
        with storage_errors("preparing", self.path):
            version = self._schema_version()
        self._check_version(version)
        with storage_errors("preparing", self.path), self.transaction() as con:
            # Migrations run before any table is created, so each one sees the
            # layout of the version it upgrades from (and may create a table the
            # new layout adds); whatever is still missing is created after.
            if version:
                self._migrate(con, version)
            for name, columns in _TABLES.items():
                con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns})")
            if not version:
                con.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?), ('instance', ?)",
                    [str(SCHEMA_VERSION), uuid.uuid4().hex[:16]],
                )
        with storage_errors("checkpointing", self.path):
            self.connection.execute("CHECKPOINT")

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path} was written by a newer edgectl (schema version "
                f"{version}); this edgectl reads up to version {SCHEMA_VERSION}. "
                "Upgrade edgectl to open it."
            )
        missing = [
            step for step in range(version, SCHEMA_VERSION) if step not in MIGRATIONS
        ]
        if version and missing:
            raise SchemaVersionError(
                f"{self.path} has schema version {version}, and this edgectl "
                f"(schema version {SCHEMA_VERSION}) has no migration from version "
                f"{missing[0]}. The file was not changed; please report this."
            )

    def _schema_version(self) -> int:
        exists = self.connection.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'"
        ).fetchone()
        if not exists or not exists[0]:
            return 0
        row = self.connection.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'"
        ).fetchone()
        return int(row[0]) if row else 0

    def _migrate(self, con: duckdb.DuckDBPyConnection, version: int) -> None:
        for step in range(version, SCHEMA_VERSION):
            logger.info("migrating %s from schema %d to %d", self.path, step, step + 1)
            MIGRATIONS[step](con)
        con.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'",
            [str(SCHEMA_VERSION)],
        )

    def _load_caches(self) -> None:
        con = self.connection
        with storage_errors("reading", self.path):
            self.key_ids: dict[str, int] = dict(
                con.execute("SELECT key, key_id FROM key_dictionary").fetchall()
            )
            self.entities: dict[EntityRef, Entity] = {
                entity.ref: entity for entity in self._read_entities()
            }
            # fetchall, not fetchone: a result left open would block
            # checkpoints (see ``read``).
            instance = con.execute(
                "SELECT value FROM meta WHERE key = 'instance'"
            ).fetchall()
            self.instance = str(instance[0][0])
            # The running role holds the file alone, so what it reads here
            # changes only through this Store: edges are checked on every sync
            # request and cursors on every batch, without a query each time.
            self._edges = [
                Edge(*row)
                for row in con.execute(
                    "SELECT name, routing_key, secret, created_ts FROM edge "
                    "ORDER BY name"
                ).fetchall()
            ]
            self._applied: dict[str, int] = dict(
                con.execute("SELECT peer, applied_seq FROM sync_applied").fetchall()
            )
        self.key_names = {key_id: key for key, key_id in self.key_ids.items()}
        self.entity_names = {entity.id: entity for entity in self.entities.values()}
        self._load_newest()
        self.tokens = {
            _digest(entity.token): entity
            for entity in self.entities.values()
            if entity.token
        }
        from edgectl.outbox import last_sequence

        self.next_seq = last_sequence(self) + 1

    def _load_newest(self) -> None:
        # Per (entity id, key id): the newest ts in ts_kv (an upper bound: TTL
        # and range deletes may lower the truth) and the ts in ts_kv_latest.
        # Batches of readings newer than everything stored, the usual case,
        # then append without looking for rows to replace.
        con = self.connection
        with storage_errors("reading", self.path):
            self.newest_reading: dict[tuple[int, int], int] = {
                (entity, key): ts
                for entity, key, ts in con.execute(
                    "SELECT entity_id, key, max(ts) FROM ts_kv GROUP BY ALL"
                ).fetchall()
            }
            self.latest_ts: dict[tuple[int, int], int] = {
                (entity, key): ts
                for entity, key, ts in con.execute(
                    "SELECT entity_id, key, ts FROM ts_kv_latest"
                ).fetchall()
            }

    def _read_entities(self) -> list[Entity]:
        rows = self.connection.execute(
            "SELECT id, entity_type, name, type, token, edge, created_ts FROM entity"
        ).fetchall()
        return [Entity(*row) for row in rows]

    # -- connections ---------------------------------------------------------

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's own cursor on the file."""
        cursor: duckdb.DuckDBPyConnection | None = getattr(self._local, "cursor", None)
        if cursor is None:
            cursor = self._local.cursor = self.connection.cursor()
        return cursor

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A transaction on this thread's cursor: commit on success, else roll back."""
        con = self.cursor()
        con.execute("BEGIN TRANSACTION")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def read(self, action: str, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run a read on this thread's cursor, wrapping DuckDB errors."""
        with storage_errors(action, self.path):
            cursor = self.cursor()
            result = work(cursor)
            # A result read only in part (fetchone) keeps its transaction open,
            # and DuckDB refuses to CHECKPOINT after an UPDATE while one is
            # open; an idle reader thread would block checkpoints for good.
            # Draining the result ends it.
            cursor.fetchall()
            return result

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the file, so it cannot grow unbounded."""
        with storage_errors("checkpointing", self.path):
            self.cursor().execute("CHECKPOINT")

    def close(self) -> None:
        """Checkpoint and close the file."""
        try:
            self.checkpoint()
        finally:
            self.connection.close()

    # -- entities ------------------------------------------------------------

    def entity(self, ref: EntityRef) -> Entity | None:
        """The registered entity with this type and name, if any."""
        return self.entities.get(ref)

    def entity_by_token(self, token: str) -> Entity | None:
        """The device whose access token this is, if any.

        Tokens are looked up by their SHA-256 digest, so the time a lookup
        takes says nothing about how much of a guessed token was right.
        """
        return self.tokens.get(_digest(token))

    def add_entity(
        self,
        ref: EntityRef,
        *,
        type: str = "default",
        token: str | None = None,
        edge: str | None = None,
        announce: ChangeSet | None = None,
    ) -> Entity:
        """Register an entity, or return it unchanged if it exists.

        ``announce`` holds writes (an ENTITY_CREATED event) committed in the
        same transaction, so the peer hears of the entity before its data.
        """
        existing = self.entities.get(ref)
        if existing is not None:
            return existing
        entity = Entity(
            self._next_entity_id(),
            ref.entity_type,
            ref.name,
            type,
            token,
            edge,
            now_ms(),
        )
        writer = _BatchWriter(self, announce or ChangeSet())
        try:
            with storage_errors("writing", self.path), self.transaction() as con:
                self._insert_entities(con, [entity])
                writer.write(con)
        except BaseException:
            self._load_caches()
            raise
        self._remember(entity)
        writer.remember()
        return entity

    def _next_entity_id(self) -> int:
        taken = max(self.entity_names, default=0)
        return taken + 1

    def _remember(self, entity: Entity) -> None:
        self.entities[entity.ref] = entity
        self.entity_names[entity.id] = entity
        if entity.token:
            self.tokens[_digest(entity.token)] = entity

    def _insert_entities(
        self, con: duckdb.DuckDBPyConnection, entities: list[Entity]
    ) -> None:
        con.executemany(
            "INSERT INTO entity VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                [e.id, e.entity_type, e.name, e.type, e.token, e.edge, e.created_ts]
                for e in entities
            ],
        )

    def owner_edge(self, entity: EntityRef) -> str | None:
        """The edge that owns an entity, for push to edge."""
        found = self.entities.get(entity)
        return found.edge if found else None

    def entity_id(self, ref: EntityRef) -> int:
        """The id of an entity, registering it first when it is new."""
        found = self.entities.get(ref)
        return found.id if found else self.add_entity(ref).id

    # -- edges ---------------------------------------------------------------

    def edges(self) -> list[Edge]:
        """Every edge registered on this cloud."""
        return list(self._edges)

    def add_edge(self, name: str, routing_key: str, secret: str) -> Edge:
        """Register an edge; an existing name keeps its credentials."""
        for edge in self.edges():
            if edge.name == name:
                return edge
        edge = Edge(name, routing_key, secret, now_ms())
        with storage_errors("writing", self.path), self.transaction() as con:
            con.execute(
                "INSERT INTO edge VALUES (?, ?, ?, ?)",
                [edge.name, edge.routing_key, edge.secret, edge.created_ts],
            )
        self._edges = sorted([*self._edges, edge], key=lambda known: known.name)
        return edge

    # -- reads nodes use -----------------------------------------------------

    def read_attribute(
        self, entity: EntityRef, scope: str, key: str
    ) -> AttributeValue | None:
        """One stored attribute, or None."""
        found = self.entities.get(entity)
        key_id = self.key_ids.get(key)
        if found is None or key_id is None:
            return None
        row = self.read(
            "reading attributes from",
            lambda con: con.execute(
                "SELECT bool_v, long_v, dbl_v, str_v, json_v, last_update_ts "
                "FROM attribute_kv WHERE entity_id = ? AND scope = ? AND key = ?",
                [found.id, scope, key_id],
            ).fetchone(),
        )
        if row is None:
            return None
        kind, value = typed_value(row[:5])
        return AttributeValue(kind, value, row[5])

    def read_attributes(
        self, entity: EntityRef, scope: str, keys: list[str] | None = None
    ) -> dict[str, AttributeValue]:
        """Stored attributes of one scope: all of them, or only ``keys``."""
        found = self.entities.get(entity)
        if found is None:
            return {}
        rows = self.read(
            "reading attributes from",
            lambda con: con.execute(
                "SELECT key, bool_v, long_v, dbl_v, str_v, json_v, last_update_ts "
                "FROM attribute_kv WHERE entity_id = ? AND scope = ?",
                [found.id, scope],
            ).fetchall(),
        )
        wanted = set(keys) if keys is not None else None
        result = {}
        for row in rows:
            name = self.key_names[row[0]]
            if wanted is None or name in wanted:
                kind, value = typed_value(row[1:6])
                result[name] = AttributeValue(kind, value, row[6])
        return result

    # -- the batch write -----------------------------------------------------

    def apply(
        self, changes: ChangeSet, *, cursor: tuple[str, int] | None = None
    ) -> None:
        """Store a whole batch in one transaction.

        ``cursor`` records ``(peer, seq)`` as applied in the same commit, which
        makes a re-sent batch from a peer recognisable. Raises StorageError
        (the batch is rolled back and nothing of it is stored).
        """
        if changes.is_empty and cursor is None:
            return
        writer = _BatchWriter(self, changes)
        try:
            with storage_errors("writing", self.path), self.transaction() as con:
                writer.write(con)
                if cursor is not None:
                    set_applied(con, *cursor, known=cursor[0] in self._applied)
        except BaseException:
            self._load_caches()
            raise
        writer.remember()
        if cursor is not None:
            self._applied[cursor[0]] = cursor[1]

    def applied_seq(self, peer: str) -> int:
        """The last event sequence from ``peer`` that this file has applied."""
        return self._applied.get(peer, 0)

    def expire(self, now: int) -> int:
        """Delete readings past their TTL; returns how many were removed."""
        with (
            storage_errors("expiring readings in", self.path),
            self.transaction() as con,
        ):
            row = con.execute(
                "DELETE FROM ts_kv WHERE expires IS NOT NULL AND expires < ?", [now]
            ).fetchone()
        return int(row[0]) if row else 0


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def set_applied(
    con: duckdb.DuckDBPyConnection, peer: str, seq: int, *, known: bool
) -> None:
    """Record the last applied event sequence from a peer (``known``: one is
    recorded already)."""
    if known:
        con.execute(
            "UPDATE sync_applied SET applied_seq = ? WHERE peer = ?", [seq, peer]
        )
    else:
        con.execute("INSERT INTO sync_applied VALUES (?, ?)", [peer, seq])


def typed_value(columns: tuple[Any, ...] | list[Any]) -> tuple[int, Any]:
    """``(kind, value)`` from the five value columns, one of which is set."""
    for kind, value in enumerate(columns):
        if value is not None:
            return kind, value
    return STRING, None


def value_columns(kinds: list[int], values: list[Any]) -> dict[str, pa.Array]:
    """Split typed values into the five value columns as Arrow arrays."""
    columns: list[list[Any]] = [[None] * len(values) for _ in range(5)]
    for index, (kind, value) in enumerate(zip(kinds, values, strict=True)):
        columns[kind][index] = value
    return {
        "bool_v": pa.array(columns[BOOLEAN], pa.bool_()),
        "long_v": pa.array(columns[LONG], pa.int64()),
        "dbl_v": pa.array(columns[DOUBLE], pa.float64()),
        "str_v": pa.array(columns[STRING], pa.string()),
        "json_v": pa.array(columns[JSON], pa.string()),
    }


class _BatchWriter:
    """Writes one ChangeSet; ids it allots become visible only after commit.

    Arrow tables reach DuckDB by replacement scan: a statement names a local
    variable holding the table and DuckDB reads it from the calling frame.
    Registering each table instead cost about 0.4 ms more per statement, a
    tenth of a small commit.
    """

    def __init__(self, store: Store, changes: ChangeSet) -> None:
        self.store = store
        self.changes = changes
        self.new_keys: dict[str, int] = {}
        self.new_entities: list[Entity] = []
        self.entity_ids: dict[EntityRef, int] = {}
        self.next_seq = store.next_seq
        # What this batch makes the newest reading ts and the latest ts of each
        # (entity id, key id); None in ``latest`` means the row is gone.
        self.newest: dict[tuple[int, int], int] = {}
        self.latest: dict[tuple[int, int], int | None] = {}

    def key_id(self, key: str) -> int:
        found = self.store.key_ids.get(key)
        if found is None:
            found = self.new_keys.get(key)
            if found is None:
                found = len(self.store.key_ids) + len(self.new_keys) + 1
                self.new_keys[key] = found
        return found

    def known_entity_id(self, ref: EntityRef) -> int | None:
        """The id of a stored entity or one new in this batch, else None."""
        found = self.store.entities.get(ref)
        return found.id if found is not None else self.entity_ids.get(ref)

    def known_key_id(self, key: str) -> int | None:
        """The id of a stored key or one new in this batch, else None."""
        found = self.store.key_ids.get(key)
        return found if found is not None else self.new_keys.get(key)

    def entity_id(self, ref: EntityRef) -> int:
        found = self.store.entities.get(ref)
        if found is not None:
            return found.id
        if ref not in self.entity_ids:
            next_id = (
                max([*self.store.entity_names, *self.entity_ids.values()], default=0)
                + 1
            )
            entity = Entity(
                next_id, ref.entity_type, ref.name, "default", None, None, now_ms()
            )
            self.new_entities.append(entity)
            self.entity_ids[ref] = next_id
        return self.entity_ids[ref]

    def write(self, con: duckdb.DuckDBPyConnection) -> None:
        from edgectl.outbox import append_events

        changes = self.changes
        # Deletes go first: they remove stored readings and the batch's own
        # readings from earlier messages, and leave those that came after.
        for delete in changes.timeseries_deletes:
            self._delete_readings(con, delete)
        if changes.timeseries_deletes:
            changes.drop_deleted_readings()
        if changes.ts:
            self._write_readings(con)
        if changes.attributes:
            self._write_attributes(con)
        if changes.events:
            self.next_seq = append_events(
                con, self.store, changes.events, self.entity_id
            )
        if self.new_entities:
            self.store._insert_entities(con, self.new_entities)
        if self.new_keys:
            con.executemany(
                "INSERT INTO key_dictionary VALUES (?, ?)", list(self.new_keys.items())
            )

    def remember(self) -> None:
        store = self.store
        for entity in self.new_entities:
            store._remember(entity)
        for key, key_id in self.new_keys.items():
            store.key_ids[key] = key_id
            store.key_names[key_id] = key
        store.next_seq = self.next_seq
        store.newest_reading.update(self.newest)
        for pair, ts in self.latest.items():
            if ts is None:
                store.latest_ts.pop(pair, None)
            else:
                store.latest_ts[pair] = ts

    def _write_readings(self, con: duckdb.DuckDBPyConnection) -> None:
        changes = self.changes
        pairs = list(
            zip(
                self._entity_ids(changes.entities),
                map(self.key_id, changes.keys),
                strict=True,
            )
        )
        batch = pa.table(
            {
                "entity_id": pa.array([pair[0] for pair in pairs], pa.int32()),
                "key": pa.array([pair[1] for pair in pairs], pa.int32()),
                "ts": pa.array(changes.ts, pa.int64()),
                **value_columns(changes.kinds, changes.values),
                "expires": pa.array(changes.expires, pa.int64()),
            }
        )
        if not self._only_newer(pairs):
            batch = self._replace_stored(con, pairs, batch)
        reading_batch = batch  # noqa: F841 (a replacement scan reads it by name)
        con.execute("INSERT INTO ts_kv SELECT * FROM reading_batch")
        if any(changes.latest):
            self._write_latest(con, pairs)

    def _replace_stored(
        self,
        con: duckdb.DuckDBPyConnection,
        pairs: list[tuple[int, int]],
        batch: pa.Table,
    ) -> pa.Table:
        """Keep one reading per (entity, key, ts), the last to arrive, and delete
        the stored rows those replace; returns the readings left to insert."""
        ts = self.changes.ts
        last = {(pair, ts[index]): index for index, pair in enumerate(pairs)}
        keep = sorted(last.values())
        stored = self.store.newest_reading
        # Only readings no newer than what was stored before can meet a row.
        suspects = [i for i in keep if ts[i] <= stored.get(pairs[i], -1)]
        if suspects:
            instants = batch.take(suspects).select(["entity_id", "key", "ts"])
            low, high = min(ts[i] for i in suspects), max(ts[i] for i in suspects)
            replaced = instants  # noqa: F841 (a replacement scan reads it by name)
            con.execute(
                "DELETE FROM ts_kv USING replaced r WHERE ts_kv.ts BETWEEN ? AND ? "
                "AND ts_kv.entity_id = r.entity_id AND ts_kv.key = r.key "
                "AND ts_kv.ts = r.ts",
                [low, high],
            )
        return batch if len(keep) == len(ts) else batch.take(keep)

    def _only_newer(self, pairs: list[tuple[int, int]]) -> bool:
        """True when every reading is newer than all stored and earlier ones of
        its key, so nothing can be replaced; remembers the new newest ts."""
        newest = self.newest
        stored = self.store.newest_reading
        only_newer = True
        for pair, ts in zip(pairs, self.changes.ts, strict=True):
            high = newest.get(pair)
            if high is None:
                high = stored.get(pair, -1)
            if ts <= high:
                only_newer = False
                continue
            newest[pair] = ts
        return only_newer

    def _write_latest(
        self, con: duckdb.DuckDBPyConnection, pairs: list[tuple[int, int]]
    ) -> None:
        # An older reading never replaces a newer latest value; an equal ts does,
        # and within the batch the last to arrive wins among equals.
        changes = self.changes
        ts = changes.ts
        chosen: dict[tuple[int, int], int] = {}
        for index, pair in enumerate(pairs):
            if changes.latest[index]:
                best = chosen.get(pair)
                if best is None or ts[index] >= ts[best]:
                    chosen[pair] = index
        updates, inserts = [], []
        for pair, index in chosen.items():
            current = self._latest_of(pair)
            if current is None:
                inserts.append(index)
            elif ts[index] >= current:
                updates.append(index)
            else:
                continue
            self.latest[pair] = ts[index]
        if updates:
            self._latest_rows(con, pairs, updates, _UPDATE_LATEST)
        if inserts:
            self._latest_rows(con, pairs, inserts, _INSERT_LATEST)

    def _latest_of(self, pair: tuple[int, int]) -> int | None:
        if pair in self.latest:
            return self.latest[pair]
        return self.store.latest_ts.get(pair)

    def _latest_rows(
        self,
        con: duckdb.DuckDBPyConnection,
        pairs: list[tuple[int, int]],
        rows: list[int],
        statement: str,
    ) -> None:
        changes = self.changes
        table = pa.table(
            {
                "entity_id": pa.array([pairs[i][0] for i in rows], pa.int32()),
                "key": pa.array([pairs[i][1] for i in rows], pa.int32()),
                "ts": pa.array([changes.ts[i] for i in rows], pa.int64()),
                **value_columns(
                    [changes.kinds[i] for i in rows], [changes.values[i] for i in rows]
                ),
            }
        )
        latest_batch = table  # noqa: F841 (a replacement scan reads it by name)
        con.execute(statement)

    def _entity_ids(self, refs: list[EntityRef]) -> list[int]:
        # Readings share EntityRef objects (one per message, one per entity in
        # a sync batch), and hashing a dataclass is slow, so each object is
        # looked up once.
        # The list holds every ref, so no id() is reused while it runs.
        ids: list[int] = []
        by_object: dict[int, int] = {}
        for ref in refs:
            found = by_object.get(id(ref))
            if found is None:
                found = by_object[id(ref)] = self.entity_id(ref)
            ids.append(found)
        return ids

    def _write_attributes(self, con: duckdb.DuckDBPyConnection) -> None:
        # Deleting what cannot be stored (an unknown device or key) is a no-op;
        # giving it ids would register a device or key nobody sent.
        rows = [
            ((entity, scope, key), value)
            for (entity, scope, key), value in self.changes.attributes.items()
            if value is not DELETED
            or (self.known_entity_id(entity) and self.known_key_id(key))
        ]
        if not rows:
            return
        kinds, values, stamps, deleted = [], [], [], []
        for _, value in rows:
            is_deleted = value is DELETED
            kinds.append(STRING if is_deleted else value.kind)
            values.append(None if is_deleted else value.value)
            stamps.append(None if is_deleted else value.last_update_ts)
            deleted.append(is_deleted)
        batch = pa.table(
            {
                "entity_id": pa.array(
                    [self.entity_id(entity) for (entity, _, _), _ in rows], pa.int32()
                ),
                "scope": pa.array([scope for (_, scope, _), _ in rows], pa.string()),
                "key": pa.array(
                    [self.key_id(key) for (_, _, key), _ in rows], pa.int32()
                ),
                **value_columns(kinds, values),
                "last_update_ts": pa.array(stamps, pa.int64()),
                "deleted": pa.array(deleted, pa.bool_()),
            }
        )
        attribute_batch = batch  # noqa: F841 (a replacement scan reads it by name)
        con.execute(
            "DELETE FROM attribute_kv USING attribute_batch b "
            "WHERE attribute_kv.entity_id = b.entity_id "
            "AND attribute_kv.scope = b.scope AND attribute_kv.key = b.key"
        )
        con.execute(
            "INSERT INTO attribute_kv SELECT entity_id, scope, key, bool_v, "
            "long_v, dbl_v, str_v, json_v, last_update_ts FROM attribute_batch "
            "WHERE NOT deleted"
        )

    def _delete_readings(
        self, con: duckdb.DuckDBPyConnection, delete: TimeseriesDelete
    ) -> None:
        # A device or key that is new in this batch has nothing stored yet;
        # its pending readings are dropped by ChangeSet.drop_deleted_readings.
        entity_id = self.known_entity_id(delete.entity)
        key_ids = [found for key in delete.keys if (found := self.known_key_id(key))]
        if not entity_id or not key_ids:
            return
        marks = ", ".join("?" for _ in key_ids)
        params = [entity_id, *key_ids, delete.start, delete.end]
        where = f"entity_id = ? AND key IN ({marks}) AND ts BETWEEN ? AND ?"
        con.execute(f"DELETE FROM ts_kv WHERE {where}", params)
        con.execute(f"DELETE FROM ts_kv_latest WHERE {where}", params)
        # The latest value falls back to the newest reading that remains.
        con.execute(
            "INSERT INTO ts_kv_latest SELECT entity_id, key, ts, bool_v, long_v, "
            f"dbl_v, str_v, json_v FROM ts_kv WHERE entity_id = ? AND key IN ({marks}) "
            "AND NOT EXISTS (SELECT 1 FROM ts_kv_latest l WHERE l.entity_id = "
            "ts_kv.entity_id AND l.key = ts_kv.key) QUALIFY row_number() OVER "
            "(PARTITION BY entity_id, key ORDER BY ts DESC) = 1",
            [entity_id, *key_ids],
        )
        remaining = dict(
            ((entity, key), ts)
            for entity, key, ts in con.execute(
                "SELECT entity_id, key, ts FROM ts_kv_latest "
                f"WHERE entity_id = ? AND key IN ({marks})",
                [entity_id, *key_ids],
            ).fetchall()
        )
        for key_id in key_ids:
            self.latest[(entity_id, key_id)] = remaining.get((entity_id, key_id))


_UPDATE_LATEST = (
    "UPDATE ts_kv_latest SET ts = b.ts, bool_v = b.bool_v, long_v = b.long_v, "
    "dbl_v = b.dbl_v, str_v = b.str_v, json_v = b.json_v FROM latest_batch b "
    "WHERE ts_kv_latest.entity_id = b.entity_id AND ts_kv_latest.key = b.key"
)
_INSERT_LATEST = "INSERT INTO ts_kv_latest SELECT * FROM latest_batch"
