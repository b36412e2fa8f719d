"""Devices posting numbered readings to an edge, remembering what was accepted.

Each device posts its readings in order, ``per_post`` of them per request (an
array of ``{"ts": BASE + n, "values": {"n": n}}``), one request at a time: a
distinct ts per reading, so every reading is its own ts_kv row on both sides.
A reading counts as accepted only when the edge answered 200 to its request.

A device never posts the same reading twice when the first try may have been
stored, so any reading the cloud applies twice was doubled by the sync, not by
the device. It tries the same reading again only when the edge surely kept
nothing: the connection was refused, or it answered 503 (which promises that).
Any other failure (a reset, a timeout, an unexpected status) leaves the reading
"unknown": it may reach the cloud, and is not counted as missing if it does not.

The first device posts a poison reading (``{"n": n, "poison": 1}``) once
``poison_after`` seconds have passed, alone in its request; the cloud chain of
the harness refuses it. If the edge's answer to it is lost, the device posts
another poison reading (with the next number) until one is accepted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

BASE_TS = 1_600_000_000_000


@dataclass
class DeviceRecord:
    """What one device posted and what the edge answered."""

    name: str
    token: str
    posted: int = 0
    accepted: set[int] = field(default_factory=set)
    unknown: set[int] = field(default_factory=set)
    retries: int = 0
    poisons: dict[int, bool] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)


class Load:
    """Devices posting concurrently from a thread of their own.

    ``interval`` is the pause between two posts of one device; each device
    stops after ``duration`` seconds (or when ``stop`` is called).
    """

    def __init__(
        self,
        edge_url: str,
        devices: list[tuple[str, str]],
        *,
        interval: float,
        duration: float,
        per_post: int = 1,
        poison_after: float | None = None,
    ) -> None:
        self.edge_url = edge_url
        self.records = [DeviceRecord(name, token) for name, token in devices]
        self.interval = interval
        self.duration = duration
        self.per_post = per_post
        self.poison_after = poison_after
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = 0.0
        self.error: BaseException | None = None

    def start(self) -> Load:
        """Begin posting."""
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask every device to stop after the post in hand."""
        self._stopping.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for every device to finish; re-raise what broke the load."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the device load did not finish in time")
        if self.error is not None:
            raise self.error

    @property
    def elapsed(self) -> float:
        """Seconds since the load started."""
        return time.monotonic() - self.started

    def _run(self) -> None:
        try:
            asyncio.run(self._all())
        except BaseException as error:  # handed to join()
            self.error = error

    async def _all(self) -> None:
        limits = httpx.Limits(max_connections=len(self.records) + 4)
        timeout = httpx.Timeout(10.0, connect=2.0)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            await asyncio.gather(
                *(
                    self._device(client, record, index == 0)
                    for index, record in enumerate(self.records)
                )
            )

    def _done(self) -> bool:
        return self._stopping.is_set() or self.elapsed >= self.duration

    async def _device(
        self, client: httpx.AsyncClient, record: DeviceRecord, carries_poison: bool
    ) -> None:
        url = f"{self.edge_url}/api/v1/{record.token}/telemetry"
        number = 0
        while not self._done():
            poison = (
                carries_poison
                and True not in record.poisons.values()
                and self.poison_after is not None
                and self.elapsed >= self.poison_after
            )
            count = 1 if poison else self.per_post
            numbers = range(number, number + count)
            body = [_reading(n, poison) for n in numbers]
            outcome = await _post(client, url, body)
            record.statuses[outcome] += 1
            if outcome in ("refused", "503"):
                record.retries += 1
                await asyncio.sleep(0.05)
                continue
            record.posted += count
            if poison:
                record.poisons[number] = outcome == "200"
            elif outcome == "200":
                record.accepted.update(numbers)
            else:
                record.unknown.update(numbers)
            number += count
            await asyncio.sleep(self.interval)


def _reading(number: int, poison: bool) -> dict:
    values = {"n": number, "poison": 1} if poison else {"n": number}
    return {"ts": BASE_TS + number, "values": values}


async def _post(client: httpx.AsyncClient, url: str, body: dict) -> str:
    try:
        response = await client.post(url, json=body)
    except httpx.ConnectError:
        return "refused"
    except httpx.HTTPError as error:
        return type(error).__name__
    if response.status_code not in (200, 503):
        # The harness sends only valid readings, so any other answer is a bug
        # of the edge; it is kept for the harness to report, and the readings
        # of that request count as unknown.
        return f"{response.status_code} {response.text[:200]}"
    return str(response.status_code)
