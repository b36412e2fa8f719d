"""check_message: True when the message has the named data or metadata keys."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from edgectl.message import FAILURE, FALSE, TRUE, Message
from edgectl.nodes.base import BaseNode

if TYPE_CHECKING:
    from edgectl.engine import Routed, Run


class CheckMessage(BaseNode):
    """Looks for ``data_keys`` in the data and ``metadata_keys`` in the metadata.

    With ``all`` every listed key must be present; otherwise one is enough.
    Data that is not an object has no keys.
    """

    TYPE = "check_message"
    RELATIONS = frozenset({TRUE, FALSE, FAILURE})

    def process(self, batch: list[Message], run: Run) -> Iterator[Routed]:
        data_keys = list(self.config.get("data_keys", []))
        metadata_keys = list(self.config.get("metadata_keys", []))
        wanted = len(data_keys) + len(metadata_keys)
        need_all = bool(self.config.get("all", False))
        for message in batch:
            data = message.data if isinstance(message.data, dict) else {}
            found = sum(key in data for key in data_keys) + sum(
                key in message.metadata for key in metadata_keys
            )
            passed = found == wanted if need_all else found > 0
            yield message, (TRUE if passed else FALSE,)
