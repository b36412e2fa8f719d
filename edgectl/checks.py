"""Checking chain files: schema first, then what a schema cannot see.

Semantic checks: duplicate node ids, relations to unknown nodes, a missing
entry node, labels a node can never emit, cycles, called chain files that
cannot be loaded, scripts that do not compile; and as warnings, unreachable
nodes, placeholder nodes, and a chain that pushes to the peer with no route for
deletes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgectl.chain import Chain, build_chain, relation_targets
from edgectl.errors import ChainError, ScriptError
from edgectl.loader import Document, PathItem, Problem, format_path, read_yaml
from edgectl.registry import NODE_TYPES, SCRIPT_TYPES
from edgectl.schema import check_document

_PUSH_TYPES = frozenset({"push_to_cloud", "push_to_edge"})
_DELETE_LABELS = ("Attributes Deleted", "Timeseries Deleted")


def validate_file(
    path: Path, *, compile_scripts: bool = True, callers: tuple[Path, ...] = ()
) -> list[Problem]:
    """Every problem in one chain file, sorted by line.

    Semantic checks run only when the schema check passes, since they rely on
    the document's shape. ``callers`` are the files whose ``rule_chain`` nodes
    led here, so chains that call each other in a loop are reported once.
    """
    document = read_yaml(path)
    if isinstance(document, Problem):
        return [document]
    problems = check_document(document)
    if not any(_is_structural(problem) for problem in problems):
        checker = _Checker(document, path, (*callers, path.resolve()))
        problems += _semantic(checker, compile_scripts)
    return sorted(problems, key=lambda p: (p.line, p.column, p.message))


def _is_structural(problem: Problem) -> bool:
    """True for schema problems that leave the chain's shape unknown.

    Bad configs and unknown types do not stop the semantic checks, so a file's
    every problem is reported in one run.
    """
    return ".config" not in problem.path and not problem.path.endswith(".type")


def load_chain(path: Path) -> Chain:
    """Load a chain file that has no errors (warnings are allowed).

    Raises ChainError listing every error, one ``FILE:LINE:COL`` line each.
    """
    problems = validate_file(path, compile_scripts=False)
    errors = [problem for problem in problems if problem.is_error]
    if errors:
        raise ChainError("\n".join(problem.render() for problem in errors))
    document = read_yaml(path)
    assert isinstance(document, Document)
    return build_chain(document.plain, path)


def _semantic(checker: _Checker, compile_scripts: bool) -> Iterator[Problem]:
    yield from checker.duplicates()
    yield from checker.entry()
    yield from checker.relations()
    yield from checker.cycles()
    yield from checker.unreachable()
    yield from checker.placeholders()
    yield from checker.deletes_stay_local()
    yield from checker.called_chains()
    if compile_scripts:
        yield from checker.scripts()


class _Checker:
    def __init__(self, document: Document, path: Path, stack: tuple[Path, ...]) -> None:
        self.document = document
        self.stack = stack
        self.folder = path.parent
        self.nodes: list[dict[str, Any]] = document.plain["nodes"]
        self.index = {
            node["id"]: i for i, node in reversed(list(enumerate(self.nodes)))
        }

    def problem(
        self,
        path: list[PathItem],
        message: str,
        *,
        hint: str | None = None,
        severity: str = "error",
        at_key: bool = False,
    ) -> Problem:
        where = self.document.key_position if at_key else self.document.position
        line, column = where(path)
        node = None
        if len(path) > 1 and path[0] == "nodes" and isinstance(path[1], int):
            node = self.nodes[path[1]]["id"]
        return Problem(
            self.document.file,
            line,
            column,
            severity,
            message,
            node=node,
            path=format_path(path),
            hint=hint,
        )

    def duplicates(self) -> Iterator[Problem]:
        for i, node in enumerate(self.nodes):
            first = self.index[node["id"]]
            if first != i:
                line, _ = self.document.position(["nodes", first, "id"])
                yield self.problem(
                    ["nodes", i, "id"],
                    f"duplicate node id '{node['id']}'",
                    hint=f"the first node with this id is on line {line}; rename one",
                )

    def entry(self) -> Iterator[Problem]:
        entry = self.document.plain["entry"]
        if entry not in self.index:
            yield self.problem(
                ["entry"],
                f"entry node '{entry}' is not defined",
                hint=_closest(entry, list(self.index)) or "name one of the nodes' ids",
            )

    def relations(self) -> Iterator[Problem]:
        for i, node in enumerate(self.nodes):
            node_type = NODE_TYPES.get(node["type"])
            emitted = (
                node_type.relations(build_chain_node(node, i), self.folder)
                if node_type is not None
                else None
            )
            for label, value in (node.get("next") or {}).items():
                yield from self._label(i, node, label, emitted)
                yield from self._targets(i, label, value)

    def _label(
        self, i: int, node: dict[str, Any], label: str, emitted: frozenset[str] | None
    ) -> Iterator[Problem]:
        if emitted is None or label.lower() in {e.lower() for e in emitted}:
            return
        options = sorted(emitted)
        hint = _closest(label, options) or (
            "it emits " + ", ".join(repr(o) for o in options)
            if options
            else "it emits nothing; remove 'next'"
        )
        yield self.problem(
            ["nodes", i, "next", label],
            f"a {node['type']} node never emits the relation '{label}'",
            hint=hint,
            at_key=True,
        )

    def _targets(self, i: int, label: str, value: Any) -> Iterator[Problem]:
        targets = relation_targets(value)
        for position, target in enumerate(targets):
            if target in self.index:
                continue
            path: list[PathItem] = ["nodes", i, "next", label]
            if isinstance(value, list):
                path.append(position)
            yield self.problem(
                path,
                f"relation '{label}' goes to unknown node '{target}'",
                hint=_closest(target, list(self.index)),
            )

    def cycles(self) -> Iterator[Problem]:
        state: dict[str, int] = {}
        for node in self.nodes:
            yield from self._visit(node["id"], state, [])

    def _visit(
        self, node_id: str, state: dict[str, int], trail: list[str]
    ) -> Iterator[Problem]:
        if state.get(node_id) == 2 or node_id not in self.index:
            return
        state[node_id] = 1
        trail.append(node_id)
        i = self.index[node_id]
        for label, value in (self.nodes[i].get("next") or {}).items():
            for target in relation_targets(value):
                if state.get(target) == 1:
                    loop = " -> ".join([*trail[trail.index(target) :], target])
                    yield self.problem(
                        ["nodes", i, "next", label],
                        f"relation '{label}' closes a cycle: {loop}",
                        hint="a message would loop until the execution limit stops it",
                        at_key=True,
                    )
                else:
                    yield from self._visit(target, state, trail)
        trail.pop()
        state[node_id] = 2

    def unreachable(self) -> Iterator[Problem]:
        entry = self.document.plain["entry"]
        seen, stack = set(), [entry]
        while stack:
            node_id = stack.pop()
            if node_id in seen or node_id not in self.index:
                continue
            seen.add(node_id)
            for value in (self.nodes[self.index[node_id]].get("next") or {}).values():
                stack.extend(relation_targets(value))
        if entry not in self.index:
            return
        for i, node in enumerate(self.nodes):
            if node["id"] not in seen and self.index[node["id"]] == i:
                yield self.problem(
                    ["nodes", i, "id"],
                    f"node '{node['id']}' cannot be reached from the entry '{entry}'",
                    hint="add a relation to it or remove it",
                    severity="warning",
                )

    def placeholders(self) -> Iterator[Problem]:
        for i, node in enumerate(self.nodes):
            if node["type"] == "unsupported":
                kind = _config(node).get("thingsboard_type", "a node")
                yield self.problem(
                    ["nodes", i, "type"],
                    f"placeholder for {kind}, which edgectl cannot run",
                    hint="every message sent to it goes to Failure",
                    severity="warning",
                )

    def deletes_stay_local(self) -> Iterator[Problem]:
        pushes = [i for i, node in enumerate(self.nodes) if node["type"] in _PUSH_TYPES]
        if not pushes:
            return
        routed = {
            label.lower()
            for node in self.nodes
            if node["type"] == "message_type_switch"
            for label in (node.get("next") or {})
        }
        for label in _DELETE_LABELS:
            if label.lower() not in routed:
                yield self.problem(
                    ["nodes", pushes[0], "type"],
                    f"the chain pushes to the peer but routes no '{label}' messages",
                    hint="deletes would stay local; route them to a push node",
                    severity="warning",
                )

    def called_chains(self) -> Iterator[Problem]:
        for i, node in enumerate(self.nodes):
            if node["type"] != "rule_chain":
                continue
            called = _config(node).get("chain")
            if not isinstance(called, str):
                continue
            target = self.folder / called
            if target.resolve() in self.stack:
                yield self.problem(
                    ["nodes", i, "config", "chain"],
                    f"calls {target}, which is already being called: chains "
                    "would call each other forever",
                    hint="break the loop of rule_chain nodes",
                )
                continue
            problems = validate_file(target, compile_scripts=False, callers=self.stack)
            errors = [problem for problem in problems if problem.is_error]
            if errors:
                yield self.problem(
                    ["nodes", i, "config", "chain"],
                    f"called chain {target} has errors: {errors[0].render()}",
                    hint=f"run edgectl validate {target}",
                )

    def scripts(self) -> Iterator[Problem]:
        from edgectl.scripting import ScriptFunction

        for i, node in enumerate(self.nodes):
            script = _config(node).get("script")
            if node["type"] not in SCRIPT_TYPES or not script:
                continue
            try:
                language = str(node["config"].get("language", "javascript"))
                ScriptFunction(script, name=node["id"], language=language).close()
            except ScriptError as error:
                yield self.problem(["nodes", i, "config", "script"], str(error))


def build_chain_node(node: dict[str, Any], index: int) -> Any:
    """A NodeSpec for one plain node, for asking its type about relations."""
    from edgectl.chain import NodeSpec

    return NodeSpec(node["id"], node["type"], _config(node), index=index)


def _config(node: dict[str, Any]) -> dict[str, Any]:
    """A node's config, or an empty one when the schema check already rejected
    it for not being a mapping (the semantic checks still run then)."""
    config = node.get("config")
    return dict(config) if isinstance(config, dict) else {}


def _closest(word: str, options: list[str]) -> str | None:
    lowered = {option.lower(): option for option in options}
    match = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return f"did you mean '{lowered[match[0]]}'?" if match else None
