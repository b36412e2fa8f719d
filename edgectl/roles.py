"""Wiring a running edge or cloud: file, chain, writer thread, HTTP, sync loops.

``run_role`` serves until SIGTERM or Ctrl-C, then stops accepting requests,
lets the batch in hand finish, and checkpoints and closes the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette

from edgectl.api import (
    DeviceFastPath,
    HttpError,
    Limits,
    Service,
    build_app,
    journal_messages,
    timed_http_protocol,
)
from edgectl.changes import ChangeSet
from edgectl.checks import load_chain
from edgectl.config import RoleConfig
from edgectl.engine import BuildContext, Engine
from edgectl.errors import StorageError
from edgectl.journal import JOURNAL_PEER, Journal, JournalFiles
from edgectl.message import SOURCE_CLOUD, SOURCE_EDGE, now_ms
from edgectl.metrics import Metrics
from edgectl.outbox import CLOUD_QUEUE, EDGE_QUEUE, prune_delivered, queue_stats
from edgectl.quota import QueueLimits, Quota
from edgectl.storage import Store
from edgectl.sync import Receiver
from edgectl.writer import BatchStats, Writer

logger = logging.getLogger(__name__)


def example_chain(role: str) -> Path:
    """The packaged example root chain of a role."""
    return Path(str(resources.files("edgectl") / "rulechains" / f"{role}_root.yaml"))


def open_service(config: RoleConfig) -> Service:
    """Open the file and build the chain, writer and receiver of a role.

    Raises ChainError or StorageError with what to fix.
    """
    chain_path = config.chain or example_chain(config.role)
    chain = load_chain(chain_path)
    engine = Engine(chain, BuildContext(load_chain, (chain_path.resolve(),)))
    store = Store(config.db_path, memory_limit=config.storage_memory)
    store.keep_delivered_ms = int(config.keep_delivered_seconds * 1000)
    writer = Writer(store, engine, max_batch=config.batch_size)
    source = SOURCE_EDGE if config.role == "cloud" else SOURCE_CLOUD
    metrics = Metrics(config.role)
    service = Service(
        config.role,
        store,
        writer,
        Receiver(store, engine, source),
        metrics,
        _limits(config),
        _quota(config, store, metrics),
        config.admin_secret(),
    )
    writer.hooks.append(service.on_commit)
    writer.stats_hooks.append(lambda stats: _count(metrics, stats))
    _add_gauges(service)
    if config.role == "edge":
        service.journal = _open_journal(store, writer)
    logger.info(
        "%s: chain %r from %s, data in %s",
        config.role,
        chain.name,
        chain_path,
        store.path,
    )
    return service


def _open_journal(store: Store, writer: Writer) -> Journal:
    files = JournalFiles(store.path, store.instance)
    applied = store.applied_seq(JOURNAL_PEER)
    try:
        pending = files.recover(applied)
    except StorageError:
        store.close()
        raise
    journal = Journal(files, writer.submit, applied=applied, pending=pending)
    writer.journal_stored = journal.on_stored
    writer.journal_failing = journal.on_failing
    return journal


async def _replay_journal(service: Service, journal: Journal) -> None:
    # Requests answered before a kill but not yet stored: run through the
    # chain again, in order, before any new request is taken.
    records, journal.pending = journal.pending, []
    if not records:
        return
    writer, stored = service.writer, 0
    for record in records:
        try:
            messages = journal_messages(service, record)
        except HttpError as error:
            logger.error(
                "journal record %d (device %r) cannot be stored any more and is "
                "dropped: %s",
                record.seq,
                record.device,
                error.message,
            )
            continue
        writer.submit(messages, record.seq)
        stored += 1
    # Behind the records on the writer: the last one is marked done even if
    # it was dropped, so no dropped record is read again at the next start.
    newest = records[-1].seq
    await asyncio.wrap_future(writer.call(lambda: writer.skip_journal(newest)))
    logger.info("stored %d requests left in the ingest journal", stored)


def _limits(config: RoleConfig) -> Limits:
    return Limits(
        max_body_bytes=config.max_body_bytes,
        max_sync_body_bytes=config.max_sync_body_bytes,
        max_value_bytes=config.max_value_bytes,
        max_polls_per_device=config.max_polls_per_device,
        client_timeout_seconds=config.client_timeout_seconds,
        max_attempts=config.max_attempts,
    )


def _quota(config: RoleConfig, store: Store, metrics: Metrics) -> Quota:
    limits = QueueLimits(
        max_bytes=config.max_queue_bytes,
        max_age_seconds=config.max_queue_age_seconds,
        drop_oldest=config.queue_full == "drop_oldest",
    )
    queue = CLOUD_QUEUE if config.role == "edge" else EDGE_QUEUE
    quota = Quota(store, queue, limits, metrics)
    quota.measure()
    return quota


def _count(metrics: Metrics, stats: BatchStats) -> None:
    metrics.add("readings_stored", stats.readings)
    metrics.add("events_queued", stats.events)
    metrics.add("chain_failures", stats.failures)
    metrics.add("group_commits", 1)


def _add_gauges(service: Service) -> None:
    queue = CLOUD_QUEUE if service.role == "edge" else EDGE_QUEUE

    last: tuple[float, tuple[float, float, float]] = (-math.inf, (0.0, 0.0, 0.0))

    def totals() -> tuple[float, float, float]:
        # Three gauges come from one look at the queues, taken at most once a
        # second: a scraper polling fast must not slow the role it watches.
        nonlocal last
        if time.monotonic() - last[0] < 1.0:
            return last[1]
        stats = queue_stats(service.store, queue)
        depth = sum(s.pending for s in stats)
        oldest = min(
            (s.oldest_pending_ts for s in stats if s.oldest_pending_ts), default=None
        )
        lag = (now_ms() - oldest) / 1000 if oldest else 0.0
        dead = sum(s.dead_letters for s in stats)
        last = (time.monotonic(), (depth, lag, dead))
        return last[1]

    service.metrics.gauges["queue_depth"] = lambda: totals()[0]
    service.metrics.gauges["queue_lag_seconds"] = lambda: totals()[1]
    service.metrics.gauges["dead_letters"] = lambda: totals()[2]
    # The watcher lists are copied at once: the loop changes them meanwhile.
    service.metrics.gauges["polls_waiting"] = lambda: sum(
        map(len, list(service._watchers.values()))
    )
    quota = service.quota
    if quota is not None:
        service.metrics.gauges["queue_bytes"] = lambda: quota.queued_bytes
        service.metrics.gauges["queue_max_bytes"] = lambda: quota.limits.max_bytes


def build_role_app(config: RoleConfig, service: Service) -> Starlette | DeviceFastPath:
    """The role's ASGI app, whose lifespan starts and stops the background work."""
    from edgectl.admin import admin_routes

    app = build_app(service, admin_routes(service))
    app.router.lifespan_context = lambda _: _lifespan(config, service)
    return app


@contextlib.asynccontextmanager
async def _lifespan(config: RoleConfig, service: Service) -> AsyncIterator[None]:
    service.loop = asyncio.get_running_loop()
    service.closing = asyncio.Event()
    service.writer.start()
    if service.journal is not None:
        await _replay_journal(service, service.journal)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_expire_loop(config, service, stop))]
    if service.quota is not None:
        tasks.append(asyncio.create_task(service.quota.run(service.writer, stop)))
    client = None
    if config.role == "edge":
        client = _start_sync(config, service, stop, tasks)
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if client is not None:
            await client.close()
        await asyncio.to_thread(_close, service)


def _start_sync(
    config: RoleConfig, service: Service, stop: asyncio.Event, tasks: list[Any]
) -> Any:
    from edgectl.peer import Downlink, Uplink
    from edgectl.transport import CloudClient

    if not config.cloud:
        logger.warning(
            "no cloud configured: events stay queued here; give --cloud, --edge-key "
            "and --edge-secret to sync"
        )
        return None
    verify: bool | str = str(config.cloud_ca) if config.cloud_ca else True
    client = CloudClient(
        config.cloud, str(config.edge_key), str(config.secret()), verify=verify
    )
    uplink = Uplink(
        service.store,
        service.writer,
        client,
        service.metrics,
        batch_size=config.batch_size,
        max_attempts=config.max_attempts,
    )
    loop = asyncio.get_running_loop()

    def wake_uplink(changes: ChangeSet) -> None:
        if changes.events:
            loop.call_soon_threadsafe(uplink.wake.set)

    service.writer.hooks.append(wake_uplink)
    downlink = Downlink(
        service.store,
        service.writer,
        client,
        service.receiver,
        service.metrics,
        wait=config.poll_seconds,
    )
    tasks.append(asyncio.create_task(uplink.run(stop)))
    tasks.append(asyncio.create_task(downlink.run(stop)))
    logger.info("syncing with cloud %s", config.cloud)
    return client


async def _expire_loop(
    config: RoleConfig, service: Service, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), config.ttl_cleanup_seconds)
        if stop.is_set():
            return
        if service.store.keep_delivered_ms:
            cutoff = now_ms() - service.store.keep_delivered_ms
            await asyncio.wrap_future(
                service.writer.call(partial(prune_delivered, service.store, cutoff))
            )
        try:
            removed = await asyncio.wrap_future(
                service.writer.call(lambda: service.store.expire(now_ms()))
            )
        except Exception as error:
            logger.warning("TTL cleanup failed, will retry: %s", error)
            continue
        if removed:
            logger.info("TTL cleanup removed %d readings", removed)


def _close(service: Service) -> None:
    from edgectl.scripting import close_all

    service.writer.stop()
    if service.journal is not None:
        service.journal.close()
    service.writer.engine.close()
    close_all()
    service.store.close()
    logger.info("%s stopped; %s closed", service.role, service.store.path)


def bind(config: RoleConfig) -> socket.socket:
    """Open the listening socket now, so port 0 resolves before serving."""
    host, port = config.address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        from edgectl.errors import ConfigError

        raise ConfigError(
            f"cannot listen on {host}:{port}: {error.strerror}; choose another --listen"
        ) from error
    sock.listen(2048)
    return sock


def run_role(config: RoleConfig) -> None:
    """Serve a role until SIGTERM or Ctrl-C."""
    # The writer thread gives up the GIL at every DuckDB call and then waits for
    # the busy event loop to hand it back; at the default 5 ms switch interval
    # one commit of a few statements waited tens of milliseconds under load.
    sys.setswitchinterval(0.0005)
    tune_gc()
    service = open_service(config)
    # What was loaded at start (chains, caches of the file) lives as long as
    # the process: the collector need not walk it again.
    gc.freeze()
    sock = bind(config)
    host, port = sock.getsockname()[:2]
    scheme = "https" if config.tls_cert else "http"
    logger.info("%s listening on %s://%s:%d", config.role, scheme, host, port)
    if config.port_file:
        config.port_file.write_text(str(port), encoding="utf-8")
    server = _Server(_server_config(config, service), service)
    started = time.monotonic()
    server.run(sockets=[sock])
    logger.debug("served for %.1f s", time.monotonic() - started)


def tune_gc() -> None:
    """Collect young objects less often.

    Every batch allocates hundreds of thousands of short-lived objects (parsed
    JSON, messages); at Python's default thresholds that set off a full
    collection every few batches, each walking every object the role holds,
    and one batch of 5,000 events took 10 ms to parse or 70 ms. Reference
    counting frees almost all of them anyway; the collector is only for cycles.
    """
    gc.set_threshold(50_000, 20, 100)


class _Server(uvicorn.Server):
    """uvicorn's server, ending long polls as soon as a stop is asked for."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: Any) -> None:
        closing, loop = self.service.closing, self.service.loop
        if closing is not None and loop is not None:
            loop.call_soon_threadsafe(closing.set)
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once it has stopped, so SIGTERM would
        # end the process as killed. A stop that finished cleanly exits 0;
        # Ctrl-C still ends as an interrupt (130).
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)


def _server_config(config: RoleConfig, service: Service) -> uvicorn.Config:
    return uvicorn.Config(
        build_role_app(config, service),
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=30,
        http=timed_http_protocol(config.client_timeout_seconds),
        timeout_graceful_shutdown=10,
        ssl_certfile=str(config.tls_cert) if config.tls_cert else None,
        ssl_keyfile=str(config.tls_key) if config.tls_key else None,
        limit_concurrency=4096,
    )
