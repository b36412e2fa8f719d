"""YAML loading that remembers where every key and item came from.

Chains are read with ruamel's round-trip loader, so comments survive when edgectl
rewrites a file and every value keeps its line and column for error messages.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

PathItem = str | int


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding about a file: where, how bad, what and what to try."""

    file: str
    line: int
    column: int
    severity: str
    message: str
    node: str | None = None
    path: str = ""
    hint: str | None = None

    @property
    def is_error(self) -> bool:
        """True unless this is only a warning."""
        return self.severity == "error"

    def render(self) -> str:
        """``FILE:LINE:COL: severity: [node 'id'] path: message; hint: ...``."""
        text = f"{self.file}:{self.line}:{self.column}: {self.severity}: "
        if self.node is not None:
            text += f"node '{self.node}': "
        if self.path:
            text += f"{self.path}: "
        text += self.message
        if self.hint:
            text += f"; hint: {self.hint}"
        return text

    def as_dict(self) -> dict[str, Any]:
        """The problem as plain values for ``--json``."""
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "severity": self.severity,
            "message": self.message,
            "node": self.node,
            "path": self.path,
            "hint": self.hint,
        }


@dataclass(slots=True)
class Document:
    """A parsed YAML file: the round-trip tree, plain values and its name."""

    file: str
    tree: Any
    plain: Any

    def position(self, path: list[PathItem]) -> tuple[int, int]:
        """One-based ``(line, column)`` of the value at ``path``.

        Falls back to the nearest enclosing value that has a recorded position.
        """
        node = self.tree
        line, column = 0, 0
        for item in path:
            found = _child_position(node, item)
            if found is None:
                break
            line, column = found
            node = node[_yaml_key(node, item)]
        return line + 1, column + 1

    def key_position(self, path: list[PathItem]) -> tuple[int, int]:
        """One-based position of the key that holds the value at ``path``."""
        if not path:
            return 1, 1
        parent = self.tree
        for item in path[:-1]:
            try:
                parent = parent[_yaml_key(parent, item)]
            except (KeyError, IndexError, TypeError):
                return self.position(path[:-1])
        key = _yaml_key(parent, path[-1])
        if isinstance(parent, CommentedMap) and key in parent:
            line, column = parent.lc.key(key)
            return line + 1, column + 1
        return self.position(path)


def _yaml_key(node: Any, item: PathItem) -> Any:
    """The key of ``node`` that ``item`` names in the plain document.

    Plain documents have string keys, but YAML reads ``True:`` and ``1:`` as a
    boolean and a number; filter relations are written ``True:`` and ``False:``.
    """
    if not isinstance(node, CommentedMap) or item in node:
        return item
    return next((key for key in node if str(key) == item), item)


def _child_position(node: Any, item: PathItem) -> tuple[int, int] | None:
    try:
        item = _yaml_key(node, item)
        if isinstance(node, CommentedMap) and item in node:
            position: tuple[int, int] = node.lc.value(item)
            return position
        if (
            isinstance(node, CommentedSeq)
            and isinstance(item, int)
            and item < len(node)
        ):
            position = node.lc.item(item)
            return position
    except (KeyError, IndexError, TypeError):
        return None
    return None


def format_path(path: list[PathItem]) -> str:
    """Render a key path as ``nodes[2].config.scope``."""
    text = ""
    for item in path:
        if isinstance(item, int):
            text += f"[{item}]"
        else:
            text += f".{item}" if text else str(item)
    return text


def to_plain(value: Any) -> Any:
    """Convert ruamel's round-trip types to plain dicts, lists and scalars."""
    if isinstance(value, dict):
        return {str(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_plain(item) for item in value]
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    return yaml


def parse_yaml(text: str, file: str) -> Document | Problem:
    """Parse YAML text; return the document, or a problem at the error mark."""
    try:
        tree = _yaml().load(text)
    except MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = f"invalid YAML: {error.problem or error.context}"
        return Problem(file, line, column, "error", message)
    except YAMLError as error:
        return Problem(file, 1, 1, "error", f"invalid YAML: {error}")
    return Document(file, tree, to_plain(tree))


def read_yaml(path: Path) -> Document | Problem:
    """Read and parse a YAML file; an unreadable file is a problem too."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        return Problem(str(path), 1, 1, "error", f"cannot read file: {reason}")
    return parse_yaml(text, str(path))


def dump_yaml(tree: Any) -> str:
    """Serialise a round-trip tree, keeping its comments and key order."""
    yaml = _yaml()
    # Keep the layout people write by hand (lists indented under their key, as
    # in the example chains) and never re-wrap long lines, so that a rewrite
    # changes only what it means to change.
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    stream = io.StringIO()
    yaml.dump(tree, stream)
    return stream.getvalue()
