"""The writes one batch of messages makes, gathered for a single transaction.

Nodes never touch DuckDB: they add rows here, and the store applies a whole
ChangeSet in one commit. Reads of attributes see the batch's own pending writes
first, so two messages in one batch behave as if stored one after the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgectl.message import EntityRef

DELETED = object()


@dataclass(frozen=True, slots=True)
class AttributeValue:
    """A stored attribute: its kind, value and when it was last updated."""

    kind: int
    value: Any
    last_update_ts: int


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An event for a peer queue, numbered when the batch commits.

    ``order`` is the incoming message's position in the batch, so events are
    numbered in arrival order whatever path each message took through the chain.
    ``peer`` names the target edge on the cloud and is None on the edge.
    """

    order: int
    action: str
    entity: EntityRef
    body: Any
    ts: int
    peer: str | None = None


@dataclass(frozen=True, slots=True)
class TimeseriesDelete:
    """Readings of some keys of one entity, in ``[start, end]`` to remove."""

    entity: EntityRef
    keys: tuple[str, ...]
    start: int
    end: int
    order: int = 0

    def covers(self, entity: EntityRef, key: str, ts: int) -> bool:
        """True when a reading of ``entity``/``key`` at ``ts`` is in the range."""
        return (
            entity == self.entity and key in self.keys and self.start <= ts <= self.end
        )


@dataclass(slots=True)
class ChangeSet:
    """Column lists of readings plus attribute, delete and event changes."""

    entities: list[EntityRef] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)
    expires: list[int | None] = field(default_factory=list)
    latest: list[bool] = field(default_factory=list)
    orders: list[int] = field(default_factory=list)
    attributes: dict[tuple[EntityRef, str, str], Any] = field(default_factory=dict)
    timeseries_deletes: list[TimeseriesDelete] = field(default_factory=list)
    events: list[PendingEvent] = field(default_factory=list)

    def add_reading(
        self,
        entity: EntityRef,
        key: str,
        ts: int,
        typed: tuple[int, Any],
        expires: int | None,
        latest: bool,
        order: int = 0,
    ) -> None:
        """Queue one reading for ts_kv (and ts_kv_latest when ``latest``).

        ``order`` is the position of the incoming message it came from; a
        timeseries delete in the same batch removes only earlier readings.
        """
        self.orders.append(order)
        self.entities.append(entity)
        self.keys.append(key)
        self.ts.append(ts)
        self.kinds.append(typed[0])
        self.values.append(typed[1])
        self.expires.append(expires)
        self.latest.append(latest)

    def delete_timeseries(self, delete: TimeseriesDelete) -> None:
        """Queue a timeseries delete for the stored readings and the batch's own
        readings that came from earlier messages."""
        self.timeseries_deletes.append(delete)

    def drop_deleted_readings(self) -> None:
        """Remove pending readings that a later delete of this batch covers."""
        columns = (
            self.entities,
            self.keys,
            self.ts,
            self.kinds,
            self.values,
            self.expires,
            self.latest,
            self.orders,
        )
        keep = [
            index
            for index, (entity, key, ts, order) in enumerate(
                zip(self.entities, self.keys, self.ts, self.orders, strict=True)
            )
            if not any(
                d.order > order and d.covers(entity, key, ts)
                for d in self.timeseries_deletes
            )
        ]
        if len(keep) == len(self.ts):
            return
        for column in columns:
            column[:] = [column[index] for index in keep]  # type: ignore[misc]

    def set_attribute(
        self, entity: EntityRef, scope: str, key: str, value: AttributeValue
    ) -> None:
        """Queue an attribute write; a later write of the same key replaces it."""
        self.attributes[(entity, scope, key)] = value

    def delete_attribute(self, entity: EntityRef, scope: str, key: str) -> None:
        """Queue an attribute delete."""
        self.attributes[(entity, scope, key)] = DELETED

    def pending_attribute(
        self, entity: EntityRef, scope: str, key: str
    ) -> AttributeValue | object | None:
        """The batch's own pending state of a key: a value, DELETED, or None."""
        return self.attributes.get((entity, scope, key))

    def add_event(self, event: PendingEvent) -> None:
        """Queue an event for a peer."""
        self.events.append(event)

    @property
    def reading_count(self) -> int:
        """How many readings the batch stores."""
        return len(self.ts)

    @property
    def is_empty(self) -> bool:
        """True when applying this would change nothing."""
        return not (
            self.ts or self.attributes or self.timeseries_deletes or self.events
        )
