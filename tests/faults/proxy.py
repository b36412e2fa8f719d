"""A controllable HTTP/1.1 proxy between an edge and its cloud, for fault tests.

The edge is started with ``--cloud`` pointing here. The proxy reads each request
whole before deciding what to do with it, so a mode applies to every request,
including those sent on a connection the edge kept alive from before:

- ``pass``: forward to the cloud and send its answer back;
- ``refuse``: stop listening (new connections get ECONNREFUSED) and reset every
  open connection, as a host that went away;
- ``503`` / ``429``: answer that status itself without forwarding (429 with
  ``Retry-After: 1``), as an overloaded load balancer;
- ``blackhole``: read the request and never answer nor close, so only the
  edge's own timeout tells; held connections stay held after the mode changes,
  as a flow a middlebox dropped;
- ``cut``: forward the request, read the cloud's whole answer (the cloud has
  committed by then), then close the edge's connection without sending it;
- ``413``: answer 413 to a request whose body is over ``max_body`` bytes and
  forward the others, as a reverse proxy with a body limit (nginx's default
  ``client_max_body_size`` is 1 MiB);
- ``garbage``: answer 200 with an HTML page, as a captive portal or a load
  balancer routing to the wrong site.

``rate`` makes a mode apply to that fraction of requests only (drawn from a
seeded generator); the rest pass. ``delay`` holds the cloud's answer to an
uplink request that long before passing it on, which widens the window in
which the cloud has committed a batch and the edge does not know it yet.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter

MODES = ("pass", "refuse", "503", "429", "blackhole", "cut", "413", "garbage")
UPLINK = "/api/edge/v1/uplink"
_REASONS = {
    200: "OK",
    413: "Content Too Large",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


class Proxy:
    """The proxy, served by an asyncio loop on a thread of its own."""

    def __init__(self, upstream_port: int, *, seed: int = 0) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.mode = "pass"
        self.rate = 1.0
        self.delay = 0.0
        self.max_body = 16 * 1024
        self.counts: Counter[str] = Counter()
        self.at_cloud = 0
        self.in_flight = 0
        self.uplink_forwarded = threading.Event()
        self._random = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self._upstreams: set[asyncio.StreamWriter] = set()

    # -- control, from any thread --------------------------------------------

    def start(self) -> Proxy:
        """Listen on 127.0.0.1 (port 0 the first time) and serve."""
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        """Close every connection, end every task and stop the loop."""
        self._call(self._shut_down())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def set_mode(self, mode: str, *, rate: float = 1.0) -> None:
        """Switch mode; leaving or entering ``refuse`` reopens or closes the port."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        was, self.mode, self.rate = self.mode, mode, rate
        if mode == "refuse" and was != "refuse":
            self._call(self._close(listening=True))
        elif was == "refuse" and mode != "refuse":
            self._call(self._listen())

    @property
    def url(self) -> str:
        """The URL to give the edge as its cloud."""
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coroutine: object) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)  # type: ignore[arg-type]

    # -- the loop's side -------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self, *, listening: bool) -> None:
        if listening and self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._clients):
            writer.transport.abort()
        self._clients.clear()

    async def _shut_down(self) -> None:
        # Aborting every transport ends each connection's task through its own
        # error path; cancelling them instead trips a bug of Python 3.11's
        # streams (the server's done-callback re-raises the cancellation).
        await self._close(listening=True)
        for writer in list(self._upstreams):
            writer.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    def _draw(self) -> str:
        mode = self.mode
        if mode != "pass" and self._random.random() >= self.rate:
            return "pass"
        return mode

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._clients.add(writer)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                request = await read_message(reader, is_response=False)
                if request is None:
                    return
                mode = self._draw()
                if mode == "refuse":
                    writer.transport.abort()
                    return
                if mode == "413" and len(request.body) <= self.max_body:
                    mode = "pass"
                self.counts[mode] += 1
                if mode in ("503", "429", "413"):
                    writer.write(_answer(int(mode)))
                    await writer.drain()
                    continue
                if mode == "garbage":
                    writer.write(_answer(200))
                    await writer.drain()
                    continue
                if mode == "blackhole":
                    while await reader.read(65536):
                        pass
                    return
                upstream = upstream or await _connect(self.upstream_port)
                if upstream is None:
                    self.counts["cloud unreachable"] += 1
                    writer.transport.abort()
                    return
                self._upstreams.add(upstream[1])
                if not await self._forward(request, upstream, writer, mode):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            writer.transport.abort()
        finally:
            self._clients.discard(writer)
            if upstream is not None:
                self._upstreams.discard(upstream[1])
                upstream[1].transport.abort()
            writer.close()

    async def _forward(
        self,
        request: Message,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        writer: asyncio.StreamWriter,
        mode: str,
    ) -> bool:
        is_uplink = request.target.startswith(UPLINK)
        upstream[1].write(request.raw)
        await upstream[1].drain()
        if not is_uplink:
            return await self._pass_on(upstream, writer, mode, is_uplink)
        self.in_flight += 1
        self.uplink_forwarded.set()
        try:
            return await self._pass_on(upstream, writer, mode, is_uplink)
        finally:
            self.in_flight -= 1

    async def _pass_on(
        self,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        writer: asyncio.StreamWriter,
        mode: str,
        is_uplink: bool,
    ) -> bool:
        self.at_cloud += is_uplink
        try:
            response = await read_message(upstream[0], is_response=True)
        finally:
            self.at_cloud -= is_uplink
        if response is None:
            # The cloud closed without answering (killed while applying): the
            # edge sees its connection reset, as it would without a proxy.
            self.counts["cloud closed"] += 1
            writer.transport.abort()
            return False
        if mode == "cut":
            self.counts["answers cut"] += 1
            writer.close()
            return False
        if is_uplink and self.delay:
            await asyncio.sleep(self.delay)
        writer.write(response.raw)
        await writer.drain()
        return True


class Message:
    """One HTTP/1.1 message as read: its first line and its raw bytes."""

    def __init__(self, start: str, raw: bytes, body: bytes) -> None:
        self.start = start
        self.raw = raw
        self.body = body

    @property
    def target(self) -> str:
        """The request target (path and query) of a request."""
        parts = self.start.split(" ")
        return parts[1] if len(parts) > 1 else ""


async def read_message(
    reader: asyncio.StreamReader, *, is_response: bool
) -> Message | None:
    """Read one whole message, or None on a clean end of stream before it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if not error.partial:
            return None
        raise
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        body = await _read_chunked(reader)
    elif b"content-length" in headers:
        body = await reader.readexactly(int(headers[b"content-length"]))
    elif is_response:
        body = await reader.read()
    else:
        body = b""
    return Message(lines[0].decode("latin-1"), head + body, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    raw = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        raw += size_line
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while True:
                trailer = await reader.readuntil(b"\r\n")
                raw += trailer
                if trailer == b"\r\n":
                    return bytes(raw)
        raw += await reader.readexactly(size + 2)


async def _connect(
    port: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    try:
        return await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None


def _answer(status: int) -> bytes:
    if status == 200:
        body = b"<html><body>Please sign in to use this network.</body></html>"
        kind = b"text/html"
    else:
        body = b'{"error": "the fault proxy answers %d"}' % status
        kind = b"application/json"
    head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\n" % (
        status,
        _REASONS[status].encode(),
        kind,
    )
    if status == 429:
        head += b"retry-after: 1\r\n"
    return head + b"content-length: %d\r\n\r\n" % len(body) + body
