"""Values: how one SQLite value becomes a JSON value of a document, twice over.

In Python (`value`, `encode`), the reference, which also says what is wrong with a value in
words that name the field; and in SQL (`check_sql`, `json_value_sql`), the hot path, which
must judge and write every value exactly as the reference does, byte for byte and word for
word (tests/test_mapping.py). Values are described as SQLite people say them: NULL, integer 7,
real 1.5, text 'abc', a BLOB of 3 bytes. `mapping.py` puts them together into documents.
"""

import json
import math
import sqlite3
import threading
from typing import TYPE_CHECKING, Any

from outbox_sync.errors import InvalidRecordError

if TYPE_CHECKING:
    from outbox_sync.mapping import Field

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
BOUNDS = {"int32": INT32, "int64": INT64}
# Typesense has no hard limit, but a megabyte of text in one field is a bug upstream, not a
# record; a document id that long is one too.
MAX_TEXT_BYTES = 64 * 1024
MAX_ID_BYTES = 1024
MAX_DOUBLE = "1.7976931348623157e308"  # in SQL
# Characters of a text value quoted in a message.
SHOWN_CHARS = 40


class RawText(bytes):
    """A TEXT value as SQLite stored it (rows are read with this text factory): bytes, so that
    invalid UTF-8 becomes a record error and not a crash, and a type of its own, so that a BLOB
    (plain bytes) in a text column is told apart."""


def quote_identifier(name: str) -> str:
    """A table or column name in SQL. Backticks, not double quotes: SQLite takes a
    double-quoted name that names no column for a string literal, so a column dropped under the
    daemon would be indexed as its own name instead of failing."""
    return "`" + name.replace("`", "``") + "`"


def sql_text(text: str) -> str:
    """A string literal of SQL, as SQLite's quote() writes it."""
    return "'" + text.replace("'", "''") + "'"


# -- values: Python -------------------------------------------------------------------------------


def json_value(field_: "Field", value: Any) -> Any:
    """The JSON value of a field's non-NULL raw value; raises InvalidRecordError naming it."""
    if not field_.array:
        return _scalar(field_.name, field_.element, value)
    if type(value) is not RawText:
        raise InvalidRecordError(
            field_.name, f"expected a JSON array (text), got {describe(value)}"
        )
    try:  # NaN and Infinity are no JSON, as SQLite's json_valid says too
        items = json.loads(
            decode(field_.name, value), parse_constant=_no_constant, parse_int=_integer
        )
    except (ValueError, RecursionError):  # nested deeper than Python reads: not an array here
        items = None
    if not isinstance(items, list):
        raise InvalidRecordError(field_.name, f"expected a JSON array, got {describe(value)}")
    return [_element(field_, position, item) for position, item in enumerate(items)]


def _scalar(name: str, kind: str, value: Any) -> Any:
    if kind == "string":
        if type(value) is not RawText:
            raise InvalidRecordError(name, f"expected text, got {describe(value)}")
        if len(value) > MAX_TEXT_BYTES:
            raise InvalidRecordError(
                name, f"is {len(value)} bytes, more than the limit of {MAX_TEXT_BYTES}"
            )
        return decode(name, value)
    if kind in BOUNDS:
        if type(value) is not int:
            raise InvalidRecordError(name, f"expected an integer, got {describe(value)}")
        low, high = BOUNDS[kind]
        if not low <= value <= high:
            raise InvalidRecordError(name, f"{value} is outside the range {low}..{high}")
        return value
    if kind == "float":
        if type(value) not in (int, float):
            raise InvalidRecordError(name, f"expected a number, got {describe(value)}")
        if not _finite(value):
            raise InvalidRecordError(name, f"is {describe(value)}, not a finite number")
        return value
    if type(value) is not int or value not in (0, 1):  # bool: SQLite has 0 and 1
        raise InvalidRecordError(name, f"expected 0 or 1 (false or true), got {describe(value)}")
    return bool(value)


def _finite(value: float) -> bool:
    """Finite as it is written: with 15 digits, which round the largest doubles up past the
    largest (1.7976931348623157e308 is written 1.79769313486232e+308, which reads back as Inf:
    Typesense refuses the line)."""
    return math.isfinite(value) and math.isfinite(float(real_text(value)))


def _integer(text: str) -> int | float:
    """An integer literal: past 4000 digits (Python's int() refuses 4300) as the REAL Inf
    json_each reads it as (`_element` makes any past int64 a REAL)."""
    return float(text) if len(text) > 4000 else int(text)


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _element(field_: "Field", position: int, item: Any) -> Any:
    """One element of a JSON array, judged as json_each sees it (SQLite reads an integer past
    int64 as a real)."""
    kind = field_.element
    if isinstance(item, str):
        try:
            size = len(item.encode())
        except UnicodeEncodeError:  # "\\ud83d": half an emoji, escaped, which UTF-8 cannot
            # hold: the daemon could neither encode nor record it, and stopped at every start
            shown = item.encode("utf-8", "backslashreplace").decode()
            raise InvalidRecordError(
                field_.name,
                f"element {position} is text {sql_text(_shown(shown))} with a lone surrogate, "
                "which UTF-8 cannot hold",
            ) from None
    if type(item) is int and not INT64[0] <= item <= INT64[1]:
        try:
            item = float(item)
        except OverflowError:  # past the largest double too: SQLite reads Inf
            item = math.inf if item > 0 else -math.inf
    if kind == "string":
        ok = isinstance(item, str) and size <= MAX_TEXT_BYTES
    elif kind in BOUNDS:
        ok = type(item) is int and BOUNDS[kind][0] <= item <= BOUNDS[kind][1]
    elif kind == "float":
        ok = type(item) in (int, float) and _finite(item)
    else:
        ok = type(item) is bool
    if not ok:
        raise InvalidRecordError(
            field_.name, f"element {position} is {_describe_json(item)}, expected {kind}"
        )
    return item


def decode(name: str, value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError as error:
        raise InvalidRecordError(
            name, f"is not valid UTF-8 (bad byte at offset {error.start})"
        ) from None


# -- values: SQL ----------------------------------------------------------------------------------


def key_check_sql(key: str, name: str, kind: str) -> str:
    if kind == "integer":
        return (
            f"CASE WHEN typeof({key}) != 'integer' THEN "
            f"{sql_text(name + ': expected an integer, got ')} || {_describe_sql(key)} END"
        )
    size = f"length(CAST({key} AS BLOB))"
    return (
        f"CASE WHEN typeof({key}) != 'text' THEN "
        f"{sql_text(name + ': expected text, got ')} || {_describe_sql(key)}"
        f" WHEN {key} = '' THEN"
        f" {sql_text(name + ': is empty, which Typesense cannot hold as an id')}"
        f" WHEN {size} > {MAX_ID_BYTES} THEN {sql_text(name + ': is ')} || {size}"
        f" || {sql_text(f' bytes, more than the limit of {MAX_ID_BYTES}')} END"
    )


def check_sql(field_: "Field") -> str:
    """The verdict of one field's value (NULL: it is fine)."""
    v, name = field_.source, field_.name
    null = "NULL" if field_.optional else sql_text(f"{name}: is NULL but the field is required")
    said = sql_text(f"{name}: ")
    if field_.array:
        return (
            f"CASE WHEN {v} IS NULL THEN {null}"
            f" WHEN typeof({v}) != 'text' THEN {said} || 'expected a JSON array (text), got ' ||"
            f" {_describe_sql(v)}"
            # SQLite's JSON functions read a text up to a NUL: '["a"]' || char(0) || 'x' is no
            # JSON array, as the mapper says, and was sent as ["a"] (found by a hostile review).
            # No rare branch can tell: one more scan of the text, ~2 % of a two-array line
            f" WHEN NOT json_valid({v}) OR json_type({v}) != 'array' OR instr({v}, char(0))"
            f" THEN {said} ||"
            f" 'expected a JSON array, got ' || {_describe_sql(v)}"
            f" ELSE (SELECT {said} || 'element ' || e.key || ' is ' || {_describe_json_sql()} ||"
            f" {sql_text(', expected ' + field_.element)} FROM json_each({v}) AS e"
            f" WHERE NOT ({_element_ok(field_.element)}) ORDER BY e.key LIMIT 1) END"
        )
    kind = field_.element
    if kind == "string":
        size = f"length(CAST({v} AS BLOB))"
        rest = (
            f" WHEN typeof({v}) != 'text' THEN {said} || 'expected text, got ' ||"
            f" {_describe_sql(v)}"
            f" WHEN {size} > {MAX_TEXT_BYTES} THEN {said} || 'is ' || {size} ||"
            f" {sql_text(f' bytes, more than the limit of {MAX_TEXT_BYTES}')}"
        )
    elif kind in BOUNDS:
        low, high = BOUNDS[kind]
        rest = (
            f" WHEN typeof({v}) != 'integer' THEN {said} || 'expected an integer, got ' ||"
            f" {_describe_sql(v)}"
            f" WHEN {v} NOT BETWEEN {low} AND {high} THEN {said} || {v} ||"
            f" {sql_text(f' is outside the range {low}..{high}')}"
        )
    elif kind == "float":
        rest = (
            f" WHEN typeof({v}) NOT IN ('integer', 'real') THEN {said} ||"
            f" 'expected a number, got ' || {_describe_sql(v)}"
            f" WHEN {_not_finite(v)} THEN {said} || 'is ' ||"
            f" {_describe_sql(v)} || ', not a finite number'"
        )
    else:  # bool
        rest = (
            f" WHEN typeof({v}) != 'integer' OR {v} NOT IN (0, 1) THEN {said} ||"
            f" 'expected 0 or 1 (false or true), got ' || {_describe_sql(v)}"
        )
    return f"CASE WHEN {v} IS NULL THEN {null}{rest} END"


def _element_ok(kind: str) -> str:
    if kind == "string":
        return f"e.type = 'text' AND length(CAST(e.value AS BLOB)) <= {MAX_TEXT_BYTES}"
    if kind == "int64":
        # json_each reads an integer past int64 as a REAL, and BETWEEN took one just below
        # -2**63, which rounds to it, for -2**63 (found by a hostile review)
        return "e.type = 'integer' AND typeof(e.value) = 'integer'"
    if kind == "int32":
        low, high = INT32
        return f"e.type = 'integer' AND e.value BETWEEN {low} AND {high}"
    if kind == "float":
        return f"e.type IN ('integer', 'real') AND NOT {_not_finite('e.value')}"
    return "e.type IN ('true', 'false')"


def _not_finite(v: str) -> str:
    """Not finite as SQLite writes it (see `_finite`): Inf, or one of the largest doubles."""
    # no abs() of the value: abs(-9223372036854775808) is SQLite's "integer overflow" error
    return (
        f"(({v} > 1.7976931348623e308 OR {v} < -1.7976931348623e308) AND ({v} > {MAX_DOUBLE}"
        f" OR {v} < -{MAX_DOUBLE} OR abs(CAST({v} || '' AS REAL)) > {MAX_DOUBLE}))"
    )


def json_value_sql(field_: "Field") -> str:
    v = field_.source
    if field_.array:
        # Rebuilt element by element, so it is written as the mapper writes it (an array with
        # an escape in its text is left to the mapper: see `line_sql`).
        element = "json(e.type)" if field_.element == "bool" else "e.value"
        return f"(SELECT json_group_array({element}) FROM json_each({v}) AS e)"
    if field_.element == "bool":
        return f"json(CASE WHEN {v} THEN 'true' ELSE 'false' END)"
    if field_.element == "string" and field_.from_json:
        # `|| ''` drops the JSON subtype of a text SQLite's JSON functions made (json_extract of
        # an object, in an `sql` field or a generated column): json_object wrote it as an object
        # where the mapper writes a string (found by a hostile review)
        return f"({v} || '')"
    return v


def _describe_sql(v: str) -> str:
    return (
        f"CASE typeof({v}) WHEN 'null' THEN 'NULL' WHEN 'integer' THEN 'integer ' || {v}"
        f" WHEN 'real' THEN 'real ' || {v} WHEN 'text' THEN 'text ' ||"
        f" quote(substr({v}, 1, {SHOWN_CHARS})) ELSE 'a BLOB of ' || length({v}) || ' bytes' END"
    )


def _describe_json_sql() -> str:
    return (
        "CASE e.type WHEN 'null' THEN 'null' WHEN 'true' THEN 'true' WHEN 'false' THEN 'false'"
        f" WHEN 'text' THEN 'text ' || quote(substr(e.value, 1, {SHOWN_CHARS}))"
        " WHEN 'integer' THEN iif(typeof(e.value) = 'real', 'real ', 'integer ') || e.value"
        " WHEN 'real' THEN 'real ' || e.value"
        " ELSE 'an ' || e.type END"
    )


# -- describing values, as SQLite people say them ------------------------------------------------


_printer = threading.local()  # SQLite, for `real_text`


def real_text(value: float) -> str:
    """A REAL as SQLite writes it in text and JSON (%!.15g), asked of SQLite: its printf, in long
    double, rounds some 15-digit ties otherwise than Python (7473829253676535.0: ...653e+15)."""
    if not hasattr(_printer, "connection"):  # a connection serves one thread
        _printer.connection = sqlite3.connect(":memory:")
    (text,) = _printer.connection.execute("SELECT CAST(? AS TEXT)", (value,)).fetchone()
    return str(text)


def describe(value: Any) -> str:
    """NULL, integer 7, real 1.5, text 'abc', a BLOB of 3 bytes."""
    if value is None:
        return "NULL"
    if type(value) is int:
        return f"integer {value}"
    if type(value) is float:
        return f"real {real_text(value) if math.isfinite(value) else _inf(value)}"
    if type(value) is RawText or isinstance(value, str):
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        return f"text {sql_text(_shown(text))}"
    if isinstance(value, bytes):
        return f"a BLOB of {len(value)} bytes"
    return f"{type(value).__name__} {value!r}"


def _shown(text: str) -> str:
    """The start of a text, as SQLite's quote(substr(x, 1, 40)) shows it (it stops at a NUL)."""
    return text[:SHOWN_CHARS].split("\x00", 1)[0]


def _inf(value: float) -> str:
    return "Inf" if value > 0 else "-Inf"


def shown_key(key: Any) -> Any:
    """A record key as our JSON output shows it to people: an infinite REAL (a key column that
    is not the rowid may hold one), which no JSON number is, as the text SQLite writes for it.
    Never read back as a key (SQLite is given keys by `db.keys_json`)."""
    return _inf(key) if type(key) is float and math.isinf(key) else key


def _describe_json(item: Any) -> str:
    if item is None:
        return "null"
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, str):
        return f"text {sql_text(_shown(item))}"
    if isinstance(item, int):
        return f"integer {item}"
    if isinstance(item, float):
        return f"real {real_text(item) if math.isfinite(item) else _inf(item)}"
    return "an array" if isinstance(item, list) else "an object"


def jsonable(value: Any) -> Any:
    if type(value) is not RawText and isinstance(value, bytes):
        return f"<BLOB of {len(value)} bytes>"
    if isinstance(value, bytes):
        text = value.decode("utf-8", "replace")
        return text if len(text) <= 200 else text[:200] + "…"
    if isinstance(value, float) and not math.isfinite(value):
        return _inf(value)
    return value


# -- encoding, as SQLite's json_object does ------------------------------------------------------


def encode(document: dict[str, Any]) -> bytes:
    """One JSONL line (without the newline): compact, non-ASCII as it is, numbers as SQLite
    writes them, so that the line is byte for byte what `Mapping.line_sql` gives."""
    return _encode(document).encode()


def _encode(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{_quote(k)}:{_encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_encode(item) for item in value) + "]"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return real_text(value)
    return str(value)


_quote = json.encoder.encode_basestring
