"""What every node shares: construction from a spec, relations, closing."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from edgectl.chain import Chain, NodeSpec
from edgectl.message import FAILURE, SUCCESS, Message

if TYPE_CHECKING:
    from edgectl.engine import BuildContext, Routed, Run


class BaseNode:
    """A rule node: it takes a batch of messages and routes each by label.

    ``RELATIONS`` lists every label the node can emit; None means any label
    (a script switch). ``relations`` may refine that from the node's config.
    An output node's messages leave the chain instead of being routed.
    """

    TYPE: ClassVar[str] = ""
    RELATIONS: ClassVar[frozenset[str] | None] = frozenset({SUCCESS, FAILURE})
    IS_OUTPUT: ClassVar[bool] = False

    def __init__(self, spec: NodeSpec, chain: Chain, context: BuildContext) -> None:
        self.spec = spec
        self.chain = chain
        self.config: dict[str, Any] = spec.config

    @classmethod
    def relations(cls, spec: NodeSpec, folder: Path) -> frozenset[str] | None:
        """The labels this node can emit, or None when it can emit any."""
        return cls.RELATIONS

    def process(self, batch: list[Message], run: Run) -> Iterable[Routed]:
        """Handle a batch; yield each message with the labels it leaves by."""
        raise NotImplementedError

    def close(self) -> None:
        """Release resources; the default holds none."""
