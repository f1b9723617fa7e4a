"""What can change between SQLite and Typesense, or around the daemon, without its seeing it
happen, and how it verifies instead: a restore in place, a table rebuilt with its triggers, an
audit that failed just before a stop, a lock file removed under it, a sync paused for long
behind /healthz. A hostile review broke each one;
every test failed on the code before its fix."""

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from outbox_sync import reconcile, reindex, schema, sync_errors
from outbox_sync import telemetry as telemetry_module
from outbox_sync.db import Database
from outbox_sync.errors import DatabaseError, OutboxSyncError, TypesenseUnavailableError
from outbox_sync.localserver import free_port
from outbox_sync.mapping import SEQUENCES, Field, Mapping
from outbox_sync.telemetry import Telemetry
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import Worker, daemon
from tests.support.app import ROW_SQL, app_connection, make_row, sqlite_documents
from tests.support.cli import invoke
from tests.support.daemon import Daemon, drain, running
from tests.support.typesense import Server, by_hand, export
from tests.support.wait import wait_until


def test_a_failed_audit_the_loop_had_not_reported_when_it_stops_is_owed(
    db: Database, index: TypesenseIndex, typesense_server: Server, collection: str
) -> None:
    """An outage asks for an audit; it fails (Typesense still not ready) and its thread ends;
    the daemon stops before the loop's next turn reports it (the loop waits out a backoff of up
    to 10 s, or its 1 s idle wait). `Reconciler.stop` took the finished thread for a done
    audit: neither owed nor asked again. With --audit-every 0 what the outage lost stays lost
    ("an audit asked for and not done when the daemon stops is owed")."""
    app_connection(Path(db.path)).execute(ROW_SQL, make_row(1))
    drain(daemon(db, [index], audit_every_s=0))
    dead = TypesenseIndex([f"http://127.0.0.1:{free_port()}"], "key", collection, timeout_s=1)
    worker = daemon(db, [dead], audit_every_s=0)
    reconciler = worker.jobs["audit"].run
    worker.after_outage()  # an outage ended: an audit is asked for
    reconciler(time.monotonic())  # the loop's turn starts it
    assert reconciler.thread is not None
    reconciler.thread.join(30)  # it fails: Typesense does not answer
    assert reconciler.outcome is not None and not reconciler.outcome.ok
    worker.jobs["audit"].at_stop()  # SIGTERM before the loop's next turn reported it
    assert db.get_meta(reconcile.AUDIT_OWED_KEY) == "outage"


def turns(worker: Worker, count: int = 3) -> None:
    """Turn the loop, letting an audit it started finish and its repairs drain."""
    stop = threading.Event()
    for _ in range(count):
        worker.loop(time.monotonic(), stop)
        reconciler = worker.jobs["audit"].run
        if reconciler.thread is not None:
            reconciler.thread.join(60)


def test_a_backup_restored_in_place_is_audited(
    db_path: Path, db: Database, index: TypesenseIndex, typesense_server: Server, collection: str
) -> None:
    """`sqlite3 app.db ".restore backup.db"` (the backup API, SQLite's safe way to restore a
    file in use) rewrites the database in place: same inode, so `check_same_file` sees
    nothing, and the triggers came back with the backup, so the schema watch sees nothing
    wrong either. The rows went back in time without an outbox entry: Typesense keeps the
    documents of rows the restore took away (and the newer state of rows it changed) until
    the scheduled audit, never with --audit-every 0; `check` says OK meanwhile."""
    app = app_connection(db_path)
    app.execute(ROW_SQL, make_row(1))
    backup = db_path.with_name("backup.db")
    with sqlite3.connect(backup) as target:
        app.backup(target)
    app.execute(ROW_SQL, make_row(2))
    app.execute("UPDATE sequences SET comment = 'after the backup' WHERE id = 1")
    worker = daemon(db, [index], audit_every_s=0)
    turns(worker)
    assert set(export(typesense_server, collection)) == {"1", "2"}
    with sqlite3.connect(backup) as source:  # the operator restores last night's backup
        source.backup(app)
    assert app.execute("SELECT id, comment FROM sequences").fetchall() == [(1, "comment number 1")]
    turns(worker)
    documents = export(typesense_server, collection)
    assert set(documents) == {"1"}, "a row the restore took away is still searchable"
    assert documents["1"]["comment"] == "comment number 1"


def test_a_table_rebuilt_by_sqlites_own_procedure_is_audited(
    db_path: Path, db: Database, index: TypesenseIndex, typesense_server: Server, collection: str
) -> None:
    """SQLite's documented 12-step ALTER (lang_altertable.html#otheralter) copies the rows into
    a new table, drops the old one, renames the new one and, step 8, recreates the table's
    indexes and triggers from what sqlite_schema held: outbox-sync's triggers come back
    byte for byte, in the same transaction. The schema watch checks triggers by name, table and
    SQL only, so it sees nothing: the rows the migration rewrote (step 5, before the triggers
    were back) never reach Typesense, and no audit is asked for."""
    app = app_connection(db_path)
    app.executemany(ROW_SQL, [make_row(i) for i in range(1, 4)])
    worker = daemon(db, [index], audit_every_s=0)
    turns(worker)
    assert len(export(typesense_server, collection)) == 3
    saved = app.execute(  # step 3: remember the table's indexes and triggers
        "SELECT sql FROM sqlite_schema WHERE tbl_name = 'sequences' AND type IN ('index',"
        " 'trigger') AND sql IS NOT NULL"
    ).fetchall()
    app.execute("BEGIN")
    app.execute(
        "CREATE TABLE new_sequences (id INTEGER PRIMARY KEY, element_type TEXT NOT NULL,"
        " element_id INTEGER NOT NULL, sequence_number INTEGER NOT NULL, comment TEXT,"
        " created_at TEXT NOT NULL, note TEXT)"
    )
    app.execute(  # step 5, with the data migration the schema change is for
        "INSERT INTO new_sequences SELECT id, element_type, element_id, sequence_number,"
        " upper(comment), created_at, NULL FROM sequences"
    )
    app.execute("DROP TABLE sequences")
    app.execute("ALTER TABLE new_sequences RENAME TO sequences")
    for (sql,) in saved:  # step 8
        app.execute(sql)
    app.execute("COMMIT")
    turns(worker)
    comments = {
        key: doc.get("comment") for key, doc in export(typesense_server, collection).items()
    }
    assert comments == {str(i): f"COMMENT NUMBER {i}" for i in range(1, 4)}


def test_a_lock_file_removed_under_a_running_daemon_lets_no_second_one_in(
    db_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    """The lock is a flock on a file *name* beside the database. Remove that file while a daemon
    runs (an operator clearing what the refusal called a lock after a crash, a cleanup job,
    `rm *.lock`) and the next daemon creates a new file and locks it too: two daemons apply the
    same outbox at once, which the lock exists to prevent (an older state of a record can land
    after a newer one), and `status`/`check` name neither."""
    first = start_daemon("--audit-every", "0")
    wait_until(lambda: first.logged("started"), what="the first daemon")
    lock = db_path.with_name(db_path.name + ".outbox-sync.lock")
    lock.unlink()
    second = start_daemon("--audit-every", "0")
    wait_until(
        lambda: second.process.poll() is not None or second.logged("started"),
        what="the second daemon to start or be refused",
    )
    # the first one checks its files once a second: give it a few
    wait_until(
        lambda: first.process.poll() is not None or second.process.poll() is not None,
        timeout_s=10,
        what="one of two daemons on one database to stop",
    )


def test_healthz_says_so_when_the_sync_has_been_paused_for_long(
    db_path: Path, index: TypesenseIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An application holds the write lock (a stuck transaction, a process stopped in a
    debugger, a long batch job): every batch is sent to Typesense, its acknowledgement waits
    out the busy timeout and fails, the loop backs off and sends it again, for as long as the
    lock is held. /healthz answered 200 "ok" throughout: the loop turns (its pause keeps the
    heartbeat) and Typesense answers, and a paused sync is neither. The same for a mapped table
    that is gone ("sync_paused") and for anything else that pauses the loop. Prometheus had no
    metric for it either: `outbox_sync_sync_paused`."""
    monkeypatch.setattr(telemetry_module, "LOOP_STALL_S", 1.0)
    app = app_connection(db_path)
    db = Database(db_path, busy_timeout_s=0.1)
    telemetry = Telemetry()
    assert telemetry.metrics is not None
    paused = partial(telemetry.metrics.registry.get_sample_value, "outbox_sync_sync_paused")
    worker = daemon(db, [index], telemetry=telemetry, min_backoff_s=0.05, max_backoff_s=0.1)
    stop = threading.Event()
    app.execute(ROW_SQL, make_row(100))
    assert worker.loop(time.monotonic(), stop).applied == 1
    assert telemetry.health(time.monotonic()) == (True, "ok")
    assert paused() == 0
    app.executemany(ROW_SQL, [make_row(i) for i in range(1, 4)])
    app.execute("BEGIN IMMEDIATE")  # the application's long write transaction
    try:
        started = time.monotonic()
        while time.monotonic() - started < 2 * telemetry_module.LOOP_STALL_S:
            assert worker.loop(time.monotonic(), stop).paused
        assert db.backlog()[0] == 3  # nothing acknowledged
        assert telemetry.health(time.monotonic())[0] is False, telemetry.health(time.monotonic())
        assert paused() == 1  # Prometheus sees it too
    finally:
        app.execute("ROLLBACK")
    try:
        assert worker.loop(time.monotonic(), stop).applied == 3
        assert paused() == 0
    finally:
        worker.jobs["audit"].run.stop()
        db.close()


def started(
    path: Path, mapping: Mapping, server: Server
) -> tuple[Database, TypesenseIndex, Worker]:
    """The database prepared for the mapping, its index, and a daemon, as `run` starts them."""
    db = Database(path, create=True)
    schema.init(db, [mapping])
    [bound] = schema.check(db, [mapping])
    index = TypesenseIndex([server.url], server.api_key, mapping.collection, mapping=bound)
    index.ensure_collection()
    return db, index, daemon(db, [index], audit_every_s=0)


def test_a_key_column_a_migration_made_text_stops_the_daemon_to_read_it_anew(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """A migration rebuilds a table with its INTEGER key column made TEXT (SQLite's 12-step
    procedure). The daemon, which took the key's kind at its start, put its triggers back and
    audited, but judged every row by the old kind: each became a sync error ("expected an
    integer") and its document was deleted. It stops now, owing the audit, and its next start
    reads the table as it is."""
    path = tmp_path / "app.db"
    app = app_connection(path)
    app.execute("CREATE TABLE a (id INTEGER PRIMARY KEY, n TEXT NOT NULL)")
    mapping = Mapping(table="a", key="id", collection=collection, fields=(Field("n", "string"),))
    db, _, worker = started(path, mapping, typesense_server)
    app.execute("INSERT INTO a VALUES (1, 'one')")
    drain(worker)
    app.executescript(
        "BEGIN; CREATE TABLE a_new (id TEXT PRIMARY KEY, n TEXT NOT NULL);"
        " INSERT INTO a_new SELECT 'k' || id, n FROM a; DROP TABLE a;"
        " ALTER TABLE a_new RENAME TO a; COMMIT;"
    )
    with pytest.raises(DatabaseError, match=r"key column id of table a .* was made text"):
        drain(worker)
    worker.jobs["audit"].at_stop()
    assert db.get_meta(reconcile.AUDIT_OWED_KEY) is not None
    assert sync_errors.find(db) == []
    [again] = schema.check(db, [mapping])  # the next start
    assert again.key_kind == "text"


def test_a_column_a_migration_made_a_virtual_json_one_stops_the_daemon_to_read_it_anew(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """The line writes a stored column's text as it is, without the copy that drops a JSON
    subtype (`Field.from_json`, taken at start). A migration rebuilt the table with that
    column generated from a JSON document (VIRTUAL): its objects would have gone to Typesense
    as objects, each a sync error. The daemon stops, and its next start binds the table as it
    is: the document holds the object's text."""
    path = tmp_path / "app.db"
    app = app_connection(path)
    app.execute("CREATE TABLE a (id INTEGER PRIMARY KEY, place TEXT NOT NULL)")
    mapping = Mapping(
        table="a", key="id", collection=collection, fields=(Field("place", "string"),)
    )
    db, index, worker = started(path, mapping, typesense_server)
    app.execute("INSERT INTO a VALUES (1, 'Oslo')")
    drain(worker)
    app.executescript(
        "BEGIN; CREATE TABLE a_new (id INTEGER PRIMARY KEY, doc TEXT, place TEXT GENERATED"
        " ALWAYS AS (json_extract(doc, '$.place')) VIRTUAL);"
        " INSERT INTO a_new (id, doc)"
        " SELECT id, json_object('place', json_object('city', place)) FROM a;"
        " DROP TABLE a; ALTER TABLE a_new RENAME TO a; COMMIT;"
    )
    with pytest.raises(DatabaseError, match=r"column place of table a .* VIRTUAL generated"):
        drain(worker)
    worker.jobs["audit"].at_stop()
    [again] = schema.check(db, [mapping])  # the next start, which audits what it owes
    index.mapping = again
    drain(daemon(db, [index], audit_every_s=3600))
    assert export(typesense_server, collection)["1"]["place"] == '{"city":"Oslo"}'
    assert sync_errors.find(db) == []


@pytest.mark.parametrize("claim_before", [1, 2])
def test_a_migration_committed_during_a_drain_is_seen_before_another_batch_is_read(
    tmp_path: Path, typesense_server: Server, collection: str, claim_before: int
) -> None:
    """A drain goes on for up to DRAIN_SLICE_S before the loop's schema watch looks again. The
    backlog's rows read after a migration made their column a VIRTUAL JSON one went to Typesense
    as objects, each a sync error, before the watch stopped the daemon (found by a hostile
    review). The drain now ends at a schema change: the rows wait for the next start. Before
    its first batch too (committed after the watch looked): `run --once` then ended as if the
    outbox were empty."""
    path = tmp_path / "app.db"
    app = app_connection(path)
    app.execute("CREATE TABLE a (id INTEGER PRIMARY KEY, place TEXT NOT NULL)")
    mapping = Mapping(
        table="a", key="id", collection=collection, fields=(Field("place", "string"),)
    )
    db = Database(path, create=True)
    schema.init(db, [mapping])
    [bound] = schema.check(db, [mapping])
    index = TypesenseIndex(
        [typesense_server.url], typesense_server.api_key, collection, mapping=bound
    )
    index.ensure_collection()
    worker = daemon(db, [index], audit_every_s=0, batch_size=10)
    app.executemany("INSERT INTO a VALUES (?, 'Oslo')", [(n,) for n in range(1, 101)])
    claim, claims = db.claim, 0

    def claim_after_a_migration(limit: int, after: int = 0) -> list[tuple[str, int, int, int]]:
        nonlocal claims
        claims += 1
        if claims == claim_before:  # that batch is read after the migration
            app.executescript(
                "BEGIN; CREATE TABLE a_new (id INTEGER PRIMARY KEY, doc TEXT, place TEXT"
                " GENERATED ALWAYS AS (json_extract(doc, '$.place')) VIRTUAL);"
                " INSERT INTO a_new (id, doc)"
                " SELECT id, json_object('place', json_object('city', place)) FROM a;"
                " DROP TABLE a; ALTER TABLE a_new RENAME TO a; COMMIT;"
            )
        return claim(limit, after)

    db.claim = claim_after_a_migration  # type: ignore[method-assign]
    with pytest.raises(DatabaseError, match=r"column place of table a .* VIRTUAL generated"):
        drain(worker)
    assert sync_errors.find(db) == []
    applied = 10 * (claim_before - 1)  # the batches read before it
    assert len(export(typesense_server, collection)) == applied
    assert db.backlog()[0] == 100 - applied


def searched(server: Server, collection: str, field: str, text: str) -> int | None:
    """How many documents a search of `field` finds; None when Typesense refuses the search
    (a field the collection does not have)."""
    answer = httpx.get(
        f"{server.url}/collections/{collection}/documents/search",
        params={"q": text, "query_by": field},
        headers={"X-TYPESENSE-API-KEY": server.api_key},
        timeout=10,
    )
    return int(answer.json()["found"]) if answer.status_code == 200 else None


def drop_comment(server: Server, collection: str) -> None:
    """What someone with curl does to the collection: drop its `comment` field in place."""
    drop = {"fields": [{"name": "comment", "drop": True}]}
    by_hand(server, "PATCH", f"/collections/{collection}", json=drop)


def test_a_collection_whose_fields_were_altered_in_typesense_is_rebuilt_and_said(
    db: Database,
    index: TypesenseIndex,
    typesense_server: Server,
    collection: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Someone drops a field of the collection in Typesense (PATCH): searches on it fail, the
    audit (it compares documents) said consistent, `check` said OK, and the daemon saw it only
    at its next start, which refused the collection. `check` and `status` say it now, and the
    running daemon rebuilds the collection from SQLite with the mapping's fields."""
    monkeypatch.setattr(reindex, "COLLECTION_WATCH_INTERVAL_S", 0.1)
    path = Path(db.path)
    app_connection(path).executemany(ROW_SQL, [make_row(i) for i in range(1, 6)])
    drain(daemon(db, [index], audit_every_s=0))
    assert searched(typesense_server, collection, "comment", "number") == 5
    assert "fields" not in invoke(["check"], typesense_server, path, collection).output

    drop_comment(typesense_server, collection)
    assert searched(typesense_server, collection, "comment", "number") is None
    checked = invoke(["check"], typesense_server, path, collection)
    assert checked.exit_code == 2
    assert (
        f"collection {collection} does not have the mapping's fields (field comment is missing)"
        in checked.output
    )
    status = json.loads(invoke(["status", "--json"], typesense_server, path, collection).output)
    assert status["collections"][collection]["fields_changed"] == "field comment is missing"
    audited = invoke(["audit"], typesense_server, path, collection)  # the documents are alike
    assert audited.exit_code == 1
    assert (
        f"collection {collection} does not have the mapping's fields (field comment is missing)"
        in audited.output
    )
    assert invoke(["reindex"], typesense_server, path, collection).exit_code == 0  # its advice
    assert searched(typesense_server, collection, "comment", "number") == 5

    with capture_logs() as logged, running(daemon(db, [index], audit_every_s=0)):
        drop_comment(typesense_server, collection)
        wait_until(
            lambda: searched(typesense_server, collection, "comment", "number") == 5,
            what="the collection rebuilt with its comment field",
        )
        app_connection(path).execute(ROW_SQL, make_row(6))  # the sync goes on after it
        wait_until(lambda: "6" in export(typesense_server, collection), what="the sync")
    [changed] = [e for e in logged if e["event"] == "collection_fields_changed"]
    assert changed["changed"] == ["field comment is missing"]
    assert [e["reason"] for e in logged if e["event"] == "reindex_finished"] == [
        "collection fields changed"
    ]
    assert export(typesense_server, collection) == sqlite_documents(path)
    status = json.loads(invoke(["status", "--json"], typesense_server, path, collection).output)
    assert "fields_changed" not in status["collections"][collection]
    assert invoke(["audit"], typesense_server, path, collection).exit_code == 0


def test_a_rebuild_of_altered_fields_that_fails_is_said_once_and_not_tried_again(
    db: Database,
    index: TypesenseIndex,
    typesense_server: Server,
    collection: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Typesense trouble leaves the rebuild for a later turn (the loop waits it out); any other
    failure is said once and not tried at every turn after it: a rebuild is a whole table."""
    app_connection(Path(db.path)).execute(ROW_SQL, make_row(1))
    drain(daemon(db, [index], audit_every_s=0))
    drop_comment(typesense_server, collection)
    failures = [TypesenseUnavailableError("Typesense unreachable"), ValueError("refused")]
    tried = []

    def failing(*args: object, **kwargs: object) -> None:
        tried.append(failures[0])
        raise OutboxSyncError("rebuild failed") from failures.pop(0)

    real_rebuild = reindex.rebuild
    monkeypatch.setattr(reindex, "rebuild", failing)
    telemetry = Telemetry()
    watch = reindex.CollectionWatch(
        db, [index], lambda reason: None, seen=telemetry.collection_fields
    )

    def metric() -> float | None:  # what Prometheus scrapes: the alert's
        assert telemetry.metrics is not None
        return telemetry.metrics.registry.get_sample_value(
            "outbox_sync_collection_fields_changed", {"collection": collection}
        )

    with capture_logs() as logged:
        with pytest.raises(TypesenseUnavailableError):
            watch(0.0)
        for _ in range(3):
            watch(0.0)
    assert len(tried) == 2
    [given_up] = [e for e in logged if e["event"] == "collection_fields_not_rebuilt"]
    assert given_up["reason"] == "rebuild failed"
    assert f"outbox-sync reindex --collection {collection}" in given_up["note"]
    assert metric() == 1
    real_rebuild(db, index)  # on-call follows the advice
    watch(0.0)
    assert metric() == 0
    monkeypatch.setattr(reindex, "rebuild", real_rebuild)
    drop_comment(typesense_server, collection)  # and a later change is the daemon's again
    watch(0.0)
    assert searched(typesense_server, collection, "comment", "number") == 1
    assert metric() == 0


def test_a_name_pointed_at_another_collection_is_followed_and_audited(
    db: Database,
    index: TypesenseIndex,
    typesense_server: Server,
    collection: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Someone points the collection's name (its alias) at another collection: searches read
    that one, the daemon went on writing to the one it found at start, and its audits, reading
    through the name, queued the same repairs for ever, while `check` said OK. The daemon
    writes where the name points now and audits it: searches find every row again."""
    monkeypatch.setattr(reindex, "COLLECTION_WATCH_INTERVAL_S", 0.1)
    path = Path(db.path)
    app_connection(path).executemany(ROW_SQL, [make_row(i) for i in range(1, 6)])
    drain(daemon(db, [index], audit_every_s=0))
    before = index.target()
    other = f"{collection}_by_hand"
    by_hand(typesense_server, "POST", "/collections", json=SEQUENCES.collection_schema(other))
    with capture_logs() as logged, running(daemon(db, [index], audit_every_s=0)):
        by_hand(typesense_server, "PUT", f"/aliases/{collection}", json={"collection_name": other})
        app_connection(path).execute(ROW_SQL, make_row(6))
        wait_until(
            lambda: export(typesense_server, collection) == sqlite_documents(path),
            what="every row in the collection the name points at",
        )
        # the audit's result is logged after its repairs are queued, which may be applied first
        wait_until(lambda: [e for e in logged if e["event"] == "audit_done"], what="its result")
    [moved] = [e for e in logged if e["event"] == "collection_repointed"]
    assert (moved["before"], moved["now"]) == (before, other)
    assert [e["reason"] for e in logged if e["event"] == "audit_done"] == ["collection repointed"]
    assert index.target() == other


def test_documents_deleted_in_typesense_by_another_are_seen_and_audited_back(
    db: Database,
    index: TypesenseIndex,
    typesense_server: Server,
    collection: str,
) -> None:
    """Someone deletes documents in Typesense (a delete by filter, a script with the admin
    key): they were missing from search until the daily audit, or for ever with
    --audit-every 0. The daemon's look at the collection each minute sees its count move while
    it sent no write, says so, and audits; its own writes move the count without a word."""
    path = Path(db.path)
    app = app_connection(path)
    app.executemany(ROW_SQL, [make_row(i) for i in range(1, 11)])
    worker = daemon(db, [index], audit_every_s=0)
    drain(worker)
    requests: list[str] = []
    watch = reindex.CollectionWatch(db, [index], requests.append)
    with capture_logs() as logged:
        watch(0.0)  # the first look counts
        app.executemany(ROW_SQL, [make_row(i) for i in range(11, 16)])
        app.execute("DELETE FROM sequences WHERE id = 1")
        drain(worker)
        watch(0.0)  # its own writes
        assert requests == []
        path_ = f"/collections/{collection}/documents"
        by_hand(typesense_server, "DELETE", path_, params={"filter_by": "id:[2,3,4]"})
        watch(0.0)
    assert requests == ["documents changed in Typesense"]
    [seen] = [e for e in logged if e["event"] == "documents_changed_elsewhere"]
    assert (seen["before"], seen["now"]) == (14, 11)

    worker, stop = daemon(db, [index], audit_every_s=0), threading.Event()  # a new start
    worker.loop(time.monotonic(), stop)  # its first turn counts, a minute's blindness spared
    by_hand(typesense_server, "DELETE", path_, params={"filter_by": "id:[5,6]"})
    look = worker.jobs["collections"].run  # the next look, due a minute later
    try:
        with capture_logs() as logged:
            look(0.0)
            wait_until(
                lambda: (
                    worker.loop(time.monotonic(), stop)
                    and export(typesense_server, collection) == sqlite_documents(path)
                    and [e for e in logged if e["event"] == "audit_done"]
                ),
                what="the deleted documents back, and the audit's result",
            )
    finally:
        worker.jobs["audit"].run.stop()
    assert [e["reason"] for e in logged if e["event"] == "audit_done"] == [
        "documents changed in Typesense"
    ]


@pytest.mark.parametrize("deleted", [(2, 3, 4), (4,)], ids=["the oldest", "one between"])
def test_outbox_entries_deleted_by_hand_are_seen_and_audited_back(
    db: Database,
    index: TypesenseIndex,
    typesense_server: Server,
    collection: str,
    deleted: tuple[int, ...],
) -> None:
    """An operator "clears" outbox entries the daemon has not applied yet (a bulk import's
    backlog looks like a log): their changes were lost until the next scheduled audit, a day
    later, or never with --audit-every 0. The outbox has no gaps otherwise (one
    writer at a time, AUTOINCREMENT ids a rollback gives back): the daemon sees the ids it
    skips, says so, and audits."""
    path = Path(db.path)
    app = app_connection(path)
    worker = daemon(db, [index], audit_every_s=0)
    with capture_logs() as logged:
        app.execute(ROW_SQL, make_row(1))
        drain(worker)
        app.execute("BEGIN")
        app.executemany(ROW_SQL, [make_row(i) for i in range(2, 7)])
        app.execute("COMMIT")
        app.execute("BEGIN")  # a transaction rolled back gives its ids back: no gap
        app.execute(ROW_SQL, make_row(99))
        app.execute("ROLLBACK")
        assert [row[0] for row in app.execute("SELECT id FROM outbox")] == [2, 3, 4, 5, 6]
        app.execute(f"DELETE FROM outbox WHERE id IN ({', '.join(map(str, deleted))})")
        app.execute(ROW_SQL, make_row(7))
        drain(worker)
    [said] = [e for e in logged if e["event"] == "outbox_entries_deleted"]
    assert said["entries"] == len(deleted)
    assert [e["reason"] for e in logged if e["event"] == "audit_done"] == ["outbox entries deleted"]
    assert export(typesense_server, collection) == sqlite_documents(path)


def test_a_swap_by_hand_that_drops_the_collection_written_to_is_followed(
    db: Database,
    index: TypesenseIndex,
    typesense_server: Server,
    collection: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A blue/green swap by hand: the name pointed at a new collection and the old one, which
    the daemon writes to, dropped, before the collection watch looks. The next import was a
    plain 404 and the daemon stopped; it now adopts the collection the name points at and
    audits it: searches find every row, the ones written before the swap included."""
    monkeypatch.setattr(reindex, "COLLECTION_WATCH_INTERVAL_S", 3600.0)
    path = Path(db.path)
    app_connection(path).executemany(ROW_SQL, [make_row(i) for i in range(1, 6)])
    worker = daemon(db, [index], audit_every_s=0)
    with capture_logs() as logged, running(worker) as thread:
        wait_until(lambda: db.backlog()[0] == 0, what="the first rows applied")
        before = index.target()
        assert before is not None and before == index.written
        other = f"{collection}_blue"
        by_hand(typesense_server, "POST", "/collections", json=SEQUENCES.collection_schema(other))
        by_hand(typesense_server, "PUT", f"/aliases/{collection}", json={"collection_name": other})
        by_hand(typesense_server, "DELETE", f"/collections/{before}")
        app_connection(path).execute(ROW_SQL, make_row(6))
        wait_until(
            lambda: export(typesense_server, collection) == sqlite_documents(path),
            what="every row in the collection the name points at",
        )
        assert thread.is_alive()
    [missing] = [e for e in logged if e["event"] == "collection_missing"]
    assert repr(before) in missing["reason"]
    assert index.written == other
