"""Limits on the outgoing queue: its bytes and its age, and what happens at each.

The byte total is one scan of the queue table, taken at most every second and
less often when the scan is slow (it never uses more than a tenth of the time),
plus an estimate for every request accepted since the last scan (its body and
the overhead of the events it queues), so a burst between two scans counts.

When the total reaches ``max_bytes`` a role either refuses new work
(``reject``, the default: the API answers 503 and stores nothing) or drops the
oldest events until the queue is back under 90% of the limit
(``drop_oldest``). Events queued longer than ``max_age_seconds`` are dropped.
Every drop moves the delivery cursor past the dropped events, is counted in
``edgectl_events_dropped_total`` and logged with its range.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb

from edgectl.errors import EdgectlError
from edgectl.message import now_ms
from edgectl.metrics import Metrics
from edgectl.outbox import (
    DroppedRange,
    drop_through,
    head_of_bytes,
    head_older_than,
    measure,
    queue_size,
)
from edgectl.storage import Store, storage_errors
from edgectl.writer import Writer

logger = logging.getLogger(__name__)

_MIN_INTERVAL = 1.0
_DROP_TO = 0.9


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """How big and how old the outgoing queue may get; 0 means no limit."""

    max_bytes: int = 0
    max_age_seconds: float = 0.0
    drop_oldest: bool = False


class Quota:
    """Measures one outgoing queue and keeps it within its limits."""

    def __init__(
        self,
        store: Store,
        queue: str,
        limits: QueueLimits,
        metrics: Metrics,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.queue = queue
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self.measured_bytes = 0
        self.oldest_created_ts: int | None = None
        self._accepted_since = 0
        self._scan_seconds = 0.0

    @property
    def queued_bytes(self) -> int:
        """The last measured total plus what was accepted since."""
        return self.measured_bytes + self._accepted_since

    def is_full(self) -> bool:
        """True when new work must be refused (the ``reject`` policy only)."""
        limit = self.limits.max_bytes
        return (
            bool(limit) and not self.limits.drop_oldest and self.queued_bytes >= limit
        )

    def note_accepted(self, size: int) -> None:
        """Count a committed request's body until the next scan sees its events."""
        self._accepted_since += size

    def measure(self) -> None:
        """Scan the queue for its byte total and oldest event; raises StorageError."""
        started = time.perf_counter()
        self.measured_bytes, self.oldest_created_ts = queue_size(self.store, self.queue)
        self._scan_seconds = time.perf_counter() - started

    def needs_dropping(self) -> bool:
        """True when the last scan found events past the age or byte limit."""
        oldest, age = self.oldest_created_ts, self.limits.max_age_seconds
        if age and oldest is not None and oldest < self.clock() - age * 1000:
            return True
        limit = self.limits.max_bytes
        return bool(limit) and self.limits.drop_oldest and self.queued_bytes > limit

    def enforce(self) -> list[tuple[DroppedRange, str]]:
        """Drop what is past the limits, in one transaction; run on the writer.

        Returns each dropped range with its reason (``age`` or ``full``), after
        counting and logging it. Raises StorageError.
        """
        with (
            storage_errors("dropping events from", self.store.path),
            self.store.transaction() as con,
        ):
            dropped = [(each, "age") for each in self._drop_old(con)]
            if self.limits.drop_oldest and self.limits.max_bytes:
                dropped += [(each, "full") for each in self._make_room(con)]
        for each, reason in dropped:
            self._record(each, reason)
        return dropped

    def _drop_old(self, con: duckdb.DuckDBPyConnection) -> list[DroppedRange]:
        age = self.limits.max_age_seconds
        if not age:
            return []
        through = head_older_than(con, self.queue, self.clock() - int(age * 1000))
        return [] if through is None else drop_through(con, self.queue, through)

    def _make_room(self, con: duckdb.DuckDBPyConnection) -> list[DroppedRange]:
        total, _ = measure(con, self.queue)
        if total <= self.limits.max_bytes:
            return []
        excess = total - int(self.limits.max_bytes * _DROP_TO)
        through = head_of_bytes(con, self.queue, excess)
        return drop_through(con, self.queue, through) if through is not None else []

    def _record(self, dropped: DroppedRange, reason: str) -> None:
        self.metrics.add("events_dropped", dropped.count, reason=reason)
        why = (
            f"they waited longer than max_queue_age_seconds="
            f"{self.limits.max_age_seconds:g}"
            if reason == "age"
            else f"the queue passed max_queue_bytes={self.limits.max_bytes} "
            "and queue_full is drop_oldest"
        )
        logger.error(
            "dropped %d unsent events from %s%s, seq %d to %d, queued %s to %s: %s",
            dropped.count,
            dropped.queue,
            f" for edge {dropped.edge!r}" if dropped.edge else "",
            dropped.first_seq,
            dropped.last_seq,
            _instant(dropped.first_created_ts),
            _instant(dropped.last_created_ts),
            why,
        )

    async def run(self, writer: Writer, stop: asyncio.Event) -> None:
        """Measure and enforce until ``stop`` is set."""
        while not stop.is_set():
            interval = max(_MIN_INTERVAL, 10 * self._scan_seconds)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            try:
                await self._check(writer)
            except EdgectlError as error:
                logger.warning(
                    "checking the queue limits failed, will retry: %s", error
                )

    async def _check(self, writer: Writer) -> None:
        # Reset before the scan: a request committed during it may be counted
        # twice until the next scan, never missed.
        self._accepted_since = 0
        await asyncio.to_thread(self.measure)
        if not self.needs_dropping():
            return
        await asyncio.wrap_future(writer.call(self.enforce))
        self._accepted_since = 0
        await asyncio.to_thread(self.measure)


def _instant(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")
