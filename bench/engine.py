"""Engine bench: messages/s through the edge root chain, durable, in-process.

The chain is rulechains/edge_root.yaml (message type switch, save timeseries
with latest values, push to cloud). Each round runs a batch of messages
through the engine and commits it to a real DuckDB file, as the writer thread
does. Baseline, measured in the same run: one message per commit, the way a
store that commits per request would work.

Usage: ``python bench/engine.py [--messages N] [--batch N]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from edgectl.checks import load_chain
from edgectl.devices import register_device
from edgectl.engine import Engine, Run
from edgectl.message import POST_TELEMETRY_REQUEST, Message
from edgectl.roles import example_chain
from edgectl.storage import Store


def messages(refs, count: int, readings: int, start: int) -> list[Message]:
    out = []
    for i in range(count):
        values = {f"k{j}": (start + i) * 0.5 + j for j in range(readings)}
        metadata = {
            "deviceName": refs[i % len(refs)].name,
            "deviceType": "bench",
            "ts": str(1_700_000_000_000 + start + i),
        }
        out.append(
            Message(
                POST_TELEMETRY_REQUEST, refs[i % len(refs)], values, metadata, order=i
            )
        )
    return out


def run(
    folder: Path, total: int, batch: int, readings: int
) -> tuple[float, float, float]:
    store = Store(folder / f"engine-{readings}-{batch}.duckdb")
    engine = Engine(load_chain(example_chain("edge")))
    refs = [
        register_device(store, f"dev-{n}", token=f"t{n}")[0].ref for n in range(100)
    ]
    engine_seconds = commit_seconds = 0.0
    for first in range(0, total, batch):
        prepared = messages(refs, min(batch, total - first), readings, first)
        began = time.perf_counter()
        work = Run(store=store)
        engine.run(prepared, work)
        middle = time.perf_counter()
        store.apply(work.changes)
        engine_seconds += middle - began
        commit_seconds += time.perf_counter() - middle
    store.close()
    return total / (engine_seconds + commit_seconds), engine_seconds, commit_seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000)
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="edgectl-bench-engine-"))
    print(f"cores: {os.cpu_count()}  chain: edge_root.yaml  batch: {options.batch}")
    for readings in (1, 10):
        rate, engine_s, commit_s = run(
            folder, options.messages, options.batch, readings
        )
        print(
            f"{readings:2d} reading(s)/message: {rate:10,.0f} messages/s "
            f"({rate * readings:,.0f} readings/s; engine {engine_s:.2f} s, "
            f"commit {commit_s:.2f} s for {options.messages:,})"
        )
    base_rate, _, _ = run(folder, 2000, 1, 1)
    print(f"baseline, one commit per message: {base_rate:10,.0f} messages/s")


if __name__ == "__main__":
    main()
