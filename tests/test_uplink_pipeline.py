"""The uplink's pipeline under trouble: two batches in flight while a backlog
drains, with a poison event, replay commands, restarts, kills and a body limit.

Every test drains a backlog in small batches, so two batches are in flight and
acknowledgements commit behind the stream while the trouble happens. Each
checks the delivery guarantees: every event reaches the cloud once (the cloud's
``events_received`` counts only events it applied), nothing stays queued on the
edge and nothing is dead-lettered but the poison.
"""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import cloud_chain_refusing, wait_for

from edgectl import remote
from edgectl.errors import PeerRejectedError

KEY, SECRET = "site-1-key", "site-1-secret"
BASE_TS = 1_700_000_000_000


def cloud_rows(cloud, table: str, **filters) -> list[dict]:
    params = {"limit": 100000, **filters}
    return remote.call(cloud.url, "GET", f"/api/edgectl/tables/{table}", params=params)


def row_count(cloud) -> int:
    return len(cloud_rows(cloud, "ts_kv"))


def edge_queue(edge) -> dict:
    [queue] = remote.call(edge.url, "GET", "/api/edgectl/tables")["queues"]
    return queue


def metric(role, name: str) -> float:
    for line in httpx.get(f"{role.url}/metrics", timeout=5).text.splitlines():
        if line.startswith(f"edgectl_{name}_total"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def write_settings(tmp_path, name: str, text: str) -> list[str]:
    if not text:
        return []
    path = tmp_path / name
    path.write_text(text)
    return ["--config", str(path)]


def start_pair(
    roles,
    tmp_path,
    *,
    edge_settings: str = "batch_size: 7\n",
    cloud_settings: str = "",
    cloud_chain: str | None = None,
):
    """A registered edge and its cloud, the cloud stopped so a backlog builds."""
    args = write_settings(tmp_path, "cloud.yaml", cloud_settings)
    if cloud_chain is not None:
        chain = tmp_path / "cloud-chain.yaml"
        chain.write_text(cloud_chain)
        args += ["--chain", str(chain)]
    cloud = roles("cloud", *args)
    remote.call(
        cloud.url,
        "POST",
        "/api/edgectl/edges",
        {"name": "site-1", "key": KEY, "secret": SECRET},
    )
    cloud.stop()
    edge = roles(
        "edge",
        *write_settings(tmp_path, "edge.yaml", edge_settings),
        "--cloud",
        cloud.url,
        "--edge-key",
        KEY,
        env={"EDGECTL_EDGE_SECRET": SECRET},
    )
    return cloud, edge


def queue_backlog(edge, count: int) -> None:
    """One device created (seq 1), then ``count`` readings: reading n is seq n+2."""
    body = {"name": "meter", "type": "thermometer", "token": "T-meter"}
    remote.call(edge.url, "POST", "/api/edgectl/devices", body)
    readings = [{"ts": BASE_TS + n, "values": {"n": n}} for n in range(count)]
    answer = httpx.post(
        f"{edge.url}/api/v1/T-meter/telemetry", json=readings, timeout=30
    )
    assert answer.status_code == 200
    assert edge_queue(edge)["last_seq"] == count + 1


def wait_drained(edge, last_seq: int, timeout: float = 30.0) -> dict:
    """Wait until the edge's cursor stands on ``last_seq`` with nothing pending."""
    return wait_for(
        lambda: (
            (queue := edge_queue(edge))["pending"] == 0
            and queue["delivered_seq"] == last_seq
            and queue
        ),
        timeout=timeout,
        interval=0.2,
        what=f"the edge queue to drain through seq {last_seq}",
    )


def wait_rows(cloud, at_least: int, timeout: float = 30.0) -> int:
    return wait_for(
        lambda: (count := row_count(cloud)) >= at_least and count,
        timeout=timeout,
        interval=0.05,
        what=f"{at_least} readings on the cloud",
    )


def values_on(cloud) -> list[int]:
    rows = cloud_rows(cloud, "ts_kv")
    return [row["value"] for row in sorted(rows, key=lambda row: row["ts"])]


def assert_clean_log(role) -> None:
    log = role.log.read_text()
    assert "Traceback" not in log, log[-4000:]


def test_a_poison_event_mid_backlog_is_dead_lettered_and_the_rest_arrive_once(
    roles, tmp_path
):
    # Batches of 7 keep two in flight: the one behind the poison's batch is
    # chained to it, and must be refused, not applied over the hole.
    cloud, edge = start_pair(roles, tmp_path, cloud_chain=cloud_chain_refusing(150))
    queue_backlog(edge, 300)

    cloud.start()
    wait_drained(edge, 301)

    assert values_on(cloud) == [n for n in range(300) if n != 150]
    dead = remote.call(edge.url, "POST", "/api/edgectl/replay/list", {"state": "dead"})
    assert [(event["seq"], event["attempts"]) for event in dead] == [(152, 3)]
    assert "reading 150 is poison" in dead[0]["last_error"]
    assert edge_queue(edge)["dead_letters"] == 1
    # The device and 299 readings, each applied once.
    assert metric(cloud, "events_received") == 300
    assert_clean_log(edge)
    assert_clean_log(cloud)


def test_purging_pending_events_while_a_backlog_drains_skips_them_and_goes_on(
    roles, tmp_path
):
    cloud, edge = start_pair(roles, tmp_path)
    queue_backlog(edge, 3000)

    cloud.start()
    wait_rows(cloud, 200)
    answer = remote.call(
        edge.url,
        "POST",
        "/api/edgectl/replay/purge",
        {"state": "pending", "last": 2000},
    )
    assert answer["count"] > 0

    wait_drained(edge, 3001)
    values = values_on(cloud)
    # Everything after the purged seq 2000 (reading 1998) arrives; what came
    # before it may have left before the purge, but none arrives twice.
    assert values[-1001:] == list(range(1999, 3000))
    assert len(values) == len(set(values))
    assert metric(cloud, "events_received") == len(values) + 1
    assert edge_queue(edge)["dead_letters"] == 0
    assert_clean_log(edge)


def test_resending_delivered_events_while_a_backlog_drains_sends_them_again_once(
    roles, tmp_path
):
    cloud, edge = start_pair(
        roles, tmp_path, edge_settings="batch_size: 7\nkeep_delivered_seconds: 3600\n"
    )
    queue_backlog(edge, 3000)

    cloud.start()
    wait_rows(cloud, 500)
    answer = remote.call(
        edge.url,
        "POST",
        "/api/edgectl/replay/resend",
        {"state": "delivered", "first": 1},
    )
    resent = answer["count"]
    assert resent > 0

    wait_drained(edge, 3001)
    assert values_on(cloud) == list(range(3000))
    assert metric(cloud, "events_received") == 3001
    # What the resend put back was sent again, and kept again once delivered.
    assert metric(edge, "events_sent") >= 3001 + resent
    kept = remote.call(
        edge.url,
        "POST",
        "/api/edgectl/replay/list",
        {"state": "delivered", "limit": 10000},
    )
    assert [event["seq"] for event in kept] == list(range(1, 3002))
    assert_clean_log(edge)


def test_a_resend_while_the_cursor_is_far_ahead_sends_from_the_first_asked(
    roles, tmp_path
):
    # Several resends in a row while batches are in flight: each moves the
    # cursor back, and no acknowledgement read before one may move it on.
    cloud, edge = start_pair(
        roles, tmp_path, edge_settings="batch_size: 7\nkeep_delivered_seconds: 3600\n"
    )
    queue_backlog(edge, 3000)

    cloud.start()
    resent = 0
    for threshold in (300, 900, 1500):
        wait_rows(cloud, threshold)
        answer = remote.call(
            edge.url,
            "POST",
            "/api/edgectl/replay/resend",
            {"state": "delivered", "first": 2},
        )
        resent += answer["count"]

    wait_drained(edge, 3001)
    assert values_on(cloud) == list(range(3000))
    assert metric(cloud, "events_received") == 3001
    assert metric(edge, "events_sent") >= 3001 + resent
    kept = remote.call(
        edge.url,
        "POST",
        "/api/edgectl/replay/list",
        {"state": "delivered", "limit": 10000},
    )
    assert [event["seq"] for event in kept] == list(range(1, 3002))


def test_a_cloud_restarted_mid_drain_gets_every_event_once(roles, tmp_path):
    cloud, edge = start_pair(roles, tmp_path)
    queue_backlog(edge, 3000)

    cloud.start()
    wait_rows(cloud, 300)
    cloud.stop()
    time.sleep(0.5)
    cloud.start()
    before = row_count(cloud)
    assert before < 3000, "the drain finished before the cloud stopped"

    wait_drained(edge, 3001)
    assert values_on(cloud) == list(range(3000))
    # The metric counts since the restart; the device and the readings
    # stored before it came from the file: together every event once.
    assert before + metric(cloud, "events_received") == 3000
    assert_clean_log(edge)


def test_a_cloud_killed_mid_drain_gets_every_event_once(roles, tmp_path):
    cloud, edge = start_pair(roles, tmp_path)
    queue_backlog(edge, 3000)

    cloud.start()
    wait_rows(cloud, 300)
    cloud.kill()
    cloud.start()
    before = row_count(cloud)
    assert before < 3000, "the drain finished before the cloud was killed"

    wait_drained(edge, 3001)
    assert values_on(cloud) == list(range(3000))
    assert before + metric(cloud, "events_received") == 3000


def test_an_edge_killed_mid_drain_resumes_on_its_file_and_sends_each_event_once(
    roles, tmp_path
):
    cloud, edge = start_pair(roles, tmp_path)
    queue_backlog(edge, 3000)

    cloud.start()
    wait_rows(cloud, 300)
    edge.kill()
    killed_at = row_count(cloud)
    assert killed_at < 3000, "the drain finished before the edge was killed"
    edge.start()

    wait_drained(edge, 3001)
    assert values_on(cloud) == list(range(3000))
    # The device and every reading applied once, however many went twice.
    assert metric(cloud, "events_received") == 3001
    assert_clean_log(cloud)


def test_a_body_limit_on_the_cloud_halves_batches_in_flight_until_all_arrive(
    roles, tmp_path
):
    # About 170 bytes an event on the wire, unzipped: 64 or 32 events are
    # refused with 413, 16 pass. Both batches in flight meet the limit.
    cloud, edge = start_pair(
        roles,
        tmp_path,
        edge_settings="batch_size: 64\n",
        cloud_settings="max_sync_body_bytes: 4000\n",
    )
    queue_backlog(edge, 1000)

    cloud.start()
    wait_drained(edge, 1001)
    assert values_on(cloud) == list(range(1000))
    assert metric(cloud, "events_received") == 1001
    assert edge_queue(edge)["dead_letters"] == 0
    assert "as too large" in edge.log.read_text()
    assert_clean_log(edge)


def test_a_batch_refused_as_too_large_does_not_hold_up_the_one_behind_it(
    roles, tmp_path
):
    # The first batch (the device and seven padded readings) is over the
    # cloud's body limit; the one chained behind it is small and passes the
    # limit. The cloud refuses the first before handing it on, so nothing
    # tells the second that its predecessor will never come.
    cloud, edge = start_pair(
        roles,
        tmp_path,
        edge_settings="batch_size: 8\n",
        cloud_settings="max_sync_body_bytes: 4000\n",
    )
    body = {"name": "meter", "type": "thermometer", "token": "T-meter"}
    remote.call(edge.url, "POST", "/api/edgectl/devices", body)
    readings = [
        {"ts": BASE_TS + n, "values": {"n": n, "pad": "x" * 600 if n < 7 else ""}}
        for n in range(40)
    ]
    answer = httpx.post(f"{edge.url}/api/v1/T-meter/telemetry", json=readings)
    assert answer.status_code == 200

    cloud.start()
    started = time.monotonic()
    wait_drained(edge, 41, timeout=20)
    took = time.monotonic() - started

    assert sorted(r["value"] for r in cloud_rows(cloud, "ts_kv", key="n")) == list(
        range(40)
    )
    assert metric(cloud, "events_received") == 41
    assert took < 4.0, f"40 small readings took {took:.1f} s to drain"


def test_readings_queued_after_a_purge_past_the_last_seq_still_arrive(roles, tmp_path):
    # ``purge --last`` names a sequence; one past the newest event drops the
    # whole backlog, but must not swallow events queued after the purge.
    cloud, edge = start_pair(roles, tmp_path)
    queue_backlog(edge, 3000)

    cloud.start()
    wait_rows(cloud, 200)
    # Past the newest event the purge is refused with the newest named; a
    # cursor there would hide every event queued after it.
    with pytest.raises(PeerRejectedError, match="past the newest event, seq 3001"):
        remote.call(
            edge.url,
            "POST",
            "/api/edgectl/replay/purge",
            {"state": "pending", "last": 100_000},
        )
    answer = remote.call(
        edge.url,
        "POST",
        "/api/edgectl/replay/purge",
        {"state": "pending", "last": 3001},
    )
    assert answer["count"] > 0
    wait_for(lambda: edge_queue(edge)["pending"] == 0, what="the purge to settle")
    before = row_count(cloud)

    # New instants: a reading at an instant already stored would replace it.
    later = [
        {"ts": BASE_TS + 10_000 + n, "values": {"n": 10_000 + n}} for n in range(5)
    ]
    assert (
        httpx.post(f"{edge.url}/api/v1/T-meter/telemetry", json=later).status_code
        == 200
    )
    wait_for(
        lambda: row_count(cloud) == before + 5,
        timeout=10,
        what="the readings queued after the purge on the cloud",
    )
