"""The HTTP side of a running role: device API, edge sync API, admin API.

Handlers parse and check requests, hand work to the writer thread and answer
once it is committed. Every refusal is a status with a JSON body
``{"error": "..."}`` that says what was wrong.
"""

from __future__ import annotations

import asyncio
import gzip
import hmac
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from edgectl.changes import DELETED, AttributeValue, ChangeSet
from edgectl.errors import EdgectlError, StorageError
from edgectl.message import (
    ATTRIBUTES_UPDATED,
    POST_ATTRIBUTES_REQUEST,
    POST_TELEMETRY_REQUEST,
    EntityRef,
    Message,
    normalize_scope,
    now_ms,
    thingsboard_scope,
)
from edgectl.metrics import Metrics
from edgectl.outbox import EDGE_QUEUE, dead_letter, delivered_seq, mark_delivered
from edgectl.outbox import read_pending, record_failure
from edgectl.storage import DEVICE, Edge, Entity, Store
from edgectl.sync import ApplyResult, Receiver, decode_events, encode_event, peer_key
from edgectl.values import (
    JsonSyntaxError,
    ValueRejected,
    classify,
    decode,
    parse_json,
    telemetry_groups,
)
from edgectl.writer import Writer

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


class HttpError(Exception):
    """A refusal: the status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(slots=True)
class Limits:
    """Request limits that keep one client from starving the others."""

    max_body_bytes: int = 1024 * 1024
    max_sync_body_bytes: int = 64 * 1024 * 1024
    max_polls_per_device: int = 4
    max_attempts: int = 3


@dataclass
class Service:
    """Everything the handlers of one role use."""

    role: str
    store: Store
    writer: Writer
    receiver: Receiver
    metrics: Metrics
    limits: Limits = field(default_factory=Limits)
    loop: asyncio.AbstractEventLoop | None = None
    closing: asyncio.Event | None = None
    _watchers: dict[EntityRef, list[asyncio.Future[Any]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    _edge_waiters: dict[str, asyncio.Event] = field(default_factory=dict)

    def on_commit(self, changes: ChangeSet) -> None:
        """Writer hook: wake long polls that the committed changes concern."""
        if self.loop is None:
            return
        shared = _shared_updates(changes)
        edges = {event.peer for event in changes.events if event.peer is not None}
        if shared or edges:
            self.loop.call_soon_threadsafe(self._wake, shared, edges)

    def _wake(self, shared: dict[EntityRef, dict[str, Any]], edges: set[str]) -> None:
        for entity, update in shared.items():
            for waiter in self._watchers.pop(entity, []):
                if not waiter.done():
                    waiter.set_result(update)
        for edge in edges:
            self._edge_waiters.setdefault(edge, asyncio.Event()).set()

    async def wait(self, awaitable: Awaitable[Any], seconds: float) -> bool:
        """Wait for ``awaitable`` up to ``seconds``; False on timeout or shutdown.

        Long polls end early when the server begins to stop, so a graceful
        stop does not wait for them to time out.
        """
        first = asyncio.ensure_future(awaitable)
        tasks = {first}
        if self.closing is not None:
            tasks.add(asyncio.ensure_future(self.closing.wait()))
        done, pending = await asyncio.wait(
            tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        return first in done

    def edge_waiter(self, edge: str) -> asyncio.Event:
        """The event set when new events for ``edge`` are committed."""
        return self._edge_waiters.setdefault(edge, asyncio.Event())


def _shared_updates(changes: ChangeSet) -> dict[EntityRef, dict[str, Any]]:
    updates: dict[EntityRef, dict[str, Any]] = {}
    for (entity, scope, key), value in changes.attributes.items():
        if scope != "shared":
            continue
        update = updates.setdefault(entity, {})
        if value is DELETED:
            update.setdefault("deleted", []).append(key)
        elif isinstance(value, AttributeValue):
            update[key] = decode(value.kind, value.value)
    return updates


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """A JSON error body with the status."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def guarded(service: Service, handler: Callable[[Service, Request], Awaitable[Response]]) -> Handler:
    """Wrap a handler so refusals become answers and nothing crashes the server."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(service, request)
        except HttpError as error:
            if error.status < 500:
                service.metrics.add("requests_rejected", 1)
            return error_response(error.status, error.message, error.headers)
        except StorageError as error:
            logger.error("storage failed while answering %s: %s", request.url.path, error)
            return error_response(
                503, "the edge could not store this; nothing was kept, try again",
                {"Retry-After": "1"},
            )
        except EdgectlError as error:
            return error_response(400, str(error))

    return endpoint


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (gzip undone)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if request.headers.get("content-encoding") == "gzip":
        body = _gunzip(body, limit)
    return body


def _gunzip(body: bytes, limit: int) -> bytes:
    try:
        decompressor = gzip.GzipFile(fileobj=__import__("io").BytesIO(body))
        data = decompressor.read(limit + 1)
    except (OSError, EOFError) as error:
        raise HttpError(400, f"body is not valid gzip: {error}") from None
    if len(data) > limit:
        raise HttpError(413, f"body is over the limit of {limit} bytes once unzipped")
    return data


def parse_body(body: bytes) -> Any:
    """Parse JSON, refusing malformed text with 400 and the parser's reason."""
    try:
        return parse_json(body)
    except JsonSyntaxError as error:
        raise HttpError(400, f"malformed JSON: {error}") from None


# -- device API --------------------------------------------------------------


def _device(service: Service, request: Request) -> Entity:
    token = request.path_params["token"]
    device = service.store.entity_by_token(token)
    if device is None:
        raise HttpError(401, "unknown device token")
    return device


def _metadata(device: Entity, ts: int) -> dict[str, str]:
    return {"deviceName": device.name, "deviceType": device.type, "ts": str(ts)}


def check_values(values: dict[str, Any], where: str = "") -> None:
    """Refuse a key whose value cannot be stored (null, NaN), naming it."""
    for key, value in values.items():
        try:
            classify(value)
        except ValueRejected as error:
            raise HttpError(400, f"{where}key {key!r}: {error}") from None


async def _commit(service: Service, messages: list[Message]) -> None:
    future = service.writer.submit(messages)
    await asyncio.wrap_future(future)
    service.metrics.add("messages_accepted", len(messages))


async def post_telemetry(service: Service, request: Request) -> Response:
    """``POST /api/v1/{token}/telemetry``: store readings, answer after commit."""
    device = _device(service, request)
    data = parse_body(await read_body(request, service.limits.max_body_bytes))
    if data == {} or data == []:
        return Response(status_code=200)
    if not isinstance(data, dict | list):
        raise HttpError(400, "body must be a JSON object or an array of objects")
    try:
        groups = list(telemetry_groups(data, now_ms()))
    except ValueRejected as error:
        raise HttpError(400, str(error)) from None
    messages = []
    for ts, values in groups:
        check_values(values)
        if values:
            messages.append(
                Message(POST_TELEMETRY_REQUEST, device.ref, values, _metadata(device, ts))
            )
    if messages:
        await _commit(service, messages)
    return Response(status_code=200)


async def post_attributes(service: Service, request: Request) -> Response:
    """``POST /api/v1/{token}/attributes``: client attributes, a flat object."""
    device = _device(service, request)
    data = parse_body(await read_body(request, service.limits.max_body_bytes))
    if not isinstance(data, dict):
        raise HttpError(400, "attributes must be a JSON object of key-values")
    if not data:
        return Response(status_code=200)
    check_values(data)
    metadata = {**_metadata(device, now_ms()), "notifyDevice": "false"}
    await _commit(service, [Message(POST_ATTRIBUTES_REQUEST, device.ref, data, metadata)])
    return Response(status_code=200)


def _keys(request: Request, name: str) -> list[str] | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    return [key for key in raw.split(",") if key]


def _plain(attributes: dict[str, AttributeValue]) -> dict[str, Any]:
    return {key: decode(value.kind, value.value) for key, value in attributes.items()}


async def get_attributes(service: Service, request: Request) -> Response:
    """``GET /api/v1/{token}/attributes?clientKeys=..&sharedKeys=..``."""
    device = _device(service, request)
    client_keys, shared_keys = _keys(request, "clientKeys"), _keys(request, "sharedKeys")
    both = client_keys is None and shared_keys is None
    answer: dict[str, Any] = {}
    for section, keys in (("client", client_keys), ("shared", shared_keys)):
        if keys is None and not both:
            continue
        found = await asyncio.to_thread(
            service.store.read_attributes, device.ref, section, keys
        )
        if found:
            answer[section] = _plain(found)
    return JSONResponse(answer)


async def attribute_updates(service: Service, request: Request) -> Response:
    """``GET /api/v1/{token}/attributes/updates?timeout=MS``: long poll.

    Answers with the changed shared attributes (``{"deleted": [...]}`` for
    deletes), or 408 when nothing changed in time, as ThingsBoard does.
    """
    device = _device(service, request)
    timeout = _timeout_ms(request.query_params.get("timeout", "0"))
    watchers = service._watchers[device.ref]
    if len(watchers) >= service.limits.max_polls_per_device:
        raise HttpError(429, "too many waiting polls for this device", {"Retry-After": "1"})
    waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    watchers.append(waiter)
    try:
        if not await service.wait(waiter, timeout / 1000):
            return Response(status_code=408)
    finally:
        if waiter in watchers:
            watchers.remove(waiter)
    return JSONResponse(waiter.result())


def _timeout_ms(raw: str) -> int:
    if not raw.isdigit():
        raise HttpError(400, f"timeout must be milliseconds, got {raw!r}")
    return max(1, min(int(raw) or 20_000, 600_000))


# -- cloud side of the edge sync API -----------------------------------------


def authenticate_edge(service: Service, request: Request) -> Edge:
    """The edge whose key and secret came with the request, or 401."""
    import base64

    header = request.headers.get("authorization", "")
    try:
        scheme, encoded = header.split(" ", 1)
        key, secret = base64.b64decode(encoded).decode().split(":", 1)
    except (ValueError, UnicodeDecodeError):
        raise HttpError(401, "edge credentials missing: use basic auth key:secret") from None
    if scheme.lower() != "basic":
        raise HttpError(401, "edge credentials missing: use basic auth key:secret")
    for edge in service.store.edges():
        key_ok = hmac.compare_digest(edge.routing_key.encode(), key.encode())
        secret_ok = hmac.compare_digest(edge.secret.encode(), secret.encode())
        if key_ok and secret_ok:
            return edge
    raise HttpError(401, "wrong edge key or secret")


async def hello(service: Service, request: Request) -> Response:
    """``GET /api/edge/v1/hello``: check credentials, name the cloud instance."""
    edge = authenticate_edge(service, request)
    return JSONResponse({"instance": service.store.instance, "edge": edge.name})


async def uplink(service: Service, request: Request) -> Response:
    """``POST /api/edge/v1/uplink``: apply a batch of an edge's events once."""
    edge = authenticate_edge(service, request)
    batch = parse_body(await read_body(request, service.limits.max_sync_body_bytes))
    try:
        if not isinstance(batch, dict):
            raise ValueRejected("body must be a JSON object")
        events = decode_events(batch.get("events"))
        instance, after = str(batch["instance"]), int(batch.get("after") or 0)
    except (ValueRejected, KeyError, TypeError, ValueError) as error:
        raise HttpError(400, f"malformed batch: {error}") from None
    key = peer_key("edge", edge.name, instance)
    future = service.writer.call(lambda: _apply_uplink(service, events, key, after, edge))
    result = await asyncio.wrap_future(future)
    service.metrics.add("events_received", result.applied)
    rejected = result.rejected
    return JSONResponse(
        {
            "applied_through": result.applied_through,
            "rejected": {"seq": rejected.seq, "error": rejected.error} if rejected else None,
        }
    )


def _apply_uplink(
    service: Service, events: list[Any], key: str, after: int, edge: Edge
) -> ApplyResult:
    applied = service.store.applied_seq(key)
    base = max(applied, after)
    if events and events[0].seq > base + 1:
        raise HttpError(409, f"events after seq {base} are missing", {"X-Expected": str(base)})
    result, run = service.receiver.apply(events, key, edge.name)
    service.writer.notify(run.changes)
    service.metrics.add("readings_stored", run.changes.reading_count)
    service.metrics.add("events_queued", len(run.changes.events))
    return result


async def downlink(service: Service, request: Request) -> Response:
    """``POST /api/edge/v1/downlink``: acknowledge, then long-poll for events."""
    edge = authenticate_edge(service, request)
    poll = parse_body(await read_body(request, service.limits.max_body_bytes))
    if not isinstance(poll, dict):
        raise HttpError(400, "poll must be a JSON object")
    ack, wait = int(poll.get("ack") or 0), min(int(poll.get("wait_ms") or 0), 60_000) / 1000
    limit = max(1, min(int(poll.get("limit") or 1000), 10_000))
    rejected = poll.get("rejected")
    waiter = service.edge_waiter(edge.name)
    waiter.clear()
    delivered = await asyncio.wrap_future(
        service.writer.call(lambda: _acknowledge_downlink(service, edge.name, ack, rejected))
    )
    events = await asyncio.to_thread(
        read_pending, service.store, EDGE_QUEUE, edge.name, delivered, limit
    )
    if not events and wait and await service.wait(waiter.wait(), wait):
        events = await asyncio.to_thread(
            read_pending, service.store, EDGE_QUEUE, edge.name, delivered, limit
        )
    service.metrics.add("events_sent", len(events))
    body = {"instance": service.store.instance, "events": [encode_event(e) for e in events]}
    import orjson

    return Response(orjson.dumps(body), media_type="application/json")


def _acknowledge_downlink(
    service: Service, edge: str, ack: int, rejected: Any
) -> int:
    delivered = delivered_seq(service.store, EDGE_QUEUE, edge)
    with service.store.transaction() as con:
        if ack > delivered:
            mark_delivered(con, EDGE_QUEUE, edge, ack)
            service.metrics.add("events_acknowledged", ack - delivered)
            delivered = ack
        if isinstance(rejected, dict) and int(rejected.get("seq", -1)) == delivered + 1:
            seq, error = int(rejected["seq"]), str(rejected.get("error"))
            attempts = record_failure(con, EDGE_QUEUE, edge, seq, error)
            service.metrics.add("events_retried", 1)
            if attempts >= service.limits.max_attempts:
                dead_letter(con, EDGE_QUEUE, edge, seq)
                mark_delivered(con, EDGE_QUEUE, edge, seq)
                service.metrics.add("events_dead_lettered", 1)
                logger.error("edge %r rejected event %d for good: %s", edge, seq, error)
                delivered = seq
    return delivered


# -- the cloud's attribute API (ThingsBoard's shape) ------------------------


async def set_attributes(service: Service, request: Request) -> Response:
    """``POST /api/plugins/telemetry/DEVICE/{device}/attributes/{scope}``.

    Stores the attributes and sends ATTRIBUTES_UPDATED into the root chain,
    which pushes them to the device's edge. ``{device}`` is the device name.
    """
    name, raw_scope = request.path_params["device"], request.path_params["scope"]
    scope = normalize_scope(raw_scope)
    if scope is None or scope == "client":
        raise HttpError(400, f"scope must be SERVER_SCOPE or SHARED_SCOPE, got {raw_scope!r}")
    device = service.store.entity(EntityRef(DEVICE, name))
    if device is None:
        raise HttpError(404, f"no device named {name!r}")
    data = parse_body(await read_body(request, service.limits.max_body_bytes))
    if not isinstance(data, dict) or not data:
        raise HttpError(400, "attributes must be a non-empty JSON object of key-values")
    check_values(data)
    ts = now_ms()
    metadata = {**_metadata(device, ts), "scope": thingsboard_scope(scope)}
    future = service.writer.call(lambda: _save_and_announce(service, device, scope, data, ts, metadata))
    await asyncio.wrap_future(future)
    return Response(status_code=200)


def _save_and_announce(
    service: Service,
    device: Entity,
    scope: str,
    data: dict[str, Any],
    ts: int,
    metadata: dict[str, str],
) -> None:
    from edgectl.engine import Run

    run = Run(store=service.store)
    for key, value in data.items():
        kind, stored = classify(value)
        run.changes.set_attribute(device.ref, scope, key, AttributeValue(kind, stored, ts))
    message = Message(ATTRIBUTES_UPDATED, device.ref, data, metadata)
    service.writer.engine.run([message], run)
    service.store.apply(run.changes)
    service.writer.notify(run.changes)


# -- health and metrics ------------------------------------------------------


async def healthz(service: Service, request: Request) -> Response:
    """``GET /healthz``: 200 while the role runs."""
    return JSONResponse({"status": "ok", "role": service.role, "time": time.time()})


async def metrics(service: Service, request: Request) -> Response:
    """``GET /metrics`` in Prometheus text format."""
    text = await asyncio.to_thread(service.metrics.render)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def build_app(service: Service, extra: list[Route] | None = None) -> Starlette:
    """The Starlette app of a role."""

    def route(path: str, handler: Any, methods: list[str]) -> Route:
        return Route(path, guarded(service, handler), methods=methods)

    routes = [
        route("/healthz", healthz, ["GET"]),
        route("/metrics", metrics, ["GET"]),
    ]
    if service.role == "edge":
        routes += [
            route("/api/v1/{token}/telemetry", post_telemetry, ["POST"]),
            route("/api/v1/{token}/attributes", post_attributes, ["POST"]),
            route("/api/v1/{token}/attributes", get_attributes, ["GET"]),
            route("/api/v1/{token}/attributes/updates", attribute_updates, ["GET"]),
        ]
    else:
        routes += [
            route("/api/edge/v1/hello", hello, ["GET"]),
            route("/api/edge/v1/uplink", uplink, ["POST"]),
            route("/api/edge/v1/downlink", downlink, ["POST"]),
            route(
                "/api/plugins/telemetry/DEVICE/{device}/attributes/{scope}",
                set_attributes,
                ["POST"],
            ),
        ]
    return Starlette(routes=[*routes, *(extra or [])])
