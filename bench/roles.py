"""Starting a real ``edgectl run`` for a bench, on a free loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx


def start_role(
    role: str, folder: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a role on ``folder/ROLE.duckdb``; return the process and its URL
    once /healthz answers."""
    port_file = folder / f"{role}.port"
    log = (folder / f"{role}.log").open("ab")
    command = [
        sys.executable, "-m", "edgectl", "run", "--role", role,
        "--db", str(folder / f"{role}.duckdb"), "--listen", "127.0.0.1:0",
        "--port-file", str(port_file), *args,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        if port_file.exists() and port_file.read_text():
            url = f"http://127.0.0.1:{port_file.read_text()}"
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return process, url
            except httpx.HTTPError:
                pass
        time.sleep(0.02)
    raise SystemExit(f"{role} did not start; see {folder / f'{role}.log'}")
