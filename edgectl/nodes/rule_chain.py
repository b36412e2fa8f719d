"""rule_chain and output: call another chain file and come back from it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from edgectl.chain import Chain, NodeSpec
from edgectl.message import FAILURE, SUCCESS, Message
from edgectl.nodes.base import BaseNode

if TYPE_CHECKING:
    from edgectl.engine import BuildContext, Routed, Run


def output_relations(path: Path) -> frozenset[str] | None:
    """The relations the output nodes of a chain file return with.

    Returns None when the file cannot be read; the caller reports that.
    """
    from edgectl.loader import read_yaml

    document = read_yaml(path)
    plain = getattr(document, "plain", None)
    if not isinstance(plain, dict) or not isinstance(plain.get("nodes"), list):
        return None
    return frozenset(
        str((node.get("config") or {}).get("relation", SUCCESS))
        for node in plain["nodes"]
        if isinstance(node, dict) and node.get("type") == "output"
    )


class RuleChainCall(BaseNode):
    """Runs messages through another chain file, in the same transaction.

    A message that reaches an ``output`` node there comes back here with that
    node's relation; one that fails there with nowhere to go comes back by
    Failure; any other ending finishes it inside the called chain.
    """

    TYPE = "rule_chain"

    def __init__(self, spec: NodeSpec, chain: Chain, context: BuildContext) -> None:
        super().__init__(spec, chain, context)
        self.engine = context.engine_for(chain.folder / spec.config["chain"])

    @classmethod
    def relations(cls, spec: NodeSpec, folder: Path) -> frozenset[str] | None:
        returned = output_relations(folder / str(spec.config.get("chain", "")))
        return None if returned is None else returned | {FAILURE}

    def process(self, batch: list[Message], run: Run) -> Iterator[Routed]:
        from edgectl.engine import Result

        result: Result = Result()
        self.engine.process(batch, run, result)
        yield from result.outputs
        for failure in result.failures:
            yield failure.message, (FAILURE,)

    def close(self) -> None:
        self.engine.close()


class Output(BaseNode):
    """Ends the called chain and returns the message to the caller."""

    TYPE = "output"
    RELATIONS = frozenset()
    IS_OUTPUT = True

    def process(self, batch: list[Message], run: Run) -> Iterator[Routed]:
        relation = str(self.config.get("relation", SUCCESS))
        for message in batch:
            yield message, (relation,)
