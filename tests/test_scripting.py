"""Behaviour of rule-chain JavaScript run through edgectl.scripting, on real V8."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from edgectl.errors import ScriptError
from edgectl.scripting import ScriptFunction, ScriptOutcome

REPO = Path(__file__).resolve().parents[1]

TRANSFORM = """
msg.temperature = msg.temperature * 1.8 + 32;
metadata.unit = "F";
return {msg: msg, metadata: metadata, msgType: "FAHRENHEIT_" + msgType};
"""


@pytest.fixture
def make_function():
    functions: list[ScriptFunction] = []

    def make(body: str, **options) -> ScriptFunction:
        function = ScriptFunction(body, **options)
        functions.append(function)
        return function

    yield make
    for function in functions:
        function.close()


def test_filter_returns_true_or_false_per_message(make_function):
    function = make_function("return msg.temperature > 20;", name="hot")

    outcomes = function.call_batch(
        [({"temperature": 25}, {}, "POST"), ({"temperature": 5}, {}, "POST")]
    )

    assert outcomes == [ScriptOutcome(value=True), ScriptOutcome(value=False)]


def test_transform_returns_changed_msg_metadata_and_type(make_function):
    function = make_function(TRANSFORM)

    outcome = function.call({"temperature": 20}, {"deviceName": "d1"}, "TELEMETRY")

    assert outcome == ScriptOutcome(
        value={
            "msg": {"temperature": 68},
            "metadata": {"deviceName": "d1", "unit": "F"},
            "msgType": "FAHRENHEIT_TELEMETRY",
        }
    )


def test_undefined_return_gives_none(make_function):
    function = make_function("var seen = msg.a;")

    assert function.call({"a": 1}, {}, "POST") == ScriptOutcome(value=None)


def test_throwing_message_gets_error_while_neighbours_succeed(make_function):
    function = make_function(
        'if (msg.id === 2) {\n  throw new Error("bad reading " + msg.id);\n}\n'
        "return msg.id * 10;"
    )

    outcomes = function.call_batch([({"id": n}, {}, "POST") for n in (1, 2, 3)])

    assert outcomes == [
        ScriptOutcome(value=10),
        ScriptOutcome(error="Error: bad reading 2 (line 2 of the script)"),
        ScriptOutcome(value=30),
    ]


def test_thrown_non_error_value_is_reported_as_text(make_function):
    function = make_function('throw "no thanks";')

    assert function.call({}, {}, "POST") == ScriptOutcome(error="no thanks")


def test_endless_loop_times_out_quickly_and_function_still_works(make_function):
    function = make_function(
        "while (msg.loop) {}\nreturn msg.id;", name="looper", timeout_ms=100
    )
    batch = [({"id": 1}, {}, "T"), ({"id": 2, "loop": True}, {}, "T")]
    batch += [({"id": 3}, {}, "T")]

    started = time.monotonic()
    outcomes = function.call_batch(batch)
    elapsed = time.monotonic() - started

    assert outcomes == [
        ScriptOutcome(value=1),
        ScriptOutcome(error="script ran longer than 100 ms"),
        ScriptOutcome(value=3),
    ]
    # One batch stopped at the limit, then the stuck message alone: 2 x 100 ms.
    assert elapsed < 0.8
    assert function.call({"id": 4}, {}, "T") == ScriptOutcome(value=4)


def test_loop_in_a_single_call_costs_one_time_limit(make_function):
    function = make_function("while (true) {}", timeout_ms=100)

    started = time.monotonic()
    outcome = function.call({}, {}, "T")

    assert outcome == ScriptOutcome(error="script ran longer than 100 ms")
    assert time.monotonic() - started < 0.5


def test_slow_batch_over_the_limit_still_gives_every_result(make_function):
    # Each message takes about 20 ms, so the batch as a whole passes the 100 ms
    # limit, but no single message does.
    function = make_function(
        "var end = Date.now() + 20; while (Date.now() < end) {}\nreturn msg.id;",
        timeout_ms=100,
    )

    outcomes = function.call_batch([({"id": n}, {}, "T") for n in range(12)])

    assert outcomes == [ScriptOutcome(value=n) for n in range(12)]


def test_allocation_bomb_gives_memory_error_and_function_still_works(make_function):
    function = make_function(
        "var kept = [];\n"
        "while (msg.bomb) { kept.push('x'.repeat(100) + kept.length); }\n"
        "return msg.id;",
        timeout_ms=5000,
        max_memory_bytes=16 * 1024 * 1024,
    )
    batch = [({"id": 1}, {}, "T"), ({"id": 2, "bomb": True}, {}, "T")]
    batch += [({"id": 3}, {}, "T")]

    outcomes = function.call_batch(batch)

    assert outcomes == [
        ScriptOutcome(value=1),
        ScriptOutcome(error="script used more than 16 MB of memory"),
        ScriptOutcome(value=3),
    ]
    assert function.call({"id": 4}, {}, "T") == ScriptOutcome(value=4)


def test_syntax_error_raises_script_error_naming_the_line(make_function):
    with pytest.raises(ScriptError) as caught:
        make_function("var limit = 20;\nreturn msg.temperature > limit +;", name="hot")

    assert str(caught.value) == (
        "script 'hot' does not compile: SyntaxError: Unexpected token ';' "
        "at line 2 of the script:\n"
        "    return msg.temperature > limit +;\n"
        "                                    ^\n"
        "Fix the JavaScript there; the script is the body of "
        "function(msg, metadata, msgType)."
    )


def test_unclosed_bracket_is_reported_at_the_end_of_the_script(make_function):
    with pytest.raises(ScriptError) as caught:
        make_function("if (msg.a) {\n  return true;", name="open")

    assert str(caught.value) == (
        "script 'open' does not compile: SyntaxError: Unexpected token ')' "
        "at the end of the script (is a closing bracket missing?)\n"
        "Fix the JavaScript there; the script is the body of "
        "function(msg, metadata, msgType)."
    )


def test_body_cannot_close_the_function_early(make_function):
    with pytest.raises(ScriptError, match="does not compile"):
        make_function("}); globalThis.leak = 1; (function() {")


def test_unicode_keys_and_values_round_trip(make_function):
    function = make_function(
        'msg["größe"] = msg["温度"] + "°";\n'
        'metadata["ключ"] = "значение \\u2028 ✓";\n'
        "return {msg: msg, metadata: metadata, msgType: msgType};"
    )

    outcome = function.call({"温度": "21,5", "emoji": "🌡"}, {"név": "ő"}, "ÜBER")

    assert outcome == ScriptOutcome(
        value={
            "msg": {"温度": "21,5", "emoji": "🌡", "größe": "21,5°"},
            "metadata": {"név": "ő", "ключ": "значение \u2028 ✓"},
            "msgType": "ÜBER",
        }
    )


def test_scripts_do_not_see_each_others_globals(make_function):
    writer = make_function("globalThis.shared = msg.secret; return true;")
    reader = make_function("return typeof shared;")

    writer.call({"secret": "s3cret"}, {}, "T")

    assert reader.call({}, {}, "T") == ScriptOutcome(value="undefined")


def test_script_that_replaces_json_cannot_break_other_messages(make_function):
    function = make_function(
        "JSON.parse = function () { return 1; };\n"
        "JSON.stringify = function () { return 'broken'; };\n"
        "Array.prototype.join = function () { return ''; };\n"
        "return msg.id;"
    )

    outcomes = function.call_batch([({"id": n}, {}, "T") for n in range(3)])
    outcomes += function.call_batch([({"id": 9}, {}, "T")])

    assert [outcome.value for outcome in outcomes] == [0, 1, 2, 9]


def test_value_json_cannot_hold_gives_error(make_function):
    function = make_function("var loop = {}; loop.self = loop; return loop;")

    outcome = function.call({}, {}, "T")

    assert outcome.error is not None
    assert outcome.error.startswith("TypeError: Converting circular structure to JSON")


def test_message_that_is_not_json_gets_error_without_stopping_others(make_function):
    function = make_function("return msg.id;")

    outcomes = function.call_batch(
        [({"id": 1}, {}, "T"), ({"id": 2**70}, {}, "T"), ({"id": 3}, {}, "T")]
    )

    assert outcomes == [
        ScriptOutcome(value=1),
        ScriptOutcome(
            error="message cannot be sent to the script: Integer exceeds 64-bit range"
        ),
        ScriptOutcome(value=3),
    ]


def test_integers_beyond_2_to_the_53_lose_precision_as_documented(make_function):
    function = make_function("return msg.counter;")

    outcome = function.call({"counter": 2**53 + 1}, {}, "T")

    assert outcome == ScriptOutcome(value=2**53)


def test_empty_batch_gives_no_outcomes(make_function):
    assert make_function("return 1;").call_batch([]) == []


def test_closed_function_gives_error_outcomes_and_close_is_idempotent():
    function = ScriptFunction("return 1;", name="gone")

    function.close()
    function.close()

    assert function.call({}, {}, "T") == ScriptOutcome(
        error="script 'gone' was closed before it ran this message"
    )


def test_close_from_another_thread_stops_a_long_batch_early():
    function = ScriptFunction("while (true) {}", name="spin", timeout_ms=100)
    outcomes: list[ScriptOutcome] = []
    runner = threading.Thread(
        target=lambda: outcomes.extend(function.call_batch([({}, {}, "T")] * 30))
    )

    runner.start()
    time.sleep(0.25)
    started = time.monotonic()
    function.close()
    runner.join(timeout=5)

    assert time.monotonic() - started < 0.5
    assert len(outcomes) == 30
    assert outcomes[0] == ScriptOutcome(error="script ran longer than 100 ms")
    assert outcomes[-1] == ScriptOutcome(
        error="script 'spin' was closed before it ran this message"
    )


# The next tests run a real interpreter: mini-racer can hang Python at exit
# after a timed-out call when the isolate is still open during finalisation.

TIMED_OUT_THEN = """
import os, signal, sys, time
from edgectl.scripting import ScriptFunction, close_all

class Node:
    def __init__(self):
        self.script = ScriptFunction("while (msg.loop) {} return 1;", timeout_ms=50)
        self.cycle = self  # freed only by the collector at interpreter exit

node = Node()
print(node.script.call({"loop": True}, {}, "T").error, flush=True)
"""


def run_python(code: str, **options) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **options,
    )


def test_process_exits_cleanly_after_a_timed_out_script():
    process = run_python(TIMED_OUT_THEN)

    stdout, stderr = process.communicate(timeout=10)

    assert process.returncode == 0, stderr
    assert stdout == "script ran longer than 50 ms\n"
    assert stderr == ""


SIGTERM_HANDLER = """
def stop(signum, frame):
    close_all()
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
"""


def test_sigterm_handler_calling_close_all_exits_after_a_timed_out_script():
    process = run_python(
        TIMED_OUT_THEN + SIGTERM_HANDLER + "print('ready', flush=True)\ntime.sleep(60)"
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "script ran longer than 50 ms\n"
    assert process.stdout.readline() == "ready\n"

    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=10)

    assert process.returncode == 0, stderr
    assert stderr == ""


LOOPING_WHEN_SIGNALLED = """
import signal, sys
from edgectl.scripting import ScriptFunction, close_all

script = ScriptFunction("while (true) {}", timeout_ms=1000)
"""


def test_sigterm_during_a_looping_script_exits_within_the_time_limit():
    process = run_python(
        LOOPING_WHEN_SIGNALLED
        + SIGTERM_HANDLER
        + "print('looping', flush=True)\n"
        + "script.call({}, {}, 'T')\n"
        + "print('not interrupted', flush=True)\n"
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "looping\n"
    time.sleep(0.2)

    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=10)

    assert process.returncode == 0, stderr
    assert stdout == ""
    assert time.monotonic() - started < 2


def test_close_all_closes_every_open_function():
    # In a child process, because close_all would also close functions that
    # other tests in this process hold.
    process = run_python(
        """
        from edgectl.scripting import ScriptFunction, close_all
        functions = [ScriptFunction("return 1;", name=str(n)) for n in range(2)]
        close_all()
        for function in functions:
            print(function.call({}, {}, "T").error)
        """
    )

    stdout, stderr = process.communicate(timeout=10)

    assert stderr == ""
    assert stdout == (
        "script '0' was closed before it ran this message\n"
        "script '1' was closed before it ran this message\n"
    )
