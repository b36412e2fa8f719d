"""Fault-injection harness: a real edge and cloud, a proxy between them, and counts.

Each run starts a cloud and an edge as ``edgectl run`` subprocesses on fresh
files, with the proxy of ``proxy.py`` between them (the edge's ``--cloud`` is
the proxy), registers a few devices on the edge and lets them post numbered
readings (``load.py``) while a scenario injects faults at times drawn from a
seeded generator. Then every fault is cleared, the edge's queue is left to
drain, and the harness counts per device.

How the counts are made real
----------------------------
The cloud runs the harness's own chain (``CLOUD_CHAIN``). Every telemetry
message is saved twice:

- as sent, key ``n`` at ts ``BASE + n``: this is what a user would query, and
  gives "present". It cannot show a doubled delivery, because ts_kv keeps one
  row per (device, key, ts) and a second write of the same reading lands on the
  same row;
- through a transform that stamps the message with an arrival number and saves
  ``applied = n`` at ts = that number. Each application of a reading is a row
  of its own, so a reading applied twice shows as two ``applied`` rows
  ("duplicated"), and reading the rows in arrival order gives the order the
  cloud applied them in ("out of order": a reading whose first application came
  after a higher-numbered reading of the same device).

The arrival number is ``base + count``: ``count`` a global of the transform's
V8 isolate, bumped once per message in batch order, and ``base`` the cloud's
``Date.now() * 1000`` when the isolate first ran. A cloud killed and restarted
starts a fresh isolate with a later base, more than 1,000 numbers per elapsed
millisecond ahead of the old one, so stamps keep rising across restarts while
staying exact in a JavaScript double. Only committed transactions leave rows,
so a batch cut short by a kill leaves no stamps; a rerun of part of a batch
(after a rejection) only skips numbers.

A device never re-posts a reading that might have been stored (see
``load.py``), so a doubled reading on the cloud is the sync's doing. Readings
whose answer was lost ("unknown") are not counted missing when absent, but any
that arrive are checked for duplicates and order like the rest.

The poison: the first device posts a reading with ``"poison": 1`` (and, if the
edge's answer to it was lost, another with the next number, until one is
accepted); the cloud chain's filter throws for it, so the cloud rejects that
event for good, in the middle of whatever batch carries it. An accepted
poison must end in the edge's dead letters exactly once with the filter's
error, one whose answer was lost at most once, and none may reach the cloud.

Expected in every run: missing 0, duplicated 0, out of order 0 per device, the
poison (when the edge accepted it) dead-lettered with its error and nothing
else dead-lettered, and the edge's queue back to empty.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .load import BASE_TS, DeviceRecord, Load
from .pair import Role, call, edge_queue, file_bytes
from .proxy import Proxy
from .scenarios import LONG, SCENARIOS, SHORT, Run, Scale, Scenario, refusals

EDGE_KEY, EDGE_SECRET = "fault-edge-key", "fault-edge-secret"
POISON_ERROR = "is poison"

CLOUD_CHAIN = """\
name: Fault harness cloud chain
entry: route
nodes:
  - id: route
    type: message_type_switch
    next:
      Post telemetry: refuse-poison
  - id: refuse-poison
    type: filter
    config:
      script: |
        if (msg.poison !== undefined) {
          throw new Error("reading " + msg.n + " is poison");
        }
        return true;
    next:
      True: [save, stamp]
  - id: save
    type: save_timeseries
  - id: stamp
    type: transform
    config:
      script: |
        if (globalThis.arrivalBase === undefined) {
          globalThis.arrivalBase = Date.now() * 1000;
          globalThis.arrivals = 0;
        }
        globalThis.arrivals += 1;
        metadata.ts = String(globalThis.arrivalBase + globalThis.arrivals);
        return {msg: {applied: msg.n}, metadata: metadata};
    next:
      Success: save-applied
  - id: save-applied
    type: save_timeseries
"""


# -- counting ----------------------------------------------------------------


@dataclass
class DeviceCount:
    """Final figures of one device."""

    name: str
    accepted: int
    unknown: int
    present: int
    missing: int
    duplicated: int
    out_of_order: int
    phantom: int


@dataclass
class Result:
    """The figures and problems of one run."""

    scenario: str
    seed: int
    devices: list[DeviceCount] = field(default_factory=list)
    poison: str = ""
    pending: int = -1
    dead_letters: int = 0
    drain_seconds: float = 0.0
    notes: Counter[str] = field(default_factory=Counter)
    measures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    folder: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def explain(self, lines: int = 40) -> str:
        """The problems and the end of each process's log, for a failure."""
        text = "\n".join(f"- {problem}" for problem in self.problems)
        for role in ("edge", "cloud"):
            log = self.folder / f"{role}.log" if self.folder else None
            if log is not None and log.exists():
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                text += f"\n--- last {lines} lines of {log}:\n" + "\n".join(tail)
        return text

    def total(self, name: str) -> int:
        return sum(getattr(device, name) for device in self.devices)


def count_device(
    record: DeviceRecord, n_rows: list[dict], applied_rows: list[dict]
) -> DeviceCount:
    """Compare what the edge accepted with what the cloud holds and applied."""
    present = {row["value"] for row in n_rows if row["ts"] == BASE_TS + row["value"]}
    applications = Counter(row["value"] for row in applied_rows)
    order = [row["value"] for row in sorted(applied_rows, key=lambda row: row["ts"])]
    out_of_order, highest, seen = 0, -1, set()
    for number in order:
        if number in seen:
            continue
        seen.add(number)
        if number < highest:
            out_of_order += 1
        highest = max(highest, number)
    posted = record.accepted | record.unknown
    return DeviceCount(
        record.name,
        accepted=len(record.accepted),
        unknown=len(record.unknown),
        present=len(record.accepted & present),
        missing=len(record.accepted - present),
        duplicated=sum(1 for count in applications.values() if count > 1),
        out_of_order=out_of_order,
        phantom=len((present | set(applications)) - posted),
    )


def wait_drained(run: Run, timeout: float) -> tuple[int, float]:
    """Wait for the edge's queue to empty; returns what is left and the wait."""
    started = time.monotonic()
    pending = -1
    while time.monotonic() - started < timeout:
        pending = edge_queue(run.edge)["pending"]
        if pending == 0:
            break
        time.sleep(0.1)
    return pending, time.monotonic() - started


def check_poison(result: Result, record: DeviceRecord, dead: list[dict]) -> None:
    """Every accepted poison reading dead-lettered once with the chain's error, a
    poison whose answer was lost at most once, and nothing else dead."""
    letters = Counter()
    for letter in dead:
        number = _poison_number(letter["body"])
        if number is None:
            result.problems.append(f"dead letter {letter['seq']} is not the poison")
            continue
        letters[number] += 1
        if POISON_ERROR not in str(letter["last_error"]):
            result.problems.append(f"dead letter without the poison's error: {letter}")
    for number, accepted in record.poisons.items():
        expected = (1,) if accepted else (0, 1)
        if letters[number] not in expected:
            result.problems.append(
                f"poison reading {number} ({'accepted' if accepted else 'unknown'}) "
                f"has {letters[number]} dead letters"
            )
    if set(letters) - set(record.poisons):
        result.problems.append("a poison dead letter that no device posted")
    accepted = [n for n, ok in record.poisons.items() if ok]
    result.poison = "dead" if accepted and letters[accepted[0]] == 1 else "none"


def _poison_number(body: str) -> int | None:
    data = json.loads(body)
    values = data.get("data") if isinstance(data, dict) else None
    if isinstance(values, dict) and "poison" in values:
        return int(values["n"])
    return None


def collect(run: Run, result: Result) -> None:
    """Count per device and check the poison and the queue."""
    assert run.load is not None
    edge_url, cloud_url = run.edge.url, run.cloud.url
    for record in run.load.records:
        rows = call(
            cloud_url,
            "GET",
            "/api/edgectl/tables/ts_kv",
            device=record.name,
            limit=10**7,
        )
        n_rows = [row for row in rows if row["key"] == "n"]
        applied_rows = [row for row in rows if row["key"] == "applied"]
        device = count_device(record, n_rows, applied_rows)
        result.devices.append(device)
        reached = {row["value"] for row in n_rows} & set(record.poisons)
        if reached:
            result.problems.append(
                f"poison readings {sorted(reached)} reached the cloud"
            )
        for name in ("missing", "duplicated", "out_of_order", "phantom"):
            if getattr(device, name):
                result.problems.append(f"{device.name}: {name} {getattr(device, name)}")
    for record in run.load.records:
        for answer, count in record.statuses.items():
            if answer.split(" ")[0].isdigit() and answer not in ("200", "503"):
                result.problems.append(
                    f"{record.name}: {count} x the edge answered {answer}"
                )
    dead = call(edge_url, "POST", "/api/edgectl/replay/list", {"state": "dead"})
    result.dead_letters = len(dead)
    check_poison(result, run.load.records[0], dead)


def run_one(scenario: Scenario, seed: int, scale: Scale, folder: Path) -> Result:
    """Run one scenario with one seed in ``folder``; never raises for a failed
    check (the result lists the problems), only for a broken harness."""
    rng = random.Random(f"{scenario.name}:{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    clock_file = folder / "edge-clock"
    clock_file.write_text("")
    environment = {**os.environ, "EDGECTL_EDGE_SECRET": EDGE_SECRET}
    (folder / "cloud-chain.yaml").write_text(CLOUD_CHAIN)
    cloud = Role("cloud", folder, ["--chain", "cloud-chain.yaml"], environment)
    edge_args = ["--edge-key", EDGE_KEY]
    if scenario.edge_chain:
        (folder / "edge-chain.yaml").write_text(scenario.edge_chain)
        edge_args += ["--chain", "edge-chain.yaml"]
    edge = Role(
        "edge",
        folder,
        edge_args,
        {**environment, "EDGECTL_FAULT_CLOCK": str(clock_file)},
    )
    result = Result(scenario.name, seed, folder=folder)
    proxy: Proxy | None = None
    try:
        cloud.start()
        edge_account = {"name": "fault-edge", "key": EDGE_KEY, "secret": EDGE_SECRET}
        call(cloud.url, "POST", "/api/edgectl/edges", edge_account)
        proxy = Proxy(cloud.port, seed=rng.randrange(2**32)).start()
        edge.args = ["--cloud", proxy.url, *edge.args]
        edge.start()
        run = Run(scale, rng, folder, cloud, edge, proxy, clock_file)
        _exercise(run, scenario, result)
    finally:
        if proxy is not None:
            proxy.stop()
        for role in (edge, cloud):
            try:
                role.stop()
            except RuntimeError as error:
                result.problems.append(str(error))
    return result


def _exercise(run: Run, scenario: Scenario, result: Result) -> None:
    devices = [(f"dev-{i}", f"T-dev-{i}") for i in range(run.scale.devices)]
    for name, token in devices:
        device = {"name": name, "type": "meter", "token": token}
        call(run.edge.url, "POST", "/api/edgectl/devices", device)
    if scenario.measure_file:
        # A clean stop checkpoints, so the size of the closed file is the baseline.
        run.edge.stop()
        result.measures["baseline bytes"] = file_bytes(run.edge.db)
        run.edge.start()
    poison_after = run.draw(*scenario.poison_at) * run.scale.duration
    run.load = Load(
        run.edge.url,
        devices,
        interval=run.scale.interval,
        duration=run.scale.duration,
        per_post=run.scale.per_post,
        poison_after=poison_after,
    ).start()
    scenario.inject(run)
    run.load.join(run.scale.duration + 60)
    if not scenario.lasting:
        run.proxy.set_mode("pass")
    run.proxy.delay = 0.0
    for role in (run.cloud, run.edge):
        if not role.running:
            role.start()
    result.pending, result.drain_seconds = wait_drained(run, run.scale.drain_timeout)
    if result.pending:
        result.problems.append(
            f"{result.pending} events still queued {run.scale.drain_timeout:.0f} s "
            "after the faults ended"
        )
    collect(run, result)
    result.notes = run.notes
    for what in (
        "answers cut",
        "cloud closed",
        "503",
        "429",
        "413",
        "blackhole",
        "garbage",
    ):
        if run.proxy.counts[what]:
            result.notes[f"{what}: {run.proxy.counts[what]} requests"] += 1
    result.measures.update(run.measures)
    result.problems += run.problems
    refused = refusals(run.load)
    if refused:
        result.notes[f"edge answered 503 to {refused} requests"] += 1
    if scenario.measure_file:
        run.edge.stop()
        result.measures["drained bytes"] = file_bytes(run.edge.db)
        run.edge.start()
        check_file_size(result)


def check_file_size(result: Result) -> None:
    """After the drain the closed file is back near its baseline: within 1 MiB,
    or a quarter of what the backlog added, whichever is more."""
    baseline = result.measures["baseline bytes"]
    peak, drained = result.measures["peak bytes"], result.measures["drained bytes"]
    allowed = baseline + max(2**20, (peak - baseline) // 4)
    if drained > allowed:
        result.problems.append(
            f"edge file is {drained} bytes after the drain: baseline {baseline}, "
            f"{peak} at the peak of the backlog, allowed {allowed}"
        )


# -- the table ---------------------------------------------------------------

COLUMNS = (
    ("scenario", 17), ("seed", 4), ("accepted", 8), ("unknown", 7), ("present", 7),
    ("missing", 7), ("dup", 3), ("order", 5), ("poison", 6), ("dead", 4),
    ("queue", 5), ("resume s", 8), ("drain s", 7), ("faults injected", 0),
)  # fmt: skip


def header() -> str:
    """The table's header line."""
    return "  ".join(name.ljust(width) for name, width in COLUMNS).rstrip()


def row(result: Result) -> str:
    """One table line for a run."""
    faults = ", ".join(
        f"{note} x{count}" if count > 1 else note
        for note, count in result.notes.items()
    )
    if result.measures.get("baseline bytes"):
        faults += "; " + file_note(result.measures)
    values = (
        result.scenario, result.seed, result.total("accepted"), result.total("unknown"),
        result.total("present"), result.total("missing"), result.total("duplicated"),
        result.total("out_of_order"), result.poison.split(",")[0], result.dead_letters,
        result.pending, _seconds(result.measures.get("resume s")),
        f"{result.drain_seconds:.1f}", faults,
    )  # fmt: skip
    return "  ".join(
        str(value).ljust(width)
        for value, (_, width) in zip(values, COLUMNS, strict=True)
    ).rstrip()


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def file_note(measures: dict[str, Any]) -> str:
    """Edge file size: baseline, at the peak of the backlog, after the drain."""

    def mib(name: str) -> str:
        return f"{measures.get(name, 0) / 2**20:.1f}"

    return (
        f"backlog {measures.get('backlog', 0)} events, file MiB "
        f"{mib('baseline bytes')} -> {mib('peak bytes')} -> {mib('drained bytes')}"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.faults.harness [--long] [--seeds N] [--scenario NAME]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--long", action="store_true", help="more load, more kills")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per scenario")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--keep", type=Path, help="keep each run's files and logs here")
    options = parser.parse_args(argv)
    scale = LONG if options.long else SHORT
    seeds = options.seeds or (5 if options.long else 2)
    names = options.scenario or list(SCENARIOS)
    root = options.keep or Path(tempfile.mkdtemp(prefix="edgectl-faults-"))
    print(header(), flush=True)
    failed = []
    for name in names:
        for seed in range(options.first_seed, options.first_seed + seeds):
            folder = root / f"{name}-{seed}"
            try:
                result = run_one(SCENARIOS[name], seed, scale, folder)
            except Exception as error:  # one broken run, not all of them
                result = Result(name, seed, folder=folder)
                result.problems.append(f"the run broke: {error!r}")
            print(row(result), flush=True)
            if result.ok and options.keep is None:
                shutil.rmtree(root / f"{name}-{seed}", ignore_errors=True)
            else:
                failed.append(result)
    for result in failed:
        if result.problems:
            print(f"\n{result.scenario} seed {result.seed} ({result.folder}):")
            for problem in result.problems:
                print(f"  - {problem}")
    return 1 if any(result.problems for result in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
