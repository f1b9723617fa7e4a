"""The schema outbox-sync keeps in the application's database: the shared tables (schema.sql),
the triggers it owns on each mapped table (made from the mappings), the checks that say what is
missing, the repair that puts triggers (and our own tables) back where a migration took them
away, the upgrade of a database an older version wrote, and the removal of it all (uninstall).

Migrations move and drop triggers without a word: SQLite's 12-step table rebuild (what Django,
Alembic and `sqlite-utils transform` do) drops them with the old table; renaming the table away
takes them along to the old name. So the daemon checks its triggers by name, table and SQL
text, at start and whenever `PRAGMA schema_version` changes, and reinstalls them.
"""

import contextlib
import json
import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources

import structlog

from outbox_sync.config_file import ConfigFileError
from outbox_sync.db import (
    TABLES,
    Database,
    count_rows,
    enqueue_rows,
    fill_key,
    table_exists,
    utc_now,
)
from outbox_sync.errors import ConfigError, DatabaseError, TableMissingError
from outbox_sync.mapping import BUILT_IN, SEQUENCES, Mapping, Trigger, Unique, key_kind
from outbox_sync.values import quote_identifier

SCHEMA_VERSION = "2"
# Set by `init` when it had to repair the triggers: the running daemon (or the next one to
# start) then compares Typesense with the tables, which changed unseen meanwhile.
RECONCILE_REQUEST_KEY = "reconcile_requested"
# What every trigger of ours does, and no other trigger does: write our outbox's columns (an
# application's own `outbox`, which `init` refuses to share, has triggers of its own). Or did:
# the outbox renamed (ALTER TABLE outbox RENAME TO outbox_old), SQLite rewrites our triggers to
# write there (`elsewhere`), and the daemon makes the outbox again and puts them back.
OUR_TRIGGER = re.compile(
    r"\bINSERT\s+INTO\s+(?:[\"`\[]?outbox[\"`\]]?\s*\(\s*[\"`\[]?(?:mapping|record_key|sequence_id)\b"
    r"|(?P<elsewhere>\"(?:[^\"]|\"\")*\"|`[^`]*`|\[[^\]]*\]|\w+)\s*\(\s*mapping\s*,\s*record_key\s*,\s*op\s*\))",
    re.IGNORECASE,
)
# Version 1 (one table, `sequences`): the outbox and sync_errors had no mapping column and
# called the key sequence_id. Renaming the column rewrites the old triggers too; they are then
# put back as version 2 writes them.
UPGRADE_FROM_1 = (
    "ALTER TABLE outbox RENAME COLUMN sequence_id TO record_key",
    "ALTER TABLE outbox ADD COLUMN mapping TEXT NOT NULL DEFAULT 'sequences'",
    "ALTER TABLE sync_errors RENAME COLUMN sequence_id TO record_key",
    "ALTER TABLE sync_errors ADD COLUMN mapping TEXT NOT NULL DEFAULT 'sequences'",
    "DROP INDEX IF EXISTS sync_errors_open",
)


@dataclass(frozen=True)
class InitResult:
    filling: dict[str, int]  # rows the daemon fills straight from the table, per new mapping
    enqueued: dict[str, int]  # rows enqueued by the backfill (backfill=True), per mapping
    repaired: list[str]  # what was wrong with the triggers (empty: nothing)
    upgraded: bool  # the database was an older version's


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


def own_table_statements() -> list[str]:
    """The statements of schema.sql that make outbox-sync's own tables (TABLES)."""
    return [
        statement
        for statement in schema_statements()
        if statement.startswith("CREATE TABLE") and "EXISTS sequences" not in statement
    ]


def is_builtin(mapping: Mapping) -> bool:
    """The built-in `sequences` mapping (whatever collection it writes to)."""
    return (mapping.table, mapping.key, mapping.fields) == (
        SEQUENCES.table,
        SEQUENCES.key,
        SEQUENCES.fields,
    )


def owned_triggers(conn: sqlite3.Connection, mappings: Sequence[Mapping]) -> list[Trigger]:
    """The mappings' triggers as the tables are now (their unique constraints)."""
    made = []
    for mapping in mappings:
        uniques = {table: unique_constraints(conn, table) for table in mapping.tables}
        made += mapping.triggers(uniques)
    return made


def unique_constraints(conn: sqlite3.Connection, table: str) -> list[Unique]:
    """The constraints through which a REPLACE can remove a row of `table`: each unique index
    (UNIQUE, a PRIMARY KEY that is not the rowid) and an INTEGER PRIMARY KEY (the rowid), as
    (column, collation, whether the column is generated) triples, in a stable order. One on an
    expression is left out: no trigger can name its columns (docs/guarantees.md, known
    limits)."""
    found: set[Unique] = set()
    generated = {  # hidden 2 and 3: a VIRTUAL and a STORED generated column
        name
        for (name,) in conn.execute(
            "SELECT name FROM pragma_table_xinfo(?) WHERE hidden IN (2, 3)", (table,)
        )
    }
    indexes = _unique_indexes(conn, table)
    for _, _, parts in indexes:
        if all(cid >= 0 for cid, _, _ in parts):
            found.add(tuple((c, collation, c in generated) for _, c, collation in parts))
    primary = conn.execute(
        "SELECT name, type FROM pragma_table_info(?) WHERE pk", (table,)
    ).fetchall()
    rowid = not any(origin == "pk" for _, origin, _ in indexes)  # else the key has an index
    if len(primary) == 1 and primary[0][1].upper() == "INTEGER" and rowid:
        found.add(((primary[0][0], "BINARY", False),))
    return sorted(found)


def unfollowed_uniques(conn: sqlite3.Connection, mappings: Sequence[Mapping]) -> list[str]:
    """The unique indexes on an expression of the mapped tables, `INDEX on TABLE`: a REPLACE
    through one removes a row no trigger of ours notes (`unique_constraints` leaves them out).
    Said, so that on-call knows why a document may stay until the scheduled audit."""
    return [
        f"{index} on {table}"
        for table in sorted({table for mapping in mappings for table in mapping.tables})
        for index, _, parts in sorted(_unique_indexes(conn, table))
        if any(cid == -2 for cid, _, _ in parts)  # -2: an expression
    ]


def _unique_indexes(
    conn: sqlite3.Connection, table: str
) -> list[tuple[str, str, list[tuple[int, str, str]]]]:
    """Each unique index of `table`: its name, its origin (`u` UNIQUE, `pk` PRIMARY KEY, `c`
    CREATE INDEX) and its key parts in order (column id, column name, collation)."""
    return [
        (
            index,
            origin,
            conn.execute(
                "SELECT cid, name, coll FROM pragma_index_xinfo(?) WHERE key ORDER BY seqno",
                (index,),
            ).fetchall(),
        )
        for index, origin in conn.execute(
            'SELECT name, origin FROM pragma_index_list(?) WHERE "unique"', (table,)
        ).fetchall()
    ]


UNFOLLOWED_NOTE = (
    "a REPLACE through a unique index on an expression removes rows no trigger notes (SQLite "
    "fires none for them): their documents stay until the scheduled audit. A unique index on "
    "a generated column of that expression is followed (docs/guarantees.md, known limits)"
)


def trigger_problems(conn: sqlite3.Connection, mappings: Sequence[Mapping]) -> list[str]:
    """What is wrong with our triggers: missing, on another table, not our SQL text, or left
    behind by a mapping that is no more."""
    present = {
        name: (table, sql)
        for name, table, sql in conn.execute(
            "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger'"
        )
    }
    wanted = owned_triggers(conn, mappings)
    problems = []
    for trigger in wanted:
        if trigger.name not in present:
            problems.append(f"{trigger.name} was missing")
        elif present[trigger.name][0] != trigger.table:
            problems.append(f"{trigger.name} was on table {present[trigger.name][0]}")
        elif present[trigger.name][1].split() != trigger.sql.split():
            ours = OUR_TRIGGER.search(present[trigger.name][1])
            if ours is not None and ours["elsewhere"] is not None:
                problems.append(f"{trigger.name} wrote into {ours['elsewhere']}, not outbox")
            elif ours is not None and trigger.name.endswith("_replaced"):
                # the table's unique constraints changed, or an older version made it
                problems.append(f"{trigger.name} was not as the table's unique constraints make it")
            else:
                problems.append(f"{trigger.name} was not outbox-sync's")
    names = {trigger.name for trigger in wanted}
    # the triggers noting rows a REPLACE removes exist only while a table has such constraints
    guards = {f"{t.name}_replaced" for m in mappings for t in m.triggers()}
    for name, (_, sql) in present.items():
        if name not in names and OUR_TRIGGER.search(sql):
            if name in guards:
                problems.append(f"{name} was for unique constraints no longer there")
            else:
                problems.append(f"{name} was of no mapping")
    return problems


def missing_tables(conn: sqlite3.Connection, mappings: Sequence[Mapping]) -> list[str]:
    present = {
        row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    return [t for mapping in mappings for t in mapping.tables if t not in present]


def _reinstall(conn: sqlite3.Connection, mappings: Sequence[Mapping]) -> list[str]:
    """Inside a write transaction: drop every trigger of ours and create the mappings' again,
    when anything about them is wrong. DatabaseError, naming it, when a trigger of the
    application's has the name one of ours must have."""
    problems = trigger_problems(conn, mappings)
    if problems:
        for name, sql in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"
        ).fetchall():
            if OUR_TRIGGER.search(sql):
                conn.execute(f"DROP TRIGGER {quote_identifier(name)}")
        left = conn.execute("SELECT lower(name) FROM sqlite_master WHERE type = 'trigger'")
        taken = {row[0] for row in left}
        for trigger in owned_triggers(conn, mappings):
            if trigger.name.lower() in taken:  # SQLite's names are one in any case
                raise DatabaseError(
                    f"the trigger {trigger.name} is not outbox-sync's (it writes no outbox "
                    f"entry), and outbox-sync names its trigger on {trigger.table} so: rename "
                    f"or drop that one (DROP TRIGGER {quote_identifier(trigger.name)}), then "
                    "run `outbox-sync init` again"
                )
            conn.execute(trigger.sql)
    return problems


def repair_triggers(db: Database, mappings: Sequence[Mapping]) -> list[str]:
    """Put our triggers back as they should be, where they should be, in one short write
    transaction; what was wrong (empty: nothing, and nothing written). TableMissingError when
    a mapped table itself is gone; the error of `bind` when a column a mapping reads is gone,
    with the triggers left as they are: SQLite rewrites them when a column is renamed, and
    ours, naming the old column, would fail every write of the application."""
    if gone := missing_tables(db.conn, mappings):
        raise TableMissingError(gone[0], db.path)
    if not trigger_problems(db.conn, mappings):
        return []
    with db.write() as conn:
        for mapping in mappings:
            bind(conn, mapping, db.path)  # TableMissingError too
        return _reinstall(conn, mappings)


def bind(conn: sqlite3.Connection, mapping: Mapping, path: object) -> Mapping:
    """The mapping checked against its table: the key and every column there, every `sql` and
    `where` accepted by SQLite; with its key's kind from the key column's declared type.
    ConfigError names the mapping and what is wrong; TableMissingError when the table is
    gone."""
    if not table_exists(conn, mapping.table):
        raise TableMissingError(mapping.table, path)
    declared = declared_types(conn, mapping.table)
    # a mistake of a configuration file is a usage error; the built-in mapping's, the table's
    mistake = ConfigError if mapping.origin == BUILT_IN else ConfigFileError
    wanted = [mapping.key] + [f.column or f.name for f in mapping.fields if not f.sql]
    if missing := [column for column in wanted if column not in declared]:
        other = (  # an application's own table that happens to be called `sequences`
            "; a table of another shape syncs through a mapping of your own: --config FILE "
            "(OUTBOX_SYNC_CONFIG) with a [[sync]] entry (docs/tables.md)"
            if mapping.origin == BUILT_IN
            else ""
        )
        raise mistake(
            f"{mapping.origin}: table {mapping.table} has no column {', '.join(missing)} (the "
            f"mapping reads {', '.join(wanted)}){other}"
        )
    for dependency in mapping.depends_on:
        if not table_exists(conn, dependency.table):
            raise TableMissingError(dependency.table, path)
        if dependency.key not in declared_types(conn, dependency.table):
            raise mistake(
                f"{mapping.origin}: depends_on {dependency.table}: it has no column "
                f"{dependency.key!r}"
            )
    virtual = virtual_columns(conn, mapping.table)
    fields = tuple(
        replace(f, from_json=bool(f.sql) or (f.column or f.name) in virtual) for f in mapping.fields
    )
    bound = replace(mapping, key_kind=key_kind(declared[mapping.key]), fields=fields)
    try:
        select = bound.select_by_keys(f"{bound.columns()}, {bound.line_sql()}")
        conn.execute(f"{select} LIMIT 0", ("[]",)).fetchall()
    except sqlite3.Error as error:
        raise mistake(f"{mapping.origin}: SQLite refuses its sql or where: {error}") from None
    table = quote_identifier(bound.table)
    for field in [f for f in bound.fields if f.sql]:  # an aggregate (max(score)) makes every
        # row one: the drain took it, and the backfill and the audit never ended (found by a
        # hostile review); SQLite refuses one in a WHERE
        try:
            conn.execute(f"SELECT 1 FROM {table} WHERE ({field.sql}) IS NULL LIMIT 0")
        except sqlite3.Error as error:
            raise mistake(
                f"{mapping.origin}: field {field.name}: its sql must give a value of each "
                f"row, not of all rows together (an aggregate, a window): {error}"
            ) from None
    strict = replace(
        bound,
        where=_backticked(bound.where),
        fields=tuple(replace(f, sql=_backticked(f.sql)) for f in bound.fields),
    )
    if strict != bound:  # a "name" SQLite took for a string literal, naming no column
        try:
            select = strict.select_by_keys(f"{strict.columns()}, {strict.line_sql()}")
            conn.execute(f"{select} LIMIT 0", ("[]",)).fetchall()
        except sqlite3.Error as error:
            raise mistake(
                f"{mapping.origin}: its sql or where double-quotes a name that is no column, "
                f"which SQLite reads as a string: {error}"
            ) from None
    return bound


# A string literal, or a double-quoted name (SQLite reads "x" as a string when x is no column).
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"((?:[^\"]|\"\")*)\"")


def _backticked(sql: str | None) -> str | None:
    """`sql` with its double-quoted names in backticks, which never fall back to a string."""
    if sql is None:
        return None
    return _QUOTED.sub(
        lambda m: m[0] if m[1] is None else quote_identifier(m[1].replace('""', '"')), sql
    )


def declared_types(conn: sqlite3.Connection, table: str) -> dict[str, str]:
    """Each column of the table with its declared type, generated columns included (a JSON
    field pulled out of a document column, say), which `PRAGMA table_info` leaves out."""
    return {
        row[1]: str(row[2])
        for row in conn.execute(f"PRAGMA table_xinfo({quote_identifier(table)})")
    }


def virtual_columns(conn: sqlite3.Connection, table: str) -> set[str]:
    """The table's VIRTUAL generated columns (`hidden` 2 in `PRAGMA table_xinfo`): computed as
    they are read, so a JSON function's value keeps its subtype (a STORED one's does not)."""
    rows = conn.execute(f"PRAGMA table_xinfo({quote_identifier(table)})")
    return {row[1] for row in rows if row[6] == 2}


def _upgrade(conn: sqlite3.Connection) -> bool:
    """Bring a version 1 database to version 2 (inside init's transaction); True if it was."""
    row = conn.execute("SELECT value FROM outbox_sync_meta WHERE key = 'schema_version'").fetchone()
    if row is None or row[0] != "1":
        return False
    for statement in UPGRADE_FROM_1:
        conn.execute(statement)
    if conn.execute("SELECT 1 FROM outbox_sync_meta WHERE key = 'backfilled_at'").fetchone():
        conn.execute(
            "INSERT OR REPLACE INTO outbox_sync_meta (key, value)"
            " SELECT 'backfilled:sequences', value FROM outbox_sync_meta"
            " WHERE key = 'backfilled_at'"
        )
    return True


def init(db: Database, mappings: Sequence[Mapping], *, backfill: bool = False) -> InitResult:
    """Apply schema.sql (the built-in table only when its mapping is in use), upgrade a database
    an older version wrote, put back triggers a migration took away, then ask the daemon, once
    per mapping, to index the rows its table already holds (a fill: reindex.serve_fills), or
    with backfill=True queue an upsert of every row, as the triggers would. All in one
    transaction: the fill reads the table after the triggers are in, so no row slips between.
    Refused, with nothing changed, where the application has a table of its own under one of
    outbox-sync's names (`foreign_tables`).

    A fill reads the table in order where the outbox would write, claim and delete an entry per
    row: `init` and the first `run --once` on 100k rows took 4.42 s, against 4.69 s through
    the outbox, and on 1M rows 57.3 s against 60.5 s (tests/bench, alternating runs)."""
    refuse_encoding(db)
    try:
        refuse_foreign_tables(
            db.conn,
            db.path,
            "Rename yours (and what uses it), then run init again. Nothing was changed",
        )
        db.conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as error:
        raise DatabaseError(f"cannot initialise database {db.path}: {error}") from None
    with_builtin = any(is_builtin(m) for m in mappings)
    with db.write() as conn:
        try:
            for statement in schema_statements():
                sequences = "TABLE IF NOT EXISTS sequences" in statement
                later = "CREATE TRIGGER" in statement or "CREATE INDEX" in statement
                if not later and (with_builtin or not sequences):
                    conn.execute(statement)
            upgraded = _upgrade(conn)
            conn.execute(schema_statements_index())
            bound = [_bind_for_init(conn, mapping, db) for mapping in mappings]
            index_keys(conn, bound)
            repaired = _reinstall(conn, bound)
        except sqlite3.Error as error:
            raise DatabaseError(f"cannot apply schema to {db.path}: {error}") from None
        filling: dict[str, int] = {}
        enqueued: dict[str, int] = {}
        new: set[str] = set()
        meta = [("schema_version", SCHEMA_VERSION)]
        for mapping in bound:
            done = conn.execute(
                "SELECT 1 FROM outbox_sync_meta WHERE key = ?", (f"backfilled:{mapping.name}",)
            ).fetchone()
            if not done:  # a new mapping: its triggers are installed, not repaired
                new.update(trigger.name for trigger in owned_triggers(conn, [mapping]))
            if backfill:  # queued instead: no fill is needed any more
                enqueued[mapping.name] = enqueue_rows(conn, mapping)
            elif not done and (rows := count_rows(conn, mapping)):
                filling[mapping.name] = rows
                meta.append((fill_key(mapping.name), utc_now()))
            if backfill or not done:
                meta.append((f"backfilled:{mapping.name}", utc_now()))
        repaired = [p for p in repaired if not any(p.startswith(f"{n} was ") for n in new)]
        if repaired:  # changes made meanwhile left no outbox entry: the daemon audits
            meta.append((RECONCILE_REQUEST_KEY, "; ".join(repaired)))
        conn.executemany("INSERT OR REPLACE INTO outbox_sync_meta (key, value) VALUES (?, ?)", meta)
    return InitResult(filling, enqueued, repaired, upgraded)


def _bind_for_init(conn: sqlite3.Connection, mapping: Mapping, db: Database) -> Mapping:
    try:
        return bind(conn, mapping, db.path)
    except TableMissingError as error:
        named = conn.execute(  # SQLite's names are one in any case; outbox-sync's exact
            "SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view')"
            " AND name = ? COLLATE NOCASE",
            (error.table,),
        ).fetchone()
        if named is not None and named[1] == "view":
            raise DatabaseError(
                f"{mapping.origin}: {named[0]} in {db.path} is a view: outbox-sync syncs tables "
                "(no trigger sees a view's rows change); map the table it reads, with a `where`"
            ) from None
        if named is not None:
            raise DatabaseError(
                f"{mapping.origin}: table {error.table} does not exist in {db.path}, but "
                f"{named[0]} does: write its name as the database has it"
            ) from None
        raise DatabaseError(
            f"{mapping.origin}: table {error.table} does not exist in {db.path}: the application "
            "owns it; create it, then run init again"
        ) from None


def schema_statements_index() -> str:
    """The open-errors index (after an upgrade has given sync_errors its mapping column)."""
    return next(s for s in schema_statements() if "sync_errors_open_records" in s)


def check(db: Database, mappings: Sequence[Mapping], *, prepared: bool = True) -> list[Mapping]:
    """The mappings bound to their tables (see `bind`: a mistake in a mapping is said first),
    once `init` has prepared the database for this version (unless prepared=False);
    DatabaseError saying what to do otherwise. A mapped table that is gone is left unbound
    (the daemon waits for it); its triggers are the daemon's to repair."""
    refuse_encoding(db)
    bound = []
    for mapping in mappings:
        try:
            bound.append(bind(db.conn, mapping, db.path))
        except TableMissingError:  # no kind to take from a key column that is not there
            bound.append(replace(mapping, key_kind=""))
    if not prepared:
        return bound
    if missing := missing_own_tables(db.conn):
        raise DatabaseError(
            f"database {db.path} is missing {', '.join(missing)}: "
            f"run `outbox-sync init --db {db.path}`"
        )
    refuse_foreign_tables(
        db.conn,
        db.path,
        "An older outbox-sync's init took them for its own: its triggers fail each write to a "
        f"mapped table. `outbox-sync uninstall --db {db.path}` removes what is outbox-sync's, "
        "and leaves yours",
    )
    version = db.get_meta("schema_version")
    if version != SCHEMA_VERSION:
        raise DatabaseError(
            f"database {db.path} was prepared by an older outbox-sync (schema {version}): "
            f"`outbox-sync init --db {db.path}` (or starting the daemon) upgrades it, nothing lost"
        )
    return bound


def refuse_encoding(db: Database) -> None:
    """DatabaseError unless the file's text is UTF-8 (SQLite's default): the JSON lines SQLite
    builds are read as bytes, and a UTF-16 file's failed every record ("Bad JSON") and every
    audit (found by a hostile review). Applications read and write either alike."""
    (encoding,) = db.conn.execute("PRAGMA encoding").fetchone()
    if encoding != "UTF-8":
        raise DatabaseError(
            f"database {db.path} keeps its text in {encoding} (PRAGMA encoding): outbox-sync "
            "needs UTF-8, SQLite's default. Copy it into a new file while the applications are "
            f"stopped (`sqlite3 {db.path} .dump | sqlite3 NEW.db`: the same tables and rows, "
            "its text in UTF-8), use NEW.db in its place, then run init"
        )


def upgrade(db: Database) -> bool:
    """What `run` does first: upgrade a database an older version wrote (its triggers are put
    back by the daemon's own check). True if it did."""
    if not table_exists(db.conn, "outbox_sync_meta") or db.get_meta("schema_version") != "1":
        return False
    with db.write() as conn:
        _upgrade(conn)
        conn.execute(schema_statements_index())
        conn.execute(
            "INSERT OR REPLACE INTO outbox_sync_meta (key, value) VALUES ('schema_version', ?)",
            (SCHEMA_VERSION,),
        )
    return True


def unindexed_keys(conn: sqlite3.Connection, mappings: Sequence[Mapping]) -> list[tuple[str, str]]:
    """The (table, column) pairs the daemon looks records up by (each mapping's key, and each
    dependency's key) that no index leads with: each lookup, and each `sql` field reading a
    dependency, would scan the whole table."""
    unindexed = []
    for mapping in mappings:
        for table, column in [(mapping.table, mapping.key)] + [
            (d.table, d.key) for d in mapping.depends_on
        ]:
            info = conn.execute(f"PRAGMA table_info({quote_identifier(table)})").fetchall()
            primary = [row[1] for row in sorted(info, key=lambda row: row[5]) if row[5]]
            first_columns = conn.execute(
                "SELECT i.name FROM pragma_index_list(?) AS l, pragma_index_info(l.name) AS i"
                " WHERE i.seqno = 0",
                (table,),
            ).fetchall()
            if primary[:1] != [column] and (column,) not in first_columns:
                unindexed.append((table, column))
    return list(dict.fromkeys(unindexed))


def index_keys(conn: sqlite3.Connection, mappings: Sequence[Mapping]) -> list[str]:
    """Inside a write transaction: an index on each of `unindexed_keys`, so lookups stay
    O(log n); what it indexed."""
    made = []
    for table, column in unindexed_keys(conn, mappings):
        name = quote_identifier(f"outbox_sync_{table}_{column}")
        conn.execute(
            f"CREATE INDEX IF NOT EXISTS {name} ON {quote_identifier(table)}"
            f" ({quote_identifier(column)})"
        )
        made.append(f"{table}({column})")
    return made


def repair_indexes(db: Database, mappings: Sequence[Mapping]) -> list[str]:
    """Put back the key indexes `init` made that a migration took (a table rebuilt takes its
    indexes along), in one write transaction; what it indexed (empty: nothing written)."""
    if not unindexed_keys(db.conn, mappings):
        return []
    with db.write() as conn:
        return index_keys(conn, mappings)


def restore_tables(db: Database, mappings: Sequence[Mapping]) -> list[str]:
    """Make outbox-sync's own tables again where something dropped them under the running
    daemon (a declarative migration dropping the tables it does not know; `uninstall` is
    refused while a daemon runs), in one write transaction; which were gone (empty: nothing
    written). Until the outbox is back, each write of the application that fires our triggers
    fails. A new outbox_sync_meta says what the daemon knows: the schema's version, and that
    each mapping's table has been indexed (the audit asked for then finds what is not)."""
    if not (gone := missing_own_tables(db.conn)):
        return []
    with db.write() as conn:
        gone = missing_own_tables(conn)  # again, in the transaction: more may be gone by now
        for statement in own_table_statements():
            conn.execute(statement)
        conn.execute(schema_statements_index())
        if "outbox_sync_meta" in gone:
            meta = [("schema_version", SCHEMA_VERSION)]
            meta += [(f"backfilled:{mapping.name}", utc_now()) for mapping in mappings]
            conn.executemany("INSERT INTO outbox_sync_meta (key, value) VALUES (?, ?)", meta)
    return gone


def missing_own_tables(conn: sqlite3.Connection) -> list[str]:
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return [table for table in TABLES if table not in names]


@cache
def _own_columns() -> dict[str, frozenset[str]]:
    """The columns of each of outbox-sync's tables, as schema.sql makes them."""
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        for statement in own_table_statements():
            conn.execute(statement)
        return {table: frozenset(declared_types(conn, table)) for table in TABLES}


def foreign_tables(conn: sqlite3.Connection) -> dict[str, list[str]]:
    """The tables (or views) that have one of outbox-sync's names, in any case, but not its
    columns, nor version 1's (no mapping, the key called sequence_id): an application's own
    `outbox`, say. Each with its columns. `init` would take it for its own, and our triggers,
    writing columns it lacks, would fail every write of the application to a mapped table."""
    found = {}
    for table, ours in _own_columns().items():
        shapes = [ours]
        if "record_key" in ours:
            shapes.append(ours - {"mapping", "record_key"} | {"sequence_id"})
        columns = list(declared_types(conn, table))
        if columns and not any(shape <= set(columns) for shape in shapes):
            found[table] = columns
    return found


def refuse_foreign_tables(conn: sqlite3.Connection, path: object, advice: str) -> None:
    """DatabaseError naming each table of another shape that has one of outbox-sync's names."""
    if found := foreign_tables(conn):
        named = "; ".join(f"{t} (columns {', '.join(c)})" for t, c in found.items())
        raise DatabaseError(
            f"{path} has its own {named}: outbox-sync keeps its records in tables named "
            f"{', '.join(TABLES[:-1])} and {TABLES[-1]}, and cannot share a name with a table "
            f"of another shape. {advice}"
        )


class SchemaWatch:
    """A loop job, every turn: whenever `PRAGMA schema_version` changes, check that the mapped
    tables are there (TableMissingError pauses the sync until they are back) and that the
    triggers are ours, putting them back if not; then ask for an audit (`request(reason)`):
    changes made while they were gone left no outbox entry. The key indexes `init` made are
    put back too (no audit: their absence loses nothing, it only makes every lookup a scan).
    A unique index on an expression, which no trigger can follow, is said once when it
    appears (`unique_index_not_followed`).

    Rows can also change with no outbox entry while the triggers stay as they were: a mapped
    table rebuilt with its triggers copied back (SQLite's own 12-step ALTER: a new root page),
    or the file rewritten in place by a restore (the backup API: same inode, same triggers;
    the outbox's AUTOINCREMENT counter goes back). Either asks for an audit too (a VACUUM,
    which may move root pages, costs one)."""

    def __init__(
        self, db: Database, mappings: Sequence[Mapping], request: Callable[[str], None]
    ) -> None:
        self.db, self.mappings, self.request = db, mappings, request
        self.version: int | None = None
        self.log = structlog.get_logger("outbox_sync")
        self.tables = sorted({table for mapping in mappings for table in mapping.tables})
        self.roots: dict[str, int] | None = None  # the mapped tables' root pages, last seen
        self.outbox_seq: int | None = None  # the outbox's AUTOINCREMENT counter, last seen
        self.kinds: dict[str, str] | None = None  # each mapping's key kind, at the first turn
        self.unfollowed: set[str] = set()  # `unfollowed_uniques`, said when one is new

    def _roots(self) -> dict[str, int]:
        return dict(
            self.db.conn.execute(
                "SELECT name, rootpage FROM sqlite_schema WHERE type = 'table'"
                " AND name IN (SELECT value FROM json_each(?))",
                (json.dumps(self.tables),),
            ).fetchall()
        )

    def __call__(self, now: float) -> None:
        # every turn: a restore may leave the schema's version as it was
        row = self.db.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'")
        seq = int((row.fetchone() or (0,))[0])
        went_back = self.outbox_seq is not None and seq < self.outbox_seq
        self.outbox_seq = seq
        version = self.db.schema_version()
        if version == self.version and not went_back:
            return
        restored = restore_tables(self.db, self.mappings)  # before the triggers write them
        problems = repair_triggers(self.db, self.mappings)  # TableMissingError: paused
        if indexed := repair_indexes(self.db, self.mappings):
            self.log.warning(
                "key_indexes_repaired",
                indexed=indexed,
                note="without them each lookup by these keys scanned the whole table",
            )
        # The version read before the checks: a migration committed since is seen next turn.
        # Our own repairs change it too, so after one the next turn checks again.
        self.version = None if restored or problems or indexed else version
        unfollowed = unfollowed_uniques(self.db.conn, self.mappings)
        if set(unfollowed) - self.unfollowed:
            self.log.warning("unique_index_not_followed", indexes=unfollowed, note=UNFOLLOWED_NOTE)
        self.unfollowed = set(unfollowed)
        seen, self.roots = self.roots, self._roots()
        rebuilt = [t for t in self.tables if seen is not None and seen.get(t) != self.roots.get(t)]
        if restored:
            note = (
                "dropped under the daemon (`outbox-sync uninstall` removes outbox-sync): the "
                "changes its outbox held went with it: auditing"
            )
            self._audit(
                "own tables dropped",
                "own_tables_restored",
                tables=restored,
                triggers=problems,
                note=note,
            )
        elif problems:
            note = "auditing: changes made meanwhile left no outbox entry"
            if any(problem.endswith(" was of no mapping") for problem in problems):
                note += (  # `init` run with a mapping the daemon was not started with
                    "; triggers of a mapping this daemon does not have were dropped: for a "
                    "mapping just added, restart the daemon, which puts them back and fills "
                    "its table whole"
                )
            self._audit("triggers repaired", "triggers_repaired", problems=problems, note=note)
        elif went_back:
            note = "the outbox counter went back (a backup restored in place?): auditing"
            self._audit("database restored", "database_went_back", note=note)
        elif rebuilt:
            note = "rows copied into a new table leave no outbox entry: auditing"
            self._audit("tables rebuilt", "tables_rebuilt", tables=rebuilt, note=note)
        elif self.db.get_meta(RECONCILE_REQUEST_KEY) is not None:
            self.db.set_meta(RECONCILE_REQUEST_KEY, None)
            self.request("init repaired the triggers")
        self._check_key_kinds()
        self._check_generated()

    def _audit(self, reason: str, event: str, **fields: object) -> None:
        """Say why rows may have changed with no outbox entry, and ask for an audit."""
        self.log.warning(event, **fields)
        self.request(reason)

    def _check_key_kinds(self) -> None:
        """A key column a migration gave another type (INTEGER to TEXT) makes other document
        ids: the daemon, which took the kind at its start, stops (the audit asked for is owed)
        and reads the table anew at its next. The kinds are taken at the first turn, but for a
        mapping `check` left unbound (its table was gone when the daemon started): judged by
        no kind of the table's, every TEXT key was a sync error once it was back."""
        kinds = {
            mapping.name: key_kind(declared_types(self.db.conn, mapping.table).get(mapping.key, ""))
            for mapping in self.mappings
        }
        if self.kinds is None:
            self.kinds = {m.name: kinds[m.name] if m.key_kind else "" for m in self.mappings}
        for mapping in self.mappings:
            was, now = self.kinds[mapping.name], kinds[mapping.name]
            if not was:
                raise DatabaseError(
                    f"table {mapping.table} in {self.db.path} was gone when the daemon started, "
                    "so it could not tell the kind of its key: it stops, and reads the table as "
                    "it is when it starts again"
                )
            if now != was:
                raise DatabaseError(
                    f"the key column {mapping.key} of table {mapping.table} in {self.db.path} "
                    f"was made {now} while the daemon ran ({was} when it started): it stops, "
                    "and reads the table as it is when it starts again"
                )

    def _check_generated(self) -> None:
        """A column a migration made a VIRTUAL generated one (the table rebuilt) may now hold
        text SQLite's JSON functions made, which the line, bound at start for a stored column
        (`Field.from_json`), would write as JSON: the daemon stops, and binds the table as it
        is when it starts again."""
        for mapping in self.mappings:
            stored = [f.column or f.name for f in mapping.fields if not f.from_json]
            if made := sorted(set(stored) & virtual_columns(self.db.conn, mapping.table)):
                raise DatabaseError(
                    f"column {', '.join(made)} of table {mapping.table} in {self.db.path} was "
                    "made a VIRTUAL generated column while the daemon ran: it stops, and reads "
                    "the table as it is when it starts again"
                )


@dataclass(frozen=True)
class Installed:
    """What outbox-sync keeps in a database, as `uninstall` finds it."""

    triggers: list[tuple[str, str]]  # (name, table): every trigger that writes the outbox
    indexes: list[tuple[str, str]]  # (name, table): the key indexes `init` made
    tables: list[str]  # its own tables (TABLES) that are there (not an application's own)
    pending: int  # outbox entries not applied yet
    open_errors: int  # sync errors not resolved
    users: list[str]  # "trigger T on table X", "view V": others' that use its tables

    @property
    def empty(self) -> bool:
        return not (self.triggers or self.indexes or self.tables)

    def refuse_users(self, path: object) -> None:
        """DatabaseError while a trigger or a view of someone else's uses outbox-sync's tables:
        once they are gone it would fail, a trigger every write of the application's that
        fires it."""
        if self.users:
            raise DatabaseError(
                f"{'; '.join(self.users)} in {path} uses outbox-sync's tables, and would fail "
                "once they are gone (a trigger, every write that fires it): drop or change it "
                "first. Nothing was removed"
            )


def installed(conn: sqlite3.Connection) -> Installed:
    """What outbox-sync keeps in the database (and who else uses its tables)."""
    foreign = foreign_tables(conn)
    gone = missing_own_tables(conn)
    tables = [table for table in TABLES if table not in gone and table not in foreign]
    # a trigger or view of someone else's that names one of those
    uses = re.compile(r"\b(?:" + "|".join(tables or ["(?!)"]) + r")\b", re.IGNORECASE)
    triggers, indexes, users = [], [], []
    for kind, name, table, sql in conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master"
        " WHERE type IN ('trigger', 'index', 'view') ORDER BY tbl_name, name"
    ):
        if kind == "trigger" and OUR_TRIGGER.search(sql):
            triggers.append((name, table))
        elif (
            kind == "index"
            and name.startswith("outbox_sync_")
            and str(sql).startswith(f"CREATE INDEX {quote_identifier(name)} ON ")
        ):
            indexes.append((name, table))
        elif kind != "index" and uses.search(sql):
            users.append(f"view {name}" if kind == "view" else f"trigger {name} on table {table}")

    def count(sql: str) -> int:
        return int(conn.execute(sql).fetchone()[0])

    pending = count("SELECT count(*) FROM outbox") if "outbox" in tables else 0
    open_errors = (
        count("SELECT count(*) FROM sync_errors WHERE resolved_at IS NULL")
        if "sync_errors" in tables
        else 0
    )
    return Installed(triggers, indexes, tables, pending, open_errors, users)


def uninstall(db: Database) -> Installed:
    """Remove outbox-sync from the database in one write transaction: every trigger that writes
    the outbox (of any mapping, configured or not), the key indexes `init` made, and its
    tables; what it removed. The application's tables and rows stay as they are. Nothing is
    changed while others' triggers or views use those tables (Installed.refuse_users)."""
    with db.write() as conn:
        found = installed(conn)
        found.refuse_users(db.path)
        for name, _ in found.triggers:
            conn.execute(f"DROP TRIGGER {quote_identifier(name)}")
        for name, _ in found.indexes:
            conn.execute(f"DROP INDEX {quote_identifier(name)}")
        for table in found.tables:
            conn.execute(f"DROP TABLE {quote_identifier(table)}")
    return found
