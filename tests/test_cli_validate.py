"""``edgectl validate FILE...`` end to end: exit codes, the exact lines a user
reads, ``--json`` and ``--strict``; through typer's CliRunner and through a real
``python -m edgectl`` process, whose exit code comes from ``main()``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHAIN_DATA, REPO, RULECHAINS
from typer.testing import CliRunner

from edgectl.cli import app
from edgectl.loader import Problem

BROKEN = {
    "broken_yaml.yaml": [
        "broken_yaml.yaml:9:7: error: invalid YAML: expected ',' or '}', but got ':'",
    ],
    "broken_wrong_type.yaml": [
        "broken_wrong_type.yaml:8:12: error: node 'save': nodes[0].config.ttl: "
        'must be a whole number, got "ten days"',
    ],
    "broken_unknown_key.yaml": [
        "broken_unknown_key.yaml:7:5: error: node 'route': nodes[0].nxet: "
        "unknown key 'nxet'; hint: did you mean 'next'?",
    ],
    "broken_bad_enum.yaml": [
        "broken_bad_enum.yaml:8:14: error: node 'save': nodes[0].config.scope: "
        '"SHARED_SCOPE" is not allowed here; hint: one of client, server, shared',
    ],
    "broken_dangling_relation.yaml": [
        "broken_dangling_relation.yaml:8:23: error: node 'route': "
        "nodes[0].next.Post telemetry: relation 'Post telemetry' goes to unknown "
        "node 'save-telemetri'; hint: did you mean 'save-telemetry'?",
        "broken_dangling_relation.yaml:9:9: warning: node 'save-telemetry': "
        "nodes[1].id: node 'save-telemetry' cannot be reached from the entry "
        "'route'; hint: add a relation to it or remove it",
    ],
    "broken_duplicate_id.yaml": [
        "broken_duplicate_id.yaml:11:9: error: node 'save': nodes[2].id: duplicate "
        "node id 'save'; hint: the first node with this id is on line 9; rename one",
    ],
    "broken_impossible_label.yaml": [
        "broken_impossible_label.yaml:9:7: error: node 'route': "
        "nodes[0].next.Post telemtry: a message_type_switch node never emits the "
        "relation 'Post telemtry'; hint: did you mean 'Post telemetry'?",
    ],
    "broken_missing_entry.yaml": [
        "broken_missing_entry.yaml:3:8: error: entry: entry node 'rout' is not "
        "defined; hint: did you mean 'route'?",
    ],
    "broken_cycle.yaml": [
        "broken_cycle.yaml:16:7: error: node 'halve': nodes[1].next.Success: "
        "relation 'Success' closes a cycle: double -> halve -> double; hint: a "
        "message would loop until the execution limit stops it",
    ],
    "broken_calls_missing_chain.yaml": [
        "broken_calls_missing_chain.yaml:8:14: error: node 'call': "
        "nodes[0].config.chain: called chain no_such_chain.yaml has errors: "
        "no_such_chain.yaml:1:1: error: cannot read file: No such file or "
        "directory; hint: run edgectl validate no_such_chain.yaml",
    ],
    "broken_loop_a.yaml": [
        "broken_loop_a.yaml:8:14: error: node 'call-b': nodes[0].config.chain: "
        "called chain broken_loop_b.yaml has errors: broken_loop_b.yaml:8:14: "
        "error: node 'call-a': nodes[0].config.chain: calls broken_loop_a.yaml, "
        "which is already being called: chains would call each other forever; "
        "hint: break the loop of rule_chain nodes; hint: run edgectl validate "
        "broken_loop_b.yaml",
    ],
    "broken_script.yaml": [
        "broken_script.yaml:8:15: error: node 'hot': nodes[0].config.script: "
        "script 'hot' does not compile: SyntaxError: Unexpected token ';' at line "
        "2 of the script:",
        "    return msg.temperature > ;",
        "                             ^",
        "Fix the JavaScript there; the script is the body of function(msg, "
        "metadata, msgType).",
    ],
}

WARNINGS = {
    "warn_unreachable.yaml": [
        "warn_unreachable.yaml:7:9: warning: node 'forgotten': nodes[1].id: node "
        "'forgotten' cannot be reached from the entry 'save'; hint: add a relation "
        "to it or remove it",
    ],
    "warn_deletes_stay_local.yaml": [
        "warn_deletes_stay_local.yaml:12:11: warning: node 'push': nodes[1].type: "
        "the chain pushes to the peer but routes no 'Attributes Deleted' messages; "
        "hint: deletes would stay local; route them to a push node",
        "warn_deletes_stay_local.yaml:12:11: warning: node 'push': nodes[1].type: "
        "the chain pushes to the peer but routes no 'Timeseries Deleted' messages; "
        "hint: deletes would stay local; route them to a push node",
    ],
}


@pytest.fixture
def in_chain_data(monkeypatch):
    """Run from tests/data/chains, so messages name files as a user typed them."""
    monkeypatch.chdir(CHAIN_DATA)


def validate(*args: str):
    return CliRunner().invoke(app, ["validate", *args])


def test_validate_exits_0_for_every_example_chain():
    files = [str(path) for path in sorted(RULECHAINS.glob("*.yaml"))]

    result = validate(*files)

    assert result.exit_code == 0
    assert result.stdout == f"{len(files)} file(s) valid\n"


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_chain_exits_1_with_every_problem_at_file_line_column(
    in_chain_data, name
):
    result = validate(name)

    assert result.exit_code == 1
    assert result.stdout.splitlines() == BROKEN[name]


@pytest.mark.parametrize("name", sorted(WARNINGS))
def test_warnings_are_printed_but_exit_0(in_chain_data, name):
    result = validate(name)

    assert result.exit_code == 0
    assert result.stdout.splitlines() == [*WARNINGS[name], "1 file(s) valid"]


@pytest.mark.parametrize("name", sorted(WARNINGS))
def test_warnings_exit_1_with_strict(in_chain_data, name):
    result = validate("--strict", name)

    assert result.exit_code == 1
    assert result.stdout.splitlines() == WARNINGS[name]


def test_problems_of_every_file_are_printed_in_the_order_files_were_given(
    in_chain_data,
):
    names = ["warn_unreachable.yaml", "broken_bad_enum.yaml", "sample_classify.yaml"]

    result = validate(*names)

    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        *WARNINGS["warn_unreachable.yaml"],
        *BROKEN["broken_bad_enum.yaml"],
    ]


POST_ATTRIBUTES = "nodes[0].next.Post attributes"
TIMESERIES_UPDATED = "nodes[0].next.Timeseries Updated"
LATEST = "nodes[1].config.latest"


def test_json_prints_the_same_problems_as_a_list_of_objects(in_chain_data):
    result = validate("--json", "broken_many_problems.yaml", "warn_unreachable.yaml")

    assert result.exit_code == 1
    problems = json.loads(result.stdout)
    assert [
        (p["file"], p["line"], p["column"], p["severity"], p["node"], p["path"])
        for p in problems
    ] == [
        ("broken_many_problems.yaml", 10, 24, "error", "route", POST_ATTRIBUTES),
        ("broken_many_problems.yaml", 11, 27, "error", "route", TIMESERIES_UPDATED),
        ("broken_many_problems.yaml", 15, 15, "error", "save", LATEST),
        ("broken_many_problems.yaml", 17, 7, "error", "save", "nodes[1].next.True"),
        ("broken_many_problems.yaml", 17, 7, "error", "save", "nodes[1].next.True"),
        ("broken_many_problems.yaml", 18, 9, "error", "save", "nodes[2].id"),
        ("warn_unreachable.yaml", 7, 9, "warning", "forgotten", "nodes[1].id"),
    ]
    assert problems[2] == {
        "file": "broken_many_problems.yaml",
        "line": 15,
        "column": 15,
        "severity": "error",
        "message": '"sometimes" is not allowed here',
        "node": "save",
        "path": "nodes[1].config.latest",
        "hint": "one of on_every_message, skip",
    }


def test_json_holds_exactly_what_the_text_output_prints(in_chain_data):
    names = ["broken_many_problems.yaml", "broken_script.yaml", "warn_unreachable.yaml"]

    text = validate(*names)
    as_json = validate("--json", *names)

    rendered = [Problem(**fields).render() for fields in json.loads(as_json.stdout)]
    assert "\n".join(rendered).splitlines() == text.stdout.splitlines()
    assert as_json.exit_code == text.exit_code == 1


def test_json_of_valid_files_is_an_empty_list_and_exit_0():
    result = validate("--json", str(RULECHAINS / "edge_root.yaml"))

    assert result.exit_code == 0
    assert json.loads(result.stdout) == []


def test_json_warnings_exit_0_unless_strict(in_chain_data):
    relaxed = validate("--json", "warn_unreachable.yaml")
    strict = validate("--json", "--strict", "warn_unreachable.yaml")

    assert relaxed.exit_code == 0
    assert strict.exit_code == 1
    assert json.loads(relaxed.stdout) == json.loads(strict.stdout)
    assert [p["severity"] for p in json.loads(relaxed.stdout)] == ["warning"]


def test_missing_file_is_reported_as_a_problem_and_exits_1(in_chain_data):
    result = validate("no_such_chain.yaml")

    assert result.exit_code == 1
    assert result.stdout == (
        "no_such_chain.yaml:1:1: error: cannot read file: No such file or directory\n"
    )


# -- a real process: exit codes come from main() -----------------------------


def run_edgectl(*args: str, cwd: Path = CHAIN_DATA) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgectl", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_python_m_edgectl_validate_exits_0_then_1_with_the_problem_on_stdout():
    valid = run_edgectl("validate", *(str(p) for p in RULECHAINS.glob("*.yaml")))
    broken = run_edgectl("validate", "broken_duplicate_id.yaml")

    assert (valid.returncode, valid.stdout, valid.stderr) == (
        0,
        "3 file(s) valid\n",
        "",
    )
    assert broken.returncode == 1
    assert broken.stdout.splitlines() == BROKEN["broken_duplicate_id.yaml"]
    assert broken.stderr == ""


def test_installed_edgectl_command_validates_the_example_chains():
    # `pip install -e .` puts an `edgectl` script beside the interpreter.
    command = shutil.which("edgectl", path=str(Path(sys.executable).parent))
    assert command is not None

    done = subprocess.run(
        [command, "validate", *(str(p) for p in sorted(RULECHAINS.glob("*.yaml")))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )

    assert (done.returncode, done.stdout) == (0, "3 file(s) valid\n")


def test_validate_without_files_is_a_usage_error_exit_2():
    done = run_edgectl("validate")

    assert done.returncode == 2
    assert "hit a bug" not in done.stderr


def test_problem_text_that_looks_like_rich_markup_is_printed_verbatim(write_chain):
    path = write_chain(
        "name: Markup\nentry: route\nnodes:\n"
        "  - id: route\n    type: message_type_switch\n"
        '    next:\n      "[/x]": route2\n'
        "  - id: route2\n    type: log\n"
    )

    done = run_edgectl("validate", str(path))

    assert done.returncode == 1
    assert "never emits the relation '[/x]'" in done.stdout
