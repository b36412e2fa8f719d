"""The edge's two loops with its cloud: send the queue up, poll events down.

Edges usually sit behind NAT, so the edge opens every connection. The uplink
sends ``cloud_event`` in sequence order and advances its cursor only past what
the cloud acknowledged; the downlink long-polls the cloud for this edge's
events, applies them through the root chain and acknowledges them with the
next poll. Both retry forever with capped, jittered backoff, and neither ends
on an error: a loop that stopped would leave the queue growing with nothing
sending it and no sign of why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from edgectl.errors import PeerRejectedError, TransportError
from edgectl.metrics import Metrics
from edgectl.outbox import (
    CLOUD_QUEUE,
    dead_letter,
    delivered_seq,
    mark_delivered,
    read_pending_wire,
    record_failure,
)
from edgectl.storage import Store
from edgectl.sync import ApplyResult, Receiver, decode_events, peer_key
from edgectl.transport import (
    Backoff,
    CloudClient,
    Gap,
    RetryLater,
    TooLarge,
    encode_json,
    sleep_or_wake,
)
from edgectl.writer import Writer

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def on_writer(writer: Writer, work: Callable[[], T]) -> T:
    """Run a write on the writer thread and wait for it without blocking."""
    return await asyncio.wrap_future(writer.call(work))


@dataclass(frozen=True, slots=True)
class _Batch:
    """Queued events read for one push, and the push's headers and body."""

    count: int
    first: int
    last: int
    headers: dict[str, str]
    content: bytes
    epoch: int


@dataclass(frozen=True, slots=True)
class _Flight:
    """A batch on its way, and the answer to come."""

    batch: _Batch
    answer: asyncio.Future[dict[str, Any]]
    started: float


# Batches in flight at once: the next travels and is parsed while the cloud
# applies one. Over a link with a 60 ms round trip a backlog drained at
# 26,600 events/s with one, 40,700 with two, 43,800 with three
# (``bench/sync.py --rtt-ms 60``). Answers are taken in order.
IN_FLIGHT = 2


class Uplink:
    """Sends queued cloud events in batches and applies the cloud's answers.

    Batches go back to back, ``IN_FLIGHT`` at a time: while they travel and
    the cloud applies them, the next is read and encoded, and the
    acknowledgements commit on the writer thread. The cloud hands a sender's
    batches to its writer in sequence order (``sync.BatchOrder``).
    """

    def __init__(
        self,
        store: Store,
        writer: Writer,
        client: CloudClient,
        metrics: Metrics,
        *,
        batch_size: int = 5000,
        max_attempts: int = 3,
    ) -> None:
        self.store = store
        self.writer = writer
        self.client = client
        self.metrics = metrics
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.wake = asyncio.Event()
        # The committed cursor, changed only on the writer thread; while
        # acknowledgements wait for their commit, the cloud is ahead of it.
        self.delivered = delivered_seq(store, CLOUD_QUEUE, None)
        self.limit = batch_size
        self._ceiling: tuple[int, float] | None = None
        self._down_since: float | None = None
        # The acknowledgement commit in flight, and the newest answer that
        # still needs one: answers that arrive while a commit runs are
        # folded into one, as the last covers the ones before.
        self._ack: asyncio.Future[int] | None = None
        self._owed: tuple[dict[str, Any], _Batch] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Send until ``stop`` is set; the batch in hand is finished first."""
        backoff = Backoff()
        while not stop.is_set():
            try:
                sent = await self._stream(stop)
                await self._acknowledged()
            except TransportError as error:
                await self._settle()
                await self._wait_out(error, backoff, stop)
                continue
            except Exception:
                # Our own file failing (a StorageError) or a bug: log it with
                # its traceback and try again later, never end the loop.
                logger.exception("the uplink failed; retrying")
                await self._settle()
                await sleep_or_wake(backoff.next_delay(), stop)
                continue
            if sent:
                backoff.reset()
                self._reached()

    async def _settle(self) -> None:
        # After an error, commit the acknowledgements that can be; one that
        # cannot is dropped, and its events are sent again (the cloud applies
        # each once).
        try:
            await self._acknowledged()
        except Exception:
            logger.exception("acknowledging pushed events failed; resending them")
            self._ack = self._owed = None

    async def _stream(self, stop: asyncio.Event) -> bool:
        """Send batches while the queue has events; True if any was applied.

        While a backlog drains, ``IN_FLIGHT`` batches travel at once and the
        next is read meanwhile. Answers are taken in order; once one is not
        applied whole, the batches behind it are let go (the cloud applies a
        chained batch only after the one before) and the stream ends, to
        start again from the cursor.
        """
        # Cleared before the read: a commit after it sets the flag again, so
        # an event that lands while the queue reads empty is not left waiting.
        self.wake.clear()
        batch = await asyncio.to_thread(self._first_batch)
        if batch is None:
            await sleep_or_wake(1.0, self.wake)
            return False
        sent = False
        flying: deque[_Flight] = deque()
        try:
            while True:
                while batch is not None and self._room(flying):
                    flying.append(self._launch(batch))
                    batch = await asyncio.to_thread(self._read, batch.last)
                if not flying:
                    return sent
                head = flying.popleft()
                whole = await self._answered(head)
                sent = True
                epoch = head.batch.epoch
                if not whole or stop.is_set() or epoch != self.store.queue_epoch:
                    return sent
                if batch is None:
                    # Under a trickle the queue read empty while the batch
                    # travelled; what was committed since goes now, on the
                    # same stream, without waiting for the acknowledgement.
                    last = (flying[-1] if flying else head).batch.last
                    batch = await asyncio.to_thread(self._read, last)
        finally:
            # The batches behind one not applied whole are let go at once:
            # the cloud applies a chained batch only after the one before.
            await _abandon(flying)

    def _room(self, flying: deque[_Flight]) -> bool:
        # A second batch goes before the first is answered only behind a full
        # one, that is while a backlog drains. Under a steady trickle, events
        # that wait for the answer make one larger batch instead, which costs
        # the cloud and this edge one commit rather than two.
        if not flying:
            return True
        return len(flying) < IN_FLIGHT and flying[-1].batch.count >= self.limit

    def _launch(self, batch: _Batch) -> _Flight:
        push = self.client.push(batch.headers, batch.content)
        return _Flight(batch, asyncio.ensure_future(push), time.perf_counter())

    def _first_batch(self) -> _Batch | None:
        # The cursor is read from the file at the start of each stream, so a
        # replay that moved it through the admin API takes effect. The epoch
        # is taken first: a replay between the two reads then marks the
        # batch as read before it.
        epoch = self.store.queue_epoch
        self.delivered = delivered_seq(self.store, CLOUD_QUEUE, None)
        return self._read(self.delivered, chained=False, epoch=epoch)

    def _read(
        self, after: int, *, chained: bool = True, epoch: int | None = None
    ) -> _Batch | None:
        # Runs in a thread while the batch before travels: the body is encoded
        # and compressed here, so it leaves the moment the answer comes.
        if epoch is None:
            epoch = self.store.queue_epoch
        found = read_pending_wire(self.store, CLOUD_QUEUE, after, self.limit)
        if found is None:
            return None
        # ``chained``: the batch follows one sent before it, so the cloud
        # applies it only after that one (a first batch may skip events the
        # user purged here).
        head = {"instance": self.store.instance, "after": after, "chained": chained}
        text = orjson.dumps(head)[:-1] + b',"events":[' + found.items + b"]}"
        headers, content = encode_json(text)
        return _Batch(found.count, found.first, found.last, headers, content, epoch)

    async def _acknowledged(self) -> None:
        """Commit every acknowledgement owed, and wait for it."""
        await self._pay(wait=True)

    async def _pay(self, *, wait: bool) -> None:
        """Start the owed acknowledgement's commit if none is running; with
        ``wait``, also wait for the running one and the owed one to finish."""
        if self._ack is not None:
            if not (wait or self._ack.done()):
                return
            running, self._ack = self._ack, None
            await running
        if self._owed is None:
            return
        answer, batch = self._owed
        self._owed = None
        self._ack = asyncio.wrap_future(
            self.writer.call(lambda: self._acknowledge(answer, batch))
        )
        if wait:
            running, self._ack = self._ack, None
            await running

    async def _shrink(self, batch: _Batch, error: TooLarge) -> None:
        # A body limit in front of the cloud (nginx allows 1 MiB by default)
        # refuses a large batch every time it is sent: without halving, the
        # queue would stop there for good.
        if batch.count > 1:
            self.limit = max(1, batch.count // 2)
            self._ceiling = (self.limit, time.monotonic())
            logger.warning(
                "the cloud refused %d events as too large; sending %d at a time",
                batch.count,
                self.limit,
            )
            return
        # One event alone is too large: it can never pass as it is, so it
        # counts attempts and goes to the dead letters like a rejected one.
        reason = f"the event alone is larger than the cloud accepts: {error}"
        await on_writer(self.writer, lambda: self._reject_alone(batch.first, reason))

    def _reject_alone(self, seq: int, error: str) -> int:
        with self.store.transaction() as con:
            self.delivered = self._reject(con, seq, error)
        return self.delivered

    def _grow(self) -> None:
        # Double back towards the configured size, but for ten minutes no
        # further than half the size last refused: a lasting body limit then
        # costs a few refusals, not one per batch.
        ceiling = self.batch_size
        if self._ceiling is not None:
            size, when = self._ceiling
            if time.monotonic() - when < 600:
                ceiling = min(ceiling, size)
            else:
                self._ceiling = None
        self.limit = max(1, min(ceiling, self.limit * 2))

    async def _answered(self, flight: _Flight) -> bool:
        """Take one batch's answer; True when the cloud applied all of it."""
        batch, started = flight.batch, flight.started
        try:
            answer = await flight.answer
        except Gap as gap:
            await self._acknowledged()
            self._gap(gap)
            return False
        except TooLarge as error:
            await self._acknowledged()
            await self._shrink(batch, error)
            return False
        self.metrics.observe_batch(time.perf_counter() - started)
        self.metrics.add("events_sent", batch.count)
        # The acknowledgement commits on the writer thread while the next
        # batch travels; an answer after this one covers it, if it comes first.
        self._owed = (answer, batch)
        through = min(int(answer.get("applied_through", 0)), batch.last)
        logger.info(
            "pushed %d events to %s (through seq %d) in %.0f ms",
            batch.count,
            self.client.url,
            through,
            (time.perf_counter() - started) * 1000,
        )
        if through < batch.last or answer.get("rejected") is not None:
            await self._acknowledged()
            return False
        await self._pay(wait=False)
        self._grow()
        return True

    def _gap(self, gap: Gap) -> None:
        # Events above our cursor are contiguous unless a user purged some; the
        # cloud then asks for what it expects, and we resume from our cursor.
        self.delivered = delivered_seq(self.store, CLOUD_QUEUE, None)
        logger.warning(
            "the cloud expects events after seq %d; resending from %d",
            gap.expected,
            self.delivered,
        )
        raise gap

    def _acknowledge(self, answer: dict[str, Any], batch: _Batch) -> int:
        if batch.epoch != self.store.queue_epoch:
            # A replay moved the cursor back after this batch was read; its
            # cursor stands, and the stream starts again from it.
            return self.delivered
        through = min(int(answer.get("applied_through", 0)), batch.last)
        rejected = answer.get("rejected")
        delivered = self.delivered
        with self.store.transaction() as con:
            if through > delivered:
                mark_delivered(
                    con,
                    CLOUD_QUEUE,
                    None,
                    through,
                    keep=self.store.keep_delivered_ms > 0,
                )
                self.metrics.add("events_acknowledged", through - delivered)
                delivered = through
            if isinstance(rejected, dict) and int(rejected["seq"]) == delivered + 1:
                delivered = self._reject(
                    con, int(rejected["seq"]), str(rejected["error"])
                )
        self.delivered = delivered
        return delivered

    def _reject(self, con: Any, seq: int, error: str) -> int:
        attempts = record_failure(con, CLOUD_QUEUE, None, seq, error)
        self.metrics.add("events_retried", 1)
        if attempts < self.max_attempts:
            logger.warning(
                "the cloud rejected event %d (attempt %d): %s", seq, attempts, error
            )
            return seq - 1
        dead_letter(con, CLOUD_QUEUE, None, seq)
        mark_delivered(con, CLOUD_QUEUE, None, seq)
        self.metrics.add("events_dead_lettered", 1)
        logger.error(
            "event %d dead-lettered after %d attempts: %s; "
            "see `edgectl replay list --dead`",
            seq,
            attempts,
            error,
        )
        return seq

    async def _wait_out(
        self, error: TransportError, backoff: Backoff, stop: asyncio.Event
    ) -> None:
        if isinstance(error, Gap):
            # The cloud answered; the stream starts again from the cursor
            # after a short pause, without calling the cloud unavailable.
            await sleep_or_wake(min(backoff.next_delay(), 1.0), stop)
            return
        if self._down_since is None:
            self._down_since = time.monotonic()
            hint = (
                " (check the edge key and secret)"
                if isinstance(error, PeerRejectedError)
                else ""
            )
            logger.warning("cloud unavailable, events stay queued: %s%s", error, hint)
        self.metrics.add("push_failures", 1)
        delay = backoff.next_delay()
        if isinstance(error, RetryLater) and error.retry_after:
            # Retry-After is honoured, up to the backoff's cap, so a cloud
            # asking for an hour does not keep a backlog waiting that long.
            await sleep_or_wake(min(error.retry_after, backoff.cap), stop)
            return
        # A 503 without Retry-After is waited out like an unreachable cloud:
        # the wait ends early once the cloud's health check answers again.
        await wait_until_up(self.client, delay, stop)

    def _reached(self) -> None:
        if self._down_since is not None:
            logger.info(
                "cloud reachable again after %.1f s",
                time.monotonic() - self._down_since,
            )
            self._down_since = None


async def _abandon(flying: deque[_Flight]) -> None:
    """Cancel pushes whose answers are not needed, and let them end."""
    answers = [flight.answer for flight in flying]
    for answer in answers:
        answer.cancel()
    if answers:
        await asyncio.wait(answers)
    for answer in answers:
        if not answer.cancelled():
            answer.exception()


async def wait_until_up(client: CloudClient, delay: float, stop: asyncio.Event) -> None:
    """Wait up to ``delay`` s, returning early once the cloud answers again."""
    deadline = time.monotonic() + delay
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        await sleep_or_wake(min(1.0, left), stop)
        if await client.is_up():
            return


class Downlink:
    """Long-polls the cloud for this edge's events and applies them."""

    def __init__(
        self,
        store: Store,
        writer: Writer,
        client: CloudClient,
        receiver: Receiver,
        metrics: Metrics,
        *,
        wait: float = 20.0,
        batch_size: int = 5000,
    ) -> None:
        self.store = store
        self.writer = writer
        self.client = client
        self.receiver = receiver
        self.metrics = metrics
        self.wait = wait
        self.batch_size = batch_size

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set."""
        backoff = Backoff()
        key: str | None = None
        rejected: dict[str, Any] | None = None
        while not stop.is_set():
            try:
                if key is None:
                    hello = await self.client.hello()
                    key = peer_key("cloud", "cloud", str(hello["instance"]))
                    logger.info(
                        "connected to cloud %s as edge %r",
                        self.client.url,
                        hello.get("edge"),
                    )
                rejected = await self._poll(key, rejected, stop)
            except TransportError as error:
                logger.debug("downlink poll failed: %s", error)
                await wait_until_up(self.client, backoff.next_delay(), stop)
                continue
            except Exception:
                # As for the uplink: a bad batch or our own file failing must
                # not end the loop; it is logged and tried again.
                logger.exception("the downlink failed; retrying")
                await wait_until_up(self.client, backoff.next_delay(), stop)
                continue
            backoff.reset()

    async def _poll(
        self, key: str, rejected: dict[str, Any] | None, stop: asyncio.Event
    ) -> dict[str, Any] | None:
        ack = await asyncio.to_thread(self.store.applied_seq, key)
        request = {
            "ack": ack,
            "rejected": rejected,
            "wait_ms": int(self.wait * 1000),
            "limit": self.batch_size,
        }
        poll = asyncio.ensure_future(self.client.poll(request, self.wait))
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait(
            {poll, stopping}, return_when=asyncio.FIRST_COMPLETED
        )
        stopping.cancel()
        if poll not in done:
            poll.cancel()
            return rejected
        answer = poll.result()
        events = decode_events(answer.get("events", []))
        if not events:
            return None
        result: ApplyResult = await on_writer(
            self.writer, lambda: self._apply(events, key)
        )
        self.metrics.add("events_received", result.applied)
        if result.rejected is None:
            return None
        logger.warning(
            "rejected event %d from the cloud: %s",
            result.rejected.seq,
            result.rejected.error,
        )
        return {"seq": result.rejected.seq, "error": result.rejected.error}

    def _apply(self, events: list[Any], key: str) -> ApplyResult:
        result, run = self.receiver.apply(events, key, None)
        self.writer.notify(run.changes)
        self.metrics.add("readings_stored", run.changes.reading_count)
        self.metrics.add("events_queued", len(run.changes.events))
        return result
