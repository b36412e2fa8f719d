"""Rich rendering of command results (only the CLI imports this module)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgectl.values import dumps

_BARS = "▁▂▃▄▅▆▇█"


def age(ms: int | None) -> str:
    """How long ago an epoch-ms time was, as ``3.2 s`` or ``-``."""
    if not ms:
        return "-"
    seconds = max(0.0, time.time() - ms / 1000)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def overview(console: Console, data: dict[str, Any]) -> None:
    """Row counts, then queue state."""
    table = Table(title=f"tables in {data['file']}")
    table.add_column("table")
    table.add_column("rows", justify="right")
    for item in data["tables"]:
        table.add_row(item["table"], f"{item['rows']:,}")
    console.print(table)
    queues = Table(title="queues")
    for column in (
        "queue",
        "edge",
        "pending",
        "lag",
        "dead letters",
        "delivered seq",
        "last seq",
    ):
        queues.add_column(column, justify="right" if column != "queue" else "left")
    for q in data["queues"]:
        queues.add_row(
            q["queue"],
            q["edge"] or "-",
            f"{q['pending']:,}",
            age(q["oldest_pending_ts"]),
            f"{q['dead_letters']:,}",
            str(q["delivered_seq"]),
            str(q["last_seq"]),
        )
    console.print(queues)
    unstored = data.get("journal_unstored", 0)
    if unstored:
        console.print(
            f"ingest journal: {unstored:,} answered request(s) not stored yet; "
            "the edge stores them when it starts, or in a moment if it runs"
        )


def sparkline(values: list[float]) -> str:
    """A one-line chart of numbers, oldest first."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(_BARS[int((v - low) / span * (len(_BARS) - 1))] for v in values)


def rows(console: Console, table_name: str, found: list[dict[str, Any]]) -> None:
    """Rows of one table; a key's numeric history gets a sparkline."""
    if not found:
        console.print(f"no rows in {table_name} match")
        return
    table = Table(title=table_name)
    columns = list(found[0])
    for column in columns:
        table.add_column(column)
    for item in found:
        table.add_row(*(_cell(item[c]) for c in columns))
    console.print(table)
    numbers = [r["value"] for r in reversed(found) if _is_number(r.get("value"))]
    keys = {r.get("key") for r in found}
    if len(keys) == 1 and len(numbers) > 2:
        console.print(f"{keys.pop()}: {sparkline([float(n) for n in numbers])}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return dumps(value)


@contextmanager
def progress_bar(console: Console, title: str) -> Iterator[Callable[[int], None]]:
    """A progress display; the callable sets how many rows are done."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,} rows"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(title, total=None)
        yield lambda done: progress.update(task, completed=done)


def ingest_summary(console: Console, summary: Any) -> None:
    """Rows read, sent, skipped and rejected, per device, and the first problems."""
    table = Table(title="ingest summary")
    table.add_column("what")
    table.add_column("count", justify="right")
    for label, value in (
        ("rows read", summary.rows_read),
        ("rows sent", summary.readings_sent),
        ("values sent", summary.values_sent),
        ("values missing (skipped)", summary.values_missing),
        ("rows with no value", summary.empty_rows),
        ("blank lines", summary.blank_lines),
        ("rows rejected", summary.rejected),
        ("devices", len(summary.devices)),
    ):
        table.add_row(label, f"{value:,}")
    console.print(table)
    console.print(f"took {summary.elapsed:.2f} s")
    for problem in summary.problems:
        console.print(
            f"line {problem.line}: {problem.reason}", style="yellow", markup=False
        )
    unlisted = summary.rejected - len(summary.problems)
    if unlisted > 0:
        console.print(
            f"... and {unlisted} more rejected line(s) not listed", style="yellow"
        )


def _demo_table(snapshot: Any) -> Table:
    title = f"edgectl demo - {snapshot.elapsed:5.1f} s - {snapshot.phase}"
    table = Table(title=title)
    table.add_column("")
    table.add_column("edge", justify="right")
    table.add_column("cloud", justify="right")
    edge, cloud = snapshot.edge, snapshot.cloud
    down = "[red]down[/red]"
    for label, edge_key, cloud_key in (
        ("messages accepted", "messages_accepted_total", None),
        ("readings stored", "readings_stored_total", "readings_stored_total"),
        ("events queued", "events_queued_total", "events_queued_total"),
        ("queue depth", "queue_depth", "queue_depth"),
        ("lag (s)", "queue_lag_seconds", "queue_lag_seconds"),
        ("delivered", "events_acknowledged_total", "events_acknowledged_total"),
        ("received from peer", "events_received_total", "events_received_total"),
        ("dead letters", "dead_letters", "dead_letters"),
    ):
        cloud_cell = (
            "-"
            if cloud_key is None
            else (f"{cloud.get(cloud_key, 0):,.0f}" if snapshot.cloud_up else down)
        )
        table.add_row(
            label, f"{edge.get(edge_key, 0):,.1f}".removesuffix(".0"), cloud_cell
        )
    return table


@contextmanager
def live_demo(console: Console) -> Iterator[Callable[[Any], None]]:
    """A live table of the demo's metrics; the callable takes a Snapshot."""
    from rich.live import Live

    with Live(console=console, refresh_per_second=4, transient=False) as live:
        yield lambda snapshot: live.update(_demo_table(snapshot))


def demo_summary(console: Console, comparison: Any) -> None:
    """Edge and cloud side by side, per device, and where the files are."""
    table = Table(title="edge and cloud, side by side")
    for column in (
        "device",
        "edge readings",
        "cloud readings",
        "latest values",
        "same",
    ):
        table.add_column(column)
    for row in comparison.rows:
        latest = ", ".join(f"{k}={v}" for k, v in sorted(row["latest"].items()))
        same = "[green]yes[/green]" if row["match"] else "[red]NO[/red]"
        table.add_row(
            row["device"],
            f"{row['edge_rows']:,}",
            f"{row['cloud_rows']:,}",
            latest,
            same,
        )
    console.print(table)
    verdict = "the same rows" if comparison.matches else "DIFFERENT rows"
    console.print(f"edge and cloud hold {verdict}.")
    console.print("Look inside:")
    console.print(f"  edgectl inspect tables --db {comparison.edge_file}", markup=False)
    console.print(
        f"  edgectl inspect tables --db {comparison.cloud_file}", markup=False
    )
