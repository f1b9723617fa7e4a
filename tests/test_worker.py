"""The loop's chores, driven turn by turn through `Worker.loop(now)` with explicit times: no
sleeping, no patched clock."""

import contextlib
import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
import structlog
from structlog.testing import capture_logs

from outbox_sync import schema, typesense_index
from outbox_sync import worker as worker_module
from outbox_sync.batch import Applier
from outbox_sync.db import FIRST_READ_ROWS, Database
from outbox_sync.errors import TypesenseUnavailableError
from outbox_sync.localserver import LocalTypesense, free_port
from outbox_sync.mapping import SEQUENCES, Dependency, Field, Mapping
from outbox_sync.telemetry import Telemetry
from outbox_sync.typesense_index import ImportResult, TypesenseIndex
from outbox_sync.wakeup import ChangeWatch
from outbox_sync.worker import Index, Job, Progress, Turn, Worker, daemon
from tests.support.app import (
    ROW_SQL,
    app_connection,
    insert_large_rows,
    insert_rows,
    make_row,
    sqlite_documents,
)
from tests.support.daemon import drain, running
from tests.support.fake_index import FakeIndex
from tests.support.typesense import Server, export
from tests.support.wait import wait_until


def worker_with(
    db: Database, index: Index, *jobs: Job, after_outage: Callable[[], None] = lambda: None
) -> Worker:
    """A loop over `index` with these chores and no backoff delay (a pause returns at once)."""
    telemetry = Telemetry()
    applier = Applier(db, {"sequences": index}, batch_size=100, telemetry=telemetry)  # type: ignore[dict-item]
    return Worker(
        db,
        [index],
        applier,
        jobs,
        telemetry=telemetry,
        after_outage=after_outage,
        min_backoff_s=0,
        max_backoff_s=0,
    )


def test_a_job_runs_at_the_first_turn_then_each_time_its_interval_has_passed(
    db: Database, index: TypesenseIndex
) -> None:
    ran: list[float] = []
    every_10_s = Job("every 10 s", 10, ran.append)
    later = Job("not due at start", 10, lambda now: ran.append(-now), due_at_start=False)
    worker = worker_with(db, index, every_10_s, later)
    stop = threading.Event()
    for now in (100, 105, 109.9, 110, 115, 119, 121):
        assert worker.loop(now, stop) == Turn(0)
    # due again 10 s after it last ran, not on a fixed grid; `later` first 10 s after the start
    assert ran == [100, 110, -110, 121, -121]


def test_after_an_outage_the_loop_calls_after_outage_once_typesense_is_back(db: Database) -> None:
    index = FakeIndex(down=1)  # down until the test says otherwise (health probes do not count)
    ran: list[float] = []
    outages: list[float] = []
    now = 0.0

    def needing_typesense(at: float) -> None:
        if index.health_problem() is not None:
            raise TypesenseUnavailableError("Typesense answered 503: Not Ready or Lagging")
        ran.append(at)

    worker = worker_with(
        db, index, Job("periodic", 10, needing_typesense), after_outage=lambda: outages.append(now)
    )
    stop = threading.Event()

    now = 100
    assert worker.loop(now, stop) == Turn(paused=True)  # the periodic job failed: a pause
    assert worker.backoff.since is not None
    now = 101
    assert worker.loop(now, stop) == Turn(paused=True)  # still due, Typesense still down
    assert (ran, outages) == ([], [])
    index.down = 0  # Typesense is back
    now = 102
    assert worker.loop(now, stop) == Turn(0)
    assert worker.backoff.since is None
    for now in (103, 111, 112, 200):
        assert worker.loop(now, stop) == Turn(0)
    # the failed periodic job stayed due and ran at once; after_outage once, when it was back
    assert ran == [102, 112, 200]
    assert outages == [102]


def test_a_synced_line_a_minute_while_changes_flow_and_none_while_idle(db: Database) -> None:
    index = FakeIndex()
    telemetry = Telemetry()
    applier = Applier(db, {"sequences": index}, batch_size=100, telemetry=telemetry)  # type: ignore[dict-item]
    progress = Job("progress", 60, Progress(db, telemetry), due_at_start=False)
    worker = Worker(db, [index], applier, [progress], telemetry=telemetry)  # type: ignore[list-item]
    stop = threading.Event()
    with structlog.testing.capture_logs() as logs:
        worker.loop(0, stop)  # idle: the minute starts
        insert_rows(db.conn, range(1, 4))
        db.conn.execute("DELETE FROM sequences WHERE id = 3")
        while worker.loop(10, stop).applied:
            pass
        worker.loop(59, stop)  # not a minute yet
        assert [e for e in logs if e["event"] == "synced"] == []
        worker.loop(60, stop)
        for now in (120, 180, 240):  # idle minutes: nothing
            worker.loop(now, stop)
    [synced] = [e for e in logs if e["event"] == "synced"]
    # row 3's insert was superseded by its delete before the drain: two upserts, one delete
    assert (synced["upserted"], synced["deleted"], synced["failed"]) == (2, 1, 0)
    assert (synced["pending"], synced["sync_errors_open"]) == (0, 0)
    assert synced["log_level"] == "info"


@pytest.mark.parametrize("embedded", [False, True])
def test_a_start_against_a_refused_url_hints_that_the_url_may_be_wrong(
    db: Database, tmp_path: Path, embedded: bool
) -> None:
    """With the embedded server (here one not started yet) no URL was given: no such hint."""
    port = free_port()
    server = LocalTypesense(tmp_path / "typesense", api_key="key", port=port) if embedded else None
    index = TypesenseIndex([f"http://127.0.0.1:{port}"], "key", "sequences", timeout_s=1)
    worker = daemon(
        db, [index], telemetry=Telemetry(), server=server, min_backoff_s=0.05, max_backoff_s=0.1
    )
    with structlog.testing.capture_logs() as logs, running(worker):
        wait_until(lambda: any(e["event"] == "sync_paused" for e in logs), what="a pause")
    paused = next(e for e in logs if e["event"] == "sync_paused")
    if embedded:
        assert "hint" not in paused
    else:
        assert "URL may be wrong" in paused["hint"] and "--typesense-url" in paused["hint"]


def inotify_instances() -> int:
    """This process's inotify instances (fds of other threads may close while they are read)."""
    targets = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            targets.append(os.readlink(fd))
    return sum("inotify" in target for target in targets)


def test_a_loop_run_once_makes_no_watch(
    db: Database, index: TypesenseIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    # it never waits for a change, and closing an inotify instance takes the kernel milliseconds
    made: list[Database] = []
    monkeypatch.setattr(worker_module, "watch_changes", made.append)
    insert_rows(db.path, [1, 2])
    daemon(db, [index], telemetry=Telemetry()).run(threading.Event(), once=True)
    assert made == [] and db.counts(SEQUENCES)["pending"] == 0


def test_a_drain_keeps_the_loops_heartbeat_once_a_batch(
    db: Database, index: TypesenseIndex
) -> None:
    """A long drain hands back to the loop only every DRAIN_SLICE_S: meanwhile it keeps the
    heartbeat that /healthz and the systemd watchdog read, or they would take it for a hung
    loop."""

    class Beats(Telemetry):
        def __init__(self) -> None:
            super().__init__(metrics=False)
            self.beats = 0

        def loop_alive(self, now: float) -> None:
            self.beats += 1
            super().loop_alive(now)

    insert_rows(db.path, range(1, 9))
    telemetry = Beats()
    worker = daemon(db, [index], batch_size=2, telemetry=telemetry)
    assert worker.applier.drain(threading.Event()) == 8
    assert telemetry.beats == 4  # one a batch of 2
    assert index.count() == 8


def test_the_loop_watches_the_file_while_it_runs_and_closes_the_watch_after(
    db: Database, index: TypesenseIndex
) -> None:
    # inotify instances are few (128 a user by default): a leak ends in polling
    worker = daemon(db, [index], telemetry=Telemetry())
    before = inotify_instances()
    with running(worker):
        watch = wait_until(lambda: worker.watch, what="the loop to watch the file")
        assert watch.mode == "inotify" and inotify_instances() == before + 1
    assert worker.watch is None and inotify_instances() == before


def test_the_restart_watch_looks_at_the_time_of_its_look_not_of_the_turn(db: Database) -> None:
    """A chore earlier in the same turn (a reindex) can take minutes: with the turn's time, a
    connection idle that long (closed by httpx or Typesense after 60 s) looked fresh, and its
    loss a restart (found by a review)."""
    told: list[float] = []

    class Watch:
        off: ClassVar[dict[str, str]] = {}

        def lost(self, now: float) -> list[str]:
            told.append(now)
            return []

        def close(self) -> None:
            pass

    job = worker_module.restart_job(db, Watch(), lambda reason: None, lambda: False)  # type: ignore[arg-type]
    before = time.monotonic()
    job.run(0.0)  # the turn began long ago
    assert told and told[0] >= before


def test_a_watch_that_gives_up_while_the_daemon_runs_says_so(
    db: Database, index: TypesenseIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inotify may give up mid-run (no watch left for a new -wal or -journal: the user's
    limit reached; the directory's watch gone): the daemon polled from then on, with nothing
    said, where a start in that state logs its mode."""
    full = threading.Event()
    watch_file = ChangeWatch._watch_file
    monkeypatch.setattr(
        ChangeWatch,
        "_watch_file",
        lambda watch, name: (
            "inotify_add_watch: no space left" if full.is_set() else watch_file(watch, name)
        ),
    )
    journal = Path(f"{db.path}-journal")
    with capture_logs() as logged, running(daemon(db, [index], audit_every_s=0)):
        insert_rows(db.path, [1])
        wait_until(lambda: db.counts(SEQUENCES)["pending"] == 0, what="the first drain")
        full.set()
        journal.touch()  # a file of the database's created: watched from its creation event
        wait_until(lambda: [e for e in logged if e["event"] == "change_watch"], what="the line")
        journal.unlink()
        insert_rows(db.path, [2])  # and the daemon goes on, polling
        wait_until(lambda: db.counts(SEQUENCES)["pending"] == 0, what="the next drain")
    [said] = [e for e in logged if e["event"] == "change_watch"]
    assert (said["log_level"], said["mode"]) == ("warning", "poll")
    assert said["reason"] == "inotify_add_watch: no space left"


def test_the_chores_run_once_a_second_under_a_writer_that_never_pauses(db: Database) -> None:
    """A drain of small batches handed back to the loop only once its 15 s slice was over:
    under a steady trickle of commits the checks of the file, the lock and the triggers, and
    the report of an audit, waited that long (an audit asked for by a trigger repair was
    reported 15 s late). Nothing is in flight between small batches: they hand back at once."""

    class SlowIndex(FakeIndex):  # each import takes a while: the outbox never empties
        def import_jsonl(self, body: bytes, count: int) -> list[ImportResult]:
            time.sleep(0.02)
            return super().import_jsonl(body, count)

    chores: list[float] = []
    worker = worker_with(db, SlowIndex(), Job("chore", 1.0, chores.append))  # type: ignore[arg-type]

    def write() -> None:
        conn = app_connection(db.path)
        for key in range(1, 1501):  # ~3 s of commits, one every 2 ms
            insert_rows(conn, [key])
            time.sleep(0.002)

    with running(worker):
        writer = threading.Thread(target=write)
        writer.start()
        writer.join()
        during = len(chores)
    assert during >= 3, f"the chores ran {during} times in the writer's ~3 s"


def test_large_rows_make_smaller_batches_and_requests_and_every_row_syncs(
    db: Database, served: Server, collection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of 60 KB, 5,000 to a batch, peaked the daemon at 1.4 GB of memory (the batches
    prepared and in flight, each request's copies of its body). The first claim takes
    FIRST_READ_ROWS entries; each later one as many as make about READ_MAX_BYTES at the last
    batch's size per entry; no request carries more than IMPORT_MAX_BYTES."""
    monkeypatch.setattr("outbox_sync.db.READ_MAX_BYTES", 40_000)
    monkeypatch.setattr(typesense_index, "IMPORT_MAX_BYTES", 40_000)
    batches: list[int] = []  # entries per batch of upserts

    class Recording(TypesenseIndex):
        def import_jsonl(self, body: bytes, count: int, *, action: str = "upsert") -> Any:
            batches.append(count)
            return super().import_jsonl(body, count, action=action)

    index = Recording([served.url], served.api_key, collection)
    index.ensure_collection()
    sent: list[int] = []  # bytes per request
    imported = index.writes.import_
    monkeypatch.setattr(
        index.writes,
        "import_",
        lambda part, params: sent.append(len(part)) or imported(part, params),
    )
    insert_large_rows(db.path, 300)  # ~4 KB a line
    drain(daemon(db, [index], batch_size=200))
    assert export(served, collection) == sqlite_documents(db.path)
    assert sum(batches) == 300 and batches[0] == FIRST_READ_ROWS
    assert max(batches[1:]) <= 10  # 40,000 bytes of ~4,000-byte lines
    assert max(sent) <= 40_000 and len(sent) > len(batches)  # the first batch, in parts


def test_rows_grown_since_the_last_batch_are_read_near_the_bound_and_every_row_syncs(
    db: Database, served: Server, collection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim is sized by the batch before it: after small rows it took batch_size entries,
    and rows of 60 KB made a read of 301 MB. A read stops once its lines pass READ_MAX_BYTES,
    and the batch ends at the last entry read (found by a hostile review)."""
    monkeypatch.setattr("outbox_sync.db.READ_MAX_BYTES", 40_000)
    monkeypatch.setattr("outbox_sync.db.READ_CHUNK_ROWS", 2)
    bodies: list[tuple[int, int]] = []  # (entries, bytes) per batch of upserts

    class Recording(TypesenseIndex):
        def import_jsonl(self, body: bytes, count: int, *, action: str = "upsert") -> Any:
            bodies.append((count, len(body)))
            return super().import_jsonl(body, count, action=action)

    index = Recording([served.url], served.api_key, collection)
    index.ensure_collection()
    worker = daemon(db, [index], batch_size=200)
    insert_rows(db.path, range(1_001, 1_501))  # ~170 bytes a line: 200 make 34,000
    drain(worker)
    assert bodies[-1][0] == 200  # the claims grew to batch_size
    bodies.clear()
    insert_large_rows(db.path, 300)  # ~4 KB a line: 200 make 800,000 bytes
    drain(worker)
    assert export(served, collection) == sqlite_documents(db.path)
    assert sum(count for count, _ in bodies) == 300
    # the bound, and at most one chunk of two rows past it
    assert max(size for _, size in bodies) <= 40_000 + 2 * 4_100


def two_mappings(db_path: Path, batch_size: int) -> tuple[Database, dict[str, FakeIndex], Applier]:
    """The database prepared for `sequences` and a copy of it (an entry of each per change, in
    turn), a fake index for each, and their applier."""
    copy = replace(SEQUENCES, name="copy", collection="copy")
    db = Database(db_path)
    schema.init(db, [SEQUENCES, copy])
    indexes = {"sequences": FakeIndex(), "copy": FakeIndex()}
    indexes["copy"].mapping = copy
    telemetry = Telemetry()
    return db, indexes, Applier(db, indexes, batch_size=batch_size, telemetry=telemetry)  # type: ignore[arg-type]


def test_a_batch_cut_where_a_read_stopped_leaves_the_other_mappings_entries_after_it_queued(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that stops ends the batch of two mappings at its last entry: the other mapping's
    entries after it, read already, are left queued for the next batch, and every row of both
    mappings arrives."""
    monkeypatch.setattr("outbox_sync.db.READ_MAX_BYTES", 40_000)
    monkeypatch.setattr("outbox_sync.db.READ_CHUNK_ROWS", 2)
    db, indexes, applier = two_mappings(db_path, batch_size=200)
    insert_rows(db_path, range(1_001, 1_201))  # an entry of each mapping per row, in turn
    while applier.apply_once().entries:
        pass
    insert_large_rows(db_path, 100)  # ~4 KB a line
    entries = []  # per batch
    while count := applier.apply_once().entries:
        entries.append(count)
    assert sum(entries) == 200 and max(entries) <= 40_000 // 4_000 + 2 * 2
    for fake in indexes.values():
        documents = {doc_id: json.loads(line) for doc_id, line in fake.documents.items()}
        assert documents == sqlite_documents(db_path)
    assert db.conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
    db.close()


def test_a_read_failing_for_want_of_the_disk_leaves_the_entries_queued(
    db_path: Path,
    db: Database,
    index: TypesenseIndex,
    typesense_server: Server,
    collection: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch whose read failed fell back to reading its entries one by one, meant for a row
    an `sql` field cannot read; when the trouble was the disk's ("disk I/O error") for those
    reads too, each entry became a sync error and was acknowledged, never applied (found by a
    hostile review)."""
    insert_rows(db_path, range(1, 4))
    applier = Applier(db, {"sequences": index}, batch_size=100, telemetry=Telemetry())
    read = Database.read_claimed

    def failing(*args: Any) -> Any:
        error = sqlite3.OperationalError("disk I/O error")
        error.sqlite_errorcode = sqlite3.SQLITE_IOERR  # as SQLite sets it
        raise error

    monkeypatch.setattr(Database, "read_claimed", failing)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        applier.apply_once()
    assert db.conn.execute("SELECT count(*) FROM outbox").fetchone() == (3,)
    assert db.conn.execute("SELECT count(*) FROM sync_errors").fetchone() == (0,)
    monkeypatch.setattr(Database, "read_claimed", read)
    assert applier.apply_once().upserted == 3
    assert export(typesense_server, collection) == sqlite_documents(db_path)


@pytest.mark.parametrize("seed", range(4))
def test_batches_cut_at_random_row_sizes_bring_every_change_of_two_mappings(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Rows whose size jumps from batch to batch, written, rewritten and deleted between drains
    of two mappings of one table through the pipelined drain, with a bound a few rows pass:
    the batches are cut where a read stops, anywhere among the two mappings' entries, and each
    collection ends as the table is."""
    rng = random.Random(seed)
    monkeypatch.setattr("outbox_sync.db.READ_MAX_BYTES", 20_000)
    monkeypatch.setattr("outbox_sync.db.READ_CHUNK_ROWS", 3)
    db, indexes, applier = two_mappings(db_path, batch_size=60)
    cuts: list[int] = []
    cut = Applier._cut
    monkeypatch.setattr(Applier, "_cut", lambda self, *a: cuts.append(a[-1]) or cut(self, *a))
    app = app_connection(db_path)
    for _ in range(6):
        for _ in range(rng.randrange(20, 120)):
            key, size = rng.randrange(1, 80), rng.choice([10, 200, 3_000, 9_000])
            if rng.random() < 0.2:
                app.execute("DELETE FROM sequences WHERE id = ?", (key,))
            else:
                row = make_row(key, comment=f"{key} " + "w" * size)
                app.execute(
                    f"{ROW_SQL} ON CONFLICT (id) DO UPDATE SET comment = excluded.comment", row
                )
        while applier.drain(threading.Event(), max_seconds=60):
            pass
        assert db.conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
        for fake in indexes.values():
            documents = {doc_id: json.loads(line) for doc_id, line in fake.documents.items()}
            assert documents == sqlite_documents(db_path)
    assert len(cuts) >= 5  # the case at hand: batches cut where a read stopped
    app.close()
    db.close()


@pytest.mark.parametrize("small_first", [False, True])
def test_rows_the_python_mapper_writes_count_toward_the_reads_stop_and_the_next_claim(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    typesense_server: Server,
    collection: str,
    small_first: bool,
) -> None:
    """A row SQLite leaves to the Python mapper (an array whose text holds an escape, as
    `json.dumps(["café"])` writes it) is read with an empty line: its bytes were counted as
    none, and the claims grew to batch_size however large the rows (800 KB a batch here,
    against a bound of 40,000). Its line counts once written, and its values' bytes stop the
    read: the first read, of FIRST_READ_ROWS, and one after small rows, which the claim had
    sized at batch_size, were taken whole (found by a hostile review)."""
    monkeypatch.setattr("outbox_sync.db.READ_MAX_BYTES", 40_000)
    monkeypatch.setattr("outbox_sync.db.READ_CHUNK_ROWS", 2)
    docs = Mapping(
        table="docs",
        key="id",
        collection=collection,
        fields=(Field("body", "string"), Field("tags", "string[]")),
    )
    app = app_connection(tmp_path / "app.db")
    app.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT NOT NULL, tags TEXT)")
    db = Database(tmp_path / "app.db")
    schema.init(db, [docs])
    [bound] = schema.check(db, [docs])
    index = TypesenseIndex(
        [typesense_server.url], typesense_server.api_key, collection, mapping=bound
    )
    index.ensure_collection()
    bodies: list[int] = []
    send = index.import_jsonl

    def recording(body: bytes, count: int, **options: Any) -> list[ImportResult]:
        bodies.append(len(body))
        return send(body, count, **options)

    index.import_jsonl = recording  # type: ignore[method-assign]
    applier = Applier(db, {"docs": index}, batch_size=200, telemetry=Telemetry())
    small = 400 if small_first else 0
    app.executemany(
        "INSERT INTO docs VALUES (?, 'a', '[]')", [(key,) for key in range(1, small + 1)]
    )
    while applier.apply_once().entries:
        pass
    assert applier.claim_size == (200 if small_first else 100)  # FIRST_READ_ROWS
    bodies.clear()
    rows = [(key, f"{key} " + "words " * 660, json.dumps(["café"])) for key in range(1, 401)]
    app.executemany("INSERT OR REPLACE INTO docs VALUES (?, ?, ?)", rows)  # ~4 KB a line
    while applier.apply_once().entries:
        pass
    documents = export(typesense_server, collection)
    assert len(documents) == 400 and documents["400"]["tags"] == ["café"]
    assert max(bodies) <= 40_000 + 2 * 4_100, bodies  # the bound and a chunk past it
    assert sum(bodies) >= 400 * 4_000
    db.close()


@pytest.mark.parametrize("tag_key", ["TEXT", "INTEGER"])
def test_a_dependencys_text_key_delete_and_the_rows_upsert_are_never_in_flight_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tag_key: str
) -> None:
    """The pipeline sends a batch beside the one in flight only when they share no record. A
    dependency's TEXT '5', whose row is gone, names document 5 (a delete), but its record was
    ('items', '5'); the next batch's upsert of the row 5, inserted meanwhile, ('items', 5):
    both flew, the delete landed last, and the row's document was gone (found by a hostile
    review)."""
    items = Mapping(
        table="items",
        key="id",
        collection="items",
        fields=(Field("name", "string"),),
        depends_on=(Dependency("item_tags", "item_id"),),
    )
    path = tmp_path / "items.db"
    app = app_connection(path)
    app.executescript(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL);"
        f"CREATE TABLE item_tags (item_id {tag_key}, tag TEXT);"
    )
    db = Database(path)
    schema.init(db, [items])
    imported = threading.Event()

    class SlowDelete(FakeIndex):
        def import_jsonl(self, body: bytes, count: int) -> list[ImportResult]:
            try:
                return super().import_jsonl(body, count)
            finally:
                imported.set()

        def delete_ids(self, ids: list[str]) -> int:
            imported.wait(2)  # lands after an import sent beside it
            return super().delete_ids(ids)

    fake = SlowDelete()
    [fake.mapping] = schema.check(db, [items])
    applier = Applier(db, {"items": fake}, batch_size=1, telemetry=Telemetry())  # type: ignore[dict-item]
    app.execute("INSERT INTO item_tags VALUES ('5', 'red')")  # no row 5 yet
    prepare = applier._prepare

    def prepared(after: int) -> Any:  # the row 5 commits once the first batch is read
        batch = prepare(after)
        if not app.execute("SELECT 1 FROM items").fetchall():
            app.execute("INSERT INTO items VALUES (5, 'five')")
        return batch

    monkeypatch.setattr(applier, "_prepare", prepared)
    while applier.drain(threading.Event()):
        pass
    assert db.conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
    assert "5" in fake.documents
    db.close()
