"""How JSON text becomes typed values: exact numbers, strings byte for byte,
clear rejections, and the two parsers (fast and exact) agreeing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgectl.values import (
    BOOLEAN,
    DOUBLE,
    JSON,
    LONG,
    STRING,
    JsonSyntaxError,
    ValueRejected,
    classify,
    decode,
    dumps,
    parse_json,
)

# A run of 19 digits sends a text to the exact parser; appending one to an array
# lets each case be checked on both paths.
EXACT_PATH_SUFFIX = ", 1000000000000000000]"


def both_paths(text: str) -> list:
    """The value of ``text`` from the fast parser and from the exact one."""
    exact = parse_json("[" + text + EXACT_PATH_SUFFIX)
    assert exact[1] == 10**18
    return [parse_json(text), exact[0]]


def same(left, right) -> bool:
    """Equal and of the same JSON type all the way down (1 == 1.0 == True)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(
            same(left[k], right[k]) for k in left
        )
    if isinstance(left, list):
        return len(left) == len(right) and all(map(same, left, right))
    return left == right


@pytest.mark.parametrize(
    ("text", "kind", "stored"),
    [
        ("true", BOOLEAN, True),
        ("false", BOOLEAN, False),
        ("42", LONG, 42),
        ("9007199254740993", LONG, 9007199254740993),
        ("-9223372036854775808", LONG, -(2**63)),
        ("9223372036854775807", LONG, 2**63 - 1),
        ("1.0", DOUBLE, 1.0),
        ("12e3", DOUBLE, 12000.0),
        ("4.2e1", DOUBLE, 42.0),
        ("1E-3", DOUBLE, 0.001),
        ("-0.0", DOUBLE, -0.0),
        ("0.30000000000000000000000001", DOUBLE, 0.3),
        ('"00042"', STRING, "00042"),
        ('"true"', STRING, "true"),
        ('"12e3"', STRING, "12e3"),
        ('""', STRING, ""),
        ('"温度"', STRING, "温度"),
        ('"🔥"', STRING, "🔥"),
        ('"\\ud83d\\udd25"', STRING, "🔥"),
        ('{"b": 1, "a": [true, 1.5]}', JSON, '{"b":1,"a":[true,1.5]}'),
        ("[]", JSON, "[]"),
        ("9223372036854775808", JSON, "9223372036854775808"),
        ("-9223372036854775809", JSON, "-9223372036854775809"),
        ("[18446744073709551616]", JSON, "[18446744073709551616]"),
    ],
)
def test_json_spelling_decides_the_kind_and_the_value_is_kept(text, kind, stored):
    for value in both_paths(text):
        assert same(classify(value), (kind, stored)), value

        assert same(decode(kind, stored), value)


def test_integer_beyond_64_bits_reads_back_as_the_same_number():
    big = 2**64 * 10**10 + 7

    kind, stored = classify(parse_json(str(big)))

    assert (kind, stored) == (JSON, str(big))
    assert decode(kind, stored) == big
    assert dumps({"v": big}) == f'{{"v":{big}}}'


def test_null_is_rejected_with_the_reason():
    with pytest.raises(ValueRejected) as rejected:
        classify(parse_json("null"))

    assert str(rejected.value) == "null is not a value; leave the key out instead"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_by_the_parser_by_name(constant):
    for text in (f'{{"v": {constant}}}', f"[{constant}{EXACT_PATH_SUFFIX}"):
        with pytest.raises(JsonSyntaxError) as refused:
            parse_json(text)

        assert str(refused.value) == (
            f"{constant} is not valid JSON; send a number or a string"
        )


def test_number_too_large_for_a_double_is_refused_on_both_paths():
    with pytest.raises(JsonSyntaxError, match="infinity"):
        parse_json('{"v": 1e400}')
    with pytest.raises(JsonSyntaxError) as refused:
        parse_json("[1e400" + EXACT_PATH_SUFFIX)

    assert str(refused.value) == "number 1e400 is too large for a double"


def test_lone_surrogate_is_refused_on_both_paths():
    with pytest.raises(JsonSyntaxError):
        parse_json('{"v": "\\ud800"}')
    with pytest.raises(JsonSyntaxError) as refused:
        parse_json('{"\\udc00": 1, "n": 1000000000000000000}')

    assert "lone UTF-16 surrogate" in str(refused.value)


def test_text_with_a_lone_surrogate_character_is_refused_not_crashed():
    with pytest.raises(JsonSyntaxError):
        parse_json('"\udcff"')


def test_integer_with_thousands_of_digits_is_refused_plainly():
    with pytest.raises(JsonSyntaxError) as refused:
        parse_json("[" + "7" * 5000 + "]")

    assert str(refused.value) == (
        "an integer has more than 4300 digits; send it as a string"
    )


@pytest.mark.parametrize("text", ["[" * 10_000 + "]" * 10_000, "[" * 10_000 + "1" * 20])
def test_nesting_too_deep_for_the_exact_parser_is_refused_plainly(text):
    with pytest.raises(JsonSyntaxError) as refused:
        parse_json(text)

    assert str(refused.value) == "arrays and objects are nested too deeply"


@pytest.mark.parametrize("text", ["{", '{"a": 1,}', "[1] x", "", "\xff"])
def test_text_that_is_not_json_is_a_syntax_error(text):
    for candidate in (text, "[" + text + EXACT_PATH_SUFFIX):
        with pytest.raises(JsonSyntaxError):
            parse_json(candidate)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_any_json_value_parses_back_exactly_on_both_paths(value):
    text = json.dumps(value, ensure_ascii=False)

    for parsed in both_paths(text):
        assert same(parsed, value)
        assert same(parse_json(dumps(parsed)), value)
