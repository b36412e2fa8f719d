"""Sync bench: drain a backlog of queued events from an edge to a cloud on loopback.

Builds an edge file holding N queued telemetry events (one reading each) while
no cloud exists, then starts a real cloud and a real edge (``edgectl run``
subprocesses) and times the drain, printing the rate at each 10% of the
backlog so a falling rate shows. With ``--rtt-ms MS`` the edge reaches the
cloud through a proxy that delays every chunk by half that each way, as a
link to a distant cloud would.

Usage: ``python bench/sync.py [--events N] [--rtt-ms MS]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
from roles import start_role

from edgectl.checks import load_chain
from edgectl.devices import register_device, register_edge
from edgectl.engine import Engine, Run
from edgectl.message import POST_TELEMETRY_REQUEST, Message
from edgectl.roles import example_chain
from edgectl.storage import Store


def build_backlog(path: Path, events: int, devices: int = 10) -> None:
    store = Store(path)
    engine = Engine(load_chain(example_chain("edge")))
    refs = [
        register_device(store, f"bench-{n}", token=f"t{n}")[0].ref
        for n in range(devices)
    ]
    start = 1_700_000_000_000
    for first in range(0, events, 10_000):
        run = Run(store=store)
        batch = [
            Message(
                POST_TELEMETRY_REQUEST,
                refs[i % devices],
                {"value": i, "temperature": 20.0 + i % 7},
                {"ts": str(start + i)},
                order=i - first,
            )
            for i in range(first, min(events, first + 10_000))
        ]
        engine.run(batch, run)
        store.apply(run.changes)
    store.close()


def start_delay_proxy(target_port: int, rtt_ms: float) -> int:
    """Forward a loopback port to ``target_port``, each chunk delayed by half
    the round trip each way (order kept); returns the port, serving from a
    thread."""
    delay = rtt_ms / 2000
    ready: list[int] = []
    started = threading.Event()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await chunks.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        while True:
            data = await reader.read(1 << 16)
            chunks.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await sender

    async def connected(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", target_port
        )
        await asyncio.gather(
            pipe(reader, upstream_writer),
            pipe(upstream_reader, writer),
            return_exceptions=True,
        )

    async def serve() -> None:
        server = await asyncio.start_server(connected, "127.0.0.1", 0)
        ready.append(server.sockets[0].getsockname()[1])
        started.set()
        await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()
    started.wait(10)
    return ready[0]


def metric(url: str, name: str) -> float:
    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return -1
    for line in text.splitlines():
        if line.startswith(f"edgectl_{name}"):
            return float(line.rsplit(" ", 1)[1])
    return -1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="edgectl-bench-sync-"))
    print(
        f"cores: {os.cpu_count()}  backlog: {options.events:,} events  round trip: "
        f"{options.rtt_ms:g} ms added  folder: {folder}"
    )

    began = time.perf_counter()
    build_backlog(folder / "edge.duckdb", options.events)
    print(f"backlog built in {time.perf_counter() - began:.1f} s")
    cloud_store = Store(folder / "cloud.duckdb")
    register_edge(cloud_store, "bench", key="bench", secret="bench")
    cloud_store.close()

    cloud, cloud_url = start_role("cloud", folder)
    total = options.events + 10
    began = time.perf_counter()
    via = cloud_url
    if options.rtt_ms:
        port = start_delay_proxy(int(cloud_url.rsplit(":", 1)[1]), options.rtt_ms)
        via = f"http://127.0.0.1:{port}"
    edge, edge_url = start_role(
        "edge",
        folder,
        "--cloud",
        via,
        "--edge-key",
        "bench",
        env={"EDGECTL_EDGE_SECRET": "bench"},
    )
    marks, last = iter(range(10, 101, 10)), (0.0, 0.0)
    mark = next(marks)
    print(" done   elapsed   events/s in this step")
    while True:
        received = metric(cloud_url, "events_received_total")
        elapsed = time.perf_counter() - began
        while received >= total * mark / 100:
            rate = (received - last[1]) / max(elapsed - last[0], 1e-9)
            print(f" {mark:3d}%  {elapsed:7.2f} s  {rate:12,.0f}")
            last = (elapsed, received)
            mark = next(marks, 1000)
        if mark == 1000 or elapsed > 600:
            break
        time.sleep(0.05)
    print(
        f"drained {total:,} events in {elapsed:.2f} s: {total / elapsed:,.0f} "
        "events/s overall"
    )
    for process in (edge, cloud):
        process.send_signal(signal.SIGTERM)
        process.wait(30)


if __name__ == "__main__":
    main()
