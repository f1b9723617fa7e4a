"""The application's side of the database: its own connection, the rows it writes, and the
documents search should hold for them."""

import contextlib
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROW_SQL = (
    "INSERT INTO sequences (id, element_type, element_id, sequence_number, comment, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)


def app_connection(path: Path) -> sqlite3.Connection:
    """An application's own connection, as any program writing the file would open it."""
    return sqlite3.connect(path, timeout=30, isolation_level=None)


def switched_to_delete(app: sqlite3.Connection) -> bool:
    """Whether the file is in rollback-journal mode now (leaving WAL takes the file alone: a
    connection a fixture left may still be closing)."""
    try:
        return bool(app.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete")
    except sqlite3.OperationalError:
        return False


def make_row(i: int, **changes: Any) -> tuple[Any, ...]:
    """The values of row `i` for ROW_SQL, with `changes` by column name."""
    row = {
        "id": i,
        "element_type": ("script", "section", "action", "character", "spoken_word")[i % 5],
        "element_id": 1000 + i,
        "sequence_number": i,
        "comment": f"comment number {i}",
        "created_at": f"2024-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z",
    }
    row.update(changes)
    return tuple(row.values())


def insert_rows(target: Path | sqlite3.Connection, keys: Iterable[int], **changes: Any) -> None:
    """Insert make_row(key, **changes) for every key in one statement, as the application would:
    on `target`'s connection, or on a connection of its own to the file `target`."""
    rows = [make_row(key, **changes) for key in keys]
    if isinstance(target, sqlite3.Connection):
        target.executemany(ROW_SQL, rows)
        return
    conn = app_connection(target)
    try:
        conn.executemany(ROW_SQL, rows)
    finally:
        conn.close()


def insert_large_rows(path: Path, count: int) -> None:
    """Rows 1..count with comments of ~4 KB, each its own, in one transaction."""
    conn = app_connection(path)
    conn.execute("BEGIN")
    for key in range(1, count + 1):
        insert_rows(conn, [key], comment=f"{key} " + "words " * 660)
    conn.execute("COMMIT")
    conn.close()


def expected_document(row: tuple[Any, ...]) -> dict[str, Any]:
    """The document Typesense should hold for a row of `sequences`."""
    key, element_type, element_id, sequence_number, comment, created_at = row
    document = {
        "id": str(key),
        "element_type": element_type,
        "element_id": element_id,
        "sequence_number": sequence_number,
        "created_at": created_at,
    }
    if comment is not None:
        document["comment"] = comment
    return document


def sqlite_documents(path: Path) -> dict[str, dict[str, Any]]:
    """The documents Typesense should hold for the rows of the file, by id."""
    conn = app_connection(path)
    rows = conn.execute(
        "SELECT id, element_type, element_id, sequence_number, comment, created_at FROM sequences"
    ).fetchall()
    conn.close()
    return {str(row[0]): expected_document(row) for row in rows}


def schema_of(path: Path) -> list[tuple[str, str, str]]:
    """Every table, index, trigger and view of the file, as SQLite keeps them (but its own
    sqlite_sequence, which AUTOINCREMENT makes and no one may drop)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name != 'sqlite_sequence'"
            " ORDER BY type, name"
        ).fetchall()
