"""The single writer thread: group commit of incoming messages and other writes.

DuckDB pays a sync per commit and allows one writer, so every write of a
running role goes through this thread. Messages that arrive while a batch is
being stored wait together and are run through the chain and committed as the
next batch: a device's request is answered only after the commit that holds
its message, and one commit serves every request that was waiting.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from edgectl.changes import ChangeSet
from edgectl.engine import Engine, Run, log_failures
from edgectl.journal import JOURNAL_PEER
from edgectl.message import META_ERROR, Message
from edgectl.storage import Store, is_transient

logger = logging.getLogger(__name__)

T = TypeVar("T")
CommitHook = Callable[[ChangeSet], None]


@dataclass(slots=True)
class BatchStats:
    """What one group commit did, for metrics."""

    messages: int
    readings: int
    events: int
    failures: int
    seconds: float


@dataclass(slots=True)
class _Ingest:
    messages: list[Message]
    journal_seq: int = 0
    future: Future[int] = field(default_factory=Future)


@dataclass(slots=True)
class _Call:
    work: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


_STOP = object()


class Writer:
    """Owns every write to a Store from its own thread.

    ``submit`` queues messages for the root chain and returns a future that
    completes (with the number of unhandled failures) once they are committed,
    or fails with the StorageError that stopped the commit. ``call`` runs any
    other write on the thread, in order with the batches.
    """

    def __init__(
        self,
        store: Store,
        engine: Engine,
        *,
        max_batch: int = 5000,
        checkpoint_seconds: float = 30.0,
        commit_interval: float = 0.01,
    ) -> None:
        self.store = store
        self.engine = engine
        self.max_batch = max_batch
        self.checkpoint_seconds = checkpoint_seconds
        self.commit_interval = commit_interval
        self._last_commit = 0.0
        self._usual_jobs = 1.0
        self.hooks: list[CommitHook] = []
        self.stats_hooks: list[Callable[[BatchStats], None]] = []
        # Set by the ingest journal: told the newest journal record stored,
        # and whether storing journaled requests fails (an error) or works.
        self.journal_stored: Callable[[int], None] | None = None
        self.journal_failing: Callable[[Exception | None], None] | None = None
        self._stopping = False
        self._halted: Exception | None = None
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="edgectl-writer")
        self._last_checkpoint = time.monotonic()

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def stop(self) -> None:
        """Finish the jobs already queued, then stop the thread.

        A journaled request that cannot be stored is not retried past this:
        it and the requests behind it stay in the journal for the next start.
        """
        self._stopping = True
        self._jobs.put(_STOP)
        self._thread.join()

    def submit(self, messages: list[Message], journal_seq: int = 0) -> Future[int]:
        """Queue messages for the chain; the future completes after commit.

        ``journal_seq`` names the ingest journal record the messages came
        from: the commit records it, and a journaled request that fails to
        store is retried while the file cannot be written, since its device
        was answered already.
        """
        job = _Ingest(messages, journal_seq)
        self._jobs.put(job)
        return job.future

    def call(self, work: Callable[[], T]) -> Future[T]:
        """Run ``work`` on the writer thread; the future holds its result."""
        job: _Call = _Call(work)
        self._jobs.put(job)
        return job.future

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            if isinstance(job, _Call):
                self._run_call(job)
                continue
            batch, after = self._gather(job)
            self._last_commit = time.monotonic()
            self._usual_jobs = max(float(len(batch)), self._usual_jobs * 0.95)
            self._commit(batch)
            if after is _STOP:
                return
            if after is not None:
                self._run_call(after)
            self._maybe_checkpoint()

    def _gather(self, first: _Ingest) -> tuple[list[_Ingest], Any]:
        # A commit costs about 4 ms of CPU however few messages it holds. Left
        # to commit whatever is waiting at once, a steady 1,000 requests/s
        # made 200 commits of five messages each, every second, and the
        # commits alone took a core. So a commit starts at most every
        # ``commit_interval`` seconds, and the requests of that time share
        # it; an idle writer still commits a lone request at once. It stops
        # waiting once as many requests wait as recent commits held (a slowly
        # fading maximum): the clients they answered have come back. Waiting
        # blocks on the queue, so an idle writer takes no CPU.
        deadline = self._last_commit + self.commit_interval
        batch, count = [first], len(first.messages)
        while count < self.max_batch:
            wait = deadline - time.monotonic()
            try:
                if wait > 0 and len(batch) < self._usual_jobs:
                    job = self._jobs.get(timeout=wait)
                else:
                    job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if not isinstance(job, _Ingest):
                return batch, job
            batch.append(job)
            count += len(job.messages)
        return batch, None

    def _run_call(self, job: _Call) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.work())
        except BaseException as error:
            job.future.set_exception(error)

    def _commit(self, batch: list[_Ingest]) -> bool:
        started = time.perf_counter()
        if self._halted is not None:
            for job in batch:
                job.future.set_exception(self._halted)
            return False
        try:
            changes, failures = self._store(batch)
        except Exception as error:
            return self._fail(batch, error)
        self._stored(batch, changes, failures, started)
        return True

    def _store(self, batch: list[_Ingest]) -> tuple[ChangeSet, int]:
        # The chain over the batch, committed with the newest journal record
        # it holds; raises (rolled back) when that fails.
        messages = [message for job in batch for message in job.messages]
        for order, message in enumerate(messages):
            message.order = order
        journal_seq = max(job.journal_seq for job in batch)
        cursor = (JOURNAL_PEER, journal_seq) if journal_seq else None
        changes, failures = self.run_chain(messages)
        self.store.apply(changes, cursor=cursor)
        return changes, failures

    def _stored(
        self, batch: list[_Ingest], changes: ChangeSet, failures: int, started: float
    ) -> None:
        # After the commit, outside the retry: answers the jobs, tells the
        # journal, wakes the hooks.
        for job in batch:
            job.future.set_result(failures)
        journal_seq = max(job.journal_seq for job in batch)
        if journal_seq and self.journal_stored is not None:
            self.journal_stored(journal_seq)
        count = sum(len(job.messages) for job in batch)
        self._after_commit(changes, count, failures, started)

    def _fail(self, batch: list[_Ingest], error: Exception) -> bool:
        # One request must not fail the requests that happened to share its
        # commit: when a shared batch fails, each request is stored alone, so
        # only the one that cannot be stored (or all, if the file is broken)
        # gets the error. The batch was rolled back, so nothing is doubled.
        if len(batch) > 1:
            stored = False
            for job in batch:
                _reset(job.messages)
                stored = self._commit([job]) or stored
            return stored
        job = batch[0]
        if job.journal_seq:
            return self._keep_trying(job, error)
        count = len(job.messages)
        logger.debug("storing a request of %d messages failed: %s", count, error)
        job.future.set_exception(error)
        return False

    def _keep_trying(self, job: _Ingest, error: Exception) -> bool:
        # The device was answered once the request was journaled, so it must
        # be stored. While the file or the machine fails (disk full, say) the
        # same request is tried again, and the journal refuses new ones; a
        # request that fails alone for any other reason can never be stored.
        delay = 0.05
        while not self._stopping:
            if not is_transient(error):
                return self._drop(job, error)
            self._report_failing(error)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
            _reset(job.messages)
            started = time.perf_counter()
            try:
                changes, failures = self._store([job])
            except Exception as again:
                error = again
                continue
            self._report_failing(None)
            self._stored([job], changes, failures, started)
            return True
        self._halted = error
        job.future.set_exception(error)
        return False

    def _drop(self, job: _Ingest, error: Exception) -> bool:
        device = job.messages[0].originator.name if job.messages else "?"
        logger.error(
            "dropped journal record %d (device %r, %d messages): it cannot be "
            "stored: %s",
            job.journal_seq,
            device,
            len(job.messages),
            error,
        )
        job.future.set_exception(error)
        self._report_failing(None)
        self.skip_journal(job.journal_seq)
        return False

    def skip_journal(self, seq: int) -> None:
        """Mark journal records up to ``seq`` done without storing anything,
        so one that can never be stored is not run again at every start.
        Does nothing once the writer gave up at stop: the records behind
        are still to be stored."""
        if self._halted is not None:
            return
        try:
            self.store.apply(ChangeSet(), cursor=(JOURNAL_PEER, seq))
        except Exception as error:
            logger.warning("could not mark journal record %d done: %s", seq, error)
            return
        if self.journal_stored is not None:
            self.journal_stored(seq)

    def _report_failing(self, error: Exception | None) -> None:
        if self.journal_failing is not None:
            self.journal_failing(error)

    def run_chain(self, messages: list[Message]) -> tuple[ChangeSet, int]:
        """Run messages through the root chain; return changes and failure count."""
        run = Run(store=self.store)
        self.engine.run(messages, run)
        log_failures(run.failures)
        return run.changes, len(run.failures)

    def _after_commit(
        self, changes: ChangeSet, messages: int, failures: int, started: float
    ) -> None:
        self.notify(changes)
        stats = BatchStats(
            messages,
            changes.reading_count,
            len(changes.events),
            failures,
            time.perf_counter() - started,
        )
        for hook in self.stats_hooks:
            hook(stats)

    def notify(self, changes: ChangeSet) -> None:
        """Tell commit hooks (long polls, the sender) what was just stored."""
        for hook in self.hooks:
            try:
                hook(changes)
            except Exception:
                logger.exception("a commit hook failed")

    def _maybe_checkpoint(self) -> None:
        # DuckDB folds its WAL into the file at 16 MiB by default; under steady
        # load that is rare, and long WALs have grown huge and failed to replay
        # in public reports, so fold it on a timer as well.
        if time.monotonic() - self._last_checkpoint < self.checkpoint_seconds:
            return
        self._last_checkpoint = time.monotonic()
        try:
            self.store.checkpoint()
        except Exception as error:
            logger.warning("checkpoint of %s failed: %s", self.store.path, error)


def _reset(messages: list[Message]) -> None:
    # The failed run spent each message's node budget and may have marked it
    # with an error; a second run must start from the message as it arrived.
    for message in messages:
        message.budget = None
        message.metadata.pop(META_ERROR, None)
