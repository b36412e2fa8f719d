"""`edgectl replay` on a stopped file: list, re-queue, purge, with --dry-run."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from edgectl.changes import ChangeSet, PendingEvent
from edgectl.cli import app
from edgectl.devices import register_device
from edgectl.message import TIMESERIES_UPDATED
from edgectl.outbox import dead_letter, record_failure
from edgectl.storage import Store

runner = CliRunner()


def queued_file(tmp_path, count=5):
    path = tmp_path / "edge.duckdb"
    store = Store(path)
    device, _ = register_device(store, "meter", token="T")
    changes = ChangeSet()
    for n in range(count):
        body = {"data": {"n": n}, "ts": 1000 + n}
        changes.add_event(
            PendingEvent(n, TIMESERIES_UPDATED, device.ref, body, 1000 + n)
        )
    store.apply(changes)
    with store.transaction() as con:
        record_failure(con, "cloud_event", None, 3, "refused: reading 1 is poison")
        dead_letter(con, "cloud_event", None, 3)
    store.close()
    return path


def replay(*args):
    return runner.invoke(app, ["replay", *args])


def test_list_shows_pending_and_dead_letters_with_their_error(tmp_path):
    path = queued_file(tmp_path)

    pending = replay("list", "--db", str(path), "--json")
    dead = replay("list", "--db", str(path), "--dead", "--json")

    assert [e["seq"] for e in json.loads(pending.output)] == [1, 2, 4, 5, 6]
    [letter] = json.loads(dead.output)
    assert (letter["seq"], letter["attempts"], letter["state"]) == (3, 1, "dead")
    assert letter["last_error"] == "refused: reading 1 is poison"


def test_requeue_puts_a_dead_letter_back_at_the_end_of_the_queue(tmp_path):
    path = queued_file(tmp_path)

    dry = replay("requeue", "--db", str(path), "--dry-run")
    done = replay("requeue", "--db", str(path))

    assert dry.output.strip() == "would re-queue: 1 event(s)"
    assert done.output.strip() == "re-queue: 1 event(s)"
    pending = json.loads(replay("list", "--db", str(path), "--json").output)
    assert [e["seq"] for e in pending] == [1, 2, 4, 5, 6, 7]
    assert json.loads(pending[-1]["body"]) == {"data": {"n": 1}, "ts": 1001}
    assert (
        json.loads(replay("list", "--db", str(path), "--dead", "--json").output) == []
    )


def test_purge_drops_pending_events_up_to_a_sequence_and_needs_last(tmp_path):
    path = queued_file(tmp_path)

    refused = replay("purge", "--db", str(path))
    done = replay("purge", "--db", str(path), "--last", "4")

    assert refused.exit_code == 1
    assert "needs --last SEQ" in str(refused.exception)
    assert done.output.strip() == "purge: 3 event(s)"
    pending = json.loads(replay("list", "--db", str(path), "--json").output)
    assert [e["seq"] for e in pending] == [5, 6]


def test_resend_without_kept_events_sends_nothing(tmp_path):
    path = queued_file(tmp_path)

    answer = replay("resend", "--first", "1", "--db", str(path))

    assert answer.exit_code == 0
    assert answer.output.strip() == "send again: 0 event(s)"
