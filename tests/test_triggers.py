"""The daemon owns its triggers. Schema changes an application makes while the daemon runs and
a writer keeps writing (the 12-step rebuild of migration tools, renaming the table away,
dropping and recreating it, adding a column) converge, through a real Typesense, with nothing
lost and no sync error; a table that is gone pauses the sync and deletes nothing; `init` puts
back triggers a migration took while no daemon ran. Each for the built-in `sequences` and for
the custom `characters` of docs/tables.md (a TEXT key, a `where`, and `character_tags`, a table
it depends on, rebuilt along with it)."""

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from outbox_sync import schema
from outbox_sync.db import Database
from outbox_sync.errors import ConfigError
from outbox_sync.mapping import SEQUENCES, Mapping
from outbox_sync.worker import Stop, Worker
from tests.support.app import ROW_SQL, app_connection, make_row, sqlite_documents
from tests.support.characters import (
    CHARACTER_COLUMNS,
    CHARACTERS,
    CHARACTERS_TABLE,
    TAGS,
    TAGS_TABLE,
    characters_config,
    characters_mapping,
    expected_characters,
    initialized_characters,
    insert_characters,
    slug,
)
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


@dataclass(frozen=True)
class Table:
    name: str
    sql: str  # CREATE TABLE {name} (... {extra}): as a migration makes it again
    columns: str


@dataclass(frozen=True)
class App:
    """An application whose tables a mapping syncs, as the scenarios need it."""

    mapping: Mapping
    tables: tuple[Table, ...]  # the mapped table, then the tables it depends on
    nullable: str  # a column a migration tool may move
    env: dict[str, str]  # the daemon's
    conn: sqlite3.Connection
    insert: Callable[[sqlite3.Connection, Iterable[int], str], None]  # rows numbered so
    delete: str  # DELETE of the row of key ?
    keys: Callable[[Iterable[int]], list[object]]  # the keys of the rows numbered so
    documents: Callable[[], dict[str, dict[str, object]]]  # what Typesense should hold

    @property
    def table(self) -> Table:
        return self.tables[0]

    @property
    def path(self) -> Path:
        return Path(self.env["OUTBOX_SYNC_DB"])


def insert_sequences(conn: sqlite3.Connection, numbers: Iterable[int], comment: str) -> None:
    conn.executemany(
        ROW_SQL, [make_row(i, comment=comment) if comment else make_row(i) for i in numbers]
    )


@pytest.fixture(params=["sequences", "characters"])
def app(
    request: pytest.FixtureRequest,
    db_path: Path,
    tmp_path: Path,
    daemon_env: dict[str, str],
    collection: str,
) -> Iterator[App]:
    if request.param == "sequences":
        conn = app_connection(db_path)
        yield App(
            SEQUENCES,
            (Table("sequences", TABLE_SQL, COLUMNS),),
            "comment",
            daemon_env,
            conn,
            insert_sequences,
            "DELETE FROM sequences WHERE id = ?",
            list,
            lambda: sqlite_documents(db_path),
        )
    else:
        path = tmp_path / "characters.db"
        config = tmp_path / "outbox-sync.toml"
        config.write_text(characters_config(collection))
        conn, mapping, _ = initialized_characters(path, collection)
        yield App(
            mapping,
            (
                Table("characters", CHARACTERS_TABLE, CHARACTER_COLUMNS),
                Table("character_tags", TAGS_TABLE, "slug, tag"),
            ),
            "bio",
            # the daemon syncs every mapping of the file: no --collection
            {k: v for k, v in daemon_env.items() if k != "OUTBOX_SYNC_COLLECTION"}
            | {"OUTBOX_SYNC_DB": str(path), "OUTBOX_SYNC_CONFIG": str(config)},
            conn,
            insert_characters,
            "DELETE FROM characters WHERE slug = ?",
            lambda numbers: [slug(i) for i in numbers],
            lambda: expected_characters(conn),
        )
    conn.close()


def matching(server: Server, collection: str, app: App) -> bool:
    """Typesense holds exactly the documents of the table's rows (False while the daemon has not
    created the collection yet)."""
    try:
        return export(server, collection) == app.documents()
    except httpx.HTTPStatusError:
        return False


def events(daemon: Daemon, name: str) -> list[dict[str, object]]:
    lines = daemon.output().splitlines()
    found = [json.loads(line) for line in lines if line.startswith("{")]
    return [entry for entry in found if entry.get("event") == name]


@contextmanager
def writing(app: App, tmp_path: Path, seed: int) -> Iterator[None]:
    """An application writing from its own process until the block ends."""
    stop_file = tmp_path / f"stop-{seed}"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.writer",
            str(app.path),
            str(seed),
            "200",
            str(stop_file),
            app.table.name,
        ],
        cwd=ROOT,
    )
    try:
        yield
    finally:
        stop_file.touch()
        assert writer.wait(60) == 0


def twelve_step_rebuild(app: App) -> None:
    """SQLite's 12-step table change, as Django and Alembic write it: new table, copy, drop,
    rename (the triggers go with the dropped table); of every table the mapping reads, in one
    migration."""
    steps = "".join(
        table.sql.format(name=f"new__{table.name}", extra=", rating INTEGER")
        + f"; INSERT INTO new__{table.name} ({table.columns}) SELECT {table.columns}"
        f" FROM {table.name}; DROP TABLE {table.name};"
        f" ALTER TABLE new__{table.name} RENAME TO {table.name};"
        for table in app.tables
    )
    app.conn.executescript(f"BEGIN; {steps} COMMIT;")


def sqlite_utils_transform(app: App) -> None:
    """The same through a real migration tool, run again when it gave up on the lock, as whoever
    migrates would. Its connection waits 5 s for the write lock, and a writer that commits
    without a pause can hold it that long: SQLite's lock is not fair, and its busy handler
    sleeps between tries (seen here with sqlite-utils 3.39.1, 4.1.1, 4.2 and 4.2.1 against
    such a writer alone, no daemon: `database is locked` after 5.01 s, in 17-60 % of the
    runs). The migration is one transaction: a run that gave up changed nothing."""
    for _ in range(10):
        migrated = subprocess.run(
            [
                sys.executable,
                "-m",
                "sqlite_utils",
                "transform",
                str(app.path),
                app.table.name,
                "--column-order",
                app.nullable,
            ],
            capture_output=True,
            text=True,
        )
        if migrated.returncode == 0:
            return
        assert migrated.stderr.rstrip().endswith("database is locked"), migrated.stderr
    raise AssertionError(f"the migration never had the lock: {migrated.stderr}")


def rename_away(app: App) -> None:
    """The table renamed away (its triggers go along) and a new one made, with some rows."""
    name, columns = app.table.name, app.table.columns
    app.conn.executescript(
        f"BEGIN; ALTER TABLE {name} RENAME TO {name}_2023;"
        + app.table.sql.format(name=name, extra="")
        + f"; INSERT INTO {name} SELECT {columns} FROM {name}_2023 WHERE rowid % 3 != 0;"
        " COMMIT;"
    )


def drop_and_recreate(app: App) -> None:
    """Dropped and made again with other rows: documents of rows that are gone must go."""
    app.conn.executescript(
        f"BEGIN; DROP TABLE {app.table.name};"
        + app.table.sql.format(name=app.table.name, extra="")
        + "; COMMIT;"
    )
    app.insert(app.conn, range(50, 260), "again")


def add_column(app: App) -> None:
    app.conn.execute(f"ALTER TABLE {app.table.name} ADD COLUMN rating INTEGER")


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
    app: App,
    tmp_path: Path,
    start_daemon: Callable[..., Daemon],
    typesense_server: Server,
    collection: str,
    migrate: Callable[[App], None],
    repairs: bool,
) -> None:
    app.insert(app.conn, range(1, 201), "")
    daemon = start_daemon("--audit-every", "0", env=app.env)
    wait_until(lambda: matching(typesense_server, collection, app), what="the first sync")
    with writing(app, tmp_path, seed=7):
        migrate(app)
        if repairs:
            wait_until(lambda: events(daemon, "audit_done"), what="the audit after the repair")
    wait_until(lambda: Database(app.path).counts(app.mapping)["pending"] == 0, what="the drain")
    wait_until(lambda: matching(typesense_server, collection, app), what="the match")
    assert Database(app.path).counts(app.mapping)["sync_errors_open"] == 0
    assert schema.trigger_problems(app.conn, [app.mapping]) == []
    repaired = events(daemon, "triggers_repaired")
    assert len(repaired) == int(repairs), daemon.output()
    # The 12-step rebuild of the table the mapping depends on took the key index init made
    # there: the daemon made it again (without it, each document's tags scan the whole table).
    assert schema.unindexed_keys(app.conn, [app.mapping]) == []
    took_index = migrate is twelve_step_rebuild and len(app.tables) > 1
    indexed = [entry["indexed"] for entry in events(daemon, "key_indexes_repaired")]
    assert indexed == ([["character_tags(slug)"]] if took_index else []), daemon.output()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_a_key_index_a_migration_took_is_made_again_without_an_audit(tmp_path: Path) -> None:
    path = tmp_path / "characters.db"
    conn, mapping, db = initialized_characters(path)
    read = mapping.select_by_keys(f"slug, {mapping.line_sql()}")

    def plan() -> str:
        """How SQLite reads the lines (on a new connection: EXPLAIN does not look whether the
        schema changed since the connection last read it)."""
        with contextlib.closing(sqlite3.connect(path)) as fresh:
            rows = fresh.execute(f"EXPLAIN QUERY PLAN {read}", ("[]",)).fetchall()
        return " | ".join(row[3] for row in rows)

    index = "outbox_sync_character_tags_slug"
    assert f"USING INDEX {index}" in plan()
    audits: list[str] = []
    watch = schema.SchemaWatch(db, [mapping], audits.append)
    watch(0.0)
    conn.execute(f"DROP INDEX {index}")  # what a rebuild of character_tags does, triggers aside
    assert schema.unindexed_keys(conn, [mapping]) == [("character_tags", "slug")]
    assert "SCAN t" in plan()  # each document's tags: a scan of the whole table
    with capture_logs() as logged:
        watch(0.0)
    assert [entry["event"] for entry in logged] == ["key_indexes_repaired"]
    assert logged[0]["indexed"] == ["character_tags(slug)"]
    assert f"USING INDEX {index}" in plan()
    assert audits == []  # the triggers were never gone: no change went unrecorded
    watch(0.0)  # nothing changed since: nothing to do
    assert schema.unindexed_keys(conn, [mapping]) == []
    conn.close()


def test_a_renamed_key_column_stops_the_daemon_and_leaves_the_applications_writes_working(
    db_path: Path, db: Database
) -> None:
    """SQLite rewrites our triggers when a column they name is renamed: they go on working. The
    watch put back triggers naming the old column, and every INSERT of the application failed
    (found by a hostile review). Now it says what is wrong and leaves them."""
    app = app_connection(db_path)
    watch = schema.SchemaWatch(db, [SEQUENCES], lambda reason: None)
    watch(0.0)
    app.execute("ALTER TABLE sequences RENAME COLUMN id TO seq_id")
    with pytest.raises(ConfigError, match="table sequences has no column id"):
        watch(1.0)
    app.execute(ROW_SQL.replace("(id,", "(seq_id,"), make_row(2))
    assert app.execute("SELECT record_key FROM outbox").fetchall() == [(2,)]


def test_triggers_dropped_while_the_watch_looks_are_put_back_at_its_next_turn(
    db_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch took the schema version read after its checks as checked: a migration that
    committed in between went unseen until the schema changed again (found by a hostile
    review)."""
    app = app_connection(db_path)
    watch = schema.SchemaWatch(db, [SEQUENCES], lambda reason: None)
    repair_indexes = schema.repair_indexes

    def a_migration_commits_meanwhile(db: Database, mappings: list[Mapping]) -> list[str]:
        monkeypatch.undo()
        app.execute("DROP TRIGGER sequences_outbox_insert")
        return repair_indexes(db, mappings)

    monkeypatch.setattr(schema, "repair_indexes", a_migration_commits_meanwhile)
    watch(0.0)
    assert schema.trigger_problems(db.conn, [SEQUENCES]) != []
    watch(1.0)
    assert schema.trigger_problems(db.conn, [SEQUENCES]) == []


def test_a_table_that_is_gone_pauses_the_sync_until_one_is_back(
    app: App,
    start_daemon: Callable[..., Daemon],
    typesense_server: Server,
    collection: str,
) -> None:
    app.insert(app.conn, range(1, 101), "")
    daemon = start_daemon("--audit-every", "0", env=app.env)
    wait_until(lambda: matching(typesense_server, collection, app), what="the first sync")
    app.conn.execute(f"DROP TABLE {app.table.name}")
    wait_until(lambda: events(daemon, "sync_paused"), what="the daemon to pause")
    [paused] = events(daemon, "sync_paused")
    assert f"table {app.table.name} is gone" in str(paused["reason"])
    assert len(export(typesense_server, collection)) == 100  # nothing deleted on a guess
    app.conn.execute(app.table.sql.format(name=app.table.name, extra=""))
    app.insert(app.conn, range(60, 131), "back")
    wait_until(
        lambda: matching(typesense_server, collection, app),
        what="Typesense to match the new table, the old documents gone",
    )
    assert len(events(daemon, "sync_paused")) == 1 and events(daemon, "sync_resumed")
    assert events(daemon, "triggers_repaired")
    assert Database(app.path).counts(app.mapping)["sync_errors_open"] == 0
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_init_puts_back_triggers_a_migration_took_and_says_so(
    app: App,
    start_daemon: Callable[..., Daemon],
    typesense_server: Server,
    collection: str,
) -> None:
    app.insert(app.conn, range(1, 21), "")
    twelve_step_rebuild(app)  # no daemon running: nobody notices
    app.insert(app.conn, range(21, 41), "")
    app.conn.executemany(app.delete, [(key,) for key in app.keys(range(1, 6))])
    assert schema.trigger_problems(app.conn, [app.mapping]) != []
    init = subprocess.run(
        [sys.executable, "-m", "outbox_sync", "init"],
        env=app.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert init.returncode == 0, init.stderr
    assert "put back outbox-sync's triggers (" in init.stdout
    assert f"{app.table.name}_outbox_insert was missing" in init.stdout
    assert schema.trigger_problems(app.conn, [app.mapping]) == []
    assert Database(app.path).get_meta(schema.RECONCILE_REQUEST_KEY) is not None
    daemon = start_daemon("--audit-every", "0", env=app.env)  # audits only because init asked
    # The drain can apply the audit's repairs before the loop's next turn logs the audit.
    wait_until(
        lambda: events(daemon, "audit_done") and matching(typesense_server, collection, app),
        what="the audit, and the rows written without triggers to reach Typesense",
    )
    [audit] = events(daemon, "audit_done")
    assert audit["reason"] == "init repaired the triggers"
    assert Database(app.path).get_meta(schema.RECONCILE_REQUEST_KEY) is None
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_its_own_tables_dropped_while_the_daemon_runs_are_made_again_and_audited(
    app: App,
    start_daemon: Callable[..., Daemon],
    typesense_server: Server,
    collection: str,
) -> None:
    """A migration tool that drops the tables it does not know (a declarative schema sync)
    drops outbox-sync's. Our triggers, left on the application's tables, then fail each of its
    writes ("no such table: main.outbox"), and the daemon's next read of the outbox failed: it
    exited with a traceback, and at each restart asked for `init`. It makes them again at once,
    and audits: the changes the dropped outbox held are found and applied."""
    app.insert(app.conn, range(1, 101), "")
    daemon = start_daemon("--audit-every", "0", env=app.env)
    wait_until(lambda: matching(typesense_server, collection, app), what="the first sync")
    app.conn.execute("BEGIN")
    app.insert(app.conn, range(101, 151), "lost with the outbox")
    app.conn.execute(app.delete, app.keys([1]))
    for table in ("outbox", "sync_errors", "sync_stats", "outbox_sync_meta"):
        app.conn.execute(f"DROP TABLE {table}")
    app.conn.execute("COMMIT")
    wait_until(lambda: events(daemon, "own_tables_restored"), what="the tables made again")
    app.insert(app.conn, range(151, 161), "")  # the application writes again
    wait_until(lambda: matching(typesense_server, collection, app), what="the match")
    # the audit logs its result after it queued the repairs, which the drain may apply first
    wait_until(lambda: events(daemon, "audit_done"), what="the audit's result")
    (restored,) = events(daemon, "own_tables_restored")
    assert restored["tables"] == ["outbox", "sync_errors", "sync_stats", "outbox_sync_meta"]
    assert [e["reason"] for e in events(daemon, "audit_done")] == ["own tables dropped"]
    db = Database(app.path)
    schema.check(db, [app.mapping])  # a daemon started again takes the file as it is
    assert db.get_meta(f"backfilled:{app.mapping.name}") is not None  # and fills nothing anew
    assert db.counts(app.mapping)["sync_errors_open"] == 0
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_a_mapping_init_added_under_a_running_daemon_is_said_to_need_a_restart(
    db_path: Path, worker: Worker
) -> None:
    """`init` with a new mapping while a daemon runs: the daemon, started without it, takes
    its triggers for a removed mapping's and drops them (nothing is lost: the restart puts
    them back and fills the table whole). Its warning said only "auditing"; it says to restart
    it."""
    app = app_connection(db_path)
    app.executescript(f"{CHARACTERS}; {TAGS};")
    stop = Stop()
    worker.loop(time.monotonic(), stop)  # the schema as the daemon starts with it
    with contextlib.closing(Database(db_path)) as other:
        schema.init(other, [SEQUENCES, characters_mapping()])
    with capture_logs() as logs:
        worker.loop(time.monotonic(), stop)
    stop.close()
    (repaired,) = [entry for entry in logs if entry["event"] == "triggers_repaired"]
    assert "characters_outbox_insert was of no mapping" in repaired["problems"]
    assert repaired["note"].endswith(
        "for a mapping just added, restart the daemon, which puts them back and fills its "
        "table whole"
    )
    assert schema.trigger_problems(app, [SEQUENCES]) == []
