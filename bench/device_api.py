"""Device API bench: requests/s posted to a running edge, beside a bare handler.

Starts a real edge (``edgectl run``, no cloud, so events stay queued) and, in
the same run, the same server software (uvicorn with the same settings)
serving a handler that only parses the JSON and answers 200. wrk loads each
with POSTs of one telemetry object; the ratio of the two is the cost of
edgectl itself (token lookup, checks, ingest journal, chain, group commit).
The edge answers once a request is synced to its journal; afterwards the
bench reads the table counts (the admin API waits until every answered
request is stored) and prints them beside the number answered.

Usage: ``python bench/device_api.py [--seconds N] [--connections N]``; needs
wrk (Debian package ``wrk``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
from roles import start_role

BARE_APP = textwrap.dedent(
    """
    import orjson, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def telemetry(request):
        orjson.loads(await request.body())
        return Response(status_code=200)

    route = Route("/api/v1/{token}/telemetry", telemetry, methods=["POST"])
    app = Starlette(routes=[route])
    uvicorn.run(app, host="127.0.0.1", port=int(__import__("sys").argv[1]),
                log_config=None, access_log=False, timeout_keep_alive=30,
                limit_concurrency=4096)
    """
)
WRK_SCRIPT = textwrap.dedent(
    """
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
    counter = 0
    request = function()
      counter = counter + 1
      local t = (counter % 100) .. '.5'
      local body = '{"temperature": ' .. t .. ', "n": ' .. counter .. '}'
      return wrk.format(nil, nil, nil, body)
    end
    """
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_up(url: str) -> None:
    for _ in range(400):
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def load(url: str, seconds: int, connections: int, script: Path) -> tuple[float, int]:
    """Requests/s answered 200, and how many were."""
    result = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    total = re.search(r"(\d+) requests in", result.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", result.stdout)
    failed = int(errors.group(1)) if errors else 0
    if failed:
        print(f"  warning: {failed} non-2xx answers")
    answered = int(total.group(1)) - failed if total else 0
    return (float(found.group(1)) if found else 0.0), answered


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    options = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    folder = Path(tempfile.mkdtemp(prefix="edgectl-bench-api-"))
    script = folder / "post.lua"
    script.write_text(WRK_SCRIPT)
    print(
        f"cores: {os.cpu_count()}  wrk: 2 threads, {options.connections} "
        f"connections, {options.seconds} s"
    )

    bare_port = free_port()
    bare = subprocess.Popen([sys.executable, "-c", BARE_APP, str(bare_port)])
    wait_up(f"http://127.0.0.1:{bare_port}/")
    bare_rate, _ = load(
        f"http://127.0.0.1:{bare_port}/api/v1/T/telemetry",
        options.seconds,
        options.connections,
        script,
    )
    bare.send_signal(signal.SIGTERM)
    bare.wait(20)

    subprocess.run(
        [
            sys.executable,
            "-m",
            "edgectl",
            "devices",
            "add",
            "bench",
            "--token",
            "BENCH",
            "--db",
            str(folder / "edge.duckdb"),
        ],
        check=True,
        capture_output=True,
    )
    edge, edge_url = start_role("edge", folder)
    edge_rate, answered = load(
        f"{edge_url}/api/v1/BENCH/telemetry",
        options.seconds,
        options.connections,
        script,
    )
    # The admin API reads once every answered request is stored.
    overview = httpx.get(f"{edge_url}/api/edgectl/tables", timeout=60)
    rows = {t["table"]: t["rows"] for t in overview.json()["tables"]}
    edge.send_signal(signal.SIGTERM)
    edge.wait(30)

    print(f"bare handler (parse JSON, 200): {bare_rate:10,.0f} requests/s")
    print(
        f"edgectl edge (journaled, then stored and queued): {edge_rate:10,.0f} "
        f"requests/s of one reading of 2 keys"
    )
    print(
        f"answered 200: {answered:,} requests; stored: {rows.get('ts_kv', 0):,} "
        f"rows in ts_kv, {rows.get('cloud_event', 0):,} events queued (wrk does "
        "not count the requests in flight when it stops, one a connection; one "
        "event announces the device)"
    )
    print(f"ratio: {edge_rate / bare_rate:.0%} of the bare handler")


if __name__ == "__main__":
    main()
