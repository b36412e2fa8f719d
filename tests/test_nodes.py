"""Every node type, run through the engine on a real DuckDB file.

Most tests use a probe chain: the node under test with each of its relation
labels routed to an ``output`` node of the same name, so the outcome shows the
relation every message left by (a message that left by none is not there).
"""

from __future__ import annotations

import logging
import time

import pytest
from conftest import FROZEN_NOW

from edgectl.chain import Chain, NodeSpec
from edgectl.changes import AttributeValue, ChangeSet
from edgectl.message import EntityRef, Message
from edgectl.values import BOOLEAN, LONG, STRING

DEVICE = EntityRef("DEVICE", "thermostat-7")
NAME = DEVICE.name


def message(type_: str, data, ts: int = 1000, **metadata: str) -> Message:
    return Message(type_, DEVICE, data, {"ts": str(ts), **metadata})


def telemetry(data, ts: int = 1000, **metadata: str) -> Message:
    return message("POST_TELEMETRY_REQUEST", data, ts, **metadata)


def attributes(data, ts: int = 1000, **metadata: str) -> Message:
    return message("POST_ATTRIBUTES_REQUEST", data, ts, **metadata)


def probe(type_: str, config=None, labels=("Success", "Failure")) -> Chain:
    """The node under test, each label routed to an output node of that name."""
    outputs = tuple(
        NodeSpec(f"out-{label}", "output", {"relation": label}) for label in labels
    )
    tested = NodeSpec(
        "node", type_, config or {}, {label: (f"out-{label}",) for label in labels}
    )
    return Chain(f"probe of {type_}", "node", (tested, *outputs))


def relations(outcome) -> list[str]:
    return [relation for relation, _ in outcome.outputs]


def errors(outcome) -> list[tuple[str, str]]:
    """``(relation, metadata error)`` of every message that left the node."""
    return [
        (relation, message.metadata.get("error", ""))
        for relation, message in outcome.outputs
    ]


def store_attribute(store, scope: str, key: str, value, ts: int, kind=LONG) -> None:
    changes = ChangeSet()
    changes.set_attribute(DEVICE, scope, key, AttributeValue(kind, value, ts))
    store.apply(changes)


def router(node_under_test: NodeSpec, route: str) -> Chain:
    """A root chain: ``route`` messages go to the node under test, and the
    notifications it sends into the root chain go to a push to the cloud."""
    switch = NodeSpec(
        "route",
        "message_type_switch",
        {},
        {
            route: (node_under_test.id,),
            "Attributes Updated": ("push",),
            "Attributes Deleted": ("push",),
        },
    )
    return Chain(
        "Router", "route", (switch, node_under_test, NodeSpec("push", "push_to_cloud"))
    )


# -- message_type_switch -----------------------------------------------------

# ThingsBoard's TbMsgType labels (reference section 2); the rest go to "Other".
THINGSBOARD_LABELS = {
    "POST_ATTRIBUTES_REQUEST": "Post attributes",
    "POST_TELEMETRY_REQUEST": "Post telemetry",
    "TO_SERVER_RPC_REQUEST": "RPC Request from Device",
    "ACTIVITY_EVENT": "Activity Event",
    "INACTIVITY_EVENT": "Inactivity Event",
    "CONNECT_EVENT": "Connect Event",
    "DISCONNECT_EVENT": "Disconnect Event",
    "ENTITY_CREATED": "Entity Created",
    "ENTITY_UPDATED": "Entity Updated",
    "ENTITY_DELETED": "Entity Deleted",
    "ENTITY_ASSIGNED": "Entity Assigned",
    "ENTITY_UNASSIGNED": "Entity Unassigned",
    "ATTRIBUTES_UPDATED": "Attributes Updated",
    "ATTRIBUTES_DELETED": "Attributes Deleted",
    "ALARM": "Alarm",
    "ALARM_CREATED": "Alarm Created",
    "ALARM_UPDATED": "Alarm Updated",
    "ALARM_SEVERITY_UPDATED": "Alarm Severity Updated",
    "ALARM_ACK": "Alarm Acknowledged",
    "ALARM_CLEAR": "Alarm Cleared",
    "ALARM_ASSIGNED": "Alarm Assigned",
    "ALARM_UNASSIGNED": "Alarm Unassigned",
    "COMMENT_CREATED": "Comment Created",
    "COMMENT_UPDATED": "Comment Updated",
    "RPC_CALL_FROM_SERVER_TO_DEVICE": "RPC Request to Device",
    "ENTITY_ASSIGNED_FROM_TENANT": "Entity Assigned From Tenant",
    "ENTITY_ASSIGNED_TO_TENANT": "Entity Assigned To Tenant",
    "TIMESERIES_UPDATED": "Timeseries Updated",
    "TIMESERIES_DELETED": "Timeseries Deleted",
    "RPC_QUEUED": "RPC Queued",
    "RPC_SENT": "RPC Sent",
    "RPC_DELIVERED": "RPC Delivered",
    "RPC_SUCCESSFUL": "RPC Successful",
    "RPC_TIMEOUT": "RPC Timeout",
    "RPC_EXPIRED": "RPC Expired",
    "RPC_FAILED": "RPC Failed",
    "RPC_DELETED": "RPC Deleted",
    "RELATION_ADD_OR_UPDATE": "Relation Added or Updated",
    "RELATION_DELETED": "Relation Deleted",
    "RELATIONS_DELETED": "All Relations Deleted",
    "REST_API_REQUEST": "REST API request",
}
GOES_TO_OTHER = [
    "ENTITY_ASSIGNED_TO_EDGE",
    "ENTITY_UNASSIGNED_FROM_EDGE",
    "ALARM_DELETE",
    "PROVISION_SUCCESS",
    "SEND_EMAIL",
    "MY_CUSTOM_TYPE",
    "post_telemetry_request",
]


def test_message_type_switch_routes_each_thingsboard_type_by_its_label(run_chain):
    labels = (*sorted(set(THINGSBOARD_LABELS.values())), "Other")
    chain = probe("message_type_switch", labels=labels)
    types = [*THINGSBOARD_LABELS, *GOES_TO_OTHER]

    outcome = run_chain(chain, [message(type_, {}) for type_ in types])

    routed = {message.type: relation for relation, message in outcome.outputs}
    assert routed == {
        **THINGSBOARD_LABELS,
        **dict.fromkeys(GOES_TO_OTHER, "Other"),
    }


# -- check_message -----------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"data_keys": ["t", "hum"]}, ["True", "True", "False", "False"]),
        ({"data_keys": ["t", "hum"], "all": True}, ["True", "False", "False", "False"]),
        ({"metadata_keys": ["deviceName"]}, ["False", "True", "False", "True"]),
        (
            {"data_keys": ["t"], "metadata_keys": ["deviceName"], "all": True},
            ["False", "True", "False", "False"],
        ),
    ],
    ids=["any-data-key", "all-data-keys", "metadata-key", "data-and-metadata"],
)
def test_check_message_routes_by_the_keys_data_and_metadata_hold(
    run_chain, config, expected
):
    chain = probe("check_message", config, labels=("True", "False"))
    incoming = [
        telemetry({"t": 1, "hum": 2}),
        telemetry({"t": 1}, deviceName="d"),
        telemetry({"other": 1}),
        telemetry([{"t": 1}], deviceName="d"),
    ]
    for order, item in enumerate(incoming):
        item.metadata["n"] = str(order)

    outcome = run_chain(chain, incoming)

    by_order = sorted(outcome.outputs, key=lambda output: output[1].metadata["n"])
    assert [relation for relation, _ in by_order] == expected


# -- save_timeseries ---------------------------------------------------------


def test_save_timeseries_stores_history_and_latest_on_every_message(run_chain, stored):
    chain = probe("save_timeseries", {"latest": "on_every_message"})

    outcome = run_chain(chain, [telemetry({"t": 20}, 1), telemetry({"t": 21}, 2)])

    assert relations(outcome) == ["Success", "Success"]
    assert stored.readings() == [(NAME, "t", 1, 20, None), (NAME, "t", 2, 21, None)]
    assert stored.latest() == {(NAME, "t"): (2, 21)}


def test_save_timeseries_with_latest_skip_keeps_history_only(run_chain, stored):
    run_chain(probe("save_timeseries"), [telemetry({"t": 20}, 1)])

    run_chain(probe("save_timeseries", {"latest": "skip"}), [telemetry({"t": 99}, 5)])

    assert stored.readings() == [(NAME, "t", 1, 20, None), (NAME, "t", 5, 99, None)]
    assert stored.latest() == {(NAME, "t"): (1, 20)}


def test_save_timeseries_keeps_each_value_with_its_json_type(run_chain, stored):
    data = {"n": 42, "d": 21.0, "s": "00042", "b": True, "j": {"x": [1, 2]}}

    run_chain(probe("save_timeseries"), [telemetry(data, 7)])

    assert {key: value for _, key, _, value, _ in stored.readings()} == data
    assert type(stored.latest()[(NAME, "d")][1]) is float


def test_save_timeseries_expires_readings_after_the_node_ttl(run_chain, stored):
    run_chain(probe("save_timeseries", {"ttl": 60}), [telemetry({"t": 1}, 1000)])

    assert stored.readings() == [(NAME, "t", 1000, 1, 1000 + 60_000)]


def test_save_timeseries_metadata_ttl_overrides_the_node_ttl(run_chain, stored):
    chain = probe("save_timeseries", {"ttl": 60})

    run_chain(chain, [telemetry({"t": 1}, 1000, TTL="10")])

    assert stored.readings() == [(NAME, "t", 1000, 1, 1000 + 10_000)]


def test_save_timeseries_refuses_a_metadata_ttl_that_is_not_seconds(run_chain, stored):
    outcome = run_chain(probe("save_timeseries"), [telemetry({"t": 1}, TTL="soon")])

    assert errors(outcome) == [("Failure", "metadata TTL must be seconds, got 'soon'")]
    assert stored.readings() == []


def test_save_timeseries_with_server_ts_stores_at_the_clock_time(run_chain, stored):
    chain = probe("save_timeseries", {"use_server_ts": True})

    run_chain(chain, [telemetry({"t": 1}, ts=5)])

    assert stored.readings() == [(NAME, "t", FROZEN_NOW, 1, None)]


def test_save_timeseries_stores_ts_values_objects_and_arrays_of_them(run_chain, stored):
    body = [
        {"ts": 5, "values": {"t": 1}},
        {"ts": 6, "values": {"t": 2}},
        {"hum": 40},
    ]

    run_chain(probe("save_timeseries"), [telemetry(body, 1000)])

    assert stored.readings() == [
        (NAME, "hum", 1000, 40, None),
        (NAME, "t", 5, 1, None),
        (NAME, "t", 6, 2, None),
    ]


def test_save_timeseries_sends_other_message_types_to_failure(run_chain, stored):
    outcome = run_chain(probe("save_timeseries"), [attributes({"t": 1})])

    assert errors(outcome) == [
        ("Failure", "Unsupported msg type POST_ATTRIBUTES_REQUEST")
    ]
    assert stored.readings() == []


@pytest.mark.parametrize("body", [{}, [], [{"ts": 5, "values": {}}]])
def test_save_timeseries_sends_an_empty_body_to_failure(run_chain, body):
    outcome = run_chain(probe("save_timeseries"), [telemetry(body)])

    assert errors(outcome) == [("Failure", "Msg body is empty")]


def test_save_timeseries_stores_nothing_of_a_message_with_a_null_value(
    run_chain, stored
):
    outcome = run_chain(probe("save_timeseries"), [telemetry({"a": 1, "b": None})])

    assert errors(outcome) == [
        ("Failure", "key 'b': null is not a value; leave the key out instead")
    ]
    assert stored.readings() == []


def test_save_timeseries_sends_a_body_that_is_not_an_object_to_failure(run_chain):
    outcome = run_chain(probe("save_timeseries"), [telemetry([{"t": 1}, 5])])

    assert errors(outcome) == [
        ("Failure", "item 1: expected a JSON object, got a number")
    ]


# -- save_attributes ---------------------------------------------------------


def test_save_attributes_stores_in_the_node_scope_with_metadata_ts(run_chain, stored):
    chain = probe("save_attributes", {"scope": "client"})

    outcome = run_chain(chain, [attributes({"fw": "1.2", "on": True}, 50)])

    assert relations(outcome) == ["Success"]
    assert stored.attributes() == {
        (NAME, "client", "fw"): ("1.2", 50),
        (NAME, "client", "on"): (True, 50),
    }


def test_save_attributes_uses_server_scope_when_the_node_names_none(run_chain, stored):
    run_chain(probe("save_attributes"), [attributes({"fw": "1.2"})])

    assert list(stored.attributes()) == [(NAME, "server", "fw")]


@pytest.mark.parametrize("given", ["SHARED_SCOPE", "shared", "Shared"])
def test_save_attributes_metadata_scope_wins_over_the_node_scope(
    run_chain, stored, given
):
    chain = probe("save_attributes", {"scope": "client"})

    run_chain(chain, [attributes({"mode": "eco"}, scope=given)])

    assert list(stored.attributes()) == [(NAME, "shared", "mode")]


def test_save_attributes_sends_an_unknown_metadata_scope_to_failure(run_chain, stored):
    outcome = run_chain(
        probe("save_attributes"), [attributes({"mode": "eco"}, scope="GLOBAL")]
    )

    assert errors(outcome) == [
        (
            "Failure",
            "metadata scope 'GLOBAL' is not a scope; use CLIENT_SCOPE, "
            "SERVER_SCOPE or SHARED_SCOPE",
        )
    ]
    assert stored.attributes() == {}


@pytest.mark.parametrize(
    ("incoming", "error"),
    [
        (
            message("POST_TELEMETRY_REQUEST", {"a": 1}),
            "Unsupported msg type POST_TELEMETRY_REQUEST",
        ),
        (attributes([1, 2]), "attributes must be a JSON object of key-values"),
        (
            attributes({"a": 1, "b": None}),
            "key 'b': null is not a value; leave the key out instead",
        ),
    ],
    ids=["telemetry", "array", "null"],
)
def test_save_attributes_sends_what_it_cannot_store_to_failure(
    run_chain, stored, incoming, error
):
    outcome = run_chain(probe("save_attributes"), [incoming])

    assert errors(outcome) == [("Failure", error)]
    assert stored.attributes() == {}


def test_save_attributes_only_on_change_leaves_unchanged_keys_alone(
    run_chain, store, stored
):
    store_attribute(store, "server", "a", 1, ts=1)

    run_chain(probe("save_attributes"), [attributes({"a": 1, "b": 2}, ts=2)])

    assert stored.attributes() == {
        (NAME, "server", "a"): (1, 1),
        (NAME, "server", "b"): (2, 2),
    }


def test_save_attributes_without_only_on_change_rewrites_every_key(
    run_chain, store, stored
):
    store_attribute(store, "server", "a", 1, ts=1)
    chain = probe("save_attributes", {"update_only_on_change": False})

    run_chain(chain, [attributes({"a": 1}, ts=2)])

    assert stored.attributes() == {(NAME, "server", "a"): (1, 2)}


def test_save_attributes_sees_earlier_writes_of_its_own_batch(run_chain, stored):
    run_chain(
        probe("save_attributes"),
        [attributes({"a": 1}, ts=1), attributes({"a": 1}, ts=2)],
    )

    assert stored.attributes() == {(NAME, "server", "a"): (1, 1)}


def test_save_attributes_notifies_the_root_chain_of_changed_keys(
    run_chain, store, stored
):
    store_attribute(store, "shared", "a", 1, ts=1)
    save = NodeSpec(
        "save",
        "save_attributes",
        {"scope": "shared", "notify_attributes_updated": True},
    )

    run_chain(router(save, "Post attributes"), [attributes({"a": 1, "b": 2}, ts=2)])

    assert [(e["action"], e["body"]) for e in stored.events()] == [
        ("ATTRIBUTES_UPDATED", {"kv": {"b": 2}, "ts": 2, "scope": "shared"})
    ]


def test_save_attributes_never_notifies_for_client_scope(run_chain, stored):
    save = NodeSpec(
        "save",
        "save_attributes",
        {"scope": "client", "notify_attributes_updated": True},
    )

    run_chain(router(save, "Post attributes"), [attributes({"a": 1})])

    assert list(stored.attributes()) == [(NAME, "client", "a")]
    assert stored.events() == []


def test_save_attributes_from_the_peer_never_overwrites_a_newer_value(
    run_chain, store, stored
):
    store_attribute(store, "shared", "mode", "eco", ts=2000, kind=STRING)
    chain = probe("save_attributes", {"scope": "shared"})

    outcome = run_chain(chain, [attributes({"mode": "off"}, 1000, source="cloud")])

    assert relations(outcome) == ["Success"]
    assert stored.attributes() == {(NAME, "shared", "mode"): ("eco", 2000)}


def test_save_attributes_from_the_peer_overwrites_an_older_value(
    run_chain, store, stored
):
    store_attribute(store, "shared", "mode", "eco", ts=2000, kind=STRING)
    chain = probe("save_attributes", {"scope": "shared"})

    run_chain(chain, [attributes({"mode": "off"}, 3000, source="cloud")])

    assert stored.attributes() == {(NAME, "shared", "mode"): ("off", 3000)}


def test_save_attributes_of_a_local_message_applies_whatever_its_ts(
    run_chain, store, stored
):
    store_attribute(store, "shared", "mode", "eco", ts=2000, kind=STRING)
    chain = probe("save_attributes", {"scope": "shared"})

    run_chain(chain, [attributes({"mode": "off"}, 1000)])

    assert stored.attributes() == {(NAME, "shared", "mode"): ("off", 1000)}


# -- delete_attributes -------------------------------------------------------


@pytest.fixture
def four_shared_attributes(store):
    for key in ("from-metadata", "from-data", "fixed", "kept"):
        store_attribute(store, "shared", key, True, ts=1, kind=BOOLEAN)


def test_delete_attributes_resolves_metadata_and_data_placeholders(
    run_chain, stored, four_shared_attributes
):
    chain = probe(
        "delete_attributes",
        {"scope": "shared", "keys": ["${which}", "$[key]", "fixed", "${absent}"]},
    )
    incoming = message("CLEANUP", {"key": "from-data"}, which="from-metadata")

    outcome = run_chain(chain, [incoming])

    assert relations(outcome) == ["Success"]
    assert list(stored.attributes()) == [(NAME, "shared", "kept")]


def test_delete_attributes_metadata_scope_wins_over_the_node_scope(
    run_chain, store, stored
):
    store_attribute(store, "client", "a", 1, ts=1)
    store_attribute(store, "shared", "a", 1, ts=1)
    chain = probe("delete_attributes", {"scope": "shared", "keys": ["a"]})

    run_chain(chain, [message("CLEANUP", {}, scope="CLIENT_SCOPE")])

    assert list(stored.attributes()) == [(NAME, "shared", "a")]


def test_delete_attributes_sends_an_unknown_metadata_scope_to_failure(run_chain):
    chain = probe("delete_attributes", {"keys": ["a"]})

    outcome = run_chain(chain, [message("CLEANUP", {}, scope="everywhere")])

    assert errors(outcome) == [
        (
            "Failure",
            "metadata scope 'everywhere' is not a scope; use CLIENT_SCOPE, "
            "SERVER_SCOPE or SHARED_SCOPE",
        )
    ]


def test_delete_attributes_notifies_the_root_chain_of_deleted_keys(
    run_chain, stored, four_shared_attributes
):
    delete = NodeSpec(
        "delete",
        "delete_attributes",
        {
            "scope": "shared",
            "keys": ["$[key]", "fixed", "fixed", " ${absent} "],
            "notify_attributes_deleted": True,
        },
    )

    run_chain(router(delete, "Other"), [message("CLEANUP", {"key": "from-data"}, 9)])

    assert [(e["action"], e["body"]) for e in stored.events()] == [
        (
            "ATTRIBUTES_DELETED",
            {"keys": ["from-data", "fixed"], "scope": "shared", "ts": 9},
        )
    ]


def test_delete_attributes_with_only_blank_keys_passes_on_without_notifying(
    run_chain, stored, four_shared_attributes
):
    delete = NodeSpec(
        "delete",
        "delete_attributes",
        {"keys": ["${absent}", "$[absent]"], "notify_attributes_deleted": True},
    )

    run_chain(router(delete, "Other"), [message("CLEANUP", {})])

    assert len(stored.attributes()) == 4
    assert stored.events() == []


def test_delete_attributes_of_an_unknown_device_registers_nothing(run_chain, store):
    chain = probe("delete_attributes", {"keys": ["a"]})

    run_chain(chain, [message("CLEANUP", {})])

    assert store.entity(DEVICE) is None


# -- delete_timeseries -------------------------------------------------------


def test_delete_timeseries_removes_the_range_and_latest_falls_back(run_chain, stored):
    readings = [telemetry({"t": value}, ts) for ts, value in [(1, 10), (2, 20)]]
    run_chain(probe("save_timeseries"), [*readings, telemetry({"t": 30, "u": 5}, 3)])
    deletion = message(
        "TIMESERIES_DELETED", {"keys": ["t"], "startTs": 2, "endTs": 3}, ts=4
    )

    outcome = run_chain(probe("delete_timeseries"), [deletion])

    assert relations(outcome) == ["Success"]
    assert stored.readings() == [(NAME, "t", 1, 10, None), (NAME, "u", 3, 5, None)]
    assert stored.latest() == {(NAME, "t"): (1, 10), (NAME, "u"): (3, 5)}


def test_delete_timeseries_without_a_range_removes_every_reading_of_the_keys(
    run_chain, stored
):
    run_chain(probe("save_timeseries"), [telemetry({"t": 1, "u": 2}, 1)])

    run_chain(
        probe("delete_timeseries"), [message("TIMESERIES_DELETED", {"keys": ["t"]})]
    )

    assert stored.readings() == [(NAME, "u", 1, 2, None)]
    assert stored.latest() == {(NAME, "u"): (1, 2)}


@pytest.mark.parametrize(
    ("incoming", "error"),
    [
        (telemetry({"keys": ["t"]}), "Unsupported msg type POST_TELEMETRY_REQUEST"),
        (
            message("TIMESERIES_DELETED", {"key": "t"}),
            'expected {"keys": [...], "startTs": ms, "endTs": ms}',
        ),
        (
            message("TIMESERIES_DELETED", {"keys": ["t"], "startTs": "yesterday"}),
            "startTs and endTs must be epoch milliseconds",
        ),
    ],
    ids=["telemetry", "no-keys", "bad-range"],
)
def test_delete_timeseries_sends_what_it_cannot_read_to_failure(
    run_chain, incoming, error
):
    outcome = run_chain(probe("delete_timeseries"), [incoming])

    assert errors(outcome) == [("Failure", error)]


# -- push_to_cloud and push_to_edge ------------------------------------------

PUSHED = [
    (
        message("POST_TELEMETRY_REQUEST", {"t": 1}, 7),
        "TIMESERIES_UPDATED",
        {"data": {"t": 1}, "ts": 7},
    ),
    (
        message("TIMESERIES_UPDATED", {"t": 2}, 7),
        "TIMESERIES_UPDATED",
        {"data": {"t": 2}, "ts": 7},
    ),
    (
        message("POST_ATTRIBUTES_REQUEST", {"fw": "1"}, 7),
        "POST_ATTRIBUTES",
        {"kv": {"fw": "1"}, "ts": 7, "scope": "client"},
    ),
    (
        message("ATTRIBUTES_UPDATED", {"mode": "eco"}, 7, scope="SHARED_SCOPE"),
        "ATTRIBUTES_UPDATED",
        {"kv": {"mode": "eco"}, "ts": 7, "scope": "shared"},
    ),
    (
        message("ATTRIBUTES_DELETED", {"attributes": ["mode"]}, 7, scope="server"),
        "ATTRIBUTES_DELETED",
        {"keys": ["mode"], "scope": "server", "ts": 7},
    ),
    (
        message("TIMESERIES_DELETED", {"keys": ["t"], "startTs": 1}, 7),
        "TIMESERIES_DELETED",
        {"data": {"keys": ["t"], "startTs": 1}, "ts": 7},
    ),
    (
        message("CONNECT_EVENT", {"active": True}, 7),
        "TIMESERIES_UPDATED",
        {"data": {"active": True}, "ts": 7},
    ),
    (
        message("INACTIVITY_EVENT", {"active": False}, 7, scope="SERVER_SCOPE"),
        "ATTRIBUTES_UPDATED",
        {"kv": {"active": False}, "ts": 7, "scope": "server"},
    ),
]


@pytest.mark.parametrize(
    ("incoming", "action", "body"),
    PUSHED,
    ids=[f"{m.type}{'+scope' if 'scope' in m.metadata else ''}" for m, *_ in PUSHED],
)
def test_push_to_cloud_queues_thingsboards_action_and_body_for_each_type(
    run_chain, stored, incoming, action, body
):
    outcome = run_chain(probe("push_to_cloud", {"scope": "client"}), [incoming])

    assert relations(outcome) == ["Success"]
    assert stored.events() == [
        {
            "seq": 1,
            "action": action,
            "entity": "DEVICE/thermostat-7",
            "body": body,
            "ts": 7,
        }
    ]


@pytest.mark.parametrize("type_", ["ALARM", "TO_SERVER_RPC_REQUEST", "MY_EVENT"])
@pytest.mark.parametrize("node_type", ["push_to_cloud", "push_to_edge"])
def test_push_sends_a_type_it_cannot_queue_to_failure(
    run_chain, store, stored, node_type, type_
):
    store.add_entity(DEVICE, edge="edge-north")

    outcome = run_chain(probe(node_type), [message(type_, {"x": 1})])

    assert errors(outcome) == [("Failure", f"Unsupported msg type {type_}")]
    assert stored.events() == stored.events("edge_event") == []


def test_push_uses_the_node_scope_when_metadata_names_none(run_chain, stored):
    incoming = message("ATTRIBUTES_UPDATED", {"mode": "eco"}, 7)

    run_chain(probe("push_to_cloud", {"scope": "shared"}), [incoming])

    assert stored.events()[0]["body"] == {
        "kv": {"mode": "eco"},
        "ts": 7,
        "scope": "shared",
    }


def test_push_sends_attributes_with_an_unknown_metadata_scope_to_failure(run_chain):
    incoming = message("ATTRIBUTES_UPDATED", {"mode": "eco"}, scope="GLOBAL")

    outcome = run_chain(probe("push_to_cloud"), [incoming])

    assert errors(outcome) == [
        (
            "Failure",
            "metadata scope 'GLOBAL' is not a scope; use CLIENT_SCOPE, "
            "SERVER_SCOPE or SHARED_SCOPE",
        )
    ]


def test_push_ignores_metadata_scope_on_telemetry(run_chain, stored):
    # ThingsBoard reads the scope for attribute events only.
    outcome = run_chain(probe("push_to_cloud"), [telemetry({"t": 1}, scope="GLOBAL")])

    assert relations(outcome) == ["Success"]
    assert [event["action"] for event in stored.events()] == ["TIMESERIES_UPDATED"]


def test_push_sends_attributes_deleted_without_a_key_list_to_failure(run_chain):
    incoming = message("ATTRIBUTES_DELETED", {"keys": ["mode"]})

    outcome = run_chain(probe("push_to_cloud"), [incoming])

    assert errors(outcome) == [("Failure", 'expected data {"attributes": [keys...]}')]


def test_push_to_cloud_does_not_send_back_what_came_from_the_cloud(run_chain, stored):
    incoming = [
        telemetry({"t": 1}, 1, source="cloud"),
        telemetry({"t": 2}, 2, source="edge"),
        telemetry({"t": 3}, 3),
    ]

    outcome = run_chain(probe("push_to_cloud"), incoming)

    assert outcome.failures == []
    assert [message.data for _, message in outcome.outputs] == [{"t": 2}, {"t": 3}]
    assert [event["ts"] for event in stored.events()] == [2, 3]


def test_push_to_edge_does_not_send_back_what_came_from_the_edge(
    run_chain, store, stored
):
    store.add_entity(DEVICE, edge="edge-north")
    incoming = [
        telemetry({"t": 1}, 1, source="edge"),
        telemetry({"t": 2}, 2, source="cloud"),
    ]

    run_chain(probe("push_to_edge"), incoming)

    assert [event["ts"] for event in stored.events("edge_event")] == [2]


def test_push_to_edge_queues_an_event_for_the_edge_that_owns_the_device(
    run_chain, store, stored
):
    store.add_entity(DEVICE, edge="edge-north")
    incoming = message("ATTRIBUTES_UPDATED", {"target": 21}, 8, scope="SHARED_SCOPE")

    outcome = run_chain(probe("push_to_edge", {"scope": "server"}), [incoming])

    assert relations(outcome) == ["Success"]
    assert stored.events() == []
    assert stored.events("edge_event") == [
        {
            "seq": 1,
            "action": "ATTRIBUTES_UPDATED",
            "entity": "DEVICE/thermostat-7",
            "body": {"kv": {"target": 21}, "ts": 8, "scope": "shared"},
            "ts": 8,
            "edge": "edge-north",
        }
    ]


def test_push_to_edge_drops_a_message_of_a_device_no_edge_owns(run_chain, stored):
    outcome = run_chain(probe("push_to_edge"), [telemetry({"t": 1})])

    assert outcome.outputs == []
    assert outcome.failures == []
    assert stored.events("edge_event") == []


# -- filter, switch, transform, log: JavaScript --------------------------------


def test_filter_runs_thingsboards_default_script_unchanged(run_chain):
    chain = probe(
        "filter",
        {"script": "return msg.temperature > 20;"},
        labels=("True", "False", "Failure"),
    )
    hot, cold = telemetry({"temperature": 25}), telemetry({"temperature": 5})

    outcome = run_chain(chain, [hot, cold])

    assert [(r, m.data) for r, m in outcome.outputs] == [
        ("True", {"temperature": 25}),
        ("False", {"temperature": 5}),
    ]


def test_filter_script_sees_msg_metadata_and_msg_type(run_chain):
    script = (
        'return msgType === "POST_TELEMETRY_REQUEST" '
        '&& metadata.deviceType === "thermostat" && msg.t > 20;'
    )
    chain = probe("filter", {"script": script}, labels=("True", "False"))
    incoming = [
        telemetry({"t": 25}, deviceType="thermostat"),
        telemetry({"t": 25}, deviceType="meter"),
        message("POST_ATTRIBUTES_REQUEST", {"t": 25}, deviceType="thermostat"),
    ]

    outcome = run_chain(chain, incoming)

    assert relations(outcome) == ["True", "False", "False"]


def test_filter_script_that_throws_sends_the_message_to_failure_with_the_error(
    run_chain,
):
    script = 'if (msg.t === undefined) { throw new Error("no reading"); }\nreturn true;'
    chain = probe("filter", {"script": script}, labels=("True", "Failure"))

    outcome = run_chain(chain, [telemetry({}), telemetry({"t": 1})])

    assert sorted(errors(outcome)) == [
        ("Failure", "Error: no reading (line 1 of the script)"),
        ("True", ""),
    ]


def test_filter_script_that_returns_no_boolean_sends_to_failure(run_chain):
    chain = probe("filter", {"script": "return msg.t;"}, labels=("True", "Failure"))

    outcome = run_chain(chain, [telemetry({"t": 5})])

    assert errors(outcome) == [
        ("Failure", "filter script must return true or false, got 5")
    ]


@pytest.mark.timeout(20)
def test_script_that_loops_forever_fails_within_its_time_limit_and_others_go_on(
    run_chain, stored
):
    script = "if (msg.stuck) { while (true) {} }\nreturn true;"
    check = NodeSpec(
        "check",
        "filter",
        {"script": script, "timeout_ms": 100},
        {"True": ("save",), "Failure": ("out-Failure",)},
    )
    chain = Chain(
        "Loop",
        "check",
        (
            check,
            NodeSpec("save", "save_timeseries"),
            NodeSpec("out-Failure", "output", {"relation": "Failure"}),
        ),
    )
    incoming = [
        telemetry({"t": 1}, 1),
        telemetry({"stuck": 1}, 2),
        telemetry({"t": 3}, 3),
    ]

    started = time.monotonic()
    outcome = run_chain(chain, incoming)
    elapsed = time.monotonic() - started

    assert errors(outcome) == [("Failure", "script ran longer than 100 ms")]
    assert [ts for _, _, ts, _, _ in stored.readings()] == [1, 3]
    assert elapsed < 5


@pytest.mark.timeout(20)
def test_engine_runs_the_next_batch_after_a_script_that_looped(run_chain, stored):
    chain = Chain(
        "Loop then save",
        "check",
        (
            NodeSpec(
                "check",
                "filter",
                {"script": "while (msg.stuck) {} return true;", "timeout_ms": 50},
                {"True": ("save",)},
            ),
            NodeSpec("save", "save_timeseries"),
        ),
    )
    engine = run_chain.engine(chain)

    first = run_chain(engine, [telemetry({"stuck": True})])
    run_chain(engine, [telemetry({"t": 2}, 2)])

    assert first.failures == [("check", "script ran longer than 50 ms")]
    assert stored.readings() == [(NAME, "t", 2, 2, None)]


def test_switch_sends_a_copy_to_every_relation_the_script_names(run_chain):
    script = """
        var out = [];
        if (msg.t > 30) { out.push("Hot"); }
        if (msg.t > 40) { out.push("Alarm"); }
        return out;
    """
    chain = probe("switch", {"script": script}, labels=("Hot", "Alarm", "Failure"))

    outcome = run_chain(chain, [telemetry({"t": 45}), telemetry({"t": 35})])

    assert sorted((r, m.data["t"]) for r, m in outcome.outputs) == [
        ("Alarm", 45),
        ("Hot", 35),
        ("Hot", 45),
    ]
    copies = [m for _, m in outcome.outputs if m.data["t"] == 45]
    assert copies[0] is not copies[1]


def test_switch_with_no_relation_names_drops_the_message_quietly(run_chain):
    chain = probe("switch", {"script": "return [];"}, labels=("Hot", "Failure"))

    outcome = run_chain(chain, [telemetry({"t": 1})])

    assert outcome.outputs == []
    assert outcome.failures == []


def test_switch_accepts_a_single_relation_name_as_text(run_chain):
    chain = probe("switch", {"script": 'return "Hot";'}, labels=("Hot",))

    outcome = run_chain(chain, [telemetry({"t": 1})])

    assert relations(outcome) == ["Hot"]


def test_switch_script_that_returns_no_names_sends_to_failure(run_chain):
    chain = probe("switch", {"script": "return 5;"}, labels=("Hot", "Failure"))

    outcome = run_chain(chain, [telemetry({"t": 1})])

    assert errors(outcome) == [
        ("Failure", "switch script must return relation names, got 5")
    ]


def test_transform_replaces_data_metadata_and_type(run_chain, stored):
    script = """
        msg.temperature = msg.temperature * 1.8 + 32;
        metadata.unit = "F";
        metadata.count = 3;
        return {msg: msg, metadata: metadata, msgType: "CONVERTED_" + msgType};
    """
    chain = probe("transform", {"script": script})

    outcome = run_chain(chain, [telemetry({"temperature": 20}, deviceName="d")])

    [(relation, converted)] = outcome.outputs
    assert relation == "Success"
    assert converted.type == "CONVERTED_POST_TELEMETRY_REQUEST"
    assert converted.data == {"temperature": 68}
    assert converted.metadata == {
        "ts": "1000",
        "deviceName": "d",
        "unit": "F",
        "count": "3",
    }


def test_transform_keeps_what_the_script_leaves_out(run_chain):
    chain = probe("transform", {"script": "return {msg: {t: 1}};"})

    outcome = run_chain(chain, [telemetry({"t": 0}, deviceName="d")])

    [(_, result)] = outcome.outputs
    assert (result.type, result.data, result.metadata) == (
        "POST_TELEMETRY_REQUEST",
        {"t": 1},
        {"ts": "1000", "deviceName": "d"},
    )


def test_transform_that_returns_a_list_sends_each_message_on(run_chain, stored):
    script = """
        return msg.readings.map(function (r) {
            return {msg: {t: r.t}, metadata: {ts: String(r.ts)}};
        });
    """
    chain = Chain(
        "Split",
        "split",
        (
            NodeSpec("split", "transform", {"script": script}, {"Success": ("save",)}),
            NodeSpec("save", "save_timeseries"),
        ),
    )
    body = {"readings": [{"t": 1, "ts": 10}, {"t": 2, "ts": 20}]}

    run_chain(chain, [telemetry(body)])

    assert stored.readings() == [(NAME, "t", 10, 1, None), (NAME, "t", 20, 2, None)]


@pytest.mark.parametrize("script", ["return [];", "return;", "return 5;"])
def test_transform_with_nothing_to_return_sends_to_failure(run_chain, script):
    outcome = run_chain(probe("transform", {"script": script}), [telemetry({})])

    assert errors(outcome) == [("Failure", "Message or messages list are empty!")]


def test_transform_script_that_throws_sends_to_failure_with_the_error(run_chain):
    chain = probe("transform", {"script": "return {msg: msg.a.b};"})

    outcome = run_chain(chain, [telemetry({})])

    assert errors(outcome) == [
        (
            "Failure",
            "TypeError: Cannot read properties of undefined (reading 'b') "
            "(line 1 of the script)",
        )
    ]


def test_log_without_script_logs_data_and_metadata(run_chain, caplog):
    with caplog.at_level(logging.INFO, logger="edgectl.chain"):
        outcome = run_chain(probe("log"), [telemetry({"t": 1}, deviceName="d")])

    assert relations(outcome) == ["Success"]
    assert caplog.messages == [
        '[node] POST_TELEMETRY_REQUEST {"t":1} metadata={"ts":"1000","deviceName":"d"}'
    ]


def test_log_with_script_logs_the_text_it_returns(run_chain, caplog):
    chain = probe(
        "log", {"script": "return 'temperature ' + msg.t + ' at ' + metadata.ts;"}
    )

    with caplog.at_level(logging.INFO, logger="edgectl.chain"):
        outcome = run_chain(chain, [telemetry({"t": 21})])

    assert relations(outcome) == ["Success"]
    assert caplog.messages == ["[node] temperature 21 at 1000"]


def test_log_script_that_throws_sends_to_failure(run_chain):
    chain = probe("log", {"script": "throw 'cannot log';"})

    outcome = run_chain(chain, [telemetry({"t": 21})])

    assert errors(outcome) == [("Failure", "cannot log")]


# -- unsupported -------------------------------------------------------------

EMAIL_NODE = "org.thingsboard.rule.engine.mail.TbSendEmailNode"


def test_placeholder_sends_every_message_to_failure_naming_the_thingsboard_type(
    run_chain,
):
    chain = Chain(
        "Imported",
        "mail",
        (
            NodeSpec(
                "mail",
                "unsupported",
                {"thingsboard_type": EMAIL_NODE},
            ),
        ),
    )

    outcome = run_chain(chain, [telemetry({"t": 1})])

    assert outcome.failures == [
        (
            "mail",
            f"{EMAIL_NODE} is not supported by edgectl; node 'mail' is a placeholder",
        )
    ]
