"""The ingest journal: device requests made durable before they are stored.

A DuckDB commit costs a few milliseconds of CPU however little it holds, so a
device answered only after the commit that stores its request waits for one,
and a role with a few dozen clients serves a few thousand requests a second.
The edge instead appends each accepted request to this journal, syncs the file
once for all the requests of that moment (one fdatasync, about 0.2 ms here),
answers, and hands the requests to the writer, which stores them behind in
large batches, in journal order.

Each commit records the last journal record it holds in ``sync_applied``
(peer ``ingest-journal``), in the same transaction as the rows. At start the
records past that mark are run through the chain again, once and in order,
before the role serves: a reading answered 200 survives a kill at any moment.

Two files take turns: once the active one passes ``rotate_bytes`` and every
record in the other is stored, the other is emptied and written next, so the
journal stays small however long the role runs.

Layout (little endian). A file starts with ``EDGECTL-JOURNAL 1``, the DuckDB
file's instance id and a newline, so a journal is never replayed into another
file. Each record is a u32 payload length, the payload's CRC-32, then the
payload: u64 sequence, i64 arrival time in ms, u8 kind, u16 length of the
device name, the name in UTF-8, and the request body as the device sent it
(gunzipped). A record torn by a kill mid-write is cut off at recovery.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from edgectl.errors import StorageError
from edgectl.message import Message
from edgectl.storage import Store

logger = logging.getLogger(__name__)

JOURNAL_PEER = "ingest-journal"
TELEMETRY, ATTRIBUTES = 0, 1
ROTATE_BYTES = 64 * 1024 * 1024
MAX_PENDING = 50_000
MAX_PENDING_BYTES = 32 * 1024 * 1024

_MAGIC = b"EDGECTL-JOURNAL 1 "
_FRAME = struct.Struct("<II")
_HEAD = struct.Struct("<QqBH")


@dataclass(frozen=True, slots=True)
class Record:
    """One journaled device request."""

    seq: int
    ts: int
    kind: int
    device: str
    body: bytes


def encode_record(record: Record) -> bytes:
    """The bytes of one record, framed with its length and CRC-32."""
    name = record.device.encode()
    payload = (
        _HEAD.pack(record.seq, record.ts, record.kind, len(name)) + name + record.body
    )
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def journal_paths(db_path: Path) -> tuple[Path, Path]:
    """The two files of the journal that belongs to a DuckDB file."""
    return (
        db_path.with_name(db_path.name + ".journal.0"),
        db_path.with_name(db_path.name + ".journal.1"),
    )


def read_journal(path: Path) -> tuple[str | None, list[Record], int]:
    """``(instance, records, length)`` of a journal file.

    ``length`` is where the last whole record ends; bytes past it are a record
    torn by a kill. A file with no header gives instance None and no records.
    """
    data = path.read_bytes() if path.exists() else b""
    end = data.find(b"\n")
    if not data.startswith(_MAGIC) or end < 0:
        return None, [], 0
    instance = data[len(_MAGIC) : end].decode(errors="replace")
    records, offset = [], end + 1
    while offset + _FRAME.size <= len(data):
        size, crc = _FRAME.unpack_from(data, offset)
        start = offset + _FRAME.size
        payload = data[start : start + size]
        if len(payload) < size or zlib.crc32(payload) != crc or size < _HEAD.size:
            break
        seq, ts, kind, name_size = _HEAD.unpack_from(payload)
        name = payload[_HEAD.size : _HEAD.size + name_size].decode()
        records.append(Record(seq, ts, kind, name, payload[_HEAD.size + name_size :]))
        offset = start + size
    return instance, records, offset


def unstored_count(store: Store) -> int:
    """How many requests the journal of a stopped file holds that it does not:
    answered before a kill and not yet stored, they are when the role starts."""
    applied, count = store.applied_seq(JOURNAL_PEER), 0
    for path in journal_paths(store.path):
        owner, records, _ = read_journal(path)
        if owner == store.instance:
            count += sum(1 for record in records if record.seq > applied)
    return count


class JournalFiles:
    """The two journal files of one DuckDB file: recovery, appends, turns.

    Every method but ``recover`` runs on one thread at a time (the journal's
    own); ``recover`` runs before any append.
    """

    def __init__(
        self, db_path: Path, instance: str, *, rotate_bytes: int = ROTATE_BYTES
    ) -> None:
        self.paths = journal_paths(db_path)
        self.instance = instance
        self.rotate_bytes = rotate_bytes
        self._header = _MAGIC + instance.encode() + b"\n"
        self._fds: list[int] = []
        self._sizes = [0, 0]
        self._last_seq = [0, 0]
        self.active = 0
        self.next_seq = 1

    def recover(self, applied: int) -> list[Record]:
        """Open both files and return the records past ``applied``, in order.

        A torn last record is cut off; a file written for another DuckDB file
        is moved aside (``.orphan``) with a warning and nothing of it is run.
        Raises StorageError when a file cannot be opened or cut.
        """
        pending: list[Record] = []
        try:
            for index, path in enumerate(self.paths):
                pending += self._open(index, path, applied)
        except OSError as error:
            raise StorageError(
                f"cannot open the ingest journal {error.filename}: {error.strerror}; "
                "check the folder's permissions and free space"
            ) from error
        newest = max(self._last_seq)
        self.next_seq = max(applied, newest) + 1
        # Appends go to the file holding the newest records, so the other one,
        # older, is the first to be emptied.
        self.active = 0 if self._last_seq[0] >= self._last_seq[1] else 1
        pending.sort(key=lambda record: record.seq)
        return pending

    def _open(self, index: int, path: Path, applied: int) -> list[Record]:
        instance, records, length = read_journal(path)
        if instance is not None and instance != self.instance:
            aside = path.with_name(f"{path.name}.orphan-{int(time.time())}")
            path.rename(aside)
            logger.warning(
                "%s belongs to another DuckDB file; moved it to %s and did not "
                "replay it",
                path,
                aside,
            )
            instance, records, length = None, [], 0
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._fds.append(fd)
        if instance is None:
            self._reset(index)
        else:
            os.ftruncate(fd, length)
            os.lseek(fd, length, os.SEEK_SET)
            self._sizes[index] = length
            self._last_seq[index] = max((r.seq for r in records), default=0)
        return [record for record in records if record.seq > applied]

    def _reset(self, index: int) -> None:
        fd = self._fds[index]
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        _write_all(fd, self._header)
        os.fdatasync(fd)
        self._sizes[index] = len(self._header)
        self._last_seq[index] = 0

    def append(self, data: bytes, last_seq: int, applied: int) -> None:
        """Write records and sync them to disk; ``last_seq`` is the newest.

        On failure the file is cut back to where it was, so nothing of these
        records remains, and StorageError is raised.
        """
        self._maybe_rotate(applied)
        fd, size = self._fds[self.active], self._sizes[self.active]
        try:
            _write_all(fd, data)
            os.fdatasync(fd)
        except OSError as error:
            self._cut_back(fd, size)
            raise StorageError(
                f"cannot write the ingest journal {self.paths[self.active]}: "
                f"{error.strerror}; free disk space or check the file system"
            ) from error
        self._sizes[self.active] = size + len(data)
        self._last_seq[self.active] = last_seq

    def _cut_back(self, fd: int, size: int) -> None:
        try:
            os.ftruncate(fd, size)
            os.lseek(fd, size, os.SEEK_SET)
        except OSError:
            logger.exception("could not cut the ingest journal back after a failure")

    def _maybe_rotate(self, applied: int) -> None:
        other = 1 - self.active
        if self._sizes[self.active] < self.rotate_bytes:
            return
        if self._last_seq[other] > applied:
            return
        self._reset(other)
        self.active = other

    def empty(self) -> None:
        """Empty both files: every record in them is stored."""
        for index in (0, 1):
            self._reset(index)

    def close(self) -> None:
        """Close both files."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


Submit = Callable[[list[Message], int], "Future[int]"]


@dataclass(slots=True)
class _Waiting:
    seq: int
    messages: list[Message]
    answer: asyncio.Future[Future[int]]


@dataclass
class Journal:
    """The asynchronous front of the journal, on the event loop.

    ``append`` makes a request durable together with every other request of
    the same moment, hands its messages to the writer in journal order and
    returns the writer's future for the commit that stores them. ``applied``
    is the newest record the writer has committed (set from the writer thread);
    ``pending`` holds the records recovered at start, to be stored first.
    """

    files: JournalFiles
    submit: Submit
    max_pending: int = MAX_PENDING
    max_pending_bytes: int = MAX_PENDING_BYTES
    applied: int = 0
    pending: list[Record] = field(default_factory=list)
    failure: Exception | None = None
    _buffer: bytearray = field(default_factory=bytearray)
    _waiting: list[_Waiting] = field(default_factory=list)
    _flushing: bool = False
    _handed: int = 0
    # (seq, body size) of records not yet known to be stored, oldest first.
    _sizes: deque[tuple[int, int]] = field(default_factory=deque)
    _pending_bytes: int = 0
    _room: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, "edgectl-journal")
    )

    async def append(
        self, kind: int, device: str, ts: int, body: bytes, messages: list[Message]
    ) -> Future[int]:
        """Journal one request; return the future of the commit storing it.

        Waits while more than ``max_pending`` records, or bodies of more than
        ``max_pending_bytes`` in all, are journaled but not yet stored: their
        messages are held in memory until then. Raises StorageError when the
        journal cannot be written or the writer cannot store (nothing of the
        request is kept).
        """
        self._check_failure()
        if self._full():
            await self._wait_for_room()
        loop = self._loop = asyncio.get_running_loop()
        seq = self.files.next_seq
        self.files.next_seq += 1
        self._sizes.append((seq, len(body)))
        self._pending_bytes += len(body)
        self._buffer += encode_record(Record(seq, ts, kind, device, body))
        waiting = _Waiting(seq, messages, loop.create_future())
        self._waiting.append(waiting)
        if not self._flushing:
            # Later in this loop turn, so every request whose body has arrived
            # by then shares the write and the sync.
            self._flushing = True
            loop.call_soon(self._flush)
        return await waiting.answer

    def _check_failure(self) -> None:
        if self.failure is not None:
            raise StorageError(
                f"the edge cannot store what it receives: {self.failure}"
            )

    def _full(self) -> bool:
        sizes = self._sizes
        while sizes and sizes[0][0] <= self.applied:
            self._pending_bytes -= sizes.popleft()[1]
        return (
            self._handed - self.applied > self.max_pending
            or self._pending_bytes > self.max_pending_bytes
        )

    async def _wait_for_room(self) -> None:
        self._room = self._room or asyncio.Event()
        while self._full():
            self._room.clear()
            await self._room.wait()
            self._check_failure()

    def _flush(self) -> None:
        assert self._loop is not None
        data, waiting = bytes(self._buffer), self._waiting
        self._buffer, self._waiting = bytearray(), []
        written = self._loop.run_in_executor(
            self._executor, self.files.append, data, waiting[-1].seq, self.applied
        )
        written.add_done_callback(lambda done: self._flushed(done, waiting))

    def _flushed(self, done: asyncio.Future[None], waiting: list[_Waiting]) -> None:
        error = done.exception()
        for item in waiting:
            if error is not None:
                if not item.answer.done():
                    item.answer.set_exception(error)
                continue
            # Handed over even when its client has gone: the record is on disk
            # and would be stored at the next start anyway.
            stored = self.submit(item.messages, item.seq)
            self._handed = item.seq
            if not item.answer.done():
                item.answer.set_result(stored)
        if self._waiting:
            self._flush()
        else:
            self._flushing = False

    def unstored(self) -> int:
        """Requests handed to the writer and not yet committed."""
        return max(0, self._handed - self.applied)

    def on_stored(self, seq: int) -> None:
        """Writer hook: records up to ``seq`` are committed (writer thread)."""
        self.applied = max(self.applied, seq)
        self._wake_appends()

    def on_failing(self, error: Exception | None) -> None:
        """Writer hook: storing fails (``error``) or works again (None)."""
        self.failure = error
        if error is not None:
            self._wake_appends()

    def _wake_appends(self) -> None:
        # From the writer thread: appends waiting for room look again.
        loop, room = self._loop, self._room
        if room is not None and loop is not None and not room.is_set():
            loop.call_soon_threadsafe(room.set)

    def close(self) -> None:
        """Close the files, emptying them when every record is stored."""
        self._executor.shutdown(wait=True)
        if self.applied >= self.files.next_seq - 1 and self.failure is None:
            try:
                self.files.empty()
            except OSError as error:
                logger.warning("could not empty the ingest journal: %s", error)
        self.files.close()
