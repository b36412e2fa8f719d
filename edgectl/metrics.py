"""Counters and gauges of a running role, rendered in Prometheus text format."""

from __future__ import annotations

import threading
from collections.abc import Callable

_HELP = {
    "messages_accepted": "Device messages committed to the edge's file.",
    "requests_rejected": "Device or peer requests refused (4xx).",
    "requests_refused_full": (
        "Requests refused with 503 because the outgoing queue was full."
    ),
    "readings_stored": "Readings written to ts_kv.",
    "chain_failures": "Messages a node sent to Failure with nowhere to go.",
    "events_queued": "Events added to the outgoing queue.",
    "events_sent": "Events sent to the peer (a retry counts again).",
    "events_acknowledged": "Events the peer acknowledged.",
    "events_retried": "Events the peer rejected and that will be sent again.",
    "events_dead_lettered": "Events moved to the dead letters.",
    "events_dropped": (
        "Queued events dropped unsent: reason age (older than the age limit) "
        "or full (drop_oldest made room)."
    ),
    "events_received": "Events received from the peer and applied.",
    "group_commits": "Batches of device messages stored in one commit.",
    "push_failures": "Pushes that failed and were retried later.",
}
_GAUGE_HELP = {
    "queue_depth": "Events waiting in the outgoing queue.",
    "queue_lag_seconds": "Age of the oldest waiting event.",
    "queue_bytes": "Bytes the outgoing queue counts against max_queue_bytes.",
    "queue_max_bytes": "The max_queue_bytes limit (0: none).",
    "dead_letters": "Events in the dead letters.",
    "polls_waiting": "Device long polls for attribute updates now waiting.",
}
# Counters that always carry a label; every value is listed even at 0.
_LABELLED = {"events_dropped": ("reason", ("age", "full"))}

Labels = tuple[tuple[str, str], ...]


class Metrics:
    """Thread-safe counters, plus gauges read when /metrics is scraped."""

    def __init__(self, role: str) -> None:
        self.role = role
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, Labels], float] = {}
        for name in _HELP:
            for labels in _initial_labels(name):
                self._counters[name, labels] = 0
        self._batch_seconds: list[float] = []
        self.gauges: dict[str, Callable[[], float]] = {}

    def add(self, name: str, amount: float, **labels: str) -> None:
        """Add to a counter, for the given label values if it has labels."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + amount

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value; without labels, the sum over all of them."""
        wanted = tuple(sorted(labels.items()))
        with self._lock:
            return sum(
                value
                for (counter, have), value in self._counters.items()
                if counter == name and (not wanted or have == wanted)
            )

    def observe_batch(self, seconds: float) -> None:
        """Record how long one sync batch took."""
        with self._lock:
            self._batch_seconds.append(seconds)
            del self._batch_seconds[:-1000]

    def render(self) -> str:
        """Every metric in Prometheus text exposition format."""
        lines: list[str] = []
        with self._lock:
            counters = dict(self._counters)
            batches = list(self._batch_seconds)
        named: dict[str, list[tuple[Labels, float]]] = {}
        for (name, labels), value in counters.items():
            named.setdefault(name, []).append((labels, value))
        for name, values in named.items():
            full = f"edgectl_{name}_total"
            lines += [
                f"# HELP {full} {_HELP.get(name, name)}",
                f"# TYPE {full} counter",
            ]
            lines += [
                f"{full}{self._labels(labels)} {value:g}" for labels, value in values
            ]
        for name, read in self.gauges.items():
            lines += [
                f"# HELP edgectl_{name} {_GAUGE_HELP.get(name, name)}",
                f"# TYPE edgectl_{name} gauge",
                f"edgectl_{name}{self._labels(())} {read():g}",
            ]
        lines += _summary("edgectl_sync_batch_seconds", batches, self.role)
        return "\n".join(lines) + "\n"

    def _labels(self, labels: Labels) -> str:
        pairs = [("role", self.role), *labels]
        return "{" + ",".join(f'{key}="{value}"' for key, value in pairs) + "}"


def _initial_labels(name: str) -> list[Labels]:
    if name not in _LABELLED:
        return [()]
    label, values = _LABELLED[name]
    return [((label, value),) for value in values]


def _summary(name: str, values: list[float], role: str) -> list[str]:
    ordered = sorted(values)
    lines = [f"# TYPE {name} summary"]
    for quantile in (0.5, 0.99):
        value = ordered[int(quantile * (len(ordered) - 1))] if ordered else 0.0
        lines.append(f'{name}{{role="{role}",quantile="{quantile}"}} {value:g}')
    lines.append(f'{name}_count{{role="{role}"}} {len(ordered)}')
    return lines
