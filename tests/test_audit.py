"""`outbox-sync audit` against a real Typesense and a real SQLite file: drift made behind the
daemon's back is found exactly, repaired through the outbox, and gone after the daemon drains."""

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from outbox_sync import audit as audit_module
from outbox_sync import schema, sync_errors
from outbox_sync.audit import Audit
from outbox_sync.db import FIRST_READ_ROWS, Database
from outbox_sync.errors import TypesenseUnavailableError
from outbox_sync.localserver import free_port
from outbox_sync.mapping import SEQUENCES
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import Worker, daemon
from tests.support.app import (
    ROW_SQL,
    app_connection,
    insert_large_rows,
    insert_rows,
    make_row,
    sqlite_documents,
)
from tests.support.characters import (
    CHARACTER_SQL,
    character,
    characters_config,
    characters_index,
    initialized_characters,
    insert_not_utf8,
)
from tests.support.cli import invoke, one_line
from tests.support.daemon import drain
from tests.support.fake_index import FakeIndex
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.typesense import Server, by_hand, export

DOCUMENT = {"element_type": "script", "element_id": 1, "sequence_number": 1, "created_at": "x"}


def audit(server: Server, db_path: Path, collection: str, *args: str) -> tuple[int, Any]:
    result = invoke(["audit", "--json", *args], server, db_path, collection)
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.answer_shapes
def test_drift_behind_the_daemons_back_is_found_exactly_and_repaired(
    db_path: Path,
    db: Database,
    worker: Worker,
    index: TypesenseIndex,
    served: Server,
    typesense_server: Server,
    collection: str,
) -> None:
    assert index.target() != collection  # the collection name is an alias, as the daemon makes it
    insert_rows(db_path, range(1, 31))
    drain(worker)
    code, report = audit(served, db_path, collection)
    assert code == 0 and report["consistent"] is True
    assert (report["rows"], report["documents"]) == (30, 30)

    documents = f"/collections/{collection}/documents"
    by_hand(typesense_server, "DELETE", f"{documents}/3")
    by_hand(typesense_server, "PATCH", f"{documents}/5", json={"comment": "edited by hand"})
    by_hand(typesense_server, "PATCH", f"{documents}/6", json={"sequence_number": 999})
    by_hand(typesense_server, "POST", documents, json={"id": "9999", **DOCUMENT})
    by_hand(typesense_server, "POST", documents, json={"id": "abc", **DOCUMENT})

    code, report = audit(served, db_path, collection)
    assert code == 1 and report["consistent"] is False
    assert report["missing"] == {"count": 1, "ids": [3]}
    assert report["extra"] == {"count": 2, "ids": [9999, "abc"]}
    assert report["stale"] == {
        "count": 2,
        "ids": [5, 6],
        "details": {"5": "comment", "6": "sequence_number"},
    }
    assert report["invalid"]["count"] == 0 and report["with_open_error"]["count"] == 0
    assert report["repaired"] is None
    assert db.counts(SEQUENCES)["pending"] == 0  # a plain audit changes nothing

    code, report = audit(served, db_path, collection, "--repair")
    assert code == 1  # drift was found (and enqueued)
    assert report["repaired"] == {"enqueued": 4, "deleted": ["abc"]}
    queued = db.conn.execute("SELECT record_key, op FROM outbox ORDER BY record_key").fetchall()
    assert queued == [(3, "upsert"), (5, "upsert"), (6, "upsert"), (9999, "delete")]

    drain(worker)
    code, report = audit(served, db_path, collection)
    assert code == 0 and report["consistent"] is True
    assert export(typesense_server, collection) == sqlite_documents(db_path)


def test_documents_named_dot_and_dot_dot_are_repaired_one_by_one_not_the_collection(
    db_path: Path,
    worker: Worker,
    served: Server,
    typesense_server: Server,
    collection: str,
) -> None:
    """The repair deletes a document no integer key can name by its URL, .../documents/ID:
    for the id `..` the HTTP client resolved it to the collection's URL, and the repair (the
    daemon's audits too) dropped the whole collection; for `.` Typesense refused the request
    (400), and the repair failed before it queued the rest (found by a hostile review)."""
    insert_rows(db_path, range(1, 6))
    drain(worker)
    documents = f"/collections/{collection}/documents"
    for doc_id in ("..", ".", "..."):
        by_hand(typesense_server, "POST", documents, json={"id": doc_id, **DOCUMENT})
    by_hand(typesense_server, "DELETE", f"{documents}/3")

    code, report = audit(served, db_path, collection, "--repair")
    assert code == 1 and report["missing"]["ids"] == [3]
    assert sorted(report["repaired"]["deleted"]) == [".", "..", "..."]
    drain(worker)
    assert audit(served, db_path, collection)[0] == 0
    assert export(typesense_server, collection) == sqlite_documents(db_path)


def test_a_record_a_text_dependency_queued_is_waiting_not_drift(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """A `depends_on` column of TEXT affinity queues an integer key as text ('1'); the drain
    finds row 1 by it, and the audit took the record waiting for stale drift (exit 1; --repair
    queued it again): its scratch file compared '1' with 1 (found by a hostile review)."""
    path, config = tmp_path / "app.db", tmp_path / "app.toml"
    config.write_text(
        f'[[sync]]\ntable = "posts"\nkey = "id"\ncollection = "{collection}"\nfields = [\n'
        '  { name = "title", type = "string" },\n'
        '  { name = "comments", type = "int32", sql = "(SELECT count(*) FROM comments AS c'
        ' WHERE c.post_id = posts.id)" },\n]\n'
        '[[sync.depends_on]]\ntable = "comments"\nkey = "post_id"\n'
    )
    app = app_connection(path)
    app.executescript(
        "CREATE TABLE posts (id INTEGER PRIMARY KEY, title TEXT NOT NULL);"
        "CREATE TABLE comments (id INTEGER PRIMARY KEY, post_id TEXT, body TEXT);"
        "INSERT INTO posts VALUES (1, 'hello');"
    )
    env = {"OUTBOX_SYNC_CONFIG": str(config)}

    def command(*args: str) -> Any:
        result = invoke(list(args), typesense_server, path, None, **env)
        assert result.exit_code in (0, 1), result.output
        return result

    command("init")
    command("run", "--once", "--audit-every", "0")
    app.execute("INSERT INTO comments (post_id, body) VALUES (1, 'first')")
    assert app.execute("SELECT record_key FROM outbox").fetchall() == [("1",)]
    waiting = command("audit", "--json")
    report = json.loads(waiting.stdout)
    assert waiting.exit_code == 0 and report["consistent"] is True, report
    assert report["waiting_in_outbox"] == 1 and report["stale"]["count"] == 0
    command("run", "--once", "--audit-every", "0")
    assert export(typesense_server, collection)["1"]["comments"] == 1


def test_the_terminal_view_caps_the_ids_and_says_what_to_do(
    db_path: Path, worker: Worker, typesense_server: Server, collection: str
) -> None:
    insert_rows(db_path, range(1, 41))
    drain(worker)
    by_hand(
        typesense_server,
        "DELETE",
        f"/collections/{collection}/documents",
        params={"filter_by": "sequence_number:<=25"},
    )
    result = invoke(["audit"], typesense_server, db_path, collection)
    assert result.exit_code == 1, result.output
    assert "40 rows, 15 documents: drift found" in result.output
    assert "missing          25  1, 2, 3" in result.output
    assert "… and 5 more (--json lists all)" in result.output
    assert "`outbox-sync audit --repair` enqueues them" in result.output
    _, report = audit(typesense_server, db_path, collection)
    assert report["missing"]["ids"] == list(range(1, 26))


def test_records_waiting_in_the_outbox_are_not_drift(
    db_path: Path, db: Database, worker: Worker, typesense_server: Server, collection: str
) -> None:
    app = app_connection(db_path)
    insert_rows(app, range(1, 11))
    drain(worker)
    app.execute(ROW_SQL, make_row(11))  # not indexed yet
    app.execute("UPDATE sequences SET comment = 'changed' WHERE id = 2")  # not applied yet
    app.execute("DELETE FROM sequences WHERE id = 3")  # still indexed
    code, report = audit(typesense_server, db_path, collection)
    assert code == 0, report
    assert report["waiting_in_outbox"] == 3
    assert db.counts(SEQUENCES)["pending"] == 3  # and the audit left them queued


def test_invalid_rows_with_an_open_error_are_known_without_one_they_are_drift(
    db_path: Path, db: Database, worker: Worker, typesense_server: Server, collection: str
) -> None:
    app = app_connection(db_path)
    insert_rows(app, range(1, 6))
    drain(worker)
    # row 2 goes bad after it was indexed (its old document stays); row 6 never was good
    app.execute("UPDATE sequences SET sequence_number = 'twelve' WHERE id = 2")
    app.execute(ROW_SQL, make_row(6, element_id="six"))
    drain(worker)
    assert {error["record_key"] for error in sync_errors.find(db)} == {2, 6}

    code, report = audit(typesense_server, db_path, collection)
    assert code == 0, report
    assert report["with_open_error"]["ids"] == [2, 6]
    assert report["with_open_error"]["details"] == {
        "2": "invalid: sequence_number: expected an integer, got text 'twelve'",
        "6": "invalid: element_id: expected an integer, got text 'six'",
    }

    # someone closes row 6's error without fixing the row: now nobody knows about it
    error_id = next(e["id"] for e in sync_errors.find(db) if e["record_key"] == 6)
    result = invoke(
        ["errors", "resolve", str(error_id), "--note", "ignored"],
        typesense_server,
        db_path,
        collection,
    )
    assert result.exit_code == 0, result.output
    code, report = audit(typesense_server, db_path, collection)
    assert code == 1
    assert report["invalid"] == {
        "count": 1,
        "ids": [6],
        "details": {"6": "element_id: expected an integer, got text 'six'"},
    }
    # repair sends it through the daemon, which records it again: known, not drift
    code, report = audit(typesense_server, db_path, collection, "--repair")
    assert report["repaired"] == {"enqueued": 1, "deleted": []}
    drain(worker)
    assert {error["record_key"] for error in sync_errors.find(db)} == {2, 6}
    code, report = audit(typesense_server, db_path, collection)
    assert code == 0 and report["with_open_error"]["ids"] == [2, 6]


def test_a_change_applied_while_the_audit_runs_is_not_drift(
    db_path: Path, db: Database, worker: Worker, index: TypesenseIndex
) -> None:
    app = app_connection(db_path)
    insert_rows(app, range(1, 21))
    drain(worker)

    exported = threading.Event()
    export_lines = index.export_lines

    def export_then_tell(filter_by: str | None = None) -> Iterator[str]:
        yield from export_lines(filter_by)
        exported.set()

    def meanwhile(phase: str, done: int, total: int) -> None:
        # after the export (on a thread of its own), before `sequences` is read: the
        # application changes row 7 and the daemon applies it at once, so no outbox entry is
        # left to explain the difference
        if phase == "rows" and done == 0:
            assert exported.wait(10)
            app.execute("UPDATE sequences SET comment = 'changed meanwhile' WHERE id = 7")
            drain(worker)

    index.export_lines = export_then_tell  # type: ignore[method-assign,assignment]
    with Audit(db, index, chunk=6, progress=meanwhile) as checked:
        summary = checked.run()
        (candidates,) = checked.scratch.execute("SELECT count(*) FROM candidates").fetchone()
    assert candidates == 1  # the snapshot did see the race ...
    assert summary.consistent and summary.pending == 0  # ... and the second look cleared it
    assert (summary.rows, summary.documents) == (20, 20)


def test_memory_stays_flat_however_many_rows(
    db_path: Path, db: Database, worker: Worker, index: TypesenseIndex, typesense_server: Server
) -> None:
    app = app_connection(db_path)
    app.execute("BEGIN")
    insert_rows(app, range(1, 5001), comment="x" * 400)
    app.execute("COMMIT")
    drain(worker)
    app.execute("UPDATE sequences SET element_type = 'edited' WHERE id % 500 = 0")  # 10 rows
    app.execute("DELETE FROM outbox")  # as if edited with the triggers off: the daemon never knew

    tracemalloc.start()
    try:
        with Audit(db, index, chunk=200) as checked:
            summary = checked.run()
            stale = [key for key, _ in checked.ids("stale")]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stale == list(range(500, 5001, 500))
    assert summary.counts == {"missing": 0, "extra": 0, "stale": 10, "invalid": 0, "shared": 0}
    # the documents alone are ~2.5 MB of JSON: holding them all would cost far more than this
    assert peak < 1_500_000, f"audit peaked at {peak / 1e6:.1f} MB"


def test_key_of_maps_only_the_ids_the_daemon_writes_to_integers() -> None:
    assert [SEQUENCES.key_of(i) for i in ("12", "-3", "0")] == [12, -3, 0]
    odd = ("007", "abc", "1e3", "+4", "99999999999999999999")
    assert [SEQUENCES.key_of(i) for i in odd] == [
        "007",
        "abc",
        "1e3",
        "+4",
        "99999999999999999999",
    ]


def test_sqlite_files_an_exported_id_under_the_key_key_of_gives() -> None:
    ids = ("12", "-3", "0", "-0", "007", "abc", "1e3", "+4", " 5", "5 ", "0x10", "1_000", "٣")
    ids += ("9223372036854775807", "-9223372036854775808", "9223372036854775808", "", "7.0")
    conn = sqlite3.connect(":memory:")
    for doc_id in ids:
        (key,) = conn.execute(f"SELECT {SEQUENCES.key_of_sql('?1')}", (doc_id,)).fetchone()
        expected = SEQUENCES.key_of(doc_id)
        assert (key, type(key)) == (expected, type(expected)), doc_id


def test_documents_written_otherwise_are_compared_by_content(db_path: Path, db: Database) -> None:
    insert_rows(db_path, range(1, 5))
    app_connection(db_path).execute("DELETE FROM outbox")  # as if synced
    fake = FakeIndex()
    for doc_id, document in sqlite_documents(db_path).items():
        if doc_id == "3":
            document["comment"] = "edited by hand"
        # other key order, spaces, escaped non-ASCII: not the text Typesense or SQLite write
        reordered = dict(reversed(document.items()))
        fake.documents[doc_id] = json.dumps(reordered, ensure_ascii=True).encode()
    with Audit(db, fake) as checked:  # type: ignore[arg-type]
        summary = checked.run()
        assert [key for key, _ in checked.ids("stale")] == [3]
    assert summary.counts == {"missing": 0, "extra": 0, "stale": 1, "invalid": 0, "shared": 0}


def test_the_rows_are_not_copied_on_once_the_export_failed(db_path: Path, db: Database) -> None:
    insert_rows(db_path, range(1, 1001))
    fake = FakeIndex()
    failed = threading.Event()

    def failing_export(filter_by: str | None = None) -> Iterator[str]:
        failed.set()
        raise TypesenseUnavailableError("Typesense answered 503: Not Ready or Lagging", 503)
        yield ""  # a generator, as the export is

    copied: list[int] = []

    def progress(phase: str, done: int, total: int) -> None:
        if phase == "rows":
            copied.append(done)
        if (phase, done) == ("rows", 0):  # the export fails before any row is copied
            assert failed.wait(10)
            time.sleep(0.2)  # its thread has ended by now

    fake.export_lines = failing_export  # type: ignore[method-assign,assignment]
    audit = Audit(db, fake, chunk=10, progress=progress)  # type: ignore[arg-type]
    with audit, pytest.raises(TypesenseUnavailableError, match="Not Ready"):
        audit.run()
    assert copied == [0]  # not the 100 chunks of the table


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"id": 5, "comment": "x"}', 'sent an export line whose id is not text: \'{"id": 5'),
        (b"Error while getting seq_id of `5`: Not found.", "sent a broken export line: 'Error"),
        (b'{"comment": "x"}', "sent an export line without an id"),
    ],
)
def test_an_export_line_that_is_no_document_with_an_id_fails_the_audit(
    db_path: Path, db: Database, line: bytes, message: str
) -> None:
    insert_rows(db_path, range(1, 3))
    fake = FakeIndex()
    fake.documents = {"1": json.dumps(sqlite_documents(db_path)["1"]).encode(), "5": line}
    audit = Audit(db, fake)  # type: ignore[arg-type]
    with audit, pytest.raises(TypesenseUnavailableError) as failed:
        audit.run()
    assert message in str(failed.value)


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("missing database", "does not exist: create it with `outbox-sync init"),
        ("missing collection", "check --collection (OUTBOX_SYNC_COLLECTION)"),
        ("wrong key", "refused the API key (401): check TYPESENSE_API_KEY"),
        ("unreachable", "check that Typesense is up and healthy at http://127.0.0.1:"),
    ],
)
@pytest.mark.answer_shapes
def test_audit_fails_with_exit_status_2_and_one_line(
    db_path: Path, served: Server, collection: str, problem: str, message: str
) -> None:
    env: dict[str, str | None] = {}
    args = ["audit"]
    if problem == "missing database":
        args += ["--db", str(db_path.with_name("missing.db"))]
    elif problem == "wrong key":
        env["TYPESENSE_API_KEY"] = "wrong-key"
    elif problem == "unreachable":
        env["TYPESENSE_URL"] = f"http://127.0.0.1:{free_port()}"
    result = invoke(args, served, db_path, collection, **env)
    assert result.exit_code == 2
    assert message in one_line(result)


@pytest.mark.answer_shapes
def test_a_line_of_the_export_that_is_not_a_document_fails_the_audit_and_repairs_nothing(
    db_path: Path,
    db: Database,
    worker: Worker,
    typesense_server: Server,
    collection: str,
    answer_shape: str,
) -> None:
    insert_rows(db_path, range(1, 11))
    drain(worker)
    with FaultProxy(typesense_server.url, shape=answer_shape) as proxy:
        proxy.add(Fault("export_error_line", ids={"4"}))  # as v30 writes one
        server = Server(proxy.url, typesense_server.api_key)
        result = invoke(["audit", "--repair"], server, db_path, collection)
    assert result.exit_code == 2
    assert "Error while getting seq_id of `4`: Not found." in one_line(result)
    assert db.counts(SEQUENCES)["pending"] == 0  # 4 was not taken for a missing document


def test_an_audit_drops_the_scratch_that_a_killed_audit_left(
    db_path: Path,
    worker: Worker,
    served: Server,
    collection: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGKILL runs no cleanup: an audit's scratch (a copy of the table's keys and documents)
    would stay in the temp directory for good. It is named with its process, and the next
    audit drops those whose process is gone, and only those."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    left = temp / f"outbox-sync-audit-{killed.pid}-x1y2z3"
    running = temp / f"outbox-sync-audit-{os.getpid()}-a1b2c3"  # an audit under way
    unnamed = temp / "outbox-sync-audit-q1w2e3"  # made before names held a process
    for directory in (left, running, unnamed):
        directory.mkdir()
        (directory / "audit.db").write_bytes(b"scratch")
    insert_rows(db_path, range(1, 5))
    drain(worker)
    code, report = audit(served, db_path, collection)
    assert code == 0 and report["consistent"] is True and report["rows"] == 4
    assert not left.exists()
    assert running.exists() and unnamed.exists()
    assert sorted(temp.iterdir()) == sorted([running, unnamed])  # its own is gone too


def test_a_scratch_file_that_cannot_be_made_is_one_line_with_exit_status_2(
    db_path: Path,
    typesense_server: Server,
    collection: str,
    index: TypesenseIndex,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_directory))
    result = invoke(["audit"], typesense_server, db_path, collection)
    assert result.exit_code == 2
    assert "set TMPDIR to one with room" in one_line(result)


def test_a_synced_record_s_texts_are_equal_on_both_sides(
    db_path: Path,
    db: Database,
    worker: Worker,
    index: TypesenseIndex,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Typesense's export and SQLite's expected document are the same text, so a record in step
    # is never parsed in Python (the audit's speed rests on it: docs/performance.md)
    odd = ["é 🙂 \u2028 \x85", 'quote " back \\ slash /', "tab\t new\nline \x01 \x7f", ""]
    app_connection(db_path).executemany(
        ROW_SQL,
        [make_row(i, comment=odd[i % len(odd)], element_id=-(2**31) + i) for i in range(1, 41)],
    )
    app_connection(db_path).execute("UPDATE sequences SET comment = NULL WHERE id % 7 = 0")
    drain(worker)
    parsed: list[str | None] = []
    compare = audit_module.same_document

    def same_document(actual: str | None, expected: str | None) -> bool:
        parsed.append(actual)
        return compare(actual, expected)

    monkeypatch.setattr(audit_module, "same_document", same_document)
    with Audit(db, index) as checked:
        summary = checked.run()
    assert summary.consistent and summary.documents == 40
    assert parsed == []


def test_text_that_json_leaves_unescaped_survives_the_export(
    db_path: Path, worker: Worker, typesense_server: Server, collection: str
) -> None:
    # U+2028, U+2029 and U+0085 split a line for str.splitlines() (and httpx's iter_lines)
    comments = ["line\u2028separator", "paragraph\u2029separator", "next\x85line", 'quote " é 🙂']
    app_connection(db_path).executemany(
        ROW_SQL, [make_row(i, comment=comment) for i, comment in enumerate(comments, 1)]
    )
    drain(worker)
    raw = by_hand(typesense_server, "GET", f"/collections/{collection}/documents/export")
    assert "\u2028".encode() in raw.content  # Typesense sends it as is
    code, report = audit(typesense_server, db_path, collection)
    assert code == 0 and report["documents"] == 4, report


def test_drift_of_more_long_text_keys_than_one_url_holds_is_confirmed(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    # URLs as keys: 1,000 candidates in one filter_by made a URL httpx refused (InvalidURL),
    # and the audit failed every time
    keys = [
        f"https://example.com/articles/2024/a-long-slug-as-urls-have-{i:06d}" for i in range(1500)
    ]
    app, mapping, db = initialized_characters(tmp_path / "c.db", collection)
    index = characters_index(db, mapping, typesense_server, collection)
    worker = daemon(db, [index])
    app.executemany(CHARACTER_SQL, [character(key) for key in keys])
    drain(worker)
    app.execute("DROP TRIGGER characters_outbox_delete")  # a migration took it
    app.execute("DELETE FROM characters")
    with Audit(db, index) as audit:
        summary = audit.run()
        assert summary.counts == {
            "missing": 0,
            "extra": len(keys),
            "stale": 0,
            "invalid": 0,
            "shared": 0,
        }
        assert sorted(key for key, _ in audit.ids("extra")) == sorted(keys)
        audit.repair()
    drain(worker)  # the daemon deletes them: as many ids, the same filters
    assert export(typesense_server, collection) == {}


def test_a_row_whose_key_is_not_utf8_is_invalid_drift(
    tmp_path: Path, served: Server, collection: str
) -> None:
    """Such a row, written while the triggers were gone, was looked up again by its key decoded
    with a replacement character, not found, and dropped as consistent (found by a hostile
    review): the audit must say no document can have it."""
    app, mapping, db = initialized_characters(tmp_path / "c.db", collection)
    index = characters_index(db, mapping, served, collection)
    app.execute("DROP TRIGGER characters_outbox_insert")  # a migration took it
    insert_not_utf8(app)
    app.execute(CHARACTER_SQL, character("ok", active=7))  # invalid too: a control
    with Audit(db, index) as audit:
        summary = audit.run()
        invalid = dict(audit.ids("invalid"))
    assert summary.counts["invalid"] == 2
    assert invalid == {
        b"A\xffB": "slug: is not valid UTF-8 (bad byte at offset 1)",
        "ok": "active: expected 0 or 1 (false or true), got integer 7",
    }


def test_the_repair_of_a_key_that_is_not_utf8_queues_it_as_the_text_it_is(
    tmp_path: Path, served: Server, collection: str
) -> None:
    """The repair queued such a key as a BLOB, as the scratch file holds it: another key than
    the row's, whose error said "expected text, got a BLOB of 3 bytes" (found by a review).
    Queued as the TEXT it is, it fails as the drain's own entry did."""
    app, mapping, db = initialized_characters(tmp_path / "c.db", collection)
    index = characters_index(db, mapping, served, collection)
    worker = daemon(db, [index])
    insert_not_utf8(app)
    drain(worker)
    [drained] = sync_errors.find(db)
    assert drained["error"] == "slug: is not valid UTF-8 (bad byte at offset 1)"
    sync_errors.resolve(db, [drained["id"]], "closed by hand, the row left as it is")
    with Audit(db, index) as audit:
        assert audit.run().counts["invalid"] == 1
        assert audit.repair().enqueued == 1
    queued = app.execute("SELECT typeof(record_key), CAST(record_key AS BLOB) FROM outbox")
    assert queued.fetchall() == [("text", b"A\xffB")]
    drain(worker)
    [repaired] = sync_errors.find(db)
    assert (repaired["record_key"], repaired["error"]) == (drained["record_key"], drained["error"])
    with Audit(db, index) as audit:  # its open error tells the story: not drift
        summary = audit.run()
    assert summary.consistent and summary.known_errors == 1


def test_an_audit_runs_while_an_entry_of_a_key_that_is_not_utf8_waits(
    tmp_path: Path, served: Server, collection: str
) -> None:
    """The outbox's keys were read as str: such a key's entry failed the audit ("Could not
    decode to UTF-8 column 'record_key'", with advice about a full disk), the daemon's own
    audit too (found by a review). The entry waits for the row's record: not drift."""
    path = tmp_path / "c.db"
    app, mapping, db = initialized_characters(path, collection)
    index = characters_index(db, mapping, served, collection)
    insert_not_utf8(app)
    assert app.execute("SELECT typeof(record_key) FROM outbox").fetchall() == [("text",)]
    config = tmp_path / "outbox-sync.toml"
    config.write_text(characters_config(collection))

    def audited() -> Any:
        env = {"OUTBOX_SYNC_CONFIG": str(config)}
        result = invoke(["audit", "--json"], served, path, collection, **env)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    report = audited()
    assert report["waiting_in_outbox"] == 1 and report["invalid"]["count"] == 0
    drain(daemon(db, [index]))
    assert audited()["with_open_error"]["count"] == 1
    # the key of an open error is the daemon's BLOB; one edited by hand into TEXT must not
    # fail the audit either
    db.conn.execute("UPDATE sync_errors SET record_key = CAST(record_key AS TEXT)")
    assert audited()["with_open_error"]["count"] == 1


def test_audit_json_with_a_blob_key_is_json(
    tmp_path: Path, typesense_server: Server, index: TypesenseIndex
) -> None:
    """A BLOB key (a loose table's, with its open sync error) ended `audit --json` in a
    traceback, its JSON cut short (found by a hostile review)."""
    path = tmp_path / "legacy.db"
    loose = "id INTEGER, element_type, element_id, sequence_number, comment, created_at"
    app_connection(path).execute(f"CREATE TABLE sequences ({loose})")
    schema.init(Database(path, create=True), [SEQUENCES])
    app_connection(path).execute(ROW_SQL, make_row(6, id=b"\x01\x02"))
    db = Database(path)
    drain(daemon(db, [index]))
    db.conn.execute("DELETE FROM sync_errors")  # so the audit finds it as drift
    result = invoke(["audit", "--json"], typesense_server, path, index.collection)
    assert result.exit_code == 1, result.output  # drift
    assert json.loads(result.stdout)["invalid"]["ids"] == ["b'\\x01\\x02'"]


def test_a_key_more_than_one_row_holds_is_shared_drift(
    tmp_path: Path, typesense_server: Server, collection: str, index: TypesenseIndex
) -> None:
    """A loose table's key held by two rows: one document shows one of them. The audit found
    such a key consistent, or counted it missing once for each row (found by a hostile
    review)."""
    path = tmp_path / "legacy.db"
    app = app_connection(path)
    app.execute(
        "CREATE TABLE sequences (id INTEGER, element_type, element_id, sequence_number,"
        " comment, created_at)"
    )
    db = Database(path)
    schema.init(db, [SEQUENCES])
    insert_rows(app, range(1, 4))
    app.execute(ROW_SQL, make_row(2, comment="a second row of key 2"))
    drain(daemon(db, [index], audit_every_s=0))
    app.execute("DROP TRIGGER sequences_outbox_insert")  # and two of key 4 that nobody synced
    app.executemany(ROW_SQL, [make_row(4), make_row(4, comment="another")])
    with Audit(db, index) as checked:
        summary = checked.run()
        shared = list(checked.ids("shared"))
        assert checked.repair().enqueued == 2  # a document shows one of each key's rows
    assert (summary.rows, summary.documents) == (6, 3)
    assert summary.counts == {"missing": 0, "extra": 0, "stale": 0, "invalid": 0, "shared": 2}
    assert shared == [(2, "2 rows"), (4, "2 rows")] and not summary.consistent
    drain(daemon(db, [index], audit_every_s=0))
    assert sorted(export(typesense_server, collection), key=int) == ["1", "2", "3", "4"]
    result = invoke(["audit"], typesense_server, path, collection)
    assert result.exit_code == 1  # until the application makes the key unique
    assert "6 rows, 4 documents: drift found" in result.output
    assert "shared: 2 keys more than one row holds" in result.output


def test_large_rows_are_read_and_exported_in_short_chunks_and_audited_exactly(
    db: Database,
    worker: Worker,
    index: TypesenseIndex,
    typesense_server: Server,
    collection: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pages of rows (an audit's, a fill's, a reindex's) and the export's chunks end at about
    READ_MAX_BYTES: 5,000 rows of 20 KB made chunks of 100 MB on each side of an audit."""
    monkeypatch.setattr("outbox_sync.db.READ_MAX_BYTES", 40_000)
    insert_large_rows(db.path, 300)  # ~4 KB a line
    drain(worker)
    read = [len(rows) for rows in db.scan_rows(SEQUENCES)]
    assert read[0] == FIRST_READ_ROWS and max(read[1:]) <= 10 and sum(read) == 300
    flushed: list[int] = []
    flush = Audit._flush_actual
    monkeypatch.setattr(
        Audit,
        "_flush_actual",
        lambda self, conn, batch: flushed.append(len(batch)) or flush(self, conn, batch),
    )
    documents = f"/collections/{collection}/documents"
    by_hand(typesense_server, "PATCH", f"{documents}/150", json={"comment": "edited by hand"})
    with Audit(db, index) as audit:
        summary = audit.run()
        stale = list(audit.ids("stale"))
    assert (summary.rows, summary.documents) == (300, 300)
    assert summary.counts["stale"] == 1 and sum(summary.counts.values()) == 1
    assert stale == [(150, "comment")]
    assert sum(flushed) == 300 and max(flushed) <= 11
