"""unsupported: a placeholder for an imported node that edgectl cannot run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from edgectl.engine import fail
from edgectl.message import Message
from edgectl.nodes.base import BaseNode

if TYPE_CHECKING:
    from edgectl.engine import Routed, Run


class Unsupported(BaseNode):
    """Sends every message to Failure, naming the node type it stands for.

    Its relations are kept from the import, so any label is allowed.
    """

    TYPE = "unsupported"
    RELATIONS = None

    def process(self, batch: list[Message], run: Run) -> Iterator[Routed]:
        kind = self.config.get("thingsboard_type", "this node type")
        reason = (
            f"{kind} is not supported by edgectl; "
            f"node '{self.spec.id}' is a placeholder"
        )
        for message in batch:
            yield fail(message, reason)
