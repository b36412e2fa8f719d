"""A real cloud and a real edge as subprocesses, syncing over loopback HTTP."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from conftest import cloud_chain_refusing, wait_for

from edgectl import remote

KEY, SECRET = "site-1-key", "site-1-secret"


def cloud_rows(cloud, table: str, **filters) -> list[dict]:
    params = {"limit": 100000, **filters}
    return remote.call(cloud.url, "GET", f"/api/edgectl/tables/{table}", params=params)


def add_device(edge, name: str, token: str, kind: str = "thermometer") -> None:
    body = {"name": name, "type": kind, "token": token}
    remote.call(edge.url, "POST", "/api/edgectl/devices", body)


def cloud_with_edge(roles):
    """A running cloud with edge site-1 registered (key KEY, secret SECRET)."""
    cloud = roles("cloud")
    remote.call(
        cloud.url,
        "POST",
        "/api/edgectl/edges",
        {"name": "site-1", "key": KEY, "secret": SECRET},
    )
    return cloud


@pytest.fixture
def pair(roles):
    """A cloud with one registered edge, and that edge syncing to it."""
    cloud = cloud_with_edge(roles)
    edge = roles(
        "edge",
        "--cloud",
        cloud.url,
        "--edge-key",
        KEY,
        env={"EDGECTL_EDGE_SECRET": SECRET},
    )
    return cloud, edge


def post(edge, token: str, path: str, body) -> httpx.Response:
    return httpx.post(f"{edge.url}/api/v1/{token}/{path}", json=body, timeout=10)


def test_telemetry_and_attributes_reach_the_cloud_with_types_and_ts(pair):
    cloud, edge = pair
    add_device(edge, "boiler", "T-boiler")
    readings = {
        "temp": 21.5,
        "count": 9007199254740993,
        "on": True,
        "code": "00042",
        "cfg": {"a": [1, 2]},
    }
    assert (
        post(
            edge, "T-boiler", "telemetry", {"ts": 1700000000000, "values": readings}
        ).status_code
        == 200
    )
    assert (
        post(
            edge, "T-boiler", "attributes", {"firmware": "1.2.3", "slot": 4}
        ).status_code
        == 200
    )

    rows = wait_for(
        lambda: len(cloud_rows(cloud, "ts_kv")) == 5 and cloud_rows(cloud, "ts_kv"),
        what="readings on the cloud",
    )
    got = {row["key"]: (row["value"], row["type"], row["ts"]) for row in rows}
    assert got == {
        "temp": (21.5, "double", 1700000000000),
        "count": (9007199254740993, "long", 1700000000000),
        "on": (True, "boolean", 1700000000000),
        "code": ("00042", "string", 1700000000000),
        "cfg": ({"a": [1, 2]}, "json", 1700000000000),
    }
    attributes = wait_for(
        lambda: cloud_rows(cloud, "attribute_kv"), what="attributes on the cloud"
    )
    assert {(a["key"], a["value"], a["scope"]) for a in attributes} == {
        ("firmware", "1.2.3", "client"),
        ("slot", 4, "client"),
    }
    devices = remote.call(cloud.url, "GET", "/api/edgectl/devices")
    assert devices == [{"name": "boiler", "type": "thermometer", "edge": "site-1"}]


def test_readings_posted_while_the_cloud_is_down_arrive_once_in_order(pair):
    cloud, edge = pair
    add_device(edge, "meter", "T-meter")
    cloud.stop()
    for number in range(100):
        body = {"ts": 1700000000000 + number, "values": {"n": number}}
        assert post(edge, "T-meter", "telemetry", body).status_code == 200
    queued = remote.call(edge.url, "GET", "/api/edgectl/tables")["queues"][0]
    assert queued["pending"] >= 100

    cloud.start()
    rows = wait_for(
        lambda: len(cloud_rows(cloud, "ts_kv")) >= 100 and cloud_rows(cloud, "ts_kv"),
        what="the backlog",
    )
    assert len(rows) == 100
    oldest_first = sorted(rows, key=lambda row: row["ts"])
    assert [row["value"] for row in oldest_first] == list(range(100))
    wait_for(
        lambda: (
            remote.call(edge.url, "GET", "/api/edgectl/tables")["queues"][0]["pending"]
            == 0
        ),
        what="an empty queue",
    )


def test_a_backlog_in_many_small_batches_arrives_once_in_order_and_is_acknowledged(
    roles, tmp_path
):
    # Batches of 7 make the 300 readings travel as 43 pushes back to back:
    # each next batch is read while one travels, and acknowledgements that
    # arrive while one commits are folded into it.
    cloud = cloud_with_edge(roles)
    cloud.stop()
    settings = tmp_path / "edge.yaml"
    settings.write_text("batch_size: 7\n")
    edge = roles(
        "edge",
        "--config",
        str(settings),
        "--cloud",
        cloud.url,
        "--edge-key",
        KEY,
        env={"EDGECTL_EDGE_SECRET": SECRET},
    )
    add_device(edge, "meter", "T-meter")
    readings = [{"ts": 1700000000000 + n, "values": {"n": n}} for n in range(300)]
    assert post(edge, "T-meter", "telemetry", readings).status_code == 200

    cloud.start()
    rows = wait_for(
        lambda: len(cloud_rows(cloud, "ts_kv")) >= 300 and cloud_rows(cloud, "ts_kv"),
        what="the backlog",
    )
    wait_for(lambda: edge_dead_and_pending(edge) == (0, 0), what="all acknowledged")
    assert sorted(row["value"] for row in rows) == list(range(300))
    [queue] = remote.call(edge.url, "GET", "/api/edgectl/tables")["queues"]
    # One ENTITY_CREATED and 300 readings: the cursor stands on the last.
    assert (queue["delivered_seq"], queue["last_seq"]) == (301, 301)
    metrics = httpx.get(f"{cloud.url}/metrics").text
    assert 'edgectl_events_received_total{role="cloud"} 301' in metrics
    # Nothing went twice: no batch was refused for a gap and sent again.
    sent = httpx.get(f"{edge.url}/metrics").text
    assert 'edgectl_events_sent_total{role="edge"} 301' in sent


def test_edge_started_while_the_cloud_is_down_drains_when_it_comes_up(roles):
    cloud = cloud_with_edge(roles)
    cloud.stop()
    edge = roles(
        "edge",
        "--cloud",
        cloud.url,
        "--edge-key",
        KEY,
        env={"EDGECTL_EDGE_SECRET": SECRET},
    )
    add_device(edge, "late", "T-late")
    for number in range(10):
        assert post(edge, "T-late", "telemetry", {"n": number}).status_code == 200
    cloud.start()
    wait_for(
        lambda: len(cloud_rows(cloud, "ts_kv")) == 10,
        timeout=40,
        what="the queue to drain",
    )


def test_shared_attribute_from_the_cloud_reaches_the_edge_and_wakes_its_poll_once(
    pair,
):
    cloud, edge = pair
    add_device(edge, "valve", "T-valve")
    wait_for(
        lambda: remote.call(cloud.url, "GET", "/api/edgectl/devices"),
        what="the device on the cloud",
    )
    answers: list[httpx.Response] = []
    poller = threading.Thread(
        target=lambda: answers.append(
            httpx.get(
                f"{edge.url}/api/v1/T-valve/attributes/updates?timeout=20000",
                timeout=30,
            )
        )
    )
    poller.start()
    # The update reaches only polls already waiting, as in ThingsBoard.
    wait_for(lambda: polls_waiting(edge) == 1, what="the device's poll")
    path = "/api/plugins/telemetry/DEVICE/valve/attributes/SHARED_SCOPE"
    remote.call(cloud.url, "POST", path, {"setpoint": 42, "mode": "eco"})
    poller.join(30)

    assert [a.status_code for a in answers] == [200]
    assert answers[0].json() == {"setpoint": 42, "mode": "eco"}
    shared = httpx.get(
        f"{edge.url}/api/v1/T-valve/attributes?sharedKeys=setpoint,mode"
    ).json()
    assert shared == {"shared": {"setpoint": 42, "mode": "eco"}}
    # Not echoed back: the edge's queue holds only the device's creation.
    assert edge_dead_and_pending(edge) == (0, 0)
    quiet = httpx.get(
        f"{edge.url}/api/v1/T-valve/attributes/updates?timeout=500", timeout=5
    )
    assert quiet.status_code == 408


def polls_waiting(role) -> float:
    for line in httpx.get(f"{role.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("edgectl_polls_waiting"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no edgectl_polls_waiting in /metrics")


def edge_dead_and_pending(edge) -> tuple[int, int]:
    queue = remote.call(edge.url, "GET", "/api/edgectl/tables")["queues"][0]
    return queue["dead_letters"], queue["pending"]


def uplink(
    cloud,
    events,
    *,
    secret=SECRET,
    after=0,
    instance="abcdef0123456789",
    chained=False,
):
    body = {"instance": instance, "after": after, "chained": chained, "events": events}
    return httpx.post(
        f"{cloud.url}/api/edge/v1/uplink", json=body, auth=(KEY, secret), timeout=10
    )


def test_a_batch_sent_twice_is_applied_once(roles):
    cloud = cloud_with_edge(roles)
    events = [
        {
            "seq": 1,
            "action": "ENTITY_CREATED",
            "entity_type": "DEVICE",
            "entity_name": "pump",
            "ts": 0,
            "body": {"type": "pump"},
        },
        {
            "seq": 2,
            "action": "TIMESERIES_UPDATED",
            "entity_type": "DEVICE",
            "entity_name": "pump",
            "ts": 5,
            "body": {"data": {"rpm": 1200}, "ts": 5},
        },
        {
            "seq": 3,
            "action": "ATTRIBUTES_UPDATED",
            "entity_type": "DEVICE",
            "entity_name": "pump",
            "ts": 6,
            "body": {"kv": {"mode": "auto"}, "ts": 6, "scope": "server"},
        },
    ]
    first, again = uplink(cloud, events), uplink(cloud, events)

    assert first.json() == {"applied_through": 3, "rejected": None}
    assert again.json() == {"applied_through": 3, "rejected": None}
    assert [(r["key"], r["value"]) for r in cloud_rows(cloud, "ts_kv")] == [
        ("rpm", 1200)
    ]
    metrics = httpx.get(f"{cloud.url}/metrics").text
    assert 'edgectl_events_received_total{role="cloud"} 3' in metrics


def test_a_batch_read_before_the_one_it_follows_waits_for_it(roles):
    # An edge keeps two batches in flight on two connections; the cloud may
    # read the second first. It waits for the first instead of answering 409.
    cloud = cloud_with_edge(roles)
    created = {
        "seq": 1,
        "action": "ENTITY_CREATED",
        "entity_type": "DEVICE",
        "entity_name": "pump",
        "ts": 0,
        "body": {"type": "pump"},
    }
    readings = [
        {
            "seq": seq,
            "action": "TIMESERIES_UPDATED",
            "entity_type": "DEVICE",
            "entity_name": "pump",
            "ts": seq,
            "body": {"data": {"n": seq}, "ts": seq},
        }
        for seq in range(2, 6)
    ]
    answers: dict[str, httpx.Response] = {}
    second = threading.Thread(
        target=lambda: answers.update(
            second=uplink(cloud, readings[2:], after=3, chained=True)
        )
    )
    second.start()
    time.sleep(0.5)
    answers["first"] = uplink(cloud, [created, *readings[:2]])
    second.join(15)

    assert answers["first"].json() == {"applied_through": 3, "rejected": None}
    assert answers["second"].json() == {"applied_through": 5, "rejected": None}
    rows = cloud_rows(cloud, "ts_kv")
    assert sorted(row["value"] for row in rows) == [2, 3, 4, 5]


def test_a_chained_batch_whose_predecessor_never_came_is_refused_not_applied(roles):
    # Applying it would mark the missing events as applied: they would be
    # lost when they came. A first (not chained) batch may start further on,
    # past events the edge purged.
    cloud = cloud_with_edge(roles)
    created = {
        "seq": 4,
        "action": "ENTITY_CREATED",
        "entity_type": "DEVICE",
        "entity_name": "pump",
        "ts": 0,
        "body": {"type": "pump"},
    }

    refused = uplink(cloud, [created], after=3, chained=True)
    assert refused.status_code == 409
    assert refused.headers["X-Expected"] == "0"
    assert remote.call(cloud.url, "GET", "/api/edgectl/devices") == []

    jumped = uplink(cloud, [created], after=3)
    assert jumped.json() == {"applied_through": 4, "rejected": None}


def test_wrong_edge_secret_is_refused_with_401(roles):
    cloud = cloud_with_edge(roles)
    answer = uplink(cloud, [], secret="not-the-secret")
    assert answer.status_code == 401
    assert answer.json() == {"error": "wrong edge key or secret"}
    assert httpx.get(f"{cloud.url}/api/edge/v1/hello").status_code == 401


def test_a_poison_event_is_dead_lettered_while_the_rest_flow(roles, tmp_path):
    chain = tmp_path / "cloud-chain.yaml"
    chain.write_text(cloud_chain_refusing(5))
    cloud = roles("cloud", "--chain", str(chain))
    remote.call(
        cloud.url,
        "POST",
        "/api/edgectl/edges",
        {"name": "site-1", "key": KEY, "secret": SECRET},
    )
    edge = roles(
        "edge",
        "--cloud",
        cloud.url,
        "--edge-key",
        KEY,
        env={"EDGECTL_EDGE_SECRET": SECRET},
    )
    add_device(edge, "probe", "T-probe")
    for number in range(10):
        assert (
            post(
                edge,
                "T-probe",
                "telemetry",
                {"ts": 1000 + number, "values": {"n": number}},
            ).status_code
            == 200
        )

    rows = wait_for(
        lambda: len(cloud_rows(cloud, "ts_kv")) == 9 and cloud_rows(cloud, "ts_kv"),
        timeout=40,
        what="the rest to flow",
    )
    assert sorted(row["value"] for row in rows) == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    dead = remote.call(edge.url, "POST", "/api/edgectl/replay/list", {"state": "dead"})
    assert len(dead) == 1
    assert dead[0]["attempts"] == 3
    assert "reading 5 is poison" in dead[0]["last_error"]
    wait_for(lambda: edge_dead_and_pending(edge) == (1, 0), what="an empty queue")


def test_sigterm_stops_a_role_cleanly_with_exit_0_and_the_file_closed(roles):
    edge = roles("edge")
    add_device(edge, "quiet", "T-quiet")
    assert post(edge, "T-quiet", "telemetry", {"n": 1}).status_code == 200
    assert edge.stop() == 0
    log = edge.log.read_text()
    assert "edge stopped; " in log and "closed" in log
    assert "Traceback" not in log


TIMEOUT_EDGE_CHAIN = """
name: Edge chain with a script that loops
entry: spin
nodes:
  - id: spin
    type: filter
    config:
      timeout_ms: 100
      script: "while (true) {}"
"""


def test_a_role_still_stops_on_sigterm_after_a_script_timed_out(roles, tmp_path):
    chain = tmp_path / "spin.yaml"
    chain.write_text(TIMEOUT_EDGE_CHAIN)
    edge = roles("edge", "--chain", str(chain))
    add_device(edge, "spinner", "T-spin")
    assert post(edge, "T-spin", "telemetry", {"n": 1}).status_code == 200
    assert edge.stop(timeout=15) == 0
    assert "script ran longer than 100 ms" in edge.log.read_text()


def test_attributes_changed_on_both_sides_while_apart_converge_on_the_newest(pair):
    cloud, edge = pair
    add_device(edge, "heater", "T-heater")
    wait_for(
        lambda: remote.call(cloud.url, "GET", "/api/edgectl/devices"),
        what="the device on the cloud",
    )
    path = "/api/plugins/telemetry/DEVICE/heater/attributes/SHARED_SCOPE"

    cloud.stop()
    remote.call(edge.url, "POST", path, {"mode": "set-on-edge-first"})
    edge.stop()
    cloud.start()
    wait_for(lambda: True, timeout=0.01)
    remote.call(cloud.url, "POST", path, {"mode": "set-on-cloud-later"})
    edge.start()

    def both_hold(value):
        on_edge = httpx.get(
            f"{edge.url}/api/v1/T-heater/attributes?sharedKeys=mode"
        ).json()
        on_cloud = cloud_rows(cloud, "attribute_kv", device="heater", key="mode")
        return on_edge == {"shared": {"mode": value}} and [
            r["value"] for r in on_cloud
        ] == [value]

    wait_for(
        lambda: both_hold("set-on-cloud-later"),
        timeout=40,
        what="both sides to converge",
    )
    assert edge_dead_and_pending(edge) == (0, 0)


def test_resend_sends_kept_delivered_events_again_and_the_cloud_applies_them_once(
    roles, tmp_path
):
    cloud = cloud_with_edge(roles)
    settings = tmp_path / "edge.yaml"
    settings.write_text("keep_delivered_seconds: 3600\n")
    edge = roles(
        "edge",
        "--config",
        str(settings),
        "--cloud",
        cloud.url,
        "--edge-key",
        KEY,
        env={"EDGECTL_EDGE_SECRET": SECRET},
    )
    add_device(edge, "logger", "T-logger")
    for number in range(5):
        assert (
            post(
                edge,
                "T-logger",
                "telemetry",
                {"ts": 1000 + number, "values": {"n": number}},
            ).status_code
            == 200
        )
    wait_for(lambda: len(cloud_rows(cloud, "ts_kv")) == 5, what="five readings")
    wait_for(lambda: edge_dead_and_pending(edge) == (0, 0), what="all delivered")
    kept = remote.call(
        edge.url, "POST", "/api/edgectl/replay/list", {"state": "delivered"}
    )
    assert [event["seq"] for event in kept] == [1, 2, 3, 4, 5, 6]

    def sent_by_edge() -> float:
        for line in httpx.get(f"{edge.url}/metrics").text.splitlines():
            if line.startswith("edgectl_events_sent_total"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    sent_before = sent_by_edge()
    answer = remote.call(
        edge.url,
        "POST",
        "/api/edgectl/replay/resend",
        {"state": "delivered", "first": 2},
    )

    assert answer == {"count": 5, "dry_run": False}
    wait_for(lambda: edge_dead_and_pending(edge) == (0, 0), what="the resend to finish")
    assert len(cloud_rows(cloud, "ts_kv")) == 5
    metrics = httpx.get(f"{cloud.url}/metrics").text
    assert 'edgectl_events_received_total{role="cloud"} 6' in metrics
    assert sent_by_edge() == sent_before + 5
    again = remote.call(
        edge.url, "POST", "/api/edgectl/replay/list", {"state": "delivered"}
    )
    assert [event["seq"] for event in again] == [1, 2, 3, 4, 5, 6]


def test_paths_near_the_telemetry_one_are_routed_as_before(roles):
    # Telemetry POSTs skip Starlette's routing; their neighbours must not.
    edge = roles("edge")
    add_device(edge, "boiler", "T-boiler")
    base = f"{edge.url}/api/v1"
    assert httpx.post(f"{base}/T-boiler/telemetry", json={"n": 1}).status_code == 200
    assert httpx.post(f"{base}/T-boiler/x/telemetry", json={"n": 2}).status_code == 404
    assert httpx.post(f"{base}//telemetry", json={"n": 3}).status_code == 404
    assert httpx.get(f"{base}/T-boiler/telemetry").status_code == 405
    slash = httpx.post(f"{base}/T-boiler/telemetry/", json={"n": 4})
    assert slash.status_code == 307
    rows = cloud_rows(edge, "ts_kv", device="boiler")
    assert [row["value"] for row in rows] == [1]
