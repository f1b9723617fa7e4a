"""The custom mapping of docs/tables.md, `characters`, as the tests use it: the page's example
configuration word for word, the application's tables, its rows, and the documents Typesense
should hold for them; and, for any mapping, the documents its Python reference makes of the
table's rows."""

import json
import math
import re
import sqlite3
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from outbox_sync import config_file, schema
from outbox_sync.db import Database
from outbox_sync.errors import InvalidRecordError
from outbox_sync.mapping import Mapping
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.values import RawText, quote_identifier
from tests.support.app import app_connection
from tests.support.daemon import mapping_index
from tests.support.typesense import Server

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = re.search(r"```toml\n(.*?)```", (ROOT / "docs" / "tables.md").read_text(), re.S)[1]  # type: ignore[index]
# The example's own entry for `characters` (it maps `sequences` first).
CHARACTERS_ENTRY = EXAMPLE[EXAMPLE.index('[[sync]]\ntable = "characters"') :]
# The tables, as a migration makes them again: under another name, with more columns (`extra`).
CHARACTERS_TABLE = (
    "CREATE TABLE {name} (slug TEXT PRIMARY KEY, name TEXT, bio TEXT, age INTEGER,"
    " weight REAL, active INTEGER, deleted_at TEXT{extra})"
)
TAGS_TABLE = "CREATE TABLE {name} (slug TEXT, tag TEXT{extra})"
CHARACTERS = CHARACTERS_TABLE.format(name="characters", extra="")
TAGS = TAGS_TABLE.format(name="character_tags", extra="")
CHARACTER_COLUMNS = "slug, name, bio, age, weight, active, deleted_at"
CHARACTER_SQL = f"INSERT INTO characters ({CHARACTER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
# A slug stored as TEXT that is not UTF-8 (`insert_not_utf8`).
NOT_UTF8 = b"A\xffB"
# Text keys with what URLs, filters and SQL quote: each is indexed, updated and deleted as it is.
ODD_KEYS = ["a/b", "50%", "q?x", "h#1", "sp ace", 'dq"x', "sq'x", "bt`x", "ünï", "co,ma"]


def characters_config(collection: str = "characters") -> str:
    """A configuration file mapping only `characters`, into `collection`: the example's entry."""
    return CHARACTERS_ENTRY.replace('collection = "characters"', f'collection = "{collection}"')


def characters_mapping(collection: str = "characters") -> Mapping:
    """The example's `characters` mapping, as the configuration file gives it."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "outbox-sync.toml"
        path.write_text(characters_config(collection))
        _, (mapping,) = config_file.load(path, {})
    return mapping


def initialized_characters(
    path: Path, collection: str = "characters"
) -> tuple[sqlite3.Connection, Mapping, Database]:
    """A database with the application's tables after `outbox-sync init`: the application's
    connection, the mapping and the daemon's side of the file."""
    conn = app_connection(path)
    conn.executescript(f"{CHARACTERS}; {TAGS};")
    mapping = characters_mapping(collection)
    db = Database(path, create=True)
    schema.init(db, [mapping])
    return conn, mapping, db


def characters_index(
    db: Database, mapping: Mapping, server: Server, collection: str = "characters"
) -> TypesenseIndex:
    """The index of `characters` on `server`, its collection made, as the daemon makes it."""
    return mapping_index(db, mapping, server, collection)


def insert_not_utf8(conn: sqlite3.Connection, slug: bytes = NOT_UTF8) -> None:
    """A character whose slug, its key, is TEXT that is not UTF-8, as an application can store
    it (CAST(? AS TEXT) of bytes)."""
    sql = CHARACTER_SQL.replace("(?,", "(CAST(? AS TEXT),", 1)
    conn.execute(sql, (slug, *character("x")[1:]))


def character(slug: str, **changes: Any) -> tuple[Any, ...]:
    """The values of a row of `characters` for CHARACTER_SQL, with `changes` by column name."""
    row = {
        "slug": slug,
        "name": f"Name of {slug}",
        "bio": None,
        "age": 30,
        "weight": 61.5,
        "active": 1,
        "deleted_at": None,
    }
    row.update(changes)
    return tuple(row.values())


def slug(i: int) -> str:
    """The key of character `i`: one of the odd keys, numbered."""
    return f"{ODD_KEYS[i % len(ODD_KEYS)]}-{i}"


def insert_characters(conn: sqlite3.Connection, numbers: Iterable[int], bio: str = "") -> None:
    """Characters `slug(i)` for these numbers, the even ones with a tag (`bio`: their bio)."""
    numbers = list(numbers)
    conn.executemany(CHARACTER_SQL, [character(slug(i), bio=bio or None) for i in numbers])
    conn.executemany(
        "INSERT INTO character_tags (slug, tag) VALUES (?, ?)",
        [(slug(i), f"tag {i % 3}") for i in numbers if i % 2 == 0],
    )


def expected_characters(app: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """What the example's mapping makes of the table, written out here apart from the mapper
    (for rows whose values are all valid, bar the slug and `active`)."""
    documents = {}
    for slug, name, bio, age, weight, active in app.execute(
        "SELECT slug, name, bio, age, weight, active FROM characters WHERE deleted_at IS NULL"
        " AND active IN (0, 1) AND slug != ''"
    ):
        tags = [
            t
            for (t,) in app.execute(
                "SELECT tag FROM character_tags WHERE slug = ? ORDER BY tag", (slug,)
            )
        ]
        document = {"id": slug, "name": name, "active": bool(active), "tags": tags}
        document |= {
            k: v for k, v in (("bio", bio), ("age", age), ("weight", weight)) if v is not None
        }
        documents[slug] = document
    return documents


def reference_rows(conn: sqlite3.Connection, mapping: Mapping) -> list[tuple[Any, ...]]:
    """The rows the mapping covers (its `where`), read raw as the daemon reads them: key, then
    one value per field."""
    where = f" WHERE {mapping.where}" if mapping.where else ""
    conn.text_factory = RawText
    try:
        return conn.execute(
            f"SELECT {mapping.columns()} FROM {quote_identifier(mapping.table)}{where}"
        ).fetchall()
    finally:
        conn.text_factory = str


def reference_key(row: tuple[Any, ...]) -> Any:
    """A row's key as the outbox and sync_errors hold it (text decoded)."""
    key = row[0]
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else key


def reference_documents(
    conn: sqlite3.Connection, mapping: Mapping
) -> tuple[dict[str, dict[str, Any]], dict[Any, InvalidRecordError]]:
    """What the mapping's Python reference makes of the table: the document of every valid row
    by id, as Typesense gives it back (its JSON line, read), and the error of every invalid one
    by key."""
    documents, invalid = {}, {}
    for row in reference_rows(conn, mapping):
        try:
            document = json.loads(mapping.line(row))
        except InvalidRecordError as error:
            invalid[reference_key(row)] = error
        else:
            documents[document["id"]] = document
    return documents, invalid


def same_document(a: Any, b: Any) -> bool:
    """Equal documents, numbers equal to 15 digits: SQLite writes a REAL with its own printf,
    which rounds a digit exactly half-way differently from the Python reference (see
    tests/test_mapping.py)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_document(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same_document, a, b))
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (a, b))
    if numbers:
        return a == b or math.isclose(a, b, rel_tol=1e-14)
    return type(a) is type(b) and a == b
