"""The SQLite side: schema, the outbox queue, `sync_errors`, the daemon lock.

Every write is a short BEGIN IMMEDIATE transaction and no transaction is ever held across
network I/O: other applications write to this file at the same time.
"""

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any

from outbox_sync.documents import COLUMNS
from outbox_sync.errors import (
    AlreadyRunningError,
    DatabaseBusyError,
    DatabaseError,
    OutboxSyncError,
)
from outbox_sync.telemetry import merge_stats

# How long a write waits for another connection's write lock before giving up (and retrying
# later: a busy database never loses an entry).
DEFAULT_BUSY_TIMEOUT_S = 30.0
# Retry delays of our own write-lock wait (see Database._begin_immediate).
WRITE_RETRY_MIN_S = 0.0002
WRITE_RETRY_MAX_S = 0.002
SCHEMA_VERSION = "1"
TRIGGERS = ("sequences_outbox_insert", "sequences_outbox_update", "sequences_outbox_delete")
TABLES = ("outbox", "sync_errors", "sync_stats", "outbox_sync_meta")
# How long per-minute statistics are kept: a month covers any weekly review.
STATS_RETENTION_S = 35 * 24 * 3600


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    sequence_id: Any
    op: str


@dataclass(frozen=True)
class SyncFailure:
    """A record given up on: one future row of `sync_errors`."""

    outbox_id: int
    sequence_id: Any
    op: str
    document: str | None
    http_status: int | None
    error: str
    attempts: int


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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


class Database:
    """One connection to the database file, in autocommit mode."""

    def __init__(
        self, path: Path, *, create: bool = False, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
    ) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        if not create and not path.exists():
            raise DatabaseError(
                f"database {path} does not exist: create it with `outbox-sync init --db {path}`"
            )
        try:
            self.conn = sqlite3.connect(
                path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as error:
            raise DatabaseError(f"cannot open database {path}: {error}") from None

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction. BEGIN IMMEDIATE waits for the lock up front (a deferred
        transaction upgrading to a writer would fail at once, ignoring the busy timeout)."""
        try:
            self._begin_immediate()
        except sqlite3.OperationalError as error:
            raise self._write_error(error) from None
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException as error:
            if self.conn.in_transaction:  # some errors end the transaction themselves
                self.conn.execute("ROLLBACK")
            # A read-only file may still let BEGIN IMMEDIATE through: the first write says so.
            if isinstance(error, sqlite3.OperationalError):
                raise self._write_error(error) from None
            raise

    def _begin_immediate(self) -> None:
        """BEGIN IMMEDIATE, retried every few hundred microseconds up to the busy timeout.
        SQLite's own busy handler sleeps 1, 2, 5 ... 100 ms between tries: under an application
        committing thousands of times a second that stalled an acknowledgement for up to 80 ms
        (measured by tests/bench), while the lock was free again within a millisecond."""
        self.conn.execute("PRAGMA busy_timeout = 0")
        try:
            deadline = time.monotonic() + self.busy_timeout_s
            delay = WRITE_RETRY_MIN_S
            while True:
                try:
                    self.conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as error:
                    busy = "locked" in str(error) or "busy" in str(error)
                    if not busy or time.monotonic() >= deadline:
                        raise
                time.sleep(delay)
                delay = min(delay * 2, WRITE_RETRY_MAX_S)
        finally:
            self.conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")

    def _write_error(self, error: sqlite3.OperationalError) -> DatabaseError:
        if "locked" in str(error) or "busy" in str(error):
            return DatabaseBusyError(f"database {self.path} stayed locked: {error}")
        return DatabaseError(f"cannot write to database {self.path}: {error}")

    def check_writable(self) -> None:
        """Raise DatabaseError unless this connection may write: a daemon on a read-only file
        would otherwise only fail at its first acknowledgement."""
        with self.write() as conn:
            conn.execute("DELETE FROM outbox_sync_meta WHERE key = 'write_probe'")

    # -- schema ---------------------------------------------------------------------------------

    def init(self, *, backfill: bool = False) -> int:
        """Apply schema.sql, then enqueue every existing row once (or again with backfill=True).
        Returns how many rows were enqueued. All in one transaction: no row slips between the
        backfill and the triggers."""
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as error:
            raise DatabaseError(f"cannot initialise database {self.path}: {error}") from None
        with self.write() as conn:
            try:
                for statement in schema_statements():
                    conn.execute(statement)
            except sqlite3.Error as error:
                raise DatabaseError(f"cannot apply schema to {self.path}: {error}") from None
            self._check_sequences_columns()
            self._index_sequences_id()
            done = conn.execute(
                "SELECT 1 FROM outbox_sync_meta WHERE key = 'backfilled_at'"
            ).fetchone()
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

    def check_schema(self) -> None:
        """Raise DatabaseError, saying what to do, unless `init` has been applied."""
        names = {
            row[0]
            for row in self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'trigger')"
            )
        }
        missing = [name for name in ("sequences", *TABLES, *TRIGGERS) if name not in names]
        if missing:
            raise DatabaseError(
                f"database {self.path} is missing {', '.join(missing)}: "
                f"run `outbox-sync init --db {self.path}`"
            )
        self._check_sequences_columns()

    def _check_sequences_columns(self) -> None:
        present = {row[1] for row in self.conn.execute("PRAGMA table_info(sequences)")}
        missing = [column for column in COLUMNS if column not in present]
        if missing:
            raise DatabaseError(
                f"table sequences in {self.path} has no column {', '.join(missing)}: "
                "outbox-sync needs " + ", ".join(COLUMNS)
            )

    def _index_sequences_id(self) -> None:
        """A legacy table whose `id` is not the rowid gets an index, so lookups stay O(log n)."""
        info = {row[1]: row for row in self.conn.execute("PRAGMA table_info(sequences)")}
        pk_columns = [name for name, row in info.items() if row[5]]
        if pk_columns == ["id"] and str(info["id"][2]).upper() == "INTEGER":
            return
        first_columns = self.conn.execute(
            "SELECT i.name FROM pragma_index_list('sequences') AS l,"
            " pragma_index_info(l.name) AS i WHERE i.seqno = 0"
        ).fetchall()
        if ("id",) in first_columns:
            return
        self.conn.execute("CREATE INDEX IF NOT EXISTS outbox_sync_sequences_id ON sequences (id)")

    # -- the queue ------------------------------------------------------------------------------

    def _fetch_raw(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Fetch with TEXT as bytes, so invalid UTF-8 becomes a record error, not a crash."""
        self.conn.text_factory = bytes
        try:
            return self.conn.execute(sql, params).fetchall()
        finally:
            self.conn.text_factory = str

    def claim(self, limit: int, after: int = 0) -> list[OutboxEntry]:
        """The oldest `limit` outbox entries with an id above `after`, in id order."""
        rows = self._fetch_raw(
            "SELECT id, sequence_id, op FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after, limit),
        )
        return [
            OutboxEntry(
                id,
                key.decode("utf-8", "replace") if isinstance(key, bytes) else key,
                op.decode(),
            )
            for id, key, op in rows
        ]

    def read_records(self, keys: Sequence[int]) -> dict[int, tuple[Any, ...]]:
        """The current rows of `sequences` for these integer ids (absent ones are gone)."""
        columns = ", ".join(COLUMNS)
        try:
            rows = self._fetch_raw(
                f"SELECT {columns} FROM sequences WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(list(keys)),),
            )
        except sqlite3.OperationalError as error:
            if "no such column" in str(error) or "no such table" in str(error):
                raise DatabaseError(
                    f"table sequences in {self.path} changed under the daemon ({error}): "
                    "outbox-sync needs " + ", ".join(COLUMNS)
                ) from None
            raise
        return {row[0]: row for row in rows}

    def ack(
        self,
        last_id: int,
        synced_keys: Sequence[Any],
        failures: Sequence[SyncFailure],
    ) -> None:
        """Remove claimed entries up to last_id, record failures, close errors a later sync
        superseded. Entries enqueued after the claim have higher ids and stay queued."""
        now = utc_now()
        with self.write() as conn:
            conn.execute("DELETE FROM outbox WHERE id <= ?", (last_id,))
            if (
                synced_keys
                and conn.execute(
                    "SELECT 1 FROM sync_errors WHERE resolved_at IS NULL LIMIT 1"
                ).fetchone()
            ):
                conn.execute(
                    "UPDATE sync_errors SET resolved_at = ?, resolution = 'superseded'"
                    " WHERE resolved_at IS NULL"
                    " AND sequence_id IN (SELECT value FROM json_each(?))",
                    (now, json.dumps(list(synced_keys))),
                )
            conn.executemany(
                "INSERT INTO sync_errors (outbox_id, sequence_id, op, document, http_status,"
                " error, attempts, failed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        f.outbox_id,
                        f.sequence_id,
                        f.op,
                        f.document,
                        f.http_status,
                        f.error,
                        f.attempts,
                        now,
                    )
                    for f in failures
                ],
            )

    def save_stats(self, bucket: int, data: dict[str, Any]) -> None:
        """Add one interval's statistics to its minute's row; prune rows past the retention."""
        with self.write() as conn:
            row = conn.execute("SELECT data FROM sync_stats WHERE bucket = ?", (bucket,)).fetchone()
            merged = merge_stats(json.loads(row[0]), data) if row else data
            conn.execute(
                "INSERT OR REPLACE INTO sync_stats (bucket, data) VALUES (?, ?)",
                (bucket, json.dumps(merged, separators=(",", ":"))),
            )
            conn.execute("DELETE FROM sync_stats WHERE bucket < ?", (bucket - STATS_RETENTION_S,))

    def backlog(self) -> tuple[int, float | None, int]:
        """(pending entries, age of the oldest in seconds, open sync errors)."""
        pending, oldest = self.conn.execute(
            "SELECT count(*), min(enqueued_at) FROM outbox"
        ).fetchone()
        (open_errors,) = self.conn.execute(
            "SELECT count(*) FROM sync_errors WHERE resolved_at IS NULL"
        ).fetchone()
        age = None if oldest is None else max(0.0, round(time.time() - oldest, 3))
        return pending, age, open_errors

    def enqueue(self, entries: Sequence[tuple[Any, str]]) -> None:
        """Add (sequence_id, op) markers to the outbox, as the triggers would."""
        with self.write() as conn:
            conn.executemany("INSERT INTO outbox (sequence_id, op) VALUES (?, ?)", entries)

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute(
            "SELECT value FROM outbox_sync_meta WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str | None) -> None:
        """Set (or, with None, remove) one key of outbox_sync_meta."""
        with self.write() as conn:
            if value is None:
                conn.execute("DELETE FROM outbox_sync_meta WHERE key = ?", (key,))
            else:
                conn.execute(
                    "INSERT OR REPLACE INTO outbox_sync_meta (key, value) VALUES (?, ?)",
                    (key, value),
                )

    def data_version(self) -> int:
        """Changes whenever another connection commits (cheap: poll it to wake up)."""
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    # -- reading for people ---------------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        pending, oldest_age, open_errors = self.backlog()
        (rows,) = self.conn.execute("SELECT count(*) FROM sequences").fetchone()
        return {
            "pending": pending,
            "oldest_pending_age_s": oldest_age,
            "sync_errors_open": open_errors,
            "rows": rows,
        }

    def list_errors(self, *, include_resolved: bool = False) -> list[dict[str, Any]]:
        where = "" if include_resolved else " WHERE resolved_at IS NULL"
        cursor = self.conn.execute(
            "SELECT id, outbox_id, sequence_id, op, document, http_status, error, attempts,"
            f" failed_at, resolved_at, resolution, note FROM sync_errors{where} ORDER BY id"
        )
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]

    # -- on-call: reviewing and closing sync errors, audit reads, report reads ------------------

    def find_errors(
        self, *, status: str = "open", since: str | None = None, op: str | None = None
    ) -> list[dict[str, Any]]:
        """Rows of `sync_errors`, oldest first. status: 'open', 'resolved' or 'all'; since: an
        ISO time (as in failed_at) the failure happened at or after; op: 'upsert' or 'delete'."""
        conditions, params = [], []
        if status == "open":
            conditions.append("resolved_at IS NULL")
        elif status == "resolved":
            conditions.append("resolved_at IS NOT NULL")
        elif status != "all":
            raise ValueError(f"status must be open, resolved or all, not {status!r}")
        if since is not None:
            conditions.append("failed_at >= ?")
            params.append(since)
        if op is not None:
            conditions.append("op = ?")
            params.append(op)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        cursor = self.conn.execute(
            f"SELECT {ERROR_COLUMNS} FROM sync_errors{where} ORDER BY id", params
        )
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]

    def get_error(self, error_id: int) -> dict[str, Any]:
        """One row of `sync_errors`, with what the record looks like now: `record_exists` (a row
        of `sequences` has its id) and `pending` (outbox entries waiting for it)."""
        cursor = self.conn.execute(
            f"SELECT {ERROR_COLUMNS} FROM sync_errors WHERE id = ?", (error_id,)
        )
        row = cursor.fetchone()
        if row is None:
            raise UnknownSyncError(error_id)
        names = [column[0] for column in cursor.description]
        error = dict(zip(names, row, strict=True))
        key = error["sequence_id"]
        error["record_exists"] = (
            self.conn.execute("SELECT 1 FROM sequences WHERE id IS ? LIMIT 1", (key,)).fetchone()
            is not None
        )
        (error["pending"],) = self.conn.execute(
            "SELECT count(*) FROM outbox WHERE sequence_id IS ?", (key,)
        ).fetchone()
        return error

    def retry_errors(self, error_ids: Sequence[int] | None = None) -> list["Retry"]:
        """Send the records of these open errors (every open one with None) through the outbox
        again: one entry per record, 'upsert' if its row exists, else 'delete'. Every open error
        of those records closes as 'retried' (a new failure writes a new row). Unknown or closed
        ids raise UnknownSyncError or ClosedSyncError, and nothing changes."""
        now = utc_now()
        retries = []
        with self.write() as conn:
            if error_ids is None:
                selected = conn.execute(
                    "SELECT id, sequence_id FROM sync_errors WHERE resolved_at IS NULL ORDER BY id"
                ).fetchall()
            else:
                selected = [(id, key) for id, key, _ in self._open_errors(conn, error_ids)]
            keys: dict[Any, None] = dict.fromkeys(key for _, key in selected)
            for key in keys:
                exists = conn.execute(
                    "SELECT 1 FROM sequences WHERE id IS ? LIMIT 1", (key,)
                ).fetchone()
                op = "upsert" if exists else "delete"
                outbox_id = conn.execute(
                    "INSERT INTO outbox (sequence_id, op) VALUES (?, ?)", (key, op)
                ).lastrowid
                assert outbox_id is not None  # an INSERT always sets it
                closed = [
                    id
                    for (id,) in conn.execute(
                        "SELECT id FROM sync_errors WHERE resolved_at IS NULL AND sequence_id IS ?"
                        " ORDER BY id",
                        (key,),
                    )
                ]
                conn.execute(
                    "UPDATE sync_errors SET resolved_at = ?, resolution = 'retried', note = ?"
                    " WHERE resolved_at IS NULL AND sequence_id IS ?",
                    (now, f"re-enqueued as outbox entry {outbox_id} ({op})", key),
                )
                retries.append(Retry(key, op, outbox_id, tuple(closed)))
        return retries

    def resolve_errors(self, error_ids: Sequence[int], note: str) -> None:
        """Close these open errors by hand (resolution 'resolved'), keeping the note. Unknown or
        closed ids raise UnknownSyncError or ClosedSyncError, and nothing changes."""
        now = utc_now()
        with self.write() as conn:
            self._open_errors(conn, error_ids)
            conn.executemany(
                "UPDATE sync_errors SET resolved_at = ?, resolution = 'resolved', note = ?"
                " WHERE id = ?",
                [(now, note, error_id) for error_id in error_ids],
            )

    @staticmethod
    def _open_errors(
        conn: sqlite3.Connection, error_ids: Sequence[int]
    ) -> list[tuple[int, Any, str | None]]:
        """(id, sequence_id, resolution) of these errors; raise unless every one is open."""
        found = {
            row[0]: row
            for row in conn.execute(
                "SELECT id, sequence_id, resolution FROM sync_errors"
                " WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(list(error_ids)),),
            )
        }
        for error_id in error_ids:
            if error_id not in found:
                raise UnknownSyncError(error_id)
            if found[error_id][2] is not None:
                raise ClosedSyncError(error_id, found[error_id][2])
        return [found[error_id] for error_id in dict.fromkeys(error_ids)]

    def scan_sequences(self, chunk: int) -> Iterator[list[tuple[Any, ...]]]:
        """Every row of `sequences` (COLUMNS, text as bytes), `chunk` rows per short read, in
        rowid order: unlike paging by id, this visits a loose legacy table's NULL and duplicate
        ids too. No read transaction is held between chunks."""
        select = f"SELECT rowid, {', '.join(COLUMNS)} FROM sequences"
        rows = self._fetch_raw(f"{select} ORDER BY rowid LIMIT ?", (chunk,))
        while rows:
            yield [row[1:] for row in rows]
            rows = self._fetch_raw(
                f"{select} WHERE rowid > ? ORDER BY rowid LIMIT ?", (rows[-1][0], chunk)
            )

    def scan_outbox_keys(self, chunk: int) -> Iterator[list[Any]]:
        """The sequence_id of every waiting outbox entry, `chunk` per short read."""
        yield from self._scan_keys(
            "SELECT id, sequence_id FROM outbox WHERE id > ? ORDER BY id LIMIT ?", chunk
        )

    def scan_open_error_keys(self, chunk: int) -> Iterator[list[Any]]:
        """The sequence_id of every open sync error, `chunk` per short read."""
        yield from self._scan_keys(
            "SELECT id, sequence_id FROM sync_errors WHERE resolved_at IS NULL AND id > ?"
            " ORDER BY id LIMIT ?",
            chunk,
        )

    def _scan_keys(self, sql: str, chunk: int) -> Iterator[list[Any]]:
        last = 0
        while rows := self.conn.execute(sql, (last, chunk)).fetchall():
            last = rows[-1][0]
            yield [key for _, key in rows]

    def scan_stats(self, since_bucket: int) -> Iterator[dict[str, Any]]:
        """The per-minute statistics from `since_bucket` (Unix time of a minute) on."""
        last = since_bucket - 1
        while rows := self.conn.execute(
            "SELECT bucket, data FROM sync_stats WHERE bucket > ? ORDER BY bucket LIMIT 1000",
            (last,),
        ).fetchall():
            last = rows[-1][0]
            for _, data in rows:
                yield json.loads(data)

    def scan_failures_since(self, since: str) -> Iterator[tuple[int | None, str]]:
        """(http_status, error) of every sync error that failed at or after `since` (ISO)."""
        last = 0
        while rows := self.conn.execute(
            "SELECT id, http_status, error FROM sync_errors WHERE failed_at >= ? AND id > ?"
            " ORDER BY id LIMIT 1000",
            (since, last),
        ).fetchall():
            last = rows[-1][0]
            for _, http_status, error in rows:
                yield http_status, error

    def closed_since(self, since: str) -> dict[str, int]:
        """How many sync errors closed at or after `since` (ISO), by resolution."""
        return dict(
            self.conn.execute(
                "SELECT resolution, count(*) FROM sync_errors WHERE resolved_at >= ?"
                " GROUP BY resolution ORDER BY resolution",
                (since,),
            ).fetchall()
        )


# The columns of `sync_errors`, in the order people read them.
ERROR_COLUMNS = (
    "id, outbox_id, sequence_id, op, document, http_status, error, attempts, failed_at,"
    " resolved_at, resolution, note"
)


class UnknownSyncError(OutboxSyncError):
    """No row of `sync_errors` has this id."""

    def __init__(self, error_id: int) -> None:
        super().__init__(
            f"no sync error has id {error_id}: `outbox-sync errors list --status all` lists them"
        )


class ClosedSyncError(OutboxSyncError):
    """The sync error was closed already: retrying or resolving it again would hide history."""

    def __init__(self, error_id: int, resolution: str) -> None:
        super().__init__(
            f"sync error {error_id} is already closed ({resolution}): see `outbox-sync errors "
            f"show {error_id}`; to sync its record again, run `outbox-sync audit --repair`"
        )


@dataclass(frozen=True)
class Retry:
    """One record sent through the outbox again by `retry_errors`."""

    sequence_id: Any
    op: str
    outbox_id: int
    closed_error_ids: tuple[int, ...]


class DaemonLock:
    """An exclusive flock on a file beside the database. The kernel drops it when the process
    dies, so a crashed daemon never leaves a stale lock."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".outbox-sync.lock")
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        try:
            handle = open(self.path, "a+")  # noqa: SIM115 - held for the daemon's lifetime
        except OSError as error:
            raise DatabaseError(
                f"cannot create the daemon's lock file {self.path}: {error.strerror}"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise AlreadyRunningError(
                f"another outbox-sync daemon (pid {holder}) is already running on this database "
                f"(lock {self.path}); stop it first, only one may work a file at a time"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "DaemonLock":
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
