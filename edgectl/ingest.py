"""Read historical telemetry from CSV-like files and post it to an edge.

A file is described by an ``IngestMapping``: how lines split into fields, which
columns hold the time and the device, and which strings mean "no value". The
mapping comes from a small YAML file (``load_mapping``), from a guess at the
file's shape (``sniff_mapping``), or from command-line options.

``read_rows`` streams the file as ``Reading`` and ``RowProblem`` items. A reading
holds typed values: integers become ``int``, decimals ``float`` and anything else
stays the trimmed text. ``ingest_http`` posts the readings through ThingsBoard's
device API (``POST /api/v1/{token}/telemetry``) of a running edge, and
``summarize_file`` counts what it would post without sending anything.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import email.utils
import itertools
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Final
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import orjson
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from edgectl.engine import Engine, Run
from edgectl.errors import IngestError
from edgectl.message import POST_TELEMETRY_REQUEST, EntityRef, Message
from edgectl.storage import DEVICE, Store

logger = logging.getLogger(__name__)

Value = int | float | str

EPOCH_MS: Final = "epoch_ms"
EPOCH_S: Final = "epoch_s"
MAX_PROBLEMS_KEPT: Final = 100
_LAYOUT_ROWS: Final = 50

SEPARATOR_NAMES: Final = {
    "comma": ",",
    "semicolon": ";",
    "tab": "\t",
    "space": " ",
    "pipe": "|",
}

_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_DECIMAL_COMMA_FIELD = re.compile(r"[+-]?[0-9]+,[0-9]+")
_DECIMAL_POINT_FIELD = re.compile(r"[+-]?[0-9]+\.[0-9]+")
_LONG_MIN: Final = -(2**63)
_LONG_MAX: Final = 2**63 - 1
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)


# --- the mapping -----------------------------------------------------------------


class _BadMappingValue(IngestError):
    """A mapping field has a wrong value; ``key`` names the field."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class IngestMapping:
    """How to read one telemetry file.

    ``separator`` is one character (``" "`` also swallows runs of spaces).
    ``decimal_comma`` reads ``2,6`` as 2.6. Without a header, ``columns`` names
    the fields (else they are ``column_1``, ``column_2``, ...); with a header,
    ``columns`` replaces the header's names. The time is the
    ``timestamp_columns`` joined by one space and parsed with
    ``timestamp_format``: a ``strptime`` format read in ``timezone`` unless it
    has ``%z``, or ``epoch_ms`` / ``epoch_s``. Each value of ``device_column``
    is a device (named ``device_prefix`` + value); without it every row belongs
    to ``device_name``, by default the file's stem. ``skip_columns`` are not
    sent, nor are columns with an empty name, and a field equal to one of
    ``missing_values`` (as text or as a number) counts as missing.

    Raises IngestError (naming the field) when a value is impossible.
    """

    separator: str = ","
    decimal_comma: bool = False
    has_header: bool = True
    columns: tuple[str, ...] = ()
    timestamp_columns: tuple[str, ...] = ("ts",)
    timestamp_format: str = EPOCH_MS
    timezone: str = "UTC"
    device_column: str | None = None
    device_name: str | None = None
    device_prefix: str = ""
    device_type: str = "default"
    skip_columns: tuple[str, ...] = ()
    missing_values: tuple[str, ...] = ()
    encoding: str = "utf-8-sig"

    def __post_init__(self) -> None:
        _check_separator(self)
        _check_timestamp(self)
        _check_device(self)
        _check_names(self)
        _check_encoding(self.encoding)


def _check_separator(mapping: IngestMapping) -> None:
    separator = mapping.separator
    if len(separator) != 1 or separator in '"\r\n':
        raise _BadMappingValue(
            "separator",
            f"{separator!r} is not one character other than a quote or newline; "
            "use for example ';', ',', 'tab' or 'space'",
        )
    if mapping.decimal_comma and separator == ",":
        raise _BadMappingValue(
            "decimal_comma",
            "cannot be true when the separator is ','; set the real separator",
        )


def _check_timestamp(mapping: IngestMapping) -> None:
    if not mapping.timestamp_columns:
        raise _BadMappingValue("timestamp_columns", "name at least one column")
    fmt = mapping.timestamp_format
    is_epoch = fmt in (EPOCH_MS, EPOCH_S)
    if not is_epoch and "%" not in fmt:
        raise _BadMappingValue(
            "timestamp_format",
            f"{fmt!r} is neither epoch_ms, epoch_s nor a strptime format; "
            "write for example '%Y-%m-%d %H:%M:%S'",
        )
    if is_epoch and len(mapping.timestamp_columns) != 1:
        raise _BadMappingValue(
            "timestamp_columns", f"{fmt} needs exactly one timestamp column"
        )
    _zone(mapping.timezone)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise _BadMappingValue(
            "timezone",
            f"{name!r} is not an IANA time zone name; "
            "use one such as 'UTC', 'Europe/Rome' or 'Etc/GMT-1'",
        ) from None


def _check_device(mapping: IngestMapping) -> None:
    if mapping.device_column is not None and mapping.device_name is not None:
        raise _BadMappingValue(
            "device_name", "give either device_column or device_name, not both"
        )
    if mapping.device_name == "" or mapping.device_type == "":
        key = "device_name" if mapping.device_name == "" else "device_type"
        raise _BadMappingValue(key, "must not be empty")
    if mapping.device_column in mapping.timestamp_columns:
        raise _BadMappingValue(
            "device_column", "is also a timestamp column; pick another column"
        )


def _check_names(mapping: IngestMapping) -> None:
    repeated = [name for name, n in Counter(mapping.columns).items() if n > 1 and name]
    if repeated:
        raise _BadMappingValue(
            "columns", f"{repeated[0]!r} appears twice; column names must be unique"
        )


def _check_encoding(encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise _BadMappingValue(
            "encoding", f"{encoding!r} is not a known text encoding; try 'latin-1'"
        ) from None


def parse_separator(text: str) -> str:
    """Return the separator character for ``text``: a name from
    ``SEPARATOR_NAMES`` (``tab``, ``space``, ...), ``\\t``, or the character
    itself. The result is checked when an ``IngestMapping`` is built."""
    if text == "\\t":
        return "\t"
    return SEPARATOR_NAMES.get(text.lower(), text)


# --- mapping files ---------------------------------------------------------------


def load_mapping(
    path: str | Path, *, base: IngestMapping | None = None
) -> IngestMapping:
    """Read a YAML mapping file whose keys are ``IngestMapping`` field names.

    Keys the file leaves out keep their value from ``base`` (for example a
    sniffed mapping), or the defaults. Lists may be written as one string.
    Returns the mapping. Raises IngestError led by ``file:line:col`` and naming
    the key when the file cannot be read, is not YAML, has an unknown key or a
    bad value.
    """
    path = Path(path)
    document = _read_yaml(path)
    options = _convert_all(path, document)
    try:
        return replace(base or IngestMapping(), **options)
    except _BadMappingValue as error:
        raise IngestError(f"{_where(path, document, error.key)}: {error}") from None


def _read_yaml(path: Path) -> CommentedMap:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise IngestError(f"{path}: cannot read the mapping file: {error}") from error
    try:
        # The round-trip loader keeps source positions for messages and, like
        # the safe loader, never builds Python objects from tags.
        document = YAML(typ="rt").load(text)
    except MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise IngestError(f"{where}: not valid YAML: {error.problem}") from error
    except YAMLError as error:
        raise IngestError(f"{path}: not valid YAML: {error}") from error
    return _as_mapping(path, document)


def _as_mapping(path: Path, document: object) -> CommentedMap:
    if document is None:
        return CommentedMap()
    if not isinstance(document, CommentedMap):
        raise IngestError(
            f"{path}:1:1: a mapping file holds 'key: value' lines, "
            f"but this one holds a {type(document).__name__}"
        )
    return document


def _where(
    path: Path, document: CommentedMap, key: str, *, at_value: bool = True
) -> str:
    if key not in document:
        return f"{path}:1:1"
    line, column = document.lc.value(key) if at_value else document.lc.key(key)
    return f"{path}:{line + 1}:{column + 1}"


def _convert_all(path: Path, document: CommentedMap) -> dict[str, Any]:
    """Convert every key, raising one IngestError that lists every bad key in
    file order."""
    options: dict[str, Any] = {}
    problems: list[str] = []
    for key in document:
        try:
            options[str(key)] = _convert(path, document, key)
        except IngestError as error:
            problems.append(str(error))
    if problems:
        raise IngestError("\n".join(problems))
    return options


def _convert(path: Path, document: CommentedMap, key: object) -> Any:
    converter = _CONVERTERS.get(key) if isinstance(key, str) else None
    if converter is None:
        raise IngestError(
            f"{_where(path, document, str(key), at_value=False)}: "
            f"unknown key {key!r}; {_known_keys_hint(str(key))}"
        )
    value = document[key]
    try:
        return converter(value)
    except ValueError as error:
        raise IngestError(
            f"{_where(path, document, str(key))}: {key}: {error} (got {value!r})"
        ) from None


def _known_keys_hint(key: str) -> str:
    close = difflib.get_close_matches(key, _CONVERTERS, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return "known keys are " + ", ".join(sorted(_CONVERTERS))


def _as_text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("expected a string")
    return str(value)


def _as_optional_text(value: object) -> str | None:
    return None if value is None else _as_text(value)


def _as_flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _as_texts(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    try:
        return tuple(_as_text(item) for item in items)
    except ValueError:
        raise ValueError("expected a string or a list of strings") from None


def _as_separator(value: object) -> str:
    return parse_separator(_as_text(value))


_CONVERTERS: Final[dict[str, Callable[[object], Any]]] = {
    "separator": _as_separator,
    "decimal_comma": _as_flag,
    "has_header": _as_flag,
    "columns": _as_texts,
    "timestamp_columns": _as_texts,
    "timestamp_format": _as_text,
    "timezone": _as_text,
    "device_column": _as_optional_text,
    "device_name": _as_optional_text,
    "device_prefix": _as_text,
    "device_type": _as_text,
    "skip_columns": _as_texts,
    "missing_values": _as_texts,
    "encoding": _as_text,
}


# --- values and timestamps -------------------------------------------------------


def typed_value(text: str, *, decimal_comma: bool = False) -> Value | None:
    """Return the value of one field: ``None`` when it is empty, an ``int`` when
    it is an integer (within ThingsBoard's 64-bit long), a ``float`` when it is
    a decimal or exponent number, else the text. Surrounding spaces are
    dropped; with ``decimal_comma`` one comma is the decimal mark."""
    text = text.strip()
    if not text:
        return None
    number = text.replace(",", ".") if decimal_comma else text
    if _INTEGER.fullmatch(number):
        return _integer(number, text)
    if _DECIMAL.fullmatch(number):
        value = float(number)
        return value if value - value == 0 else text
    return text


def _integer(number: str, text: str) -> Value:
    # Python refuses int() past 4,300 digits, and ThingsBoard stores integers
    # outside a Java long as strings, so such a field stays text.
    if len(number) > 20:
        return text
    value = int(number)
    return value if _LONG_MIN <= value <= _LONG_MAX else text


def _timestamp_parser(mapping: IngestMapping) -> Callable[[str], int]:
    fmt = mapping.timestamp_format
    if fmt in (EPOCH_MS, EPOCH_S):
        scale = 1 if fmt == EPOCH_MS else 1000
        return lambda text: _epoch_ms(text, scale, mapping.decimal_comma)
    zone = _zone(mapping.timezone)
    return lambda text: _wall_time_ms(text, fmt, zone)


def _epoch_ms(text: str, scale: int, decimal_comma: bool) -> int:
    value = typed_value(text, decimal_comma=decimal_comma)
    if isinstance(value, int):
        return value * scale
    if isinstance(value, float):
        return round(value * scale)
    unit = "milliseconds" if scale == 1 else "seconds"
    raise ValueError(f"timestamp {text!r} is not a number of {unit} since 1970")


def _wall_time_ms(text: str, fmt: str, zone: ZoneInfo) -> int:
    try:
        moment = datetime.strptime(text, fmt)
    except ValueError:
        raise ValueError(
            f"timestamp {text!r} does not match the format {fmt!r}"
        ) from None
    if moment.tzinfo is None:
        moment = _localize(moment, zone)
    return (moment - _EPOCH) // _ONE_MS


def _localize(moment: datetime, zone: ZoneInfo) -> datetime:
    aware = moment.replace(tzinfo=zone)
    # A wall time inside a daylight-saving gap does not exist; zoneinfo would
    # quietly give it the instant of another row, which then overwrites it.
    if aware.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != moment:
        raise ValueError(
            f"local time {moment.isoformat(' ')} does not exist in {zone.key} "
            "(a daylight-saving gap); if the file's clock ignores daylight "
            "saving, use a fixed-offset zone such as 'Etc/GMT-1'"
        )
    return aware


# --- rows ------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """One data row: its line number (1-based), device, time in epoch ms, the
    typed values to send and the names of the columns whose value is missing
    (empty or a ``missing_values`` sentinel)."""

    line: int
    device: str
    ts: int
    values: dict[str, Value]
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class RowProblem:
    """A data row that cannot be sent: its line number and why."""

    line: int
    reason: str


@dataclass(frozen=True)
class _Blank:
    line: int


_Item = Reading | RowProblem | _Blank


def read_rows(
    path: str | Path, mapping: IngestMapping
) -> Iterator[Reading | RowProblem]:
    """Stream the data rows of ``path`` as ``Reading`` or ``RowProblem`` items.

    The file is read lazily, one line at a time. Lines whose fields are all
    empty are skipped. A row with a bad timestamp, an empty device, too few
    fields or extra non-empty fields becomes a ``RowProblem``; extra empty
    fields at the end of a row are allowed. Raises IngestError, while
    iterating, when the file cannot be opened or decoded or a mapped column is
    not in the file.
    """
    return (item for item in _scan(Path(path), mapping) if not isinstance(item, _Blank))


def _scan(path: Path, mapping: IngestMapping) -> Iterator[_Item]:
    with _open_text(path, mapping) as handle:
        records = _records(handle, path, mapping)
        header = _read_header(records, path) if mapping.has_header else None
        # The layout is decided from the first rows, not the first one alone:
        # one bad row at the top must not shift every column of the file.
        first = list(itertools.islice(records, _LAYOUT_ROWS))
        sample = [row for _line, row in first if not _is_blank(row)]
        parser: _RowParser | None = None
        for line, row in itertools.chain(first, records):
            if _is_blank(row):
                yield _Blank(line)
                continue
            if parser is None:
                names = _column_names(header, sample or [row], mapping)
                parser = _RowParser(_Layout.build(names, path, mapping), path, mapping)
            yield parser.parse(line, row)


def _open_text(path: Path, mapping: IngestMapping) -> IO[str]:
    try:
        # newline="" lets the csv module handle CRLF and quoted line breaks.
        return path.open(encoding=mapping.encoding, newline="")
    except OSError as error:
        raise IngestError(
            f"{path}: cannot open the file: {error.strerror}; check the path"
        ) from error


def _records(
    handle: IO[str], path: Path, mapping: IngestMapping
) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(handle, delimiter=mapping.separator, skipinitialspace=True)
    try:
        start = 1
        for row in reader:
            # A quoted field may span lines; a row is known by its first line.
            yield start, row
            start = reader.line_num + 1
    except csv.Error as error:
        raise IngestError(
            f"{path}:{reader.line_num}: cannot split the line into fields ({error}); "
            "check the separator and quotes there"
        ) from error
    except UnicodeDecodeError as error:
        raise IngestError(
            f"{path}: after line {reader.line_num}: the bytes are not "
            f"{mapping.encoding} text; set encoding (for example latin-1)"
        ) from error


def _is_blank(row: list[str]) -> bool:
    return not any(text.strip() for text in row)


def _read_header(records: Iterator[tuple[int, list[str]]], path: Path) -> list[str]:
    for _line, row in records:
        if not _is_blank(row):
            return [name.strip() for name in row]
    raise IngestError(f"{path}: the file has no header line and no rows")


def _column_names(
    header: list[str] | None, rows: list[list[str]], mapping: IngestMapping
) -> list[str]:
    if mapping.columns:
        return list(mapping.columns)
    if header is None:
        return _auto_names(_usual_width(rows))
    # Like pandas: a header one name short, over rows whose last field is set,
    # means the first column is an unnamed row index. Most rows must say so.
    indexed = sum(1 for row in rows if len(row) == len(header) + 1 and row[-1].strip())
    if indexed > len(rows) // 2:
        return ["", *header]
    return header


def _usual_width(rows: list[list[str]]) -> int:
    widths = Counter(len(row) for row in rows)
    return widths.most_common(1)[0][0] if widths else 0


def _auto_names(count: int) -> list[str]:
    return [f"column_{index}" for index in range(1, count + 1)]


@dataclass(frozen=True)
class _Layout:
    """Field positions of the columns that matter, found once per file."""

    names: tuple[str, ...]
    timestamp_at: tuple[int, ...]
    device_at: int | None
    value_at: tuple[tuple[int, str], ...]
    width: int

    @staticmethod
    def build(names: list[str], path: Path, mapping: IngestMapping) -> _Layout:
        position = _positions(names, path)
        wanted = [*mapping.timestamp_columns, *mapping.skip_columns]
        wanted += [mapping.device_column] if mapping.device_column else []
        for name in wanted:
            _require_column(name, position, path)
        used = {*wanted}
        values = tuple((at, name) for name, at in position.items() if name not in used)
        return _Layout(
            names=tuple(names),
            timestamp_at=tuple(position[name] for name in mapping.timestamp_columns),
            device_at=position.get(mapping.device_column or ""),
            value_at=values,
            width=max(position.values(), default=-1) + 1,
        )


def _positions(names: list[str], path: Path) -> dict[str, int]:
    position: dict[str, int] = {}
    for at, name in enumerate(names):
        if name in position:
            raise IngestError(
                f"{path}: the column name {name!r} appears twice; "
                "give unique names with columns in a mapping file"
            )
        if name:
            position[name] = at
    return position


def _require_column(name: str, position: dict[str, int], path: Path) -> None:
    if name in position:
        return
    raise IngestError(
        f"{path}: no column is named {name!r}; the columns are "
        f"{', '.join(repr(known) for known in position)}. Fix the column name in "
        "the mapping (timestamp_columns, device_column or skip_columns)"
    )


class _RowParser:
    """Turns the fields of one row into a Reading or a RowProblem."""

    def __init__(self, layout: _Layout, path: Path, mapping: IngestMapping) -> None:
        self._layout = layout
        self._timestamp = _timestamp_parser(mapping)
        self._device = mapping.device_name or path.stem
        self._prefix = mapping.device_prefix
        self._decimal_comma = mapping.decimal_comma
        self._missing_text = frozenset(text.strip() for text in mapping.missing_values)
        self._missing_numbers = _sentinel_numbers(mapping)

    def parse(self, line: int, row: list[str]) -> Reading | RowProblem:
        """Return the row as a Reading, or a RowProblem saying what is wrong."""
        problem = self._width_problem(row)
        if problem:
            return RowProblem(line, problem)

        try:
            ts = self._timestamp(self._timestamp_text(row))
        except ValueError as error:
            return RowProblem(line, str(error))

        device = self._device_of(row)
        if not device:
            return RowProblem(line, "the device column is empty")

        values, missing = self._values(row)
        return Reading(line, device, ts, values, missing)

    def _width_problem(self, row: list[str]) -> str | None:
        width = self._layout.width
        if len(row) < width:
            return f"{len(row)} fields, expected {width}"
        if any(text.strip() for text in row[width:]):
            return (
                f"{len(row)} fields, expected {width}: a value after the last "
                "named column (check the separator and quotes on this line)"
            )
        return None

    def _timestamp_text(self, row: list[str]) -> str:
        text = " ".join(row[at].strip() for at in self._layout.timestamp_at)
        if not text.strip():
            raise ValueError("the timestamp is empty")
        return text

    def _device_of(self, row: list[str]) -> str:
        if self._layout.device_at is None:
            return self._device
        name = row[self._layout.device_at].strip()
        return self._prefix + name if name else ""

    def _values(self, row: list[str]) -> tuple[dict[str, Value], tuple[str, ...]]:
        values: dict[str, Value] = {}
        missing: list[str] = []
        for at, name in self._layout.value_at:
            value = self._value(row[at])
            if value is None:
                missing.append(name)
            else:
                values[name] = value
        return values, tuple(missing)

    def _value(self, text: str) -> Value | None:
        if text.strip() in self._missing_text:
            return None
        value = typed_value(text, decimal_comma=self._decimal_comma)
        if isinstance(value, str) or value not in self._missing_numbers:
            return value
        return None


def _sentinel_numbers(mapping: IngestMapping) -> frozenset[int | float]:
    # "-200" must also catch "-200,0": the UCI air-quality file writes both.
    numbers = (
        typed_value(text, decimal_comma=mapping.decimal_comma)
        for text in mapping.missing_values
    )
    return frozenset(value for value in numbers if isinstance(value, int | float))


# --- summaries -------------------------------------------------------------------


@dataclass
class IngestSummary:
    """What an ingest read and sent.

    ``rows_read`` counts non-blank data rows; each is sent (``readings_sent``),
    rejected (``rejected``, with the first ``MAX_PROBLEMS_KEPT`` in
    ``problems``) or has no value left to send (``empty_rows``). ``devices``
    maps each device to its rows sent, ``missing_by_column`` counts empty or
    sentinel fields per column, ``first_ts`` / ``last_ts`` bound the times
    sent (epoch ms) and ``elapsed`` is in seconds.
    """

    rows_read: int = 0
    readings_sent: int = 0
    values_sent: int = 0
    values_missing: int = 0
    blank_lines: int = 0
    rejected: int = 0
    empty_rows: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    devices: dict[str, int] = field(default_factory=dict)
    missing_by_column: dict[str, int] = field(default_factory=dict)
    first_ts: int | None = None
    last_ts: int | None = None
    elapsed: float = 0.0


def _tally(summary: IngestSummary, item: _Item) -> Reading | None:
    """Count one scanned item; return it when it is a reading worth sending."""
    if isinstance(item, _Blank):
        summary.blank_lines += 1
        return None
    summary.rows_read += 1
    if isinstance(item, RowProblem):
        summary.rejected += 1
        if len(summary.problems) < MAX_PROBLEMS_KEPT:
            summary.problems.append(item)
        return None

    summary.values_missing += len(item.missing)
    for name in item.missing:
        summary.missing_by_column[name] = summary.missing_by_column.get(name, 0) + 1
    if not item.values:
        summary.empty_rows += 1
        return None
    return item


def _record_sent(summary: IngestSummary, device: str, batch: list[Reading]) -> None:
    summary.readings_sent += len(batch)
    summary.values_sent += sum(len(reading.values) for reading in batch)
    summary.devices[device] = summary.devices.get(device, 0) + len(batch)
    low = min(reading.ts for reading in batch)
    high = max(reading.ts for reading in batch)
    summary.first_ts = low if summary.first_ts is None else min(summary.first_ts, low)
    summary.last_ts = high if summary.last_ts is None else max(summary.last_ts, high)


def summarize_file(
    path: str | Path,
    mapping: IngestMapping,
    *,
    progress: Callable[[int], None] | None = None,
) -> IngestSummary:
    """Read ``path`` as ``ingest_http`` would and count what it would send,
    without sending anything (a dry run). ``progress(rows)`` is called every
    thousand rows with the rows read so far. Raises IngestError like
    ``read_rows``."""
    started = time.monotonic()
    summary = IngestSummary()
    reported = 0
    for item in _scan(Path(path), mapping):
        reading = _tally(summary, item)
        if reading is not None:
            _record_sent(summary, reading.device, [reading])
        if progress and summary.rows_read - reported >= 1000:
            reported = summary.rows_read
            progress(reported)
    if progress:
        progress(summary.rows_read)
    summary.elapsed = time.monotonic() - started
    return summary


# --- posting to an edge ----------------------------------------------------------

_RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})
_ATTEMPTS: Final = 5
_FIRST_BACKOFF_SECONDS = 0.5
_MAX_WAIT_SECONDS: Final = 30.0
_TIMEOUT: Final = httpx.Timeout(30.0, connect=5.0)
_HINTS: Final = {
    400: "the edge rejected the body; check the mapping's columns and types",
    401: "the device token is not known to this edge; check the token source",
    403: "the edge refused access; check the token source and its permissions",
    404: "check that the URL points at a running edgectl edge",
    413: "the batch is too large; lower the batch size",
}


def ingest_http(
    path: str | Path,
    mapping: IngestMapping,
    *,
    url: str,
    token_for: Callable[[str], str] | None = None,
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
) -> IngestSummary:
    """Post the readings of ``path`` to the edge at ``url``.

    Each device's readings go, ``batch_size`` at a time, to
    ``POST {url}/api/v1/{token}/telemetry`` as ThingsBoard's JSON array of
    ``{"ts": ms, "values": {...}}``. The token is ``token_for(device)``, or
    else the edge's ``POST {url}/api/edgectl/devices`` registers the device
    (or finds it) and returns it. Answers 429, 502, 503 and 504 and
    connection failures are retried with backoff, honouring Retry-After.
    ``progress(rows)`` gets the number of rows read and settled (sent or not
    to be sent) after each request. Returns the summary. Raises IngestError
    for a bad file or mapping, a bad URL or batch size, an edge that stays
    unreachable, or any other error answer (with its status and message).
    Posting the same file again is harmless: the edge keeps the last value
    per device, key and timestamp.
    """
    _check_target(url, batch_size)
    started = time.monotonic()
    summary = IngestSummary()
    with httpx.Client(base_url=url, timeout=_TIMEOUT) as client:
        edge = _Edge(client, url, token_for, mapping.device_type)
        batches = _Batches(edge, summary, batch_size, progress)
        try:
            for item in _scan(Path(path), mapping):
                reading = _tally(summary, item)
                if reading is not None:
                    batches.add(reading)
            batches.flush()
        except IngestError as error:
            if not summary.readings_sent:
                raise
            raise _with_rows_posted(error, summary) from error
    summary.elapsed = time.monotonic() - started
    return summary


def _with_rows_posted(error: IngestError, summary: IngestSummary) -> IngestError:
    return IngestError(
        f"{error}\n{summary.readings_sent} of the rows were posted before this "
        "failure; posting the whole file again is safe"
    )


def _check_target(url: str, batch_size: int) -> None:
    if batch_size < 1:
        raise IngestError(f"batch size must be at least 1, got {batch_size}")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise IngestError(f"edge URL {url!r} is not a URL: {error}") from error
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise IngestError(
            f"edge URL {url!r} must start with http:// or https:// and name a "
            "host, for example http://127.0.0.1:8080"
        )


class _Batches:
    """Collects readings per device and posts each full batch."""

    def __init__(
        self,
        edge: _Edge,
        summary: IngestSummary,
        batch_size: int,
        progress: Callable[[int], None] | None,
    ) -> None:
        self._edge = edge
        self._summary = summary
        self._batch_size = batch_size
        self._progress = progress
        self._pending: dict[str, list[Reading]] = {}
        self._held = 0
        self._reported = -1

    def add(self, reading: Reading) -> None:
        """Queue one reading; post its device's batch once it is full."""
        batch = self._pending.setdefault(reading.device, [])
        batch.append(reading)
        self._held += 1
        if len(batch) >= self._batch_size:
            self._post(reading.device)

    def flush(self) -> None:
        """Post every partly filled batch and report the final progress."""
        for device in list(self._pending):
            self._post(device)
        self._report(self._summary.rows_read)

    def _post(self, device: str) -> None:
        batch = self._pending.pop(device)
        self._edge.post_telemetry(device, batch)
        _record_sent(self._summary, device, batch)
        self._held -= len(batch)
        self._report(self._summary.rows_read - self._held)

    def _report(self, rows_done: int) -> None:
        if self._progress and rows_done != self._reported:
            self._reported = rows_done
            self._progress(rows_done)


class _Edge:
    """The edge's HTTP API: device registration and telemetry upload."""

    def __init__(
        self,
        client: httpx.Client,
        url: str,
        token_for: Callable[[str], str] | None,
        device_type: str,
    ) -> None:
        self._client = client
        self._url = url
        self._token_for = token_for or self._register
        self._device_type = device_type
        self._tokens: dict[str, str] = {}

    def post_telemetry(self, device: str, batch: list[Reading]) -> None:
        """Send one batch of one device's readings."""
        token = self._token(device)
        body = orjson.dumps([{"ts": item.ts, "values": item.values} for item in batch])
        what = f"telemetry for device {device!r}"
        started = time.monotonic()
        response = self._post(f"/api/v1/{quote(token, safe='')}/telemetry", body, what)
        logger.info(
            "posted %d rows of %s to %s: HTTP %d in %.0f ms",
            len(batch),
            device,
            self._url,
            response.status_code,
            (time.monotonic() - started) * 1000,
        )

    def _token(self, device: str) -> str:
        if device not in self._tokens:
            self._tokens[device] = self._token_for(device)
        return self._tokens[device]

    def _register(self, device: str) -> str:
        body = orjson.dumps({"name": device, "type": self._device_type})
        what = f"registering device {device!r}"
        response = self._post("/api/edgectl/devices", body, what)
        try:
            token = orjson.loads(response.content)["token"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise IngestError(
                f"{what}: the answer from {self._url} has no token; "
                "check that the URL points at an edgectl edge"
            )
        logger.debug("device %s is registered on %s", device, self._url)
        return token

    def _post(self, url_path: str, body: bytes, what: str) -> httpx.Response:
        response = _post_with_retry(self._client, url_path, body, what)
        if response.is_success:
            return response
        status = response.status_code
        hint = _HINTS.get(status, "check the edge's log")
        raise IngestError(
            f"{what}: the edge at {self._url} answered HTTP {status}: "
            f"{_server_message(response)}; {hint}"
        )


_Outcome = httpx.Response | httpx.TransportError


def _post_with_retry(
    client: httpx.Client, url_path: str, body: bytes, what: str
) -> httpx.Response:
    # Re-posting a batch after a lost answer is safe: the edge keeps one value
    # per device, key and timestamp, so a repeat overwrites itself.
    for attempt in itertools.count(1):
        outcome = _post_once(client, url_path, body, what)
        if not _is_retryable(outcome):
            assert isinstance(outcome, httpx.Response)
            return outcome
        if attempt >= _ATTEMPTS:
            raise _gave_up(outcome, what, client) from _cause(outcome)
        wait = _retry_wait(outcome, attempt)
        logger.warning(
            "%s failed (%s); retrying in %.1f s, attempt %d of %d",
            what,
            _describe(outcome),
            wait,
            attempt + 1,
            _ATTEMPTS,
        )
        time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover - count() never ends


def _post_once(client: httpx.Client, url_path: str, body: bytes, what: str) -> _Outcome:
    headers = {"content-type": "application/json"}
    try:
        return client.post(url_path, content=body, headers=headers)
    except httpx.TransportError as error:
        if isinstance(error, httpx.UnsupportedProtocol):
            raise IngestError(f"{what}: {error}; check the edge URL") from error
        return error
    except httpx.HTTPError as error:
        raise IngestError(f"{what}: the request failed: {error}") from error


def _is_retryable(outcome: _Outcome) -> bool:
    if isinstance(outcome, httpx.Response):
        return outcome.status_code in _RETRY_STATUSES
    return True


def _retry_wait(outcome: _Outcome, attempt: int) -> float:
    backoff = min(_FIRST_BACKOFF_SECONDS * 2.0 ** (attempt - 1), _MAX_WAIT_SECONDS)
    if not isinstance(outcome, httpx.Response):
        return backoff
    asked = _retry_after_seconds(outcome.headers.get("retry-after"))
    return backoff if asked is None else min(asked, _MAX_WAIT_SECONDS)


def _retry_after_seconds(header: str | None) -> float | None:
    """Read Retry-After as seconds or as an HTTP date (RFC 9110, 10.2.3)."""
    if not header:
        return None
    text = header.strip()
    if _INTEGER.fullmatch(text):
        return max(float(text), 0.0)
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max((moment - datetime.now(UTC)).total_seconds(), 0.0)


def _describe(outcome: _Outcome) -> str:
    if isinstance(outcome, httpx.Response):
        return f"HTTP {outcome.status_code}"
    return f"{type(outcome).__name__}: {outcome}" if str(outcome) else repr(outcome)


def _cause(outcome: _Outcome) -> BaseException | None:
    return outcome if isinstance(outcome, BaseException) else None


def _gave_up(outcome: _Outcome, what: str, client: httpx.Client) -> IngestError:
    return IngestError(
        f"{what}: the edge at {client.base_url} still failed after {_ATTEMPTS} "
        f"attempts ({_describe(outcome)}); check that the edge is running and "
        "reachable, then run the ingest again"
    )


def _server_message(response: httpx.Response) -> str:
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return str(data["message"])
    text = response.text.strip()
    return text[:200] if text else response.reason_phrase or "no message"


# --- guessing a file's shape -----------------------------------------------------

_SNIFF_LINES: Final = 50
_SEPARATORS: Final = (",", ";", "\t", "|", " ")
_DATES: Final = ("%Y-%m-%d", "%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%Y/%m/%d", "%d-%m-%Y")
_TIMES: Final = ("%H:%M:%S", "%H:%M:%S.%f", "%H:%M", "%H.%M.%S")
_DATETIMES: Final = tuple(
    f"{date}{between}{clock}{zone}"
    for date in _DATES
    for between in (" ", "T")
    for clock in _TIMES
    for zone in ("", "%z")
)
_EPOCH_MS_RANGE: Final = (946_684_800_000, 4_102_444_800_000)  # years 2000-2100


def sniff_mapping(path: str | Path) -> IngestMapping:
    """Guess a mapping from the first lines of ``path``.

    Finds the separator (the one giving most fields, consistently), a decimal
    comma, whether the first line is a header (it has no numbers) and the
    timestamp: one column in a common date-time form or epoch ms / s, or a date
    column followed by a time column. Day-first wins when dates are ambiguous,
    the zone is UTC and the device is the file's stem. If no timestamp is
    found, the default ``ts`` column stays and ``read_rows`` will say so.
    Returns the mapping. Raises IngestError if the file cannot be read or is
    empty.
    """
    path = Path(path)
    lines = _sample_lines(path)
    separator = _sniff_separator(lines)
    rows = [row for row in _split(lines, separator) if not _is_blank(row)]
    decimal_comma = separator != "," and _sniff_decimal_comma(rows)
    has_header = _sniff_header(rows, decimal_comma)
    names, data = _sniffed_columns(rows, has_header)
    mapping = IngestMapping(
        separator=separator, decimal_comma=decimal_comma, has_header=has_header
    )
    timestamp = _sniff_timestamp(names, data)
    if timestamp is not None:
        mapping = replace(
            mapping, timestamp_columns=timestamp[0], timestamp_format=timestamp[1]
        )
    logger.debug("guessed the shape of %s: %s", path, mapping)
    return mapping


def _sample_lines(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
            lines = list(itertools.islice(handle, _SNIFF_LINES))
    except OSError as error:
        raise IngestError(
            f"{path}: cannot open the file: {error.strerror}; check the path"
        ) from error
    if not any(line.strip() for line in lines):
        raise IngestError(f"{path}: the file is empty; there is nothing to ingest")
    return lines


def _split(lines: Iterable[str], separator: str) -> list[list[str]]:
    reader = csv.reader(lines, delimiter=separator, skipinitialspace=True)
    try:
        return list(reader)
    except csv.Error:
        return []


def _sniff_separator(lines: list[str]) -> str:
    best, best_score = ",", 0
    for separator in _SEPARATORS:
        widths = [len(row) for row in _split(lines, separator) if not _is_blank(row)]
        # The first line may be a header with a different width.
        body = widths[1:] or widths
        width, count = Counter(body).most_common(1)[0] if body else (0, 0)
        score = width if width > 1 and count >= 0.9 * len(body) else 0
        if score > best_score:
            best, best_score = separator, score
    return best


def _sniff_decimal_comma(rows: list[list[str]]) -> bool:
    texts = [text.strip() for row in rows for text in row]
    commas = sum(1 for text in texts if _DECIMAL_COMMA_FIELD.fullmatch(text))
    points = sum(1 for text in texts if _DECIMAL_POINT_FIELD.fullmatch(text))
    return commas > points


def _sniff_header(rows: list[list[str]], decimal_comma: bool) -> bool:
    def has_number(row: list[str]) -> bool:
        return any(
            isinstance(typed_value(text, decimal_comma=decimal_comma), int | float)
            for text in row
        )

    return bool(rows) and not has_number(rows[0])


def _sniffed_columns(
    rows: list[list[str]], has_header: bool
) -> tuple[list[str], list[list[str]]]:
    if not has_header:
        return _auto_names(_usual_width(rows)), rows
    header = [name.strip() for name in rows[0]]
    data = rows[1:]
    if not data:
        return header, data
    return _column_names(header, data, IngestMapping()), data


def _sniff_timestamp(
    names: list[str], data: list[list[str]]
) -> tuple[tuple[str, ...], str] | None:
    for at, name in enumerate(names):
        column = [row[at].strip() for row in data if at < len(row)]
        if not name or not column:
            continue
        found = _sniff_column_time(column)
        if found:
            return (name,), found
        following = names[at + 1] if at + 1 < len(names) else ""
        clocks = [row[at + 1].strip() for row in data if at + 1 < len(row)]
        split = _sniff_date_and_time(column, clocks) if following else None
        if split:
            return (name, following), split
    return None


def _sniff_column_time(column: list[str]) -> str | None:
    if all(_INTEGER.fullmatch(text) for text in column):
        return _sniff_epoch(column)
    return _first_matching_format(column, _DATETIMES)


def _sniff_epoch(column: list[str]) -> str | None:
    low, high = _EPOCH_MS_RANGE
    numbers = [int(text) for text in column]
    if all(low <= number <= high for number in numbers):
        return EPOCH_MS
    if all(low // 1000 <= number <= high // 1000 for number in numbers):
        return EPOCH_S
    return None


def _sniff_date_and_time(dates: list[str], clocks: list[str]) -> str | None:
    if len(dates) != len(clocks):
        return None
    joined = [f"{date} {clock}" for date, clock in zip(dates, clocks, strict=True)]
    formats = tuple(f"{date} {clock}" for date in _DATES for clock in _TIMES)
    return _first_matching_format(joined, formats)


def _first_matching_format(texts: list[str], formats: tuple[str, ...]) -> str | None:
    for fmt in formats:
        if all(_parses(text, fmt) for text in texts):
            return fmt
    return None


def _parses(text: str, fmt: str) -> bool:
    try:
        datetime.strptime(text, fmt)
    except ValueError:
        return False
    return True


# --- straight into a stopped edge's chain ---------------------------------------


def ingest_store(
    path: str | Path,
    mapping: IngestMapping,
    *,
    store: Store,
    engine: Engine,
    batch_size: int = 5000,
    progress: Callable[[int], None] | None = None,
) -> IngestSummary:
    """Run the readings of ``path`` through a stopped edge's root chain.

    Devices that are new are registered (and announced to the cloud) first;
    each batch is committed in one transaction. Returns the summary. Raises
    IngestError for a bad file or mapping and StorageError if storing fails.
    """
    from edgectl.devices import register_device

    started = time.monotonic()
    summary = IngestSummary()
    pending: list[Reading] = []

    def flush() -> None:
        for reading in pending:
            register_device(store, reading.device, type=mapping.device_type)
        run = Run(store=store)
        engine.run([_message(store, reading) for reading in pending], run)
        store.apply(run.changes)
        for device in dict.fromkeys(reading.device for reading in pending):
            _record_sent(summary, device, [r for r in pending if r.device == device])
        pending.clear()
        if progress:
            progress(summary.rows_read)

    for item in _scan(Path(path), mapping):
        reading = _tally(summary, item)
        if reading is not None:
            pending.append(reading)
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    summary.elapsed = time.monotonic() - started
    return summary


def _message(store: Store, reading: Reading) -> Message:
    device = store.entity(EntityRef(DEVICE, reading.device))
    kind = device.type if device else "default"
    metadata = {"deviceName": reading.device, "deviceType": kind, "ts": str(reading.ts)}
    entity = EntityRef(DEVICE, reading.device)
    return Message(POST_TELEMETRY_REQUEST, entity, reading.values, metadata)


def build_mapping(
    path: Path, mapping_file: Path | None, given: dict[str, Any]
) -> IngestMapping:
    """The mapping for a file: sniffed, then the mapping file, then options.

    ``given`` holds option values by field name; None means not given.
    Raises IngestError for a bad value, naming the field.
    """
    mapping = sniff_mapping(path)
    if mapping_file is not None:
        mapping = load_mapping(mapping_file, base=mapping)
    chosen = {key: value for key, value in given.items() if value is not None}
    return replace(mapping, **chosen) if chosen else mapping
