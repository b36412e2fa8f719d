"""save_attributes: store POST_ATTRIBUTES_REQUEST key-values in a scope."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from edgectl.changes import AttributeValue
from edgectl.engine import fail
from edgectl.message import (
    ATTRIBUTES_UPDATED,
    META_SCOPE,
    META_SOURCE,
    POST_ATTRIBUTES_REQUEST,
    SUCCESS,
    Message,
    normalize_scope,
    thingsboard_scope,
)
from edgectl.nodes.base import BaseNode
from edgectl.values import ValueRejected, classify

if TYPE_CHECKING:
    from edgectl.engine import Routed, Run


def message_scope(message: Message, default: str) -> str:
    """The scope a message asks for: metadata ``scope`` when set, else ``default``.

    Raises ValueRejected when metadata names no scope.
    """
    raw = message.metadata.get(META_SCOPE, "")
    if not raw:
        return default
    scope = normalize_scope(raw)
    if scope is None:
        raise ValueRejected(
            f"metadata scope {raw!r} is not a scope; use CLIENT_SCOPE, "
            "SERVER_SCOPE or SHARED_SCOPE"
        )
    return scope


class SaveAttributes(BaseNode):
    """Stores attributes with ``last_update_ts`` = metadata ``ts``.

    Scope rule: metadata ``scope`` (``CLIENT_SCOPE``, ``shared``...) wins over
    the node's ``scope``. With ``update_only_on_change`` unchanged keys are not
    rewritten. A message that came from the peer (metadata ``source``) never
    overwrites a key updated later than its own ts, so both sides converge on
    the newest value. ``notify_attributes_updated`` sends the changed keys as an
    ATTRIBUTES_UPDATED message into the root chain (not for client scope).
    """

    TYPE = "save_attributes"

    def process(self, batch: list[Message], run: Run) -> Iterator[Routed]:
        for message in batch:
            if message.type != POST_ATTRIBUTES_REQUEST:
                yield fail(message, f"Unsupported msg type {message.type}")
                continue
            try:
                scope = message_scope(message, self.config.get("scope", "server"))
                typed = _typed_attributes(message.data)
            except ValueRejected as error:
                yield fail(message, str(error))
                continue
            changed = self._store(message, scope, typed, run)
            if changed and self._notifies(scope):
                run.enqueue_root(_updated_message(message, scope, changed))
            yield message, (SUCCESS,)

    def _store(
        self,
        message: Message,
        scope: str,
        typed: dict[str, tuple[int, Any]],
        run: Run,
    ) -> dict[str, Any]:
        only_changes = self.config.get("update_only_on_change", True)
        from_peer = bool(message.metadata.get(META_SOURCE))
        ts = message.ts
        changed: dict[str, Any] = {}
        for key, (kind, value) in typed.items():
            current = run.read_attribute(message.originator, scope, key)
            if current is not None:
                if from_peer and current.last_update_ts > ts:
                    continue
                if only_changes and (current.kind, current.value) == (kind, value):
                    continue
            stored = AttributeValue(kind, value, ts)
            run.changes.set_attribute(message.originator, scope, key, stored)
            changed[key] = message.data[key]
        return changed

    def _notifies(self, scope: str) -> bool:
        return bool(self.config.get("notify_attributes_updated")) and scope != "client"


def _typed_attributes(data: Any) -> dict[str, tuple[int, Any]]:
    if not isinstance(data, dict):
        raise ValueRejected("attributes must be a JSON object of key-values")
    typed = {}
    for key, value in data.items():
        try:
            typed[key] = classify(value)
        except ValueRejected as error:
            raise ValueRejected(f"key {key!r}: {error}") from None
    return typed


def _updated_message(message: Message, scope: str, changed: dict[str, Any]) -> Message:
    metadata = dict(message.metadata)
    metadata[META_SCOPE] = thingsboard_scope(scope)
    return message.derive(ATTRIBUTES_UPDATED, changed, metadata)
