"""save_timeseries: store readings in ts_kv and, unless skipped, ts_kv_latest."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from edgectl.engine import fail
from edgectl.message import META_TTL, POST_TELEMETRY_REQUEST, SUCCESS, Message
from edgectl.nodes.base import BaseNode
from edgectl.values import ValueRejected, classify, telemetry_groups

if TYPE_CHECKING:
    from edgectl.engine import Routed, Run


class SaveTimeseries(BaseNode):
    """Stores POST_TELEMETRY_REQUEST bodies; other types go to Failure.

    The reading time is metadata ``ts`` (or now with ``use_server_ts``). TTL is
    metadata ``TTL`` in seconds when set, else the node's ``ttl``; 0 keeps
    readings forever. A message with any unstorable value stores nothing.
    """

    TYPE = "save_timeseries"

    def process(self, batch: list[Message], run: Run) -> Iterator[Routed]:
        keep_latest = self.config.get("latest", "on_every_message") != "skip"
        use_server_ts = bool(self.config.get("use_server_ts", False))
        for message in batch:
            if message.type != POST_TELEMETRY_REQUEST:
                yield fail(message, f"Unsupported msg type {message.type}")
                continue
            ts = run.now() if use_server_ts else message.ts
            try:
                readings = _readings(message.data, ts)
                ttl = self._ttl(message)
            except ValueRejected as error:
                yield fail(message, str(error))
                continue
            if not readings:
                yield fail(message, "Msg body is empty")
                continue
            for reading_ts, key, typed in readings:
                expires = reading_ts + ttl * 1000 if ttl else None
                run.changes.add_reading(
                    message.originator,
                    key,
                    reading_ts,
                    typed,
                    expires,
                    keep_latest,
                    message.order,
                )
            yield message, (SUCCESS,)

    def _ttl(self, message: Message) -> int:
        raw = message.metadata.get(META_TTL)
        if not raw:
            return int(self.config.get("ttl", 0))
        try:
            ttl = int(raw)
        except ValueError:
            raise ValueRejected(f"metadata TTL must be seconds, got {raw!r}") from None
        if ttl < 0:
            raise ValueRejected(f"metadata TTL must not be negative, got {raw!r}")
        return ttl


def _readings(data: Any, ts: int) -> list[tuple[int, str, tuple[int, Any]]]:
    readings = []
    for group_ts, values in telemetry_groups(data, ts):
        for key, value in values.items():
            try:
                readings.append((group_ts, key, classify(value)))
            except ValueRejected as error:
                raise ValueRejected(f"key {key!r}: {error}") from None
    return readings
