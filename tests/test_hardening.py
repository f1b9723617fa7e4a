"""The cases a hostile review broke, each against a real Typesense 0.24.1 and real SQLite files:
tables that page differently, the daemon lock through another spelling of the path, reindex
failure paths, sync errors that never closed or doubled, monitoring that lied or died, and bad
input that ended in a traceback."""

import contextlib
import json
import socket
import sqlite3
import time
from collections.abc import Callable, Generator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from outbox_sync import reindex, schema, sync_errors
from outbox_sync.audit import Audit
from outbox_sync.db import DEFAULT_PAGE_ROWS, Database
from outbox_sync.errors import (
    AlreadyRunningError,
    DatabaseBusyError,
    OutboxSyncError,
    TypesenseUnavailableError,
)
from outbox_sync.localserver import LocalTypesense, free_port
from outbox_sync.lock import DaemonLock
from outbox_sync.mapping import SEQUENCES, Field, Mapping
from outbox_sync.report import build_report
from outbox_sync.telemetry import Telemetry, serve_metrics
from outbox_sync.typesense_index import ImportResult, TypesenseIndex
from outbox_sync.values import RawText
from outbox_sync.worker import Worker, daemon
from tests.support.app import (
    ROW_SQL,
    app_connection,
    insert_rows,
    make_row,
    sqlite_documents,
    switched_to_delete,
)
from tests.support.characters import (
    CHARACTER_SQL,
    CHARACTERS,
    NOT_UTF8,
    TAGS,
    character,
    characters_index,
    characters_mapping,
    initialized_characters,
    insert_not_utf8,
)
from tests.support.cli import invoke, one_line, run_module
from tests.support.daemon import Daemon, drain, running
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.typesense import API_KEY, Server, by_hand, export
from tests.support.wait import wait_until

COLUMNS = (
    "element_type TEXT NOT NULL, element_id INTEGER NOT NULL, sequence_number INTEGER NOT NULL,"
    " comment TEXT, created_at TEXT NOT NULL"
)


def legacy(tmp_path: Path, table_sql: str) -> Path:
    """A database whose `sequences` an application made its own way, then `init`."""
    path = tmp_path / "legacy.db"
    app_connection(path).execute(table_sql)
    from outbox_sync import schema

    schema.init(Database(path, create=True), [SEQUENCES])
    return path


# -- tables that page differently --------------------------------------------------------------


def test_a_column_named_rowid_does_not_cut_reindex_or_audit_short(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    path = legacy(
        tmp_path, f"CREATE TABLE sequences (id INTEGER, {COLUMNS}, rowid TEXT DEFAULT 'x')"
    )
    app_connection(path).executemany(ROW_SQL, [make_row(i) for i in range(1, 12_001)])
    app_connection(path).execute("DELETE FROM outbox")  # only reindex fills the collection
    index = TypesenseIndex([typesense_server.url], typesense_server.api_key, collection)
    index.ensure_collection()
    result = reindex.rebuild(Database(path), index)
    assert (result.rows, result.indexed) == (12_000, 12_000)
    assert len(export(typesense_server, collection)) == 12_000
    audited = invoke(["audit", "--json"], typesense_server, path, collection)
    assert audited.exit_code == 0, audited.output
    assert json.loads(audited.output)["rows"] == 12_000


WITHOUT_ROWID = f"CREATE TABLE sequences (id INTEGER PRIMARY KEY, {COLUMNS}) WITHOUT ROWID"


def test_without_rowid_tables_sync_audit_and_reindex(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    path = legacy(tmp_path, WITHOUT_ROWID)
    app_connection(path).executemany(ROW_SQL, [make_row(i) for i in range(1, 7_001)])
    index = TypesenseIndex([typesense_server.url], typesense_server.api_key, collection)
    worker = daemon(Database(path), [index], audit_every_s=3600)  # with the audit at start
    drain(worker)
    assert export(typesense_server, collection) == sqlite_documents(path)
    audited = invoke(["audit"], typesense_server, path, collection)
    assert audited.exit_code == 0, audited.output
    assert "7000 rows, 7000 documents: consistent" in audited.output
    reindexed = invoke(["reindex"], typesense_server, path, collection)
    assert reindexed.exit_code == 0, reindexed.output
    assert "reindexed 7000 rows" in reindexed.output
    assert export(typesense_server, collection) == sqlite_documents(path)


def test_a_reindex_request_that_fails_is_answered_and_never_crashes_the_daemon(
    db_path: Path, db: Database, index: TypesenseIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("something nobody expected")

    monkeypatch.setattr(reindex, "rebuild", broken)
    token = reindex.request(db, [index.collection])
    app_connection(db_path).execute(ROW_SQL, make_row(1))
    worker = daemon(db, [index])
    beside = Database(db_path)  # the worker's thread has `db` (see failed_reindex)
    with running(worker):
        wait_until(lambda: reindex.status(beside, token), what="the daemon's answer")
        wait_until(lambda: index.retrieve("1"), what="the sync to go on")
    state = reindex.status(db, token)
    assert state is not None and state["state"] == "failed"
    assert "something nobody expected" in state["error"]
    assert db.get_meta(reindex.REQUEST_KEY) is None  # not tried again at every start


# -- the daemon lock ---------------------------------------------------------------------------


def test_a_second_daemon_through_a_symlink_is_refused(tmp_path: Path, db_path: Path) -> None:
    link = tmp_path / "elsewhere" / "link.db"
    link.parent.mkdir()
    link.symlink_to(db_path)
    with DaemonLock(db_path), pytest.raises(AlreadyRunningError):
        DaemonLock(link).acquire()
    with (
        DaemonLock(tmp_path / "elsewhere" / ".." / db_path.name),
        pytest.raises(AlreadyRunningError),
    ):
        DaemonLock(db_path).acquire()


# -- reindex keeps what it promises ------------------------------------------------------------


def test_reindex_keeps_the_last_good_document_and_closes_the_errors_it_fixed(
    db_path: Path, db: Database, worker: Worker, index: TypesenseIndex
) -> None:
    conn = app_connection(db_path)
    conn.executemany(ROW_SQL, [make_row(i) for i in (1, 2, 3)])
    drain(worker)
    conn.execute("UPDATE sequences SET element_id = 'broken' WHERE id = 2")  # last good stays
    drain(worker)
    [error] = sync_errors.find(db)
    assert error["record_key"] == 2
    # an open 400 of record 3 (refused once by a collection that has since been fixed)
    db.conn.execute(
        "INSERT INTO sync_errors (outbox_id, mapping, record_key, op, http_status, error, attempts,"
        " failed_at) VALUES (9, 'sequences', 3, 'upsert', 400, 'refused', 2,"
        " '2026-01-01T00:00:00Z')"
    )
    before = index.retrieve("2")
    result = reindex.rebuild(db, index)
    assert result.invalid == 1 and result.indexed == 2
    assert index.retrieve("2") == before  # still searchable, as docs/guarantees.md promises
    assert [e["record_key"] for e in sync_errors.find(db)] == [2]  # record 3's closed


def comment_required(served: Server, collection: str) -> TypesenseIndex:
    """`sequences` with `comment` required: a changed mapping whose collection refuses a
    document without one."""
    fields = tuple(
        replace(f, optional=False) if f.name == "comment" else f for f in SEQUENCES.fields
    )
    return TypesenseIndex(
        [served.url], served.api_key, collection, mapping=replace(SEQUENCES, fields=fields)
    )


def test_a_last_good_document_the_rebuilt_collection_refuses_is_reported_not_dropped_silently(
    db_path: Path, db: Database, worker: Worker, index: TypesenseIndex, served: Server
) -> None:
    """A mapping changed to require `comment`: the last good document of a record whose row is
    now invalid has none, and the rebuilt collection refuses it. The import's verdict was
    ignored: the document vanished from search, and nothing said so (found by a hostile
    review). A warning names the record; its open error stays what its row's problem is."""
    conn = app_connection(db_path)
    conn.executemany(ROW_SQL, [make_row(1), make_row(2, comment=None), make_row(3)])
    drain(worker)
    conn.execute("UPDATE sequences SET element_id = 'broken' WHERE id = 2")
    drain(worker)
    assert index.retrieve("2") is not None  # its last good document, searchable
    required = comment_required(served, index.collection)
    with structlog.testing.capture_logs() as logs:
        result = reindex.rebuild(db, required)
    assert required.retrieve("2") is None  # the rebuilt collection would not take it
    [error] = sync_errors.find(db)
    assert error["record_key"] == 2 and error["error"].startswith("element_id: ")
    assert (result.indexed, result.invalid, result.last_good_refused) == (2, 1, 1)
    [warning] = [e for e in logs if e["event"] == "last_good_refused"]
    assert (warning["records"], warning["keys"]) == (1, [2])
    assert "comment" in warning["reason"]  # Typesense's


def test_a_last_good_document_refused_for_a_row_without_an_open_error_is_said_somewhere(
    db_path: Path, db: Database, worker: Worker, index: TypesenseIndex, served: Server
) -> None:
    """A changed mapping (comment now required) makes a row invalid that had no error: the
    rebuild copies its last good document, the new collection refuses it. The warning names
    it; the drain then records the row's own problem as its open error."""
    conn = app_connection(db_path)
    conn.executemany(ROW_SQL, [make_row(1), make_row(2, comment=None), make_row(3)])
    drain(worker)
    assert sync_errors.find(db) == []
    required = comment_required(served, index.collection)
    with structlog.testing.capture_logs() as logs:
        result = reindex.rebuild(db, required)
    assert (result.invalid, result.last_good_refused) == (1, 1)
    [warning] = [e for e in logs if e["event"] == "last_good_refused"]
    assert (warning["records"], warning["keys"]) == (1, [2])
    assert required.retrieve("2") is None  # gone from search
    drain(daemon(db, [required]))  # the queued row becomes its open error
    [error] = sync_errors.find(db)
    assert (error["record_key"], error["error"]) == (
        2,
        "comment: is NULL but the field is required",
    )


def test_a_loose_tables_valid_row_of_a_key_is_not_covered_by_its_last_good_document(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """A table without a primary key holds two rows of id 2, one valid and one invalid under a
    changed mapping. The rebuild indexed the valid one as the mapping now says, then copied
    the old collection's document over it, or, where the new collection refused that copy,
    warned that record 2 had left search while it had not (found by a hostile review)."""
    path = tmp_path / "legacy.db"
    app_connection(path).execute(
        "CREATE TABLE sequences (id, element_type, element_id, sequence_number, comment,"
        " created_at)"
    )
    app_connection(path).executemany(ROW_SQL, [make_row(1), make_row(2, comment="hello")])
    db = Database(path)
    schema.init(db, [SEQUENCES])
    server = typesense_server
    reindex.rebuild(db, TypesenseIndex([server.url], server.api_key, collection))
    app_connection(path).execute(ROW_SQL, make_row(2, comment=None))  # invalid once required
    fields = tuple(
        replace(f, optional=False, sql="upper(comment)") if f.name == "comment" else f
        for f in SEQUENCES.fields
    )
    changed = TypesenseIndex(
        [server.url], server.api_key, collection, mapping=replace(SEQUENCES, fields=fields)
    )
    with structlog.testing.capture_logs() as logs:
        result = reindex.rebuild(db, changed)
    assert (result.indexed, result.invalid, result.last_good_refused) == (2, 1, 0)
    document = changed.retrieve("2")
    assert document is not None and document["comment"] == "HELLO"  # not the old "hello"
    assert [e for e in logs if e["event"] == "last_good_refused"] == []


def test_a_5xx_keeping_a_last_good_document_fails_the_rebuild_and_the_old_collection_stays(
    db_path: Path,
    db: Database,
    worker: Worker,
    index: TypesenseIndex,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conn = app_connection(db_path)
    conn.executemany(ROW_SQL, [make_row(i) for i in (1, 2, 3)])
    drain(worker)
    conn.execute("UPDATE sequences SET element_id = 'broken' WHERE id = 2")
    drain(worker)
    old, before = index.target(), index.retrieve("2")
    imported = TypesenseIndex.import_jsonl

    def unavailable_for_2(
        self: TypesenseIndex, body: bytes, count: int, **action: str
    ) -> list[ImportResult]:
        if b'"id":"2"' in body:  # the copy of record 2's last good document
            return [ImportResult(False, 503, "Not Ready or Lagging")]
        return imported(self, body, count, **action)

    monkeypatch.setattr(TypesenseIndex, "import_jsonl", unavailable_for_2)
    with pytest.raises(OutboxSyncError, match=r"503.*the old collection stays in use"):
        reindex.rebuild(db, index)
    assert index.target() == old and index.versions() == [old]
    assert index.retrieve("2") == before


def test_a_failure_before_the_switch_leaves_the_old_collection_in_use(
    db_path: Path,
    db: Database,
    worker: Worker,
    index: TypesenseIndex,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app_connection(db_path).executemany(ROW_SQL, [make_row(i) for i in range(1, 11)])
    drain(worker)
    old = index.target()

    def busy(entries: Any) -> None:
        raise DatabaseBusyError("database stayed locked")

    original_fill = reindex._fill

    def refusing(*args: Any) -> Any:
        fill = original_fill(*args)
        fill.refused.append(1)  # as if Typesense refused a row: it must be queued again
        return fill

    monkeypatch.setattr(reindex, "_fill", refusing)
    monkeypatch.setattr(db, "enqueue", busy)
    with pytest.raises(OutboxSyncError, match="the old collection stays in use"):
        reindex.rebuild(db, index)
    assert index.target() == old and index.count() == 10
    assert index.versions() == [old]  # the new one was dropped


def plain_collection_of_ten(db_path: Path, server: Server, collection: str) -> TypesenseIndex:
    """A plain collection (no alias), as an older setup made it, and rows 1-10 to sync."""
    plain = TypesenseIndex([server.url], server.api_key, collection)
    plain.client.collections.create(SEQUENCES.collection_schema(collection))
    app_connection(db_path).executemany(ROW_SQL, [make_row(i) for i in range(1, 11)])
    return plain


def name_lost_by_a_rebuild(
    db_path: Path, db: Database, server: Server, collection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows 1-10 synced into a plain collection, then a reindex that dropped it and could not
    point the alias: the name is missing, the rebuilt collection whole."""
    plain = plain_collection_of_ten(db_path, server, collection)
    drain(daemon(db, [plain]))

    def down(self: TypesenseIndex, target: str) -> None:
        raise TypesenseUnavailableError("Typesense unreachable: ConnectError")

    monkeypatch.setattr(TypesenseIndex, "point_alias", down)
    with pytest.raises(OutboxSyncError, match="could not point the alias"):
        reindex.rebuild(db, plain)
    monkeypatch.undo()


def test_a_lost_alias_after_the_plain_collection_went_is_adopted(
    db_path: Path,
    db: Database,
    typesense_server: Server,
    collection: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name_lost_by_a_rebuild(db_path, db, typesense_server, collection, monkeypatch)
    index = TypesenseIndex([typesense_server.url], typesense_server.api_key, collection)
    index.ensure_collection()  # what the daemon does when it finds the name missing
    assert index.count() == 10
    assert export(typesense_server, collection) == sqlite_documents(db_path)


class Killed(BaseException):
    """SIGKILL, as far as a rebuild can tell: none of its own cleanup runs."""


def test_a_rebuild_killed_after_one_lost_the_name_leaves_the_name_on_a_whole_collection(
    db_path: Path,
    db: Database,
    typesense_server: Server,
    collection: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reindex dropped the plain collection and could not point the alias: the name is
    missing, its rebuilt collection whole. `outbox-sync reindex` run again and killed mid-fill
    left a newer, half-filled one, which the daemon's start took for the name, dropping the
    whole one: records out of search, nothing queued, no error. The second rebuild now
    points the name at the whole one first."""
    name_lost_by_a_rebuild(db_path, db, typesense_server, collection, monkeypatch)
    imported = TypesenseIndex.import_jsonl

    def killed(self: TypesenseIndex, body: bytes, count: int, **action: str) -> Any:
        imported(self, body, count, **action)  # the first chunk is in, then the kill
        raise Killed

    monkeypatch.setattr(TypesenseIndex, "import_jsonl", killed)
    monkeypatch.setattr(TypesenseIndex, "drop_collection", lambda self, name: None)
    index = TypesenseIndex([typesense_server.url], typesense_server.api_key, collection)
    with pytest.raises(Killed):
        reindex.rebuild(db, index, chunk=3)
    monkeypatch.undo()
    started = TypesenseIndex([typesense_server.url], typesense_server.api_key, collection)
    started.ensure_collection()  # the daemon's next start
    assert export(typesense_server, collection) == sqlite_documents(db_path)


def failing_once(monkeypatch: pytest.MonkeyPatch, *, made: bool = False) -> None:
    """point_alias fails once, as after a timeout and its retry (Typesense away for a moment);
    `made`: Typesense made the switch all the same (the answer timed out)."""
    real = TypesenseIndex.point_alias
    failed: list[str] = []

    def point_alias(self: TypesenseIndex, target: str) -> None:
        if not failed:
            failed.append(target)
            if made:
                real(self, target)
            raise TypesenseUnavailableError("Typesense unreachable: ReadTimeout")
        real(self, target)

    monkeypatch.setattr(TypesenseIndex, "point_alias", point_alias)


def failed_reindex(db: Database, collection: str) -> None:
    """Ask the running daemon to reindex `collection`; its answer must be that it failed. On a
    connection of its own: the worker's thread uses `db`, and its raw reads switch the
    connection's text factory meanwhile (a status read on it came back as "b'...'")."""
    beside = Database(Path(db.path))
    token = reindex.request(beside, [collection])
    state = wait_until(
        lambda: (s := reindex.status(beside, token)) and s["state"] != "running" and s,
        what="the reindex outcome",
    )
    assert state["state"] == "failed"


@pytest.mark.parametrize("made", [False, True], ids=["not made", "made, answer timed out"])
def test_a_failed_alias_switch_leaves_the_daemon_writing_where_searches_read(
    db_path: Path,
    db: Database,
    worker: Worker,
    index: TypesenseIndex,
    typesense_server: Server,
    collection: str,
    monkeypatch: pytest.MonkeyPatch,
    made: bool,
) -> None:
    app_connection(db_path).executemany(ROW_SQL, [make_row(i) for i in range(1, 11)])
    with running(worker):
        wait_until(lambda: len(export(typesense_server, collection)) == 10, what="10 documents")
        failing_once(monkeypatch, made=made)
        failed_reindex(db, collection)
        app_connection(db_path).execute(ROW_SQL, make_row(11))  # the application goes on
        wait_until(lambda: db.counts(SEQUENCES)["pending"] == 0, what="row 11 applied")
        searched = export(typesense_server, collection)  # through the name, as searches read
    assert "11" in searched, f"row 11 acknowledged but not searchable (alias -> {index.target()})"
    assert searched == sqlite_documents(db_path)
    assert index.versions() == [index.target()]  # the collection not in use is dropped


def test_a_failed_alias_switch_from_a_plain_collection_gives_searches_the_name_back_at_once(
    db_path: Path,
    db: Database,
    typesense_server: Server,
    collection: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plain = plain_collection_of_ten(db_path, typesense_server, collection)
    worker = daemon(db, [plain], min_backoff_s=0.05, max_backoff_s=0.5)
    with running(worker):
        wait_until(lambda: db.counts(SEQUENCES)["pending"] == 0, what="the first drain")
        failing_once(monkeypatch)
        failed_reindex(db, collection)

        def answering() -> dict[str, Any] | None:
            with contextlib.suppress(httpx.HTTPStatusError):  # 404 while the name is missing
                return export(typesense_server, collection)
            return None

        # no write comes to reveal the missing name: the daemon must look for it by itself
        assert wait_until(answering, timeout_s=15, what="the name to answer") == (
            sqlite_documents(db_path)
        )
        app_connection(db_path).execute(ROW_SQL, make_row(11))
        wait_until(lambda: db.counts(SEQUENCES)["pending"] == 0, what="row 11 applied")
        searched = export(typesense_server, collection)
    assert "11" in searched and searched == sqlite_documents(db_path)
    assert plain.target() != collection  # an alias now, of the rebuilt collection


# -- sync errors -------------------------------------------------------------------------------


def test_sync_errors_of_null_keys_close_and_a_no_op_update_adds_none(
    tmp_path: Path, index: TypesenseIndex
) -> None:
    loose = "id, element_type, element_id, sequence_number, comment, created_at"
    path = legacy(tmp_path, f"CREATE TABLE sequences ({loose})")
    conn = app_connection(path)
    conn.execute(ROW_SQL, make_row(6, id=None))
    conn.execute(ROW_SQL, make_row(7, element_id=None))
    conn.execute(ROW_SQL, make_row(8, comment=b"\x00binary"))
    db = Database(path)
    worker = daemon(db, [index])
    drain(worker)
    errors = {e["record_key"]: e["error"] for e in sync_errors.find(db)}
    assert errors == {
        None: "id: expected an integer, got NULL",
        7: "element_id: is NULL but the field is required",
        8: "comment: expected text, got a BLOB of 7 bytes",
    }
    conn.execute("UPDATE sequences SET comment = comment WHERE id = 7")  # a no-op update
    drain(worker)
    assert len(sync_errors.find(db)) == 3  # still one open error per record
    conn.execute("DELETE FROM sequences WHERE id IS NULL")
    drain(worker)
    assert None not in {e["record_key"] for e in sync_errors.find(db)}
    [closed] = [e for e in sync_errors.find(db, status="resolved") if e["record_key"] is None]
    assert closed["resolution"] == "superseded"


@pytest.mark.parametrize(
    ("key", "bound", "problem"),
    [
        (None, "?", "id: expected an integer, got NULL"),
        (b"\x01\x02", "?", "id: expected an integer, got a BLOB of 2 bytes"),
        (b"A\xffB", "CAST(? AS TEXT)", "id: expected an integer, got text 'A\ufffdB'"),
    ],
)
def test_the_error_of_a_null_or_blob_key_stays_open_while_a_row_of_it_remains(
    tmp_path: Path,
    typesense_server: Server,
    index: TypesenseIndex,
    key: Any,
    bound: str,
    problem: str,
) -> None:
    """A loose table's rows of a NULL key (or of one BLOB key, or text that is not UTF-8) are
    one record with one open error. Deleting one of two such rows closed it, the other row
    still there and still not in Typesense (a reviewer's suspicion): it closes only once no
    row of that key remains."""
    loose = "id, element_type, element_id, sequence_number, comment, created_at"
    path = legacy(tmp_path, f"CREATE TABLE sequences ({loose})")
    conn = app_connection(path)
    conn.executemany(ROW_SQL.replace("(?,", f"({bound},", 1), [make_row(i, id=key) for i in (6, 7)])
    conn.execute(ROW_SQL, make_row(8))
    db = Database(path)
    worker = daemon(db, [index])
    drain(worker)
    [error] = sync_errors.find(db)
    assert (error["record_key"], error["error"]) == (key, problem)
    conn.execute(f"DELETE FROM sequences WHERE id IS {bound} AND sequence_number = 6", (key,))
    drain(worker)
    assert [e["id"] for e in sync_errors.find(db)] == [error["id"]]  # row 7 is still there
    assert set(export(typesense_server, index.collection)) == {"8"}
    conn.execute(f"DELETE FROM sequences WHERE id IS {bound}", (key,))
    drain(worker)
    assert sync_errors.find(db) == []
    [closed] = sync_errors.find(db, status="resolved")
    assert (closed["id"], closed["resolution"]) == (error["id"], "superseded")


def test_a_blob_key_is_one_sync_error_that_holds_nothing_back_and_closes_with_its_row(
    tmp_path: Path, typesense_server: Server, index: TypesenseIndex
) -> None:
    """A BLOB key reached the errors' JSON and crashed the daemon, at every start, with the
    entries behind it waiting (found by a hostile review)."""
    loose = "id, element_type, element_id, sequence_number, comment, created_at"
    path = legacy(tmp_path, f"CREATE TABLE sequences ({loose})")
    conn = app_connection(path)
    conn.execute(ROW_SQL, make_row(6, id=b"\x01\x02"))
    conn.execute(ROW_SQL, make_row(7))
    conn.execute(ROW_SQL, make_row(8, element_id=None))
    db = Database(path)
    worker = daemon(db, [index])
    drain(worker)
    assert db.backlog()[0] == 0
    assert set(export(typesense_server, index.collection)) == {"7"}
    errors = {e["record_key"]: e["error"] for e in sync_errors.find(db)}
    assert errors == {
        b"\x01\x02": "id: expected an integer, got a BLOB of 2 bytes",
        8: "element_id: is NULL but the field is required",
    }
    conn.execute("UPDATE sequences SET comment = 'again' WHERE id = ?", (b"\x01\x02",))
    drain(worker)
    assert len(sync_errors.find(db)) == 2  # the same failure again adds nothing
    conn.execute("DELETE FROM sequences WHERE id = ?", (b"\x01\x02",))
    drain(worker)
    assert [e["record_key"] for e in sync_errors.find(db)] == [8]
    [closed] = sync_errors.find(db, status="resolved")
    assert (closed["record_key"], closed["resolution"]) == (b"\x01\x02", "superseded")


def test_a_blob_key_found_by_init_is_a_sync_error_too(
    tmp_path: Path, typesense_server: Server, index: TypesenseIndex
) -> None:
    """The fill queued a BLOB key decoded as text, which names no row: the drain took it for
    a deleted record, with no error (found by a hostile review)."""
    loose = "id, element_type, element_id, sequence_number, comment, created_at"
    path = tmp_path / "legacy.db"
    app = app_connection(path)
    app.execute(f"CREATE TABLE sequences ({loose})")
    app.execute(ROW_SQL, make_row(6, id=b"\x01\x02"))
    app.execute(ROW_SQL, make_row(7))
    from outbox_sync import schema

    db = Database(path, create=True)
    assert schema.init(db, [SEQUENCES]).filling == {"sequences": 2}
    drain(daemon(db, [index]))
    assert set(export(typesense_server, index.collection)) == {"7"}
    errors = {e["record_key"]: e["error"] for e in sync_errors.find(db)}
    assert errors == {b"\x01\x02": "id: expected an integer, got a BLOB of 2 bytes"}


# -- monitoring --------------------------------------------------------------------------------


def test_an_outage_with_an_empty_outbox_is_one_line_each_way_and_one_outage(
    db_path: Path, db: Database, tmp_path: Path, collection: str
) -> None:
    server = LocalTypesense(tmp_path / "typesense", api_key=API_KEY, port=free_port())
    server.start()
    try:
        index = TypesenseIndex([server.url], API_KEY, collection, timeout_s=2)
        telemetry = Telemetry()
        worker = daemon(db, [index], telemetry=telemetry, min_backoff_s=0.05, max_backoff_s=0.2)
        with structlog.testing.capture_logs() as logs, running(worker):
            wait_until(lambda: telemetry.up, what="the first health probe")
            server.stop()
            wait_until(
                lambda: any(e["event"] == "sync_paused" for e in logs), what="the daemon to notice"
            )
            time.sleep(3)  # an outage of some seconds, over many backoff rounds
            server.start()
            wait_until(lambda: any(e["event"] == "sync_resumed" for e in logs), what="recovery")
        events = [e["event"] for e in logs]
        assert events.count("sync_paused") == 1 and events.count("sync_resumed") == 1
        from outbox_sync.worker import save_stats

        save_stats(db, telemetry)
        outages = build_report(db, time.time() - 600)["outages"]
        assert outages["count"] == 1 and outages["longest"]["seconds"] >= 3
    finally:
        server.stop()


def test_metrics_answer_while_an_idle_connection_stays_open() -> None:
    port = free_port()
    server = serve_metrics(Telemetry(), "127.0.0.1", port)
    try:
        idle = socket.create_connection(("127.0.0.1", port))  # sends nothing, ever
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
            assert response.status_code == 200 and "outbox_sync_" in response.text
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 503
        finally:
            idle.close()
    finally:
        server.shutdown()
        server.server_close()


def test_a_file_switched_to_rollback_journal_and_locked_pauses_the_daemon(
    db_path: Path, index: TypesenseIndex, typesense_server: Server, collection: str
) -> None:
    app = app_connection(db_path)
    # leaving WAL takes the file alone: a connection the fixture left may still be closing
    wait_until(lambda: switched_to_delete(app), what="the switch to a rollback journal")
    worker = daemon(Database(db_path, busy_timeout_s=0.3), [index], min_backoff_s=0.05)
    with structlog.testing.capture_logs() as logs, running(worker) as thread:
        app.execute(ROW_SQL, make_row(1))
        wait_until(lambda: index.retrieve("1"), what="the first sync")
        app.execute("BEGIN EXCLUSIVE")  # readers wait too, in this journal mode
        app.execute(ROW_SQL, make_row(2))
        wait_until(lambda: any(e["event"] == "sync_paused" for e in logs), what="a pause")
        assert thread.is_alive()
        app.execute("COMMIT")
        wait_until(lambda: index.retrieve("2"), what="the sync after the lock")
    assert export(typesense_server, collection) == sqlite_documents(db_path)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["errors", "show", "99999999999999999999"], "is not in the range"),
        (["errors", "show", str(2**63)], "is not in the range"),
        (["errors", "retry", str(2**63)], "is not in the range"),
        (["errors", "list", "--since", "999999999999w"], "is too far from today"),
        (["report", "--since", "999999999999w"], "is too far from today"),
    ],
)
def test_numbers_out_of_range_are_one_line_and_exit_2(
    db_path: Path, typesense_server: Server, args: list[str], says: str
) -> None:
    result = invoke(args, typesense_server, db_path, "x")
    assert result.exit_code == 2
    assert says in one_line(result)


def test_a_url_with_credentials_is_refused_without_echoing_them(
    db_path: Path, typesense_server: Server
) -> None:
    url = "http://admin:hunter2secret@127.0.0.1:8108"
    result = invoke(["status"], typesense_server, db_path, "x", TYPESENSE_URL=url)
    line = one_line(result)
    assert "must not carry credentials" in line and "127.0.0.1:8108" in line
    assert "hunter2secret" not in line and "admin" not in line


def test_a_database_in_a_missing_directory_says_so(
    tmp_path: Path, typesense_server: Server
) -> None:
    missing = tmp_path / "no-such-dir" / "app.db"
    for command in (["run", "--once"], ["init"]):
        line = one_line(invoke(command, typesense_server, missing, "x"))
        assert f"directory {missing.parent} does not exist" in line


def test_help_says_what_an_unset_url_does_for_each_command(typesense_server: Server) -> None:
    for command in (["status"], ["search"], ["errors", "list"], ["report"], ["run"]):
        text = " ".join(
            invoke([*command, "--help"], typesense_server, Path("x"), "x").output.split()
        )
        assert "which `run` starts" in text and "the other commands reach while it runs" in text


@pytest.mark.parametrize("deleted", ["text", "blob"])
def test_deleting_one_of_a_text_and_a_blob_row_of_the_same_bytes_leaves_the_others_error_open(
    tmp_path: Path, typesense_server: Server, collection: str, deleted: str
) -> None:
    """sync_errors holds a key that is not UTF-8 as a BLOB: a real BLOB key of the same bytes
    and that TEXT are one record there (db.record_keys), two rows in the table. Deleting one
    of them asked `covers` of its own form only, took the record for gone and closed the
    error, the other row still there and still not in Typesense (found by a review)."""
    app, mapping, db = initialized_characters(tmp_path / "c.db", collection)
    index = characters_index(db, mapping, typesense_server, collection)
    worker = daemon(db, [index])
    insert_not_utf8(app)  # TEXT 'A\xffB'
    app.execute(CHARACTER_SQL, character(NOT_UTF8))  # x'41FF42': another row
    drain(worker)
    assert [e["record_key"] for e in sync_errors.find(db)] == [NOT_UTF8]
    app.execute("DELETE FROM characters WHERE typeof(slug) = ?", (deleted,))
    remains = app.execute("SELECT typeof(slug), CAST(slug AS BLOB) FROM characters").fetchall()
    assert remains == [({"text": "blob", "blob": "text"}[deleted], NOT_UTF8)]
    drain(worker)
    assert [e["record_key"] for e in sync_errors.find(db)] == [NOT_UTF8]  # a row remains


@pytest.mark.parametrize("key", [None, NOT_UTF8])
def test_a_soft_delete_of_the_last_row_of_an_odd_key_closes_its_error(
    tmp_path: Path, typesense_server: Server, collection: str, key: Any
) -> None:
    """Leaving `where` is a delete (docs/tables.md), but the trigger queues it as an upsert, and
    every upsert of a NULL key (or text that is not UTF-8) failed without asking whether a row
    is covered: the error never closed, though no row of that key was left to sync (found by
    a review). A hard delete of the same row closed it."""
    app, mapping, db = initialized_characters(tmp_path / "c.db", collection)
    index = characters_index(db, mapping, typesense_server, collection)
    worker = daemon(db, [index])
    if key is None:
        app.execute(CHARACTER_SQL, character(None))
    else:
        insert_not_utf8(app, key)
    drain(worker)
    [error] = sync_errors.find(db)
    assert error["record_key"] == key
    app.execute("UPDATE characters SET deleted_at = '2026-12-01T00:00:00Z'")  # soft delete
    assert db.covers(mapping, None if key is None else RawText(key)) is False
    drain(worker)
    assert sync_errors.find(db) == []  # no row of that key is covered: nothing is wrong


def users(
    path: Path, server: Server, collection: str, key_type: str, url: str | None = None
) -> tuple[sqlite3.Connection, Worker, TypesenseIndex]:
    """A mapping of `users` by a TEXT key declared `key_type`, synced into `collection` (through
    `url` when given: a proxy)."""
    mapping = Mapping(
        table="users", key="email", collection=collection, fields=(Field("name", "string"),)
    )
    app = app_connection(path)
    app.execute(f"CREATE TABLE users (email {key_type}, name TEXT NOT NULL)")
    db = Database(path, create=True)
    schema.init(db, [mapping])
    [mapping] = schema.check(db, [mapping])
    index = TypesenseIndex([url or server.url], API_KEY, collection, mapping=mapping)
    index.ensure_collection()
    return app, daemon(db, [index]), index


@pytest.mark.parametrize("change", ["replaced", "renamed"])
def test_a_key_the_columns_collation_takes_for_another_is_another_document(
    tmp_path: Path, typesense_server: Server, collection: str, change: str
) -> None:
    """A TEXT key declared COLLATE NOCASE (emails, user names): 'Bob@x.com' and 'bob@x.com' are
    one key to SQLite and two documents to Typesense. Replacing the row (a delete and an insert
    in one commit) or renaming its key in case only leaves exactly the new document. Before,
    the drain found the delete's record through the column's collation and sent another
    upsert of the new row instead, and the update trigger's `IS NOT` saw no change of key:
    'Bob@x.com' stayed in search, and the audit's repair (a delete entry) went the same way."""
    path = tmp_path / "users.db"
    app, worker, index = users(
        path, typesense_server, collection, "TEXT COLLATE NOCASE PRIMARY KEY"
    )

    def names() -> dict[str, str]:
        return {
            key: document["name"] for key, document in export(typesense_server, collection).items()
        }

    app.execute("INSERT INTO users VALUES ('Bob@x.com', 'Bob')")
    drain(worker)
    assert names() == {"Bob@x.com": "Bob"}
    if change == "replaced":
        app.executescript(
            "BEGIN; DELETE FROM users WHERE email = 'Bob@x.com';"
            " INSERT INTO users VALUES ('bob@x.com', 'bob'); COMMIT;"
        )
    else:
        app.execute("UPDATE users SET email = 'bob@x.com', name = 'bob'")
    drain(worker)
    assert names() == {"bob@x.com": "bob"}
    db = worker.applier.db
    assert sync_errors.find(db) == []
    assert not db.covers(index.mapping, "Bob@x.com") and db.covers(index.mapping, "bob@x.com")


def test_a_503_on_a_delete_by_url_is_retried_once_immediately(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """A key a filter cannot list (here a leading space) is deleted by its URL: server trouble
    there is retried once at once, as for every other request, not sent again with the whole
    batch after a pause (an outage)."""
    with FaultProxy(typesense_server.url) as proxy:
        path = tmp_path / "users.db"
        app, worker, _ = users(path, typesense_server, collection, "TEXT PRIMARY KEY", proxy.url)
        app.execute("INSERT INTO users VALUES (' padded', 'p')")
        worker.applier.apply_once()
        assert list(export(typesense_server, collection)) == [" padded"]
        app.execute("DELETE FROM users")
        proxy.add(Fault("status", status=503, method="DELETE"))
        report = worker.applier.apply_once()
        deletes = [(r.fault, r.status) for r in proxy.requests if r.method == "DELETE"]
    assert report.deleted == 1
    assert deletes == [("status", 503), (None, 200)]
    assert export(typesense_server, collection) == {}


def test_audit_survives_a_reindex_switching_the_alias_during_its_export(
    db_path: Path,
    db: Database,
    worker: Worker,
    index: TypesenseIndex,
    typesense_server: Server,
    collection: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reindex (the daemon's, or `outbox-sync reindex`) points the alias at the new
    collection and drops the old one while an `outbox-sync audit` streams the export of the
    old one (over a large table an export takes many seconds). Typesense 0.24.1 then ends
    the export with a line {"message": "Not Found"}, or leaves it hanging until the read
    timeout: either way the audit exits 2 with 'Typesense unreachable ... check that Typesense
    is up and healthy', while nothing is wrong but the moment it ran at."""
    insert_rows(db_path, range(1, 20_001))
    drain(worker)
    old = index.target()
    assert old is not None
    # the reindex has filled its new collection (as `rebuild` does, before its switch)
    new = index.create_versioned()
    exported = httpx.get(
        f"{typesense_server.url}/collections/{old}/documents/export",
        headers={"X-TYPESENSE-API-KEY": typesense_server.api_key},
        timeout=60,
    ).content
    by_hand(typesense_server, "POST", f"/collections/{new}/documents/import", content=exported)
    original = TypesenseIndex.export_lines
    switched: list[bool] = []

    def export_lines(self: TypesenseIndex, filter_by: str | None = None) -> Generator[str]:
        for n, line in enumerate(original(self, filter_by)):
            yield line
            if filter_by is None and n == 100 and not switched:
                # ...and switches meanwhile: points the alias at the new collection and
                # drops the one being exported
                reindex._switch(index, old, new)
                switched.append(True)

    monkeypatch.setattr(TypesenseIndex, "export_lines", export_lines)
    # OUTBOX_SYNC_TIMEOUT: where the broken-off export hangs, it fails after that
    result = invoke(["audit"], typesense_server, db_path, collection, OUTBOX_SYNC_TIMEOUT="2")
    assert switched and index.target() == new  # the switch happened during the export
    assert result.exit_code == 0, result.output
    assert "consistent" in result.output
    assert '"event": "audit_restarted"' in result.output


def test_audit_judges_rows_as_the_collection_lets_the_daemon_index_them(
    db_path: Path, db: Database, typesense_server: Server, collection: str
) -> None:
    """docs/tables.md: an existing collection is used as it is where it says int64 and the
    mapping int32 (or the reverse): the daemon indexes element_id 3,000,000,000 into it, and
    its own audits find nothing. `outbox-sync audit` judges the row with the mapping's int32
    instead: 'invalid' drift, exit 1 at every run, and `--repair` cannot fix it."""
    schema_ = SEQUENCES.collection_schema(collection)
    for field in schema_["fields"]:
        if field["name"] == "element_id":
            field["type"] = "int64"
    by_hand(typesense_server, "POST", "/collections", json=schema_)
    index = TypesenseIndex([typesense_server.url], typesense_server.api_key, collection)
    index.ensure_collection()  # as `run` does: the collection taken as it is
    app_connection(db_path).execute(ROW_SQL, make_row(1, element_id=3_000_000_000))
    drain(daemon(db, [index]))
    assert (
        by_hand(typesense_server, "GET", f"/collections/{collection}/documents/1").json()[
            "element_id"
        ]
        == 3_000_000_000
    )
    assert db.counts(SEQUENCES)["sync_errors_open"] == 0

    with Audit(db, index) as daemons_own:  # the daemon's audit (reconcile.py): consistent
        assert daemons_own.run().consistent

    result = invoke(["audit", "--json"], typesense_server, db_path, collection)
    report = json.loads(result.stdout)
    assert report["invalid"]["count"] == 0, report["invalid"]
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("problem", "said"),
    [
        ("missing collection", "does not exist"),
        ("wrong key", "refused the API key"),
    ],
)
def test_check_says_what_is_wrong_with_typesense_not_that_it_does_not_answer(
    db_path: Path, typesense_server: Server, collection: str, problem: str, said: str
) -> None:
    """A monitor's line for a collection that is gone (or a key that was rotated) reads
    'Typesense does not answer (Not Found)': on-call goes looking for a dead server that is
    up and answering."""
    env = {"TYPESENSE_API_KEY": "wrong-key"} if problem == "wrong key" else {}
    with DaemonLock(db_path):  # a daemon runs
        result = invoke(["check"], typesense_server, db_path, collection, **env)
    line = result.output.strip()
    assert result.exit_code == 2, line
    assert "does not answer" not in line and said in line, line


def test_audit_of_a_table_a_migration_took_away_says_it_is_gone(
    db_path: Path, db: Database, worker: Worker, typesense_server: Server, collection: str
) -> None:
    """A migration renamed `sequences` away (or dropped it, to make it again): `status` and
    `check` say 'table sequences is gone'; `audit` says it 'has no primary key and every name
    of its rowid is a column', which sends on-call looking at the wrong thing."""
    insert_rows(db_path, range(1, 11))
    drain(worker)
    app_connection(db_path).execute("ALTER TABLE sequences RENAME TO sequences_before")
    result = invoke(["audit"], typesense_server, db_path, collection)
    assert result.exit_code == 2, result.output
    assert "no primary key" not in result.output
    assert "table sequences is gone" in result.output, result.output


def test_reindex_through_the_daemon_of_a_collection_it_does_not_sync_is_not_a_success(
    db_path: Path,
    start_daemon: Callable[..., Daemon],
    daemon_env: dict[str, str],
    collection: str,
) -> None:
    """The daemon syncs `collection` (its unit sets OUTBOX_SYNC_COLLECTION); on-call's shell
    has another name (or none: `sequences`). `outbox-sync reindex` asks the daemon, which
    rebuilds none of its collections and answers 'done' with no results: the command prints
    nothing and exits 0, as if the rebuild had happened."""
    insert_rows(db_path, range(1, 11))
    daemon = start_daemon()
    db = Database(db_path)
    wait_until(lambda: db.counts(SEQUENCES)["pending"] == 0, what="the initial drain")
    env = daemon_env | {"OUTBOX_SYNC_COLLECTION": f"{collection}_other"}
    result = run_module(["reindex"], env, timeout_s=120)
    assert daemon.process.poll() is None
    assert result.returncode != 0, (result.stdout, result.stderr)


@pytest.mark.parametrize("command", [["check"], ["status"], ["audit"], ["search", "*"]])
def test_a_ca_file_that_holds_no_certificate_is_one_line_not_a_traceback(
    tmp_path: Path, db_path: Path, typesense_server: Server, command: list[str]
) -> None:
    """--ca-file (OUTBOX_SYNC_CA_FILE) naming a file that is there but is no PEM bundle (the
    key instead of the certificate, a DER file, a truncated copy): every Typesense command
    dies with ssl.SSLError's traceback; `check` exits 1 (WARNING) instead of UNKNOWN."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN PRIVATE KEY-----\nnot a certificate\n")
    https = typesense_server.url.replace("http://", "https://")
    result = invoke(
        command,
        typesense_server,
        db_path,
        "x",
        TYPESENSE_URL=https,
        OUTBOX_SYNC_CA_FILE=str(bundle),
    )
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    # UNKNOWN for check; audit keeps 1 for drift
    assert result.exit_code == {"check": 3, "audit": 2}.get(command[0], 1), result.output
    assert str(bundle) in one_line(result)


def test_search_matches_the_fields_its_help_names(
    db_path: Path, db: Database, worker: Worker, typesense_server: Server, collection: str
) -> None:
    """`search --help` and docs/oncall.md said QUERY matches element_type and comment; it
    matches every indexed text field, created_at too: they say so now."""
    app_connection(db_path).execute(
        ROW_SQL, make_row(1, comment="nothing to see", created_at="2023-10-01T12:01:00Z")
    )
    drain(worker)
    result = invoke(["search", "2023", "--json"], typesense_server, db_path, collection)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["found"] == 1, result.stdout
    said = " ".join(
        invoke(["search", "--help"], typesense_server, db_path, collection).output.split()
    )
    assert "element_type, comment and created_at" in said


def test_a_text_key_that_is_not_utf8_at_a_page_end_does_not_hide_the_rows_after_it(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """A WITHOUT ROWID table is read in pages by its primary key (`db.pages`). When a page
    ends on a key stored as TEXT that is not UTF-8 (supported: a sync error of its own), the
    next page starts after that key decoded with U+FFFD (`_bindable`), which sorts after the
    raw bytes: every key between them ('abé', 'abц', 'ab中' after b'ab\\x80') is skipped by
    the fill, by a reindex and by the audit alike. The fill leaves 'abé' out of the
    collection, nothing is queued for it, no error names it, and the audit, which skips its
    row too, says the collection is consistent."""
    path = tmp_path / "characters.db"
    conn = app_connection(path)
    conn.executescript(f"{CHARACTERS} WITHOUT ROWID; {TAGS};")
    conn.execute("BEGIN")  # rows before `init`: the daemon fills the collection from the table
    conn.executemany(CHARACTER_SQL, [character(f"a{i:05d}") for i in range(DEFAULT_PAGE_ROWS - 1)])
    insert_not_utf8(conn, b"ab\x80")  # the last key of the first page, in key order
    conn.executemany(CHARACTER_SQL, [character("abé"), character("zz")])
    conn.execute("COMMIT")
    mapping = characters_mapping(collection)
    db = Database(path, create=True)
    assert schema.init(db, [mapping]).filling == {"characters": DEFAULT_PAGE_ROWS + 2}
    index = characters_index(db, mapping, typesense_server, collection)
    drain(daemon(db, [index]))
    assert db.backlog()[0] == 0
    open_errors = [e["record_key"] for e in sync_errors.find(db)]
    with Audit(db, index) as audit:
        summary = audit.run()
    searched = export(typesense_server, collection)
    assert len(searched) == DEFAULT_PAGE_ROWS + 1 and "abé" in searched, (
        f"{len(searched)} documents, 'abé' {'in' if 'abé' in searched else 'missing'};"
        f" open errors {open_errors}; the audit: {summary}"
    )
    assert len(open_errors) == 1, f"the key that is not UTF-8 has no sync error: {open_errors}"
    assert summary.rows == DEFAULT_PAGE_ROWS + 2, summary


def test_enqueue_keeps_the_order_and_stores_a_key_that_is_not_utf8_as_text(db: Database) -> None:
    """`Database.enqueue` writes its entries in the order given, whatever their keys: a RawText
    as the TEXT it was read from (as the triggers write it), bytes as a BLOB, others as they
    are."""
    entries = [(1, "upsert"), (RawText(b"a\xff"), "delete"), (b"\xff", "upsert"), ("x", "upsert")]
    db.enqueue("sequences", entries)
    rows = db.conn.execute(
        "SELECT typeof(record_key), CAST(record_key AS BLOB), op FROM outbox ORDER BY id"
    ).fetchall()
    assert rows == [
        ("integer", b"1", "upsert"),
        ("text", b"a\xff", "delete"),
        ("blob", b"\xff", "upsert"),
        ("text", b"x", "upsert"),
    ]
