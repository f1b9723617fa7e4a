"""SQLite hazards and bad input, against a real Typesense: WAL growth under a busy writer, a
writer holding the lock, the application changing the table, a database file that is missing,
read-only or not a database, and values no document may carry."""

import contextlib
import ctypes
import itertools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import structlog

from outbox_sync import claims, schema, stats, sync_errors
from outbox_sync.db import Database, is_busy, is_full
from outbox_sync.errors import DatabaseError, DatabaseFullError
from outbox_sync.mapping import SEQUENCES, Field, Mapping
from outbox_sync.reconcile import Reconciler
from outbox_sync.telemetry import Telemetry
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import STATS_SAVE_INTERVAL_S, Stop, Worker, daemon, save_stats
from tests.support.app import (
    ROW_SQL,
    app_connection,
    insert_rows,
    make_row,
    sqlite_documents,
    switched_to_delete,
)
from tests.support.cli import error_lines, invoke, run_module, without_settings
from tests.support.daemon import Daemon, running
from tests.support.typesense import Server, export
from tests.support.wait import wait_until

# The -wal file a drain may leave: SQLite checkpoints every 1,000 pages (4 MiB); twice that is
# room for a checkpoint that had to wait for one short read.
WAL_BOUND_BYTES = 8 * 1024 * 1024


def wal_size(db_path: Path) -> int:
    with contextlib.suppress(FileNotFoundError):
        return db_path.with_name(db_path.name + "-wal").stat().st_size
    return 0


class BusyWriter:
    """An application committing one small update after another, from a thread, until stopped;
    the -wal file's size is sampled meanwhile."""

    def __init__(self, db_path: Path, keys: int) -> None:
        self.db_path, self.keys = db_path, keys
        self.stop = threading.Event()
        self.commits = 0
        self.largest_wal = 0
        self.threads = [
            threading.Thread(target=self._write),
            threading.Thread(target=self._sample),
        ]

    def __enter__(self) -> "BusyWriter":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _write(self) -> None:
        conn = app_connection(self.db_path)
        while not self.stop.is_set():
            key = self.commits % self.keys + 1
            conn.execute(
                "UPDATE sequences SET comment = ? WHERE id = ?", (f"busy {self.commits}", key)
            )
            self.commits += 1
        conn.close()

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.largest_wal = max(self.largest_wal, wal_size(self.db_path))


def test_a_reader_holding_an_old_snapshot_is_measured_as_uncheckpointed_wal(
    db_path: Path, db: Database
) -> None:
    """A connection that keeps a read transaction open holds back every checkpoint: the -wal
    file grows with each write. The daemon's figure for it (outbox_sync_database_wal_
    uncheckpointed_bytes) is the WAL past that reader's snapshot, and 0 once it ends."""
    app, reader = app_connection(db_path), app_connection(db_path)
    telemetry = Telemetry(metrics=True)
    assert telemetry.metrics is not None
    insert_rows(app, range(1, 11))
    assert db.wal_uncheckpointed_bytes() == 0
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM sequences").fetchone()
    for start in range(11, 3011, 100):  # 30 commits past the reader's snapshot
        insert_rows(app, range(start, start + 100))
    held = db.wal_uncheckpointed_bytes()
    assert 100_000 < held <= wal_size(db_path)
    telemetry.wal(held)
    assert telemetry.metrics.wal_uncheckpointed._value.get() == held
    assert db.wal_uncheckpointed_bytes() == held  # still held: nothing more could be copied
    reader.execute("COMMIT")
    assert db.wal_uncheckpointed_bytes() == 0
    reader.close()
    db.close()
    assert switched_to_delete(app)  # a rollback journal has no WAL to hold back
    with contextlib.closing(Database(db_path)) as again:
        assert again.wal_uncheckpointed_bytes() == 0


def test_a_long_drain_under_a_busy_writer_keeps_the_wal_bounded(
    db_path: Path, db: Database, index: TypesenseIndex, typesense_server: Server, collection: str
) -> None:
    insert_rows(db_path, range(1, 5_001))
    worker = daemon(db, [index], batch_size=250)  # the daemon's loop, in many short batches
    with running(worker):
        with BusyWriter(db_path, 5_000) as writer:
            wait_until(lambda: writer.commits >= 4_000, 60, "4,000 commits of the writer")
        wait_until(lambda: Database(db_path).counts(SEQUENCES)["pending"] == 0, 60, "the drain")
    # Each commit appends at least 3 pages to the WAL (the row, the outbox, its sequence): far
    # past the bound, had the daemon kept a checkpoint from resetting the log.
    assert writer.commits * 3 * 4096 > 4 * WAL_BOUND_BYTES, writer.commits
    assert writer.largest_wal <= WAL_BOUND_BYTES, (writer.largest_wal, writer.commits)
    print(f"\nWAL at most {writer.largest_wal / 2**20:.1f} MiB over {writer.commits} commits")
    assert export(typesense_server, collection) == sqlite_documents(db_path)

    # The measurement can see the hazard: one read transaction held open (what the daemon must
    # never do) and the same writer grows the -wal past the bound within a second or two.
    reader = app_connection(db_path)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM outbox").fetchone()
    with BusyWriter(db_path, 5_000) as stuck:
        wait_until(lambda: stuck.largest_wal > WAL_BOUND_BYTES, 30, "the WAL to grow")
    reader.execute("ROLLBACK")


@pytest.mark.parametrize("busy_timeout_s", [0.2, 30.0], ids=["short-timeout", "default-timeout"])
def test_a_writer_holding_the_write_lock_is_waited_out_and_nothing_is_lost(
    db_path: Path,
    index: TypesenseIndex,
    typesense_server: Server,
    collection: str,
    busy_timeout_s: float,
) -> None:
    conn = app_connection(db_path)
    insert_rows(conn, range(1, 2_001))
    db = Database(db_path, busy_timeout_s=busy_timeout_s)
    worker = daemon(db, [index], batch_size=100, min_backoff_s=0.05, max_backoff_s=0.2)
    with structlog.testing.capture_logs() as logs, running(worker) as thread:
        # the application takes the write lock once the first batch is acknowledged, with the
        # rest still to do: checked every 50 ms, ~1,000 went between two checks (300-1,200
        # were left at the lock in six runs), and once none was, the test failed
        wait_until(lambda: outbox_entries(conn) < 2_000, 30, "a drain", 0.001)
        conn.execute("BEGIN IMMEDIATE")  # the application holds the write lock for 1.5 s
        assert outbox_entries(conn) > 0  # acknowledgements wait for it
        conn.execute("UPDATE sequences SET comment = 'under lock' WHERE id % 2 = 0")
        conn.execute("DELETE FROM sequences WHERE id % 5 = 0")
        time.sleep(1.5)
        conn.execute("COMMIT")
        wait_until(lambda: Database(db_path).counts(SEQUENCES)["pending"] == 0, 60, "the drain")
    assert not thread.is_alive()
    assert export(typesense_server, collection) == sqlite_documents(db_path)
    assert sync_errors.find(Database(db_path)) == []
    paused = [e for e in logs if e["event"] == "sync_paused"]
    if busy_timeout_s < 1:  # the acknowledgement gave up on the lock: paused, then resumed
        assert paused and "locked" in paused[0]["reason"]
        assert any(e["event"] == "sync_resumed" for e in logs)
    else:  # it simply waited for the lock
        assert paused == []


class Heartbeats(Telemetry):
    """Telemetry that notes when each heartbeat of the loop came (what feeds the watchdog)."""

    def __init__(self) -> None:
        super().__init__(metrics=False)
        self.at: list[float] = []

    def loop_alive(self, now: float) -> None:
        self.at.append(time.monotonic())
        super().loop_alive(now)


def test_a_turn_under_the_applications_write_lock_keeps_its_heartbeat(
    db_path: Path, index: TypesenseIndex
) -> None:
    """While the application holds the write lock, each write of one turn waits out the busy
    timeout: the statistics' save and the finished audit's record give up and let the turn go
    on, then the acknowledgement waits again. With no heartbeat between them, three waits of
    30 s went past the watchdog's 90 s (which is pinged at most every 45 s): systemd would
    kill a daemon that only waited for the lock (found by a review). Every gap between two
    heartbeats stays within about one busy timeout."""
    busy_s = 0.5
    telemetry = Heartbeats()
    db = Database(db_path, busy_timeout_s=busy_s)
    worker = daemon(db, [index], telemetry=telemetry, audit_every_s=3600.0, min_backoff_s=0.05)
    reconciler = worker.jobs["audit"].run
    assert isinstance(reconciler, Reconciler)
    stop = Stop()
    app = app_connection(db_path)
    app.execute(ROW_SQL, make_row(1))
    worker.loop(time.monotonic(), stop)  # applies it (statistics to save), starts the audit
    audit = reconciler.thread
    wait_until(lambda: audit is not None and not audit.is_alive(), what="the start audit")
    app.execute(ROW_SQL, make_row(2))  # for the turn to acknowledge
    app.execute("BEGIN IMMEDIATE")  # the application's long transaction: a migration
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        turn = worker.loop(started + STATS_SAVE_INTERVAL_S, stop)  # the statistics are due
        ended = time.monotonic()
    app.execute("ROLLBACK")
    reconciler.stop()
    stop.close()
    db.close()
    events = [entry["event"] for entry in logs]
    assert {"stats_not_saved", "audit_done", "sync_paused"} <= set(events), events
    assert turn.paused and ended - started >= 3 * busy_s  # three waits in one turn
    beats = [started, *[at for at in telemetry.at if at > started], ended]
    longest = max(later - earlier for earlier, later in itertools.pairwise(beats))
    assert longest < 1.5 * busy_s, f"{longest:.2f} s without a heartbeat (busy timeout {busy_s} s)"


def test_a_wait_for_the_lock_while_the_daemon_is_made_is_waited_out(
    db: Database, db_path: Path, index: TypesenseIndex
) -> None:
    """The daemon's first start writes the database's id (claims.py) before its loop exists:
    a wait for the application's lock there asked the loop whether it was stopping, and the
    daemon crashed with a NameError (found by tests/test_daemon.py's writers)."""
    app = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    app.execute("BEGIN IMMEDIATE")
    threading.Timer(0.3, app.execute, ("ROLLBACK",)).start()
    daemon(db, [index], claims=True)
    assert db.get_meta(claims.DATABASE_ID_KEY) is not None
    assert not db.stopping()  # and now it asks the loop


def test_a_stop_ends_the_audit_threads_wait_for_the_lock_as_it_opens_its_connection(
    db_path: Path, index: TypesenseIndex
) -> None:
    """In a rollback journal an application's exclusive lock holds up the audit thread's first
    read, as it opens its own connection. That wait did not know of a stop (the thread told
    its database once it was open): the loop's stop waited out STOP_WAIT_S (10 s) for the
    thread, then left it waiting for the lock (found by a review)."""
    app = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    wait_until(lambda: switched_to_delete(app), what="the switch to a rollback journal")
    db = Database(db_path)
    worker = daemon(db, [index], audit_every_s=3600.0)
    reconciler = worker.jobs["audit"].run
    assert isinstance(reconciler, Reconciler)
    stop = threading.Event()
    worker.stopping = stop  # as the loop's turn sets it
    app.execute("BEGIN EXCLUSIVE")  # readers wait too, in this journal mode
    try:
        reconciler(time.monotonic())  # the start audit: its thread opens its connection
        stop.set()
        started = time.monotonic()
        reconciler.stop()  # the loop's at_stop
        took = time.monotonic() - started
        audit = reconciler.thread
    finally:
        app.execute("ROLLBACK")
    if audit is not None:
        audit.join(30)
    db.close()
    assert took < 5, f"the stop waited {took:.1f} s for the audit thread"


def assert_stops_at_once(daemon: Daemon) -> None:
    """SIGTERM: the daemon stops as on any stop, exit 0, within a few seconds."""
    daemon.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    with contextlib.suppress(subprocess.TimeoutExpired):
        daemon.process.wait(20)
    took = time.monotonic() - signalled
    assert daemon.process.poll() == 0 and took < 5, f"exit {daemon.process.poll()} in {took:.1f} s"
    assert daemon.logged("stopping") and daemon.logged("stopped")


def outbox_entries(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])


@pytest.mark.slow
def test_sigterm_while_a_write_waits_for_the_applications_lock_stops_the_daemon_at_once(
    db_path: Path, index: TypesenseIndex, start_daemon: Callable[..., Daemon]
) -> None:
    """The acknowledgement waits for the lock the application holds, up to the busy timeout
    (30 s), and the writes a stop makes (the statistics) would each wait as long: systemd's
    TimeoutStopSec (60 s) ran out, and it killed the daemon (found by a review). A stop ends
    each wait within a moment; the entry stays queued for the next start."""
    app = app_connection(db_path)
    daemon = start_daemon()
    app.execute(ROW_SQL, make_row(1))
    wait_until(lambda: daemon.logged("audit_done") and index.retrieve("1"), what="a start")
    app.execute(ROW_SQL, make_row(2))
    app.execute("BEGIN IMMEDIATE")  # the application's long transaction, right after
    assert outbox_entries(app) == 1  # not yet acknowledged
    wait_until(lambda: index.retrieve("2"), what="the import")  # the acknowledgement waits
    time.sleep(0.5)
    assert_stops_at_once(daemon)
    assert outbox_entries(app) == 1
    app.execute("ROLLBACK")
    assert start_daemon("--once").wait(60) == 0
    assert outbox_entries(app) == 0


def test_sigterm_while_the_daemons_set_up_waits_for_the_lock_stops_it_at_once(
    db_path: Path, typesense_server: Server, collection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon's first start writes the database's id (claims.py) after its signal handlers
    are set and before its loop runs; in a rollback journal that write's commit waits for the
    application's readers. A stop there was only seen by the loop: the wait went on to the
    busy timeout (30 s), then the daemon exited 1, "stayed locked" (the last stop's finding).
    In-process: the reader starts as the id is made, right before its write."""
    app = app_connection(db_path)
    wait_until(lambda: switched_to_delete(app), what="the switch to a rollback journal")
    make_id = uuid.uuid4
    # SIGTERM to this process, which the command's handler takes; cancelled once it returns
    sigterm = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))

    def made_as_a_reader_starts() -> uuid.UUID:
        monkeypatch.setattr(claims.uuid, "uuid4", make_id)  # once
        app.execute("BEGIN")
        app.execute("SELECT count(*) FROM sequences").fetchone()
        sigterm.start()
        return make_id()

    monkeypatch.setattr(claims.uuid, "uuid4", made_as_a_reader_starts)
    started = time.monotonic()
    try:
        result = invoke(["run"], typesense_server, db_path, collection)
    finally:
        sigterm.cancel()
    took = time.monotonic() - started
    app.execute("ROLLBACK")
    assert result.exit_code == 0 and took < 5, (result.exit_code, took, result.output)
    events = [json.loads(line)["event"] for line in result.output.splitlines() if line[:1] == "{"]
    assert events[-2:] == ["stopping", "stopped"], events
    assert Database(db_path).get_meta(claims.DATABASE_ID_KEY) is None  # it gave up at the stop


def test_only_another_connections_lock_is_waited_for(tmp_path: Path) -> None:
    """Database.wait_for_lock tries again what `is_busy` says: SQLITE_BUSY, another connection's
    lock, which ends. SQLITE_LOCKED ("database table is locked": a conflict in a shared cache,
    or inside one connection) ends with no wait, and was tried again for the whole busy
    timeout: the words "locked" matched both (the last stop's finding)."""
    path = tmp_path / "busy.db"
    first, second = (sqlite3.connect(path, isolation_level=None, timeout=0) for _ in range(2))
    first.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError) as busy:
        second.execute("BEGIN IMMEDIATE")
    assert is_busy(busy.value) and is_busy(sqlite3.OperationalError("database is locked"))
    uri = f"file:{tmp_path / 'shared.db'}?cache=shared"
    writer, reader = (sqlite3.connect(uri, uri=True, isolation_level=None) for _ in range(2))
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN")
    writer.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.OperationalError, match="database table is locked") as locked:
        reader.execute("SELECT * FROM t").fetchall()
    assert not is_busy(locked.value)
    for conn in (first, second, writer, reader):
        conn.close()


def test_a_full_disk_is_told_apart_from_other_write_errors(db_path: Path) -> None:
    """SQLITE_FULL, here the file at its max_page_count (the same error a full file system
    gives), is a DatabaseFullError: retryable, and its words say what to free."""
    db = Database(db_path)
    (pages,) = db.conn.execute("PRAGMA page_count").fetchone()
    db.conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(DatabaseFullError) as full:
        db.set_meta("ballast", "x" * 100_000)
    assert full.value.retryable
    assert str(full.value) == (
        f"cannot write to database {db_path}: database or disk is full. Free space on its file "
        "system (or in TMPDIR, where SQLite sorts)"
    )
    assert is_full(sqlite3.OperationalError("database or disk is full"))
    assert not is_full(sqlite3.OperationalError("database is locked"))
    db.conn.execute(f"PRAGMA max_page_count = {pages * 100}")
    db.set_meta("ballast", "x" * 100_000)  # room again: the same write goes through
    assert db.get_meta("ballast") == "x" * 100_000


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A directory on a tmpfs of 1 MiB of the test's own, to fill (mounting needs root)."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system to fill needs root")
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)]
    mounted = subprocess.run(mount, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield where
    subprocess.run(["umount", "--lazy", str(where)], check=True)


def fill(where: Path) -> Path:
    """A file taking all the room left on `where`'s file system."""
    ballast = where / "ballast"
    with open(ballast, "wb", buffering=0) as file, contextlib.suppress(OSError):  # ENOSPC
        while file.write(bytes(4096)):
            pass
    return ballast


def test_a_full_disk_pauses_the_sync_until_there_is_room_and_nothing_is_lost(
    small_filesystem: Path, index: TypesenseIndex, typesense_server: Server, collection: str
) -> None:
    """The application's rows are committed, then the disk fills: the daemon applies them to
    Typesense but cannot acknowledge them (a commit appends to the -wal file). It stopped with
    exit 1 until 2026-12-04, and systemd started it again every 5 s, each start auditing the
    whole table and sending the batch again; now the loop pauses, says why, and acknowledges
    once there is room."""
    path = small_filesystem / "app.db"
    database = Database(path, create=True)
    schema.init(database, [SEQUENCES])
    database.close()
    conn = app_connection(path)
    conn.execute("BEGIN")
    insert_rows(conn, range(1, 301))
    conn.execute("COMMIT")
    ballast = fill(small_filesystem)
    worker = daemon(Database(path), [index], min_backoff_s=0.05, max_backoff_s=0.2)
    with structlog.testing.capture_logs() as logs, running(worker) as thread:
        wait_until(lambda: any(e["event"] == "sync_paused" for e in logs), 30, "a pause")
        assert thread.is_alive()
        assert outbox_entries(conn) == 300  # applied, maybe, but not acknowledged
        assert "database or disk is full" in worker.telemetry.paused_reason  # for /healthz
        kept = Telemetry(metrics=False)  # statistics the full disk refuses: kept for next time
        kept.batch_applied(0, 7, 0, [])
        save_stats(Database(path), kept)
        ballast.unlink()
        wait_until(lambda: outbox_entries(conn) == 0, 30, "the acknowledgement")
    assert not thread.is_alive()
    save_stats(Database(path), kept)
    assert sum(data["applied"]["delete"] for _, data in stats.scan(Database(path), 0)) == 7
    assert export(typesense_server, collection) == sqlite_documents(path)
    paused = [e for e in logs if e["event"] == "sync_paused"]
    assert f"cannot write to database {path}: database or disk is full" in paused[0]["reason"]
    assert any(e["event"] == "sync_resumed" for e in logs)


def exclusive_lock(db_path: Path) -> tuple[sqlite3.Connection, str]:
    """The application's exclusive lock, and its change held in it (BEGIN EXCLUSIVE, or a
    write transaction that spilled its cache): it holds the daemon's reads up."""
    app = app_connection(db_path)
    app.execute("BEGIN EXCLUSIVE")
    app.execute(ROW_SQL, make_row(2))
    return app, "COMMIT"


def read_transaction(db_path: Path) -> tuple[sqlite3.Connection, str]:
    """The application's change, then a read transaction of its left open: the daemon's
    commit (its acknowledgement) waits for the reader to finish."""
    app_connection(db_path).execute(ROW_SQL, make_row(2))
    reader = app_connection(db_path)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM sequences").fetchone()
    return reader, "ROLLBACK"


@pytest.mark.slow
@pytest.mark.parametrize("hold", [exclusive_lock, read_transaction])
def test_a_wait_for_the_lock_in_a_rollback_journal_keeps_the_heartbeat_and_ends_at_a_stop(
    db_path: Path,
    daemon_env: dict[str, str],
    index: TypesenseIndex,
    start_daemon: Callable[..., Daemon],
    hold: Callable[[Path], tuple[sqlite3.Connection, str]],
) -> None:
    """In a rollback journal an application's exclusive lock holds reads up too, and an
    application's reader holds up a commit; both waited in SQLite's busy handler, up to 30 s
    each without a heartbeat: two in one turn went past the watchdog's 90 s (found by a
    review). The heartbeat now goes on while a statement waits (WATCHDOG=1 is sent at most
    every half WATCHDOG_USEC: 0.5 s here), and a stop ends the wait."""
    app = app_connection(db_path)
    wait_until(lambda: switched_to_delete(app), what="the switch to a rollback journal")
    name = f"outbox-sync-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(0.1)
        daemon = start_daemon(
            env=daemon_env | {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000"}
        )
        app.execute(ROW_SQL, make_row(1))
        wait_until(lambda: daemon.logged("audit_done") and index.retrieve("1"), what="a start")
        holder, release = hold(db_path)
        pings = []
        held = time.monotonic()
        while time.monotonic() < held + 5:
            with contextlib.suppress(TimeoutError):
                if listener.recv(4096) == b"WATCHDOG=1":
                    pings.append(time.monotonic())
        beats = [held, *pings, time.monotonic()]
        longest = max(later - earlier for earlier, later in itertools.pairwise(beats))
        assert longest < 2, f"{longest:.1f} s without WATCHDOG=1 while the lock was held"
        assert_stops_at_once(daemon)
    holder.execute(release)
    assert outbox_entries(app) == 1
    assert start_daemon("--once").wait(60) == 0
    assert outbox_entries(app) == 0 and index.retrieve("2")


APPLICATION_INSERT = (
    "INSERT INTO sequences (id, element_type, element_id, sequence_number, comment)"
    " VALUES ({key}, 'script', 456, 1, 'written by the application')"
)


def application_insert(client: str, db_path: Path, key: int, *, busy_timeout: bool) -> str:
    """One INSERT by an application that opens the file as docs/how-it-works.md says (or without
    the busy timeout): the error it got, "" when it committed."""
    sql = APPLICATION_INSERT.format(key=key)
    if client == "sqlite3 shell":
        timeout = ["-cmd", ".timeout 5000"] if busy_timeout else []
        done = subprocess.run(
            ["sqlite3", *timeout, str(db_path), sql], capture_output=True, text=True, timeout=60
        )
        return done.stderr.strip() if done.returncode else ""
    conn = sqlite3.connect(db_path, timeout=5 if busy_timeout else 0)
    try:
        with conn:
            conn.execute(sql)
    except sqlite3.OperationalError as error:
        return str(error)
    finally:
        conn.close()
    return ""


@pytest.mark.parametrize("client", ["python", "sqlite3 shell"])
def test_an_application_with_the_documented_busy_timeout_waits_out_the_daemons_write_lock(
    db_path: Path, db: Database, client: str
) -> None:
    if client == "sqlite3 shell" and shutil.which("sqlite3") is None:
        pytest.skip("no sqlite3 shell: Debian's sqlite3 package (.ci/run installs it as root)")
    with ThreadPoolExecutor(1) as pool:
        with db.write():  # the lock as the daemon holds it to acknowledge a batch
            refused = application_insert(client, db_path, 1, busy_timeout=False)
            assert "database is locked" in refused
            waiting = pool.submit(application_insert, client, db_path, 2, busy_timeout=True)
            time.sleep(0.3)
            assert not waiting.done()  # it waits for the lock ...
        assert waiting.result(timeout=60) == ""  # ... and commits once the daemon let it go
    assert [key for (key,) in db.conn.execute("SELECT id FROM sequences")] == [2]


def test_the_application_adding_a_column_changes_nothing(
    db_path: Path, db: Database, worker: Worker, typesense_server: Server, collection: str
) -> None:
    conn = app_connection(db_path)
    insert_rows(conn, range(1, 11))
    worker.applier.apply_once()
    # while the daemon's connection is open
    conn.execute("ALTER TABLE sequences ADD COLUMN reviewed_by TEXT DEFAULT 'nobody'")
    conn.execute(
        "INSERT INTO sequences (id, element_type, element_id, sequence_number, created_at,"
        " reviewed_by) VALUES (11, 'script', 1, 11, '2024-01-01T00:00:00Z', 'ana')"
    )
    conn.execute("UPDATE sequences SET reviewed_by = 'bo', comment = 'seen' WHERE id < 4")
    assert worker.applier.apply_once().entries == 4
    assert export(typesense_server, collection) == sqlite_documents(db_path)
    schema.check(db, [SEQUENCES])  # and a restarted daemon accepts the table
    assert sync_errors.find(db) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "change",
    [
        "ALTER TABLE sequences RENAME COLUMN comment TO remark",
        "ALTER TABLE sequences DROP COLUMN comment",
    ],
    ids=["rename", "drop"],
)
def test_renaming_or_dropping_a_synced_column_stops_the_daemon_with_one_clear_line(
    db_path: Path,
    start_daemon: Callable[..., Daemon],
    typesense_server: Server,
    collection: str,
    change: str,
) -> None:
    conn = app_connection(db_path)
    insert_rows(conn, range(1, 6))
    daemon = start_daemon()
    wait_until(lambda: Database(db_path).counts(SEQUENCES)["pending"] == 0, what="the first sync")
    synced = export(typesense_server, collection)
    conn.execute(change)
    conn.execute("UPDATE sequences SET sequence_number = 99 WHERE id = 1")
    assert daemon.wait(30) == 1
    [line] = error_lines(daemon.output())
    assert line.startswith(f"Error: table sequences in {db_path} changed under the daemon")
    assert "no such column: comment" in line and "Traceback" not in daemon.output()
    assert export(typesense_server, collection) == synced  # nothing half-read was indexed
    assert Database(db_path).counts(SEQUENCES)["pending"] == 1  # the change waits for a fixed table
    # a restart refuses the table at once, with what it needs
    again = start_daemon()
    assert again.wait(30) == 1
    [line] = error_lines(again.output())
    assert "table sequences has no column comment" in line


@pytest.mark.parametrize("how", ["replaced", "renamed"])
def test_a_database_moved_under_the_daemon_stops_it_with_one_clear_line(
    db_path: Path,
    start_daemon: Callable[..., Daemon],
    typesense_server: Server,
    collection: str,
    how: str,
) -> None:
    """A backup moved into place, or the file renamed, while the daemon runs: its connection
    would go on reading the old file, which nobody writes any more, and look healthy (and a
    second daemon could take the new name). It stops; started again, it syncs the file there."""
    insert_rows(db_path, range(1, 4))
    daemon = start_daemon()
    wait_until(lambda: Database(db_path).counts(SEQUENCES)["pending"] == 0, what="the first sync")
    backup = db_path.with_name("backup.db")
    with contextlib.closing(app_connection(db_path)) as conn:
        conn.execute("VACUUM INTO ?", (str(backup),))
    insert_rows(backup, [4])  # the restored file has a change of its own
    if how == "replaced":
        os.replace(backup, db_path)
    else:
        os.rename(db_path, db_path.with_name("moved.db"))
    assert daemon.wait(30) == 1
    [line] = error_lines(daemon.output())
    what = "names another file now" if how == "replaced" else "is gone (or out of reach)"
    assert line.startswith(f"Error: database {db_path} {what}: it was renamed, replaced or")
    if how == "replaced":
        again = start_daemon()
        wait_until(lambda: "4" in export(typesense_server, collection), what="the restored row")
        again.process.send_signal(signal.SIGTERM)
        assert again.wait() == 0


def test_a_database_path_whose_directory_was_replaced_stops_with_one_line(
    tmp_path: Path,
) -> None:
    """The path's directory moved away and a file put in its place (ENOTDIR), or one the daemon
    may no longer search (EACCES): the check raised a bare OSError, and the daemon died with a
    traceback instead of its one line (found by a review)."""
    data = tmp_path / "data"
    data.mkdir()
    db = Database(data / "app.db", create=True)
    try:
        data.rename(tmp_path / "moved")
        data.write_text("not a directory\n")
        with pytest.raises(DatabaseError, match=r"app\.db is gone \(or out of reach\)"):
            db.check_same_file()
    finally:
        db.close()


def test_a_dropped_column_named_as_an_outbox_column_is_an_error_not_the_outbox_s(
    tmp_path: Path,
) -> None:
    """The drain reads each entry with its row in one statement: a field's column the table
    no longer has must fail the read, even when the outbox has a column of that name."""
    path = tmp_path / "tasks.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY, op TEXT NOT NULL)")
    tasks = Mapping(table="tasks", key="id", collection="tasks", fields=(Field("op", "string"),))
    db = Database(path)
    schema.init(db, [tasks])
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("INSERT INTO tasks VALUES (1, 'write the report')")
        ((last,),) = conn.execute("SELECT max(id) FROM outbox").fetchall()
        assert db.read_claimed(tasks, 0, last) == (
            [(last, 0, 1, b'{"id":"1","op":"write the report"}')],
            34,
        )
        conn.execute("ALTER TABLE tasks DROP COLUMN op")
    with pytest.raises(DatabaseError, match=r"changed under the daemon \(no such column: op\)"):
        db.read_claimed(tasks, 0, last)
    db.close()


# -- the database file itself ---------------------------------------------------------------------


@pytest.fixture
def cli_env(typesense_server: Server, collection: str) -> dict[str, str]:
    return without_settings(
        TYPESENSE_URL=typesense_server.url,
        TYPESENSE_API_KEY=typesense_server.api_key,
        OUTBOX_SYNC_COLLECTION=collection,
    )


def one_clear_line(result: subprocess.CompletedProcess[str] | object) -> str:
    output = getattr(result, "stderr", None) or getattr(result, "output", "")
    lines = error_lines(output)
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.parametrize("command", [["run", "--once"], ["status"], ["init"]])
def test_a_file_that_is_not_a_database_is_one_clear_line(
    tmp_path: Path, cli_env: dict[str, str], command: list[str]
) -> None:
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 200)
    result = invoke([*command, "--db", str(path)], **cli_env)
    assert result.exit_code == 1
    assert f"database {path}: file is not a database" in one_clear_line(result)
    assert path.read_text().startswith("these are my notes")  # untouched


@pytest.mark.parametrize("command", [["run", "--once"], ["status"]])
def test_a_missing_database_is_one_clear_line(
    tmp_path: Path, cli_env: dict[str, str], command: list[str]
) -> None:
    path = tmp_path / "missing.db"
    result = invoke([*command, "--db", str(path)], **cli_env)
    assert result.exit_code == 1
    assert f"database {path} does not exist: create it with `outbox-sync init" in (
        one_clear_line(result)
    )
    assert not path.exists()


def test_init_in_a_missing_directory_is_one_clear_line(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    path = tmp_path / "no-such-dir" / "app.db"
    result = invoke(["init", "--db", str(path)], **cli_env)
    assert result.exit_code == 1
    assert f"directory {path.parent} does not exist" in one_clear_line(result)


@pytest.mark.parametrize("command", [["run", "--once"], ["status"], ["init"]])
def test_a_directory_given_as_the_database_is_one_clear_line(
    tmp_path: Path, cli_env: dict[str, str], command: list[str]
) -> None:
    result = invoke([*command, "--db", str(tmp_path)], **cli_env)
    assert result.exit_code == 1
    assert f"{tmp_path} is a directory: give --db the database file's path, such as " in (
        one_clear_line(result)
    )
    assert not list(tmp_path.iterdir())  # nothing made in it


def without_write_permission_bypass() -> None:
    """In the child, before exec: as root, drop the capabilities that ignore file modes, so a
    read-only file is read-only to it as to anyone."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_cli(
    args: list[str], env: dict[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return run_module(args, env, timeout_s, preexec_fn=without_write_permission_bypass)


@pytest.fixture
def read_only_db(db_path: Path) -> Path:
    insert_rows(db_path, range(1, 4))
    db_path.chmod(0o444)
    check = subprocess.run(
        [sys.executable, "-c", f"open({str(db_path)!r}, 'ab')"],
        preexec_fn=without_write_permission_bypass,
        capture_output=True,
    )
    if check.returncode == 0:
        pytest.skip("cannot make a file read-only for a child process here")
    return db_path


@pytest.mark.parametrize("command", [["run"], ["init"]])
def test_a_read_only_database_stops_run_and_init_with_one_clear_line(
    read_only_db: Path, cli_env: dict[str, str], command: list[str]
) -> None:
    # `run` without --once: a daemon that cannot write must not sit idle until the first change
    result = run_cli([*command, "--db", str(read_only_db)], cli_env, timeout_s=30)
    assert result.returncode == 1
    assert f"cannot write to database {read_only_db}: attempt to write a readonly database" in (
        one_clear_line(result)
    )
    assert Database(read_only_db).counts(SEQUENCES)["pending"] == 3  # nothing acknowledged


def test_status_reads_a_read_only_database(read_only_db: Path, cli_env: dict[str, str]) -> None:
    result = run_cli(["status", "--json", "--db", str(read_only_db)], cli_env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pending"] == 3


def test_a_lock_file_that_cannot_be_created_is_one_clear_line(
    db_path: Path, cli_env: dict[str, str]
) -> None:
    # The database, its -wal and -shm are writable (an application keeps them open), but the
    # directory is not: the daemon's lock file cannot be made.
    app = app_connection(db_path)
    app.execute(ROW_SQL, make_row(1))
    db_path.parent.chmod(0o555)
    try:
        result = run_cli(["run", "--once", "--db", str(db_path)], cli_env, timeout_s=30)
    finally:
        db_path.parent.chmod(0o755)
        app.close()
    if result.returncode == 0:
        pytest.skip("the directory stayed writable for the child process")
    assert result.returncode == 1
    line = one_clear_line(result)
    assert "lock file" in line and "Permission denied" in line


# -- bad input ------------------------------------------------------------------------------

LOOSE_TABLE = (
    "CREATE TABLE sequences (id INTEGER PRIMARY KEY, element_type, element_id, sequence_number,"
    " comment, created_at)"
)
BAD_ROWS = {
    # id: (SQL values after the id, the error expected in sync_errors)
    11: (
        f"'script', 1, 1, '{'c' * (64 * 1024 + 1)}', 't'",
        "comment: is 65537 bytes, more than the limit of 65536",
    ),
    12: (
        "'script', 1, 1, CAST(x'ff' AS TEXT), 't'",
        "comment: is not valid UTF-8 (bad byte at offset 0)",
    ),
    13: (
        "CAST(x'6f6bff' AS TEXT), 1, 1, NULL, 't'",
        "element_type: is not valid UTF-8 (bad byte at offset 2)",
    ),
    14: ("NULL, 1, 1, NULL, 't'", "element_type: is NULL but the field is required"),
    15: ("'script', NULL, 1, NULL, 't'", "element_id: is NULL but the field is required"),
    16: ("'script', 1, NULL, NULL, 't'", "sequence_number: is NULL but the field is required"),
    17: ("'script', 1, 1, NULL, NULL", "created_at: is NULL but the field is required"),
    18: (
        "'script', 1, 2147483648, NULL, 't'",
        "sequence_number: 2147483648 is outside the range -2147483648..2147483647",
    ),
    19: (
        "'script', 1, -2147483649, NULL, 't'",
        "sequence_number: -2147483649 is outside the range -2147483648..2147483647",
    ),
    20: (
        "'script', 9223372036854775808, 1, NULL, 't'",  # past int64: SQLite keeps a real
        "element_id: expected an integer, got real 9.22337203685478e+18",
    ),
}


@pytest.mark.slow
def test_bad_values_land_in_sync_errors_naming_the_field_and_the_daemon_goes_on(
    tmp_path: Path,
    daemon_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
    typesense_server: Server,
    collection: str,
) -> None:
    path = tmp_path / "legacy.db"
    conn = app_connection(path)
    conn.execute(LOOSE_TABLE)  # an application's own table: no NOT NULL, no types enforced
    schema.init(Database(path, create=True), [SEQUENCES])
    insert_rows(conn, range(1, 11))
    for key, (values, _) in BAD_ROWS.items():
        conn.execute(f"INSERT INTO sequences VALUES ({key}, {values})")
    daemon = start_daemon(env=daemon_env | {"OUTBOX_SYNC_DB": str(path)})
    db = Database(path)
    wait_until(lambda: db.counts(SEQUENCES)["pending"] == 0, what="the drain")
    assert sorted(export(typesense_server, collection), key=int) == [str(i) for i in range(1, 11)]
    errors = {row["record_key"]: row for row in sync_errors.find(db)}
    assert {key: row["error"] for key, row in errors.items()} == {
        key: error for key, (_, error) in BAD_ROWS.items()
    }
    assert all(row["http_status"] is None and row["attempts"] == 1 for row in errors.values())
    assert json.loads(errors[12]["document"])["comment"] == "\ufffd"  # readable, not raw bytes
    assert len(json.loads(errors[11]["document"])["comment"]) < 300  # not the whole value
    conn.execute("UPDATE sequences SET sequence_number = 7 WHERE id = 18")  # the fix
    wait_until(
        lambda: db.counts(SEQUENCES)["sync_errors_open"] == len(BAD_ROWS) - 1, what="the fix"
    )
    assert export(typesense_server, collection)["18"]["sequence_number"] == 7
    # no crash loop: each bad record failed once, and the daemon is still there, still syncing
    # (it applied the fix, queued after every failed entry)
    failed = [
        e for e in map(json.loads, daemon.output().splitlines()) if e["event"] == "record_failed"
    ]
    assert len(failed) == len(BAD_ROWS) and daemon.process.poll() is None
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_an_outbox_dropped_between_the_schema_check_and_the_drain_pauses_the_sync_only(
    db_path: Path, worker: Worker, typesense_server: Server, collection: str
) -> None:
    """The loop's schema check makes outbox-sync's tables again when they are dropped under it
    (tests/test_triggers.py); a drop that lands between that check and the drain's read of the
    outbox is a pause, named, not a crash: the next turn's check makes the table again."""
    app = app_connection(db_path)
    insert_rows(app, range(1, 11))
    drain = worker.applier.drain

    def dropped_first(stop: Stop) -> object:
        worker.applier.drain = drain  # once
        app.execute("DROP TABLE outbox")
        return drain(stop)

    worker.applier.drain = dropped_first  # type: ignore[method-assign]
    stop = Stop()
    with structlog.testing.capture_logs() as logs:
        assert worker.loop(time.monotonic(), stop).paused
        (paused,) = [entry for entry in logs if entry["event"] == "sync_paused"]
        assert paused["reason"].startswith(f"outbox-sync's table outbox is gone from {db_path}")
        assert not [entry for entry in logs if entry["event"] == "own_tables_restored"]
        worker.loop(time.monotonic(), stop)
    (restored,) = [entry for entry in logs if entry["event"] == "own_tables_restored"]
    assert restored["tables"] == ["outbox"]
    insert_rows(app, range(11, 21))  # the application writes again, its changes recorded
    worker.loop(time.monotonic(), stop)
    assert set(export(typesense_server, collection)) >= {str(i) for i in range(11, 21)}


def test_an_outbox_renamed_under_the_daemon_is_made_again_and_its_triggers_put_back(
    db_path: Path, worker: Worker, typesense_server: Server, collection: str
) -> None:
    """`ALTER TABLE outbox RENAME TO outbox_old` (someone keeping the backlog aside): SQLite
    rewrote our triggers to write there. The daemon made the outbox again, then stopped at
    every start on "trigger sequences_outbox_insert already exists", for its triggers no
    longer looked like its own, and `check` said it repairs them. It puts them back and audits,
    and the changes recorded in outbox_old reach search; that table is left as it is."""
    app = app_connection(db_path)
    insert_rows(app, range(1, 11))
    stop = Stop()
    worker.loop(time.monotonic(), stop)
    app.execute("ALTER TABLE outbox RENAME TO outbox_old")
    insert_rows(app, range(11, 21))  # recorded in outbox_old
    with structlog.testing.capture_logs() as logs:
        wait_until(
            lambda: (
                worker.loop(time.monotonic(), stop)
                and set(export(typesense_server, collection)) >= {str(i) for i in range(1, 21)}
            ),
            what="the changes kept in outbox_old synced",
        )
    (restored,) = [entry for entry in logs if entry["event"] == "own_tables_restored"]
    assert restored["tables"] == ["outbox"]
    assert 'sequences_outbox_insert wrote into "outbox_old", not outbox' in restored["triggers"]
    insert_rows(app, range(21, 31))  # into the outbox again
    assert app.execute("SELECT count(*) FROM outbox").fetchone() == (10,)
    worker.loop(time.monotonic(), stop)
    assert set(export(typesense_server, collection)) == {str(i) for i in range(1, 31)}
    assert app.execute("SELECT count(*) FROM outbox_old").fetchone() == (10,)
    assert schema.trigger_problems(app, [SEQUENCES]) == []


def test_an_applications_trigger_under_one_of_our_names_is_refused_naming_it(
    db_path: Path,
) -> None:
    """A trigger of the application's own named as outbox-sync names its trigger: the repair
    failed on "trigger sequences_outbox_insert already exists", as if the database could not
    be written, at every start. `init` names that trigger, changing nothing."""
    app = app_connection(db_path)
    app.executescript(
        "DROP TRIGGER sequences_outbox_insert;"
        "CREATE TABLE audit_log (what TEXT);"
        "CREATE TRIGGER Sequences_Outbox_Insert AFTER INSERT ON sequences"
        " BEGIN INSERT INTO audit_log (what) VALUES ('inserted'); END;"
    )
    before = app.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
    with contextlib.closing(Database(db_path)) as db, pytest.raises(DatabaseError) as refused:
        schema.init(db, [SEQUENCES])
    assert "the trigger sequences_outbox_insert is not outbox-sync's" in str(refused.value)
    assert "DROP TRIGGER" in str(refused.value)
    assert app.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall() == before


def damaged_database(path: Path) -> None:
    """A database whose `sequences` has five pages zeroed, as a bad disk or a copy taken
    while the file was written leaves it. The table is filled before `init`, so its rows fill
    the pages after the first few, with no outbox entry among them."""
    conn = app_connection(path)
    conn.execute(schema.schema_statements()[0])  # schema.sql's `sequences`
    insert_rows(conn, range(1, 3001))
    conn.close()
    with contextlib.closing(Database(path)) as db:
        schema.init(db, [SEQUENCES])
    with open(path, "r+b") as file:
        file.seek(4096 * 9)
        file.write(bytes(4096 * 5))


def test_a_damaged_database_is_one_line_for_each_command_and_critical_for_check(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """SQLite's "database disk image is malformed" was a traceback from every command that
    read the damaged pages, `check` among them: exit 1, a WARNING to a monitor."""
    path = tmp_path / "damaged.db"
    damaged_database(path)
    advice = f"database {path} is damaged (database disk image is malformed): stop the"
    for args, status in ((["status"], 1), (["run", "--once"], 1), (["audit"], 2)):
        result = invoke(args, typesense_server, path, collection)
        assert result.exit_code == status, result.output
        assert "Traceback" not in result.output
        (line,) = error_lines(result.output)
        assert line.startswith(f"Error: {advice}"), line
        assert f"`sqlite3 {path} 'PRAGMA integrity_check'`" in line
    result = invoke(["check"], typesense_server, path, collection)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"OUTBOX-SYNC CRITICAL - {advice}")
    assert len(result.output.splitlines()) == 1
