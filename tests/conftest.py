"""Shared fixtures: real DuckDB files under tmp_path and real role processes."""

from __future__ import annotations

import contextlib
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
            sys.executable,
            "-m",
            "edgectl",
            "run",
            "--role",
            self.role,
            "--db",
            str(self.db),
            "--listen",
            listen,
            "--port-file",
            str(port_file),
            *self.args,
        ]
        handle = self.log.open("ab")
        self.process = subprocess.Popen(
            command,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.db.parent,
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

    def start(
        role: str,
        *args: str,
        name: str | None = None,
        env: dict[str, str] | None = None,
    ) -> RoleProcess:
        name = name or role
        environment = {**os.environ, **(env or {})}
        process = RoleProcess(
            role,
            tmp_path / f"{name}.duckdb",
            list(args),
            environment,
            tmp_path / f"{name}.log",
        )
        started.append(process)
        return process.start()

    yield start
    for process in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.stop()


def wait_for(
    condition, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"
):
    """Poll until ``condition()`` is truthy; returns its value or fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- rule chains: run chains over messages and read back what they stored ----

CHAIN_DATA = REPO / "tests" / "data" / "chains"
FROZEN_NOW = 1_700_000_000_000


@dataclass
class ChainOutcome:
    """What one batch through a chain did, before and after it was stored."""

    run: object
    result: object

    @property
    def failures(self) -> list:
        """Unhandled failures as ``(node id, error)``, in the order they happened."""
        return [(failure.node, failure.error) for failure in self.run.failures]

    @property
    def outputs(self) -> list:
        """Messages that left by an ``output`` node: ``(relation, message)``."""
        return [(labels[0], message) for message, labels in self.result.outputs]


class ChainRunner:
    """Builds engines from YAML text, files or chains built in code, runs a batch
    with the clock frozen at ``now`` and applies the batch to the store."""

    def __init__(self, store: Store, write_chain) -> None:
        self.store = store
        self.write_chain = write_chain
        self.now = FROZEN_NOW
        self.engines: list = []

    def engine(self, chain, *, execution_limit: int = 0, name: str = "chain.yaml"):
        from edgectl.chain import Chain
        from edgectl.checks import load_chain
        from edgectl.engine import DEFAULT_EXECUTION_LIMIT, Engine

        if isinstance(chain, str):
            import textwrap

            chain = self.write_chain(textwrap.dedent(chain), name)
        if not isinstance(chain, Chain):
            chain = load_chain(Path(chain))
        limit = execution_limit or DEFAULT_EXECUTION_LIMIT
        engine = Engine(chain, execution_limit=limit)
        self.engines.append(engine)
        return engine

    def __call__(self, chain, messages, **options) -> ChainOutcome:
        from edgectl.engine import Engine, Run

        engine = chain if isinstance(chain, Engine) else self.engine(chain, **options)
        run = Run(store=self.store, clock=lambda: self.now)
        result = engine.run(list(messages), run)
        self.store.apply(run.changes)
        return ChainOutcome(run, result)

    def close(self) -> None:
        for engine in self.engines:
            engine.close()


@pytest.fixture
def run_chain(store: Store, write_chain) -> Iterator[ChainRunner]:
    """Run messages through a chain against the ``store`` fixture's file."""
    runner = ChainRunner(store, write_chain)
    yield runner
    runner.close()


class StoredRows:
    """Plain views of what a Store holds, for assertions."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _rows(self, sql: str) -> list[tuple]:
        return self.store.cursor().execute(sql).fetchall()

    def readings(self) -> list[tuple]:
        """ts_kv as ``(device, key, ts, value, expires)``, sorted."""
        from edgectl.storage import typed_value
        from edgectl.values import decode

        rows = self._rows(
            "SELECT e.name, k.key, t.ts, t.bool_v, t.long_v, t.dbl_v, t.str_v, "
            "t.json_v, t.expires FROM ts_kv t JOIN entity e ON e.id = t.entity_id "
            "JOIN key_dictionary k ON k.key_id = t.key ORDER BY 1, 2, 3"
        )
        return [(*row[:3], decode(*typed_value(row[3:8])), row[8]) for row in rows]

    def latest(self) -> dict[tuple[str, str], tuple[int, object]]:
        """ts_kv_latest as ``{(device, key): (ts, value)}``."""
        from edgectl.storage import typed_value
        from edgectl.values import decode

        rows = self._rows(
            "SELECT e.name, k.key, t.ts, t.bool_v, t.long_v, t.dbl_v, t.str_v, "
            "t.json_v FROM ts_kv_latest t JOIN entity e ON e.id = t.entity_id "
            "JOIN key_dictionary k ON k.key_id = t.key"
        )
        return {(r[0], r[1]): (r[2], decode(*typed_value(r[3:8]))) for r in rows}

    def attributes(self) -> dict[tuple[str, str, str], tuple[object, int]]:
        """attribute_kv as ``{(device, scope, key): (value, last_update_ts)}``."""
        from edgectl.storage import typed_value
        from edgectl.values import decode

        rows = self._rows(
            "SELECT e.name, a.scope, k.key, a.bool_v, a.long_v, a.dbl_v, a.str_v, "
            "a.json_v, a.last_update_ts FROM attribute_kv a "
            "JOIN entity e ON e.id = a.entity_id JOIN key_dictionary k "
            "ON k.key_id = a.key"
        )
        return {(r[0], r[1], r[2]): (decode(*typed_value(r[3:8])), r[8]) for r in rows}

    def events(self, queue: str = "cloud_event") -> list[dict]:
        """Queued events in sequence order, bodies parsed from JSON."""
        import json

        edge = ", edge" if queue == "edge_event" else ", NULL"
        rows = self._rows(
            f"SELECT seq, action, entity_type, entity_name, body, ts{edge} "
            f"FROM {queue} ORDER BY seq"
        )
        return [
            {
                "seq": seq,
                "action": action,
                "entity": f"{entity_type}/{name}",
                "body": json.loads(body),
                "ts": ts,
                **({"edge": edge_name} if queue == "edge_event" else {}),
            }
            for seq, action, entity_type, name, body, ts, edge_name in rows
        ]


@pytest.fixture
def stored(store: Store) -> StoredRows:
    """Read back rows of the ``store`` fixture's file."""
    return StoredRows(store)


def cloud_chain_refusing(n: int) -> str:
    """A cloud chain that stores telemetry but refuses the reading ``n == N``."""
    return f"""
name: Cloud chain that refuses reading {n}
entry: route
nodes:
  - id: route
    type: message_type_switch
    next:
      Post telemetry: check
  - id: check
    type: filter
    config:
      script: |
        if (msg.n === {n}) {{ throw new Error("reading {n} is poison"); }}
        return true;
    next:
      True: save
  - id: save
    type: save_timeseries
"""
