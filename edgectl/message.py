"""Messages that travel through rule chains, and ThingsBoard's type vocabulary."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

POST_TELEMETRY_REQUEST = "POST_TELEMETRY_REQUEST"
POST_ATTRIBUTES_REQUEST = "POST_ATTRIBUTES_REQUEST"
ATTRIBUTES_UPDATED = "ATTRIBUTES_UPDATED"
ATTRIBUTES_DELETED = "ATTRIBUTES_DELETED"
TIMESERIES_UPDATED = "TIMESERIES_UPDATED"
TIMESERIES_DELETED = "TIMESERIES_DELETED"
ENTITY_CREATED = "ENTITY_CREATED"
TO_SERVER_RPC_REQUEST = "TO_SERVER_RPC_REQUEST"

# The relation label the message type switch emits for each known type; any other
# type string (custom ones included) goes to "Other", as in ThingsBoard.
TYPE_RELATIONS: dict[str, str] = {
    "POST_ATTRIBUTES_REQUEST": "Post attributes",
    "POST_TELEMETRY_REQUEST": "Post telemetry",
    "TO_SERVER_RPC_REQUEST": "RPC Request from Device",
    "ACTIVITY_EVENT": "Activity Event",
    "INACTIVITY_EVENT": "Inactivity Event",
    "CONNECT_EVENT": "Connect Event",
    "DISCONNECT_EVENT": "Disconnect Event",
    "ENTITY_CREATED": "Entity Created",
    "ENTITY_UPDATED": "Entity Updated",
    "ENTITY_DELETED": "Entity Deleted",
    "ENTITY_ASSIGNED": "Entity Assigned",
    "ENTITY_UNASSIGNED": "Entity Unassigned",
    "ATTRIBUTES_UPDATED": "Attributes Updated",
    "ATTRIBUTES_DELETED": "Attributes Deleted",
    "ALARM": "Alarm",
    "ALARM_CREATED": "Alarm Created",
    "ALARM_UPDATED": "Alarm Updated",
    "ALARM_SEVERITY_UPDATED": "Alarm Severity Updated",
    "ALARM_ACK": "Alarm Acknowledged",
    "ALARM_CLEAR": "Alarm Cleared",
    "ALARM_ASSIGNED": "Alarm Assigned",
    "ALARM_UNASSIGNED": "Alarm Unassigned",
    "COMMENT_CREATED": "Comment Created",
    "COMMENT_UPDATED": "Comment Updated",
    "RPC_CALL_FROM_SERVER_TO_DEVICE": "RPC Request to Device",
    "ENTITY_ASSIGNED_FROM_TENANT": "Entity Assigned From Tenant",
    "ENTITY_ASSIGNED_TO_TENANT": "Entity Assigned To Tenant",
    "TIMESERIES_UPDATED": "Timeseries Updated",
    "TIMESERIES_DELETED": "Timeseries Deleted",
    "RPC_QUEUED": "RPC Queued",
    "RPC_SENT": "RPC Sent",
    "RPC_DELIVERED": "RPC Delivered",
    "RPC_SUCCESSFUL": "RPC Successful",
    "RPC_TIMEOUT": "RPC Timeout",
    "RPC_EXPIRED": "RPC Expired",
    "RPC_FAILED": "RPC Failed",
    "RPC_DELETED": "RPC Deleted",
    "RELATION_ADD_OR_UPDATE": "Relation Added or Updated",
    "RELATION_DELETED": "Relation Deleted",
    "RELATIONS_DELETED": "All Relations Deleted",
    "REST_API_REQUEST": "REST API request",
}

SUCCESS = "Success"
FAILURE = "Failure"
TRUE = "True"
FALSE = "False"
OTHER = "Other"

# Metadata keys with a meaning to edgectl (ThingsBoard's names).
META_TS = "ts"
META_SCOPE = "scope"
META_SOURCE = "source"
META_TTL = "TTL"
META_ERROR = "error"
SOURCE_EDGE = "edge"
SOURCE_CLOUD = "cloud"

SCOPES = ("client", "server", "shared")
_SCOPE_ALIASES = {
    "client": "client",
    "server": "server",
    "shared": "shared",
    "client_scope": "client",
    "server_scope": "server",
    "shared_scope": "shared",
}


def normalize_scope(value: str) -> str | None:
    """Map ``CLIENT_SCOPE``, ``client`` and the like to edgectl's scope name.

    Returns None for a value that names no scope.
    """
    return _SCOPE_ALIASES.get(value.strip().lower())


def thingsboard_scope(scope: str) -> str:
    """ThingsBoard's name for an edgectl scope: ``client`` → ``CLIENT_SCOPE``."""
    return f"{scope.upper()}_SCOPE"


# Fault tests only: when EDGECTL_FAULT_CLOCK names a file, it is read on every
# call and may hold "frozen MS" (the clock stands still at MS) or "offset MS"
# (MS added to the wall clock, negative to step it back). It lets the fault
# harness freeze or step back the clock of a running edge; nothing else sets it.
_FAULT_CLOCK = os.environ.get("EDGECTL_FAULT_CLOCK")


def now_ms() -> int:
    """The wall clock in epoch milliseconds."""
    real = time.time_ns() // 1_000_000
    if _FAULT_CLOCK is None:
        return real
    return _fault_clock(_FAULT_CLOCK, real)


def _fault_clock(path: str, real: int) -> int:
    try:
        with open(path, encoding="utf-8") as file:
            kind, value = file.read().split()
        number = int(value)
    except (OSError, ValueError):
        return real
    if kind == "frozen":
        return number
    return real + number if kind == "offset" else real


@dataclass(frozen=True, slots=True)
class EntityRef:
    """An originator: the kind of entity (``DEVICE``, ``ASSET``, ...) and its name."""

    entity_type: str
    name: str


@dataclass(slots=True)
class Budget:
    """Node executions left for one incoming message and everything it spawns."""

    remaining: int
    exhausted: bool = False


@dataclass(slots=True)
class Message:
    """One rule-engine message.

    ``order`` is the position of the incoming message in its batch; copies and
    messages a transform derives keep it, so effects are stored in arrival order.
    """

    type: str
    originator: EntityRef
    data: Any
    metadata: dict[str, str] = field(default_factory=dict)
    order: int = 0
    budget: Budget | None = None

    def copy(self) -> Message:
        """A copy whose metadata can change without touching this one."""
        return Message(
            self.type,
            self.originator,
            self.data,
            dict(self.metadata),
            self.order,
            self.budget,
        )

    def derive(self, type: str, data: Any, metadata: dict[str, str]) -> Message:
        """A new message from the same originator and incoming message."""
        return Message(type, self.originator, data, metadata, self.order, self.budget)

    @property
    def ts(self) -> int:
        """Metadata ``ts`` in epoch ms, or the current time when it is absent."""
        raw = self.metadata.get(META_TS)
        if raw:
            try:
                return int(raw)
            except ValueError:
                pass
        return now_ms()
