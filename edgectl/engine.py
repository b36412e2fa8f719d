"""Running a rule chain over a batch of messages.

The engine works a batch at a time: every node receives all the messages waiting
for it at once, so a save node does its work once per batch and a script node
makes one call into JavaScript per batch. Nodes are visited in the chain's
topological order, which makes each node of an acyclic chain run once per batch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edgectl.chain import Chain
from edgectl.changes import DELETED, AttributeValue, ChangeSet
from edgectl.errors import ChainError
from edgectl.message import FAILURE, META_ERROR, Budget, EntityRef, Message, now_ms

if TYPE_CHECKING:
    from edgectl.registry import Node

logger = logging.getLogger(__name__)

DEFAULT_EXECUTION_LIMIT = 1000

Routed = tuple[Message, tuple[str, ...]]


class StoreReader(Protocol):
    """What nodes may read from storage while a batch runs."""

    def read_attribute(
        self, entity: EntityRef, scope: str, key: str
    ) -> AttributeValue | None: ...

    def owner_edge(self, entity: EntityRef) -> str | None: ...


class _EmptyStore:
    def read_attribute(
        self, entity: EntityRef, scope: str, key: str
    ) -> AttributeValue | None:
        return None

    def owner_edge(self, entity: EntityRef) -> str | None:
        return None


@dataclass(frozen=True, slots=True)
class NodeFailure:
    """A message that a node sent to Failure with nowhere to go."""

    chain: str
    node: str
    error: str
    message: Message


@dataclass(slots=True)
class Run:
    """The state of one batch: its changes, failures, and what nodes may read.

    ``clock`` gives epoch milliseconds; tests replace it to freeze time.
    """

    changes: ChangeSet = field(default_factory=ChangeSet)
    store: StoreReader = field(default_factory=_EmptyStore)
    clock: Callable[[], int] = now_ms
    failures: list[NodeFailure] = field(default_factory=list)
    to_root: list[Message] = field(default_factory=list)
    executions: int = 0

    def now(self) -> int:
        """The current time in epoch milliseconds."""
        return self.clock()

    def read_attribute(
        self, entity: EntityRef, scope: str, key: str
    ) -> AttributeValue | None:
        """An attribute as this batch sees it, its own pending writes included."""
        pending = self.changes.pending_attribute(entity, scope, key)
        if pending is DELETED:
            return None
        if isinstance(pending, AttributeValue):
            return pending
        return self.store.read_attribute(entity, scope, key)

    def enqueue_root(self, message: Message) -> None:
        """Send a new message into the root chain, after the current pass."""
        self.to_root.append(message)


@dataclass(slots=True)
class Result:
    """What a chain returned: output-node results and unhandled failures."""

    outputs: list[Routed] = field(default_factory=list)
    failures: list[NodeFailure] = field(default_factory=list)


class BuildContext:
    """What building nodes needs: sub-chain loading and script limits.

    ``load_chain`` loads and validates a chain file; ``stack`` holds the files
    being built, so a chain that calls itself is refused instead of recursing.
    ``execution_limit`` is the calling engine's, which called chains report
    when a message's budget runs out inside them.
    """

    def __init__(
        self,
        load_chain: Callable[[Path], Chain] | None = None,
        stack: tuple[Path, ...] = (),
        execution_limit: int = DEFAULT_EXECUTION_LIMIT,
    ) -> None:
        self.load_chain = load_chain
        self.stack = stack
        self.execution_limit = execution_limit

    def engine_for(self, path: Path) -> Engine:
        """Build the engine of a chain file a ``rule_chain`` node calls."""
        resolved = path.resolve()
        if resolved in self.stack:
            names = " -> ".join(str(item) for item in (*self.stack, resolved))
            raise ChainError(f"rule chains call each other in a loop: {names}")
        if self.load_chain is None:
            raise ChainError(f"cannot load {path}: no chain loader was given")
        chain = self.load_chain(resolved)
        stack = (*self.stack, resolved)
        context = BuildContext(self.load_chain, stack, self.execution_limit)
        return Engine(chain, context, self.execution_limit)


class Engine:
    """A built chain that runs batches of messages."""

    def __init__(
        self,
        chain: Chain,
        context: BuildContext | None = None,
        execution_limit: int = DEFAULT_EXECUTION_LIMIT,
    ) -> None:
        from edgectl.registry import build_node

        self.chain = chain
        self.execution_limit = execution_limit
        given = context or BuildContext(_load_chain_file, _stack_of(chain))
        context = BuildContext(given.load_chain, given.stack, execution_limit)
        self.nodes: dict[str, Node] = {
            spec.id: build_node(spec, chain, context) for spec in chain.nodes
        }
        # Labels that differ only in case are one relation label, so their
        # targets are merged rather than the later one replacing the earlier.
        self._targets: dict[tuple[str, str], tuple[str, ...]] = {}
        for spec in chain.nodes:
            for label, targets in spec.next.items():
                key = (spec.id, label.lower())
                self._targets[key] = self._targets.get(key, ()) + targets
        self._order = _visit_order(chain)
        self._routes: dict[
            str, dict[tuple[str, ...], tuple[tuple[str, ...], bool]]
        ] = {}

    def run(self, messages: Iterable[Message], run: Run) -> Result:
        """Run incoming messages through the chain, then any they enqueue.

        Each message gets a budget of node executions; a message that uses it
        up fails with a RunawayChainError text instead of running forever.
        """
        result = Result()
        batch = list(messages)
        for order, message in enumerate(batch):
            # Events are numbered by this position when the batch commits, so
            # they keep arrival order whatever path each message takes.
            message.order = order
            if message.budget is None:
                message.budget = Budget(self.execution_limit)
        while batch:
            self.process(batch, run, result)
            batch, run.to_root = run.to_root, []
        run.failures.extend(result.failures)
        return result

    def process(self, messages: list[Message], run: Run, result: Result) -> None:
        """Run messages from the entry node; collect outputs and failures."""
        pending: dict[str, list[Message]] = {}
        self._deliver(self.chain.entry, messages, pending, result)
        while pending:
            node_id = min(pending, key=self._order.__getitem__)
            batch = pending.pop(node_id)
            run.executions += len(batch)
            node = self.nodes[node_id]
            outcomes = node.process(batch, run)
            if node.IS_OUTPUT:
                result.outputs.extend(outcomes)
            else:
                self._route(node_id, outcomes, pending, result)

    def _route(
        self,
        node_id: str,
        outcomes: Iterable[Routed],
        pending: dict[str, list[Message]],
        result: Result,
    ) -> None:
        # Nodes emit a handful of distinct label tuples, so the targets of each
        # are worked out once per node and reused for every message.
        known = self._routes.setdefault(node_id, {})
        for message, labels in outcomes:
            route = known.get(labels)
            if route is None:
                route = known[labels] = self._targets_of(node_id, labels)
            targets, is_failure = route
            if not targets:
                if is_failure:
                    error = message.metadata.get(META_ERROR, "failed")
                    failure = NodeFailure(self.chain.name, node_id, error, message)
                    result.failures.append(failure)
                continue
            last = len(targets) - 1
            for index, target in enumerate(targets):
                copy = message if index == last else message.copy()
                self._deliver_one(target, copy, pending, result)

    def _targets_of(
        self, node_id: str, labels: tuple[str, ...]
    ) -> tuple[tuple[str, ...], bool]:
        """The targets of a label tuple, and whether it holds Failure."""
        # A relation matches once however often a node names its label.
        matched = dict.fromkeys(label.lower() for label in labels)
        targets = tuple(
            target
            for label in matched
            for target in self._targets.get((node_id, label), ())
        )
        return targets, "failure" in matched

    def _deliver(
        self,
        node_id: str,
        messages: list[Message],
        pending: dict[str, list[Message]],
        result: Result,
    ) -> None:
        for message in messages:
            self._deliver_one(node_id, message, pending, result)

    def _deliver_one(
        self,
        node_id: str,
        message: Message,
        pending: dict[str, list[Message]],
        result: Result,
    ) -> None:
        budget = message.budget
        if budget is None:
            budget = message.budget = Budget(self.execution_limit)
        if budget.remaining <= 0:
            self._stop_runaway(node_id, message, result)
            return
        budget.remaining -= 1
        queue = pending.get(node_id)
        if queue is None:
            queue = pending[node_id] = []
        queue.append(message)

    def _stop_runaway(self, node_id: str, message: Message, result: Result) -> None:
        budget = message.budget
        if budget is None or budget.exhausted:
            return
        budget.exhausted = True
        error = (
            f"stopped after {self.execution_limit} node executions for one incoming "
            f"message (at node '{node_id}'); the chain loops or multiplies messages"
        )
        message.metadata[META_ERROR] = error
        result.failures.append(NodeFailure(self.chain.name, node_id, error, message))

    def close(self) -> None:
        """Release what nodes hold (script contexts, sub-chains)."""
        for node in self.nodes.values():
            node.close()


def fail(message: Message, error: str) -> Routed:
    """Route a message to Failure with ``error`` in its metadata."""
    message.metadata[META_ERROR] = error
    return message, (FAILURE,)


def log_failures(failures: list[NodeFailure]) -> None:
    """Log unhandled failures, one line per chain, node and error, with a count."""
    counts = Counter((f.chain, f.node, f.error) for f in failures)
    for (chain, node, error), count in counts.items():
        logger.error(
            "chain %r node %r dropped %d message(s): %s", chain, node, count, error
        )


def _load_chain_file(path: Path) -> Chain:
    from edgectl.checks import load_chain

    return load_chain(path)


def _stack_of(chain: Chain) -> tuple[Path, ...]:
    return (chain.path.resolve(),) if chain.path else ()


def _visit_order(chain: Chain) -> dict[str, int]:
    """Topological order of the nodes (Kahn), with leftovers of cycles last."""
    ids = [node.id for node in chain.nodes]
    incoming = dict.fromkeys(ids, 0)
    for node in chain.nodes:
        for targets in node.next.values():
            for target in targets:
                if target in incoming:
                    incoming[target] += 1
    ready = [node_id for node_id in ids if incoming[node_id] == 0]
    order: dict[str, int] = {}
    while ready:
        node_id = ready.pop(0)
        order[node_id] = len(order)
        for targets in chain.node(node_id).next.values():
            for target in targets:
                if target in incoming:
                    incoming[target] -= 1
                    if incoming[target] == 0:
                        ready.append(target)
    for node_id in ids:
        order.setdefault(node_id, len(order))
    return order
