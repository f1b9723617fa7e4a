"""The mapping's two halves agree: the SQL each mapping compiles to (SQLite writes the JSON line,
the daemon's hot path, or says why not) and the Python mapper (the reference) give the same bytes
and the same verdicts for random rows of every type, odd text, out-of-range values and REALs that
SQLite's printf (in long double) rounds otherwise than Python included. And the trigger
generator writes exactly what schema.sql holds for the built-in mapping."""

import json
import math
import re
import sqlite3
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from outbox_sync import schema
from outbox_sync.db import written
from outbox_sync.errors import InvalidRecordError
from outbox_sync.mapping import SEQUENCES, TYPES, Field, Mapping
from outbox_sync.schema import schema_statements
from outbox_sync.values import INT32, INT64, MAX_TEXT_BYTES, RawText, describe, encode, real_text

# One field of every type, required and optional.
FIELDS = tuple(
    Field(
        f"f_{kind.replace('[]', '_array')}_{'opt' if optional else 'req'}", kind, optional=optional
    )
    for kind in TYPES
    for optional in (False, True)
)


def mapping(key_kind: str) -> Mapping:
    return Mapping(
        table="t", key="k", collection="c", fields=FIELDS, key_kind=key_kind, origin="the test"
    )


LARGEST = sys.float_info.max
# SQLite's printf writes these with 15 digits otherwise than Python's correctly rounded format
# does: a tie (7.47382925367653|5e+15: ...53e+15, not ...54) and a near one (...525037e+203)
ROUNDED_OTHERWISE = [7473829253676535.0, -1.226857469049525e203]
texts = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=5),
    st.sampled_from(["", "it's", 'q"uote', "back\\slash", "\x00nul", "\u2028", "é", "`tick`"]),
)
odd_bytes = st.binary(max_size=6)  # as TEXT: often not UTF-8
integers = st.one_of(
    st.integers(min_value=INT64[0], max_value=INT64[1]),
    st.sampled_from([INT32[0] - 1, INT32[0], INT32[1], INT32[1] + 1, INT64[0], INT64[1], 0, 1, 2]),
)
reals = st.one_of(
    st.floats(allow_nan=False),
    st.sampled_from([0.1, 1e20, -0.0, 1e-7, 2.0**53, math.inf, -math.inf, 1.5, 100.0]),
    st.sampled_from([LARGEST, -LARGEST, 1.79769313486231e308]),  # 15 digits: Inf, finite
    st.sampled_from(ROUNDED_OTHERWISE),
)
json_items = st.one_of(
    st.none(),
    st.booleans(),
    integers,
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([LARGEST, -LARGEST, *ROUNDED_OTHERWISE]),
    texts,
)
arrays = st.one_of(
    st.lists(json_items, max_size=4).map(json.dumps),
    st.lists(texts, max_size=3).map(json.dumps),
    st.lists(integers, max_size=3).map(json.dumps),
    st.lists(st.booleans(), max_size=3).map(json.dumps),
    st.sampled_from(["[]", "[1,", "{}", "5", '"x"', "[[1]]", '["a\\u00e9"]', "[1e400]"]),
    st.sampled_from([f"[{INT64[0] - 1}]", f"[{INT64[1] + 1}]"]),  # read as REALs
    st.sampled_from(['["a"]\x00x', "[1]\x00", "[true] \x00 [false]"]),  # JSON up to a NUL
)
# A value as the application may have stored it: (kind, value) for the insert.
values = st.one_of(
    st.none().map(lambda v: ("value", v)),
    integers.map(lambda v: ("value", v)),
    reals.map(lambda v: ("value", v)),
    texts.map(lambda v: ("value", v)),
    arrays.map(lambda v: ("value", v)),
    odd_bytes.map(lambda v: ("text", v)),  # bytes stored as TEXT
    odd_bytes.map(lambda v: ("value", v)),  # a BLOB
    st.just(("value", "x" * (MAX_TEXT_BYTES + 1))),
)


def stored(conn: sqlite3.Connection, cells: list[tuple[str, Any]]) -> tuple[Any, ...]:
    """Insert one row as given (a typeless table keeps every value as it is), read it back
    raw, and return (key, *values, line, verdict)."""
    conn.execute("DELETE FROM t")
    marks = ", ".join("CAST(? AS TEXT)" if kind == "text" else "?" for kind, _ in cells)
    conn.execute(f"INSERT INTO t VALUES ({marks})", [value for _, value in cells])
    return tuple(conn.execute(query(conn)).fetchone())


def query(conn: sqlite3.Connection) -> str:
    return f"SELECT {MAPPING.columns()}, {MAPPING.line_sql()}, {MAPPING.verdict_sql()} FROM t"


MAPPING = mapping("integer")


@pytest.fixture(scope="module")
def conn() -> sqlite3.Connection:
    connection = sqlite3.connect(":memory:")
    connection.execute(f"CREATE TABLE t (k, {', '.join(f.name for f in FIELDS)})")
    connection.text_factory = RawText
    return connection


VALID = {"string": "s", "int32": 1, "int64": 1, "float": 1.5, "bool": 1}


def valid_but(**changed: Any) -> list[tuple[str, Any]]:
    """A valid row's cells, one per field of FIELDS, but for these fields' values."""
    return [("value", changed.get(f.name, "[]" if f.array else VALID[f.element])) for f in FIELDS]


def one_changed(field_: Field) -> st.SearchStrategy[list[tuple[str, Any]]]:
    """A valid row but for one field's value (an array's drawn as array text): a random row
    is nearly always judged by its first fields alone."""
    drawn = arrays.map(lambda v: ("value", v)) if field_.array else values
    at, valid = FIELDS.index(field_), valid_but()
    return drawn.map(lambda cell: [*valid[:at], cell, *valid[at + 1 :]])


rows = st.one_of(
    st.lists(values, min_size=len(FIELDS), max_size=len(FIELDS)),
    st.sampled_from(FIELDS).flatmap(one_changed),
)


@settings(max_examples=600, deadline=None)
@given(key=st.one_of(values, st.just(("value", 1))), cells=rows)
@example(key=("value", 1), cells=valid_but(f_int64_array_req=f"[{INT64[0] - 1}]"))
@example(key=("value", 1), cells=valid_but(f_string_array_opt='["a"]\x00x'))
@example(
    key=("value", 1),
    cells=valid_but(
        f_float_req=ROUNDED_OTHERWISE[0], f_float_array_opt=json.dumps(ROUNDED_OTHERWISE)
    ),
)
def test_sqlite_and_the_python_mapper_agree(
    conn: sqlite3.Connection, key: tuple[str, Any], cells: list[tuple[str, Any]]
) -> None:
    for key_kind in ("integer", "text"):
        global MAPPING
        MAPPING = mapping(key_kind)
        row = stored(conn, [key, *cells])
        values_, line, verdict = row[:-2], row[-2], row[-1]
        try:
            expected: bytes | str = MAPPING.line(values_)
            assert finite(json.loads(expected))  # as Typesense reads it: Inf is refused
        except InvalidRecordError as error:
            expected = str(error)
        if verdict is None and line is None:  # SQLite left the line to the mapper
            assert isinstance(expected, bytes)
        elif verdict is None:
            try:
                line.decode()
            except UnicodeDecodeError:  # SQLite cannot tell: the mapper must refuse the row
                assert isinstance(expected, str) and "not valid UTF-8" in expected
                continue
            assert line == expected  # the same bytes
        else:
            assert line is None and isinstance(expected, str)
            try:
                said = verdict.decode()
            except UnicodeDecodeError:  # quoting text that is not UTF-8: the mapper's words
                continue
            if "not valid UTF-8" not in expected:  # an earlier field SQLite cannot judge
                assert said == expected  # the same verdict, word for word
        # what the daemon makes of the row (Database.read_rows): the reference's bytes or words
        found = (row[0], line, ()) if written(line) else (row[0], None, values_)
        try:
            assert MAPPING.judge(found) == expected
        except InvalidRecordError as error:
            assert str(error) == expected


@settings(max_examples=200, deadline=None)
@given(key=values, cells=st.lists(values, min_size=len(FIELDS), max_size=len(FIELDS)))
def test_the_audit_s_line_is_the_same_document_with_its_keys_in_order(
    conn: sqlite3.Connection, key: tuple[str, Any], cells: list[tuple[str, Any]]
) -> None:
    stored(conn, [key, *cells])
    lines = f"{MAPPING.line_sql()}, {MAPPING.line_sql(sort_keys=True)}"
    line, ordered = conn.execute(f"SELECT {lines} FROM t").fetchone()
    assert (line is None) == (ordered is None)
    if written(line):
        document = json.loads(ordered)
        assert document == json.loads(line) and list(document) == sorted(document)


def finite(value: Any) -> bool:
    """No number of a JSON value reads as Inf."""
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list):
        return all(finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def test_an_array_whose_text_holds_an_escape_is_left_to_the_mapper() -> None:
    """json_each would keep the escape of "\\u00e9" in the text it gives back: SQLite writes no
    line for such a row (it once wrote "tags":null), and the mapper writes the array."""
    tags = Mapping(table="t", key="k", collection="c", fields=(Field("tags", "string[]"),))
    conn = sqlite3.connect(":memory:")
    conn.text_factory = RawText
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, tags)")
    conn.execute("INSERT INTO t VALUES (1, ?), (2, ?)", (r'["a\u00e9"]', '["b"]'))
    lines = dict(conn.execute(f"SELECT k, {tags.line_sql()} FROM t ORDER BY k").fetchall())
    assert lines == {1: None, 2: b'{"id":"2","tags":["b"]}'}
    row = conn.execute(f"SELECT {tags.columns()} FROM t WHERE k = 1").fetchone()
    assert tags.judge((1, None, row)) == '{"id":"1","tags":["aé"]}'.encode()


def test_each_kind_of_value_is_told_apart() -> None:
    assert [describe(v) for v in (None, 7, 1.5, RawText(b"it's"), b"\x00\x01")] == [
        "NULL",
        "integer 7",
        "real 1.5",
        "text 'it''s'",
        "a BLOB of 2 bytes",
    ]
    assert [real_text(v) for v in (1e20, 0.1, -0.0, 100.0, 1 / 3)] == [
        "1.0e+20",
        "0.1",
        "0.0",
        "100.0",
        "0.333333333333333",
    ]


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        (Field("n", "int32"), 1.5, "n: expected an integer, got real 1.5"),
        (Field("n", "int32"), 2**31, "n: 2147483648 is outside the range"),
        (Field("b", "bool"), 2, "b: expected 0 or 1 (false or true), got integer 2"),
        (Field("w", "float"), RawText(b"x"), "w: expected a number, got text 'x'"),
        (Field("w", "float"), math.inf, "w: is real Inf, not a finite number"),
        (
            Field("w", "float"),
            LARGEST,  # written with 15 digits, it reads back as Inf
            "w: is real 1.79769313486232e+308, not a finite number",
        ),
        (
            Field("w", "float[]"),
            RawText(b"[1.7976931348623157e308]"),
            "w: element 0 is real 1.79769313486232e+308, expected float",
        ),
        (
            Field("w", "float[]"),
            RawText(b"[-1" + b"0" * 400 + b"]"),  # past the largest double
            "w: element 0 is real -Inf, expected float",
        ),
        (Field("t", "string[]"), 5, "t: expected a JSON array (text), got integer 5"),
        (Field("t", "string[]"), RawText(b"a,b"), "t: expected a JSON array, got text 'a,b'"),
        (Field("t", "string[]"), RawText(b'["a", 1]'), "t: element 1 is integer 1"),
        (Field("s", "string"), b"\x00", "s: expected text, got a BLOB of 1 bytes"),
        (Field("s", "string"), RawText(b"\xff"), "s: is not valid UTF-8 (bad byte at offset 0)"),
        (Field("s", "string"), None, "s: is NULL but the field is required"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_field(field: Field, value: Any, problem: str) -> None:
    one = Mapping(table="t", key="k", collection="c", fields=(field,))
    with pytest.raises(InvalidRecordError) as caught:
        one.document((1, value))
    assert str(caught.value).startswith(problem)
    assert caught.value.field == field.name


@pytest.mark.parametrize(
    ("value", "array", "problem"),
    [
        (LARGEST, "[]", "w: is real 1.79769313486232e+308, not a finite number"),
        (-LARGEST, "[]", "w: is real -1.79769313486232e+308, not a finite number"),
        (0.5, f"[{LARGEST!r}]", "ws: element 0 is real 1.79769313486232e+308, expected float"),
        (1.79769313486231e308, "[1.79769313486231e308, -1e308]", None),
    ],
)
def test_sqlite_refuses_a_real_past_the_largest_double_as_written_as_the_mapper_does(
    value: float, array: str, problem: str | None
) -> None:
    """Both write a REAL with 15 digits, which round the largest doubles up past the largest:
    Typesense would refuse the line (number overflow)."""
    one = Mapping(
        table="t", key="k", collection="c", fields=(Field("w", "float"), Field("ws", "float[]"))
    )
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (k, w, ws)")
    conn.execute("INSERT INTO t VALUES (1, ?, ?)", (value, array))
    conn.text_factory = RawText
    row = conn.execute(
        f"SELECT {one.columns()}, {one.line_sql()}, {one.verdict_sql()} FROM t"
    ).fetchone()
    if problem is None:
        assert finite(json.loads(row[-2])) and row[-2] == one.line(row[:-2])
        return
    assert row[-2:] == (None, problem.encode())
    with pytest.raises(InvalidRecordError, match=re.escape(problem)):
        one.document(row[:-2])


@pytest.mark.parametrize(
    "text", ['["a\\"b"]', '["back\\\\slash"]', '["\\u00e9"]', '["x\\u0000y"]', '["\\u0001"]']
)
@pytest.mark.parametrize("optional", [False, True])
def test_an_array_with_an_escape_is_written_by_the_mapper(text: str, optional: bool) -> None:
    """json_each would keep \\u00e9 escaped and cut a string at \\u0000: SQLite writes no line
    for such an array, the mapper does. (SQLite wrote the array as null: Typesense refused a
    required one, and an optional one was lost.)"""
    one = Mapping(
        table="t", key="k", collection="c", fields=(Field("t", "string[]", optional=optional),)
    )
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (k, t)")
    conn.execute("INSERT INTO t VALUES (1, ?)", (text,))
    conn.text_factory = RawText
    row = conn.execute(
        f"SELECT {one.columns()}, {one.line_sql()}, {one.verdict_sql()} FROM t"
    ).fetchone()
    assert row[-2:] == (None, None)
    assert json.loads(one.line(row[:-2])) == {"id": "1", "t": json.loads(text)}


def test_text_keys_take_odd_characters_and_refuse_what_typesense_cannot_hold() -> None:
    text = Mapping(
        table="t", key="slug", collection="c", fields=(Field("n", "string"),), key_kind="text"
    )
    for key in ("a/b", "50%", "q?x", "h#1", "sp ace", 'dq"x', "sq'x", "bt`x", "ünï", "co,ma"):
        assert text.document_id(key) == key
    assert text.key_problem("") == "slug: is empty, which Typesense cannot hold as an id"
    assert text.key_problem(None) == "slug: expected text, got NULL"
    assert text.key_problem("x" * 1025) == "slug: is 1025 bytes, more than the limit of 1024"
    assert SEQUENCES.key_problem(RawText(b"abc")) == "id: expected an integer, got text 'abc'"


def test_the_generator_writes_exactly_the_triggers_schema_sql_holds() -> None:
    held = [
        " ".join(s.replace("IF NOT EXISTS ", "").removesuffix(";").split())
        for s in schema_statements()
        if s.startswith("CREATE TRIGGER")
    ]
    made = [" ".join(trigger.sql.split()) for trigger in SEQUENCES.triggers()]
    assert held == made and len(made) == 3


def test_the_schema_sql_people_read_is_the_one_init_applies() -> None:
    """The top-level schema.sql (the one an application's developer reads) had drifted from the
    package's, which `init` applies and the test above holds: it lacked the update trigger's
    COLLATE BINARY, so a database prepared from it got an update trigger `init` then replaced."""
    top = Path(__file__).resolve().parents[1] / "schema.sql"
    assert top.read_text() == resources.files("outbox_sync").joinpath("schema.sql").read_text()


def test_the_built_in_mapping_is_the_source_documents() -> None:
    schema = SEQUENCES.collection_schema("sequences")
    assert schema["fields"] == [
        {"name": "element_type", "type": "string", "facet": True},
        {"name": "element_id", "type": "int32"},
        {"name": "sequence_number", "type": "int32", "sort": True},
        {"name": "comment", "type": "string", "optional": True},
        {"name": "created_at", "type": "string", "sort": True},
    ]
    assert schema["default_sorting_field"] == "sequence_number"


def test_a_collection_of_compatible_fields_is_used_as_it_is() -> None:
    """The source document's table as a collection: int64 where we say int32 is checked as
    int64, and a required comment makes a NULL comment a validation error."""
    declared = [
        {"name": "element_type", "type": "string", "facet": True},
        {"name": "element_id", "type": "int64"},
        {"name": "sequence_number", "type": "int32", "sort": True},
        {"name": "comment", "type": "string", "optional": False},
        {"name": "created_at", "type": "string", "sort": True},
    ]
    effective, problems = SEQUENCES.against(declared)
    assert problems == []
    row = (1, RawText(b"script"), 2**40, 1, None, RawText(b"t"))
    with pytest.raises(InvalidRecordError, match="comment: is NULL but the field is required"):
        effective.document(row)
    assert effective.document((*row[:4], RawText(b"c"), row[5]))["element_id"] == 2**40
    _, problems = SEQUENCES.against(
        [{**f, "type": "float"} if f["name"] == "element_id" else f for f in declared]
    )
    assert problems == ["field element_id has type='float', expected 'int32'"]


GOOD = (
    123,
    RawText(b"script"),
    456,
    1,
    RawText(b"Initial script creation"),
    RawText(b"2023-10-01T12:00:00Z"),
)


def test_the_built_in_mapping_makes_the_source_documents_document() -> None:
    assert SEQUENCES.document(GOOD) == {
        "id": "123",
        "element_type": "script",
        "element_id": 456,
        "sequence_number": 1,
        "comment": "Initial script creation",
        "created_at": "2023-10-01T12:00:00Z",
    }
    assert "comment" not in SEQUENCES.document((*GOOD[:4], None, GOOD[5]))  # left out


@pytest.mark.parametrize(
    ("position", "value", "message"),
    [
        (0, RawText(b"x" * 100), f"id: expected an integer, got text '{'x' * 40}'"),
        (1, None, "element_type: is NULL but the field is required"),
        (2, RawText(b"12"), "element_id: expected an integer, got text '12'"),
        (2, 2**31, "element_id: 2147483648 is outside the range -2147483648..2147483647"),
        (
            3,
            -(2**31) - 1,
            "sequence_number: -2147483649 is outside the range -2147483648..2147483647",
        ),
        (3, 1.0, "sequence_number: expected an integer, got real 1.0"),
        (4, RawText(b"\xff\xfe"), "comment: is not valid UTF-8 (bad byte at offset 0)"),
        (4, RawText(b"x" * 65537), "comment: is 65537 bytes, more than the limit of 65536"),
        (5, 5, "created_at: expected text, got integer 5"),
    ],
)
def test_each_validation_message_of_the_built_in_mapping_in_full(
    position: int, value: object, message: str
) -> None:
    row = list(GOOD)
    row[position] = value
    with pytest.raises(InvalidRecordError) as caught:
        SEQUENCES.document(tuple(row))
    assert str(caught.value) == message
    assert caught.value.field == message.split(":")[0]


def test_limits_are_inclusive() -> None:
    longest = (*GOOD[:4], RawText(b"c" * MAX_TEXT_BYTES), GOOD[5])
    assert len(SEQUENCES.document(longest)["comment"]) == MAX_TEXT_BYTES
    for value in INT32:
        assert SEQUENCES.document((*GOOD[:3], value, *GOOD[4:]))["sequence_number"] == value


def test_encode_is_compact_and_leaves_non_ascii_as_it_is() -> None:
    document = {"id": "1", "comment": 'é "q" \u2028 \n', "w": 1e20, "b": True}
    assert (
        encode(document)
        == '{"id":"1","comment":"é \\"q\\" \u2028 \\n","w":1.0e+20,"b":true}'.encode()
    )


def test_describe_row_keeps_the_columns_and_cuts_long_text() -> None:
    row = (1, RawText(b"x" * 500), 2, RawText(b"twelve"), None, b"\x00\x01")
    described = json.loads(SEQUENCES.describe_row(row))
    assert list(described) == ["id", *(f.name for f in SEQUENCES.fields)]
    assert described["element_type"] == "x" * 200 + "…"
    assert described["created_at"] == "<BLOB of 2 bytes>"
    assert (described["id"], described["sequence_number"], described["comment"]) == (
        1,
        "twelve",
        None,
    )


def test_a_string_of_json_made_by_sqlites_json_functions_is_written_as_a_string() -> None:
    """json_extract of an object or an array (in an `sql` field, or a generated column as
    docs/tables.md suggests) is text SQLite marks as JSON, and json_object wrote it as an
    object: Typesense was sent an object for a string field, where the mapper writes the text
    (found by a hostile review)."""
    conn = sqlite3.connect(":memory:")
    conn.text_factory = RawText
    conn.execute(
        "CREATE TABLE docs (id INTEGER PRIMARY KEY, payload TEXT, address TEXT GENERATED ALWAYS"
        " AS (json_extract(payload, '$.address')) VIRTUAL, kept TEXT GENERATED ALWAYS"
        " AS (json_extract(payload, '$.address')) STORED)"
    )
    payload = '{"address": {"city": "Oslo"}, "tags": ["a"], "name": "Ann"}'
    conn.execute("INSERT INTO docs (id, payload) VALUES (1, ?)", (payload,))
    for field, text in [
        (Field("address", "string"), '{"city":"Oslo"}'),
        (Field("found", "string", sql="json_extract(payload, '$.address')"), '{"city":"Oslo"}'),
        (Field("found", "string", sql="json_extract(payload, '$.tags')"), '["a"]'),
        (Field("found", "string", sql="json_extract(payload, '$.name')"), "Ann"),
        (Field("found", "string", sql="json_extract(payload, '$.none')", optional=True), None),
        (Field("kept", "string"), '{"city":"Oslo"}'),
        (Field("payload", "string"), payload),
    ]:
        unbound = Mapping(table="docs", key="id", collection="docs", fields=(field,))
        conn.text_factory = str  # as the daemon's connection binds it
        bound = schema.bind(conn, unbound, ":memory:")
        conn.text_factory = RawText
        for mapping in (unbound, bound):
            (line,) = conn.execute(f"SELECT {mapping.line_sql()} FROM docs").fetchone()
            row = conn.execute(f"SELECT {mapping.columns()} FROM docs").fetchone()
            assert line == mapping.line(row)
            assert json.loads(line).get(field.name) == text


def test_a_column_as_stored_is_written_without_a_copy_of_its_text() -> None:
    """Only a value SQLite's JSON functions may have made needs `|| ''` (a copy of its text:
    25 ms of the line's 165 ms per 100,000 rows of `sequences` here); a bound mapping reads
    its plain and STORED columns as they are."""
    conn = sqlite3.connect(":memory:")
    conn.execute(
        "CREATE TABLE docs (id INTEGER PRIMARY KEY, name TEXT, payload TEXT, v TEXT GENERATED"
        " ALWAYS AS (payload) VIRTUAL, s TEXT GENERATED ALWAYS AS (payload) STORED)"
    )
    fields = tuple(Field(name, "string") for name in ("name", "v", "s"))
    fields += (Field("q", "string", sql="upper(name)"),)
    mapping = Mapping(table="docs", key="id", collection="docs", fields=fields)
    bound = schema.bind(conn, mapping, ":memory:")
    assert [f.from_json for f in bound.fields] == [False, True, False, True]
    assert [f.from_json for f in mapping.fields] == [True] * 4  # unbound: the safe side
    assert "(`name` || '')" not in bound.line_sql() and "(`v` || '')" in bound.line_sql()
