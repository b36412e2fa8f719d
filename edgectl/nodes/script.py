"""Script nodes: filter, switch, transform and log, running JavaScript.

Scripts use ThingsBoard's signature: the body of ``function(msg, metadata,
msgType)``. Each node makes one call into the script engine per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from edgectl.chain import Chain, NodeSpec
from edgectl.engine import fail
from edgectl.message import FAILURE, FALSE, SUCCESS, TRUE, Message
from edgectl.nodes.base import BaseNode
from edgectl.scripting import ScriptFunction, ScriptOutcome
from edgectl.values import dumps

if TYPE_CHECKING:
    from edgectl.engine import BuildContext, Routed, Run

chain_logger = logging.getLogger("edgectl.chain")


class _ScriptNode(BaseNode):
    def __init__(self, spec: NodeSpec, chain: Chain, context: BuildContext) -> None:
        super().__init__(spec, chain, context)
        self.script = self._compile(spec)

    def _compile(self, spec: NodeSpec) -> ScriptFunction | None:
        return ScriptFunction(
            spec.config["script"],
            name=f"{self.chain.name}/{spec.id}",
            timeout_ms=int(spec.config.get("timeout_ms", 200)),
            language=str(spec.config.get("language", "javascript")),
        )

    def _call(self, batch: list[Message]) -> list[ScriptOutcome]:
        assert self.script is not None
        calls = [(message.data, message.metadata, message.type) for message in batch]
        return self.script.call_batch(calls)

    def close(self) -> None:
        if self.script is not None:
            self.script.close()


class Filter(_ScriptNode):
    """Routes by the boolean the script returns: True or False."""

    TYPE = "filter"
    RELATIONS = frozenset({TRUE, FALSE, FAILURE})

    def process(self, batch: list[Message], run: Run) -> Iterator[Routed]:
        for message, outcome in zip(batch, self._call(batch), strict=True):
            if outcome.error is not None:
                yield fail(message, outcome.error)
            elif isinstance(outcome.value, bool):
                yield message, (TRUE if outcome.value else FALSE,)
            else:
                got = dumps(outcome.value)
                yield fail(
                    message, f"filter script must return true or false, got {got}"
                )


class Switch(_ScriptNode):
    """Routes to every relation name the script returns (an empty list drops)."""

    TYPE = "switch"
    RELATIONS = None

    def process(self, batch: list[Message], run: Run) -> Iterator[Routed]:
        for message, outcome in zip(batch, self._call(batch), strict=True):
            value = [outcome.value] if isinstance(outcome.value, str) else outcome.value
            if outcome.error is not None:
                yield fail(message, outcome.error)
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                if value:
                    yield message, tuple(value)
            else:
                got = dumps(outcome.value)
                yield fail(
                    message, f"switch script must return relation names, got {got}"
                )


class Transform(_ScriptNode):
    """Replaces data, metadata or type with what the script returns.

    The script returns ``{msg, metadata, msgType}`` (a missing field keeps the
    original) or a list of such objects, each sent on by Success.
    """

    TYPE = "transform"

    def process(self, batch: list[Message], run: Run) -> Iterator[Routed]:
        for message, outcome in zip(batch, self._call(batch), strict=True):
            if outcome.error is not None:
                yield fail(message, outcome.error)
                continue
            results = (
                outcome.value if isinstance(outcome.value, list) else [outcome.value]
            )
            if not results or any(not isinstance(r, dict) for r in results):
                yield fail(message, "Message or messages list are empty!")
                continue
            for result in results:
                yield _transformed(message, result), (SUCCESS,)


def _transformed(message: Message, result: dict[str, Any]) -> Message:
    metadata = result.get("metadata")
    return message.derive(
        str(result.get("msgType") or message.type),
        result.get("msg", message.data),
        _string_map(metadata) if isinstance(metadata, dict) else dict(message.metadata),
    )


def _string_map(metadata: dict[str, Any]) -> dict[str, str]:
    return {
        str(key): value if isinstance(value, str) else dumps(value)
        for key, value in metadata.items()
        if value is not None
    }


class Log(_ScriptNode):
    """Logs the message at INFO on the ``edgectl.chain`` logger.

    Without a script it logs the data and metadata; with one, the text the
    script returns.
    """

    TYPE = "log"

    def _compile(self, spec: NodeSpec) -> ScriptFunction | None:
        return super()._compile(spec) if spec.config.get("script") else None

    def process(self, batch: list[Message], run: Run) -> Iterator[Routed]:
        if self.script is None:
            for message in batch:
                chain_logger.info(
                    "[%s] %s %s metadata=%s",
                    self.spec.id,
                    message.type,
                    dumps(message.data),
                    dumps(message.metadata),
                )
                yield message, (SUCCESS,)
            return
        for message, outcome in zip(batch, self._call(batch), strict=True):
            if outcome.error is not None:
                yield fail(message, outcome.error)
                continue
            chain_logger.info("[%s] %s", self.spec.id, outcome.value)
            yield message, (SUCCESS,)
