"""Checking chain files as a library: located problems, hints, load_chain, and
YAML that keeps its comments when edgectl rewrites it."""

from __future__ import annotations

import pytest
from conftest import CHAIN_DATA, RULECHAINS

from edgectl.checks import load_chain, validate_file
from edgectl.errors import ChainError
from edgectl.loader import dump_yaml, read_yaml


def rendered(path) -> list[str]:
    return [problem.render() for problem in validate_file(path)]


def test_problem_names_file_line_column_node_key_path_and_bad_value():
    path = CHAIN_DATA / "broken_wrong_type.yaml"

    [problem] = validate_file(path)

    assert (problem.file, problem.line, problem.column) == (str(path), 8, 12)
    assert problem.node == "save"
    assert problem.path == "nodes[0].config.ttl"
    assert problem.message == 'must be a whole number, got "ten days"'
    assert problem.severity == "error"
    assert problem.hint is None


def test_every_problem_in_a_file_is_reported_sorted_by_line():
    path = CHAIN_DATA / "broken_many_problems.yaml"

    problems = validate_file(path)

    assert [(p.line, p.column) for p in problems] == sorted(
        (p.line, p.column) for p in problems
    )
    assert [problem.render().split(": ", 1)[1] for problem in problems] == [
        "error: node 'route': nodes[0].next.Post attributes: relation "
        "'Post attributes' goes to unknown node 'attributes'",
        "error: node 'route': nodes[0].next.Timeseries Updated: relation "
        "'Timeseries Updated' goes to unknown node 'nowhere'",
        "error: node 'save': nodes[1].config.latest: \"sometimes\" is not allowed "
        "here; hint: one of on_every_message, skip",
        "error: node 'save': nodes[1].next.True: a save_timeseries node never "
        "emits the relation 'True'; hint: it emits 'Failure', 'Success'",
        "error: node 'save': nodes[1].next.True: relation 'True' closes a cycle: "
        "route -> save -> route; hint: a message would loop until the execution "
        "limit stops it",
        "error: node 'save': nodes[2].id: duplicate node id 'save'; hint: the "
        "first node with this id is on line 12; rename one",
    ]
    assert [problem.line for problem in problems] == [10, 11, 15, 17, 17, 18]


def test_unknown_node_type_gets_a_did_you_mean_and_other_checks_still_run(
    write_chain,
):
    path = write_chain(
        """\
name: Typo in a type
entry: save
nodes:
  - id: save
    type: save_timeseris
    next:
      Success: nowhere
"""
    )

    assert rendered(path) == [
        f"{path}:5:11: error: node 'save': nodes[0].type: \"save_timeseris\" is not "
        "allowed here; hint: did you mean 'save_timeseries'?",
        f"{path}:7:16: error: node 'save': nodes[0].next.Success: relation "
        "'Success' goes to unknown node 'nowhere'",
    ]


def test_every_unknown_key_of_a_node_is_reported_with_its_own_hint(write_chain):
    path = write_chain(
        """\
name: Two typos
entry: route
nodes:
  - id: route
    type: message_type_switch
    nxet: {}
    descripton: routes by type
"""
    )

    assert rendered(path) == [
        f"{path}:6:5: error: node 'route': nodes[0].nxet: unknown key 'nxet'; "
        "hint: did you mean 'next'?",
        f"{path}:7:5: error: node 'route': nodes[0].descripton: unknown key "
        "'descripton'; hint: did you mean 'description'?",
    ]


def test_schema_messages_say_what_a_value_must_be_in_words(write_chain):
    path = write_chain(
        """\
name: ""
entry: route
nodes:
  - id: route
    type: message_type_switch
    next:
      Post telemetry: 5
      Post attributes: []
      Other: " spaced "
  - id: " padded"
    type: check_message
    config: {}
"""
    )

    assert rendered(path) == [
        f'{path}:1:7: error: name: must not be empty, got ""',
        f"{path}:7:23: error: node 'route': nodes[0].next.Post telemetry: must be "
        "a string or a list, got 5",
        f"{path}:8:24: error: node 'route': nodes[0].next.Post attributes: must "
        "not be empty, got []",
        f"{path}:9:14: error: node 'route': nodes[0].next.Other: must not start "
        'or end with a space, got " spaced "',
        f"{path}:10:9: error: node ' padded': nodes[1].id: must not start or end "
        'with a space, got " padded"',
        f"{path}:12:13: error: node ' padded': nodes[1].config: needs at least one "
        "of the keys 'data_keys' or 'metadata_keys'",
    ]


def test_relation_label_written_twice_is_a_yaml_error_at_the_second(write_chain):
    path = write_chain(
        """\
name: Label twice
entry: a
nodes:
  - id: a
    type: log
    next:
      Success: b
      Success: c
  - id: b
    type: log
  - id: c
    type: log
"""
    )

    assert rendered(path) == [
        f'{path}:8:7: error: invalid YAML: found duplicate key "Success" with '
        'value "c" (original value: "b")',
    ]


def test_problem_under_a_true_label_points_at_that_label_not_the_first_one(
    write_chain,
):
    # YAML reads `True:` as a boolean key; the position must still be found.
    path = write_chain(
        """\
name: Filter relations
entry: hot
nodes:
  - id: hot
    type: filter
    config:
      script: return msg.t > 20;
    next:
      False: sink
      True: missing
  - id: sink
    type: log
"""
    )

    assert rendered(path) == [
        f"{path}:10:13: error: node 'hot': nodes[0].next.True: relation 'True' "
        "goes to unknown node 'missing'",
    ]


def test_config_that_is_not_a_mapping_is_reported_instead_of_crashing(write_chain):
    path = write_chain(
        """\
name: Config as text
entry: call
nodes:
  - id: call
    type: rule_chain
    config: other.yaml
"""
    )

    assert rendered(path) == [
        f"{path}:6:13: error: node 'call': nodes[0].config: must be a mapping, "
        'got "other.yaml"',
    ]


def test_rule_chain_node_emits_the_relations_of_the_called_chains_outputs(
    write_chain,
):
    path = write_chain(
        f"""\
name: Calls classify
entry: call
nodes:
  - id: call
    type: rule_chain
    config:
      chain: {CHAIN_DATA / "sample_classify.yaml"}
    next:
      hot: log
      Cold: log
  - id: log
    type: log
"""
    )

    assert rendered(path) == [
        f"{path}:10:7: error: node 'call': nodes[0].next.Cold: a rule_chain node "
        "never emits the relation 'Cold'; hint: it emits 'Failure', 'Hot', 'Normal'",
    ]


def test_call_into_a_chain_with_errors_reports_its_first_error(write_chain):
    called = CHAIN_DATA / "broken_dangling_relation.yaml"
    path = write_chain(
        f"""\
name: Calls a broken chain
entry: call
nodes:
  - id: call
    type: rule_chain
    config:
      chain: {called}
"""
    )

    assert rendered(path) == [
        f"{path}:7:14: error: node 'call': nodes[0].config.chain: called chain "
        f"{called} has errors: {called}:8:23: error: node 'route': "
        "nodes[0].next.Post telemetry: relation 'Post telemetry' goes to unknown "
        "node 'save-telemetri'; hint: did you mean 'save-telemetry'?; hint: run "
        f"edgectl validate {called}",
    ]


def test_chain_calling_itself_is_reported(write_chain):
    path = write_chain(
        """\
name: Calls itself
entry: call
nodes:
  - id: call
    type: rule_chain
    config:
      chain: chain.yaml
"""
    )

    assert rendered(path) == [
        f"{path}:7:14: error: node 'call': nodes[0].config.chain: calls {path}, "
        "which is already being called: chains would call each other forever; "
        "hint: break the loop of rule_chain nodes",
    ]


def test_placeholder_for_a_thingsboard_node_is_a_warning(write_chain):
    path = write_chain(
        """\
name: Imported
entry: mail
nodes:
  - id: mail
    type: unsupported
    config:
      thingsboard_type: org.thingsboard.rule.engine.mail.TbSendEmailNode
"""
    )

    [problem] = validate_file(path)

    assert not problem.is_error
    assert problem.render() == (
        f"{path}:5:11: warning: node 'mail': nodes[0].type: placeholder for "
        "org.thingsboard.rule.engine.mail.TbSendEmailNode, which edgectl cannot "
        "run; hint: every message sent to it goes to Failure"
    )


def test_switch_may_route_any_label_and_filter_labels_ignore_case(write_chain):
    path = write_chain(
        """\
name: Any label
entry: band
nodes:
  - id: band
    type: switch
    config:
      script: return ["Hot"];
    next:
      Hot: check
      Anything at all: check
  - id: check
    type: filter
    config:
      script: return true;
    next:
      true: done
      FALSE: done
  - id: done
    type: log
"""
    )

    assert validate_file(path) == []


def test_problem_as_dict_carries_every_field_for_json():
    path = CHAIN_DATA / "broken_unknown_key.yaml"

    assert [problem.as_dict() for problem in validate_file(path)] == [
        {
            "file": str(path),
            "line": 7,
            "column": 5,
            "severity": "error",
            "message": "unknown key 'nxet'",
            "node": "route",
            "path": "nodes[0].nxet",
            "hint": "did you mean 'next'?",
        }
    ]


def test_load_chain_refuses_a_file_with_errors_listing_every_one():
    path = CHAIN_DATA / "broken_many_problems.yaml"

    with pytest.raises(ChainError) as raised:
        load_chain(path)

    lines = str(raised.value).splitlines()
    assert len(lines) == 6
    assert lines[0] == (
        f"{path}:10:24: error: node 'route': nodes[0].next.Post attributes: "
        "relation 'Post attributes' goes to unknown node 'attributes'"
    )


def test_load_chain_accepts_warnings_and_builds_nodes_in_file_order():
    chain = load_chain(CHAIN_DATA / "warn_unreachable.yaml")

    assert chain.name == "Unreachable node"
    assert chain.entry == "save"
    assert [(node.id, node.type) for node in chain.nodes] == [
        ("save", "save_timeseries"),
        ("forgotten", "log"),
    ]


def test_load_chain_normalises_one_target_and_a_list_of_targets():
    chain = load_chain(CHAIN_DATA / "sample_cloud_scripts.yaml")

    route = chain.node("route")
    assert route.next["Post telemetry"] == ("classify",)
    assert chain.node("forget").config == {
        "scope": "shared",
        "keys": ["${staleKey}", "$[key]"],
        "notify_attributes_deleted": True,
    }


@pytest.mark.parametrize(
    "path", sorted(RULECHAINS.glob("*.yaml")), ids=lambda path: path.name
)
def test_rewriting_an_unchanged_example_chain_gives_back_the_same_text(path):
    assert dump_yaml(read_yaml(path).tree) == path.read_text(encoding="utf-8")


def test_rewriting_a_chain_keeps_its_comments_and_key_order():
    document = read_yaml(RULECHAINS / "edge_root.yaml")

    document.tree["nodes"][1]["config"]["ttl"] = 3600
    text = dump_yaml(document.tree)

    original = (RULECHAINS / "edge_root.yaml").read_text()
    assert text == original.replace(
        "      ttl: 0                       # seconds",
        "      ttl: 3600                    # seconds",
    )
