"""Latency bench: from a device's POST to the row being in the cloud's ts_kv.

Starts a real cloud and a real edge, then posts numbered readings at a steady
rate (default 1,000 readings/s, spread over several devices, each on its own
connection) for a while. The load is open-loop: each reading has its own
moment to leave, and a slow answer does not delay the readings behind it (it
delays only its own device's connection, so there are enough devices for the
rate). A watcher polls the cloud's ts_kv_latest for each device's highest
number every few milliseconds; a reading's latency is the time from just
before its POST to the first poll that sees it (or a later one) stored. The
polling interval bounds the resolution and is printed.

Usage: ``python bench/latency.py [--rate N] [--seconds N] [--devices N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import orjson
from roles import start_role

from edgectl.devices import register_device, register_edge
from edgectl.storage import Store


class Device:
    """A device on one kept-alive connection, speaking just enough HTTP/1.1.

    httpx spends about a millisecond of CPU per request; at 1,000 requests/s
    the load generator would take the core the edge and cloud need.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str
    ) -> None:
        self.reader, self.writer = reader, writer
        self.head = (
            f"POST /api/v1/{token}/telemetry HTTP/1.1\r\n"
            "Host: edge\r\nContent-Type: application/json\r\n"
        )

    @classmethod
    async def connect(cls, url: str, token: str) -> Device:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, token)

    async def post(self, values: dict[str, int]) -> int:
        body = orjson.dumps(values)
        self.writer.write(
            f"{self.head}Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def load(
    edge_url: str, cloud_url: str, options: argparse.Namespace
) -> tuple[list[float], int, list[float], int]:
    devices, rate, seconds = options.devices, options.rate, options.seconds
    sent: dict[tuple[int, int], float] = {}
    seen: dict[tuple[int, int], float] = {}
    gaps: list[float] = []
    failed = 0
    answered: list[float] = []
    began = time.perf_counter()
    stop_at = began + seconds

    async def post(device: int) -> None:
        nonlocal failed
        interval = devices / rate
        # Devices start spread over one interval, so the load is even.
        next_at = began + interval * device / devices
        connection = await Device.connect(edge_url, f"T{device}")
        number = 0
        while next_at < stop_at:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            sent[(device, number)] = time.perf_counter()
            if await connection.post({"n": number}) != 200:
                failed += 1
            answered.append((time.perf_counter() - sent[(device, number)]) * 1000)
            number += 1
            next_at += interval
            # Behind schedule (a slow answer): the missed moments are
            # skipped rather than sent in a burst.
            while next_at < time.perf_counter() - interval:
                next_at += interval
        connection.close()

    async def watch() -> None:
        highest = [-1] * devices
        last = time.perf_counter()
        async with httpx.AsyncClient(base_url=cloud_url, timeout=5) as client:
            while True:
                answer = await client.get(
                    "/api/edgectl/tables/ts_kv_latest",
                    params={"key": "n", "limit": 10_000},
                )
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
                for row in answer.json():
                    device, value = int(row["device"][1:]), int(row["value"])
                    for number in range(highest[device] + 1, value + 1):
                        seen.setdefault((device, number), now)
                    highest[device] = max(highest[device], value)
                if now > stop_at and (len(seen) >= len(sent) or now > stop_at + 30):
                    return
                await asyncio.sleep(0.003)

    await asyncio.gather(watch(), *(post(n) for n in range(devices)))
    latencies = sorted((seen[key] - sent[key]) * 1000 for key in sent if key in seen)
    answered.sort()
    print(
        f"edge answered the POSTs in p50 {answered[len(answered) // 2]:.1f} ms, "
        f"p99 {answered[int(len(answered) * 0.99)]:.1f} ms"
    )
    return latencies, len(sent), gaps, failed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--devices", type=int, default=50)
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="edgectl-bench-latency-"))
    cloud_store = Store(folder / "cloud.duckdb")
    register_edge(cloud_store, "lat", key="lat", secret="lat")
    cloud_store.close()
    edge_store = Store(folder / "edge.duckdb")
    for n in range(options.devices):
        register_device(edge_store, f"d{n}", token=f"T{n}")
    edge_store.close()
    cloud, cloud_url = start_role("cloud", folder)
    edge, edge_url = start_role(
        "edge",
        folder,
        "--cloud",
        cloud_url,
        "--edge-key",
        "lat",
        env={"EDGECTL_EDGE_SECRET": "lat"},
    )
    time.sleep(1.0)
    try:
        latencies, sent, gaps, failed = asyncio.run(load(edge_url, cloud_url, options))
    finally:
        for process in (edge, cloud):
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    print(
        f"cores: {os.cpu_count()}  target {options.rate:,} readings/s from "
        f"{options.devices} devices, achieved {sent / options.seconds:,.0f}/s over "
        f"{options.seconds} s"
    )
    print(
        f"readings: {sent:,} sent, {failed} refused, {len(latencies):,} seen on "
        "the cloud"
    )
    print(f"poll interval: median {statistics.median(gaps) * 1000:.1f} ms")
    if latencies:
        print(
            f"latency p50 {latencies[len(latencies) // 2]:.1f} ms  p99 "
            f"{latencies[int(len(latencies) * 0.99)]:.1f} ms  max "
            f"{latencies[-1]:.1f} ms"
        )


if __name__ == "__main__":
    main()
