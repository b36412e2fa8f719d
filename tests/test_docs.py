"""The README's commands work: quick start, walk-through, every command named."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import httpx
from conftest import REPO, wait_for
from typer.testing import CliRunner

from edgectl.cli import app

README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
runner = CliRunner()


def test_the_readme_test_command_is_what_ci_runs():
    test_command = BLOCKS[1].strip()
    assert "pytest" in test_command
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_every_edgectl_command_in_the_readme_exists():
    commands = set()
    for block in BLOCKS:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("&&")[-1]) if "edgectl " in line else []
            if words and words[0].endswith("edgectl") and len(words) > 1:
                path = [
                    w
                    for w in words[1:3]
                    if not w.startswith("-") and "/" not in w and "." not in w
                ]
                commands.add(tuple(path))
    assert len(commands) >= 10
    for path in commands:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)


def test_the_quick_start_demo_shows_both_files_holding_the_same_rows(tmp_path):
    demo = BLOCKS[0].split("&&")[-1].split()
    assert demo[-1] == "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgectl",
            "demo",
            "--seconds",
            "3",
            "--outage",
            "1",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "edge and cloud hold the same rows." in result.stdout
    assert f"edgectl inspect tables --db {tmp_path}/edge.duckdb" in result.stdout


def test_the_two_terminal_walkthrough(roles, tmp_path):
    cloud_db, edge_db = tmp_path / "cloud.duckdb", tmp_path / "edge.duckdb"
    added = runner.invoke(
        app,
        [
            "edges",
            "add",
            "site-1",
            "--key",
            "site-1",
            "--secret",
            "s3cret",
            "--db",
            str(cloud_db),
        ],
    )
    assert added.exit_code == 0 and "key: site-1" in added.output
    cloud = roles("cloud")
    device = runner.invoke(
        app,
        [
            "devices",
            "add",
            "boiler",
            "--type",
            "thermometer",
            "--token",
            "BOILER_TOKEN",
            "--db",
            str(edge_db),
        ],
    )
    assert device.output.strip() == "BOILER_TOKEN"
    edge = roles(
        "edge",
        "--cloud",
        cloud.url,
        "--edge-key",
        "site-1",
        env={"EDGECTL_EDGE_SECRET": "s3cret"},
    )

    base = f"{edge.url}/api/v1/BOILER_TOKEN"
    assert (
        httpx.post(f"{base}/telemetry", content='{"temperature": 21.5}').status_code
        == 200
    )
    series = '[{"ts": 1700000000000, "values": {"temperature": 20.0, "state": "idle"}}]'
    assert httpx.post(f"{base}/telemetry", content=series).status_code == 200
    assert (
        httpx.post(f"{base}/attributes", content='{"firmware": "1.2.3"}').status_code
        == 200
    )

    def cloud_has_three_readings():
        shown = runner.invoke(
            app,
            [
                "inspect",
                "tables",
                "ts_kv",
                "--device",
                "boiler",
                "--url",
                cloud.url,
                "--json",
            ],
        )
        return shown.exit_code == 0 and shown.output.count('"key"') == 3

    wait_for(cloud_has_three_readings, what="readings on the cloud")
    overview = runner.invoke(app, ["inspect", "tables", "--url", cloud.url])
    assert overview.exit_code == 0 and "ts_kv" in overview.output
    setting = runner.invoke(
        app,
        [
            "attributes",
            "set",
            "boiler",
            "setpoint=22",
            "--scope",
            "shared",
            "--url",
            cloud.url,
        ],
    )
    assert setting.exit_code == 0, setting.output
    wait_for(
        lambda: (
            httpx.get(f"{base}/attributes?sharedKeys=setpoint").json()
            == {"shared": {"setpoint": 22}}
        ),
        what="the shared attribute on the edge",
    )
