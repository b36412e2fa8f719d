"""Typed values: JSON parsing that keeps numbers exact, and ThingsBoard's value kinds.

A reading's type follows its JSON spelling, never its content:

- ``true``/``false`` are booleans;
- an integer within 64 bits is a long, exactly (``9007199254740993`` survives);
- a number written with a decimal point or an exponent is a double (``1.0``);
  digits beyond what a double holds are rounded to the nearest double, as
  every JSON parser does;
- an integer beyond 64 bits is kept as json: its exact digits are stored as the
  JSON text of a number, so reading it back as JSON gives the same number;
- a string stays a string byte for byte (``"00042"``, ``"true"``, ``"12e3"``);
- objects and arrays are json;
- null is rejected for that key, with the reason.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import orjson

BOOLEAN, LONG, DOUBLE, STRING, JSON = 0, 1, 2, 3, 4
TYPE_NAMES = ("boolean", "long", "double", "string", "json")
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
# Every digit maps to "0", so a run of 19 or more digits becomes a run of 19
# zeros: one C-speed pass, several times faster than a regex over digit runs.
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_RUN = b"0" * 19


class ValueRejected(ValueError):
    """A value that cannot be stored; the message says why."""


class JsonSyntaxError(ValueError):
    """Text that is not valid JSON; the message says where."""


def _reject_constant(name: str) -> Any:
    raise JsonSyntaxError(f"{name} is not valid JSON; send a number or a string")


def _finite_float(text: str) -> float:
    # The standard parser reads 1e400 as infinity; orjson refuses it, and both
    # paths must agree on what is JSON.
    number = float(text)
    if not math.isfinite(number):
        raise JsonSyntaxError(f"number {text} is too large for a double")
    return number


def parse_json(raw: bytes | str) -> Any:
    """Parse JSON text, keeping integers of any size exact.

    Raises JsonSyntaxError for anything that is not strict JSON (NaN and
    Infinity included), for a number too large for a double, for an integer of
    more than 4300 digits and for a string holding a lone UTF-16 surrogate
    (such as ``"\\ud800"``), which is no Unicode character and cannot be stored.
    """
    # surrogatepass: a str may hold lone surrogates (from a command line with
    # bytes that are not UTF-8); the parser then refuses them as bad UTF-8.
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    # orjson turns integers beyond 64 bits into doubles and loses digits; a run of
    # 19 or more digits is the only way to spell one, so such text takes the
    # slower standard parser, which keeps them exact.
    if _LONG_RUN not in data.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as error:
            raise _syntax_error(data, error) from None
    return _parse_exact(data)


def _parse_exact(data: bytes) -> Any:
    try:
        value = json.loads(
            data, parse_constant=_reject_constant, parse_float=_finite_float
        )
    except JsonSyntaxError:
        raise
    except RecursionError:
        raise _too_deep() from None
    except ValueError as error:
        # Python refuses to convert integers of more than 4300 digits (a guard
        # against quadratic time); its message would tell a user to call
        # sys.set_int_max_str_digits, so say it plainly instead.
        if "integer string conversion" in str(error):
            raise JsonSyntaxError(
                "an integer has more than 4300 digits; send it as a string"
            ) from None
        raise JsonSyntaxError(str(error)) from None
    # The standard parser accepts lone surrogate escapes that orjson refuses;
    # such a string cannot be encoded as UTF-8, so storing it would fail later.
    _check_encodable(value)
    return value


def _too_deep() -> JsonSyntaxError:
    return JsonSyntaxError("arrays and objects are nested too deeply")


def _check_encodable(value: Any) -> None:
    # A loop, not recursion: the document may be nested almost as deeply as
    # the parser allows.
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                raise JsonSyntaxError(
                    f"string {item!r} holds a lone UTF-16 surrogate, which is not "
                    "a Unicode character"
                ) from None
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


def _syntax_error(data: bytes, error: orjson.JSONDecodeError) -> JsonSyntaxError:
    # orjson's message for NaN or Infinity ("unexpected character") does not
    # name them; the standard parser does, so ask it (this is the error path).
    try:
        json.loads(data, parse_constant=_reject_constant)
    except JsonSyntaxError as named:
        return named
    except RecursionError:
        return _too_deep()
    except ValueError:
        pass
    return JsonSyntaxError(str(error))


def dumps(value: Any) -> str:
    """Serialise to compact JSON text, integers of any size included."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def classify(value: Any) -> tuple[int, Any]:
    """Return ``(kind, stored value)`` for one JSON value.

    Raises ValueRejected for null and for non-finite doubles.
    """
    if value is True or value is False:
        return BOOLEAN, value
    if isinstance(value, int):
        if _LONG_MIN <= value <= _LONG_MAX:
            return LONG, value
        return JSON, str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueRejected(f"{value} is not a finite number")
        return DOUBLE, value
    if isinstance(value, str):
        return STRING, value
    if value is None:
        raise ValueRejected("null is not a value; leave the key out instead")
    if isinstance(value, dict | list):
        return JSON, dumps(value)
    raise ValueRejected(f"unsupported value of type {type(value).__name__}")


def decode(kind: int, stored: Any) -> Any:
    """The JSON value for a stored ``(kind, value)`` pair."""
    if kind == JSON:
        return parse_json(stored)
    return stored


def is_timestamped(item: Any) -> bool:
    """True for ThingsBoard's ``{"ts": ..., "values": {...}}`` form."""
    return isinstance(item, dict) and "ts" in item and "values" in item


def telemetry_groups(
    data: Any, default_ts: int
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Split a telemetry body into ``(ts, values)`` groups.

    Accepts a flat object (``default_ts``), ``{"ts":..,"values":{..}}`` or an
    array of either. Raises ValueRejected naming what is wrong.
    """
    items = data if isinstance(data, list) else [data]
    for index, item in enumerate(items):
        where = f"item {index}: " if isinstance(data, list) else ""
        if not isinstance(item, dict):
            raise ValueRejected(f"{where}expected a JSON object, got {_kind(item)}")
        if not is_timestamped(item):
            yield default_ts, item
            continue
        yield _check_ts(item["ts"], where), _check_values(item["values"], where)


def _check_ts(ts: Any, where: str) -> int:
    if isinstance(ts, bool) or not isinstance(ts, int | float) or ts != ts:
        raise ValueRejected(f"{where}ts must be epoch milliseconds, got {ts!r}")
    if not 0 <= ts < 2**53:
        raise ValueRejected(f"{where}ts {ts!r} is out of range")
    return int(ts)


def _check_values(values: Any, where: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ValueRejected(f"{where}values must be a JSON object, got {_kind(values)}")
    return values


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"
