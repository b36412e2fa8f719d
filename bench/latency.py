"""Latency bench: from a device's POST to the row being in the cloud's ts_kv.

Starts a real cloud and a real edge, then posts numbered readings at a steady
rate (default 1,000 readings/s, spread over several devices and connections)
for a while. A watcher polls the cloud's ts_kv_latest for each device's
highest number every few milliseconds; a reading's latency is the time from
just before its POST to the first poll that sees it (or a later one) stored.
The polling interval bounds the resolution and is printed.

Usage: ``python bench/latency.py [--rate N] [--seconds N]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from roles import start_role

DEVICES = 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--devices", type=int, default=DEVICES)
    options = parser.parse_args()
    globals()["DEVICES"] = options.devices
    folder = Path(tempfile.mkdtemp(prefix="edgectl-bench-latency-"))
    run_cli = [sys.executable, "-m", "edgectl"]
    subprocess.run([*run_cli, "edges", "add", "lat", "--key", "lat", "--secret", "lat", "--db", str(folder / "cloud.duckdb")], check=True, capture_output=True)
    for n in range(DEVICES):
        subprocess.run([*run_cli, "devices", "add", f"d{n}", "--token", f"T{n}", "--db", str(folder / "edge.duckdb")], check=True, capture_output=True)
    cloud, cloud_url = start_role("cloud", folder)
    edge, edge_url = start_role("edge", folder, "--cloud", cloud_url, "--edge-key", "lat", env={"EDGECTL_EDGE_SECRET": "lat"})
    time.sleep(1.0)

    sent: dict[tuple[int, int], float] = {}
    seen: dict[tuple[int, int], float] = {}
    done = threading.Event()
    poll_gaps: list[float] = []

    def watch() -> None:
        client = httpx.Client(base_url=cloud_url, timeout=5)
        highest = [-1] * DEVICES
        last = time.perf_counter()
        while not done.is_set() or len(seen) < len(sent):
            rows = client.get("/api/edgectl/tables/ts_kv_latest", params={"key": "n", "limit": 1000}).json()
            now = time.perf_counter()
            poll_gaps.append(now - last)
            last = now
            for row in rows:
                device = int(row["device"][1:])
                for number in range(highest[device] + 1, int(row["value"]) + 1):
                    seen.setdefault((device, number), now)
                highest[device] = max(highest[device], int(row["value"]))
            if done.is_set() and now - stop_at > 30:
                break
            time.sleep(0.002)

    def post(device: int) -> None:
        client = httpx.Client(base_url=edge_url, timeout=10)
        interval = DEVICES / options.rate
        number, next_at = 0, time.perf_counter()
        while not done.is_set():
            sent[(device, number)] = time.perf_counter()
            client.post(f"/api/v1/T{device}/telemetry", json={"n": number})
            number += 1
            next_at += interval
            time.sleep(max(0.0, next_at - time.perf_counter()))

    stop_at = 0.0
    watcher = threading.Thread(target=watch)
    posters = [threading.Thread(target=post, args=(n,)) for n in range(DEVICES)]
    watcher.start()
    for thread in posters:
        thread.start()
    time.sleep(options.seconds)
    done.set()
    stop_at = time.perf_counter()
    for thread in posters:
        thread.join()
    watcher.join()
    latencies = sorted((seen[key] - sent[key]) * 1000 for key in sent if key in seen)
    for process in (edge, cloud):
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    achieved = len(sent) / options.seconds
    print(f"cores: {os.cpu_count()}  target {options.rate:,} readings/s, achieved {achieved:,.0f}/s over {options.seconds} s")
    print(f"readings: {len(sent):,} sent, {len(latencies):,} seen on the cloud")
    print(f"poll interval: median {statistics.median(poll_gaps) * 1000:.1f} ms")
    print(f"latency p50 {latencies[len(latencies) // 2]:.1f} ms  p99 {latencies[int(len(latencies) * 0.99)]:.1f} ms  max {latencies[-1]:.1f} ms")


if __name__ == "__main__":
    main()
