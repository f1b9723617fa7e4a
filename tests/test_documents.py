"""Row -> document mapping and the validation that names the field."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox_sync.documents import (
    COLUMNS,
    FIELDS,
    MAX_SHORT_TEXT_BYTES,
    MAX_TEXT_BYTES,
    collection_schema,
    describe_row,
    document_id,
    document_line,
    encode,
    to_document,
)
from outbox_sync.documents import (
    RawText as T,
)
from outbox_sync.errors import InvalidRecordError

GOOD = (123, T(b"script"), 456, 1, T(b"Initial script creation"), T(b"2023-10-01T12:00:00Z"))


def test_maps_the_integer_key_to_a_string_id() -> None:
    assert to_document(GOOD) == {
        "id": "123",
        "element_type": "script",
        "element_id": 456,
        "sequence_number": 1,
        "comment": "Initial script creation",
        "created_at": "2023-10-01T12:00:00Z",
    }


def test_a_null_comment_is_left_out() -> None:
    assert "comment" not in to_document((*GOOD[:4], None, GOOD[5]))


@pytest.mark.parametrize(
    ("position", "value", "field", "problem"),
    [
        (0, T(b"abc"), "id", "expected an integer, got text 'abc'"),
        (0, 1.5, "id", "expected an integer, got real 1.5"),
        (1, None, "element_type", "is NULL but the field is required"),
        (1, 7, "element_type", "expected text, got integer 7"),
        (2, T(b"12"), "element_id", "expected an integer, got text '12'"),
        (3, 2**31, "sequence_number", "2147483648 is outside the range"),
        (3, None, "sequence_number", "is NULL"),
        (4, T(b"\xff\xfe"), "comment", "is not valid UTF-8 (bad byte at offset 0)"),
        (4, T(b"x" * (MAX_TEXT_BYTES + 1)), "comment", f"more than the limit of {MAX_TEXT_BYTES}"),
        (5, None, "created_at", "is NULL"),
    ],
)
def test_invalid_values_name_the_field(
    position: int, value: object, field: str, problem: str
) -> None:
    row = list(GOOD)
    row[position] = value
    with pytest.raises(InvalidRecordError) as caught:
        to_document(tuple(row))
    assert caught.value.field == field
    assert problem in str(caught.value)
    assert str(caught.value).startswith(f"{field}: ")


def test_int32_bounds_are_inclusive() -> None:
    for value in (-(2**31), 2**31 - 1):
        assert to_document((*GOOD[:3], value, *GOOD[4:]))["sequence_number"] == value


def test_document_id_only_for_integers() -> None:
    assert document_id(5) == "5"
    assert document_id(-5) == "-5"
    assert document_id("5") is None
    assert document_id(True) is None
    assert document_id(None) is None


def test_describe_row_survives_invalid_utf8() -> None:
    text = describe_row((1, T(b"\xff"), 2, 3, None, T(b"t")))
    assert '"element_type": "\ufffd"' in text


integers = st.one_of(
    st.integers(min_value=-(2**31) - 2, max_value=2**31 + 1), st.integers(), st.floats()
)
texts = st.one_of(
    st.none(),
    st.text().map(str.encode).map(T),
    st.binary(max_size=8).map(T),  # often not UTF-8
    st.binary(max_size=8),  # a BLOB
    st.integers(),
    st.just(T(b"x" * (MAX_TEXT_BYTES + 1))),
)


@settings(max_examples=400, deadline=None)
@given(
    key=st.one_of(st.integers(), st.text().map(str.encode).map(T), st.none()),
    element_type=texts,
    element_id=integers,
    sequence_number=integers,
    comment=texts,
    created_at=texts,
)
def test_the_fast_line_is_exactly_the_mapped_document(
    key: object,
    element_type: object,
    element_id: object,
    sequence_number: object,
    comment: object,
    created_at: object,
) -> None:
    row = (key, element_type, element_id, sequence_number, comment, created_at)
    try:
        expected: bytes | str = encode(to_document(row))
    except InvalidRecordError as error:
        expected = str(error)
    try:
        got: bytes | str = document_line(row)
    except InvalidRecordError as error:
        got = str(error)
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(
    key=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    element_type=st.text(max_size=30),
    element_id=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    sequence_number=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    comment=st.one_of(st.none(), st.text()),
    created_at=st.text(max_size=30),
)
def test_valid_rows_take_the_fast_line_with_the_same_bytes(
    key: int,
    element_type: str,
    element_id: int,
    sequence_number: int,
    comment: str | None,
    created_at: str,
) -> None:
    row = (
        key,
        T(element_type.encode()),
        element_id,
        sequence_number,
        None if comment is None else T(comment.encode()),
        T(created_at.encode()),
    )
    assert document_line(row) == encode(to_document(row))


def test_the_collection_schema_is_a_fresh_copy_of_the_fields() -> None:
    schema = collection_schema("sequences_v1")
    assert schema == {
        "name": "sequences_v1",
        "fields": [dict(field) for field in FIELDS],
        "default_sorting_field": "sequence_number",
    }
    schema["fields"][0]["type"] = "int32"  # a caller changing its copy (as tests do)
    assert collection_schema("x")["fields"][0]["type"] == "string"
    assert {field["name"] for field in FIELDS} == set(COLUMNS) - {"id"}


@pytest.mark.parametrize(
    ("position", "value", "message"),
    [
        (0, True, "id: expected an integer, got bool True"),
        (0, b"x" * 100, f"id: expected an integer, got text {'x' * 40!r}"),
        (
            1,
            b"s" * (MAX_SHORT_TEXT_BYTES + 1),
            "element_type: is 1025 bytes, more than the limit of 1024",
        ),
        (2, False, "element_id: expected an integer, got bool False"),
        (2, 2**63, f"element_id: {2**63} is outside the range {-(2**63)}..{2**63 - 1}"),
        (
            3,
            -(2**31) - 1,
            "sequence_number: -2147483649 is outside the range -2147483648..2147483647",
        ),
        (3, 1.0, "sequence_number: expected an integer, got real 1.0"),
        (4, "text", "comment: expected text, got str 'text'"),
        (5, 5, "created_at: expected text, got int 5"),
        (
            5,
            b"t" * (MAX_SHORT_TEXT_BYTES + 1),
            "created_at: is 1025 bytes, more than the limit of 1024",
        ),
    ],
)
def test_each_validation_message_in_full(position: int, value: object, message: str) -> None:
    row = list(GOOD)
    row[position] = value
    with pytest.raises(InvalidRecordError) as caught:
        to_document(tuple(row))
    assert str(caught.value) == message
    assert caught.value.field == message.split(":")[0] == COLUMNS[position]
    with pytest.raises(InvalidRecordError, match=f"^{caught.value.field}: "):
        document_line(tuple(row))  # the fast path names the same field


def test_limits_are_inclusive() -> None:
    longest = (*GOOD[:4], b"c" * MAX_TEXT_BYTES, b"t" * MAX_SHORT_TEXT_BYTES)
    document = to_document(longest)
    assert len(document["comment"]) == MAX_TEXT_BYTES
    assert len(document["created_at"]) == MAX_SHORT_TEXT_BYTES
    for value in (-(2**63), 2**63 - 1):
        assert to_document((GOOD[0], GOOD[1], value, *GOOD[3:]))["element_id"] == value


def test_encode_is_compact_and_leaves_non_ascii_as_it_is() -> None:
    document = {"id": "1", "comment": 'é "q" \u2028 \n'}
    assert encode(document) == '{"id":"1","comment":"é \\"q\\" \u2028 \\n"}'.encode()


def test_describe_row_keeps_the_columns_and_cuts_long_text() -> None:
    described = json.loads(describe_row((1, b"x" * 500, 2, "twelve", None, 3.5)))
    assert list(described) == list(COLUMNS)
    assert described["element_type"] == "x" * 200 + "…"
    assert (described["id"], described["sequence_number"], described["comment"]) == (
        1,
        "twelve",
        None,
    )
    assert described["created_at"] == 3.5
