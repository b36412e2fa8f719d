"""The faults: each scenario hurts the pair at seeded times while devices post.

A scenario is a function of a ``Run``; it sleeps until chosen fractions of the
load's duration (``Run.at``), draws every time and length from the run's seeded
generator (``Run.draw``), acts on the proxy or the processes, and writes what
it did into ``Run.notes`` for the table. After each fault it measures how long
the edge takes to send again (``Run.heal``, the table's "resume s").

- edge-kill: SIGKILL the edge while devices post, some while a batch is in
  flight or its answer is held after the cloud committed, one (from the third
  kill on) while it starts again; restart on the same file and port.
- cloud-kill: SIGKILL the cloud just after a large batch reached it.
- refuse, 503, 429, blackhole, cut-after-commit: the link misbehaves.
- clock: the edge's clock frozen, then stepped back a minute, while events
  queue behind a refusing link.
- poison-mid-batch: the poison reading inside the batch that drains a backlog.
- outage: a long outage, a large backlog, recovery while devices post; the
  edge file's size is measured before, at the peak and after the drain.
- disk-full: the edge's files may not grow (commits fail, devices get 503).
- body-limit: a proxy refuses bodies over 2 KiB with 413, for good.
- garbage-200: something answers 200 with an HTML page instead of the cloud.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .load import Load
from .pair import Role, edge_queue, file_bytes
from .proxy import Proxy

# An edge chain that keeps nothing locally: the file then holds little but the
# queue, so its size after a drain shows whether delivered events give their
# space back.
EDGE_PUSH_ONLY_CHAIN = """\
name: Fault harness edge chain, push only
entry: route
nodes:
  - id: route
    type: message_type_switch
    next:
      Post telemetry: push
  - id: push
    type: push_to_cloud
"""


@dataclass(frozen=True)
class Scale:
    """How much load: devices, readings per request, pause between a device's
    requests, seconds of load, and kills per kill scenario."""

    devices: int
    per_post: int
    interval: float
    duration: float
    kills: int
    drain_timeout: float = 90.0


SHORT = Scale(devices=4, per_post=5, interval=0.005, duration=3.5, kills=2)
LONG = Scale(devices=8, per_post=20, interval=0.002, duration=30.0, kills=5)


@dataclass
class Run:
    """What a scenario works with while the load runs."""

    scale: Scale
    random: random.Random
    folder: Path
    cloud: Role
    edge: Role
    proxy: Proxy
    clock_file: Path
    load: Load | None = None
    notes: Counter[str] = field(default_factory=Counter)
    measures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def at(self, fraction: float) -> None:
        """Sleep until ``fraction`` of the load's duration has passed."""
        assert self.load is not None
        left = fraction * self.scale.duration - self.load.elapsed
        if left > 0:
            time.sleep(left)

    def draw(self, low: float, high: float) -> float:
        """A seeded number between ``low`` and ``high``."""
        return self.random.uniform(low, high)

    def link(self, mode: str, seconds: float, rate: float = 1.0) -> None:
        """Put the link in ``mode`` for ``seconds``, then back to pass, and
        measure how long the edge takes to send again."""
        self.proxy.set_mode(mode, rate=rate)
        time.sleep(seconds)
        self.heal()
        self.notes[f"{mode} {seconds:.1f}s"] += 1

    def heal(self, action: Callable[[], Any] | None = None) -> None:
        """End a fault (by default, put the link back to pass), then wait for
        the edge's next uplink request and keep the longest such wait in
        ``measures["resume s"]``. An edge whose queue is empty has nothing to
        send, and that is no failure to resume."""
        self.proxy.uplink_forwarded.clear()
        healed = time.monotonic()
        if action is None:
            self.proxy.set_mode("pass")
        else:
            action()
        while not self.proxy.uplink_forwarded.wait(0.25):
            if time.monotonic() - healed > 60:
                self.problems.append("the edge sent nothing for 60 s after a fault")
                break
            if edge_queue(self.edge)["pending"] == 0:
                return
        waited = time.monotonic() - healed
        self.measures["resume s"] = max(self.measures.get("resume s", 0.0), waited)


@dataclass(frozen=True)
class Scenario:
    """A named way to hurt the pair, run while the devices post."""

    name: str
    inject: Callable[[Run], None]
    poison_at: tuple[float, float] = (0.2, 0.6)
    edge_chain: str | None = None
    measure_file: bool = False
    lasting: bool = False
    """The link keeps its last mode through the drain: a property of the
    deployment (a body limit), not a passing fault."""


def kill_edge(run: Run) -> None:
    """SIGKILL the edge while devices post; every other kill lands while an
    uplink batch is in flight (the cloud has it, the edge has no answer yet)."""
    for index in range(run.scale.kills):
        run.at(run.draw(0.1, 0.8) * (index + 1) / run.scale.kills)
        if index % 2:
            run.proxy.delay = 0.3
            run.proxy.uplink_forwarded.clear()
            run.proxy.uplink_forwarded.wait(5)
            time.sleep(run.draw(0.0, 0.25))
            at_cloud, in_flight = run.proxy.at_cloud, run.proxy.in_flight
            run.edge.kill()
            if at_cloud:
                run.notes["edge killed, batch at the cloud"] += 1
            elif in_flight:
                run.notes["edge killed, cloud committed, answer held"] += 1
            else:
                run.notes["edge killed"] += 1
        else:
            run.edge.kill()
            run.notes["edge killed"] += 1
        time.sleep(run.draw(0.1, 0.8))
        run.proxy.delay = 0.0
        if index == 2:
            # Killed again while it opens its file and replays its WAL.
            run.edge.launch()
            time.sleep(run.draw(0.2, 1.5))
            run.edge.kill()
            run.notes["edge killed while starting"] += 1
        run.heal(run.edge.start)


def kill_cloud(run: Run) -> None:
    """Let a backlog build, then SIGKILL the cloud just after a batch reached it
    (whether it was still applying is counted from the proxy)."""
    for index in range(run.scale.kills):
        run.at(run.draw(0.05, 0.5) * (index + 1) / run.scale.kills)
        run.proxy.set_mode("refuse")
        time.sleep(run.draw(0.5, 1.2))
        run.proxy.uplink_forwarded.clear()
        run.proxy.set_mode("pass")
        run.proxy.uplink_forwarded.wait(5)
        time.sleep(run.draw(0.0, 0.03))
        applying = run.proxy.at_cloud > 0
        run.cloud.kill()
        run.notes["cloud killed mid-batch" if applying else "cloud killed"] += 1
        time.sleep(run.draw(0.2, 1.0))
        run.heal(run.cloud.start)


def flaky(mode: str, rates: tuple[float, float] = (1.0, 1.0)) -> Callable[[Run], None]:
    """Two periods of ``mode`` on the link, at seeded times and lengths."""

    def inject(run: Run) -> None:
        for start in (run.draw(0.05, 0.3), run.draw(0.5, 0.7)):
            run.at(start)
            seconds = run.draw(0.1, 0.2) * run.scale.duration
            run.link(mode, seconds, rate=run.draw(*rates))

    return inject


def blackhole(run: Run) -> None:
    """One period in which the link swallows requests; the edge learns only by
    its own timeout, and held requests stay held after the period."""
    run.at(run.draw(0.1, 0.4))
    run.link("blackhole", run.draw(0.15, 0.3) * run.scale.duration)


def clock(run: Run) -> None:
    """Freeze the edge's clock, queue events under it, step it back a minute."""
    run.at(run.draw(0.05, 0.15))
    run.clock_file.write_text(f"frozen {time.time_ns() // 1_000_000}")
    run.notes["clock frozen"] += 1
    run.at(run.draw(0.2, 0.3))
    run.proxy.set_mode("refuse")
    run.at(run.draw(0.4, 0.5))
    run.clock_file.write_text("offset -60000")
    run.notes["clock stepped back 60s"] += 1
    run.at(run.draw(0.6, 0.7))
    run.heal()
    run.notes["refused while queueing"] += 1


def poison_in_batch(run: Run) -> None:
    """An outage around the poison, so it sits inside the batch that drains it."""
    run.at(0.15)
    run.link("refuse", 0.5 * run.scale.duration)


def outage(run: Run) -> None:
    """A long outage with a backlog, then recovery while devices keep posting."""
    run.at(0.05)
    run.proxy.set_mode("refuse")
    run.at(0.75)
    run.measures["peak bytes"] = file_bytes(run.edge.db)
    run.measures["backlog"] = edge_queue(run.edge)["pending"]
    run.heal()
    run.notes["refused for 70% of the load"] += 1


def body_limit(run: Run) -> None:
    """A reverse proxy in front of the cloud refuses bodies over 2 KiB with 413,
    from the start and for good, while a backlog makes batches large."""
    run.proxy.max_body = 2 * 1024
    run.proxy.set_mode("413")
    run.at(run.draw(0.1, 0.2))
    run.link("refuse", run.draw(0.3, 0.4) * run.scale.duration)
    run.proxy.set_mode("413")
    run.notes["bodies over 2 KiB refused"] += 1


def disk_full(run: Run) -> None:
    """The edge's disk fills: no file may grow more than 4 KiB past what the WAL
    holds now, so commits fail and devices get 503 (and post the same readings
    again). Space comes back a while after the first 503; later the edge is
    killed and restarted, so it replays a WAL that saw failed commits."""
    assert run.load is not None
    run.at(run.draw(0.1, 0.3))
    wal = run.edge.db.with_name(run.edge.db.name + ".wal")
    run.edge.limit_file_size((wal.stat().st_size if wal.exists() else 0) + 4096)
    deadline = time.monotonic() + 0.4 * run.scale.duration
    while time.monotonic() < deadline and not refusals(run.load):
        time.sleep(0.02)
    time.sleep(run.draw(0.1, 0.2) * run.scale.duration)
    run.heal(lambda: run.edge.limit_file_size(None))
    run.notes["disk full"] += 1
    run.at(run.draw(0.6, 0.8))
    run.edge.kill()
    run.heal(run.edge.start)
    run.notes["edge killed"] += 1


def refusals(load: Load) -> int:
    """How many requests the edge answered 503 so far."""
    return sum(record.statuses["503"] for record in load.records)


SCENARIOS = {
    scenario.name: scenario
    for scenario in (
        Scenario("edge-kill", kill_edge),
        Scenario("cloud-kill", kill_cloud),
        Scenario("refuse", flaky("refuse")),
        Scenario("503", flaky("503", (0.5, 1.0))),
        Scenario("429", flaky("429", (0.5, 1.0))),
        Scenario("blackhole", blackhole),
        Scenario("cut-after-commit", flaky("cut", (0.5, 1.0))),
        Scenario("clock", clock),
        Scenario("poison-mid-batch", poison_in_batch, poison_at=(0.35, 0.5)),
        Scenario("outage", outage, edge_chain=EDGE_PUSH_ONLY_CHAIN, measure_file=True),
        Scenario("disk-full", disk_full),
        Scenario("body-limit", body_limit, lasting=True),
        Scenario("garbage-200", flaky("garbage", (0.5, 1.0))),
    )
}
