"""Memory and disk bench: edge RSS with a long queue; bytes per reading and event.

1. Writes N readings (default 1,000,000) into a fresh file and reports the
   file's growth per reading after a checkpoint.
2. Queues E cloud events (default 10,000,000) in another file, reports bytes
   per queued event, then starts a real edge on it whose cloud is down (so its
   sender keeps reading the queue), posts some traffic, and reports the edge's
   peak RSS (VmHWM) and its RSS at the end.

Usage: ``python bench/memory.py [--readings N] [--events N]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

import httpx
from roles import start_role

from edgectl.changes import ChangeSet, PendingEvent
from edgectl.devices import register_device
from edgectl.message import TIMESERIES_UPDATED
from edgectl.storage import Store

CHUNK = 200_000


def size(path: Path) -> int:
    wal = path.with_name(path.name + ".wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def readings_per_byte(folder: Path, count: int) -> None:
    path = folder / "readings.duckdb"
    store = Store(path)
    refs = [
        register_device(store, f"dev-{n}", token=f"r{n}")[0].ref for n in range(100)
    ]
    store.checkpoint()
    before = size(path)
    start = 1_700_000_000_000
    for first in range(0, count, CHUNK):
        changes = ChangeSet()
        for i in range(first, min(count, first + CHUNK)):
            # A realistic reading: a device's temperature every second.
            value = round(20 + (i % 600) / 100, 2)
            changes.add_reading(
                refs[i % 100],
                "temperature",
                start + (i // 100) * 1000,
                (2, value),
                None,
                False,
            )
        store.apply(changes)
    store.close()
    grown = size(path) - before
    print(
        f"stored readings: {count:,}, file grew {grown / 1e6:,.1f} MB: "
        f"{grown / count:.1f} bytes per reading"
    )


def queue_events(path: Path, count: int) -> None:
    store = Store(path)
    ref = register_device(store, "queued", token="QUEUED")[0].ref
    store.checkpoint()
    before = size(path)
    for first in range(0, count, CHUNK):
        changes = ChangeSet()
        for i in range(first, min(count, first + CHUNK)):
            body = {
                "data": {"temperature": round(20 + (i % 600) / 100, 2)},
                "ts": 1_700_000_000_000 + i,
            }
            changes.add_event(
                PendingEvent(
                    i - first, TIMESERIES_UPDATED, ref, body, 1_700_000_000_000 + i
                )
            )
        store.apply(changes)
    store.close()
    grown = size(path) - before
    print(
        f"queued events: {count:,}, file grew {grown / 1e6:,.1f} MB: "
        f"{grown / count:.1f} bytes per event"
    )


def rss(pid: int) -> tuple[int, int]:
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return int(fields["VmHWM"].split()[0]) * 1024, int(
        fields["VmRSS"].split()[0]
    ) * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--readings", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="edgectl-bench-memory-"))
    print(f"cores: {os.cpu_count()}  folder: {folder}")
    readings_per_byte(folder, options.readings)
    edge_db = folder / "edge.duckdb"
    began = time.perf_counter()
    queue_events(edge_db, options.events)
    print(f"(queued in {time.perf_counter() - began:.0f} s)")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    edge, url = start_role(
        "edge",
        folder,
        "--cloud",
        f"http://127.0.0.1:{dead_port}",
        "--edge-key",
        "k",
        env={"EDGECTL_EDGE_SECRET": "s"},
    )
    with httpx.Client(base_url=url, timeout=10) as client:
        for n in range(2000):
            client.post("/api/v1/QUEUED/telemetry", json={"n": n})
        client.get("/metrics")
    time.sleep(3)
    peak, now = rss(edge.pid)
    edge.send_signal(signal.SIGTERM)
    edge.wait(60)
    print(
        f"edge with {options.events:,} events queued: peak RSS {peak / 1e6:,.0f} "
        f"MB, RSS {now / 1e6:,.0f} MB"
    )


if __name__ == "__main__":
    main()
