"""Counters and gauges of a running role, rendered in Prometheus text format."""

from __future__ import annotations

import threading
from collections.abc import Callable

_HELP = {
    "messages_accepted": "Device messages committed to the edge's file.",
    "requests_rejected": "Device or peer requests refused (4xx).",
    "readings_stored": "Readings written to ts_kv.",
    "chain_failures": "Messages a node sent to Failure with nowhere to go.",
    "events_queued": "Events added to the outgoing queue.",
    "events_sent": "Events sent to the peer (a retry counts again).",
    "events_acknowledged": "Events the peer acknowledged.",
    "events_retried": "Events the peer rejected and that will be sent again.",
    "events_dead_lettered": "Events moved to the dead letters.",
    "events_received": "Events received from the peer and applied.",
    "push_failures": "Pushes that failed and were retried later.",
}


class Metrics:
    """Thread-safe counters, plus gauges read when /metrics is scraped."""

    def __init__(self, role: str) -> None:
        self.role = role
        self._lock = threading.Lock()
        self._counters: dict[str, float] = dict.fromkeys(_HELP, 0)
        self._batch_seconds: list[float] = []
        self.gauges: dict[str, Callable[[], float]] = {}

    def add(self, name: str, amount: float) -> None:
        """Add to a counter."""
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + amount

    def value(self, name: str) -> float:
        """A counter's current value."""
        with self._lock:
            return self._counters.get(name, 0)

    def observe_batch(self, seconds: float) -> None:
        """Record how long one sync batch took."""
        with self._lock:
            self._batch_seconds.append(seconds)
            del self._batch_seconds[:-1000]

    def render(self) -> str:
        """Every metric in Prometheus text exposition format."""
        lines = []
        with self._lock:
            counters = dict(self._counters)
            batches = list(self._batch_seconds)
        for name, value in counters.items():
            full = f"edgectl_{name}_total"
            lines += [
                f"# HELP {full} {_HELP.get(name, name)}",
                f"# TYPE {full} counter",
                f'{full}{{role="{self.role}"}} {value:g}',
            ]
        for name, read in self.gauges.items():
            lines += [f"# TYPE edgectl_{name} gauge", f'edgectl_{name}{{role="{self.role}"}} {read():g}']
        lines += _summary("edgectl_sync_batch_seconds", batches, self.role)
        return "\n".join(lines) + "\n"


def _summary(name: str, values: list[float], role: str) -> list[str]:
    ordered = sorted(values)
    lines = [f"# TYPE {name} summary"]
    for quantile in (0.5, 0.99):
        value = ordered[int(quantile * (len(ordered) - 1))] if ordered else 0.0
        lines.append(f'{name}{{role="{role}",quantile="{quantile}"}} {value:g}')
    lines.append(f'{name}_count{{role="{role}"}} {len(ordered)}')
    return lines
