"""Typed rule chains, built only from documents that passed validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node as written: id, registered type, config and relations by label."""

    id: str
    type: str
    config: dict[str, Any] = field(default_factory=dict)
    next: dict[str, tuple[str, ...]] = field(default_factory=dict)
    description: str = ""
    index: int = 0


@dataclass(frozen=True, slots=True)
class Chain:
    """A whole chain: its name, entry node and nodes in file order.

    ``path`` is the file it came from (None for chains built in code); relative
    chain references in ``rule_chain`` nodes resolve against its folder.
    """

    name: str
    entry: str
    nodes: tuple[NodeSpec, ...]
    description: str = ""
    path: Path | None = None

    def node(self, node_id: str) -> NodeSpec:
        """The node with this id; raises KeyError when there is none."""
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    @property
    def folder(self) -> Path:
        """The folder relative chain paths resolve against."""
        return self.path.parent if self.path else Path.cwd()


def relation_targets(value: Any) -> tuple[str, ...]:
    """Normalise a ``next`` value (one id or a list of ids) to a tuple."""
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def build_chain(document: dict[str, Any], path: Path | None = None) -> Chain:
    """Build a Chain from a plain document that has passed the JSON Schema."""
    nodes = tuple(
        NodeSpec(
            id=node["id"],
            type=node["type"],
            config=dict(node.get("config") or {}),
            next={
                label: relation_targets(targets)
                for label, targets in (node.get("next") or {}).items()
            },
            description=node.get("description", ""),
            index=index,
        )
        for index, node in enumerate(document["nodes"])
    )
    return Chain(
        name=document["name"],
        entry=document["entry"],
        nodes=nodes,
        description=document.get("description", ""),
        path=path,
    )
