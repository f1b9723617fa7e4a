"""Row -> document mapping and the validation that names the field."""

import pytest

from outbox_sync.documents import MAX_TEXT_BYTES, describe_row, document_id, to_document
from outbox_sync.errors import InvalidRecordError

GOOD = (123, b"script", 456, 1, b"Initial script creation", b"2023-10-01T12:00:00Z")


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
        (0, b"abc", "id", "expected an integer, got text 'abc'"),
        (0, 1.5, "id", "expected an integer, got real 1.5"),
        (1, None, "element_type", "is NULL but the field is required"),
        (1, 7, "element_type", "expected text, got int 7"),
        (2, b"12", "element_id", "expected an integer, got text '12'"),
        (3, 2**31, "sequence_number", "2147483648 is outside the range"),
        (3, None, "sequence_number", "is NULL"),
        (4, b"\xff\xfe", "comment", "is not valid UTF-8 (bad byte at offset 0)"),
        (4, b"x" * (MAX_TEXT_BYTES + 1), "comment", f"more than the limit of {MAX_TEXT_BYTES}"),
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
    text = describe_row((1, b"\xff", 2, 3, None, b"t"))
    assert '"element_type": "\ufffd"' in text
