"""delete_timeseries: remove readings named by a TIMESERIES_DELETED message."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from edgectl.changes import TimeseriesDelete
from edgectl.engine import fail
from edgectl.message import SUCCESS, TIMESERIES_DELETED, Message
from edgectl.nodes.base import BaseNode
from edgectl.values import ValueRejected

if TYPE_CHECKING:
    from edgectl.engine import Routed, Run


def parse_timeseries_delete(data: Any) -> tuple[tuple[str, ...], int, int]:
    """Read ``{"keys": [...], "startTs": ms, "endTs": ms}``; the range is optional.

    Raises ValueRejected for a body of another shape.
    """
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueRejected('expected {"keys": [...], "startTs": ms, "endTs": ms}')
    keys = tuple(str(key) for key in data["keys"] if str(key))
    start, end = data.get("startTs", 0), data.get("endTs", 2**62)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
        raise ValueRejected("startTs and endTs must be epoch milliseconds")
    return keys, start, end


class DeleteTimeseries(BaseNode):
    """Deletes readings in ``[startTs, endTs]``; latest values fall back to what
    remains. Other message types go to Failure."""

    TYPE = "delete_timeseries"

    def process(self, batch: list[Message], run: Run) -> Iterator[Routed]:
        for message in batch:
            if message.type != TIMESERIES_DELETED:
                yield fail(message, f"Unsupported msg type {message.type}")
                continue
            try:
                keys, start, end = parse_timeseries_delete(message.data)
            except ValueRejected as error:
                yield fail(message, str(error))
                continue
            if keys:
                delete = TimeseriesDelete(
                    message.originator, keys, start, end, message.order
                )
                run.changes.delete_timeseries(delete)
            yield message, (SUCCESS,)
