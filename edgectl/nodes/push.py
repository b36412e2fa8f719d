"""push_to_cloud and push_to_edge: queue a message as an event for the peer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from edgectl.changes import PendingEvent
from edgectl.engine import fail
from edgectl.message import (
    ATTRIBUTES_DELETED,
    ATTRIBUTES_UPDATED,
    META_SOURCE,
    POST_ATTRIBUTES_REQUEST,
    POST_TELEMETRY_REQUEST,
    SOURCE_CLOUD,
    SOURCE_EDGE,
    SUCCESS,
    TIMESERIES_DELETED,
    TIMESERIES_UPDATED,
    Message,
)
from edgectl.nodes.base import BaseNode
from edgectl.nodes.save_attributes import message_scope
from edgectl.values import ValueRejected

if TYPE_CHECKING:
    from edgectl.engine import Routed, Run

POST_ATTRIBUTES = "POST_ATTRIBUTES"
_ACTIVITY_TYPES = frozenset(
    {"CONNECT_EVENT", "DISCONNECT_EVENT", "ACTIVITY_EVENT", "INACTIVITY_EVENT"}
)
_ACTIONS = {
    POST_TELEMETRY_REQUEST: TIMESERIES_UPDATED,
    TIMESERIES_UPDATED: TIMESERIES_UPDATED,
    ATTRIBUTES_UPDATED: ATTRIBUTES_UPDATED,
    POST_ATTRIBUTES_REQUEST: POST_ATTRIBUTES,
    ATTRIBUTES_DELETED: ATTRIBUTES_DELETED,
    TIMESERIES_DELETED: TIMESERIES_DELETED,
}

_SCOPED_ACTIONS = frozenset({ATTRIBUTES_UPDATED, POST_ATTRIBUTES, ATTRIBUTES_DELETED})


def event_body(action: str, message: Message, scope: str) -> Any:
    """The event body for an action, in ThingsBoard's shapes.

    Raises ValueRejected when the data does not fit the action.
    """
    if action == TIMESERIES_UPDATED:
        return {"data": message.data, "ts": message.ts}
    if action in (ATTRIBUTES_UPDATED, POST_ATTRIBUTES):
        return {"kv": message.data, "ts": message.ts, "scope": scope}
    if action == ATTRIBUTES_DELETED:
        keys = (
            message.data.get("attributes") if isinstance(message.data, dict) else None
        )
        if not isinstance(keys, list):
            raise ValueRejected('expected data {"attributes": [keys...]}')
        return {"keys": keys, "scope": scope, "ts": message.ts}
    return {"data": message.data, "ts": message.ts}


class _Push(BaseNode):
    """Stores the message as an event and returns at once.

    A message whose metadata ``source`` is the peer came from it and is not sent
    back (the loop guard). Types with no event action go to Failure.
    """

    IGNORED_SOURCE: ClassVar[str] = ""

    def process(self, batch: list[Message], run: Run) -> Iterator[Routed]:
        default_scope = self.config.get("scope", "server")
        for message in batch:
            if message.metadata.get(META_SOURCE) == self.IGNORED_SOURCE:
                continue
            action = self._action(message)
            if action is None:
                yield fail(message, f"Unsupported msg type {message.type}")
                continue
            try:
                # Only attribute events carry a scope; a stray metadata scope on
                # telemetry must not fail it (ThingsBoard ignores it there).
                scope = (
                    message_scope(message, default_scope)
                    if action in _SCOPED_ACTIONS
                    else default_scope
                )
                body = event_body(action, message, scope)
            except ValueRejected as error:
                yield fail(message, str(error))
                continue
            if self._queue(message, action, body, run):
                yield message, (SUCCESS,)

    def _action(self, message: Message) -> str | None:
        if message.type in _ACTIVITY_TYPES:
            has_scope = bool(message.metadata.get("scope"))
            return ATTRIBUTES_UPDATED if has_scope else TIMESERIES_UPDATED
        return _ACTIONS.get(message.type)

    def _queue(self, message: Message, action: str, body: Any, run: Run) -> bool:
        raise NotImplementedError


class PushToCloud(_Push):
    """Queues a cloud event on the edge."""

    TYPE = "push_to_cloud"
    IGNORED_SOURCE = SOURCE_CLOUD

    def _queue(self, message: Message, action: str, body: Any, run: Run) -> bool:
        event = PendingEvent(
            message.order, action, message.originator, body, message.ts
        )
        run.changes.add_event(event)
        return True


class PushToEdge(_Push):
    """Queues an edge event for the edge that owns the originator.

    An originator that belongs to no edge has nowhere to go: the message is
    done, with neither Success nor Failure, as in ThingsBoard.
    """

    TYPE = "push_to_edge"
    IGNORED_SOURCE = SOURCE_EDGE

    def _queue(self, message: Message, action: str, body: Any, run: Run) -> bool:
        edge = run.store.owner_edge(message.originator)
        if edge is None:
            return False
        event = PendingEvent(
            message.order, action, message.originator, body, message.ts, peer=edge
        )
        run.changes.add_event(event)
        return True
