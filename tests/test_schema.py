"""schema.sql through `Database.init`: triggers, AUTOINCREMENT, backfill, legacy tables."""

import sqlite3
from pathlib import Path

import pytest

from outbox_sync import schema
from outbox_sync.db import Database, fill_key
from outbox_sync.errors import ConfigError, DatabaseError
from outbox_sync.mapping import SEQUENCES
from tests.support.app import ROW_SQL, app_connection, insert_rows, make_row


def outbox(path: Path) -> list[tuple[object, str]]:
    conn = app_connection(path)
    rows = conn.execute("SELECT record_key, op FROM outbox ORDER BY id").fetchall()
    conn.close()
    return rows


def test_init_is_idempotent(db_path: Path) -> None:
    before = (
        app_connection(db_path).execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    )
    assert schema.init(Database(db_path), [SEQUENCES]).enqueued == {}
    after = (
        app_connection(db_path).execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    )
    assert before == after
    assert app_connection(db_path).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_triggers_record_insert_update_id_change_and_delete(db_path: Path) -> None:
    conn = app_connection(db_path)
    conn.execute(ROW_SQL, make_row(1))
    conn.execute("UPDATE sequences SET sequence_number = 9 WHERE id = 1")
    conn.execute("UPDATE sequences SET id = 2 WHERE id = 1")
    conn.execute("DELETE FROM sequences WHERE id = 2")
    assert outbox(db_path) == [
        (1, "upsert"),
        (1, "upsert"),
        (1, "delete"),
        (2, "upsert"),
        (2, "delete"),
    ]


def test_outbox_ids_are_never_reused(db_path: Path) -> None:
    conn = app_connection(db_path)
    conn.execute(ROW_SQL, make_row(1))
    (first,) = conn.execute("SELECT max(id) FROM outbox").fetchone()
    conn.execute("DELETE FROM outbox")
    conn.execute(ROW_SQL, make_row(2))
    (second,) = conn.execute("SELECT max(id) FROM outbox").fetchone()
    assert second > first


def test_init_asks_once_for_a_fill_of_existing_rows_and_backfill_queues_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "existing.db"
    conn = app_connection(path)
    conn.execute(
        "CREATE TABLE sequences (id INTEGER PRIMARY KEY, element_type TEXT, element_id INTEGER,"
        " sequence_number INTEGER, comment TEXT, created_at TEXT)"
    )
    insert_rows(conn, range(1, 4))
    first = schema.init(Database(path, create=True), [SEQUENCES])
    assert (first.filling, first.enqueued) == ({"sequences": 3}, {})
    assert outbox(path) == []  # the daemon reads them from the table (reindex.serve_fills)
    assert Database(path).get_meta(fill_key("sequences")) is not None
    again = schema.init(Database(path), [SEQUENCES])
    assert (again.filling, again.enqueued) == ({}, {})
    backfill = schema.init(Database(path), [SEQUENCES], backfill=True)
    assert (backfill.filling, backfill.enqueued) == ({}, {"sequences": 3})
    assert outbox(path) == [(1, "upsert"), (2, "upsert"), (3, "upsert")]
    assert Database(path).get_meta(fill_key("sequences")) is None  # queued: no fill as well
    assert schema.init(Database(path), [SEQUENCES], backfill=True).enqueued == {"sequences": 3}
    assert len(outbox(path)) == 6


def test_init_asks_for_no_fill_of_an_empty_table(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    result = schema.init(Database(path, create=True), [SEQUENCES])
    assert (result.filling, result.enqueued) == ({}, {})
    assert Database(path).get_meta(fill_key("sequences")) is None


def test_init_works_on_a_loose_legacy_table(tmp_path: Path) -> None:
    path = tmp_path / "legacy.db"
    conn = app_connection(path)
    conn.execute(
        "CREATE TABLE sequences (id, element_type, element_id, sequence_number, comment,"
        " created_at, extra)"
    )
    conn.execute(ROW_SQL, ("7", "script", "x", 1, None, "now"))
    assert schema.init(Database(path, create=True), [SEQUENCES]).filling == {"sequences": 1}
    # queued, text stays text: the daemon must see what the application wrote
    assert schema.init(Database(path), [SEQUENCES], backfill=True).enqueued == {"sequences": 1}
    assert outbox(path) == [("7", "upsert")]
    # a legacy id that is not the rowid gets an index for the daemon's lookups
    plan = (
        app_connection(path)
        .execute("EXPLAIN QUERY PLAN SELECT * FROM sequences WHERE id = 5")
        .fetchall()
    )
    assert "outbox_sync_sequences_id" in str(plan)


def test_init_refuses_a_table_without_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    app_connection(path).execute("CREATE TABLE sequences (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(ConfigError, match="no column element_type, element_id"):
        schema.init(Database(path), [SEQUENCES])
    # nothing half-applied
    names = app_connection(path).execute("SELECT name FROM sqlite_master").fetchall()
    assert ("outbox",) not in names


def test_check_schema_says_to_run_init(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    with pytest.raises(DatabaseError, match="run `outbox-sync init"):
        schema.check(Database(path), [SEQUENCES])


def test_missing_and_broken_files_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="does not exist"):
        Database(tmp_path / "nope.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DatabaseError, match="not a database"):
        Database(garbage)
