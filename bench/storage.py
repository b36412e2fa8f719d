"""Measure how fast a batch of telemetry is stored through save_timeseries.

Run as ``python bench/storage.py [--messages N]``. For each chain (the shipped
edge root chain, which also queues a cloud event per message, and a chain with
only a save_timeseries node) and each message shape (one reading, ten
readings), it stores one batch of messages into a fresh DuckDB file with the
latest value kept on every message, then a second batch of newer readings into
the same file. The engine run (chain, typing, event bodies) and the commit
(``Store.apply``: Arrow tables into DuckDB, one durable transaction) are timed
separately. It prints rows/s (ts_kv rows) and messages/s, and the CPU count.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

import edgectl
from edgectl.checks import load_chain
from edgectl.engine import Engine, Run
from edgectl.message import POST_TELEMETRY_REQUEST, EntityRef, Message
from edgectl.storage import Store

RULECHAINS = Path(edgectl.__file__).parent / "rulechains"
DEVICES = 100
SAVE_ONLY = """\
name: save only
entry: save
nodes:
  - id: save
    type: save_timeseries
    config:
      latest: on_every_message
"""


@dataclass(frozen=True)
class Timing:
    """One stored batch: its size and where the time went."""

    messages: int
    readings: int
    events: int
    engine_seconds: float
    commit_seconds: float

    @property
    def total_seconds(self) -> float:
        """Engine and commit together."""
        return self.engine_seconds + self.commit_seconds


def make_messages(count: int, readings: int, first_ts: int) -> list[Message]:
    """``count`` telemetry messages from DEVICES devices, one ms apart."""
    messages = []
    for n in range(count):
        data = {f"k{r}": (n + r) * 0.5 if r % 2 else n + r for r in range(readings)}
        metadata = {"ts": str(first_ts + n), "deviceName": f"device-{n % DEVICES}"}
        device = EntityRef("DEVICE", f"device-{n % DEVICES}")
        messages.append(Message(POST_TELEMETRY_REQUEST, device, data, metadata))
    return messages


def store_batch(store: Store, engine: Engine, messages: list[Message]) -> Timing:
    """Run one batch through the chain and commit it; time both steps."""
    started = time.perf_counter()
    run = Run(store=store)
    engine.run(messages, run)
    ran = time.perf_counter()
    store.apply(run.changes)
    committed = time.perf_counter()
    if run.failures:
        raise RuntimeError(f"{len(run.failures)} messages failed: {run.failures[0]}")
    changes = run.changes
    return Timing(
        len(messages),
        changes.reading_count,
        len(changes.events),
        ran - started,
        committed - ran,
    )


def check_stored(path: Path, expected_rows: int) -> None:
    """Reopen the closed file read-only and count its rows: the commit held."""
    with duckdb.connect(str(path), read_only=True) as con:
        row = con.execute("SELECT count(*) FROM ts_kv").fetchone()
    stored = row[0] if row else 0
    if stored != expected_rows:
        raise RuntimeError(f"{path} holds {stored} rows, expected {expected_rows}")


def run_case(chain_path: Path, count: int, readings: int, folder: Path) -> list[Timing]:
    """Two batches into one fresh file: into an empty file, then a full one."""
    engine = Engine(load_chain(chain_path))
    path = folder / f"{chain_path.stem}-{readings}.duckdb"
    store = Store(path)
    try:
        timings = [
            store_batch(store, engine, make_messages(count, readings, batch * count))
            for batch in (1, 2)
        ]
    finally:
        store.close()
        engine.close()
    check_stored(path, sum(t.readings for t in timings))
    return timings


def report(label: str, batch: str, timing: Timing) -> None:
    """One line: rows/s overall, and the engine and commit shares."""
    total = timing.total_seconds
    print(
        f"{label:<29} {batch:<5} {timing.messages:>8,} msgs {timing.readings:>9,} "
        f"rows {timing.events:>8,} events | total {timing.readings / total:>9,.0f} "
        f"rows/s {timing.messages / total:>8,.0f} msgs/s | engine "
        f"{timing.engine_seconds:6.2f} s | commit {timing.commit_seconds:6.2f} s "
        f"({timing.readings / timing.commit_seconds:>9,.0f} rows/s)"
    )


def main() -> None:
    """Print the timings of every case and the CPU count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    count = parser.parse_args().messages
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"cpu_count: {os.cpu_count()}  load average: {load}")
    print(f"duckdb {duckdb.__version__}")
    print(f"batches of {count:,} messages from {DEVICES} devices, latest on every one")
    with tempfile.TemporaryDirectory() as folder:
        save_only = Path(folder) / "save_only.yaml"
        save_only.write_text(SAVE_ONLY, encoding="utf-8")
        chains = (
            ("edge_root.yaml", RULECHAINS / "edge_root.yaml"),
            ("save only", save_only),
        )
        for label, chain_path in chains:
            for readings in (1, 10):
                timings = run_case(chain_path, count, readings, Path(folder))
                name = f"{label}, {readings} reading(s)"
                for batch, timing in zip(("empty", "full"), timings, strict=True):
                    report(name, batch, timing)


if __name__ == "__main__":
    main()
