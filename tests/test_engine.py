"""How the engine routes messages through chains: labels, copies, failures,
the execution limit, arrival order and calls into other chain files."""

from __future__ import annotations

import logging
import time

import pytest
from conftest import CHAIN_DATA, RULECHAINS

from edgectl.chain import Chain, NodeSpec, build_chain
from edgectl.engine import BuildContext, Engine, Run, log_failures
from edgectl.errors import ChainError
from edgectl.loader import read_yaml
from edgectl.message import EntityRef, Message

DEVICE = EntityRef("DEVICE", "thermometer-1")


def message(type_: str, data, ts: int = 1000, **metadata: str) -> Message:
    return Message(type_, DEVICE, data, {"ts": str(ts), **metadata})


def telemetry(data, ts: int = 1000, **metadata: str) -> Message:
    return message("POST_TELEMETRY_REQUEST", data, ts, **metadata)


def attributes(data, ts: int = 1000, **metadata: str) -> Message:
    return message("POST_ATTRIBUTES_REQUEST", data, ts, **metadata)


def node(node_id: str, type_: str, config=None, **next_: str | tuple[str, ...]):
    """A NodeSpec for chains built in code; ``next_`` maps label to target(s)."""
    relations = {
        label: (targets,) if isinstance(targets, str) else targets
        for label, targets in next_.items()
    }
    return NodeSpec(node_id, type_, config or {}, relations)


# -- relation labels ---------------------------------------------------------


def test_relation_labels_match_whatever_their_case(run_chain, stored):
    chain = """
        name: Labels in odd case
        entry: route
        nodes:
          - id: route
            type: message_type_switch
            next:
              POST TELEMETRY: save-telemetry
              post Attributes: save-attributes
          - id: save-telemetry
            type: save_timeseries
          - id: save-attributes
            type: save_attributes
    """

    outcome = run_chain(chain, [telemetry({"t": 21}), attributes({"fw": "1.2"})])

    assert outcome.failures == []
    assert stored.readings() == [("thermometer-1", "t", 1000, 21, None)]
    assert stored.attributes() == {("thermometer-1", "server", "fw"): ("1.2", 1000)}


def test_message_whose_label_has_no_relation_is_done_without_failure(run_chain, stored):
    chain = """
        name: Telemetry only
        entry: route
        nodes:
          - id: route
            type: message_type_switch
            next:
              Post telemetry: save
          - id: save
            type: save_timeseries
    """

    outcome = run_chain(chain, [attributes({"fw": "1.2"})])

    assert outcome.failures == []
    assert outcome.outputs == []
    assert stored.attributes() == {}
    assert stored.readings() == []


def test_unhandled_failure_is_counted_with_node_id_and_error(run_chain, caplog):
    chain = """
        name: Failures nowhere to go
        entry: save
        nodes:
          - id: save
            type: save_timeseries
    """

    outcome = run_chain(chain, [attributes({"a": 1}), attributes({"b": 2})])
    with caplog.at_level(logging.ERROR, logger="edgectl.engine"):
        log_failures(outcome.run.failures)

    error = "Unsupported msg type POST_ATTRIBUTES_REQUEST"
    assert outcome.failures == [("save", error), ("save", error)]
    assert [failure.chain for failure in outcome.run.failures] == [
        "Failures nowhere to go"
    ] * 2
    assert caplog.messages == [
        f"chain 'Failures nowhere to go' node 'save' dropped 2 message(s): {error}"
    ]


def test_failure_with_a_failure_relation_is_handled_not_counted(run_chain, stored):
    chain = """
        name: Failures handled
        entry: save
        nodes:
          - id: save
            type: save_timeseries
            next:
              failure: keep-as-attribute
          - id: keep-as-attribute
            type: transform
            config:
              script: |
                return {msg: {lastError: metadata.error},
                        msgType: "POST_ATTRIBUTES_REQUEST"};
            next:
              Success: save-attribute
          - id: save-attribute
            type: save_attributes
    """

    outcome = run_chain(chain, [attributes({"a": 1})])

    assert outcome.failures == []
    assert stored.attributes() == {
        ("thermometer-1", "server", "lastError"): (
            "Unsupported msg type POST_ATTRIBUTES_REQUEST",
            1000,
        )
    }


# -- several matches ---------------------------------------------------------


def test_each_matching_target_gets_its_own_copy_with_its_own_metadata(
    run_chain, stored
):
    chain = """
        name: Fan out
        entry: route
        nodes:
          - id: route
            type: message_type_switch
            next:
              Post telemetry: [save, reject, keep]
          - id: save
            type: save_timeseries
          - id: reject
            type: unsupported
            config:
              thingsboard_type: org.thingsboard.rule.engine.mail.TbSendEmailNode
          - id: keep
            type: output
    """

    outcome = run_chain(chain, [telemetry({"t": 21}, deviceName="thermometer-1")])

    assert stored.readings() == [("thermometer-1", "t", 1000, 21, None)]
    [(failed_node, _)] = outcome.failures
    assert failed_node == "reject"
    [(relation, kept)] = outcome.outputs
    assert relation == "Success"
    # The copy that failed carries the error; the sibling copy does not.
    assert "error" in outcome.run.failures[0].message.metadata
    assert kept.metadata == {"ts": "1000", "deviceName": "thermometer-1"}


def test_two_labels_to_the_same_node_deliver_two_copies(run_chain, stored):
    chain = """
        name: Two relations, one target
        entry: split
        nodes:
          - id: split
            type: switch
            config:
              script: return ["first", "second"];
            next:
              first: push
              second: push
          - id: push
            type: push_to_cloud
    """

    run_chain(chain, [telemetry({"t": 21})])

    assert [event["action"] for event in stored.events()] == [
        "TIMESERIES_UPDATED",
        "TIMESERIES_UPDATED",
    ]


def test_label_a_script_names_twice_in_other_case_matches_its_relation_once(
    run_chain, stored
):
    chain = """
        name: One relation named three times
        entry: split
        nodes:
          - id: split
            type: switch
            config:
              script: return ["hot", "Hot", "HOT"];
            next:
              Hot: push
          - id: push
            type: push_to_cloud
    """

    run_chain(chain, [telemetry({"t": 41})])

    assert len(stored.events()) == 1


def test_relations_whose_labels_differ_only_in_case_keep_all_their_targets(
    run_chain, stored
):
    chain = """
        name: Same label twice
        entry: split
        nodes:
          - id: split
            type: switch
            config:
              script: return ["hot"];
            next:
              hot: push
              HOT: save
          - id: push
            type: push_to_cloud
          - id: save
            type: save_timeseries
    """

    run_chain(chain, [telemetry({"t": 41})])

    assert len(stored.events()) == 1
    assert stored.readings() == [("thermometer-1", "t", 1000, 41, None)]


# -- the execution limit -----------------------------------------------------

RUNAWAY = "the chain loops or multiplies messages"


@pytest.mark.timeout(20)
def test_transform_that_multiplies_messages_is_stopped_by_the_execution_limit(
    run_chain, stored
):
    chain = """
        name: Message bomb
        entry: explode
        nodes:
          - id: explode
            type: transform
            config:
              script: |
                if (!msg.copies) { return {msg: msg}; }
                var out = [];
                for (var i = 0; i < msg.copies; i++) { out.push({msg: {n: i}}); }
                return out;
            next:
              Success: save
          - id: save
            type: save_timeseries
    """

    outcome = run_chain(chain, [telemetry({"copies": 5000}), telemetry({"t": 7})])

    assert outcome.failures == [
        (
            "save",
            "stopped after 1000 node executions for one incoming message "
            f"(at node 'save'); {RUNAWAY}",
        )
    ]
    # The other incoming message has a budget of its own and is stored.
    assert ("thermometer-1", "t", 1000, 7, None) in stored.readings()


@pytest.mark.timeout(20)
def test_cycle_built_in_code_is_stopped_by_the_execution_limit_not_a_hang():
    chain = Chain(
        "Ping pong",
        "ping",
        (node("ping", "log", Success="pong"), node("pong", "log", Success="ping")),
    )
    engine = Engine(chain, execution_limit=50)
    run = Run()

    started = time.monotonic()
    engine.run([telemetry({"t": 1}), telemetry({"t": 2})], run)

    assert time.monotonic() - started < 5
    error = (
        "stopped after 50 node executions for one incoming message "
        f"(at node 'ping'); {RUNAWAY}"
    )
    assert [(f.chain, f.node, f.error) for f in run.failures] == [
        ("Ping pong", "ping", error),
        ("Ping pong", "ping", error),
    ]
    assert run.failures[0].message.metadata["error"] == error


@pytest.mark.timeout(20)
def test_transform_that_doubles_messages_in_a_loop_is_stopped(run_chain):
    double = node(
        "double",
        "transform",
        {"script": "return [{msg: msg}, {msg: msg}];"},
        Success="double",
    )
    engine = run_chain.engine(Chain("Doubling", "double", (double,)))

    outcome = run_chain(engine, [telemetry({"t": 1})])

    assert outcome.failures == [
        (
            "double",
            "stopped after 1000 node executions for one incoming message "
            f"(at node 'double'); {RUNAWAY}",
        )
    ]


@pytest.mark.timeout(20)
def test_notifications_that_feed_themselves_are_stopped_by_the_execution_limit(
    run_chain,
):
    # Every save notifies the root chain, which turns the notification back
    # into a post that is saved again: each round is a new root pass, and no
    # relation closes a cycle, so validation cannot see it.
    chain = """
        name: Echo
        entry: route
        nodes:
          - id: route
            type: message_type_switch
            next:
              Post attributes: save
              Attributes Updated: repost
          - id: save
            type: save_attributes
            config:
              scope: shared
              update_only_on_change: false
              notify_attributes_updated: true
          - id: repost
            type: transform
            config:
              script: |
                return {msg: msg, metadata: {ts: metadata.ts},
                        msgType: "POST_ATTRIBUTES_REQUEST"};
            next:
              Success: save
    """

    outcome = run_chain(chain, [attributes({"a": 1})], execution_limit=30)

    assert outcome.failures == [
        (
            "repost",
            "stopped after 30 node executions for one incoming message "
            f"(at node 'repost'); {RUNAWAY}",
        )
    ]


@pytest.mark.timeout(20)
def test_runaway_inside_a_called_chain_reports_the_callers_limit(
    run_chain, write_chain
):
    write_chain(
        """
name: Fan out
entry: explode
nodes:
  - id: explode
    type: transform
    config:
      script: |
        var out = [];
        for (var i = 0; i < 100; i++) { out.push({msg: msg}); }
        return out;
    next:
      Success: done
  - id: done
    type: output
""",
        "fan_out.yaml",
    )
    caller = """
        name: Caller
        entry: call
        nodes:
          - id: call
            type: rule_chain
            config:
              chain: fan_out.yaml
    """

    outcome = run_chain(caller, [telemetry({"t": 1})], execution_limit=40)

    assert outcome.failures == [
        (
            "call",
            "stopped after 40 node executions for one incoming message "
            f"(at node 'done'); {RUNAWAY}",
        )
    ]


# -- arrival order -----------------------------------------------------------


def test_events_keep_arrival_order_when_messages_take_different_paths(
    run_chain, stored
):
    # Telemetry passes a save node before the push; attributes go straight to
    # the push. The queue must still follow the order the messages came in.
    chain = """
        name: Two paths to one push
        entry: route
        nodes:
          - id: route
            type: message_type_switch
            next:
              Post telemetry: save
              Post attributes: push
          - id: save
            type: save_timeseries
            next:
              Success: push
          - id: push
            type: push_to_cloud
    """
    incoming = [
        telemetry({"t": 1}, ts=1001),
        attributes({"fw": "a"}, ts=1002),
        telemetry({"t": 3}, ts=1003),
        attributes({"fw": "b"}, ts=1004),
    ]

    run_chain(chain, incoming)

    events = stored.events()
    assert [event["ts"] for event in events] == [1001, 1002, 1003, 1004]
    assert [event["seq"] for event in events] == [1, 2, 3, 4]
    assert [event["action"] for event in events] == [
        "TIMESERIES_UPDATED",
        "POST_ATTRIBUTES",
        "TIMESERIES_UPDATED",
        "POST_ATTRIBUTES",
    ]


TELEMETRY_AND_DELETES = Chain(
    "Save and delete",
    "route",
    (
        node(
            "route",
            "message_type_switch",
            **{"Post telemetry": "save", "Timeseries Deleted": "delete"},
        ),
        node("save", "save_timeseries"),
        node("delete", "delete_timeseries"),
    ),
)


def test_reading_that_arrives_after_a_delete_in_the_same_batch_is_kept(
    run_chain, stored
):
    run_chain(TELEMETRY_AND_DELETES, [telemetry({"t": 0}, ts=1)])
    deletion = message("TIMESERIES_DELETED", {"keys": ["t"]}, 6)

    run_chain(
        TELEMETRY_AND_DELETES,
        [telemetry({"t": 1}, ts=5), deletion, telemetry({"t": 2}, ts=7)],
    )

    assert stored.readings() == [("thermometer-1", "t", 7, 2, None)]


def test_delete_removes_readings_stored_earlier_in_the_same_batch(run_chain, stored):
    deletion = message("TIMESERIES_DELETED", {"keys": ["t"]}, 6)

    run_chain(TELEMETRY_AND_DELETES, [telemetry({"t": 1}, ts=5), deletion])

    assert stored.readings() == []


def test_sequence_numbers_continue_across_batches(run_chain, stored):
    chain = """
        name: Push all
        entry: push
        nodes:
          - id: push
            type: push_to_cloud
    """
    engine = run_chain.engine(chain)

    run_chain(engine, [telemetry({"t": 1}, ts=1), telemetry({"t": 2}, ts=2)])
    run_chain(engine, [telemetry({"t": 3}, ts=3)])

    assert [(e["seq"], e["ts"]) for e in stored.events()] == [(1, 1), (2, 2), (3, 3)]


# -- calling other chain files ----------------------------------------------

SAMPLE = CHAIN_DATA / "sample_cloud_scripts.yaml"


def test_called_chain_returns_messages_by_the_relation_of_their_output_node(
    run_chain, stored
):
    hot, normal, no_number = (
        telemetry({"temperature": 35}, ts=1),
        telemetry({"temperature": 20}, ts=2),
        telemetry({"temperature": "n/a"}, ts=3),
    )

    outcome = run_chain(SAMPLE, [hot, normal, no_number])

    # Hot comes back by "Hot" and is converted; Normal has no relation in the
    # caller and the filter's False has none in the called chain: both done.
    assert outcome.failures == []
    assert stored.readings() == [("thermometer-1", "temperature", 1, 95.0, None)]


def test_failure_inside_called_chain_returns_to_the_caller_by_failure(
    run_chain, stored, caplog
):
    broken = telemetry({"temperature": "broken"})

    with caplog.at_level(logging.INFO, logger="edgectl.chain"):
        outcome = run_chain(SAMPLE, [broken])

    assert outcome.failures == []
    assert stored.readings() == []
    assert caplog.messages == [
        "[log-failure] classify failed: Error: sensor broken (line 1 of the script)"
    ]


def test_failure_inside_called_chain_is_counted_at_the_caller_without_route(
    run_chain, write_chain
):
    write_chain(
        """
name: Strict
entry: save
nodes:
  - id: save
    type: save_timeseries
    next:
      Success: done
  - id: done
    type: output
""",
        "strict.yaml",
    )
    caller = """
        name: Caller
        entry: call
        nodes:
          - id: call
            type: rule_chain
            config:
              chain: strict.yaml
    """

    outcome = run_chain(caller, [attributes({"a": 1})])

    assert outcome.failures == [
        ("call", "Unsupported msg type POST_ATTRIBUTES_REQUEST")
    ]
    assert [failure.chain for failure in outcome.run.failures] == ["Caller"]


def test_notification_from_a_called_chain_enters_the_root_chain(
    run_chain, write_chain, stored
):
    write_chain(
        """
name: Save shared attributes
entry: save
nodes:
  - id: save
    type: save_attributes
    config:
      scope: shared
      notify_attributes_updated: true
""",
        "attributes.yaml",
    )
    root = """
        name: Root
        entry: route
        nodes:
          - id: route
            type: message_type_switch
            next:
              Post attributes: call
              Attributes Updated: push
              Attributes Deleted: push
              Timeseries Deleted: push
          - id: call
            type: rule_chain
            config:
              chain: attributes.yaml
          - id: push
            type: push_to_cloud
    """

    run_chain(root, [attributes({"target": 22}, ts=5)])

    assert stored.attributes() == {("thermometer-1", "shared", "target"): (22, 5)}
    assert stored.events() == [
        {
            "seq": 1,
            "action": "ATTRIBUTES_UPDATED",
            "entity": "DEVICE/thermometer-1",
            "body": {"kv": {"target": 22}, "ts": 5, "scope": "shared"},
            "ts": 5,
        }
    ]


def test_engine_refuses_chains_that_call_each_other_in_a_loop(write_chain):
    first = write_chain(
        "name: A\nentry: call\nnodes:\n"
        "  - {id: call, type: rule_chain, config: {chain: b.yaml}}\n",
        "a.yaml",
    )
    write_chain(
        "name: B\nentry: call\nnodes:\n"
        "  - {id: call, type: rule_chain, config: {chain: a.yaml}}\n",
        "b.yaml",
    )

    def load_unchecked(path):
        return build_chain(read_yaml(path).plain, path)

    with pytest.raises(ChainError) as raised:
        Engine(load_unchecked(first), BuildContext(load_unchecked, (first,)))

    second = first.with_name("b.yaml")
    assert str(raised.value) == (
        f"rule chains call each other in a loop: {first} -> {second} -> {first}"
    )


# -- the example chains ------------------------------------------------------


def test_edge_root_chain_saves_and_pushes_telemetry_and_client_attributes(
    run_chain, stored
):
    run_chain(
        RULECHAINS / "edge_root.yaml",
        [telemetry({"t": 21.5}, ts=10), attributes({"fw": "1.2"}, ts=11)],
    )

    assert stored.readings() == [("thermometer-1", "t", 10, 21.5, None)]
    assert stored.latest() == {("thermometer-1", "t"): (10, 21.5)}
    assert stored.attributes() == {("thermometer-1", "client", "fw"): ("1.2", 11)}
    assert [(e["action"], e["body"]) for e in stored.events()] == [
        ("TIMESERIES_UPDATED", {"data": {"t": 21.5}, "ts": 10}),
        ("POST_ATTRIBUTES", {"kv": {"fw": "1.2"}, "ts": 11, "scope": "client"}),
    ]


def test_edge_root_chain_pushes_attribute_changes_with_their_scope(run_chain, stored):
    run_chain(
        RULECHAINS / "edge_root.yaml",
        [
            message("ATTRIBUTES_UPDATED", {"mode": "eco"}, 20, scope="SHARED_SCOPE"),
            message("ATTRIBUTES_DELETED", {"attributes": ["mode"]}, 21),
        ],
    )

    assert [(e["action"], e["body"]) for e in stored.events()] == [
        ("ATTRIBUTES_UPDATED", {"kv": {"mode": "eco"}, "ts": 20, "scope": "shared"}),
        ("ATTRIBUTES_DELETED", {"keys": ["mode"], "scope": "server", "ts": 21}),
    ]


def test_edge_root_chain_stores_but_does_not_echo_what_the_cloud_sent(
    run_chain, stored
):
    run_chain(RULECHAINS / "edge_root.yaml", [telemetry({"t": 1}, source="cloud")])

    assert stored.readings() == [("thermometer-1", "t", 1000, 1, None)]
    assert stored.events() == []


def test_history_only_chain_keeps_history_but_not_latest_values(run_chain, stored):
    run_chain(RULECHAINS / "edge_history_only.yaml", [telemetry({"t": 5}, ts=30)])

    assert stored.readings() == [("thermometer-1", "t", 30, 5, None)]
    assert stored.latest() == {}
    assert [e["action"] for e in stored.events()] == ["TIMESERIES_UPDATED"]


def test_cloud_root_chain_saves_telemetry_and_sends_attribute_changes_to_the_edge(
    run_chain, store, stored
):
    store.add_entity(DEVICE, edge="edge-north")

    run_chain(
        RULECHAINS / "cloud_root.yaml",
        [
            telemetry({"t": 3}, ts=40, source="edge"),
            message("ATTRIBUTES_UPDATED", {"mode": "eco"}, 41, scope="SHARED_SCOPE"),
            message("ATTRIBUTES_UPDATED", {"mode": "off"}, 42, source="edge"),
        ],
    )

    assert stored.latest() == {("thermometer-1", "t"): (40, 3)}
    assert stored.events("edge_event") == [
        {
            "seq": 1,
            "action": "ATTRIBUTES_UPDATED",
            "entity": "DEVICE/thermometer-1",
            "body": {"kv": {"mode": "eco"}, "ts": 41, "scope": "shared"},
            "ts": 41,
            "edge": "edge-north",
        }
    ]
