"""The sync protocol: how queued events become messages on the other side.

Both directions use the same rules:

- Events travel in sequence order. The receiver keeps, per sender and sender
  file instance, the last sequence it applied, updated in the same transaction
  as the effects; a batch sent again is recognised and applied only once.
- The receiver applies a batch up to the first event it rejects for good (an
  unknown device, a body its chain refuses) and reports that event; everything
  before it is committed. The sender counts attempts on that event and, past
  its limit, moves it to the dead letters so the events behind it can flow.
- Each batch says which sequence it follows (``after``). A first batch may
  start past the receiver's cursor (the sender purged what lay between); a
  ``chained`` uplink batch follows one still in flight and is applied only after
  that one (``BatchOrder``), else refused with 409, never passed over.
- An event becomes a message for the receiver's root chain with metadata
  ``source`` naming the sender, so push nodes never send it back. Attribute
  updates are stored directly first, and never over a newer value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from edgectl.changes import AttributeValue
from edgectl.engine import Engine, Run, log_failures
from edgectl.message import (
    ATTRIBUTES_DELETED,
    ATTRIBUTES_UPDATED,
    ENTITY_CREATED,
    META_SCOPE,
    META_SOURCE,
    META_TS,
    POST_ATTRIBUTES_REQUEST,
    POST_TELEMETRY_REQUEST,
    TIMESERIES_DELETED,
    TIMESERIES_UPDATED,
    EntityRef,
    Message,
    normalize_scope,
    thingsboard_scope,
)
from edgectl.nodes.push import POST_ATTRIBUTES
from edgectl.outbox import Event
from edgectl.storage import Entity, Store
from edgectl.values import ValueRejected, classify

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WireEvent:
    """An event as it travels: its sequence, action, entity and parsed body."""

    seq: int
    action: str
    entity: EntityRef
    body: Any
    ts: int

    @property
    def entity_type(self) -> str:
        """The originator's kind, such as ``DEVICE``."""
        return self.entity.entity_type

    @property
    def entity_name(self) -> str:
        """The originator's name."""
        return self.entity.name


@dataclass(frozen=True, slots=True)
class Rejection:
    """An event the receiver refused for good, and why."""

    seq: int
    error: str


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """How far a batch was applied, and the event that stopped it, if any."""

    applied_through: int
    rejected: Rejection | None = None
    applied: int = 0


def encode_event(event: Event) -> dict[str, Any]:
    """The wire form of a stored event; its JSON body is sent as it is stored."""
    import orjson

    return {
        "seq": event.seq,
        "action": event.action,
        "entity_type": event.entity_type,
        "entity_name": event.entity_name,
        "ts": event.ts,
        "body": orjson.Fragment(event.body),
    }


def decode_events(items: Any) -> list[WireEvent]:
    """Wire events from a parsed batch; raises ValueRejected for a bad shape."""
    if not isinstance(items, list):
        raise ValueRejected("events must be a list")
    # A batch names a few entities thousands of times: one EntityRef each.
    refs: dict[tuple[str, str], EntityRef] = {}
    events = []
    for index, item in enumerate(items):
        try:
            seq, action = _whole(item["seq"]), _text(item["action"])
            names = (_text(item["entity_type"]), _text(item["entity_name"]))
            entity = refs.get(names)
            if entity is None:
                entity = refs[names] = EntityRef(*names)
            ts = _whole(item.get("ts") or 0)
            events.append(WireEvent(seq, action, entity, item.get("body"), ts))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueRejected(f"event {index} is malformed: {error}") from None
    return events


def _text(value: Any) -> str:
    return value if type(value) is str else str(value)


def _whole(value: Any) -> int:
    return value if type(value) is int else int(value)


class Receiver:
    """Applies batches of events from one kind of peer through a root chain.

    ``source`` is the metadata ``source`` the messages get (``edge`` on the
    cloud, ``cloud`` on the edge). Runs on the writer thread.
    """

    def __init__(self, store: Store, engine: Engine, source: str) -> None:
        self.store = store
        self.engine = engine
        self.source = source

    def apply(
        self, events: list[WireEvent], peer_key: str, owner: str | None
    ) -> tuple[ApplyResult, Run]:
        """Apply events newer than the peer's cursor, in one transaction.

        ``owner`` is the sending edge's name on the cloud (new devices become
        its own, and it may only send data for its own devices); None on the
        edge. Returns the result and the run, whose changes were committed.
        """
        applied = self.store.applied_seq(peer_key)
        fresh = [event for event in events if event.seq > applied]
        run, rejection = self._run(fresh, owner)
        if rejection is not None:
            fresh = [event for event in fresh if event.seq < rejection.seq]
            run, _ = self._run(fresh, owner)
        through = max([applied, *(event.seq for event in fresh)])
        self.store.apply(run.changes, cursor=(peer_key, through))
        log_failures(run.failures)
        return ApplyResult(through, rejection, len(fresh)), run

    def _run(
        self, events: list[WireEvent], owner: str | None
    ) -> tuple[Run, Rejection | None]:
        run = Run(store=self.store)
        messages: list[Message] = []
        seqs: list[int] = []
        checked: dict[int, Entity] = {}
        for event in events:
            try:
                converted = self._messages(event, run, owner, checked)
            except ValueRejected as error:
                return self._rerun_before(event.seq, events, owner, str(error))
            for message in converted:
                message.order = len(messages)
                messages.append(message)
                seqs.append(event.seq)
        self.engine.run(messages, run)
        if run.failures:
            first = min(seqs[failure.message.order] for failure in run.failures)
            reason = next(
                f.error for f in run.failures if seqs[f.message.order] == first
            )
            return run, Rejection(first, f"the chain refused it: {reason}")
        return run, None

    def _rerun_before(
        self, seq: int, events: list[WireEvent], owner: str | None, error: str
    ) -> tuple[Run, Rejection | None]:
        before = [event for event in events if event.seq < seq]
        run, _ = self._run(before, owner)
        return run, Rejection(seq, error)

    def _messages(
        self,
        event: WireEvent,
        run: Run,
        owner: str | None,
        checked: dict[int, Entity],
    ) -> list[Message]:
        if event.action == ENTITY_CREATED:
            return self._create(event, owner)
        # Events of a batch share one EntityRef per entity (decode_events), so
        # an entity that passed the checks once is found by identity after.
        entity = checked.get(id(event.entity))
        if entity is None:
            entity = self._check(event, owner)
            checked[id(event.entity)] = entity
        metadata = {
            "deviceName": entity.name,
            "deviceType": entity.type,
            META_SOURCE: self.source,
            META_TS: str(event.ts),
        }
        return self._convert(event, metadata, run)

    def _check(self, event: WireEvent, owner: str | None) -> Entity:
        entity = self.store.entity(event.entity)
        if entity is None:
            raise ValueRejected(
                f"unknown {event.entity_type.lower()} {event.entity_name!r}: it was "
                "never announced with ENTITY_CREATED"
            )
        # A device no edge owns was registered on the cloud itself: no edge may
        # write to it, as none may claim it with ENTITY_CREATED.
        if owner is not None and entity.edge != owner:
            holder = "the cloud" if entity.edge is None else f"edge {entity.edge!r}"
            raise ValueRejected(
                f"{event.entity_name!r} belongs to {holder}, not {owner!r}"
            )
        return entity

    def _create(self, event: WireEvent, owner: str | None) -> list[Message]:
        body = event.body if isinstance(event.body, dict) else {}
        entity = self.store.add_entity(
            event.entity, type=str(body.get("type") or "default"), edge=owner
        )
        if owner is not None and entity.edge != owner:
            raise ValueRejected(
                f"{event.entity_name!r} already belongs to edge {entity.edge!r}"
            )
        metadata = {
            "deviceName": entity.name,
            "deviceType": entity.type,
            META_SOURCE: self.source,
        }
        return [Message(ENTITY_CREATED, event.entity, body, metadata)]

    def _convert(
        self, event: WireEvent, metadata: dict[str, str], run: Run
    ) -> list[Message]:
        body = event.body
        if not isinstance(body, dict):
            raise ValueRejected(f"{event.action} body must be an object")
        if event.action == TIMESERIES_UPDATED:
            metadata[META_TS] = str(body.get("ts", event.ts))
            return [
                Message(
                    POST_TELEMETRY_REQUEST, event.entity, body.get("data"), metadata
                )
            ]
        scope = normalize_scope(str(body.get("scope") or "server"))
        if scope is None:
            raise ValueRejected(f"unknown scope {body.get('scope')!r}")
        metadata[META_SCOPE] = thingsboard_scope(scope)
        if event.action == POST_ATTRIBUTES:
            metadata[META_TS] = str(body.get("ts", event.ts))
            return [
                Message(POST_ATTRIBUTES_REQUEST, event.entity, body.get("kv"), metadata)
            ]
        if event.action == ATTRIBUTES_UPDATED:
            return self._updated(event, body, scope, metadata, run)
        if event.action == ATTRIBUTES_DELETED:
            return self._deleted(event, body, scope, metadata, run)
        if event.action == TIMESERIES_DELETED:
            data = body.get("data", body)
            return [Message(TIMESERIES_DELETED, event.entity, data, metadata)]
        raise ValueRejected(f"unsupported action {event.action}")

    def _updated(
        self,
        event: WireEvent,
        body: dict[str, Any],
        scope: str,
        metadata: dict[str, str],
        run: Run,
    ) -> list[Message]:
        kv, ts = body.get("kv"), int(body.get("ts", event.ts))
        if not isinstance(kv, dict):
            raise ValueRejected("ATTRIBUTES_UPDATED needs a kv object")
        applied = {}
        for key, value in kv.items():
            kind, stored = classify(value)
            current = run.read_attribute(event.entity, scope, key)
            if current is not None and current.last_update_ts > ts:
                continue
            run.changes.set_attribute(
                event.entity, scope, key, AttributeValue(kind, stored, ts)
            )
            applied[key] = value
        if not applied:
            return []
        metadata[META_TS] = str(ts)
        return [Message(ATTRIBUTES_UPDATED, event.entity, applied, metadata)]

    def _deleted(
        self,
        event: WireEvent,
        body: dict[str, Any],
        scope: str,
        metadata: dict[str, str],
        run: Run,
    ) -> list[Message]:
        keys = body.get("keys")
        if not isinstance(keys, list):
            raise ValueRejected("ATTRIBUTES_DELETED needs a keys list")
        for key in keys:
            run.changes.delete_attribute(event.entity, scope, str(key))
        data = {"attributes": [str(key) for key in keys]}
        return [Message(ATTRIBUTES_DELETED, event.entity, data, metadata)]


class BatchOrder:
    """Hands a sender's batches to the writer in sequence order.

    A sender keeps two batches in flight, each on its own connection, so the
    second may be read before the first. A chained batch whose ``after`` lies
    beyond what was handed over so far waits, up to ``wait`` seconds, for the
    batch before it, or until a batch of that sender fails (refused before it
    was handed over, or not applied whole); then it goes on, and the writer
    answers 409 unless the batch before was applied meanwhile. Keyed by the
    sending edge; runs on the event loop.
    """

    def __init__(self, wait: float = 5.0) -> None:
        self.wait = wait
        self._handed: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        self._changed: asyncio.Condition | None = None

    async def turn(self, sender: str, after: int, applied: int) -> None:
        """Wait until the events through ``after`` were handed to the writer."""
        if after <= max(applied, self._handed.get(sender, 0)):
            return
        if self._changed is None:
            self._changed = asyncio.Condition()
        failures = self._failures.get(sender, 0)

        def ready() -> bool:
            return (
                self._handed.get(sender, 0) >= after
                or self._failures.get(sender, 0) != failures
            )

        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(ready), self.wait)

    async def handed(self, sender: str, last: int) -> None:
        """Note that a batch through ``last`` went to the writer."""
        self._handed[sender] = last
        await self._notify()

    async def failed(self, sender: str, applied: int) -> None:
        """A batch of the sender was refused or not applied whole: what was
        handed over is what ``applied`` says, and waiting batches go on."""
        self._handed[sender] = applied
        self._failures[sender] = self._failures.get(sender, 0) + 1
        await self._notify()

    async def _notify(self) -> None:
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()


def peer_key(kind: str, name: str, instance: str) -> str:
    """The cursor name of one sender file: ``edge:site-1:3fa2...``."""
    return f"{kind}:{name}:{instance}"
