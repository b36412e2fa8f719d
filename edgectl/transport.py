"""The edge's HTTP client for its cloud: push events up, poll events down.

httpx errors are wrapped here: a network problem, a timeout, a 5xx or a 429
is a TransportError worth retrying; a refusal (401, 403, 400) is a
PeerRejectedError; a 409 says the cloud expects events from an earlier point.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import random
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from edgectl.errors import PeerRejectedError, TransportError
from edgectl.values import parse_json

logger = logging.getLogger(__name__)

UPLINK_PATH = "/api/edge/v1/uplink"
DOWNLINK_PATH = "/api/edge/v1/downlink"
HELLO_PATH = "/api/edge/v1/hello"
_GZIP_ABOVE = 16 * 1024


class RetryLater(TransportError):
    """The cloud answered but asked to be tried again (5xx, 429)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Gap(TransportError):
    """The cloud has not applied the events before this batch."""

    def __init__(self, message: str, expected: int) -> None:
        super().__init__(message)
        self.expected = expected


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with full jitter."""

    base: float = 0.2
    cap: float = 30.0
    attempt: int = 0

    def next_delay(self) -> float:
        """The next wait in seconds; each call doubles the ceiling up to the cap."""
        ceiling = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """Start again from the shortest wait."""
        self.attempt = 0


class CloudClient:
    """Talks to one cloud as one edge, with HTTP basic auth (key, secret)."""

    def __init__(
        self,
        url: str,
        key: str,
        secret: str,
        *,
        timeout: float = 15.0,
        verify: bool | str = True,
    ) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.url,
            auth=(key, secret),
            timeout=httpx.Timeout(timeout, connect=5.0),
            verify=verify,
        )

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def hello(self) -> dict[str, Any]:
        """Check credentials; returns the cloud's instance id and our edge name."""
        return await self._request("GET", HELLO_PATH)

    async def push(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Send a batch of events; returns how far the cloud applied it."""
        return await self._request("POST", UPLINK_PATH, batch)

    async def poll(self, request: dict[str, Any], wait: float) -> dict[str, Any]:
        """Acknowledge applied events and wait up to ``wait`` s for new ones."""
        return await self._request("POST", DOWNLINK_PATH, request, extra=wait)

    async def is_up(self) -> bool:
        """True when the cloud answers its health check."""
        try:
            response = await self._client.get("/healthz", timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        extra: float = 0.0,
    ) -> dict[str, Any]:
        headers, content = _encode(body)
        timeout = self._client.timeout
        if extra:
            timeout = httpx.Timeout(timeout.read + extra if timeout.read else None, connect=5.0)
        try:
            response = await self._client.request(
                method, path, content=content, headers=headers, timeout=timeout
            )
        except httpx.TimeoutException as error:
            raise TransportError(f"{self.url}{path} timed out: {error!r}") from error
        except httpx.HTTPError as error:
            raise TransportError(f"cannot reach {self.url}: {error!r}") from error
        return _decode(response, f"{self.url}{path}")


def _encode(body: dict[str, Any] | None) -> tuple[dict[str, str], bytes | None]:
    if body is None:
        return {}, None
    content = orjson.dumps(body)
    headers = {"content-type": "application/json"}
    if len(content) > _GZIP_ABOVE:
        content = gzip.compress(content, compresslevel=1)
        headers["content-encoding"] = "gzip"
    return headers, content


def _decode(response: httpx.Response, where: str) -> dict[str, Any]:
    status = response.status_code
    if status == 200:
        data = parse_json(response.content)
        if not isinstance(data, dict):
            raise TransportError(f"{where} answered with a non-object body")
        return data
    message = _error_text(response)
    if status == 409:
        expected = int(_field(response, "expected") or 0)
        raise Gap(f"{where}: {message}", expected)
    if status == 429 or status >= 500:
        retry_after = response.headers.get("retry-after")
        delay = float(retry_after) if retry_after and retry_after.isdigit() else None
        raise RetryLater(f"{where} answered {status}: {message}", delay)
    raise PeerRejectedError(f"{where} answered {status}: {message}")


def _field(response: httpx.Response, name: str) -> Any:
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    return data.get(name) if isinstance(data, dict) else None


def _error_text(response: httpx.Response) -> str:
    return str(_field(response, "error") or response.text[:200] or response.reason_phrase)


async def sleep_or_wake(delay: float, wake: asyncio.Event) -> None:
    """Sleep ``delay`` seconds, or less if ``wake`` is set meanwhile."""
    try:
        await asyncio.wait_for(wake.wait(), timeout=delay)
    except TimeoutError:
        pass
