"""JSON Schema checks of chain documents, with errors located in the YAML file.

The schemas ship inside the package (``edgectl/schemas``): one for the chain
document and one per node type's config. The ``type`` enum of the document
schema is filled from the registry, so the schema and the code cannot drift.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import (  # type: ignore[import-untyped]  # ships no type hints
    Draft202012Validator,
    ValidationError,
)

from edgectl.loader import Document, PathItem, Problem, format_path
from edgectl.registry import NODE_TYPES

# Ids, the entry and relation targets may not start or end with white space.
_TRIMMED = r"^\S(.*\S)?$"


def read_schema(name: str) -> dict[str, Any]:
    """Load a schema file shipped in the package, e.g. ``chain``."""
    text = resources.files("edgectl").joinpath(f"schemas/{name}.schema.json")
    schema: dict[str, Any] = json.loads(text.read_text(encoding="utf-8"))
    return schema


@cache
def _chain_validator() -> Draft202012Validator:
    schema = read_schema("chain")
    node_type = schema["$defs"]["node"]["properties"]["type"]
    node_type["enum"] = sorted(NODE_TYPES)
    return Draft202012Validator(schema)


@cache
def node_validator(node_type: str) -> Draft202012Validator:
    """The validator of one node type's config."""
    return Draft202012Validator(read_schema(f"node-{node_type}"))


def check_document(document: Document) -> list[Problem]:
    """Every schema problem of a chain document, node configs included."""
    problems = list(_problems(document, _chain_validator(), document.plain, []))
    nodes = document.plain.get("nodes") if isinstance(document.plain, dict) else None
    for index, node in enumerate(nodes if isinstance(nodes, list) else []):
        if not isinstance(node, dict) or node.get("type") not in NODE_TYPES:
            continue
        config = node.get("config", {})
        if not isinstance(config, dict):
            continue
        base: list[PathItem] = ["nodes", index, "config"]
        validator = node_validator(node["type"])
        problems.extend(_problems(document, validator, config, base))
    return problems


def _problems(
    document: Document,
    validator: Draft202012Validator,
    instance: Any,
    base: list[PathItem],
) -> Iterator[Problem]:
    for error in validator.iter_errors(instance):
        for leaf in _leaves(error):
            # One error lists every unknown key of a mapping; each is a problem.
            extras: list[str | None] = [*_unknown_keys(leaf)] or [None]
            for extra in extras:
                yield _located(document, leaf, base, extra)


def _leaves(error: ValidationError) -> list[ValidationError]:
    """The most specific errors: for oneOf and anyOf, those of the best branch.

    The best branch reaches deepest into the value; failing that, it is the one
    branch whose type the value has (a list that is empty, a string with the
    wrong shape), so the message says what is wrong with the value as written.
    """
    if error.validator in ("oneOf", "anyOf") and error.context:
        deepest = max(len(sub.absolute_path) for sub in error.context)
        if deepest > len(error.absolute_path):
            return [sub for sub in error.context if len(sub.absolute_path) == deepest]
        fitting = [
            branch
            for branch in _branches(error).values()
            if not any(sub.validator == "type" for sub in branch)
        ]
        if len(fitting) == 1:
            return fitting[0]
    return [error]


def _branches(error: ValidationError) -> dict[Any, list[ValidationError]]:
    branches: dict[Any, list[ValidationError]] = {}
    for sub in error.context or []:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    return branches


def _unknown_keys(error: ValidationError) -> list[str]:
    if error.validator != "additionalProperties" or not isinstance(
        error.instance, dict
    ):
        return []
    allowed = (
        error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
    )
    return sorted(str(key) for key in error.instance if key not in allowed)


def _located(
    document: Document,
    error: ValidationError,
    base: list[PathItem],
    extra: str | None = None,
) -> Problem:
    path: list[PathItem] = [*base, *error.absolute_path]
    message, hint, key = _describe(error, extra)
    if key is not None:
        line, column = document.key_position([*path, key])
        path = [*path, key]
    else:
        line, column = document.position(path)
    return Problem(
        document.file,
        line,
        column,
        "error",
        message,
        node=node_id_at(document.plain, path),
        path=format_path(path),
        hint=hint,
    )


def _describe(
    error: ValidationError, extra: str | None = None
) -> tuple[str, str | None, str | None]:
    """A readable message, a hint, and the key the error is about (if any).

    ``extra`` is the unknown key an additionalProperties error is reported for.
    """
    value, schema = error.instance, error.schema
    if error.validator == "required":
        missing = str(error.message).split("'")[1]
        return f"missing required key '{missing}'", None, None
    if error.validator == "additionalProperties":
        allowed = (
            sorted(schema.get("properties", {})) if isinstance(schema, dict) else []
        )
        return f"unknown key '{extra}'", _closest(str(extra), allowed), extra
    if error.validator in ("minLength", "minItems") and error.validator_value == 1:
        return f"must not be empty, got {_show(value)}", None, None
    if error.validator == "pattern" and error.validator_value == _TRIMMED:
        return f"must not start or end with a space, got {_show(value)}", None, None
    if error.validator in ("oneOf", "anyOf"):
        return _describe_branches(error), None, None
    if error.validator == "enum":
        options = [str(option) for option in error.validator_value]
        hint = _closest(str(value), options) or "one of " + ", ".join(options)
        return f"{_show(value)} is not allowed here", hint, None
    if error.validator == "type":
        return (
            f"must be {_article(error.validator_value)}, got {_show(value)}",
            None,
            None,
        )
    return f"{error.message}", None, None


def _describe_branches(error: ValidationError) -> str:
    """What a value that fits none of the alternatives of a schema should be."""
    branches = list(_branches(error).values())
    if all(len(b) == 1 and b[0].validator == "type" for b in branches):
        kinds = " or ".join(_article(b[0].validator_value) for b in branches)
        return f"must be {kinds}, got {_show(error.instance)}"
    if all(len(b) == 1 and b[0].validator == "required" for b in branches):
        keys = " or ".join(f"'{str(b[0].message).split(chr(39))[1]}'" for b in branches)
        return f"needs at least one of the keys {keys}"
    return f"{_show(error.instance)} fits none of the allowed forms"


def _article(kind: Any) -> str:
    names = {
        "object": "a mapping",
        "array": "a list",
        "string": "a string",
        "integer": "a whole number",
        "boolean": "true or false",
        "number": "a number",
    }
    if isinstance(kind, list):
        return " or ".join(names.get(str(k), str(k)) for k in kind)
    return names.get(str(kind), str(kind))


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _closest(word: str, options: list[str]) -> str | None:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else None


def node_id_at(plain: Any, path: list[PathItem]) -> str | None:
    """The id of the node a path points into, when it points into one."""
    if len(path) < 2 or path[0] != "nodes" or not isinstance(path[1], int):
        return None
    try:
        node_id = plain["nodes"][path[1]]["id"]
    except (KeyError, IndexError, TypeError):
        return None
    return node_id if isinstance(node_id, str) else None
