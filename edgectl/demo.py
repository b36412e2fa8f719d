"""``edgectl demo``: a cloud and an edge on loopback, simulated devices, a summary.

The demo runs the real thing: two ``edgectl run`` processes with the example
chains and fresh DuckDB files, devices posting through the device HTTP API,
and (with an outage) the cloud stopped mid-run so the edge's queue grows and
then drains. It ends by comparing what both files hold.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from edgectl.errors import EdgectlError

EDGE_KEY = "demo-edge"


@dataclass
class Snapshot:
    """What the live view shows, per role, at one moment."""

    elapsed: float
    phase: str
    edge: dict[str, float] = field(default_factory=dict)
    cloud: dict[str, float] = field(default_factory=dict)
    cloud_up: bool = True


@dataclass
class Comparison:
    """Per device: readings and latest values on each side, and whether they match."""

    rows: list[dict[str, Any]]
    edge_file: Path
    cloud_file: Path

    @property
    def matches(self) -> bool:
        """True when every device holds the same rows on both sides."""
        return all(row["match"] for row in self.rows)


class _Role:
    def __init__(self, role: str, folder: Path, args: list[str], env: dict[str, str]):
        self.role, self.folder, self.args, self.env = role, folder, args, env
        self.db = folder / f"{role}.duckdb"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        port_file = self.folder / f"{self.role}.port"
        port_file.unlink(missing_ok=True)
        log = (self.folder / f"{self.role}.log").open("ab")
        command = [
            sys.executable,
            "-m",
            "edgectl",
            "run",
            "--role",
            self.role,
            "--db",
            str(self.db),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--port-file",
            str(port_file),
            *self.args,
        ]
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env
        )
        _wait(
            lambda: port_file.exists() and port_file.read_text(),
            20,
            f"the {self.role}",
            self,
        )
        self.port = int(port_file.read_text())
        _wait(lambda: _healthy(self.url), 20, f"the {self.role}", self)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(condition: Callable[[], Any], seconds: float, what: str, role: _Role) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if role.process is not None and role.process.poll() is not None:
            log = role.folder / f"{role.role}.log"
            raise EdgectlError(f"{what} stopped while starting; see {log}")
        if condition():
            return
        time.sleep(0.05)
    raise EdgectlError(f"{what} did not start within {seconds:.0f} s")


def read_metrics(url: str) -> dict[str, float]:
    """The role's /metrics as ``{name: value}`` (labels dropped)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return {}
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line or "quantile" in line:
            continue
        name, _, value = line.rpartition(" ")
        values[name.split("{")[0].removeprefix("edgectl_")] = float(value)
    return values


class Demo:
    """One demo run in ``folder``; ``on_tick`` gets a Snapshot twice a second."""

    def __init__(
        self,
        folder: Path,
        *,
        devices: int = 3,
        seconds: float = 20.0,
        rate: float = 20.0,
        outage: float = 0.0,
        on_tick: Callable[[Snapshot], None] = lambda snapshot: None,
    ) -> None:
        self.folder = folder
        self.devices = [f"demo-sensor-{n + 1}" for n in range(devices)]
        self.seconds, self.rate, self.outage = seconds, rate, outage
        self.on_tick = on_tick
        env = {**os.environ, "EDGECTL_EDGE_SECRET": "demo-secret"}
        self.cloud = _Role("cloud", folder, [], env)
        self.edge: _Role | None = None
        self.env = env
        self.started = time.monotonic()
        self.phase = "starting"

    def run(self) -> Comparison:
        """Run the demo to the end (or Ctrl-C) and compare both files."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
            self._feed()
            self._drain()
        except KeyboardInterrupt:
            self.phase = "interrupted"
        finally:
            self._stop()
        return compare(self.folder / "edge.duckdb", self.folder / "cloud.duckdb")

    def _start(self) -> None:
        self.cloud.start()
        body = {"name": "demo-edge", "key": EDGE_KEY, "secret": "demo-secret"}
        httpx.post(f"{self.cloud.url}/api/edgectl/edges", json=body, timeout=10)
        args = ["--cloud", self.cloud.url, "--edge-key", EDGE_KEY]
        self.edge = _Role("edge", self.folder, args, self.env)
        self.edge.start()
        for name in self.devices:
            device = {"name": name, "type": "thermometer", "token": f"token-{name}"}
            httpx.post(f"{self.edge.url}/api/edgectl/devices", json=device, timeout=10)

    def _feed(self) -> None:
        assert self.edge is not None
        outage_at = self.seconds / 3 if self.outage else math.inf
        restart_at = outage_at + self.outage
        interval, sent = 1.0 / self.rate, 0
        with httpx.Client(base_url=self.edge.url, timeout=10) as client:
            while (elapsed := time.monotonic() - self.started) < self.seconds:
                self._outage(elapsed, outage_at, restart_at)
                self._post(client, sent)
                sent += 1
                self._tick()
                time.sleep(interval)
            if self.cloud.process is None or self.cloud.process.poll() is not None:
                self.cloud.start()

    def _outage(self, elapsed: float, begin: float, end: float) -> None:
        up = self.cloud.process is not None and self.cloud.process.poll() is None
        if up and begin <= elapsed < end:
            self.phase = f"cloud stopped for {self.outage:.0f} s"
            self.cloud.stop()
        elif not up and elapsed >= end:
            self.phase = "cloud back, queue draining"
            self.cloud.start()

    def _post(self, client: httpx.Client, count: int) -> None:
        if self.phase == "starting":
            self.phase = "devices posting"
        name = self.devices[count % len(self.devices)]
        phase = count / 50
        values = {
            "temperature": round(
                21 + 3 * math.sin(phase) + random.uniform(-0.2, 0.2), 2
            ),
            "humidity": round(45 + 5 * math.cos(phase), 1),
            "reading": count,
        }
        client.post(f"/api/v1/token-{name}/telemetry", json=values)
        if count % 40 == 0:
            client.post(f"/api/v1/token-{name}/attributes", json={"firmware": "1.4.2"})

    def _tick(self) -> None:
        now = time.monotonic()
        if now - getattr(self, "_last_tick", 0.0) < 0.5:
            return
        self._last_tick = now
        assert self.edge is not None
        cloud_up = self.cloud.process is not None and self.cloud.process.poll() is None
        self.on_tick(
            Snapshot(
                now - self.started,
                self.phase,
                read_metrics(self.edge.url),
                read_metrics(self.cloud.url) if cloud_up else {},
                cloud_up,
            )
        )

    def _drain(self, seconds: float = 60.0) -> None:
        assert self.edge is not None
        self.phase = "draining the queue"
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._tick()
            if read_metrics(self.edge.url).get("queue_depth", 1) == 0:
                self.phase = "done"
                self._tick()
                return
            time.sleep(0.2)

    def _stop(self) -> None:
        if self.edge is not None:
            self.edge.stop()
        self.cloud.stop()


def compare(edge_file: Path, cloud_file: Path) -> Comparison:
    """Per device, count readings and latest values on both (stopped) files."""
    from edgectl.storage import Store
    from edgectl.tables import RowFilter, rows

    def holdings(path: Path) -> dict[str, dict[str, Any]]:
        store = Store(path)
        try:
            history = rows(store, "ts_kv", RowFilter(limit=10**9))
            latest = rows(store, "ts_kv_latest", RowFilter(limit=10**9))
        finally:
            store.close()
        found: dict[str, dict[str, Any]] = {}
        for row in history:
            item = found.setdefault(row["device"], {"rows": set(), "latest": {}})
            item["rows"].add((row["key"], row["ts"], repr(row["value"])))
        for row in latest:
            found.setdefault(row["device"], {"rows": set(), "latest": {}})
            found[row["device"]]["latest"][row["key"]] = row["value"]
        return found

    edge, cloud = holdings(edge_file), holdings(cloud_file)
    result = []
    for device in sorted(set(edge) | set(cloud)):
        mine = edge.get(device, {"rows": set(), "latest": {}})
        theirs = cloud.get(device, {"rows": set(), "latest": {}})
        result.append(
            {
                "device": device,
                "edge_rows": len(mine["rows"]),
                "cloud_rows": len(theirs["rows"]),
                "latest": mine["latest"],
                "match": mine["rows"] == theirs["rows"]
                and mine["latest"] == theirs["latest"],
            }
        )
    return Comparison(result, edge_file, cloud_file)
