"""The edge and cloud of a fault run: ``edgectl run`` subprocesses and their APIs."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


@dataclass
class Role:
    """One ``edgectl run`` subprocess; restarts reuse its file and port."""

    role: str
    folder: Path
    args: list[str]
    env: dict[str, str]
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def db(self) -> Path:
        return self.folder / f"{self.role}.duckdb"

    @property
    def log(self) -> Path:
        return self.folder / f"{self.role}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Role:
        """Start and wait until /healthz answers."""
        port_file = self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.role} exited early; see {self.log}")
            if port_file.exists() and port_file.read_text().strip():
                self.port = int(port_file.read_text())
                if _healthy(self.url):
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.role} did not start in {timeout} s; see {self.log}")

    def launch(self) -> Path:
        """Start the process without waiting; returns the file its port goes to."""
        port_file = self.folder / f"{self.role}.port"
        port_file.unlink(missing_ok=True)
        command = [sys.executable, "-m", "edgectl", "run", "--role", self.role]
        command += ["--db", str(self.db), "--listen", f"127.0.0.1:{self.port}"]
        command += ["--port-file", str(port_file), *self.args]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.folder,
                preexec_fn=_ignore_file_size_signal,
            )
        return port_file

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut of the process would leave it."""
        self._signal(signal.SIGKILL)

    def stop(self) -> int:
        """SIGTERM and wait; a process that hangs is killed (and that is said)."""
        return self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            message = f"{self.role} did not stop on signal {sig}; see {self.log}"
            raise RuntimeError(message) from None

    def limit_file_size(self, size: int | None) -> None:
        """Let the process write no file past ``size`` bytes (None: no limit).

        Writes past it fail with EFBIG, as on a full disk: DuckDB's commit
        fails with "File too large". The limit is RLIMIT_FSIZE, changed on
        the running process with prlimit(2).
        """
        assert self.process is not None
        limit = resource.RLIM_INFINITY if size is None else size
        resource.prlimit(
            self.process.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY)
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _ignore_file_size_signal() -> None:
    # Past RLIMIT_FSIZE the kernel sends SIGXFSZ, which kills by default; a
    # process that ignores it sees the write fail instead, as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def call(url: str, method: str, path: str, body: Any = None, **params: Any) -> Any:
    """One admin API call; fails loudly on any non-200."""
    response = httpx.request(
        method, f"{url}{path}", json=body, params=params or None, timeout=60.0
    )
    if response.status_code != 200:
        raise RuntimeError(
            f"{url}{path} answered {response.status_code}: {response.text}"
        )
    return response.json() if response.content else None


def edge_queue(edge: Role) -> dict[str, Any]:
    """The edge's cloud queue: pending, dead letters, cursor."""
    queues = call(edge.url, "GET", "/api/edgectl/tables")["queues"]
    return next(q for q in queues if q["queue"] == "cloud_event")


def file_bytes(db: Path) -> int:
    """The DuckDB file and its write-ahead log, in bytes."""
    wal = db.with_name(db.name + ".wal")
    return sum(path.stat().st_size for path in (db, wal) if path.exists())
