"""Mappings: which table syncs to which collection, and how a row becomes a document.

A mapping names a table, the column holding each record's key, a collection, and fields (a
column of the same name, another column, or an SQL expression), each with a Typesense type.
Rows are validated on our side, so the index holds exactly what SQLite holds and the error in
`sync_errors` names the field: a value of the wrong type is refused, never guessed.

Each mapping compiles to SQL that SQLite answers with the finished JSON line of every valid row
(`line_sql`): the daemon's hot path only joins bytes. `document`/`line` do the same in Python:
the reference the SQL is tested against (tests/test_mapping.py, with `verdict_sql`, the same
judgement in SQL), and what judges the rows SQLite leaves out (invalid ones, text that is not
UTF-8, arrays with escapes), with the message that names the field.
"""

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from outbox_sync.errors import InvalidRecordError

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
BOUNDS = {"int32": INT32, "int64": INT64}
SCALARS = ("string", "int32", "int64", "float", "bool")
TYPES = (*SCALARS, *(f"{t}[]" for t in SCALARS))
# Typesense has no hard limit, but a megabyte of text in one field is a bug upstream, not a
# record; a document id that long is one too.
MAX_TEXT_BYTES = 64 * 1024
MAX_ID_BYTES = 1024
MAX_DOUBLE = "1.7976931348623157e308"  # in SQL
# Characters of a text value quoted in a message.
SHOWN_CHARS = 40
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
BUILT_IN = "the built-in mapping"  # the origin of the mapping no file declares
# A JSON path no document has (field names are identifiers): json_remove leaves it be, where
# a NULL path would make the whole line NULL.
NO_PATH = "'$.\"' || char(1) || '\"'"


# A row as `Database.read_rows` reads it: (key, SQLite's line, ()), or, for a row left to the
# Python mapper, (key, None, its raw values: the key, then one per field).
Found = tuple[Any, bytes | None, Sequence[Any]]


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


@dataclass(frozen=True)
class Field:
    """One field of the documents: a Typesense type, and where its value comes from."""

    name: str
    type: str
    column: str | None = None  # default: the column of the field's name
    sql: str | None = None  # an SQL expression over the table's row, instead of a column
    facet: bool = False
    sort: bool | None = None  # None: Typesense's default for the type
    optional: bool = False
    index: bool = True
    infix: bool = False
    locale: str = ""

    @property
    def source(self) -> str:
        """The SQL that reads the value."""
        return f"({self.sql})" if self.sql else quote_identifier(self.column or self.name)

    @property
    def element(self) -> str:
        return self.type.removesuffix("[]")

    @property
    def array(self) -> bool:
        return self.type.endswith("[]")

    def schema(self) -> dict[str, Any]:
        """The field as the collection declares it (the keys we set)."""
        declared: dict[str, Any] = {"name": self.name, "type": self.type}
        for key in ("facet", "optional", "infix"):
            if getattr(self, key):
                declared[key] = True
        if self.sort is not None:
            declared["sort"] = self.sort
        if not self.index:
            declared["index"] = False
        if self.locale:
            declared["locale"] = self.locale
        return declared


@dataclass(frozen=True)
class Dependency:
    """A table whose rows feed a mapping's documents (e.g. through an `sql` field): a change of
    one of its rows re-syncs the document whose key its `key` column holds."""

    table: str
    key: str


@dataclass(frozen=True)
class Mapping:
    table: str
    key: str
    collection: str
    fields: tuple[Field, ...]
    where: str | None = None
    depends_on: tuple[Dependency, ...] = ()
    default_sorting_field: str | None = None
    name: str = ""  # how outbox rows name the mapping: the table's name unless given
    key_kind: str = "integer"  # "integer" or "text", as the key column's declared type says
    origin: str = BUILT_IN  # for messages: "config.toml, [[sync]] 2"

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.table)

    # -- the collection -------------------------------------------------------------------------

    def collection_schema(self, name: str) -> dict[str, Any]:
        """The body that creates the collection (`id` is implicit and always a string)."""
        schema: dict[str, Any] = {"name": name, "fields": [f.schema() for f in self.fields]}
        if self.default_sorting_field:
            schema["default_sorting_field"] = self.default_sorting_field
        return schema

    def against(self, declared: Sequence[dict[str, Any]]) -> tuple["Mapping", list[str]]:
        """This mapping as an existing collection's fields let it be, and what keeps them from
        taking our documents. A collection is used as it is when it differs only where values
        can still be checked against it: int32 for int64 or the reverse (the collection's
        range is the one checked), or a required field the mapping allows NULL in (a NULL is
        then a validation error naming the field)."""
        actual = {f["name"]: f for f in declared}
        problems, fields = [], []
        for wanted in self.fields:
            field_ = actual.get(wanted.name)
            if field_ is None:
                problems.append(f"field {wanted.name} is missing")
                fields.append(wanted)
                continue
            kind = str(field_.get("type"))
            compatible = {kind, wanted.type} <= {"int32", "int64"} or {
                kind,
                wanted.type,
            } <= {"int32[]", "int64[]"}
            if kind != wanted.type and not compatible:
                problems.append(f"field {wanted.name} has type={kind!r}, expected {wanted.type!r}")
            for key, value in wanted.schema().items():
                if key not in ("name", "type", "optional") and field_.get(key) != value:
                    problems.append(
                        f"field {wanted.name} has {key}={field_.get(key)!r}, expected {value!r}"
                    )
            if not field_.get("optional", False) and wanted.optional:
                wanted = replace(wanted, optional=False)  # NULL: a validation error
            elif field_.get("optional", False) and not wanted.optional:
                pass  # the collection allows more than we send
            fields.append(replace(wanted, type=kind if compatible else wanted.type))
        ours = {f.name for f in self.fields}
        for name, field_ in actual.items():
            if name not in ours and name not in (".*", "id") and not field_.get("optional"):
                problems.append(
                    f"field {name} is required by the collection but the mapping has none"
                )
        return replace(self, fields=tuple(fields)), problems

    # -- a row, in Python: the reference ---------------------------------------------------------

    def document_id(self, key: Any) -> str | None:
        """The document id of a key, or None when no document can have it."""
        try:
            return self._id(key)
        except InvalidRecordError:
            return None

    def key_problem(self, key: Any) -> str | None:
        """Why no document can have this key (None: one can)."""
        try:
            self._id(key)
        except InvalidRecordError as error:
            return str(error)
        return None

    def _id(self, key: Any) -> str:
        if self.key_kind == "integer":
            if type(key) is int:
                return str(key)
            raise InvalidRecordError(self.key, f"expected an integer, got {describe(key)}")
        if isinstance(key, str):
            text = key
        elif type(key) is RawText:
            text = _decode(self.key, key)
        else:
            raise InvalidRecordError(self.key, f"expected text, got {describe(key)}")
        if not text:
            raise InvalidRecordError(self.key, "is empty, which Typesense cannot hold as an id")
        if len(text.encode()) > MAX_ID_BYTES:
            raise InvalidRecordError(
                self.key, f"is {len(text.encode())} bytes, more than the limit of {MAX_ID_BYTES}"
            )
        return text

    def document(self, row: Sequence[Any]) -> dict[str, Any]:
        """The document for a row (key, then one value per field, read raw); raises
        InvalidRecordError naming the first field that cannot be indexed."""
        document: dict[str, Any] = {"id": self._id(row[0])}
        for field_, value in zip(self.fields, row[1:], strict=True):
            if value is None:
                if not field_.optional:
                    raise InvalidRecordError(field_.name, "is NULL but the field is required")
                continue
            document[field_.name] = _value(field_, value)
        return document

    def judge(self, found: Found) -> bytes:
        """The line of a row as `Database.read_rows` gives it: SQLite's line, or, for a row it
        left to this mapper, the line of its raw values. Raises InvalidRecordError."""
        _, line, row = found
        return line if line is not None else self.line(row)

    def line(self, row: Sequence[Any]) -> bytes:
        """The document's JSONL line, byte for byte what `line_sql` makes SQLite write."""
        return encode(self.document(row))

    def describe_row(self, row: Sequence[Any]) -> str:
        """The row as JSON for `sync_errors`, when it could not become a document."""
        names = (self.key, *(f.name for f in self.fields))
        return json.dumps(
            {name: _jsonable(value) for name, value in zip(names, row, strict=True)},
            ensure_ascii=False,
        )

    # -- a row, in SQL: the hot path -------------------------------------------------------------

    def columns(self) -> str:
        """The key and the fields' values, in the order `document` takes them."""
        return ", ".join([quote_identifier(self.key), *(f.source for f in self.fields)])

    def verdict_sql(self) -> str:
        """SQL: why the row cannot be indexed, the text `document` raises (NULL: it can)."""
        key = quote_identifier(self.key)
        checks = [_key_check(key, self.key, self.key_kind), *(_check(f) for f in self.fields)]
        return "COALESCE(" + ", ".join(checks) + ")"

    def line_sql(self) -> str:
        """SQL: the JSON line of a valid row, byte for byte what `line` writes; NULL where the
        Python mapper must judge the row: an invalid one (`verdict_sql`), and one with an array
        whose text holds an escape (json_each would keep "\\u00e9" escaped, and cut a string at
        an escaped NUL). The verdict is asked once and the line made only for a valid row: this
        is the drain's per-row work (docs/performance.md)."""
        key = quote_identifier(self.key)
        pairs = [sql_text("id"), key if self.key_kind == "text" else f"CAST({key} AS TEXT)"]
        for field_ in self.fields:
            pairs += [sql_text(field_.name), _json_value(field_)]
        line = "json_object(" + ", ".join(pairs) + ")"
        optional = [f for f in self.fields if f.optional]
        if optional:  # an optional NULL is left out of the document, not sent as null
            dropped = ", ".join(
                f"CASE WHEN {f.source} IS NULL THEN {sql_text('$.' + json.dumps(f.name))}"
                f" ELSE {NO_PATH} END"
                for f in optional
            )
            # json_remove parses the line again: only for a row that has such a NULL
            nulls = " OR ".join(f"{f.source} IS NULL" for f in optional)
            line = f"CASE WHEN {nulls} THEN json_remove({line}, {dropped}) ELSE {line} END"
        plain = "".join(
            f" AND coalesce(instr({f.source}, '\\'), 0) = 0" for f in self.fields if f.array
        )
        return f"CASE WHEN {self.verdict_sql()} IS NULL{plain} THEN {line} END"

    def select_by_keys(self, columns: str) -> str:
        """`columns` of the rows of these keys (a JSON array, the only parameter) that the
        mapping covers."""
        where = f" AND ({self.where})" if self.where else ""
        return (
            f"SELECT {columns} FROM {quote_identifier(self.table)}"
            f" WHERE {quote_identifier(self.key)} IN (SELECT value FROM json_each(?)){where}"
        )

    # -- triggers --------------------------------------------------------------------------------

    def triggers(self) -> list["Trigger"]:
        """The triggers that write this mapping's outbox entries, as SQLite keeps their text."""
        own = self.table if self.name == self.table else f"{self.table}_{self.name}"
        made = _table_triggers(f"{own}_outbox", self.table, self.name, self.key, dependency=False)
        for dep in self.depends_on:
            made += _table_triggers(
                f"{dep.table}_outbox_{self.name}", dep.table, self.name, dep.key, dependency=True
            )
        return made

    @property
    def tables(self) -> tuple[str, ...]:
        return (self.table, *(d.table for d in self.depends_on))


@dataclass(frozen=True)
class Trigger:
    name: str
    table: str
    sql: str  # as SQLite keeps it: without IF NOT EXISTS


def _table_triggers(
    prefix: str, table: str, mapping: str, key: str, *, dependency: bool
) -> list[Trigger]:
    """Insert, update and delete triggers on `table` writing (mapping, key, op) outbox entries.

    On the mapping's own table a change of key is a delete of the old document and an upsert
    of the new one. On a table it depends on, each change is an upsert of the documents its
    old and new keys name (the daemon reads the document's rows when it applies the entry: a
    record that is gone is deleted whatever the op), and a NULL key names no document."""
    name, column, into = (
        sql_text(mapping),
        quote_identifier(key),
        "outbox (mapping, record_key, op)",
    )

    def entry(row: str, op: str, condition: str = "") -> str:
        if dependency:
            condition += f" {'AND' if condition else 'WHERE'} {row}.{column} IS NOT NULL"
        return f"    INSERT INTO {into} SELECT {name}, {row}.{column}, '{op}'{condition};\n"

    gone = "upsert" if dependency else "delete"
    bodies = {
        "insert": entry("NEW", "upsert"),
        "update": entry("OLD", gone, f" WHERE OLD.{column} IS NOT NEW.{column}")
        + entry("NEW", "upsert"),
        "delete": entry("OLD", gone),
    }
    on = quote_identifier(table)
    return [
        Trigger(
            f"{prefix}_{event}",
            table,
            f"CREATE TRIGGER {prefix}_{event} AFTER {event.upper()} ON {on}\nBEGIN\n{body}END",
        )
        for event, body in bodies.items()
    ]


# -- values: Python -------------------------------------------------------------------------------


def _value(field_: Field, value: Any) -> Any:
    if not field_.array:
        return _scalar(field_.name, field_.element, value)
    if type(value) is not RawText:
        raise InvalidRecordError(
            field_.name, f"expected a JSON array (text), got {describe(value)}"
        )
    try:  # NaN and Infinity are no JSON, as SQLite's json_valid says too
        items = json.loads(_decode(field_.name, value), parse_constant=_no_constant)
    except ValueError:
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
        return _decode(name, value)
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


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _element(field_: Field, position: int, item: Any) -> Any:
    """One element of a JSON array, judged as json_each sees it (SQLite reads an integer past
    int64 as a real)."""
    kind = field_.element
    if type(item) is int and not INT64[0] <= item <= INT64[1]:
        try:
            item = float(item)
        except OverflowError:  # past the largest double too: SQLite reads Inf
            item = math.inf if item > 0 else -math.inf
    if kind == "string":
        ok = isinstance(item, str) and len(item.encode()) <= MAX_TEXT_BYTES
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


def _decode(name: str, value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError as error:
        raise InvalidRecordError(
            name, f"is not valid UTF-8 (bad byte at offset {error.start})"
        ) from None


# -- values: SQL ----------------------------------------------------------------------------------


def _key_check(key: str, name: str, kind: str) -> str:
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


def _check(field_: Field) -> str:
    """The verdict of one field's value (NULL: it is fine)."""
    v, name = field_.source, field_.name
    null = "NULL" if field_.optional else sql_text(f"{name}: is NULL but the field is required")
    said = sql_text(f"{name}: ")
    if field_.array:
        return (
            f"CASE WHEN {v} IS NULL THEN {null}"
            f" WHEN typeof({v}) != 'text' THEN {said} || 'expected a JSON array (text), got ' ||"
            f" {_describe_sql(v)}"
            f" WHEN NOT json_valid({v}) OR json_type({v}) != 'array' THEN {said} ||"
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
    if kind in BOUNDS:
        low, high = BOUNDS[kind]
        return f"e.type = 'integer' AND e.value BETWEEN {low} AND {high}"
    if kind == "float":
        return f"e.type IN ('integer', 'real') AND NOT {_not_finite('e.value')}"
    return "e.type IN ('true', 'false')"


def _not_finite(v: str) -> str:
    """Not finite as SQLite writes it (see `_finite`): Inf, or one of the largest doubles."""
    return (
        f"(abs({v}) > 1.7976931348623e308 AND (abs({v}) > {MAX_DOUBLE}"
        f" OR abs(CAST({v} || '' AS REAL)) > {MAX_DOUBLE}))"
    )


def _json_value(field_: Field) -> str:
    v = field_.source
    if field_.array:
        # Rebuilt element by element, so it is written as the mapper writes it (an array with
        # an escape in its text is left to the mapper: see `line_sql`).
        element = "json(e.type)" if field_.element == "bool" else "e.value"
        return f"(SELECT json_group_array({element}) FROM json_each({v}) AS e)"
    if field_.element == "bool":
        return f"json(CASE WHEN {v} THEN 'true' ELSE 'false' END)"
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
        " WHEN 'integer' THEN 'integer ' || e.value WHEN 'real' THEN 'real ' || e.value"
        " ELSE 'an ' || e.type END"
    )


# -- describing values, as SQLite people say them ------------------------------------------------


def real_text(value: float) -> str:
    """A REAL as SQLite writes it in text and JSON (printf's %!.15g)."""
    text = f"{value:.15g}"
    if text in ("-0", "0"):
        return "0.0"
    mantissa, e, exponent = text.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return mantissa + (f"e{exponent}" if e else "")


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


def _jsonable(value: Any) -> Any:
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


# -- the built-in mapping: the source document's `sequences` --------------------------------------

SEQUENCES = Mapping(
    table="sequences",
    key="id",
    collection="sequences",
    fields=(
        Field("element_type", "string", facet=True),
        Field("element_id", "int32"),
        Field("sequence_number", "int32", sort=True),
        Field("comment", "string", optional=True),
        Field("created_at", "string", sort=True),
    ),
    default_sorting_field="sequence_number",
)
# The columns read from `sequences` by the built-in mapping, in this order.
COLUMNS = ("id", *(f.name for f in SEQUENCES.fields))


def key_kind(declared_type: str) -> str:
    """A key column's kind from its declared type: INTEGER affinity, or text."""
    return "integer" if "INT" in declared_type.upper() else "text"


def field_names(mapping: Mapping) -> list[str]:
    return [f.name for f in mapping.fields]


__all__ = [
    "COLUMNS",
    "SEQUENCES",
    "Dependency",
    "Field",
    "Mapping",
    "RawText",
    "Trigger",
    "describe",
    "encode",
    "field",
]
