"""message_type_switch: one relation per message type, "Other" for the rest."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from edgectl.message import FAILURE, OTHER, TYPE_RELATIONS, Message
from edgectl.nodes.base import BaseNode

if TYPE_CHECKING:
    from edgectl.engine import Routed, Run


class MessageTypeSwitch(BaseNode):
    """Routes by ThingsBoard's label for the message type (``Post telemetry``...)."""

    TYPE = "message_type_switch"
    RELATIONS = frozenset({*TYPE_RELATIONS.values(), OTHER, FAILURE})

    def process(self, batch: list[Message], run: Run) -> Iterator[Routed]:
        for message in batch:
            yield message, (TYPE_RELATIONS.get(message.type, OTHER),)
