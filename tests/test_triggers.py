"""The daemon owns its triggers. Schema changes an application makes while the daemon runs and
a writer keeps writing (the 12-step rebuild of migration tools, renaming the table away,
dropping and recreating it, adding a column) converge, through a real Typesense, with nothing
lost and no sync error; a table that is gone pauses the sync and deletes nothing."""

import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from outbox_sync import schema
from outbox_sync.db import Database
from outbox_sync.mapping import SEQUENCES
from tests.support.app import ROW_SQL, app_connection, make_row, sqlite_documents
from tests.support.cli import ROOT
from tests.support.daemon import Daemon
from tests.support.typesense import Server, export
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow

TABLE_SQL = (
    "CREATE TABLE {name} (id INTEGER PRIMARY KEY, element_type TEXT NOT NULL, element_id INTEGER"
    " NOT NULL, sequence_number INTEGER NOT NULL, comment TEXT, created_at TEXT NOT NULL{extra})"
)
COLUMNS = "id, element_type, element_id, sequence_number, comment, created_at"


def matching(server: Server, collection: str, db_path: Path) -> bool:
    """Typesense holds exactly the documents of the table's rows (False while the daemon has not
    created the collection yet)."""
    try:
        return export(server, collection) == sqlite_documents(db_path)
    except httpx.HTTPStatusError:
        return False


def events(daemon: Daemon, name: str) -> list[dict[str, object]]:
    lines = daemon.output().splitlines()
    found = [json.loads(line) for line in lines if line.startswith("{")]
    return [entry for entry in found if entry.get("event") == name]


@contextmanager
def writing(db_path: Path, tmp_path: Path, seed: int) -> Iterator[None]:
    """An application writing from its own process until the block ends."""
    stop_file = tmp_path / f"stop-{seed}"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.writer",
            str(db_path),
            str(seed),
            "200",
            str(stop_file),
        ],
        cwd=ROOT,
    )
    try:
        yield
    finally:
        stop_file.touch()
        assert writer.wait(60) == 0


def twelve_step_rebuild(conn: sqlite3.Connection, db_path: Path) -> None:
    """SQLite's 12-step table change, as Django and Alembic write it: new table, copy, drop,
    rename (the triggers go with the dropped table)."""
    conn.executescript(
        "BEGIN;"
        + TABLE_SQL.format(name="new__sequences", extra=", rating INTEGER")
        + f"; INSERT INTO new__sequences ({COLUMNS}) SELECT {COLUMNS} FROM sequences;"
        " DROP TABLE sequences; ALTER TABLE new__sequences RENAME TO sequences; COMMIT;"
    )


def sqlite_utils_transform(conn: sqlite3.Connection, db_path: Path) -> None:
    """The same through a real migration tool."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sqlite_utils",
            "transform",
            str(db_path),
            "sequences",
            "--column-order",
            "comment",
        ],
        check=True,
    )


def rename_away(conn: sqlite3.Connection, db_path: Path) -> None:
    """The table renamed away (its triggers go along) and a new one made, with some rows."""
    conn.executescript(
        "BEGIN; ALTER TABLE sequences RENAME TO sequences_2023;"
        + TABLE_SQL.format(name="sequences", extra="")
        + f"; INSERT INTO sequences SELECT {COLUMNS} FROM sequences_2023 WHERE id % 3 != 0;"
        " COMMIT;"
    )


def drop_and_recreate(conn: sqlite3.Connection, db_path: Path) -> None:
    """Dropped and made again with other rows: documents of rows that are gone must go."""
    conn.executescript(
        "BEGIN; DROP TABLE sequences;" + TABLE_SQL.format(name="sequences", extra="") + "; COMMIT;"
    )
    conn.executemany(ROW_SQL, [make_row(i, comment=f"again {i}") for i in range(50, 260)])


def add_column(conn: sqlite3.Connection, db_path: Path) -> None:
    conn.execute("ALTER TABLE sequences ADD COLUMN rating INTEGER")


@pytest.mark.parametrize(
    ("migrate", "repairs"),
    [
        (twelve_step_rebuild, True),
        (sqlite_utils_transform, True),
        (rename_away, True),
        (drop_and_recreate, True),
        (add_column, False),
    ],
)
def test_a_schema_change_while_the_daemon_runs_converges(
    db_path: Path,
    tmp_path: Path,
    start_daemon: Callable[..., Daemon],
    typesense_server: Server,
    collection: str,
    migrate: Callable[[sqlite3.Connection, Path], None],
    repairs: bool,
) -> None:
    conn = app_connection(db_path)
    conn.executemany(ROW_SQL, [make_row(i) for i in range(1, 201)])
    daemon = start_daemon("--audit-every", "0")
    wait_until(lambda: matching(typesense_server, collection, db_path), what="the first sync")
    with writing(db_path, tmp_path, seed=7):
        migrate(conn, db_path)
        if repairs:
            wait_until(lambda: events(daemon, "audit_done"), what="the audit after the repair")
    wait_until(lambda: Database(db_path).counts(SEQUENCES)["pending"] == 0, what="the drain")
    wait_until(lambda: matching(typesense_server, collection, db_path), what="the match")
    assert Database(db_path).counts(SEQUENCES)["sync_errors_open"] == 0
    assert schema.trigger_problems(conn, [SEQUENCES]) == []
    repaired = events(daemon, "triggers_repaired")
    assert len(repaired) == int(repairs), daemon.output()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_a_table_that_is_gone_pauses_the_sync_until_one_is_back(
    db_path: Path,
    start_daemon: Callable[..., Daemon],
    typesense_server: Server,
    collection: str,
) -> None:
    conn = app_connection(db_path)
    conn.executemany(ROW_SQL, [make_row(i) for i in range(1, 101)])
    daemon = start_daemon("--audit-every", "0")
    wait_until(lambda: matching(typesense_server, collection, db_path), what="the first sync")
    conn.execute("DROP TABLE sequences")
    wait_until(lambda: events(daemon, "sync_paused"), what="the daemon to pause")
    [paused] = events(daemon, "sync_paused")
    assert "table sequences is gone" in str(paused["reason"])
    assert len(export(typesense_server, collection)) == 100  # nothing deleted on a guess
    conn.execute(TABLE_SQL.format(name="sequences", extra=""))
    conn.executemany(ROW_SQL, [make_row(i, comment="back") for i in range(60, 131)])
    wait_until(
        lambda: matching(typesense_server, collection, db_path),
        what="Typesense to match the new table, the old documents gone",
    )
    assert len(events(daemon, "sync_paused")) == 1 and events(daemon, "sync_resumed")
    assert events(daemon, "triggers_repaired")
    assert Database(db_path).counts(SEQUENCES)["sync_errors_open"] == 0
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_init_puts_back_triggers_a_migration_took_and_says_so(
    db_path: Path,
    start_daemon: Callable[..., Daemon],
    daemon_env: dict[str, str],
    typesense_server: Server,
    collection: str,
) -> None:
    conn = app_connection(db_path)
    conn.executemany(ROW_SQL, [make_row(i) for i in range(1, 21)])
    twelve_step_rebuild(conn, db_path)  # no daemon running: nobody notices
    conn.executemany(ROW_SQL, [make_row(i) for i in range(21, 41)])
    conn.execute("DELETE FROM sequences WHERE id <= 5")
    assert schema.trigger_problems(conn, [SEQUENCES]) != []
    init = subprocess.run(
        [sys.executable, "-m", "outbox_sync", "init"],
        env=daemon_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert init.returncode == 0, init.stderr
    assert "put back outbox-sync's triggers (" in init.stdout
    assert "sequences_outbox_insert was missing" in init.stdout
    assert schema.trigger_problems(conn, [SEQUENCES]) == []
    assert Database(db_path).get_meta(schema.RECONCILE_REQUEST_KEY) is not None
    daemon = start_daemon("--audit-every", "0")  # audits only because init asked
    wait_until(
        lambda: matching(typesense_server, collection, db_path),
        what="the rows written without triggers to reach Typesense",
    )
    [audit] = events(daemon, "audit_done")
    assert audit["reason"] == "init repaired the triggers"
    assert Database(db_path).get_meta(schema.RECONCILE_REQUEST_KEY) is None
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
