"""The ingest journal: records on disk, recovery, turns, failures, and replay
by a real edge process of requests it answered but had not stored."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from concurrent.futures import Future

import httpx
import orjson
import pytest

from edgectl import remote
from edgectl.errors import StorageError
from edgectl.journal import (
    ATTRIBUTES,
    JOURNAL_PEER,
    TELEMETRY,
    Journal,
    JournalFiles,
    Record,
    encode_record,
    journal_paths,
    read_journal,
)
from edgectl.storage import Store

INSTANCE = "instance-a"


def record(seq: int, body: bytes = b'{"t": 1}', device: str = "dev") -> Record:
    return Record(seq, 1_700_000_000_000 + seq, TELEMETRY, device, body)


def opened(tmp_path, applied: int = 0, **options) -> tuple[JournalFiles, list[Record]]:
    files = JournalFiles(tmp_path / "edge.duckdb", INSTANCE, **options)
    return files, files.recover(applied)


def write(files: JournalFiles, *records: Record, applied: int = 0) -> None:
    data = b"".join(encode_record(r) for r in records)
    files.append(data, records[-1].seq, applied)


def test_records_survive_a_reopen_with_every_field(tmp_path):
    files, pending = opened(tmp_path)
    assert pending == []
    sent = [
        record(1, b'{"temperature": 21.5}', "boiler"),
        Record(2, -5, ATTRIBUTES, "résumé-7", b'{"fw": "1.2"}'),
        record(3, b"", "x" * 300),
    ]
    write(files, *sent)
    files.close()

    again, pending = opened(tmp_path)
    assert pending == sent
    assert again.next_seq == 4
    again.close()


def test_records_already_stored_are_not_returned(tmp_path):
    files, _ = opened(tmp_path)
    write(files, *(record(seq) for seq in range(1, 6)))
    files.close()

    again, pending = opened(tmp_path, applied=3)
    assert [r.seq for r in pending] == [4, 5]
    assert again.next_seq == 6
    again.close()


def test_a_record_torn_by_a_kill_is_cut_off_and_the_file_goes_on(tmp_path):
    files, _ = opened(tmp_path)
    write(files, record(1), record(2))
    files.close()
    path = journal_paths(tmp_path / "edge.duckdb")[0]
    whole = path.stat().st_size
    with path.open("ab") as handle:
        handle.write(encode_record(record(3))[:-4])

    again, pending = opened(tmp_path)
    assert [r.seq for r in pending] == [1, 2]
    assert path.stat().st_size == whole
    write(again, record(3))
    again.close()
    assert [r.seq for r in read_journal(path)[1]] == [1, 2, 3]


def test_a_record_with_a_bad_checksum_ends_the_file(tmp_path):
    files, _ = opened(tmp_path)
    write(files, record(1), record(2), record(3))
    files.close()
    path = journal_paths(tmp_path / "edge.duckdb")[0]
    data = bytearray(path.read_bytes())
    second = data.index(b'{"t": 1}', data.index(b'{"t": 1}') + 1)
    data[second] ^= 0xFF
    path.write_bytes(bytes(data))

    again, pending = opened(tmp_path)
    assert [r.seq for r in pending] == [1]
    again.close()


def test_a_journal_of_another_database_file_is_set_aside_unreplayed(tmp_path):
    other = JournalFiles(tmp_path / "edge.duckdb", "instance-b")
    other.recover(0)
    write(other, record(1), record(2))
    other.close()

    files, pending = opened(tmp_path)
    assert pending == []
    asides = sorted(p.name for p in tmp_path.glob("edge.duckdb.journal.*.orphan-*"))
    assert len(asides) == 2
    aside = next(tmp_path.glob("edge.duckdb.journal.0.orphan-*"))
    assert read_journal(aside)[0] == "instance-b"
    assert [r.seq for r in read_journal(aside)[1]] == [1, 2]
    files.close()


def test_the_files_take_turns_once_the_other_is_stored(tmp_path):
    body = b"x" * 400
    files, _ = opened(tmp_path, rotate_bytes=1000)
    write(files, record(1, body), record(2, body), record(3, body))
    assert files.active == 0
    # Past rotate_bytes, but the other file is empty: the turn happens.
    write(files, record(4, body), applied=0)
    assert files.active == 1
    # Now full again, while file 0 holds records 1-3 that are not stored:
    # no turn, the active file grows.
    write(files, record(5, body), record(6, body), record(7, body), applied=2)
    write(files, record(8, body), applied=2)
    assert files.active == 1
    # Once they are stored, file 0 is emptied and written next.
    write(files, record(9, body), applied=3)
    assert files.active == 0
    files.close()

    first, second = journal_paths(tmp_path / "edge.duckdb")
    assert [r.seq for r in read_journal(first)[1]] == [9]
    assert [r.seq for r in read_journal(second)[1]] == [4, 5, 6, 7, 8]
    again, pending = opened(tmp_path, applied=5)
    assert [r.seq for r in pending] == [6, 7, 8, 9]
    assert again.next_seq == 10
    again.close()


def test_emptied_files_keep_no_record(tmp_path):
    files, _ = opened(tmp_path)
    write(files, record(1), record(2))
    files.empty()
    files.close()
    again, pending = opened(tmp_path)
    assert pending == []
    assert again.next_seq == 1
    again.close()


def test_a_journal_folder_that_cannot_be_opened_is_a_storage_error(tmp_path):
    db = tmp_path / "edge.duckdb"
    journal_paths(db)[0].mkdir()
    files = JournalFiles(db, INSTANCE)
    with pytest.raises(StorageError, match="cannot open the ingest journal"):
        files.recover(0)
    files.close()


# A full disk, for real: the file size limit of a child process (RLIMIT_FSIZE,
# with SIGXFSZ ignored) makes the journal's write fail as ENOSPC would.
FULL_DISK = """
import asyncio, resource, signal, sys
from pathlib import Path
from edgectl.errors import StorageError
from edgectl.journal import TELEMETRY, Journal, JournalFiles

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
files = JournalFiles(Path(sys.argv[1]), "instance-a")
files.recover(0)
handed = []

def submit(messages, seq):
    handed.append(seq)
    future = __import__("concurrent.futures").futures.Future()
    future.set_result(0)
    return future

async def main():
    journal = Journal(files, submit)
    await journal.append(TELEMETRY, "dev", 1, b'{"a": 1}', [])
    size = files.paths[0].stat().st_size
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, resource.RLIM_INFINITY))
    try:
        await journal.append(TELEMETRY, "dev", 2, b"x" * 1000, [])
    except StorageError as error:
        print("refused:", error)
    print("size kept:", files.paths[0].stat().st_size == size)
    resource.setrlimit(
        resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    )
    await journal.append(TELEMETRY, "dev", 3, b'{"a": 3}', [])
    print("handed:", handed)

asyncio.run(main())
files.close()
"""


def test_a_journal_write_that_fails_keeps_nothing_and_hands_nothing(tmp_path):
    db = tmp_path / "edge.duckdb"
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(db)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("refused: cannot write the ingest journal")
    assert "File too large" in lines[0]
    assert lines[1:] == ["size kept: True", "handed: [1, 3]"]
    _, records, _ = read_journal(journal_paths(db)[0])
    assert [(r.seq, r.body) for r in records] == [(1, b'{"a": 1}'), (3, b'{"a": 3}')]


# -- a real edge ------------------------------------------------------------


def readings(edge, device: str) -> list[tuple[int, object]]:
    found = remote.call(
        edge.url,
        "GET",
        "/api/edgectl/tables/ts_kv",
        params={"device": device, "limit": 100000},
    )
    return sorted((row["ts"], row["value"]) for row in found)


def queued(edge, device: str) -> list[int]:
    """The ts of each reading queued for the cloud, in queue order."""
    found = remote.call(
        edge.url,
        "GET",
        "/api/edgectl/tables/cloud_event",
        params={"device": device, "limit": 100000},
    )
    events = sorted(
        (e for e in found if e["action"] == "TIMESERIES_UPDATED"),
        key=lambda e: e["seq"],
    )
    return [orjson.loads(e["body"])["ts"] for e in events]


def edge_with_boiler(roles):
    """A running edge with device boiler, token T-boiler."""
    edge = roles("edge")
    body = {"name": "boiler", "token": "T-boiler"}
    remote.call(edge.url, "POST", "/api/edgectl/devices", body)
    return edge


def post(edge, body) -> httpx.Response:
    return httpx.post(f"{edge.url}/api/v1/T-boiler/telemetry", json=body, timeout=10)


def test_the_edge_stores_answered_requests_it_had_not_stored_once(roles):
    edge = edge_with_boiler(roles)
    for n in (1, 2, 3):
        assert post(edge, {"ts": n, "values": {"n": n}}).status_code == 200
    assert readings(edge, "boiler") == [(1, 1), (2, 2), (3, 3)]
    edge.stop()

    # As a kill would leave it: records 2 and 3 are journaled and stored (the
    # commit recorded them), 4 and 5 journaled only, 6 torn mid-write.
    store = Store(edge.db)
    instance, applied = store.instance, store.applied_seq(JOURNAL_PEER)
    store.close()
    assert applied == 3
    files = JournalFiles(edge.db, instance)
    files.recover(applied)
    answered = [
        Record(
            seq, 0, TELEMETRY, "boiler", orjson.dumps({"ts": seq, "values": {"n": seq}})
        )
        for seq in (2, 3, 4, 5)
    ]
    write(files, *answered, applied=applied)
    files.close()
    with journal_paths(edge.db)[0].open("ab") as handle:
        torn = encode_record(record(6, b'{"ts": 6, "values": {"n": 6}}', "boiler"))
        handle.write(torn[:-3])

    shown = subprocess.run(
        [sys.executable, "-m", "edgectl", "inspect", "tables", "--db", str(edge.db)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ingest journal: 2 answered request(s) not stored yet" in shown.stdout

    edge.start()
    expected = [(n, n) for n in range(1, 6)]
    assert readings(edge, "boiler") == expected
    assert queued(edge, "boiler") == list(range(1, 6))
    assert "stored 2 requests left in the ingest journal" in edge.log.read_text()
    overview = remote.call(edge.url, "GET", "/api/edgectl/tables")
    assert overview["journal_unstored"] == 0

    # Stored now, so a second start replays nothing.
    edge.kill()
    edge.start()
    assert readings(edge, "boiler") == expected
    assert post(edge, {"ts": 7, "values": {"n": 7}}).status_code == 200
    assert readings(edge, "boiler")[-1] == (7, 7)


def test_a_record_of_a_device_gone_is_logged_and_skipped(roles):
    edge = edge_with_boiler(roles)
    edge.stop()
    store = Store(edge.db)
    instance = store.instance
    store.close()
    files = JournalFiles(edge.db, instance)
    files.recover(0)
    write(
        files,
        Record(1, 0, TELEMETRY, "boiler", b'{"ts": 1, "values": {"n": 1}}'),
        Record(2, 0, TELEMETRY, "ghost", b'{"ts": 2, "values": {"n": 2}}'),
    )
    files.close()

    edge.start()
    assert readings(edge, "boiler") == [(1, 1)]
    dropped = "journal record 2 (device 'ghost') cannot be stored any more"
    assert edge.log.read_text().count(dropped) == 1
    # Marked done although nothing of it was stored: a kill and a start do
    # not read it again.
    edge.kill()
    edge.start()
    assert readings(edge, "boiler") == [(1, 1)]
    assert edge.log.read_text().count(dropped) == 1


def test_readings_in_one_millisecond_do_not_overwrite_each_other(roles):
    edge = edge_with_boiler(roles)
    with httpx.Client(timeout=10) as client:
        url = f"{edge.url}/api/v1/T-boiler/telemetry"
        for n in range(200):
            assert client.post(url, json={"n": n}).status_code == 200
    stored = readings(edge, "boiler")
    assert sorted(value for _, value in stored) == list(range(200))
    assert [value for _, value in stored] == list(range(200))


def test_appends_wait_while_too_many_bytes_are_journaled_but_not_stored(tmp_path):
    files, _ = opened(tmp_path)
    handed: list[int] = []

    def submit(messages, seq):
        handed.append(seq)
        return Future()

    async def scenario():
        journal = Journal(files, submit, max_pending_bytes=100)
        await journal.append(TELEMETRY, "dev", 1, b"a" * 60, [])
        await journal.append(TELEMETRY, "dev", 2, b"b" * 60, [])
        third = asyncio.ensure_future(journal.append(TELEMETRY, "dev", 3, b"c", []))
        await asyncio.sleep(0.2)
        assert not third.done()
        assert handed == [1, 2]
        journal.on_stored(1)
        await asyncio.wait_for(third, 5)
        assert handed == [1, 2, 3]

    asyncio.run(scenario())
    files.close()
