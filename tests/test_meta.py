"""Meta-tests: the registry, the schemas, the example chains and the command
line agree with each other, and the schemas ship inside the installed package."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib import resources

import pytest
import typer
from conftest import CHAIN_DATA, REPO, RULECHAINS
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from edgectl.checks import validate_file
from edgectl.cli import app
from edgectl.loader import read_yaml
from edgectl.registry import NODE_TYPES
from edgectl.schema import read_schema

SCHEMAS = resources.files("edgectl").joinpath("schemas")
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
EXAMPLES = [
    *sorted(RULECHAINS.glob("*.yaml")),
    *sorted(CHAIN_DATA.glob("sample_*.yaml")),
]


def schema_files() -> list[str]:
    return sorted(
        item.name for item in SCHEMAS.iterdir() if item.name.endswith(".json")
    )


def test_every_registered_node_type_has_a_config_schema():
    missing = [
        node_type
        for node_type in NODE_TYPES
        if not SCHEMAS.joinpath(f"node-{node_type}.schema.json").is_file()
    ]

    assert missing == []


def test_every_node_schema_belongs_to_a_registered_node_type():
    node_schemas = [name for name in schema_files() if name.startswith("node-")]
    types = [
        name.removeprefix("node-").removesuffix(".schema.json") for name in node_schemas
    ]

    assert sorted(set(types) - set(NODE_TYPES)) == []
    assert schema_files() == sorted(["chain.schema.json", *node_schemas])


@pytest.mark.parametrize("name", schema_files())
def test_every_packaged_schema_is_a_valid_draft_2020_12_schema(name):
    schema = json.loads(SCHEMAS.joinpath(name).read_text(encoding="utf-8"))

    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == DRAFT_2020_12
    assert schema["$id"].endswith(f"/{name}")
    assert schema.get("description")
    assert read_schema(name.removesuffix(".schema.json")) == schema


def test_every_node_type_appears_in_an_example_or_sample_chain():
    used = {
        node["type"] for path in EXAMPLES for node in read_yaml(path).plain["nodes"]
    }

    # `unsupported` is the placeholder the ThingsBoard importer writes for nodes
    # edgectl cannot run; a sample using it would only show a warning.
    assert sorted(set(NODE_TYPES) - used - {"unsupported"}) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_every_example_and_sample_chain_validates_without_a_problem(path):
    assert [problem.render() for problem in validate_file(path)] == []


@pytest.mark.parametrize("folder", ["rulechains", "schemas"])
def test_top_level_folders_mirror_the_packaged_ones(folder):
    # The README runs `edgectl validate rulechains/*.yaml` from a checkout,
    # while the installed package reads its own copy.
    top, packaged = REPO / folder, REPO / "edgectl" / folder
    names = sorted(path.name for path in packaged.iterdir() if path.is_file())

    assert sorted(path.name for path in top.iterdir() if path.is_file()) == names
    _, mismatch, errors = filecmp.cmpfiles(top, packaged, names, shallow=False)
    assert (mismatch, errors) == ([], [])


# -- help for every command --------------------------------------------------


def command_paths(group, prefix=()):
    for name, command in sorted(group.commands.items()):
        path = (*prefix, name)
        yield path, command
        if hasattr(command, "commands"):
            yield from command_paths(command, path)


COMMANDS = list(command_paths(typer.main.get_command(app)))


def test_the_command_line_has_commands_and_sub_commands():
    paths = [" ".join(path) for path, _ in COMMANDS]

    assert "validate" in paths
    assert any(len(path) == 2 for path, _ in COMMANDS)


@pytest.mark.parametrize(
    ("path", "command"), COMMANDS, ids=[" ".join(path) for path, _ in COMMANDS]
)
def test_every_command_and_sub_command_has_help(path, command):
    description = (command.help or "").strip()
    assert description, f"edgectl {' '.join(path)} has no help text"

    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})

    assert result.exit_code == 0
    assert "Usage:" in result.stdout
    first_line = description.splitlines()[0]
    assert " ".join(first_line.split()) in " ".join(result.stdout.split())


def test_top_level_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})

    assert result.exit_code == 0
    top_level = [path[0] for path, _ in COMMANDS if len(path) == 1]
    assert [name for name in top_level if name not in result.stdout] == []


# -- an installed copy -------------------------------------------------------

INSTALLED_CHECK = textwrap.dedent(
    """
    import json, sys
    from importlib import resources
    from pathlib import Path

    import edgectl
    from edgectl.checks import validate_file
    from edgectl.registry import NODE_TYPES
    from edgectl.schema import node_validator, read_schema

    package = Path(edgectl.__file__).parent
    chains = resources.files("edgectl").joinpath("rulechains")
    problems = [
        p.render()
        for item in chains.iterdir()
        if item.name.endswith(".yaml")
        for p in validate_file(Path(str(item)))
    ]
    print(json.dumps({
        "package": str(package),
        "chain_title": read_schema("chain")["title"],
        "node_schemas": sorted(t for t in NODE_TYPES if node_validator(t)),
        "example_chains": sorted(i.name for i in chains.iterdir()),
        "problems": problems,
    }))
    """
)


@pytest.mark.timeout(60)
def test_schemas_and_example_chains_load_from_an_installed_copy(tmp_path):
    # Build the package as an install would (setuptools' build_py with the
    # package data of pyproject.toml) from a copy of the sources, then import it
    # from there with the checkout out of the way.
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copy(REPO / "README.md", source)
    shutil.copytree(
        REPO / "edgectl",
        source / "edgectl",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    installed = tmp_path / "installed"
    build = subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()", "-q",
         "build_py", "--build-lib", str(installed)],
        cwd=source, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr

    done = subprocess.run(
        [sys.executable, "-c", INSTALLED_CHECK],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["package"] == str(installed / "edgectl")
    assert report["chain_title"] == "edgectl rule chain"
    assert report["node_schemas"] == sorted(NODE_TYPES)
    assert report["example_chains"] == sorted(p.name for p in RULECHAINS.glob("*.yaml"))
    assert report["problems"] == []
