"""delete_attributes: remove attribute keys, with metadata and data placeholders."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from edgectl.engine import fail
from edgectl.message import (
    ATTRIBUTES_DELETED,
    META_SCOPE,
    SUCCESS,
    Message,
    thingsboard_scope,
)
from edgectl.nodes.base import BaseNode
from edgectl.nodes.save_attributes import message_scope
from edgectl.values import ValueRejected

if TYPE_CHECKING:
    from edgectl.engine import Routed, Run

_METADATA_PATTERN = re.compile(r"\$\{([^}]+)\}")
_DATA_PATTERN = re.compile(r"\$\[([^\]]+)\]")


def resolve_pattern(pattern: str, message: Message) -> str:
    """Replace ``${key}`` with metadata and ``$[key]`` with top-level data values.

    A placeholder with no value becomes empty, as in ThingsBoard.
    """
    text = _METADATA_PATTERN.sub(
        lambda match: message.metadata.get(match.group(1), ""), pattern
    )
    data = message.data if isinstance(message.data, dict) else {}
    return _DATA_PATTERN.sub(lambda match: _as_text(data.get(match.group(1))), text)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class DeleteAttributes(BaseNode):
    """Deletes the resolved keys from the scope (metadata ``scope`` wins).

    Blank and repeated keys are dropped; with none left the message passes on.
    ``notify_attributes_deleted`` sends an ATTRIBUTES_DELETED message with data
    ``{"attributes": [...]}`` into the root chain.
    """

    TYPE = "delete_attributes"

    def process(self, batch: list[Message], run: Run) -> Iterator[Routed]:
        for message in batch:
            try:
                scope = message_scope(message, self.config.get("scope", "server"))
            except ValueRejected as error:
                yield fail(message, str(error))
                continue
            keys = self._keys(message)
            for key in keys:
                run.changes.delete_attribute(message.originator, scope, key)
            if keys and self.config.get("notify_attributes_deleted"):
                metadata = {**message.metadata, META_SCOPE: thingsboard_scope(scope)}
                data = {"attributes": keys}
                run.enqueue_root(message.derive(ATTRIBUTES_DELETED, data, metadata))
            yield message, (SUCCESS,)

    def _keys(self, message: Message) -> list[str]:
        resolved = (
            resolve_pattern(key, message).strip() for key in self.config["keys"]
        )
        return list(dict.fromkeys(key for key in resolved if key))
