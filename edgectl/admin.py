"""Admin routes of a running role, so the CLI's ``--url`` mode can ask it.

DuckDB lets one process open a file for writing, so ``inspect``, ``replay``,
``devices add`` and ``edges add`` against a running server go through here.
Writes run on the role's writer thread.

These routes read every edge's events and register devices, so they answer
only clients on this machine (a loopback address), unless the role has an
``admin_token``: then any client that sends ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import ipaddress
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgectl.api import (
    Handler,
    HttpError,
    Service,
    error_response,
    guarded,
    parse_body,
    read_body,
    set_attributes,
)
from edgectl.devices import register_device, register_edge
from edgectl.replay import Selection, list_events, purge, requeue_dead, resend
from edgectl.tables import RowFilter, overview, rows

T = TypeVar("T")


async def _on_writer(service: Service, work: Callable[[], T]) -> T:
    return await asyncio.wrap_future(service.writer.call(work))


async def _json_body(service: Service, request: Request) -> dict[str, Any]:
    limits = service.limits
    body = await read_body(
        request, limits.max_body_bytes, limits.client_timeout_seconds
    )
    data = parse_body(body)
    if not isinstance(data, dict):
        raise HttpError(400, "body must be a JSON object")
    return data


def _text(data: dict[str, Any], key: str, required: bool = False) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise HttpError(400, f"missing {key!r}")
        return None
    if not isinstance(value, str) or not value.strip():
        raise HttpError(400, f"{key!r} must be a non-empty string")
    return value


async def add_device(service: Service, request: Request) -> Response:
    """``POST /api/edgectl/devices`` {name, type?, token?} → the device."""
    data = await _json_body(service, request)
    name = str(_text(data, "name", required=True))
    kind, token = _text(data, "type") or "default", _text(data, "token")
    device, created = await _on_writer(
        service, lambda: register_device(service.store, name, type=kind, token=token)
    )
    body = {
        "name": device.name,
        "type": device.type,
        "token": device.token,
        "created": created,
    }
    return JSONResponse(body)


async def list_devices(service: Service, request: Request) -> Response:
    """``GET /api/edgectl/devices``."""
    devices = [
        {"name": e.name, "type": e.type, "edge": e.edge}
        for e in service.store.entities.values()
    ]
    return JSONResponse(sorted(devices, key=lambda d: str(d["name"])))


async def add_edge(service: Service, request: Request) -> Response:
    """``POST /api/edgectl/edges`` {name, key?, secret?} → the edge."""
    data = await _json_body(service, request)
    name = str(_text(data, "name", required=True))
    key, secret = _text(data, "key"), _text(data, "secret")
    edge, created = await _on_writer(
        service, lambda: register_edge(service.store, name, key=key, secret=secret)
    )
    return JSONResponse(
        {
            "name": edge.name,
            "key": edge.routing_key,
            "secret": edge.secret,
            "created": created,
        }
    )


async def inspect_tables(service: Service, request: Request) -> Response:
    """``GET /api/edgectl/tables``: counts and queue state."""
    await service.settled()
    journal = service.journal
    unstored = journal.unstored() if journal is not None else 0
    return JSONResponse(await asyncio.to_thread(overview, service.store, unstored))


def _int(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise HttpError(400, f"{name} must be a whole number, got {raw!r}") from None


async def inspect_table(service: Service, request: Request) -> Response:
    """``GET /api/edgectl/tables/{table}?device=&key=&scope=&since=&until=&limit=``."""
    query = request.query_params
    where = RowFilter(
        device=query.get("device"),
        key=query.get("key"),
        scope=query.get("scope"),
        since=_int(request, "since"),
        until=_int(request, "until"),
        limit=_int(request, "limit") or 50,
    )
    table = request.path_params["table"]
    await service.settled()
    found = await asyncio.to_thread(rows, service.store, table, where)
    return JSONResponse(found)


def selection_from(data: dict[str, Any]) -> Selection:
    """A Selection from JSON, refusing unknown fields with 400."""
    names = {field.name for field in dataclasses.fields(Selection)}
    unknown = set(data) - names
    if unknown:
        raise HttpError(400, f"unknown selection fields: {', '.join(sorted(unknown))}")
    return Selection(**data)


async def replay(service: Service, request: Request) -> Response:
    """``POST /api/edgectl/replay/{action}`` with a selection and dry_run."""
    data = await _json_body(service, request)
    dry_run = bool(data.pop("dry_run", False))
    selection = selection_from(data)
    action = request.path_params["action"]
    if action == "list":
        await service.settled()
        found = await asyncio.to_thread(list_events, service.store, selection)
        return JSONResponse(found)
    operations = {"requeue": requeue_dead, "purge": purge, "resend": resend}
    if action not in operations:
        raise HttpError(
            404, f"no replay action {action!r}; use list, requeue, purge or resend"
        )
    operation = operations[action]
    count = await _on_writer(
        service, lambda: operation(service.store, selection, dry_run=dry_run)
    )
    return JSONResponse({"count": count, "dry_run": dry_run})


def admin_routes(service: Service) -> list[Route]:
    """The admin API routes of a role, each behind ``admin_only``."""
    table: list[tuple[str, Any, str]] = [
        ("/api/edgectl/devices", add_device, "POST"),
        ("/api/edgectl/devices", list_devices, "GET"),
        ("/api/edgectl/edges", add_edge, "POST"),
        ("/api/edgectl/tables", inspect_tables, "GET"),
        ("/api/edgectl/tables/{table}", inspect_table, "GET"),
        ("/api/edgectl/replay/{action}", replay, "POST"),
        (
            "/api/plugins/telemetry/DEVICE/{device}/attributes/{scope}",
            set_attributes,
            "POST",
        ),
    ]
    return [
        Route(
            path, admin_only(service, guarded(service, handler, path)), methods=[method]
        )
        for path, handler, method in table
    ]


def admin_only(service: Service, endpoint: Handler) -> Handler:
    """Answer 403 to a client off this machine, or 401 without the admin token."""

    async def checked(request: Request) -> Response:
        refusal = _admin_refusal(service.admin_token, request)
        if refusal is not None:
            service.metrics.add("requests_rejected", 1)
            return error_response(*refusal)
        return await endpoint(request)

    return checked


def _admin_refusal(token: str | None, request: Request) -> tuple[int, str] | None:
    if token:
        scheme, _, offered = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(offered.encode()).digest()
        expected = hashlib.sha256(token.encode()).digest()
        if scheme.lower() == "bearer" and hmac.compare_digest(digest, expected):
            return None
        return 401, "the admin API needs Authorization: Bearer and the admin token"
    if _is_loopback(request.client.host if request.client else ""):
        return None
    return 403, (
        "the admin API answers only on this machine; set admin_token on the role "
        "to reach it from elsewhere"
    )


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    # A dual-stack socket shows an IPv4 client as ::ffff:127.0.0.1.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
