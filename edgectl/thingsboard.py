"""Import ThingsBoard rule-chain JSON exports as edgectl chains, and export back.

ThingsBoard writes a rule chain as ``{"ruleChain": {...}, "metadata": {...}}``,
or for its metadata API as the bare metadata object: nodes by position, each
with a fully qualified Java class name, and connections ``{fromIndex, toIndex,
type}``. An edgectl chain names its nodes and lists relations by label, so
import turns node names into ids and connections into ``next``; export does the
reverse and lays the nodes out on ThingsBoard's canvas.

A node class edgectl cannot run (or a TBEL script that is not also JavaScript)
fails the import, or with ``allow_unsupported`` becomes an ``unsupported``
placeholder that keeps the class and original configuration, so that export
writes it back as it was. ThingsBoard settings edgectl cannot honour, such as
deduplicated saves, are reported as warnings rather than dropped in silence.
"""

from __future__ import annotations

import io
import json
import logging
import re
import textwrap
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import LiteralScalarString

from edgectl.chain import Chain, NodeSpec
from edgectl.errors import EdgectlError, ScriptError
from edgectl.loader import parse_yaml

logger = logging.getLogger(__name__)

_ENGINE = "org.thingsboard.rule.engine"
MESSAGE_TYPE_SWITCH_CLASS = f"{_ENGINE}.filter.TbMsgTypeSwitchNode"
SAVE_TIMESERIES_CLASS = f"{_ENGINE}.telemetry.TbMsgTimeseriesNode"
SAVE_ATTRIBUTES_CLASS = f"{_ENGINE}.telemetry.TbMsgAttributesNode"
DELETE_ATTRIBUTES_CLASS = f"{_ENGINE}.telemetry.TbMsgDeleteAttributesNode"
PUSH_TO_CLOUD_CLASS = f"{_ENGINE}.edge.TbMsgPushToCloudNode"
PUSH_TO_EDGE_CLASS = f"{_ENGINE}.edge.TbMsgPushToEdgeNode"
FILTER_CLASS = f"{_ENGINE}.filter.TbJsFilterNode"
SWITCH_CLASS = f"{_ENGINE}.filter.TbJsSwitchNode"
TRANSFORM_CLASS = f"{_ENGINE}.transform.TbTransformMsgNode"
LOG_CLASS = f"{_ENGINE}.action.TbLogNode"
RULE_CHAIN_INPUT_CLASS = f"{_ENGINE}.flow.TbRuleChainInputNode"
RULE_CHAIN_OUTPUT_CLASS = f"{_ENGINE}.flow.TbRuleChainOutputNode"
CHECK_MESSAGE_CLASS = f"{_ENGINE}.filter.TbCheckMessageNode"

# The script a new ThingsBoard log node gets, in both languages. A log node with
# it logs data and metadata without running a script, as edgectl's log does.
DEFAULT_LOG_SCRIPT = (
    "return '\\nIncoming message:\\n' + JSON.stringify(msg) + "
    "'\\nIncoming metadata:\\n' + JSON.stringify(metadata);"
)

_SCOPES = {"CLIENT_SCOPE": "client", "SERVER_SCOPE": "server", "SHARED_SCOPE": "shared"}
_EVERY_MESSAGE = "ON_EVERY_MESSAGE"
_SCRIPT_TYPES = {
    FILTER_CLASS: "filter",
    SWITCH_CLASS: "switch",
    TRANSFORM_CLASS: "transform",
    LOG_CLASS: "log",
}
# Why edgectl cannot run node classes that ThingsBoard's own chains use often.
_UNSUPPORTED_REASONS = {
    f"{_ENGINE}.rpc.TbSendRPCRequestNode": (
        "edgectl does not send RPC requests to devices"
    ),
    f"{_ENGINE}.rpc.TbSendRPCReplyNode": "edgectl does not answer device RPC requests",
    f"{_ENGINE}.profile.TbDeviceProfileNode": (
        "edgectl does not evaluate device profile alarm rules"
    ),
    f"{_ENGINE}.transform.TbChangeOriginatorNode": (
        "edgectl cannot change a message's originator"
    ),
}
# Calls that TBEL (MVEL, on Java objects) allows and JavaScript values lack even
# with the TBEL prelude of edgectl.scripting: a TBEL script using them compiles
# as JavaScript and then throws at run time.
_JAVA_METHODS = re.compile(r"\.(length|keySet|put|getOrDefault)\s*\(")


class ThingsBoardImportError(EdgectlError):
    """A ThingsBoard rule-chain export cannot be turned into an edgectl chain."""


class ThingsBoardExportError(EdgectlError):
    """An edgectl chain holds nodes that ThingsBoard has no node class for."""


@dataclass(frozen=True, slots=True)
class UnsupportedNode:
    """A ThingsBoard node edgectl cannot run: where it is, its class and why."""

    name: str
    index: int
    type: str
    reason: str

    def describe(self) -> str:
        """``node 5 'RPC Call Request' (org...TbSendRPCRequestNode): reason``."""
        return f"node {self.index} '{self.name}' ({self.type}): {self.reason}"


@dataclass(frozen=True, slots=True)
class ImportResult:
    """An imported chain: YAML text to write, the plain document, and findings.

    ``unsupported`` lists the nodes written as placeholders; ``warnings`` says,
    one sentence each, where the chain will run differently from ThingsBoard
    (settings edgectl does not honour, TBEL calls JavaScript lacks).
    """

    yaml: str
    document: dict[str, Any]
    unsupported: tuple[UnsupportedNode, ...] = ()
    warnings: tuple[str, ...] = ()


class _NotSupported(Exception):
    """Raised by a node converter: edgectl cannot run this node as configured."""


@dataclass(slots=True)
class _Node:
    """One ThingsBoard node as read, and the warnings its conversion gave."""

    index: int
    name: str
    type: str
    config: dict[str, Any]
    version: int
    warnings: list[str] = field(default_factory=list)

    def warn(self, text: str) -> None:
        self.warnings.append(f"node {self.index} '{self.name}': {text}")


# -- import -----------------------------------------------------------------


def import_file(path: Path, *, allow_unsupported: bool = False) -> ImportResult:
    """Read a ThingsBoard JSON export and import it; see ``import_chain``.

    Raises ThingsBoardImportError when the file cannot be read, is not JSON,
    or cannot be imported.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ThingsBoardImportError(f"cannot read {path}: {reason}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ThingsBoardImportError(
            f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}; "
            "export the rule chain again from ThingsBoard"
        ) from error
    if not isinstance(data, dict):
        raise ThingsBoardImportError(
            f"{path}: expected a JSON object with 'ruleChain' and 'metadata', "
            f"got a JSON {type(data).__name__}"
        )
    return import_chain(data, source=str(path), allow_unsupported=allow_unsupported)


def import_chain(
    data: dict[str, Any], *, source: str, allow_unsupported: bool
) -> ImportResult:
    """Turn a ThingsBoard rule chain export into an edgectl chain document.

    ``data`` is the ``{"ruleChain", "metadata"}`` export or a bare metadata
    object; ``source`` names it in messages and in the YAML header. Node names
    become unique slug ids, connections become ``next`` relations and the
    first node the entry; layout and debug settings are dropped.

    Raises ThingsBoardImportError when the data is not a rule chain, or when
    nodes cannot be run and ``allow_unsupported`` is false: the message lists
    every such node by name, position and class.
    """
    rule_chain, metadata = _split(data, source)
    raw_nodes = _raw_nodes(metadata, source)
    nodes = [_read_node(raw, index) for index, raw in enumerate(raw_nodes)]
    ids = unique_ids(node.name for node in nodes)

    items: list[dict[str, Any]] = []
    unsupported: list[UnsupportedNode] = []
    for node, node_id, raw in zip(nodes, ids, raw_nodes, strict=True):
        item, problem = _convert(node, node_id, raw)
        items.append(item)
        if problem is not None:
            unsupported.append(problem)
    if unsupported and not allow_unsupported:
        raise ThingsBoardImportError(_unsupported_message(source, unsupported))

    warnings = [warning for node in nodes for warning in node.warnings]
    _add_relations(items, metadata, source)
    entry = _entry(metadata, ids, source, warnings)
    document = _document(rule_chain, source, entry, items)
    header = _header(source, rule_chain, unsupported, warnings, ids)
    return ImportResult(
        render_yaml(document, header), document, tuple(unsupported), tuple(warnings)
    )


def _split(data: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ruleChain object (empty for bare metadata) and the metadata object."""
    if "metadata" not in data and "nodes" in data:
        return {}, data
    rule_chain, metadata = data.get("ruleChain"), data.get("metadata")
    if not isinstance(metadata, dict):
        raise ThingsBoardImportError(
            f"{source}: no 'metadata' object with the chain's nodes; expected a "
            'ThingsBoard rule chain export ({"ruleChain": ..., "metadata": '
            '...}) or its bare metadata ({"nodes": ..., "connections": ...})'
        )
    if rule_chain is not None and not isinstance(rule_chain, dict):
        raise ThingsBoardImportError(
            f"{source}: 'ruleChain' must be an object, got {json.dumps(rule_chain)}"
        )
    return rule_chain or {}, metadata


def _raw_nodes(metadata: dict[str, Any], source: str) -> list[dict[str, Any]]:
    nodes = metadata.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise ThingsBoardImportError(
            f"{source}: metadata.nodes is empty or missing; an edgectl chain needs "
            "at least one node, so add nodes in ThingsBoard and export again"
        )
    for index, node in enumerate(nodes):
        if not isinstance(node, dict) or not isinstance(node.get("type"), str):
            raise ThingsBoardImportError(
                f"{source}: metadata.nodes[{index}] has no 'type' naming its "
                "ThingsBoard node class; export the rule chain again"
            )
    legacy = metadata.get("ruleChainConnections") or []
    return [*nodes, *(_legacy_call(call) for call in legacy)]


def _legacy_call(call: Any) -> dict[str, Any]:
    """The input node ThingsBoard's importer makes of an old chain connection."""
    target = call.get("targetRuleChainId") if isinstance(call, dict) else None
    target_id = target.get("id") if isinstance(target, dict) else target
    info = call.get("additionalInfo") if isinstance(call, dict) else None
    name = info.get("ruleChainNodeName") if isinstance(info, dict) else None
    return {
        "type": RULE_CHAIN_INPUT_CLASS,
        "name": name or f"Rule chain {target_id}",
        "configuration": {"ruleChainId": target_id},
    }


def _read_node(raw: dict[str, Any], index: int) -> _Node:
    name = raw.get("name")
    config = raw.get("configuration")
    version = raw.get("configurationVersion")
    return _Node(
        index=index,
        name=name if isinstance(name, str) and name.strip() else f"node {index}",
        type=raw["type"],
        config=config if isinstance(config, dict) else {},
        version=version if isinstance(version, int) else 0,
    )


def slugify(name: str) -> str:
    """A readable id for a node name: ``Save Timeseries`` → ``save-timeseries``.

    Runs of anything but letters and digits become one dash; an empty result
    becomes ``node``.
    """
    return re.sub(r"[\W_]+", "-", name.lower()).strip("-") or "node"


def unique_ids(names: Iterable[str]) -> list[str]:
    """Slug ids for names in order, later repeats numbered ``-2``, ``-3``..."""
    ids: list[str] = []
    taken: set[str] = set()
    for name in names:
        base = slugify(name)
        candidate, number = base, 2
        while candidate in taken:
            candidate, number = f"{base}-{number}", number + 1
        taken.add(candidate)
        ids.append(candidate)
    return ids


def _convert(
    node: _Node, node_id: str, raw: dict[str, Any]
) -> tuple[dict[str, Any], UnsupportedNode | None]:
    """The edgectl node for a ThingsBoard node, and why it is a placeholder."""
    item: dict[str, Any] = {"id": node_id}
    converter = _CONVERTERS.get(node.type)
    try:
        if converter is None:
            reason = _UNSUPPORTED_REASONS.get(node.type, "edgectl has no such node")
            raise _NotSupported(reason)
        item["type"], config = converter(node)
        problem = None
    except _NotSupported as error:
        node.warnings.clear()
        problem = UnsupportedNode(node.name, node.index, node.type, str(error))
        item["type"] = "unsupported"
        original = raw.get("configuration")
        config = {
            "thingsboard_type": node.type,
            "reason": problem.reason,
            "original": original if isinstance(original, dict) else {},
        }
        if node.version:
            config["configuration_version"] = node.version
    description = _description(raw)
    if description:
        item["description"] = description
    if config:
        item["config"] = config
    logger.debug("node %d %r (%s) -> %s", node.index, node.name, node.type, item)
    return item, problem


def _description(raw: dict[str, Any]) -> str:
    info = raw.get("additionalInfo")
    text = info.get("description") if isinstance(info, dict) else None
    return text if isinstance(text, str) and text.strip() else ""


def _message_type_switch(node: _Node) -> tuple[str, dict[str, Any]]:
    return "message_type_switch", {}


def _save_timeseries(node: _Node) -> tuple[str, dict[str, Any]]:
    raw = node.config.get("defaultTTL")
    ttl = _seconds(0 if raw is None else raw)
    if ttl is None:
        raise _NotSupported(
            f"defaultTTL must be a whole number of seconds, got {json.dumps(raw)}"
        )
    return "save_timeseries", {
        "latest": _latest(node),
        "ttl": ttl,
        "use_server_ts": _flag(node, "useServerTs", default=False),
    }


def _seconds(value: Any) -> int | None:
    """A non-negative whole number, as Jackson reads one from JSON or text."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _latest(node: _Node) -> str:
    """edgectl's ``latest`` for a save-timeseries node's processing settings.

    Nodes older than configuration version 1 have ``skipLatestPersistence``
    instead of processing settings; ThingsBoard upgrades ``true`` to
    ``ADVANCED`` with ``latest: SKIP``.
    """
    settings = node.config.get("processingSettings")
    if not isinstance(settings, dict):
        skips = _flag(node, "skipLatestPersistence", default=False)
        return "skip" if skips else "on_every_message"
    kind = settings.get("type")
    if kind != "ADVANCED":
        _check_settings(node, kind, settings)
        return "on_every_message"
    if _strategy(settings, "timeseries") != _EVERY_MESSAGE:
        node.warn(
            f"ThingsBoard saves history {_strategy_text(settings, 'timeseries')}; "
            "edgectl saves it for every message"
        )
    latest = _strategy(settings, "latest")
    if latest == "SKIP":
        return "skip"
    if latest != _EVERY_MESSAGE:
        node.warn(
            f"ThingsBoard saves latest values {_strategy_text(settings, 'latest')}; "
            "edgectl saves them for every message"
        )
    return "on_every_message"


def _check_settings(node: _Node, kind: Any, settings: dict[str, Any]) -> None:
    """Warn about a processing settings type edgectl does not honour."""
    if kind == _EVERY_MESSAGE:
        return
    if kind == "DEDUPLICATE":
        seconds = settings.get("deduplicationIntervalSecs")
        node.warn(
            "processing settings DEDUPLICATE: ThingsBoard saves only the first "
            f"message per originator every {seconds} s; edgectl saves every message"
        )
    elif kind == "WEBSOCKETS_ONLY":
        node.warn(
            "processing settings WEBSOCKETS_ONLY: ThingsBoard only notifies "
            "WebSocket subscribers and saves nothing; edgectl has no WebSocket "
            "subscriptions and saves every message"
        )
    else:
        raise _NotSupported(f"unknown processing settings type {json.dumps(kind)}")


def _strategy(settings: dict[str, Any], target: str) -> Any:
    strategy = settings.get(target)
    return strategy.get("type") if isinstance(strategy, dict) else _EVERY_MESSAGE


def _strategy_text(settings: dict[str, Any], target: str) -> str:
    kind = _strategy(settings, target)
    if kind == "SKIP":
        return "never"
    strategy = settings.get(target)
    seconds = (
        strategy.get("deduplicationIntervalSecs")
        if isinstance(strategy, dict)
        else None
    )
    if kind == "DEDUPLICATE":
        return f"once per originator every {seconds} s"
    return f"with strategy {kind}"


def _save_attributes(node: _Node) -> tuple[str, dict[str, Any]]:
    settings = node.config.get("processingSettings")
    if isinstance(settings, dict):
        if settings.get("type") == "ADVANCED":
            if _strategy(settings, "attributes") != _EVERY_MESSAGE:
                node.warn(
                    "ThingsBoard saves attributes "
                    f"{_strategy_text(settings, 'attributes')}; edgectl saves "
                    "them for every message"
                )
        else:
            _check_settings(node, settings.get("type"), settings)
    _warn_notify_device(node)
    # ThingsBoard's upgrade from version 0 sets a missing flag to false (the
    # old behaviour); from later versions a missing flag means true.
    only_on_change = _flag(
        node, "updateAttributesOnlyOnValueChange", default=node.version > 0
    )
    return "save_attributes", {
        "scope": _scope(node),
        "update_only_on_change": only_on_change,
        "notify_attributes_updated": _flag(
            node, "sendAttributesUpdatedNotification", default=False
        ),
    }


def _delete_attributes(node: _Node) -> tuple[str, dict[str, Any]]:
    keys = node.config.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise _NotSupported(f"keys must be a list of names, got {json.dumps(keys)}")
    keys = [key for key in keys if key.strip()]
    if not keys:
        raise _NotSupported("it lists no keys to delete")
    _warn_notify_device(node)
    return "delete_attributes", {
        "scope": _scope(node),
        "keys": keys,
        "notify_attributes_deleted": _flag(
            node, "sendAttributesDeletedNotification", default=False
        ),
    }


def _warn_notify_device(node: _Node) -> None:
    if node.config.get("notifyDevice") in (True, "true"):
        node.warn("notifyDevice: edgectl does not push attribute changes to devices")


def _push(kind: str) -> Callable[[_Node], tuple[str, dict[str, Any]]]:
    def convert(node: _Node) -> tuple[str, dict[str, Any]]:
        return kind, {"scope": _scope(node)}

    return convert


def _scope(node: _Node) -> str:
    raw = node.config.get("scope") or "SERVER_SCOPE"
    scope = _SCOPES.get(raw) if isinstance(raw, str) else None
    if scope is None:
        raise _NotSupported(
            f"scope {json.dumps(raw)} is not CLIENT_SCOPE, SERVER_SCOPE or SHARED_SCOPE"
        )
    return scope


def _flag(node: _Node, key: str, *, default: bool) -> bool:
    """A boolean setting; old exports write them as strings, or null."""
    value = node.config.get(key)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return default


def _script(node: _Node) -> tuple[str, dict[str, Any]]:
    """A filter, switch, transform or log node: the script for its language."""
    kind = _SCRIPT_TYPES[node.type]
    language = node.config.get("scriptLang") or "JS"
    if language not in ("JS", "TBEL"):
        raise _NotSupported(f"scriptLang {json.dumps(language)} is not JS or TBEL")
    field_name = "tbelScript" if language == "TBEL" else "jsScript"
    value = node.config.get(field_name)
    script = value if isinstance(value, str) else ""
    if kind == "log" and script.strip() in ("", DEFAULT_LOG_SCRIPT):
        return kind, {}
    if not script.strip():
        raise _NotSupported(f"scriptLang is {language} but {field_name} is empty")
    if language == "JS":
        return kind, {"script": script}
    _check_tbel(node, script)
    return kind, {"script": script, "language": "tbel"}


def _check_tbel(node: _Node, script: str) -> None:
    """Refuse a TBEL script that is not JavaScript; warn about Java calls."""
    from edgectl.scripting import ScriptFunction

    try:
        ScriptFunction(script, name=node.name, language="tbel").close()
    except ScriptError as error:
        raise _NotSupported(
            f"its TBEL script is not valid JavaScript: {_compile_error(error)}"
        ) from None
    found = _JAVA_METHODS.search(script)
    if found:
        node.warn(
            f"the TBEL script calls .{found[1]}(), a Java method that JavaScript "
            "values lack, so it fails at run time; rewrite that call in "
            "JavaScript (for example a === b for a.equals(b))"
        )


def _compile_error(error: ScriptError) -> str:
    """The JavaScript error and excerpt, without the advice to fix JavaScript."""
    lines = [
        line for line in str(error).splitlines() if not line.startswith("Fix the ")
    ]
    text = "\n".join(lines)
    _, found, detail = text.partition(" does not compile: ")
    return detail if found else text


def _rule_chain_input(node: _Node) -> tuple[str, dict[str, Any]]:
    target = node.config.get("ruleChainId")
    raise _NotSupported(
        f"it calls ThingsBoard rule chain {target}, which edgectl cannot locate; "
        "import that chain too and replace this node with a rule_chain node "
        "naming its file"
    )


def _rule_chain_output(node: _Node) -> tuple[str, dict[str, Any]]:
    # ThingsBoard returns to the calling chain with the output node's name as
    # the relation.
    return "output", {"relation": node.name}


def _check_message(node: _Node) -> tuple[str, dict[str, Any]]:
    config: dict[str, Any] = {
        "data_keys": [str(k) for k in node.config.get("messageNames") or []],
        "metadata_keys": [str(k) for k in node.config.get("metadataNames") or []],
        "all": bool(node.config.get("checkAllKeys", False)),
    }
    return "check_message", config


_CONVERTERS: dict[str, Callable[[_Node], tuple[str, dict[str, Any]]]] = {
    MESSAGE_TYPE_SWITCH_CLASS: _message_type_switch,
    SAVE_TIMESERIES_CLASS: _save_timeseries,
    SAVE_ATTRIBUTES_CLASS: _save_attributes,
    DELETE_ATTRIBUTES_CLASS: _delete_attributes,
    PUSH_TO_CLOUD_CLASS: _push("push_to_cloud"),
    PUSH_TO_EDGE_CLASS: _push("push_to_edge"),
    FILTER_CLASS: _script,
    SWITCH_CLASS: _script,
    TRANSFORM_CLASS: _script,
    LOG_CLASS: _script,
    RULE_CHAIN_INPUT_CLASS: _rule_chain_input,
    RULE_CHAIN_OUTPUT_CLASS: _rule_chain_output,
    CHECK_MESSAGE_CLASS: _check_message,
}


def _unsupported_message(source: str, nodes: list[UnsupportedNode]) -> str:
    listing = "\n".join(
        "  - " + node.describe().replace("\n", "\n    ") for node in nodes
    )
    return (
        f"{source}: {len(nodes)} node(s) cannot run in edgectl:\n{listing}\n"
        "Import with --allow-unsupported to write placeholder nodes that send "
        "every message to Failure, so the rest of the chain runs; or replace "
        "these nodes in ThingsBoard and export again."
    )


def _add_relations(
    items: list[dict[str, Any]], metadata: dict[str, Any], source: str
) -> None:
    """Turn connections into each node's ``next``, labels in file order.

    ThingsBoard matches labels case-insensitively, so labels that differ only
    in case are one relation, spelt as first seen.
    """
    for position, (start, end, label) in enumerate(_connections(metadata, source)):
        if not 0 <= start < len(items) or not 0 <= end < len(items):
            raise ThingsBoardImportError(
                f"{source}: metadata.connections[{position}] links node {start} to "
                f"node {end}, but the chain has nodes 0 to {len(items) - 1}; "
                "export the rule chain again"
            )
        relations = items[start].setdefault("next", {})
        spelt = next((k for k in relations if k.lower() == label.lower()), label)
        targets = relations.setdefault(spelt, [])
        if items[end]["id"] not in targets:
            targets.append(items[end]["id"])
    for item in items:
        for label, targets in item.get("next", {}).items():
            item["next"][label] = targets[0] if len(targets) == 1 else targets


def _connections(
    metadata: dict[str, Any], source: str
) -> Iterator[tuple[int, int, str]]:
    connections = metadata.get("connections") or []
    base = len(metadata.get("nodes") or [])
    legacy = metadata.get("ruleChainConnections") or []
    for position, link in enumerate(connections):
        start = link.get("fromIndex") if isinstance(link, dict) else None
        end = link.get("toIndex") if isinstance(link, dict) else None
        label = link.get("type") if isinstance(link, dict) else None
        if not (isinstance(start, int) and isinstance(end, int)) or not (
            isinstance(label, str) and label.strip()
        ):
            raise ThingsBoardImportError(
                f"{source}: metadata.connections[{position}] needs integer "
                "fromIndex and toIndex and a non-empty type, got "
                f"{json.dumps(link)}"
            )
        yield start, end, label.strip()
    for offset, call in enumerate(legacy):
        start = call.get("fromIndex") if isinstance(call, dict) else None
        label = call.get("type") if isinstance(call, dict) else None
        if isinstance(start, int) and isinstance(label, str) and label.strip():
            yield start, base + offset, label.strip()


def _entry(
    metadata: dict[str, Any], ids: list[str], source: str, warnings: list[str]
) -> str:
    first = metadata.get("firstNodeIndex")
    if first is None:
        warnings.append(
            f"the chain has no firstNodeIndex; node 0 '{ids[0]}' is the entry"
        )
        return ids[0]
    if not isinstance(first, int) or not 0 <= first < len(ids):
        raise ThingsBoardImportError(
            f"{source}: metadata.firstNodeIndex is {json.dumps(first)}, but the "
            f"chain has nodes 0 to {len(ids) - 1}; set the first node in "
            "ThingsBoard and export again"
        )
    return ids[first]


def _document(
    rule_chain: dict[str, Any], source: str, entry: str, items: list[dict[str, Any]]
) -> dict[str, Any]:
    name = rule_chain.get("name")
    if not isinstance(name, str) or not name.strip():
        name = Path(source).stem or "Imported rule chain"
    document: dict[str, Any] = {"name": name}
    description = _description(rule_chain)
    if description:
        document["description"] = description
    document["entry"] = entry
    document["nodes"] = items
    return document


def _header(
    source: str,
    rule_chain: dict[str, Any],
    unsupported: list[UnsupportedNode],
    warnings: list[str],
    ids: list[str],
) -> str:
    if rule_chain:
        kind = rule_chain.get("type") or "CORE"
        what = f"ThingsBoard rule chain '{rule_chain.get('name')}', type {kind}"
    else:
        what = "bare ThingsBoard rule chain metadata"
    lines = textwrap.wrap(
        f"Imported from {source} by `edgectl import thingsboard` ({what}).",
        86,
        break_long_words=False,
        break_on_hyphens=False,
    )
    if unsupported:
        lines += ["", "Placeholders: every message sent to them goes to Failure."]
        lines += [
            f"  {ids[node.index]}: {node.type.rsplit('.', 1)[-1]} "
            f"(node {node.index} '{node.name}')"
            for node in unsupported
        ]
    if warnings:
        lines += ["", "Import warnings:"]
        for warning in warnings:
            lines += textwrap.wrap(
                warning, width=84, initial_indent="- ", subsequent_indent="  "
            )
    return "\n".join(lines)


# -- YAML --------------------------------------------------------------------


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 88
    return yaml


def render_yaml(document: dict[str, Any], header: str = "") -> str:
    """A chain document as YAML: scripts as blocks, a blank line between nodes.

    ``header`` becomes a comment at the top. Scripts that a literal block
    cannot hold exactly (trailing spaces, say) are written quoted instead.
    """
    text = _dump(document, header, literal=True)
    parsed = parse_yaml(text, "<chain>")
    if getattr(parsed, "plain", None) == document:
        return text
    return _dump(document, header, literal=False)


def _dump(document: dict[str, Any], header: str, *, literal: bool) -> str:
    tree = _tree(document, literal)
    nodes = tree["nodes"]
    for index in range(1, len(nodes)):
        nodes.yaml_set_comment_before_after_key(index, before="\n")
    if header:
        tree.yaml_set_start_comment(header)
    stream = io.StringIO()
    _yaml().dump(tree, stream)
    return stream.getvalue()


def _tree(value: Any, literal: bool) -> Any:
    if isinstance(value, dict):
        tree = CommentedMap()
        for key, item in value.items():
            tree[key] = _tree(item, literal)
        return tree
    if isinstance(value, list):
        return CommentedSeq(_tree(item, literal) for item in value)
    if literal and isinstance(value, str) and "\n" in value:
        return LiteralScalarString(value)
    return value


# -- export ------------------------------------------------------------------

_EXPORT_CLASSES = {
    "message_type_switch": MESSAGE_TYPE_SWITCH_CLASS,
    "save_timeseries": SAVE_TIMESERIES_CLASS,
    "save_attributes": SAVE_ATTRIBUTES_CLASS,
    "delete_attributes": DELETE_ATTRIBUTES_CLASS,
    "push_to_cloud": PUSH_TO_CLOUD_CLASS,
    "push_to_edge": PUSH_TO_EDGE_CLASS,
    "filter": FILTER_CLASS,
    "switch": SWITCH_CLASS,
    "transform": TRANSFORM_CLASS,
    "log": LOG_CLASS,
    "output": RULE_CHAIN_OUTPUT_CLASS,
    "check_message": CHECK_MESSAGE_CLASS,
}
_NO_EQUIVALENT = {
    "delete_timeseries": "ThingsBoard applies timeseries deletes from its peer "
    "without a rule node; remove the node and its relations before exporting",
    "rule_chain": "ThingsBoard calls other chains by their id in its database; "
    "remove the node, export, and add a rule chain node in ThingsBoard's editor",
}


def export_file(path: Path) -> str:
    """Load a chain file and return ThingsBoard's import JSON for it, as text.

    Raises ChainError if the chain has errors and ThingsBoardExportError as
    ``export_chain`` does.
    """
    from edgectl.checks import load_chain

    document = export_chain(load_chain(path))
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def export_chain(chain: Chain) -> dict[str, Any]:
    """ThingsBoard's ``{"ruleChain", "metadata"}`` import JSON for a chain.

    Nodes get their ThingsBoard class, configuration and configuration
    version, a name made from the id, and a place on the canvas by depth from
    the entry; placeholders get back their original class and configuration.
    The chain is EDGE type when it pushes to the cloud, else CORE.

    Raises ThingsBoardExportError naming every node ThingsBoard cannot hold.
    """
    _check_exportable(chain)
    index = {node.id: position for position, node in enumerate(chain.nodes)}
    layout = _layout(chain)
    nodes = [_export_node(node, layout[node.id]) for node in chain.nodes]
    connections = [
        {"fromIndex": index[node.id], "toIndex": index[target], "type": label}
        for node in chain.nodes
        for label, targets in node.next.items()
        for target in targets
    ]
    is_edge = any(node.type == "push_to_cloud" for node in chain.nodes)
    return {
        "ruleChain": {
            "name": chain.name,
            "type": "EDGE" if is_edge else "CORE",
            "firstRuleNodeId": None,
            "root": False,
            "debugMode": False,
            "configuration": None,
            "additionalInfo": (
                {"description": chain.description} if chain.description else None
            ),
        },
        "metadata": {
            "firstNodeIndex": index[chain.entry],
            "nodes": nodes,
            "connections": connections,
            "ruleChainConnections": None,
        },
    }


def _check_exportable(chain: Chain) -> None:
    problems = []
    for position, node in enumerate(chain.nodes):
        if node.type in _NO_EQUIVALENT:
            reason = _NO_EQUIVALENT[node.type]
        elif node.type == "unsupported" and not node.config.get("thingsboard_type"):
            reason = "a placeholder without thingsboard_type has no class to write"
        else:
            continue
        problems.append(f"  - node {position} '{node.id}' ({node.type}): {reason}")
    if problems:
        raise ThingsBoardExportError(
            f"chain '{chain.name}' has node(s) ThingsBoard cannot hold:\n"
            + "\n".join(problems)
        )


def _layout(chain: Chain) -> dict[str, tuple[int, int]]:
    """Canvas positions: a column per step from the entry, rows in file order."""
    depth = {chain.entry: 0}
    queue = [chain.entry]
    while queue:
        node = chain.node(queue.pop(0))
        for targets in node.next.values():
            for target in targets:
                if target not in depth:
                    depth[target] = depth[node.id] + 1
                    queue.append(target)
    last = max(depth.values()) + 1
    rows: dict[int, int] = {}
    layout = {}
    for node in chain.nodes:
        column = depth.get(node.id, last)
        row = rows[column] = rows.get(column, -1) + 1
        layout[node.id] = (350 + 300 * column, 150 + 100 * row)
    return layout


def _export_node(node: NodeSpec, position: tuple[int, int]) -> dict[str, Any]:
    if node.type == "unsupported":
        kind = str(node.config["thingsboard_type"])
        version = int(node.config.get("configuration_version", 0))
        configuration = dict(node.config.get("original") or {})
    else:
        kind = _EXPORT_CLASSES[node.type]
        configuration, version = _EXPORTERS[node.type](node)
    info: dict[str, Any] = {"layoutX": position[0], "layoutY": position[1]}
    if node.description:
        info["description"] = node.description
    return {
        "type": kind,
        "name": _node_name(node),
        "debugSettings": None,
        "singletonMode": False,
        "queueName": None,
        "configurationVersion": version,
        "configuration": configuration,
        "additionalInfo": info,
    }


def _node_name(node: NodeSpec) -> str:
    """A ThingsBoard name that imports back to the same id.

    An output node's name is the relation it returns with, as in ThingsBoard.
    """
    if node.type == "output":
        return str(node.config.get("relation", "Success"))
    if slugify(node.id) != node.id:
        return node.id
    words = node.id.replace("-", " ")
    return words[:1].upper() + words[1:]


def _every(kind: str = _EVERY_MESSAGE) -> dict[str, str]:
    return {"type": kind}


def _export_save_timeseries(node: NodeSpec) -> tuple[dict[str, Any], int]:
    if node.config.get("latest", "on_every_message") == "skip":
        settings: dict[str, Any] = {
            "type": "ADVANCED",
            "timeseries": _every(),
            "latest": _every("SKIP"),
            "webSockets": _every(),
            "calculatedFields": _every(),
        }
    else:
        settings = _every()
    configuration = {
        "defaultTTL": int(node.config.get("ttl", 0)),
        "useServerTs": bool(node.config.get("use_server_ts", False)),
        "processingSettings": settings,
    }
    return configuration, 1


def _tb_scope(node: NodeSpec) -> str:
    return f"{str(node.config.get('scope', 'server')).upper()}_SCOPE"


def _export_save_attributes(node: NodeSpec) -> tuple[dict[str, Any], int]:
    configuration = {
        "scope": _tb_scope(node),
        "notifyDevice": False,
        "sendAttributesUpdatedNotification": bool(
            node.config.get("notify_attributes_updated", False)
        ),
        "updateAttributesOnlyOnValueChange": bool(
            node.config.get("update_only_on_change", True)
        ),
        "processingSettings": _every(),
    }
    return configuration, 3


def _export_delete_attributes(node: NodeSpec) -> tuple[dict[str, Any], int]:
    configuration = {
        "scope": _tb_scope(node),
        "keys": list(node.config.get("keys", [])),
        "sendAttributesDeletedNotification": bool(
            node.config.get("notify_attributes_deleted", False)
        ),
        "notifyDevice": False,
    }
    return configuration, 0


def _export_push(node: NodeSpec) -> tuple[dict[str, Any], int]:
    return {"scope": _tb_scope(node)}, 0


def _export_version_only(node: NodeSpec) -> tuple[dict[str, Any], int]:
    return {"version": 0}, 0


def _export_script(node: NodeSpec) -> tuple[dict[str, Any], int]:
    """Both script fields hold the script; ThingsBoard runs the one for its
    language. A log node without a script gets ThingsBoard's default."""
    if "timeout_ms" in node.config:
        logger.warning(
            "node %r: timeout_ms is not exported; ThingsBoard uses its own "
            "server-wide script time limit",
            node.id,
        )
    script = node.config.get("script") or DEFAULT_LOG_SCRIPT
    is_tbel = node.config.get("language") == "tbel" or "script" not in node.config
    configuration = {
        "scriptLang": "TBEL" if is_tbel else "JS",
        "jsScript": script,
        "tbelScript": script,
    }
    return configuration, 0


def _export_check_message(node: NodeSpec) -> tuple[dict[str, Any], int]:
    configuration = {
        "messageNames": list(node.config.get("data_keys", [])),
        "metadataNames": list(node.config.get("metadata_keys", [])),
        "checkAllKeys": bool(node.config.get("all", False)),
    }
    return configuration, 0


_EXPORTERS: dict[str, Callable[[NodeSpec], tuple[dict[str, Any], int]]] = {
    "message_type_switch": _export_version_only,
    "save_timeseries": _export_save_timeseries,
    "save_attributes": _export_save_attributes,
    "delete_attributes": _export_delete_attributes,
    "push_to_cloud": _export_push,
    "push_to_edge": _export_push,
    "filter": _export_script,
    "switch": _export_script,
    "transform": _export_script,
    "log": _export_script,
    "output": _export_version_only,
    "check_message": _export_check_message,
}
