"""ThingsBoard rule-chain import and export, on ThingsBoard's own exported chains.

The fixtures are verbatim exports from ThingsBoard's repositories, kept beside
this repository in ../shared/fixtures/thingsboard (SOURCES.md there says where
each comes from). Imported chains run on the real engine, V8 and DuckDB.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import orjson
import pytest

from edgectl.chain import Chain, build_chain
from edgectl.checks import load_chain, validate_file
from edgectl.engine import Engine, Result, Run
from edgectl.loader import parse_yaml
from edgectl.message import EntityRef, Message, now_ms
from edgectl.scripting import ScriptFunction
from edgectl.storage import Store
from edgectl.thingsboard import (
    DEFAULT_LOG_SCRIPT,
    FILTER_CLASS,
    ThingsBoardExportError,
    ThingsBoardImportError,
    UnsupportedNode,
    export_chain,
    export_file,
    import_chain,
    import_file,
    render_yaml,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "thingsboard"
EDGE_ROOT_YAML = REPO / "edgectl" / "rulechains" / "edge_root.yaml"

RPC_REQUEST = "org.thingsboard.rule.engine.rpc.TbSendRPCRequestNode"
RPC_REPLY = "org.thingsboard.rule.engine.rpc.TbSendRPCReplyNode"
DEVICE_PROFILE = "org.thingsboard.rule.engine.profile.TbDeviceProfileNode"
CHANGE_ORIGINATOR = "org.thingsboard.rule.engine.transform.TbChangeOriginatorNode"
CHECK_MESSAGE = "org.thingsboard.rule.engine.filter.TbCheckMessageNode"
MESSAGE_SWITCH = "org.thingsboard.rule.engine.filter.TbMsgTypeSwitchNode"
SAVE_TS = "org.thingsboard.rule.engine.telemetry.TbMsgTimeseriesNode"
SAVE_ATTRIBUTES = "org.thingsboard.rule.engine.telemetry.TbMsgAttributesNode"

# Nodes of each fixture that edgectl cannot run: (name, index, class).
PLACEHOLDERS = {
    "edge_root_rule_chain.json": [("RPC Call Request", 5, RPC_REQUEST)],
    "root_rule_chain.json": [("RPC Call Request", 5, RPC_REQUEST)],
    "rule_chain_template.json": [("RPC Call Request", 5, RPC_REQUEST)],
    "rule_chain.json": [
        ("RPC Call Request", 5, RPC_REQUEST),
        ("Device Profile Node", 6, DEVICE_PROFILE),
        ("To latencies asset", 11, CHANGE_ORIGINATOR),
    ],
    "RpcResponseRuleChainMetadata.json": [("rpcReply", 2, RPC_REPLY)],
}
DEVICE = EntityRef("DEVICE", "thermostat-1")


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"ThingsBoard fixture {path} is not present (see SOURCES.md)")
    return path


def imported(name: str) -> dict:
    return import_file(fixture(name), allow_unsupported=True).document


def placeholders(document: dict) -> list[tuple[str, str]]:
    return [
        (node["id"], node["config"]["thingsboard_type"])
        for node in document["nodes"]
        if node["type"] == "unsupported"
    ]


def bare_chain(*nodes: dict, connections: list[dict] | None = None) -> dict:
    return {"firstNodeIndex": 0, "nodes": list(nodes), "connections": connections}


def tb_node(kind: str, name: str, configuration: dict, version: int = 0) -> dict:
    return {
        "type": kind,
        "name": name,
        "configurationVersion": version,
        "configuration": configuration,
    }


# -- every fixture: imports, validates, round-trips ---------------------------


@pytest.mark.parametrize("name", sorted(PLACEHOLDERS))
def test_every_fixture_imports_and_passes_validate(name, tmp_path):
    result = import_file(fixture(name), allow_unsupported=True)
    path = tmp_path / "chain.yaml"
    path.write_text(result.yaml, encoding="utf-8")

    problems = validate_file(path)

    assert [p.render() for p in problems if p.is_error] == []
    assert [(n.name, n.index, n.type) for n in result.unsupported] == PLACEHOLDERS[name]
    warned = {p.node for p in problems if "placeholder for" in p.message}
    assert warned == {node_id for node_id, _ in placeholders(result.document)}


@pytest.mark.parametrize("name", sorted(PLACEHOLDERS))
def test_import_export_import_gives_the_same_chain(name):
    first = imported(name)

    exported = export_chain(build_chain(first))
    again = import_chain(
        json.loads(json.dumps(exported)), source="exported.json", allow_unsupported=True
    )

    assert again.document == first


@pytest.mark.parametrize("name", sorted(PLACEHOLDERS))
def test_written_yaml_loads_back_as_the_imported_document(name, tmp_path):
    result = import_file(fixture(name), allow_unsupported=True)
    path = tmp_path / "chain.yaml"
    path.write_text(result.yaml, encoding="utf-8")

    chain = load_chain(path)

    assert dataclasses.replace(chain, path=None) == build_chain(result.document)


# -- the edge root chain behaves like edgectl's own ---------------------------


def edge_messages() -> list[Message]:
    """Telemetry, client attributes and attribute updates and deletes.

    Each chain routes these the same way; messages neither chain stores
    (RPC, Timeseries Deleted) are left out, see the test below.
    """
    messages = [
        Message(
            "POST_TELEMETRY_REQUEST",
            DEVICE,
            {"temperature": 21.5, "humidity": 40, "mode": "eco"},
            {"ts": "1700000000000", "deviceName": "thermostat-1"},
        ),
        Message(
            "POST_TELEMETRY_REQUEST",
            DEVICE,
            [{"ts": 1700000060000, "values": {"temperature": 22.0, "on": True}}],
            {"ts": "1700000061000", "deviceName": "thermostat-1"},
        ),
        Message(
            "POST_ATTRIBUTES_REQUEST",
            DEVICE,
            {"firmware": "1.4.2", "battery": 87},
            {"ts": "1700000001000", "deviceName": "thermostat-1"},
        ),
        Message(
            "ATTRIBUTES_UPDATED",
            DEVICE,
            {"targetTemperature": 20},
            {"ts": "1700000002000", "scope": "SHARED_SCOPE"},
        ),
        Message(
            "ATTRIBUTES_DELETED",
            DEVICE,
            {"attributes": ["legacyMode"]},
            {"ts": "1700000003000"},
        ),
        Message("ENTITY_CREATED", DEVICE, {"name": "thermostat-1"}, {}),
    ]
    for order, message in enumerate(messages):
        message.order = order
    return messages


def stored_rows(store: Store) -> dict[str, list[tuple]]:
    """Rows by entity and key name, so ids given out in another order compare."""
    names = (
        "JOIN entity e ON e.id = t.entity_id JOIN key_dictionary k ON k.key_id = t.key"
    )
    values = "t.bool_v, t.long_v, t.dbl_v, t.str_v, t.json_v"
    queries = {
        "ts_kv": f"SELECT e.name, k.key, t.ts, {values}, t.expires FROM ts_kv t "
        f"{names} ORDER BY ALL",
        "ts_kv_latest": f"SELECT e.name, k.key, t.ts, {values} FROM ts_kv_latest t "
        f"{names} ORDER BY ALL",
        "attribute_kv": f"SELECT e.name, t.scope, k.key, {values}, t.last_update_ts "
        f"FROM attribute_kv t {names} ORDER BY ALL",
        "cloud_event": "SELECT action, entity_type, entity_name, body, ts "
        "FROM cloud_event ORDER BY seq",
    }
    return {
        table: store.read("test", lambda con, q=query: con.execute(q).fetchall())
        for table, query in queries.items()
    }


def run_on_store(chain: Chain, messages: list[Message], path: Path):
    store = Store(path)
    engine = Engine(chain)
    try:
        run = Run(store=store)
        result = engine.run(messages, run)
        store.apply(run.changes)
        return result, stored_rows(store)
    finally:
        engine.close()
        store.close()


def test_imported_edge_root_stores_and_queues_what_edgectl_edge_root_does(tmp_path):
    chain = build_chain(imported("edge_root_rule_chain.json"))
    ours = load_chain(EDGE_ROOT_YAML)

    theirs_result, theirs = run_on_store(chain, edge_messages(), tmp_path / "a.duckdb")
    ours_result, expected = run_on_store(ours, edge_messages(), tmp_path / "b.duckdb")

    assert theirs_result.failures == ours_result.failures == []
    assert theirs == expected
    assert [(row[1], row[2]) for row in expected["ts_kv"]] == [
        ("humidity", 1700000000000),
        ("mode", 1700000000000),
        ("on", 1700000060000),
        ("temperature", 1700000000000),
        ("temperature", 1700000060000),
    ]
    assert [(row[1], row[2]) for row in expected["ts_kv_latest"]] == [
        ("humidity", 1700000000000),
        ("mode", 1700000000000),
        ("on", 1700000060000),
        ("temperature", 1700000060000),
    ]
    assert [(row[1], row[2]) for row in expected["attribute_kv"]] == [
        ("client", "battery"),
        ("client", "firmware"),
    ]
    events = [(row[0], orjson.loads(row[3])) for row in expected["cloud_event"]]
    assert events == [
        (
            "TIMESERIES_UPDATED",
            {
                "data": {"temperature": 21.5, "humidity": 40, "mode": "eco"},
                "ts": 1700000000000,
            },
        ),
        (
            "TIMESERIES_UPDATED",
            {
                "data": [
                    {"ts": 1700000060000, "values": {"temperature": 22.0, "on": True}}
                ],
                "ts": 1700000061000,
            },
        ),
        (
            "POST_ATTRIBUTES",
            {
                "kv": {"firmware": "1.4.2", "battery": 87},
                "ts": 1700000001000,
                "scope": "client",
            },
        ),
        (
            "ATTRIBUTES_UPDATED",
            {"kv": {"targetTemperature": 20}, "ts": 1700000002000, "scope": "shared"},
        ),
        (
            "ATTRIBUTES_DELETED",
            {"keys": ["legacyMode"], "scope": "server", "ts": 1700000003000},
        ),
    ]


def test_imported_edge_root_differs_only_where_thingsboard_differs(tmp_path):
    """RPC and Timeseries Deleted are routed differently, as in ThingsBoard.

    ThingsBoard's edge root sends device RPC calls to an RPC node (a
    placeholder here) and has no route for Timeseries Deleted, which
    edgectl's edge root deletes locally and pushes to the cloud.
    """
    chain = build_chain(imported("edge_root_rule_chain.json"))
    rpc = Message("RPC_CALL_FROM_SERVER_TO_DEVICE", DEVICE, {"method": "reboot"}, {})
    deleted = Message(
        "TIMESERIES_DELETED", DEVICE, {"keys": ["temperature"]}, {"ts": "1"}
    )

    result, rows = run_on_store(chain, [rpc, deleted], tmp_path / "a.duckdb")

    assert [(f.node, f.error) for f in result.failures] == [
        (
            "rpc-call-request",
            f"{RPC_REQUEST} is not supported by edgectl; "
            "node 'rpc-call-request' is a placeholder",
        )
    ]
    assert rows["cloud_event"] == []


# -- the monitoring chain's scripts give ThingsBoard's results ----------------


def monitoring_chain(entry: str | None = None) -> Chain:
    chain = build_chain(imported("rule_chain.json"))
    return dataclasses.replace(chain, entry=entry) if entry else chain


def run_chain(chain: Chain, *messages: Message, store: Store | None = None) -> Result:
    engine = Engine(chain)
    try:
        run = Run(store=store) if store else Run()
        result = engine.run(list(messages), run)
        if store:
            store.apply(run.changes)
        return result
    finally:
        engine.close()


def resumed(message: Message) -> Message:
    """A message as a placeholder got it, to send on from the node after it."""
    metadata = {k: v for k, v in message.metadata.items() if k != "error"}
    return Message(message.type, message.originator, message.data, metadata)


def telemetry(data: dict, ts: int) -> Message:
    return Message("POST_TELEMETRY_REQUEST", DEVICE, data, {"ts": str(ts)})


def arrived(data: dict, ts: int) -> Message:
    """Run the chain from its entry; the message as the arrival-timestamp
    transform left it, stopped by the device profile placeholder after it."""
    result = run_chain(monitoring_chain(), telemetry(data, ts))
    [failure] = result.failures
    assert failure.node == "device-profile-node"
    return resumed(failure.message)


def test_monitoring_transform_stamps_arrival_time_then_device_profile_stops_it():
    # The TBEL transform is `metadata.arrivalTs = Date.now(); return {msg,
    # metadata, msgType}`: data and type unchanged, arrivalTs the time it ran.
    before = now_ms()
    result = run_chain(
        monitoring_chain(), telemetry({"testData": 7}, ts=1_700_000_000_000)
    )
    after = now_ms()

    [failure] = result.failures
    assert failure.node == "device-profile-node"
    assert failure.error == (
        f"{DEVICE_PROFILE} is not supported by edgectl; "
        "node 'device-profile-node' is a placeholder"
    )
    message = failure.message
    assert message.type == "POST_TELEMETRY_REQUEST"
    assert message.data == {"testData": 7}
    assert message.metadata["ts"] == "1700000000000"
    assert before <= int(message.metadata["arrivalTs"]) <= after


def test_monitoring_js_filter_is_true_and_hands_over_to_the_tbel_filter():
    # `var test = {a: 'a', b: 'b'}; return test.a === 'a' && test.b === 'b';`
    # is true for every message, so ThingsBoard sends each one on by True.
    message = arrived({"testData": 7}, ts=now_ms())
    script = monitoring_chain().node("test-js-script").config["script"]
    with ScriptFunction(script) as function:
        outcome = function.call(message.data, message.metadata, message.type)
    assert outcome.value is True

    # The device profile node passes every message on by Success when the
    # profile has no alarm rules; carry on from the node after it. The TBEL
    # filter `a.equals("a") && b.equals("b")` is true too, so the message
    # reaches the switch, then "Has testData", then the TTL save and the
    # latency transform, and stops at the change-originator placeholder.
    result = run_chain(monitoring_chain("test-js-script"), message)

    [failure] = result.failures
    assert failure.node == "to-latencies-asset"


def test_monitoring_tbel_filter_is_true_as_in_thingsboard():
    node = monitoring_chain().node("test-tbel-script")
    assert node.config["language"] == "tbel"
    with ScriptFunction(node.config["script"], language="tbel") as function:
        outcome = function.call({"testData": 7}, {}, "POST_TELEMETRY_REQUEST")
    assert outcome.value is True


def test_monitoring_switch_saves_client_attributes_even_when_unchanged(tmp_path):
    # Post attributes go to "Save Attributes": CLIENT_SCOPE, and with
    # updateAttributesOnlyOnValueChange false a repeated value is rewritten.
    chain = monitoring_chain("message-type-switch")
    store = Store(tmp_path / "x.duckdb")
    try:
        for ts in (1_700_000_000_000, 1_700_000_005_000):
            attributes = Message(
                "POST_ATTRIBUTES_REQUEST", DEVICE, {"fw": "2.0"}, {"ts": str(ts)}
            )
            assert run_chain(chain, attributes, store=store).failures == []
        rows = stored_rows(store)
    finally:
        store.close()

    assert rows["attribute_kv"] == [
        ("thermostat-1", "client", "fw", None, None, None, "2.0", None, 1700000005000)
    ]
    assert rows["ts_kv"] == []


def test_monitoring_check_message_routes_by_the_presence_of_test_data(tmp_path):
    # "Has testData" (messageNames testData, testDataCf; checkAllKeys false):
    # a message with either key goes by True to the TTL save, others by False.
    chain = monitoring_chain("message-type-switch")
    with_key = run_chain(chain, telemetry({"testDataCf": 1}, ts=1_700_000_000_000))
    without = run_chain(chain, telemetry({"cpu": 0.5}, ts=1_700_000_000_000))

    assert [f.node for f in with_key.failures] == ["to-latencies-asset"]
    assert without.failures == []


def test_monitoring_test_data_is_kept_60_s_and_latencies_are_computed(tmp_path):
    # "Has testData" sends messages holding testData to "Save Timeseries with
    # TTL" (defaultTTL 60), then "Calculate additional latencies" replaces the
    # data with arrivalLatency = arrivalTs - ts and processingTime = now -
    # arrivalTs, from metadata strings that JavaScript subtracts as numbers.
    ts = now_ms() - 1500
    message = arrived({"testData": 7}, ts=ts)
    arrival = int(message.metadata["arrivalTs"])
    store = Store(tmp_path / "x.duckdb")
    try:
        result = run_chain(
            monitoring_chain("save-timeseries-with-ttl"), message, store=store
        )
        done = now_ms()
        rows = stored_rows(store)
    finally:
        store.close()

    assert rows["ts_kv"] == [
        ("thermostat-1", "testData", ts, None, 7, None, None, None, ts + 60_000)
    ]
    [failure] = result.failures
    assert failure.node == "to-latencies-asset"
    latencies = failure.message.data
    assert latencies["arrivalLatency"] == arrival - ts
    assert 0 <= latencies["processingTime"] <= done - arrival
    assert failure.message.metadata["arrivalTs"] == str(arrival)


def test_monitoring_plain_save_keeps_readings_without_expiry(tmp_path):
    # "Has testData" sends other telemetry by False to "Save Timeseries"
    # (defaultTTL 0), the end of that path.
    store = Store(tmp_path / "x.duckdb")
    try:
        message = telemetry({"cpu": 0.25}, ts=1_700_000_000_000)
        result = run_chain(monitoring_chain("save-timeseries"), message, store=store)
        rows = stored_rows(store)
    finally:
        store.close()

    assert result.failures == []
    assert rows["ts_kv"] == [
        ("thermostat-1", "cpu", 1700000000000, None, None, 0.25, None, None, None)
    ]


# -- errors and edge cases ------------------------------------------------------


def test_unsupported_nodes_fail_the_import_listing_name_index_and_type():
    path = fixture("rule_chain.json")

    with pytest.raises(ThingsBoardImportError) as caught:
        import_file(path, allow_unsupported=False)

    assert str(caught.value) == (
        f"{path}: 3 node(s) cannot run in edgectl:\n"
        f"  - node 5 'RPC Call Request' ({RPC_REQUEST}): "
        "edgectl does not send RPC requests to devices\n"
        f"  - node 6 'Device Profile Node' ({DEVICE_PROFILE}): "
        "edgectl does not evaluate device profile alarm rules\n"
        f"  - node 11 'To latencies asset' ({CHANGE_ORIGINATOR}): "
        "edgectl cannot change a message's originator\n"
        "Import with --allow-unsupported to write placeholder nodes that send "
        "every message to Failure, so the rest of the chain runs; or replace "
        "these nodes in ThingsBoard and export again."
    )


def test_placeholder_keeps_class_configuration_and_connections():
    document = imported("rule_chain.json")
    nodes = {node["id"]: node for node in document["nodes"]}

    assert nodes["to-latencies-asset"]["type"] == "unsupported"
    assert nodes["device-profile-node"]["config"]["configuration_version"] == 1
    assert nodes["has-testdata"] == {
        "id": "has-testdata",
        "type": "check_message",
        "config": {
            "data_keys": ["testData", "testDataCf"],
            "metadata_keys": [],
            "all": False,
        },
        "next": {"False": "save-timeseries", "True": "save-timeseries-with-ttl"},
    }
    assert nodes["device-profile-node"]["description"].startswith(
        "Process incoming messages from devices with the alarm rules"
    )


def test_bare_metadata_imports_with_the_file_name_and_javascript_default():
    result = import_file(
        fixture("RpcResponseRuleChainMetadata.json"), allow_unsupported=True
    )
    document = result.document

    assert document["name"] == "RpcResponseRuleChainMetadata"
    assert document["entry"] == "msgtypeswitch"
    assert [node["type"] for node in document["nodes"]] == [
        "message_type_switch",
        "transform",
        "unsupported",
    ]
    transform = document["nodes"][1]
    assert "language" not in transform["config"]
    assert transform["next"] == {"Success": "rpcreply", "Failure": "rpcreply"}
    assert result.unsupported == (
        UnsupportedNode(
            "rpcReply", 2, RPC_REPLY, "edgectl does not answer device RPC requests"
        ),
    )
    assert "(bare ThingsBoard rule chain metadata)" in result.yaml


def test_bare_metadata_transform_answers_get_response_as_written():
    # `if (msg.method == "getResponse") return {msg: {"response":
    # "requestReceived"}, ...}`; any other method passes unchanged.
    chain = build_chain(imported("RpcResponseRuleChainMetadata.json"))
    asked = Message(
        "TO_SERVER_RPC_REQUEST", DEVICE, {"method": "getResponse"}, {"requestId": "1"}
    )
    other = Message("TO_SERVER_RPC_REQUEST", DEVICE, {"method": "ping"}, {})

    result = run_chain(chain, asked, other)

    assert [(f.node, f.message.data) for f in result.failures] == [
        ("rpcreply", {"response": "requestReceived"}),
        ("rpcreply", {"method": "ping"}),
    ]


TBEL_ONLY = "var sum = 0;\nforeach (v : msg.values) { sum += v; }\nreturn sum > 10;"


def tbel_filter_chain() -> dict:
    return bare_chain(
        tb_node(
            FILTER_CLASS,
            "Sum over ten",
            {"scriptLang": "TBEL", "jsScript": "return true;", "tbelScript": TBEL_ONLY},
        )
    )


def test_tbel_script_that_is_not_javascript_is_reported_with_the_js_error():
    with pytest.raises(ThingsBoardImportError) as caught:
        import_chain(tbel_filter_chain(), source="sum.json", allow_unsupported=False)

    assert str(caught.value).splitlines()[:4] == [
        "sum.json: 1 node(s) cannot run in edgectl:",
        f"  - node 0 'Sum over ten' ({FILTER_CLASS}): its TBEL script is not valid "
        "JavaScript: SyntaxError: missing ) after argument list at line 2 of the "
        "script:",
        "        foreach (v : msg.values) { sum += v; }",
        "                 ^",
    ]


def test_tbel_script_that_is_not_javascript_becomes_a_placeholder_that_exports_back():
    data = tbel_filter_chain()

    result = import_chain(data, source="sum.json", allow_unsupported=True)
    exported = export_chain(build_chain(result.document))

    [node] = result.document["nodes"]
    assert node["type"] == "unsupported"
    assert node["config"]["original"]["tbelScript"] == TBEL_ONLY
    [back] = exported["metadata"]["nodes"]
    assert (back["type"], back["configuration"]) == (
        FILTER_CLASS,
        data["nodes"][0]["configuration"],
    )


def test_tbel_script_valid_as_javascript_runs_and_java_calls_are_warned():
    document = imported("rule_chain.json")
    nodes = {node["id"]: node for node in document["nodes"]}
    result = import_file(fixture("rule_chain.json"), allow_unsupported=True)

    assert nodes["add-arrival-timestamp"]["config"] == {
        "script": "metadata.arrivalTs = Date.now();\n"
        "return {msg: msg, metadata: metadata, msgType: msgType};",
        "language": "tbel",
    }
    assert result.warnings == ()


def test_default_log_script_is_dropped_and_custom_log_script_kept():
    custom = "return 'saw ' + msgType;"
    data = bare_chain(
        tb_node(
            "org.thingsboard.rule.engine.action.TbLogNode",
            "Default",
            {"scriptLang": "TBEL", "tbelScript": DEFAULT_LOG_SCRIPT},
        ),
        tb_node(
            "org.thingsboard.rule.engine.action.TbLogNode",
            "Custom",
            {"scriptLang": "JS", "jsScript": custom},
        ),
    )

    document = import_chain(data, source="log.json", allow_unsupported=False).document

    assert [node.get("config") for node in document["nodes"]] == [
        None,
        {"script": custom},
    ]


def test_processing_settings_map_to_latest_or_are_warned():
    every = {"type": "ON_EVERY_MESSAGE"}
    advanced_skip = {
        "type": "ADVANCED",
        "timeseries": every,
        "latest": {"type": "SKIP"},
        "webSockets": every,
        "calculatedFields": every,
    }
    data = bare_chain(
        tb_node(SAVE_TS, "History only", {"processingSettings": advanced_skip}, 1),
        tb_node(SAVE_TS, "Old history only", {"skipLatestPersistence": True}),
        tb_node(
            SAVE_TS,
            "Dedup",
            {
                "processingSettings": {
                    "type": "DEDUPLICATE",
                    "deduplicationIntervalSecs": 60,
                }
            },
            1,
        ),
        tb_node(
            SAVE_TS, "Live", {"processingSettings": {"type": "WEBSOCKETS_ONLY"}}, 1
        ),
        tb_node(
            SAVE_ATTRIBUTES,
            "Dedup attributes",
            {
                "scope": "SHARED_SCOPE",
                "processingSettings": {
                    "type": "ADVANCED",
                    "attributes": {
                        "type": "DEDUPLICATE",
                        "deduplicationIntervalSecs": 5,
                    },
                    "webSockets": every,
                    "calculatedFields": every,
                },
            },
            3,
        ),
    )

    result = import_chain(data, source="settings.json", allow_unsupported=False)

    assert [node["config"].get("latest") for node in result.document["nodes"]] == [
        "skip",
        "skip",
        "on_every_message",
        "on_every_message",
        None,
    ]
    assert result.warnings == (
        "node 2 'Dedup': processing settings DEDUPLICATE: ThingsBoard saves only the "
        "first message per originator every 60 s; edgectl saves every message",
        "node 3 'Live': processing settings WEBSOCKETS_ONLY: ThingsBoard only "
        "notifies WebSocket subscribers and saves nothing; edgectl has no WebSocket "
        "subscriptions and saves every message",
        "node 4 'Dedup attributes': ThingsBoard saves attributes once per "
        "originator every 5 s; edgectl saves them for every message",
    )
    assert "Import warnings:" in result.yaml


def test_old_save_attributes_nodes_get_thingsboards_upgrade_defaults():
    data = bare_chain(
        tb_node(SAVE_ATTRIBUTES, "Version 0", {"scope": "SERVER_SCOPE"}, 0),
        tb_node(
            SAVE_ATTRIBUTES,
            "Version 1",
            {"scope": "CLIENT_SCOPE", "sendAttributesUpdatedNotification": "true"},
            1,
        ),
        tb_node(SAVE_TS, "Null TTL", {"defaultTTL": None, "useServerTs": None}, 1),
    )

    document = import_chain(data, source="old.json", allow_unsupported=False).document

    assert [node["config"] for node in document["nodes"]] == [
        {
            "scope": "server",
            "update_only_on_change": False,
            "notify_attributes_updated": False,
        },
        {
            "scope": "client",
            "update_only_on_change": True,
            "notify_attributes_updated": True,
        },
        {"latest": "on_every_message", "ttl": 0, "use_server_ts": False},
    ]


def test_node_names_become_unique_readable_ids():
    push = "org.thingsboard.rule.engine.edge.TbMsgPushToCloudNode"
    data = bare_chain(
        tb_node(push, "Push to cloud", {"scope": "CLIENT_SCOPE"}),
        tb_node(push, "Push to cloud", {"scope": "SERVER_SCOPE"}),
        tb_node(push, "push-to-cloud-2", {}),
        tb_node(push, "  Über  Gerät! ", {}),
    )

    document = import_chain(data, source="ids.json", allow_unsupported=False).document

    assert [(n["id"], n["config"]["scope"]) for n in document["nodes"]] == [
        ("push-to-cloud", "client"),
        ("push-to-cloud-2", "server"),
        ("push-to-cloud-2-2", "server"),
        ("über-gerät", "server"),
    ]


def test_rule_chain_output_node_becomes_output_with_its_name_as_relation():
    output = "org.thingsboard.rule.engine.flow.TbRuleChainOutputNode"
    data = bare_chain(
        tb_node(MESSAGE_SWITCH, "Route", {"version": 0}),
        tb_node(output, "Too hot", {"version": 0}),
        connections=[{"fromIndex": 0, "toIndex": 1, "type": "Post telemetry"}],
    )

    document = import_chain(data, source="out.json", allow_unsupported=False).document
    exported = export_chain(build_chain(document))

    assert document["nodes"][1] == {
        "id": "too-hot",
        "type": "output",
        "config": {"relation": "Too hot"},
    }
    assert [(n["type"], n["name"]) for n in exported["metadata"]["nodes"]] == [
        (MESSAGE_SWITCH, "Route"),
        (output, "Too hot"),
    ]


def test_rule_chain_input_node_is_a_placeholder_naming_the_called_chain():
    data = bare_chain(
        tb_node(
            "org.thingsboard.rule.engine.flow.TbRuleChainInputNode",
            "To alarms",
            {"ruleChainId": "6c2ab1e0-0000-0000-0000-000000000000"},
        )
    )

    result = import_chain(data, source="in.json", allow_unsupported=True)

    assert result.unsupported[0].reason == (
        "it calls ThingsBoard rule chain 6c2ab1e0-0000-0000-0000-000000000000, which "
        "edgectl cannot locate; import that chain too and replace this node with a "
        "rule_chain node naming its file"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"ruleChain": {"name": "x"}},
            "bad.json: no 'metadata' object with the chain's nodes",
        ),
        (
            {"ruleChain": {"name": "x"}, "metadata": {"nodes": []}},
            "bad.json: metadata.nodes is empty or missing",
        ),
        (
            {"firstNodeIndex": 3, "nodes": [{"type": FILTER_CLASS + "x"}]},
            "bad.json: metadata.firstNodeIndex is 3, but the chain has nodes 0 to 0",
        ),
        (
            {
                "firstNodeIndex": 0,
                "nodes": [tb_node(SAVE_TS, "Save", {})],
                "connections": [{"fromIndex": 0, "toIndex": 4, "type": "Success"}],
            },
            "bad.json: metadata.connections[0] links node 0 to node 4, but the "
            "chain has nodes 0 to 0",
        ),
    ],
)
def test_malformed_exports_are_refused_with_what_is_wrong(data, message):
    with pytest.raises(ThingsBoardImportError, match="^" + re.escape(message)):
        import_chain(data, source="bad.json", allow_unsupported=True)


def test_invalid_json_is_reported_at_its_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"ruleChain": {\n  "name": oops}', encoding="utf-8")

    with pytest.raises(ThingsBoardImportError) as caught:
        import_file(path)

    assert str(caught.value) == (
        f"{path}:2:11: invalid JSON: Expecting value; "
        "export the rule chain again from ThingsBoard"
    )


# -- export ---------------------------------------------------------------------


def test_export_writes_classes_versions_connections_and_first_node():
    path = fixture("edge_root_rule_chain.json")
    original = json.loads(path.read_text(encoding="utf-8"))

    exported = export_chain(build_chain(imported("edge_root_rule_chain.json")))

    metadata = exported["metadata"]
    nodes = metadata["nodes"]
    assert [n["type"] for n in nodes] == [
        n["type"] for n in original["metadata"]["nodes"]
    ]
    assert [n["configurationVersion"] for n in nodes[:3]] == [1, 3, 0]
    assert (
        nodes[0]["configuration"] == original["metadata"]["nodes"][0]["configuration"]
    )
    assert (
        nodes[1]["configuration"] == original["metadata"]["nodes"][1]["configuration"]
    )
    assert nodes[5]["configuration"] == {"timeoutInSeconds": 60}
    assert nodes[6]["configuration"] == {"scope": "CLIENT_SCOPE"}

    def links(data: dict) -> set:
        return {(c["fromIndex"], c["toIndex"], c["type"]) for c in data["connections"]}

    assert links(metadata) == links(original["metadata"])
    assert metadata["firstNodeIndex"] == 2
    assert exported["ruleChain"]["name"] == "Edge Root Rule Chain"
    assert exported["ruleChain"]["type"] == "EDGE"
    assert all({"layoutX", "layoutY"} <= set(n["additionalInfo"]) for n in nodes)


def test_export_of_history_only_save_uses_advanced_latest_skip():
    data = bare_chain(tb_node(SAVE_TS, "History", {"skipLatestPersistence": True}))
    chain = build_chain(
        import_chain(data, source="h.json", allow_unsupported=False).document
    )

    [node] = export_chain(chain)["metadata"]["nodes"]

    assert node["configurationVersion"] == 1
    assert node["configuration"]["processingSettings"] == {
        "type": "ADVANCED",
        "timeseries": {"type": "ON_EVERY_MESSAGE"},
        "latest": {"type": "SKIP"},
        "webSockets": {"type": "ON_EVERY_MESSAGE"},
        "calculatedFields": {"type": "ON_EVERY_MESSAGE"},
    }


def test_export_refuses_nodes_thingsboard_has_no_class_for():
    with pytest.raises(ThingsBoardExportError) as caught:
        export_file(EDGE_ROOT_YAML)

    assert str(caught.value) == (
        "chain 'Edge root chain' has node(s) ThingsBoard cannot hold:\n"
        "  - node 6 'delete-telemetry' (delete_timeseries): ThingsBoard applies "
        "timeseries deletes from its peer without a rule node; remove the node and "
        "its relations before exporting"
    )


def test_exported_file_imports_back_in_a_file_round_trip(tmp_path):
    source = tmp_path / "monitoring.yaml"
    source.write_text(
        import_file(fixture("rule_chain.json"), allow_unsupported=True).yaml, "utf-8"
    )

    exported = tmp_path / "monitoring.json"
    exported.write_text(export_file(source), encoding="utf-8")
    back = import_file(exported, allow_unsupported=True)

    assert back.document == imported("rule_chain.json")


def test_yaml_header_says_where_the_chain_came_from_and_lists_placeholders():
    data = json.loads(fixture("edge_root_rule_chain.json").read_text("utf-8"))

    text = import_chain(data, source="edge.json", allow_unsupported=True).yaml

    assert text.startswith(
        "# Imported from edge.json by `edgectl import thingsboard` (ThingsBoard rule "
        "chain 'Edge\n"
        "# Root Rule Chain', type EDGE).\n"
        "\n"
        "# Placeholders: every message sent to them goes to Failure.\n"
        "#   rpc-call-request: TbSendRPCRequestNode (node 5 'RPC Call Request')\n"
        "name: Edge Root Rule Chain\n"
    )


def test_scripts_with_windows_line_ends_are_written_quoted_and_load_back():
    script = "var x = msg.t;\r\nreturn x > 20;"
    document = {
        "name": "crlf",
        "entry": "a",
        "nodes": [{"id": "a", "type": "filter", "config": {"script": script}}],
    }

    text = render_yaml(document)

    assert '    script: "var x = msg.t;\\r\\nreturn x > 20;"\n' in text
    assert parse_yaml(text, "crlf.yaml").plain == document
