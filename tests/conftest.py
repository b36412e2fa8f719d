"""Shared fixtures: real DuckDB files under tmp_path and real role processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from edgectl.storage import Store

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RULECHAINS = REPO / "edgectl" / "rulechains"


def shared_path(*parts: str) -> Path:
    """A file under ../shared, skipping the test with a reason when absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: ../shared is only beside the repo in CI")
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh Store in a real DuckDB file."""
    opened = Store(tmp_path / "test.duckdb")
    yield opened
    opened.close()


@pytest.fixture
def write_chain(tmp_path: Path):
    """Write YAML text to a file under tmp_path and return its path."""

    def write(text: str, name: str = "chain.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@dataclass
class RoleProcess:
    """A running ``edgectl run`` subprocess and how to reach it."""

    role: str
    db: Path
    args: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    port: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def start(self, timeout: float = 20.0) -> RoleProcess:
        """Start (or restart) the process and wait until /healthz answers."""
        port_file = self.log.with_suffix(".port")
        port_file.unlink(missing_ok=True)
        listen = f"127.0.0.1:{self.port}" if self.port else "127.0.0.1:0"
        command = [
            sys.executable, "-m", "edgectl", "run", "--role", self.role,
            "--db", str(self.db), "--listen", listen, "--port-file", str(port_file),
            *self.args,
        ]
        handle = self.log.open("ab")
        self.process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=self.env, cwd=self.db.parent
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.role} exited early:\n{self.log.read_text()}")
            if port_file.exists() and port_file.read_text():
                self.port = int(port_file.read_text())
                self.url = f"http://127.0.0.1:{self.port}"
                if _healthy(self.url):
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.role} did not start:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the process and wait for it; returns its exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        """SIGKILL: no cleanup, as a crash would leave it."""
        self.stop(signal.SIGKILL)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def roles(tmp_path: Path) -> Iterator[callable]:
    """Start edge and cloud processes; every one is stopped after the test."""
    started: list[RoleProcess] = []

    def start(role: str, *args: str, name: str | None = None, env: dict[str, str] | None = None) -> RoleProcess:
        name = name or role
        environment = {**os.environ, **(env or {})}
        process = RoleProcess(
            role, tmp_path / f"{name}.duckdb", list(args), environment, tmp_path / f"{name}.log"
        )
        started.append(process)
        return process.start()

    yield start
    for process in started:
        try:
            process.stop()
        except subprocess.TimeoutExpired:
            pass


def wait_for(condition, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    """Poll until ``condition()`` is truthy; returns its value or fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
