"""The wake-up (outbox_sync/wakeup.py) under what happens around a real database file: other
processes writing, other files beside it. Wake-ups are counted, not timed."""

import contextlib
import select
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from outbox_sync import wakeup
from outbox_sync.wakeup import RECHECK_WINDOW_S, ChangeWatch

TIMEOUT_S = 30.0
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


def make_db(path: Path) -> Path:
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=wal")
        conn.execute("CREATE TABLE t (x)")
    return path


class CountingSelect:
    """wakeup's `select` module, counting the times the watch went to sleep."""

    def __init__(self) -> None:
        self.sleeps = 0

    def select(self, *args: object) -> object:
        self.sleeps += 1
        return select.select(*args)  # type: ignore[arg-type]


def test_busy_files_beside_the_database_do_not_wake_the_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database often shares its directory (/var/lib/app: logs, other databases). Every write
    # there woke the watch (one inotify watch on the directory, IN_MODIFY for any file): a log
    # written 1,500 lines/s beside it cost the idle daemon 5 % of a core, 40x its target,
    # for no look-up at all.
    db = make_db(tmp_path / "app.db")
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
