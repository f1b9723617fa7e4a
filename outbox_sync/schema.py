"""The schema outbox-sync keeps in the application's database: the shared tables, the triggers on
`sequences`, and the checks that say what is missing (schema.sql holds the text)."""

import sqlite3
from importlib import resources

from outbox_sync.db import Database, utc_now
from outbox_sync.documents import COLUMNS
from outbox_sync.errors import DatabaseError

SCHEMA_VERSION = "1"
TRIGGERS = ("sequences_outbox_insert", "sequences_outbox_update", "sequences_outbox_delete")
TABLES = ("outbox", "sync_errors", "sync_stats", "outbox_sync_meta")


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


def init(db: Database, *, backfill: bool = False) -> int:
    """Apply schema.sql, then enqueue every existing row once (or again with backfill=True).
    Returns how many rows were enqueued. All in one transaction: no row slips between the
    backfill and the triggers."""
    try:
        db.conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as error:
        raise DatabaseError(f"cannot initialise database {db.path}: {error}") from None
    with db.write() as conn:
        try:
            for statement in schema_statements():
                conn.execute(statement)
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
        conn.executemany(
            "INSERT OR REPLACE INTO outbox_sync_meta (key, value) VALUES (?, ?)",
            [("schema_version", SCHEMA_VERSION)]
            + ([("backfilled_at", utc_now())] if backfill or not done else []),
        )
    return enqueued


def check(db: Database) -> None:
    """Raise DatabaseError, saying what to do, unless `init` has been applied."""
    names = {
        row[0]
        for row in db.conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'trigger')"
        )
    }
    missing = [name for name in ("sequences", *TABLES, *TRIGGERS) if name not in names]
    if missing:
        raise DatabaseError(
            f"database {db.path} is missing {', '.join(missing)}: "
            f"run `outbox-sync init --db {db.path}`"
        )
    check_columns(db)


def check_columns(db: Database) -> None:
    present = {row[1] for row in db.conn.execute("PRAGMA table_info(sequences)")}
    missing = [column for column in COLUMNS if column not in present]
    if missing:
        raise DatabaseError(
            f"table sequences in {db.path} has no column {', '.join(missing)}: "
            "outbox-sync needs " + ", ".join(COLUMNS)
        )


def index_sequences_id(db: Database) -> None:
    """A legacy table whose `id` is not the rowid gets an index, so lookups stay O(log n)."""
    info = {row[1]: row for row in db.conn.execute("PRAGMA table_info(sequences)")}
    pk_columns = [name for name, row in info.items() if row[5]]
    if pk_columns == ["id"] and str(info["id"][2]).upper() == "INTEGER":
        return
    first_columns = db.conn.execute(
        "SELECT i.name FROM pragma_index_list('sequences') AS l,"
        " pragma_index_info(l.name) AS i WHERE i.seqno = 0"
    ).fetchall()
    if ("id",) in first_columns:
        return
    db.conn.execute("CREATE INDEX IF NOT EXISTS outbox_sync_sequences_id ON sequences (id)")
