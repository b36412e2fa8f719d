"""The edge's HTTP client for its cloud: push events up, poll events down.

httpx errors are wrapped here: a network problem, a timeout, a 5xx or a 429
is a TransportError worth retrying; a refusal (401, 403, 400) is a
PeerRejectedError; a 409 says the cloud expects events from an earlier point;
a 413 says the batch was too large. An answer that is not the shape an edgectl
cloud gives (a captive portal's page, another server's JSON) is a
TransportError too, so the loops retry instead of failing on it.
"""

from __future__ import annotations

import asyncio
import contextlib
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
# Bodies past 1 KiB travel gzipped. A body limit in front of the cloud counts
# bytes on the wire; compressing all but the smallest bodies keeps a batch's
# wire size in step with its event count, so halving a refused batch finds a
# large one that fits (with 16 KiB, a 2 KiB limit held batches at 7 events).
_GZIP_ABOVE = 1024


class RetryLater(TransportError):
    """The cloud answered but asked to be tried again (5xx, 429)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooLarge(PeerRejectedError):
    """The cloud, or a proxy in front of it, refused the body as too large."""


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
        answer = await self._request("GET", HELLO_PATH)
        _expect(answer, "instance", str, f"{self.url}{HELLO_PATH}")
        return answer

    async def push(self, headers: dict[str, str], content: bytes) -> dict[str, Any]:
        """Send a batch of events, encoded with ``encode_body``; returns how far
        the cloud applied it.

        The answer has an integer ``applied_through`` and ``rejected``, None or
        ``{"seq": int, "error": str}``; any other shape raises TransportError.
        """
        answer = await self._send("POST", UPLINK_PATH, headers, content)
        where = f"{self.url}{UPLINK_PATH}"
        _expect(answer, "applied_through", int, where)
        rejected = answer.get("rejected")
        if rejected is not None:
            _expect(rejected, "seq", int, where)
        return answer

    async def poll(self, request: dict[str, Any], wait: float) -> dict[str, Any]:
        """Acknowledge applied events and wait up to ``wait`` s for new ones.

        The answer has a list of ``events``; any other shape raises
        TransportError.
        """
        answer = await self._request("POST", DOWNLINK_PATH, request, extra=wait)
        _expect(answer, "events", list, f"{self.url}{DOWNLINK_PATH}")
        return answer

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
        if body is None:
            return await self._send(method, path, {}, None, extra)
        headers, content = encode_body(body)
        return await self._send(method, path, headers, content, extra)

    async def _send(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        content: bytes | None,
        extra: float = 0.0,
    ) -> dict[str, Any]:
        timeout = self._client.timeout
        if extra:
            timeout = httpx.Timeout(
                timeout.read + extra if timeout.read else None, connect=5.0
            )
        try:
            response = await self._client.request(
                method, path, content=content, headers=headers, timeout=timeout
            )
        except httpx.TimeoutException as error:
            raise TransportError(f"{self.url}{path} timed out: {error!r}") from error
        except httpx.HTTPError as error:
            raise TransportError(f"cannot reach {self.url}: {error!r}") from error
        return _decode(response, f"{self.url}{path}")


def encode_body(body: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """Headers and content for a JSON body, gzipped past 1 KiB."""
    return encode_json(orjson.dumps(body))


def encode_json(content: bytes) -> tuple[dict[str, str], bytes]:
    """Headers and content for JSON text, gzipped past 1 KiB."""
    headers = {"content-type": "application/json"}
    if len(content) > _GZIP_ABOVE:
        content = gzip.compress(content, compresslevel=1)
        headers["content-encoding"] = "gzip"
    return headers, content


def _decode(response: httpx.Response, where: str) -> dict[str, Any]:
    status = response.status_code
    if status == 200:
        return _json_object(response, where)
    message = _error_text(response)
    if status == 409:
        # The cloud names the sequence it expects in the X-Expected header.
        header = response.headers.get("x-expected", "")
        expected = int(header) if header.isdigit() else 0
        raise Gap(f"{where}: {message}", expected)
    if status == 413:
        raise TooLarge(f"{where} answered 413: {message}")
    if status == 429 or status >= 500:
        retry_after = response.headers.get("retry-after")
        delay = float(retry_after) if retry_after and retry_after.isdigit() else None
        raise RetryLater(f"{where} answered {status}: {message}", delay)
    raise PeerRejectedError(f"{where} answered {status}: {message}")


def _json_object(response: httpx.Response, where: str) -> dict[str, Any]:
    # A 200 that is not JSON comes from something between us and the cloud (a
    # captive portal, a misrouted load balancer): worth retrying, never a crash
    # of the loop that sent it.
    kind = response.headers.get("content-type", "no content type")
    try:
        data = parse_json(response.content)
    except ValueError as error:
        raise TransportError(
            f"{where} answered 200 with {kind} that is not JSON ({error}); "
            "is something between the edge and the cloud answering for it?"
        ) from error
    if not isinstance(data, dict):
        raise TransportError(f"{where} answered with a non-object body")
    return data


def _expect(answer: Any, name: str, kind: type, where: str) -> None:
    value = answer.get(name) if isinstance(answer, dict) else None
    # bool is an int to Python, but never a sequence number.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TransportError(
            f"{where} answered without {kind.__name__} {name!r}: "
            "is the URL an edgectl cloud?"
        )


def _field(response: httpx.Response, name: str) -> Any:
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    return data.get(name) if isinstance(data, dict) else None


def _error_text(response: httpx.Response) -> str:
    return str(
        _field(response, "error") or response.text[:200] or response.reason_phrase
    )


async def sleep_or_wake(delay: float, wake: asyncio.Event) -> None:
    """Sleep ``delay`` seconds, or less if ``wake`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), timeout=delay)
