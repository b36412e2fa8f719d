"""The outgoing queue is bounded in bytes and age, and says so when it drops.

Edges here have no cloud, so their queue only grows; each runs as a real
``edgectl run`` process with a small limit from its config file.
"""

from __future__ import annotations

import base64
import os
import random
import re
from pathlib import Path

import httpx
import pytest
from conftest import RoleProcess, wait_for

from edgectl.changes import ChangeSet, PendingEvent
from edgectl.message import EntityRef
from edgectl.outbox import (
    CLOUD_QUEUE,
    delivered_seq,
    drop_through,
    head_of_bytes,
    head_older_than,
    mark_delivered,
    queue_size,
    read_pending,
)

http = httpx.Client(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def close_client():
    yield
    http.close()


def start_role(folder: Path, role: str, config: str, *args: str, env=None):
    (folder / f"{role}.yaml").write_text(config, encoding="utf-8")
    environment = {**os.environ, **(env or {})}
    process = RoleProcess(
        role,
        folder / f"{role}.duckdb",
        ["--config", str(folder / f"{role}.yaml"), *args],
        environment,
        folder / f"{role}.log",
    )
    return process.start()


@pytest.fixture
def edge_with(tmp_path):
    started = []

    def start(config: str, devices=("meter",)) -> RoleProcess:
        process = start_role(tmp_path, "edge", config)
        started.append(process)
        for name in devices:
            body = {"name": name, "token": f"T-{name}"}
            http.post(
                f"{process.url}/api/edgectl/devices", json=body
            ).raise_for_status()
        return process

    yield start
    for process in started:
        process.stop()


def post(role, token: str, body, path: str = "telemetry") -> httpx.Response:
    return http.post(f"{role.url}/api/v1/{token}/{path}", json=body)


def table(role, name: str, **params) -> list[dict]:
    params = {"limit": 100000, **params}
    return http.get(f"{role.url}/api/edgectl/tables/{name}", params=params).json()


def queue(role) -> dict:
    return http.get(f"{role.url}/api/edgectl/tables").json()["queues"][0]


def metric(role, line: str) -> float:
    text = http.get(f"{role.url}/metrics").text
    match = re.search(rf"^{re.escape(line)} (\S+)$", text, re.MULTILINE)
    assert match, f"{line} not in /metrics:\n{text}"
    return float(match.group(1))


FULL = re.compile(
    r"the edge's queue to the cloud is full \(\d+ bytes, max_queue_bytes is 3000\); "
    r"nothing was stored, retry in 5 s"
)


def test_queue_gauges_follow_the_queue_within_a_second(edge_with):
    # The gauges come from one look at the queue a second at most; they must
    # still move with it, not stick at the first value read.
    edge = edge_with("max_queue_bytes: 0\n")
    assert metric(edge, 'edgectl_queue_depth{role="edge"}') == 1
    for number in range(3):
        assert post(edge, "T-meter", {"n": number}).status_code == 200
    wait_for(
        lambda: metric(edge, 'edgectl_queue_depth{role="edge"}') == 4,
        timeout=5,
        what="the queue depth gauge to count the three readings",
    )
    assert metric(edge, 'edgectl_dead_letters{role="edge"}') == 0


def test_a_full_queue_answers_503_with_retry_after_and_stores_nothing(edge_with):
    edge = edge_with("max_queue_bytes: 3000\n")
    answers = []

    def refused() -> bool:
        answers.append(post(edge, "T-meter", {"n": len(answers)}))
        return answers[-1].status_code == 503

    wait_for(refused, timeout=10, interval=0.05, what="the queue to fill")
    stored = table(edge, "ts_kv")
    pending = queue(edge)["pending"]
    again = [
        post(edge, "T-meter", {"n": -1}),
        post(edge, "T-meter", {"firmware": "2.0"}, "attributes"),
    ]

    assert {a.status_code for a in answers[:-1]} == {200}
    assert len(stored) == len(answers) - 1
    full = answers[-1]
    assert full.headers["retry-after"] == "5"
    assert FULL.fullmatch(full.json()["error"])
    assert [a.status_code for a in again] == [503, 503]
    assert all(FULL.fullmatch(a.json()["error"]) for a in again)
    assert table(edge, "ts_kv") == stored
    assert table(edge, "attribute_kv") == []
    assert queue(edge)["pending"] == pending
    assert metric(edge, 'edgectl_requests_refused_full_total{role="edge"}') == 3
    assert metric(edge, 'edgectl_queue_bytes{role="edge"}') >= 3000
    # Reads still work, and the queue takes new readings once it has room.
    assert http.get(f"{edge.url}/api/v1/T-meter/attributes").status_code == 200
    last = queue(edge)["last_seq"]
    replay = {"last": last, "dry_run": False}
    http.post(f"{edge.url}/api/edgectl/replay/purge", json=replay).raise_for_status()
    wait_for(
        lambda: post(edge, "T-meter", {"n": 1000}).status_code == 200,
        timeout=5,
        what="room again",
    )


def test_drop_oldest_keeps_the_newest_events_and_counts_every_drop(edge_with):
    edge = edge_with("max_queue_bytes: 3000\nqueue_full: drop_oldest\n")

    answers = [post(edge, "T-meter", {"n": n}) for n in range(100)]

    assert {a.status_code for a in answers} == {200}
    wait_for(
        lambda: metric(edge, 'edgectl_events_dropped_total{role="edge",reason="full"}'),
        what="a drop",
    )
    wait_for(
        lambda: metric(edge, 'edgectl_queue_bytes{role="edge"}') <= 3000,
        what="the queue under its limit",
    )
    events = table(edge, "cloud_event")
    readings = [e["body"] for e in events if e["action"] == "TIMESERIES_UPDATED"]
    numbers = [int(re.search(r'"n":(\d+)', body).group(1)) for body in readings]
    dropped = metric(edge, 'edgectl_events_dropped_total{role="edge",reason="full"}')
    # 100 readings and the device's creation were queued; the newest stay.
    assert len(numbers) == len(events)
    assert sorted(numbers) == list(range(100 - len(numbers), 100))
    assert dropped == 101 - len(events)
    assert len(table(edge, "ts_kv")) == 100
    log = edge.log.read_text()
    assert re.search(
        r"ERROR edgectl\.quota: dropped \d+ unsent events from cloud_event, "
        r"seq 1 to \d+, queued \S+ to \S+: the queue passed max_queue_bytes=3000 "
        r"and queue_full is drop_oldest",
        log,
    )


def test_events_older_than_the_age_limit_are_dropped_counted_and_logged(edge_with):
    edge = edge_with("max_queue_age_seconds: 1\n")

    for number in range(5):
        assert post(edge, "T-meter", {"n": number}).status_code == 200
    wait_for(
        lambda: queue(edge)["pending"] == 0, timeout=10, what="the old events to go"
    )

    line = 'edgectl_events_dropped_total{role="edge",reason="age"}'
    assert metric(edge, line) == 6
    assert metric(edge, 'edgectl_events_dropped_total{role="edge",reason="full"}') == 0
    assert queue(edge)["delivered_seq"] == 6
    assert len(table(edge, "ts_kv")) == 5
    assert re.search(
        r"dropped \d unsent events from cloud_event, seq 1 to \d, queued "
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 to \S+: they waited longer than "
        r"max_queue_age_seconds=1",
        edge.log.read_text(),
    )


def test_a_cloud_drops_an_absent_edges_old_events_and_names_the_edge(tmp_path):
    cloud = start_role(tmp_path, "cloud", "max_queue_age_seconds: 1\n")
    try:
        key, secret = "far-key", "far-secret"
        edge = {"name": "far-away", "key": key, "secret": secret}
        http.post(f"{cloud.url}/api/edgectl/edges", json=edge).raise_for_status()
        created = {
            "seq": 1,
            "action": "ENTITY_CREATED",
            "entity_type": "DEVICE",
            "entity_name": "valve",
            "ts": 0,
            "body": {"type": "valve"},
        }
        batch = {"instance": "f00df00df00df00d", "after": 0, "events": [created]}
        http.post(f"{cloud.url}/api/edge/v1/uplink", json=batch, auth=(key, secret))
        path = "/api/plugins/telemetry/DEVICE/valve/attributes/SHARED_SCOPE"
        http.post(cloud.url + path, json={"setpoint": 42}).raise_for_status()
        assert len(table(cloud, "edge_event")) == 1

        wait_for(lambda: table(cloud, "edge_event") == [], timeout=10, what="the drop")
        poll = {"ack": 0, "wait_ms": 0}
        url = f"{cloud.url}/api/edge/v1/downlink"
        answer = http.post(url, json=poll, auth=(key, secret)).json()

        assert answer["events"] == []
        line = 'edgectl_events_dropped_total{role="cloud",reason="age"}'
        assert metric(cloud, line) == 1
        assert "dropped 1 unsent events from edge_event for edge 'far-away', seq" in (
            cloud.log.read_text()
        )
    finally:
        cloud.stop()


def queue_events(store, count: int, size: int = 10) -> None:
    changes = ChangeSet()
    for order in range(count):
        body = {"data": {"x": "x" * size}, "ts": order}
        event = PendingEvent(
            order, "TIMESERIES_UPDATED", EntityRef("DEVICE", "d"), body, order
        )
        changes.add_event(event)
    store.apply(changes)


def test_an_acknowledgement_that_arrives_after_a_drop_does_not_move_the_cursor_back(
    store,
):
    queue_events(store, 10)
    with store.transaction() as con:
        dropped = drop_through(con, CLOUD_QUEUE, 6)
    # The uplink sent 1..4 before the drop and hears back only now.
    with store.transaction() as con:
        mark_delivered(con, CLOUD_QUEUE, None, 4)

    assert [(d.count, d.first_seq, d.last_seq) for d in dropped] == [(6, 1, 6)]
    assert delivered_seq(store, CLOUD_QUEUE, None) == 6
    assert [e.seq for e in read_pending(store, CLOUD_QUEUE, None, 6, 100)] == [
        7,
        8,
        9,
        10,
    ]


def test_queue_size_counts_bodies_and_the_head_to_drop_by_bytes_and_age(store):
    queue_events(store, 4, size=100)
    size, oldest = queue_size(store, CLOUD_QUEUE)
    body = len('{"data":{"x":"' + "x" * 100 + '"},"ts":0}')

    with store.transaction() as con:
        through_bytes = head_of_bytes(con, CLOUD_QUEUE, 2 * (body + 64))
        con.execute("UPDATE cloud_event SET created_ts = 100 WHERE seq IN (1, 2, 4)")
        through_age = head_older_than(con, CLOUD_QUEUE, 200)

    assert size == 4 * (body + 64)
    assert oldest is not None
    assert through_bytes == 2
    # Event 3 is younger than the cutoff, so the run stops before it.
    assert through_age == 2


def test_a_backlog_of_large_events_still_reaches_the_cloud(tmp_path):
    cloud = start_role(tmp_path, "cloud", "max_sync_body_bytes: 100000\n")
    edge = None
    try:
        edge_body = {"name": "site-1", "key": "k", "secret": "s"}
        http.post(f"{cloud.url}/api/edgectl/edges", json=edge_body).raise_for_status()
        edge = start_role(
            tmp_path,
            "edge",
            "",
            "--cloud",
            cloud.url,
            "--edge-key",
            "k",
            env={"EDGECTL_EDGE_SECRET": "s"},
        )
        http.post(
            f"{edge.url}/api/edgectl/devices", json={"name": "cam", "token": "T-cam"}
        )
        noise = random.Random(7)
        for _ in range(4):
            blob = base64.b64encode(noise.randbytes(45_000)).decode()
            assert post(edge, "T-cam", {"frame": blob}).status_code == 200

        wait_for(lambda: len(table(cloud, "ts_kv")) == 4, timeout=3, what="the frames")
    finally:
        for role in (edge, cloud):
            if role is not None:
                role.stop()
