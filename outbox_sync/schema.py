"""The schema outbox-sync keeps in the application's database: the shared tables and the triggers
it owns on `sequences` (schema.sql holds their text), the checks that say what is missing, and
the repair that puts the triggers back where a migration took them away.

Migrations move and drop triggers without a word: SQLite's 12-step table rebuild (what Django,
Alembic and `sqlite-utils transform` do) drops them with the old table; renaming the table away
takes them along to the old name. So the daemon checks its triggers by name, table and SQL
text, at start and whenever `PRAGMA schema_version` changes, and reinstalls them.
"""

import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import structlog

from outbox_sync.db import Database, utc_now
from outbox_sync.documents import COLUMNS
from outbox_sync.errors import DatabaseError, TableMissingError

SCHEMA_VERSION = "1"
TABLE = "sequences"
TABLES = ("outbox", "sync_errors", "sync_stats", "outbox_sync_meta")
# Set by `init` when it had to repair the triggers: the running daemon (or the next one to
# start) then compares Typesense with the table, which changed unseen meanwhile.
RECONCILE_REQUEST_KEY = "reconcile_requested"
_TRIGGER = re.compile(r"CREATE TRIGGER IF NOT EXISTS (\w+) AFTER \w+ ON (\w+)")


@dataclass(frozen=True)
class Trigger:
    name: str
    table: str
    sql: str  # as SQLite keeps it: without IF NOT EXISTS


@dataclass(frozen=True)
class InitResult:
    enqueued: int  # rows enqueued by the backfill
    repaired: list[str]  # what was wrong with the triggers (empty: nothing)


def schema_statements() -> list[str]:
    """schema.sql split into statements (triggers hold semicolons of their own)."""
    text = resources.files("outbox_sync").joinpath("schema.sql").read_text()
    statements, current = [], ""
    for line in text.splitlines(keepends=True):
        if not current and (not line.strip() or line.lstrip().startswith("--")):
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return statements


def owned_triggers() -> list[Trigger]:
    """The triggers outbox-sync owns, as schema.sql declares them."""
    triggers = []
    for statement in schema_statements():
        if match := _TRIGGER.match(statement):
            sql = statement.replace("CREATE TRIGGER IF NOT EXISTS", "CREATE TRIGGER", 1)
            sql = sql.removesuffix(";")  # SQLite keeps the statement without it
            triggers.append(Trigger(match[1], match[2], sql))
    return triggers


def _same_sql(a: str, b: str) -> bool:
    return a.split() == b.split()


def trigger_problems(conn: sqlite3.Connection) -> list[str]:
    """What is wrong with our triggers: missing, on another table, or not our SQL text."""
    present = {
        name: (table, sql)
        for name, table, sql in conn.execute(
            "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger'"
        )
    }
    problems = []
    for trigger in owned_triggers():
        if trigger.name not in present:
            problems.append(f"{trigger.name} was missing")
        elif present[trigger.name][0] != trigger.table:
            problems.append(f"{trigger.name} was on table {present[trigger.name][0]}")
        elif not _same_sql(present[trigger.name][1], trigger.sql):
            problems.append(f"{trigger.name} was not outbox-sync's")
    return problems


def table_exists(conn: sqlite3.Connection, table: str = TABLE) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    return row is not None


def _reinstall(conn: sqlite3.Connection) -> list[str]:
    """Inside a write transaction: drop and create again each trigger that is wrong."""
    problems = trigger_problems(conn)
    if problems:
        for trigger in owned_triggers():
            conn.execute(f"DROP TRIGGER IF EXISTS {trigger.name}")
            conn.execute(trigger.sql)
    return problems


def repair_triggers(db: Database) -> list[str]:
    """Put our triggers back as they should be, where they should be, in one short write
    transaction; what was wrong (empty: nothing, and nothing written). TableMissingError when
    the table itself is gone."""
    if not table_exists(db.conn):
        raise TableMissingError(TABLE, db.path)
    if not trigger_problems(db.conn):
        return []
    with db.write() as conn:
        if not table_exists(conn):
            raise TableMissingError(TABLE, db.path)
        return _reinstall(conn)


def init(db: Database, *, backfill: bool = False) -> InitResult:
    """Apply schema.sql, put back triggers a migration took away, then enqueue every existing
    row once (or again with backfill=True). All in one transaction: no row slips between the
    backfill and the triggers."""
    try:
        db.conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as error:
        raise DatabaseError(f"cannot initialise database {db.path}: {error}") from None
    with db.write() as conn:
        try:
            for statement in schema_statements():
                if not _TRIGGER.match(statement):
                    conn.execute(statement)
            repaired = _reinstall(conn)
        except sqlite3.Error as error:
            raise DatabaseError(f"cannot apply schema to {db.path}: {error}") from None
        check_columns(db)
        index_sequences_id(db)
        done = conn.execute("SELECT 1 FROM outbox_sync_meta WHERE key = 'backfilled_at'").fetchone()
        enqueued = 0
        if backfill or not done:
            enqueued = conn.execute(
                "INSERT INTO outbox (sequence_id, op) SELECT id, 'upsert' FROM sequences"
                " ORDER BY id"
            ).rowcount
        meta = [("schema_version", SCHEMA_VERSION)]
        if backfill or not done:
            meta.append(("backfilled_at", utc_now()))
        if done and repaired:  # a first init has nothing to reconcile: it backfills
            meta.append((RECONCILE_REQUEST_KEY, "; ".join(repaired)))
        conn.executemany("INSERT OR REPLACE INTO outbox_sync_meta (key, value) VALUES (?, ?)", meta)
    return InitResult(enqueued, repaired if done else [])


def check(db: Database) -> None:
    """Raise DatabaseError, saying what to do, unless `init` has been applied (the daemon
    repairs its triggers itself; `trigger_problems` says what is wrong with them)."""
    names = {
        row[0] for row in db.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    missing = [name for name in TABLES if name not in names]
    if missing:
        raise DatabaseError(
            f"database {db.path} is missing {', '.join(missing)}: "
            f"run `outbox-sync init --db {db.path}`"
        )
    if TABLE in names:
        check_columns(db)


def check_columns(db: Database) -> None:
    present = {row[1] for row in db.conn.execute(f"PRAGMA table_info({TABLE})")}
    missing = [column for column in COLUMNS if column not in present]
    if missing:
        raise DatabaseError(
            f"table {TABLE} in {db.path} has no column {', '.join(missing)}: "
            "outbox-sync needs " + ", ".join(COLUMNS)
        )


def index_sequences_id(db: Database) -> None:
    """A legacy table whose `id` is not the rowid gets an index, so lookups stay O(log n)."""
    info = {row[1]: row for row in db.conn.execute(f"PRAGMA table_info({TABLE})")}
    pk_columns = [name for name, row in info.items() if row[5]]
    if pk_columns == ["id"] and str(info["id"][2]).upper() == "INTEGER":
        return
    first_columns = db.conn.execute(
        f"SELECT i.name FROM pragma_index_list('{TABLE}') AS l,"
        " pragma_index_info(l.name) AS i WHERE i.seqno = 0"
    ).fetchall()
    if ("id",) in first_columns:
        return
    db.conn.execute(f"CREATE INDEX IF NOT EXISTS outbox_sync_sequences_id ON {TABLE} (id)")


class SchemaWatch:
    """A loop job, every turn: whenever `PRAGMA schema_version` changes, check that the table is
    there (TableMissingError pauses the sync until it is back) and that the triggers are ours,
    putting them back if not; then ask for an audit (`request(reason)`): changes made while
    they were gone left no outbox entry."""

    def __init__(self, db: Database, request: Callable[[str], None]) -> None:
        self.db, self.request = db, request
        self.version: int | None = None
        self.log = structlog.get_logger("outbox_sync")

    def __call__(self, now: float) -> None:
        version = self.db.schema_version()
        if version == self.version:
            return
        problems = repair_triggers(self.db)  # raises TableMissingError while the table is gone
        self.version = self.db.schema_version()  # our own repair changed it too
        if problems:
            self.log.warning(
                "triggers_repaired",
                table=TABLE,
                problems=problems,
                note="auditing: changes made meanwhile left no outbox entry",
            )
            self.request("triggers repaired")
        elif self.db.get_meta(RECONCILE_REQUEST_KEY) is not None:
            self.db.set_meta(RECONCILE_REQUEST_KEY, None)
            self.request("init repaired the triggers")
