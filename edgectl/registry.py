"""The table of node types: chain ``type`` names to the classes that run them.

The table is filled by explicit imports; the valid ``type`` values, and the
config schema for each, are derived from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgectl.chain import Chain, NodeSpec
from edgectl.nodes.base import BaseNode
from edgectl.nodes.check_message import CheckMessage
from edgectl.nodes.delete_attributes import DeleteAttributes
from edgectl.nodes.delete_timeseries import DeleteTimeseries
from edgectl.nodes.message_type_switch import MessageTypeSwitch
from edgectl.nodes.push import PushToCloud, PushToEdge
from edgectl.nodes.rule_chain import Output, RuleChainCall
from edgectl.nodes.save_attributes import SaveAttributes
from edgectl.nodes.save_timeseries import SaveTimeseries
from edgectl.nodes.script import Filter, Log, Switch, Transform
from edgectl.nodes.unsupported import Unsupported

if TYPE_CHECKING:
    from edgectl.engine import BuildContext

Node = BaseNode

NODE_TYPES: dict[str, type[BaseNode]] = {
    node.TYPE: node
    for node in (
        MessageTypeSwitch,
        CheckMessage,
        SaveTimeseries,
        SaveAttributes,
        DeleteAttributes,
        DeleteTimeseries,
        PushToCloud,
        PushToEdge,
        Filter,
        Switch,
        Transform,
        Log,
        RuleChainCall,
        Output,
        Unsupported,
    )
}

SCRIPT_TYPES = frozenset({"filter", "switch", "transform", "log"})


def build_node(spec: NodeSpec, chain: Chain, context: BuildContext) -> BaseNode:
    """Build the node a spec describes; the spec must have passed validation."""
    return NODE_TYPES[spec.type](spec, chain, context)
