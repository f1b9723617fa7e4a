"""The wake-up against real SQLite files written by real separate processes.

Every wait here ends on something that happens (a commit, an interrupt); the timeouts are only
there so a broken watch fails the test instead of hanging it.
"""

import contextlib
import ctypes
import errno
import gc
import itertools
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from outbox_sync import wakeup
from outbox_sync.wakeup import RECHECK_WINDOW_S, ChangeWatch, filesystem_type

TIMEOUT_S = 30.0
WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("PRAGMA synchronous=" + sys.argv[2])
for _ in range(int(sys.argv[3])):
    conn.execute("INSERT INTO t (x) VALUES (1)")
conn.close()
"""


def make_db(path: Path, journal_mode: str) -> Path:
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA journal_mode={journal_mode}")
        conn.execute("CREATE TABLE t (x)")
    return path


@pytest.fixture
def wal_db(tmp_path: Path) -> Path:
    return make_db(tmp_path / "app.db", "wal")


@pytest.fixture
def connection(wal_db: Path) -> Iterator[sqlite3.Connection]:
    """The daemon's side: one long-lived connection that asks data_version."""
    with contextlib.closing(sqlite3.connect(wal_db, isolation_level=None)) as conn:
        yield conn


def start_writer(
    path: Path, commits: int = 1, synchronous: str = "NORMAL"
) -> subprocess.Popen[bytes]:
    """Another process committing `commits` rows, one per transaction."""
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), synchronous, str(commits)])


def data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def rows(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])


def wait_for_change(watch: ChangeWatch, conn: sqlite3.Connection, version: int) -> int:
    """Wait as the loop will, until data_version moves; every wait must end woken, never by
    its timeout. Returns how many waits it took."""
    deadline, waits = time.monotonic() + TIMEOUT_S, 0
    while data_version(conn) == version:
        assert watch.wait(deadline - time.monotonic()), "no wake-up before the timeout"
        waits += 1
    return waits


def open_fds() -> set[str]:
    """This process's open file descriptors (less the one that listed them, closed since).
    What earlier tests left to the garbage collector is closed first: not ours to count."""
    gc.collect()
    return {fd for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")}


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_a_commit_in_another_process_wakes_the_watch(tmp_path: Path, journal_mode: str) -> None:
    db = make_db(tmp_path / "app.db", journal_mode)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        version = data_version(conn)
        with ChangeWatch(db) as watch:
            assert (watch.mode, watch.reason) == ("inotify", "")
            writer = start_writer(db)
            wait_for_change(watch, conn, version)
            assert writer.wait(TIMEOUT_S) == 0


def test_a_commit_still_in_its_fsync_is_seen_by_the_rechecks(
    wal_db: Path, connection: sqlite3.Connection
) -> None:
    # synchronous=FULL: the WAL is written (the event), fsync'ed (~1 ms here), and only then
    # is the commit visible. The first look finds nothing; the rechecks must come back by
    # themselves, for no further event follows (this fails if an fsync outlasts
    # RECHECK_WINDOW_S, 100 ms: 50 ms at worst measured here, under load).
    with ChangeWatch(wal_db) as watch:
        for _ in range(3):
            version = data_version(connection)
            writer = start_writer(wal_db, synchronous="FULL")
            wait_for_change(watch, connection, version)
            assert writer.wait(TIMEOUT_S) == 0


def test_looks_wait_for_a_rollback_journal_to_commit(tmp_path: Path) -> None:
    # A look while a rollback transaction writes would hold its commit back and sleep in
    # SQLite's busy handler: the journal's unlink (the commit) ends the hold.
    db = make_db(tmp_path / "app.db", "delete")
    journal = Path(f"{db}-journal")
    with ChangeWatch(db) as watch:
        journal.write_bytes(bytes(512))  # a transaction has begun: its journal has content
        assert watch.wait(0.02) is False  # held, where a look was due after 1 ms
        journal.unlink()
        assert watch.wait(TIMEOUT_S) is True


def test_a_wal_file_created_after_the_watch_started_wakes_it(wal_db: Path) -> None:
    # No connection is open: the last one to close removed -wal. Each writer creates it anew
    # (and removes it on closing): a watch on the file itself would have nothing to hold.
    wal = Path(f"{wal_db}-wal")
    assert not wal.exists()
    with ChangeWatch(wal_db) as watch:
        for expected in (1, 2):
            while watch.wait(2 * RECHECK_WINDOW_S):  # quiet first: the wake-up must be the writer's
                pass
            writer = start_writer(wal_db)
            assert watch.wait(TIMEOUT_S), "the new -wal raised no event"
            # Wait for the writer before counting: two connections closing at the same moment
            # can each see the other and leave -wal behind (it happened in CI).
            assert writer.wait(TIMEOUT_S) == 0
            assert rows(wal_db) == expected
            assert not wal.exists()


def test_the_watch_wakes_for_the_database_alone(tmp_path: Path) -> None:
    db = make_db(tmp_path / "app.db", "wal")
    with ChangeWatch(db) as watch:
        # inotify queues an event within the write() itself: both are pending when we wait
        (tmp_path / "app.log").write_text("a line")
        (tmp_path / "other.db-wal").write_text("another database")
        assert watch.wait(0) is False
        Path(f"{db}-wal").write_bytes(b"")  # what SQLite does when a connection opens
        assert watch.wait(TIMEOUT_S) is True


def test_interrupt_from_another_thread_ends_a_wait(wal_db: Path) -> None:
    with ChangeWatch(wal_db) as watch:
        threading.Timer(0.05, watch.interrupt).start()
        started = time.monotonic()
        assert watch.wait(600) is True
        assert time.monotonic() - started < TIMEOUT_S
        # one interrupt, one wake-up: nothing is left pending
        assert watch.wait(0) is False


def test_interrupt_before_the_wait_ends_it_at_once(wal_db: Path) -> None:
    # the signal may come between the loop's check of its stop flag and the wait
    with ChangeWatch(wal_db) as watch:
        for _ in range(100_000):  # more than a pipe holds: never blocks, never raises
            watch.interrupt()
        assert watch.wait(600) is True
        assert watch.wait(0) is False


def test_interrupt_from_a_signal_handler_ends_a_wait(wal_db: Path) -> None:
    # PEP 475: a signal alone does not end poll(); the handler's interrupt() does
    with ChangeWatch(wal_db) as watch:
        handled: list[bool] = []

        def handler(*_: Any) -> None:
            handled.append(True)  # no lock in a signal handler (Event.set takes one)
            watch.interrupt()

        previous = signal.signal(signal.SIGUSR1, handler)
        try:
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1)).start()
            started = time.monotonic()
            assert watch.wait(600) is True
            assert time.monotonic() - started < TIMEOUT_S
            assert handled
        finally:
            signal.signal(signal.SIGUSR1, previous)


DAEMON = """
import signal, sys, threading
from pathlib import Path
from outbox_sync.wakeup import ChangeWatch

stop = threading.Event()
watch = ChangeWatch(Path(sys.argv[1]))

def request_stop(*_):
    stop.set()  # safe: nobody waits on `stop` (is_set() takes no lock), the watch waits
    watch.interrupt()

signal.signal(signal.SIGTERM, request_stop)
print("waiting", flush=True)
while not stop.is_set():
    watch.wait(600)
watch.close()
"""


def test_sigterm_stops_a_waiting_loop_at_once(wal_db: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", DAEMON, str(wal_db)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "waiting\n"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT_S) == 0
        assert time.monotonic() - started < TIMEOUT_S
    finally:
        if process.poll() is None:
            process.kill()


def test_the_fallback_polls(wal_db: Path, connection: sqlite3.Connection) -> None:
    with ChangeWatch(wal_db, use_inotify=False, poll_interval_s=0.01) as watch:
        assert (watch.mode, watch.reason) == ("poll", "inotify switched off")
        version = data_version(connection)
        writer = start_writer(wal_db)
        assert wait_for_change(watch, connection, version) >= 1  # a look every 10 ms
        assert writer.wait(TIMEOUT_S) == 0
        threading.Timer(0.05, watch.interrupt).start()
        assert watch.wait(600) is True


class FailingLibc:
    """libc whose inotify calls fail the way they do when the limits are reached."""

    def __init__(self, init_errno: int = 0, watch_errno: int = 0) -> None:
        self.init_errno, self.watch_errno = init_errno, watch_errno
        self.fd = -1

    def inotify_init1(self, flags: int) -> int:
        if self.init_errno:
            ctypes.set_errno(self.init_errno)
            return -1
        self.fd = os.open(os.devnull, os.O_RDONLY)
        return self.fd

    def inotify_add_watch(self, fd: int, path: bytes, mask: int) -> int:
        ctypes.set_errno(self.watch_errno)
        return -1


def test_no_inotify_falls_back_to_polling(wal_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wakeup, "inotify_libc", lambda: None)
    with ChangeWatch(wal_db) as watch:
        assert watch.mode == "poll"
        assert watch.reason == f"no inotify on {sys.platform}"


def test_too_many_inotify_instances_fall_back(
    wal_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wakeup, "inotify_libc", lambda: FailingLibc(init_errno=errno.EMFILE))
    with ChangeWatch(wal_db) as watch:
        assert watch.mode == "poll"
        assert watch.reason == f"inotify_init1: {os.strerror(errno.EMFILE)}"


def test_too_many_watches_fall_back_and_leak_nothing(
    wal_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    libc = FailingLibc(watch_errno=errno.ENOSPC)
    monkeypatch.setattr(wakeup, "inotify_libc", lambda: libc)
    with ChangeWatch(wal_db) as watch:
        assert watch.mode == "poll"
        assert watch.reason.endswith(os.strerror(errno.ENOSPC))
        with pytest.raises(OSError):
            os.fstat(libc.fd)  # the inotify instance was closed


def test_a_network_file_system_falls_back(wal_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wakeup, "filesystem_type", lambda _: "nfs4")
    with ChangeWatch(wal_db) as watch:
        assert watch.mode == "poll"
        assert "nfs4" in watch.reason


def test_filesystem_type_reads_the_mount_table(tmp_path: Path) -> None:
    assert filesystem_type(Path("/proc/self")) == "proc"
    assert filesystem_type(tmp_path) not in ("", "proc")


def test_close_closes_every_file_descriptor(wal_db: Path) -> None:
    before = open_fds()
    watch = ChangeWatch(wal_db)
    assert len(open_fds() - before) == 3  # inotify, and the two ends of the wake-up pipe
    watch.close()
    assert open_fds() == before
    watch.interrupt()  # harmless once closed
    watch.close()


def test_many_wait_cycles_leak_nothing(wal_db: Path, connection: sqlite3.Connection) -> None:
    commits = 300
    with ChangeWatch(wal_db) as watch:
        version = data_version(connection)
        writer = start_writer(wal_db, commits=commits)
        waits = wait_for_change(watch, connection, version)
        version = data_version(connection)
        fds = open_fds()  # now that our connection has opened the writer's -wal
        # counted on our one connection: SQLite keeps the file of a connection closed while
        # another holds a lock open (the fcntl lock trap), which would look like a leak
        while connection.execute("SELECT count(*) FROM t").fetchone()[0] < commits:
            waits += wait_for_change(watch, connection, version)
            version = data_version(connection)
        assert writer.wait(TIMEOUT_S) == 0
        assert waits > 0
        assert open_fds() == fds


def test_own_writes_cost_a_bounded_burst_of_look_ups(
    wal_db: Path, connection: sqlite3.Connection
) -> None:
    with ChangeWatch(wal_db) as watch:
        version = data_version(connection)
        connection.execute("INSERT INTO t (x) VALUES (1)")  # like the daemon's acknowledgement
        assert data_version(connection) == version  # SQLite does not count our own commits
        looks = 0
        # the rechecks end: then a wait runs to its timeout (longer than the recheck window)
        while watch.wait(10 * wakeup.RECHECK_WINDOW_S):
            looks += 1
            # 15 a burst of events; a loaded machine may split the commit's writes in two
            assert looks <= 2 * 15
        assert looks >= 5  # the rechecks: no event follows the first


# Another program working in the database's directory: a log appended line by line, and a
# database of its own (WAL) committing one row at a time.
NEIGHBOUR = """
import sqlite3, sys
directory = sys.argv[1]
log = open(directory + "/app.log", "a", buffering=1)
other = sqlite3.connect(directory + "/other.db", isolation_level=None)
other.execute("PRAGMA journal_mode=wal")
other.execute("CREATE TABLE IF NOT EXISTS t (x)")
for _ in range(1000):
    log.write("a line\\n")
    other.execute("INSERT INTO t (x) VALUES (1)")
"""


class CountingSelect:
    """wakeup's `select` module, counting the times the watch went to sleep."""

    def __init__(self) -> None:
        self.sleeps = 0

    def select(self, *args: object) -> object:
        self.sleeps += 1
        return select.select(*args)  # type: ignore[arg-type]


def test_busy_files_beside_the_database_do_not_wake_the_watch(
    wal_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database often shares its directory (/var/lib/app: logs, other databases). Every write
    # there woke the watch (one inotify watch on the directory, IN_MODIFY for any file): a log
    # written 1,500 lines/s beside it cost the idle daemon 5 % of a core, 40x its target,
    # for no look-up at all.
    db, tmp_path = wal_db, wal_db.parent
    counting = CountingSelect()
    monkeypatch.setattr(wakeup, "select", counting)
    with ChangeWatch(db) as watch:
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(tmp_path)])
        waits = 0
        while neighbour.poll() is None:
            assert watch.wait(0.05) is False, "woken for a file that is not the database's"
            waits += 1
        assert neighbour.wait(TIMEOUT_S) == 0
        # each wait sleeps once to its timeout; creating other.db and its -wal and -shm may
        # wake it a few times more, 2,000 writes must not
        assert counting.sleeps - waits < 50
        # and the database's own commits still wake it
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
            conn.execute("INSERT INTO t (x) VALUES (1)")
        assert watch.wait(TIMEOUT_S) is True
        while watch.wait(2 * RECHECK_WINDOW_S):
            pass


class SimulatedTime:
    """wakeup's `time` and `select` on a simulated clock: a sleep advances the clock instead
    of waiting, in steps of `write_every_s`, and ends `late_s` after its timeout, as a real
    one wakes late; with `stream` set, each step writes one page to that file (a writer
    streaming into the WAL). The inotify events are the kernel's own, for real writes: only
    the clock is simulated, so the schedule of looks can be counted exactly."""

    def __init__(
        self, stream: Path | None = None, write_every_s: float = 0.00005, late_s: float = 0.00002
    ) -> None:
        self.now, self.stream, self.write_every_s = 1000.0, stream, write_every_s
        self.late_s = late_s
        self.stall_at, self.stall_s = float("inf"), 0.0  # one sleep this much later, once

    def monotonic(self) -> float:
        return self.now

    def write(self, path: Path) -> None:
        with open(path, "ab") as file:
            file.write(bytes(4096))

    def select(
        self, fds: list[int], writable: list[int], exceptional: list[int], timeout: float
    ) -> tuple[list[int], list[int], list[int]]:
        end = self.now + timeout + self.late_s
        if self.now >= self.stall_at:  # the machine was busy: this wake-up comes very late
            end, self.stall_at = end + self.stall_s, float("inf")
        while True:
            readable, _, _ = select.select(fds, writable, exceptional, 0)
            if readable or self.now >= end:
                return readable, [], []
            self.now = min(end, self.now + self.write_every_s)
            if self.stream is not None:
                self.write(self.stream)


@pytest.fixture
def simulated_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ChangeWatch, SimulatedTime, Path]]:
    """A watch on a simulated clock, on a database and its -wal made as plain files (it only
    sees writes to them), once quiet; yields it, its clock and the -wal."""
    db, wal = tmp_path / "app.db", tmp_path / "app.db-wal"
    db.write_bytes(b"")
    wal.write_bytes(b"")
    clock = SimulatedTime()
    monkeypatch.setattr(wakeup, "time", clock)
    monkeypatch.setattr(wakeup, "select", clock)
    with ChangeWatch(db) as watch:
        while watch.wait(1.0):  # the writes above are past
            pass
        yield watch, clock, wal


def test_a_commits_next_page_brings_a_recheck_not_a_paced_look(
    simulated_watch: tuple[ChangeWatch, SimulatedTime, Path],
) -> None:
    # A commit writes its pages to the WAL one write() each, and becomes visible after the
    # last (with synchronous=NORMAL, ~0.05 ms later). The first page's event brings a look that
    # finds nothing yet; the next page's event must bring the recheck a commit's first event
    # would, not one paced LOOK_PACE_S (1 ms) after the first look: that made the wake-up p99
    # 0.9-1.5 ms in WAL mode with synchronous=NORMAL (0.25-0.32 ms since, tests/bench/idle.py).
    watch, clock, wal = simulated_watch
    clock.write(wal)  # the commit's first page
    assert watch.wait(1.0) is True
    looked_at = clock.now
    clock.now += 0.00005
    clock.write(wal)  # its next page, before the look's answer came back
    assert watch.wait(1.0) is True
    assert clock.now - looked_at <= wakeup.RECHECK_MIN_S + clock.late_s + 1e-9


def test_a_writer_streaming_into_the_wal_is_looked_at_no_more_than_paced(
    simulated_watch: tuple[ChangeWatch, SimulatedTime, Path],
) -> None:
    # A big transaction streams pages into the WAL, a write every 50 us: one look per write
    # would be 20,000 look-ups a second. Once the burst is older than a few rechecks, looks
    # come LOOK_PACE_S apart (the 1 ms poll's rate, no more), a wake-up that comes 1.5 ms late
    # included: the writer kept writing meanwhile, so the burst goes on.
    watch, clock, wal = simulated_watch
    clock.stream = wal
    clock.stall_at, clock.stall_s = clock.now + 0.02, 0.0015
    started, looks = clock.now, []
    while clock.now - started < 0.1:
        assert watch.wait(1.0) is True
        looks.append(clock.now - started)
    later = [b - a for a, b in itertools.pairwise(looks) if a > 0.005]
    assert later and min(later) >= wakeup.LOOK_PACE_S - 1e-9
    assert len(looks) <= 0.1 / wakeup.LOOK_PACE_S + 15
