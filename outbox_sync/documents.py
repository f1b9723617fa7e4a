"""Mapping a row of `sequences` to a Typesense document, with validation done on our side.

Values must already have the right type: a loose legacy table may hold '12' in an integer
column, and we refuse it (naming the field) rather than guess, so the index holds exactly what
SQLite holds.
"""

import json
from typing import Any

from outbox_sync.errors import InvalidRecordError


class RawText(bytes):
    """A TEXT value as SQLite stored it (rows are read with this text factory): bytes, so that
    invalid UTF-8 becomes a record error and not a crash, and a type of its own, so that a BLOB
    (plain bytes) in a text column is told apart."""


# The columns read from `sequences`, in this order.
COLUMNS = ("id", "element_type", "element_id", "sequence_number", "comment", "created_at")

# The collection schema (DEVELOPERS.md): `id` is implicit and always a string in Typesense.
FIELDS: tuple[dict[str, Any], ...] = (
    {"name": "element_type", "type": "string", "facet": True},
    {"name": "element_id", "type": "int64"},
    {"name": "sequence_number", "type": "int32", "sort": True},
    {"name": "comment", "type": "string", "optional": True},
    {"name": "created_at", "type": "string", "sort": True},
)
DEFAULT_SORTING_FIELD = "sequence_number"

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
# Typesense has no hard limit, but a megabyte of comment is a bug upstream, not a record.
MAX_TEXT_BYTES = 64 * 1024
MAX_SHORT_TEXT_BYTES = 1024


def collection_schema(name: str) -> dict[str, Any]:
    """The body that creates the collection."""
    return {
        "name": name,
        "fields": [dict(field) for field in FIELDS],
        "default_sorting_field": DEFAULT_SORTING_FIELD,
    }


def document_id(key: object) -> str | None:
    """The document id for a `sequences.id` value, or None when no document can have it."""
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    return None


def to_document(row: tuple[Any, ...]) -> dict[str, Any]:
    """Build the document for one row (in COLUMNS order); raise InvalidRecordError."""
    key, element_type, element_id, sequence_number, comment, created_at = row
    doc_id = document_id(key)
    if doc_id is None:
        raise InvalidRecordError("id", f"expected an integer, got {_describe(key)}")
    document: dict[str, Any] = {
        "id": doc_id,
        "element_type": _text("element_type", element_type, MAX_SHORT_TEXT_BYTES),
        "element_id": _integer("element_id", element_id, INT64),
        "sequence_number": _integer("sequence_number", sequence_number, INT32),
        "created_at": _text("created_at", created_at, MAX_SHORT_TEXT_BYTES),
    }
    if comment is not None:
        document["comment"] = _text("comment", comment, MAX_TEXT_BYTES)
    return document


# One encoder for all documents: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# JSON string quoting without escaping non-ASCII: what _ENCODER does to each string.
_quote = json.encoder.encode_basestring


def encode(document: dict[str, Any]) -> bytes:
    """One JSONL line (without the newline)."""
    return _ENCODER.encode(document).encode()


def document_line(row: tuple[Any, ...]) -> bytes:
    """`encode(to_document(row))`, byte for byte, several times faster: the daemon's hot path.
    A row that is not plainly valid takes the slow path, which raises the error naming the
    field. (tests/test_documents.py checks both paths agree on random rows.)"""
    key, element_type, element_id, sequence_number, comment, created_at = row
    if (
        type(key) is int
        and type(element_type) is RawText
        and len(element_type) <= MAX_SHORT_TEXT_BYTES
        and type(element_id) is int
        and INT64[0] <= element_id <= INT64[1]
        and type(sequence_number) is int
        and INT32[0] <= sequence_number <= INT32[1]
        and type(created_at) is RawText
        and len(created_at) <= MAX_SHORT_TEXT_BYTES
        and (comment is None or (type(comment) is RawText and len(comment) <= MAX_TEXT_BYTES))
    ):
        try:
            line = (
                f'{{"id":"{key}","element_type":{_quote(element_type.decode())},'
                f'"element_id":{element_id},"sequence_number":{sequence_number},'
                f'"created_at":{_quote(created_at.decode())}'
            )
            if comment is not None:
                line += f',"comment":{_quote(comment.decode())}'
            return (line + "}").encode()
        except UnicodeDecodeError:
            pass
    return encode(to_document(row))


def describe_row(row: tuple[Any, ...]) -> str:
    """The row as JSON for `sync_errors`, when it could not become a document."""
    return json.dumps(
        {name: _jsonable(value) for name, value in zip(COLUMNS, row, strict=True)},
        ensure_ascii=False,
    )


def _text(field: str, value: Any, max_bytes: int) -> str:
    if value is None:
        raise InvalidRecordError(field, "is NULL but the field is required")
    if type(value) is RawText:  # rows are read with text_factory=RawText: decode here
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidRecordError(
                field, f"is not valid UTF-8 (bad byte at offset {error.start})"
            ) from None
        if len(value) > max_bytes:
            raise InvalidRecordError(
                field, f"is {len(value)} bytes, more than the limit of {max_bytes}"
            )
        return text
    raise InvalidRecordError(field, f"expected text, got {_describe(value)}")


def _integer(field: str, value: Any, bounds: tuple[int, int]) -> int:
    if value is None:
        raise InvalidRecordError(field, "is NULL but the field is required")
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRecordError(field, f"expected an integer, got {_describe(value)}")
    low, high = bounds
    if not low <= value <= high:
        raise InvalidRecordError(field, f"{value} is outside the range {low}..{high}")
    return value


def _describe(value: Any) -> str:
    """A value as SQLite people say it: NULL, text 'abc', integer 12, real 1.5, a BLOB."""
    if value is None:
        return "NULL"
    if type(value) is RawText or isinstance(value, str):
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        return f"text {text[:40]!r}"
    if isinstance(value, bytes):
        return f"a BLOB of {len(value)} bytes"
    if isinstance(value, float):
        return f"real {value!r}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"integer {value}"
    return f"{type(value).__name__} {value!r}"


def describe(value: Any) -> str:
    """`_describe`, for callers outside: a record's key in a message."""
    return _describe(value)


def _jsonable(value: Any) -> Any:
    if type(value) is not RawText and isinstance(value, bytes):
        return f"<BLOB of {len(value)} bytes>"
    if isinstance(value, bytes):
        text = value.decode("utf-8", "replace")
        return text if len(text) <= 200 else text[:200] + "…"
    return value
