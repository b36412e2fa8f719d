"""Properties over generated input (hypothesis).

- Any JSON value a device may send is stored on the edge and synced to the
  cloud with its type and value intact, through a real edge and cloud.
- parse_json raises nothing but JsonSyntaxError, whatever bytes it is given.
- The device API answers 200 or a 4xx with a message, never a server error.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
from pathlib import Path

import httpx
import pytest
from conftest import RoleProcess, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgectl.values import JsonSyntaxError, parse_json

KEY, SECRET = "prop-key", "prop-secret"
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1

http = httpx.Client(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def close_client():
    yield
    http.close()


def start(folder: Path, role: str, *args: str) -> RoleProcess:
    environment = {**os.environ, "EDGECTL_EDGE_SECRET": SECRET}
    log = folder / f"{role}.log"
    return RoleProcess(
        role, folder / f"{role}.duckdb", list(args), environment, log
    ).start()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    cloud = start(folder, "cloud")
    body = {"name": "site-1", "key": KEY, "secret": SECRET}
    http.post(f"{cloud.url}/api/edgectl/edges", json=body).raise_for_status()
    edge = start(folder, "edge", "--cloud", cloud.url, "--edge-key", KEY)
    yield cloud, edge
    edge.stop()
    cloud.stop()


# Text as a device may send it: any Unicode scalar value (no lone surrogates).
text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)
keys = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=40)
integers = st.integers(min_value=-(10**40), max_value=10**40)
floats = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.booleans() | integers | floats | text
nested = st.recursive(
    st.none() | scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4)
    ),
    max_leaves=12,
)
# null alone is refused by rule; inside an object or array it is kept.
values = (
    scalars | st.lists(nested, max_size=4) | st.dictionaries(text, nested, max_size=4)
)
readings = st.dictionaries(keys, values, min_size=1, max_size=6)


def expected_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "long" if LONG_MIN <= value <= LONG_MAX else "json"
    if isinstance(value, float):
        return "double"
    return "string" if isinstance(value, str) else "json"


def same(left: object, right: object) -> bool:
    """Equal, with types kept apart (1 is not 1.0 nor True) and -0.0 not 0.0."""
    if type(left) is not type(right):
        return False
    if isinstance(left, float):
        return left == right and math.copysign(1, left) == math.copysign(1, right)
    if isinstance(left, list):
        return len(left) == len(right) and all(map(same, left, right))
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(
            same(left[k], right[k]) for k in left
        )
    return left == right


def stored(role, table: str, device: str) -> dict[str, tuple[object, str]]:
    params = {"device": device, "limit": 1000}
    found = http.get(f"{role.url}/api/edgectl/tables/{table}", params=params).json()
    return {row["key"]: (row["value"], row["type"]) for row in found}


def assert_intact(sent: dict, found: dict, where: str) -> None:
    assert found.keys() == sent.keys(), where
    for key, value in sent.items():
        got, kind = found[key]
        assert kind == expected_type(value), (where, key, value, got)
        assert same(got, value), (where, key, value, got)


devices = itertools.count()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(telemetry=readings, attributes=readings)
def test_any_value_a_device_sends_reaches_the_cloud_with_its_type_and_value(
    pair, telemetry, attributes
):
    cloud, edge = pair
    name = f"device-{next(devices)}"
    body = {"name": name, "token": f"T-{name}"}
    http.post(f"{edge.url}/api/edgectl/devices", json=body).raise_for_status()
    # Sent as JSON text: Python writes floats so they read back exactly.
    telemetry_body = json.dumps({"ts": 1700000000000, "values": telemetry})
    answers = [
        http.post(f"{edge.url}/api/v1/T-{name}/telemetry", content=telemetry_body),
        http.post(
            f"{edge.url}/api/v1/T-{name}/attributes", content=json.dumps(attributes)
        ),
    ]
    assert [answer.status_code for answer in answers] == [200, 200], answers[0].text

    wait_for(
        lambda: (
            len(stored(cloud, "ts_kv", name)) == len(telemetry)
            and len(stored(cloud, "attribute_kv", name)) == len(attributes)
        ),
        what="the values on the cloud",
    )
    for role in (edge, cloud):
        assert_intact(telemetry, stored(role, "ts_kv", name), f"{role.role} ts_kv")
        assert_intact(
            attributes, stored(role, "attribute_kv", name), f"{role.role} attributes"
        )


def mutated(document: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    data = bytearray(document)
    for position, cut, insert in edits:
        at = position % (len(data) + 1)
        data[at : at + cut] = insert
    return bytes(data)


json_bytes = nested.map(lambda value: json.dumps(value).encode())
edits = st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(0, 3), st.binary(max_size=3)),
    max_size=4,
)
garbled = st.builds(mutated, json_bytes, edits) | st.binary(max_size=200)


@settings(max_examples=400, deadline=None)
@given(raw=garbled | st.text(max_size=200))
def test_parse_json_raises_only_its_own_error(raw):
    with contextlib.suppress(JsonSyntaxError):
        parse_json(raw)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(raw=garbled, path=st.sampled_from(["telemetry", "attributes"]))
def test_the_device_api_answers_any_body_with_200_or_a_clear_4xx(pair, raw, path):
    _, edge = pair
    http.post(
        f"{edge.url}/api/edgectl/devices", json={"name": "fuzz", "token": "T-fuzz"}
    )

    answer = http.post(f"{edge.url}/api/v1/T-fuzz/{path}", content=raw)

    assert answer.status_code in (200, 400, 413), answer.text
    if answer.status_code != 200:
        assert answer.json()["error"]


@pytest.mark.parametrize(
    "body", [b"[" * 10_000 + b"]" * 10_000, b"[" * 10_000 + b"1" * 20]
)
def test_parse_json_refuses_deep_nesting_with_its_own_error(body):
    with pytest.raises(JsonSyntaxError):
        parse_json(body)
