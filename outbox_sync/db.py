"""The SQLite side: one connection, short write transactions, the outbox queue, and reads in pages.

Every write is a short BEGIN IMMEDIATE transaction and no transaction is ever held across
network I/O: other applications write to this file at the same time.
"""

import json
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple

from outbox_sync.errors import (
    DatabaseBusyError,
    DatabaseDamagedError,
    DatabaseError,
    DatabaseFullError,
    OwnTableMissingError,
    TableMissingError,
)
from outbox_sync.mapping import Found, Mapping
from outbox_sync.values import RawText, quote_identifier

# outbox-sync's own tables (schema.sql), beside the application's.
TABLES = ("outbox", "sync_errors", "sync_stats", "outbox_sync_meta")
# How long a statement waits for another connection's lock before giving up (and retrying
# later: a busy database never loses an entry).
DEFAULT_BUSY_TIMEOUT_S = 30.0
# Retry delays of our own lock wait (see Database.wait_for_lock).
WRITE_RETRY_MIN_S = 0.0002
WRITE_RETRY_MAX_S = 0.002
# Once the daemon is stopping, how much longer a wait for the lock goes on: room for a lock held
# a moment (an application's commit), far within systemd's TimeoutStopSec even for the few
# writes a stop makes one after the other.
STOPPING_WAIT_S = 0.5
# While a wait for the lock lasts, `Database.on_wait` is called this often (the daemon's
# heartbeat: a wait is bounded, but as long as the busy timeout).
WAIT_BEAT_INTERVAL_S = 1.0
# Rows per read when paging through a table: a few MB at most, each read a short transaction.
DEFAULT_PAGE_ROWS = 5000
# A read of documents' lines (a drain's claim; a page of a fill, a reindex or an audit) takes
# FIRST_READ_ROWS rows, then as many as make about READ_MAX_BYTES at the last read's size per
# row (`rows_fitting`), up to its own limit. Rows of 60 KB, 5,000 to a batch, peaked a drain at
# 1.43 GB of memory (the batches prepared and in flight, each request's copies of its body).
FIRST_READ_ROWS = 100
READ_MAX_BYTES = 16 * 1024 * 1024
# A drain's read of claimed rows fetches them this many at a time and stops once their lines
# pass its bytes (`Database.read_claimed`): sized by the last read's rows, a read of 5,000
# entries whose rows had grown to 60 KB held 301 MB (found by a hostile review).
READ_CHUNK_ROWS = 100


# An outbox entry as `Database.read_claimed` reads it with its record's row: (id, whether it is
# a delete, the key, the row's JSON line: None for no row, b"" for one SQLite leaves to Python).
Claimed = tuple[int, int, Any, bytes | None]


class OutboxEntry(NamedTuple):
    """One outbox entry whose record the drain cannot simply upsert: gone, judged by the Python
    mapper, or failing (the rest stay `Claimed` tuples)."""

    id: int
    mapping: str
    key: Any
    op: str


@dataclass(frozen=True, kw_only=True)
class SyncFailure:
    """A record given up on: one future row of `sync_errors`."""

    outbox_id: int
    mapping: str
    key: Any
    op: str
    document: str | None
    http_status: int | None
    error: str
    attempts: int


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fill_key(mapping: str) -> str:
    """The outbox_sync_meta key by which `init` asks the daemon to fill a new mapping's
    collection straight from its table (reindex.serve_fills); its value is when it asked."""
    return f"fill_requested:{mapping}"


def count_rows(conn: sqlite3.Connection, mapping: Mapping) -> int:
    """Rows the mapping covers."""
    where = f" WHERE {mapping.where}" if mapping.where else ""
    (rows,) = conn.execute(
        f"SELECT count(*) FROM {quote_identifier(mapping.table)}{where}"
    ).fetchone()
    return int(rows)


def enqueue_rows(conn: sqlite3.Connection, mapping: Mapping) -> int:
    """Queue an upsert of every row the mapping covers, in key order, as the triggers would
    one by one (inside the caller's write transaction), in the place of a fill asked for; how
    many."""
    key = quote_identifier(mapping.key)
    where = f" WHERE {mapping.where}" if mapping.where else ""
    conn.execute("DELETE FROM outbox_sync_meta WHERE key = ?", (fill_key(mapping.name),))
    return conn.execute(
        f"INSERT INTO outbox (mapping, record_key, op) SELECT ?, {key}, 'upsert'"
        f" FROM {quote_identifier(mapping.table)}{where} ORDER BY {key}",
        (mapping.name,),
    ).rowcount


class Connection(sqlite3.Connection):
    """sqlite3's connection, but a statement outside a transaction that finds another
    connection's lock waits for it in Python (`wait_for_lock`), where the wait can keep the
    loop's heartbeat and end when the daemon stops. SQLite's busy handler (the connection has
    none) waited without a word: a read in a rollback journal, which an application's
    exclusive lock holds up too, for up to the whole busy timeout."""

    wait_for_lock: Callable[[Callable[[], sqlite3.Cursor]], sqlite3.Cursor]

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.OperationalError as error:
            # Inside a transaction only a COMMIT is tried again: refused (in a rollback journal,
            # for the application's readers), it leaves the transaction open for that ("the
            # COMMIT can be retried later after the reader has had a chance to clear", SQLite's
            # documentation of transactions); another statement refused there may not be, but
            # rolled back. In WAL nothing inside waits.
            if (self.in_transaction and sql != "COMMIT") or not is_busy(error):
                raise
        return self.wait_for_lock(lambda: sqlite3.Connection.execute(self, sql, parameters))


# `Database.backlog` counts the open sync errors again only once the file changed, and no more
# often than keeps that count to this share of the time: it walks every open error, and 300,000
# of them, counted every second, took an idle daemon from 0.15 % to 4.5 % of a core.
OPEN_ERRORS_COUNT_SHARE = 0.01
# A count quicker than this is never held back (0.1 % of a core, once a second).
OPEN_ERRORS_COUNT_FREE_S = 0.001


@dataclass(frozen=True)
class _Backlog:
    """`Database.backlog`'s figures, as last read."""

    changed: tuple[int, int] | None = None  # (data_version, total_changes) when they were read
    pending: int = 0
    oldest: float | None = None  # the first entry's enqueued_at
    open_errors: int = 0
    errors_changed: tuple[int, int] | None = None  # the same, when the errors were counted
    errors_due: float = float("-inf")  # monotonic: no count of the open errors before


class Database:
    """One connection to the database file, in autocommit mode."""

    def __init__(
        self,
        path: Path,
        *,
        create: bool = False,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self._backlogs: dict[tuple[str, ...] | None, _Backlog] = {}  # `backlog`'s, last read
        self._aside = 0  # own row changes made `aside`: not a change of the backlog
        # Called as a statement starts waiting for another connection's lock, and then every
        # WAIT_BEAT_INTERVAL_S (the daemon keeps its loop's heartbeat there: each wait is bounded,
        # but one turn may wait several times).
        self.on_wait: Callable[[], None] = lambda: None
        # Whether the daemon is stopping: a wait for the lock then ends within STOPPING_WAIT_S,
        # as one that timed out (systemd's TimeoutStopSec would not wait for a few of 30 s).
        # Given here, it ends the first read's wait too, as the connection opens.
        self.stopping = stopping
        if not path.parent.is_dir():
            raise DatabaseError(
                f"directory {path.parent} does not exist: create it, or give another --db"
            )
        if path.is_dir():
            raise DatabaseError(
                f"{path} is a directory: give --db the database file's path, such as "
                f"{path / 'sequences.db'}"
            )
        if not create and not path.exists():
            raise DatabaseError(
                f"database {path} does not exist: create it with `outbox-sync init --db {path}`"
            )
        try:
            # no busy handler: a statement waits in Connection.execute, a COMMIT too.
            # A handler set after each BEGIN and taken away before the COMMIT is two statements
            # more while the daemon holds the application's lock: the application's commits
            # found it taken 8.3 times in ~3,000 against 5.3 with one such statement, and 5.2
            # with none (tests.bench `--only lock`, nine runs each)
            self.conn = sqlite3.connect(
                path, timeout=0, isolation_level=None, check_same_thread=False, factory=Connection
            )
            self.conn.wait_for_lock = self.wait_for_lock
            self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as error:
            raise DatabaseError(f"cannot open database {path}: {error}") from None
        self.identity = file_identity(path)

    def check_same_file(self) -> None:
        """Raise when the path no longer names the file this connection opened: renamed,
        replaced (a backup moved into place) or deleted. The connection would go on reading
        the old file, which the application no longer writes, and look healthy."""
        now = file_identity(self.path)
        if now != self.identity:
            what = "is gone (or out of reach)" if now is None else "names another file now"
            raise DatabaseError(
                f"database {self.path} {what}: it was renamed, replaced or deleted while the "
                "daemon had it open, and the daemon stops rather than sync a file nobody "
                "writes; start it again to sync the file there now (and stop the daemon "
                "before moving a database: SQLite calls renaming a file in use unsafe)"
            )

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction. BEGIN IMMEDIATE waits for the lock up front (a deferred
        transaction upgrading to a writer would fail at once, ignoring the busy timeout); in a
        rollback journal the COMMIT waits for the application's readers to finish.
        Nothing else in it waits: in WAL nothing can, and in a rollback journal a page cache
        spilled to the file mid-transaction needs the readers gone too, but SQLite keeps the
        pages in memory instead when it cannot have the lock at once (its busy handler, had the
        connection one, would wait there up to the busy timeout)."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")  # its wait: Connection.execute
        except sqlite3.OperationalError as error:
            raise self.explain(error) from None
        try:
            yield self.conn
            self.conn.execute("COMMIT")  # its wait too: Connection.execute
        except BaseException as error:
            if self.conn.in_transaction:  # some errors end the transaction themselves
                self.conn.execute("ROLLBACK")
            # A read-only file may still let BEGIN IMMEDIATE through: the first write says so.
            if isinstance(error, sqlite3.OperationalError):
                raise self.explain(error) from None
            raise

    @contextmanager
    def aside(self) -> Iterator[None]:
        """Own writes inside change nothing `backlog` reads (the statistics, the last audit's
        record): they are no reason to count the outbox and the open errors again."""
        before = self.conn.total_changes
        try:
            yield
        finally:
            self._aside += self.conn.total_changes - before

    @contextmanager
    def without_fsync(self) -> Iterator[None]:
        """Commits inside do not wait for the disk, in WAL mode (synchronous=NORMAL): ~0.03 ms
        instead of ~1 ms median and ~10 ms p99 with FULL (measured here), time during which
        the application cannot write. A power cut may take the last such transactions back,
        never corrupt the file. In a rollback journal it could, so there nothing changes."""
        if self.conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            yield
            return
        (level,) = self.conn.execute("PRAGMA synchronous").fetchone()
        self.conn.execute("PRAGMA synchronous = NORMAL")
        try:
            yield
        finally:
            self.conn.execute(f"PRAGMA synchronous = {int(level)}")

    def wait_for_lock(self, attempt: Callable[[], sqlite3.Cursor]) -> sqlite3.Cursor:
        """Try again a statement another connection's lock refused, every few hundred
        microseconds up to the busy timeout (then SQLite's "database is locked" error), with
        `on_wait` as the wait begins and every second, and at most STOPPING_WAIT_S more once
        the daemon is `stopping`. SQLite's own busy handler sleeps 1, 2, 5 ... 100 ms between
        tries: under an application committing thousands of times a second that stalled an
        acknowledgement for up to 80 ms (measured by tests/bench), while the lock was free
        again within a millisecond."""
        now = time.monotonic()
        deadline, beat_at = now + self.busy_timeout_s, now + WAIT_BEAT_INTERVAL_S
        delay = WRITE_RETRY_MIN_S
        stopping = False
        self.on_wait()
        while True:
            time.sleep(delay)
            delay = min(delay * 2, WRITE_RETRY_MAX_S)
            try:
                return attempt()
            except sqlite3.OperationalError as error:
                if not is_busy(error):
                    raise
                now = time.monotonic()
                if not stopping and self.stopping():  # a moment more, not the busy timeout
                    stopping = True
                    deadline = min(deadline, now + STOPPING_WAIT_S)
                if now >= deadline:
                    raise
            if now >= beat_at:
                self.on_wait()
                beat_at = now + WAIT_BEAT_INTERVAL_S

    def explain(self, error: sqlite3.OperationalError) -> DatabaseError:
        """What SQLite's error means for this file: a lock held past the busy timeout, one of
        our tables dropped, no room left (all retryable), or something else a write ran into."""
        if is_busy(error):
            return DatabaseBusyError(f"database {self.path} stayed locked: {error}")
        if (table := own_table_missing(error)) is not None:
            return OwnTableMissingError(
                f"outbox-sync's table {table} is gone from {self.path}, dropped under the "
                "daemon: it makes it again"
            )
        if is_full(error):
            return DatabaseFullError(
                f"cannot write to database {self.path}: {error}. Free space on its file system "
                "(or in TMPDIR, where SQLite sorts)"
            )
        return DatabaseError(f"cannot write to database {self.path}: {error}")

    def check_writable(self) -> None:
        """Raise DatabaseError unless this connection may write: a daemon on a read-only file
        would otherwise only fail at its first acknowledgement."""
        with self.write() as conn:
            conn.execute("DELETE FROM outbox_sync_meta WHERE key = 'write_probe'")

    # -- reading --------------------------------------------------------------------------------

    def fetch_raw(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Fetch with TEXT as RawText (bytes), so invalid UTF-8 becomes a record error, not a
        crash, and a BLOB is told apart from text."""
        return fetch(self.conn, sql, params, raw=True)

    # -- the queue ------------------------------------------------------------------------------

    def claim(self, limit: int, after: int = 0) -> list[tuple[str, int, int, int]]:
        """What the oldest `limit` outbox entries with an id above `after` hold, per mapping:
        (mapping, how many, the highest id, the lowest). `read_claimed` reads them."""
        return self.conn.execute(
            "SELECT mapping, count(*), max(id), min(id)"
            " FROM (SELECT id, mapping FROM outbox WHERE id > ? ORDER BY id LIMIT ?)"
            " GROUP BY mapping",
            (after, limit),
        ).fetchall()

    def read_claimed(
        self, mapping: Mapping, after: int, last: int, max_bytes: float = math.inf
    ) -> tuple[list[Claimed], int]:
        """The outbox entries of `mapping` with an id in (after, last], in id order, each with
        its record's row as SQLite writes it: (id, is a delete, key, line), and the bytes of
        their lines; it stops at the end of the chunk (READ_CHUNK_ROWS rows) whose lines pass
        `max_bytes`, the entries after it unread. The line is None when the mapping covers no
        row of that key, empty when SQLite leaves the row to the Python mapper
        (`Mapping.select_claimed`: one statement, SQLite's work); such a row counts as the
        bytes of its values (`_raw_size`). A text key is read as bytes
        (text that is not UTF-8 must not fail the read) and decoded here; one that is not UTF-8
        stays RawText, a key no document can have (decoded with replacement characters, it
        could name another record's)."""
        rows: list[tuple[Any, ...]] = []
        size = 0
        self.conn.text_factory = RawText
        try:
            # closed when it stops early: an unfinished statement holds its read snapshot
            with closing(
                self.conn.execute(mapping.select_claimed, (after, last, mapping.name))
            ) as cursor:
                while chunk := cursor.fetchmany(READ_CHUNK_ROWS):
                    rows += chunk
                    lines = list(map(itemgetter(3), chunk))
                    size += sum(map(len, filter(None, lines)))
                    if b"" in lines:  # rows left to the Python mapper: their values' bytes
                        size += self._raw_size(mapping, chunk)
                    if size >= max_bytes:
                        break
        except sqlite3.OperationalError as error:
            raise self._read_error(mapping, error) from None
        finally:
            self.conn.text_factory = str
        return [  # each key as `row_key` makes it, inlined: a call per row of every drain
            (id, deleted, _text(key) if type(key) is RawText else key, line)
            for id, deleted, key, line in rows
        ], size

    def _raw_size(self, mapping: Mapping, chunk: list[tuple[Any, ...]]) -> int:
        """The bytes of the rows of a read's chunk that SQLite left to the Python mapper (read
        as empty lines): counted as none, a read of 5,000 such rows after small ones was taken
        whole, whatever their size (found by a hostile review)."""
        keys = [
            _text(key) if type(key) is RawText else key for *_, key, line in chunk if line == b""
        ]
        # a key that is not UTF-8 names no document: not the mapper's (`Applier._prepare`)
        empty = [key for key in keys if type(key) is not RawText]
        (size,) = self.conn.execute(mapping.select_raw_size, (keys_json(empty),)).fetchone()
        return int(size)

    def count_entries(self, after: int, last: int) -> int:
        """How many outbox entries have an id in (after, last]."""
        (count,) = self.conn.execute(
            "SELECT count(*) FROM outbox WHERE id > ? AND id <= ?", (after, last)
        ).fetchone()
        return int(count)

    def claimed_entries(
        self, mapping: Mapping, after: int, last: int
    ) -> list[tuple[int, int, Any]]:
        """The outbox entries of `mapping` with an id in (after, last], without their rows:
        (id, is a delete, key), the key as `read_claimed` gives it, the row's own: a
        dependency's text '5' of an INTEGER key 5 is 5 (`Mapping.select_claimed_keys`; under
        the entry's '5', an error never closed: found by a review). Once each, where several
        rows hold the key (a loose key column)."""
        rows = self.fetch_raw(mapping.select_claimed_keys, (after, last, mapping.name))
        return list({id: (id, deleted, row_key(key)) for id, deleted, key in rows}.values())

    def read_rows(self, mapping: Mapping, keys: Sequence[Any]) -> list[Found]:
        """The rows these keys name that the mapping covers (absent ones are gone, or outside
        `where`): SQLite's JSON line of each valid row, and the raw values of each row it
        leaves to the Python mapper, read again (one gone meanwhile is left out)."""
        try:
            lines = self.fetch_raw(
                mapping.select_by_keys(f"{quote_identifier(mapping.key)}, {mapping.line_sql()}"),
                (keys_json(keys),),
            )
            found: list[Found] = []
            rest = []
            for key, line in lines:
                if written(line):
                    found.append((key, line, ()))
                else:
                    rest.append(_bindable(key))
            if rest:
                rows = self.fetch_raw(mapping.select_by_keys(mapping.columns()), (keys_json(rest),))
                found += [(row[0], None, row) for row in rows]
            return found
        except sqlite3.OperationalError as error:
            raise self._read_error(mapping, error) from None

    def covers(self, mapping: Mapping, key: Any) -> bool:
        """Whether the mapping covers a row of this key's record (`covers`, `record_keys`)."""
        try:
            return any(covers(self.conn, mapping, form) for form in record_keys(key))
        except sqlite3.OperationalError as error:
            raise self._read_error(mapping, error) from None

    def _read_error(self, mapping: Mapping, error: sqlite3.OperationalError) -> Exception:
        """What a failed read of a mapping's table means: the table is gone, changed, or busy."""
        if "no such table" in str(error):
            return TableMissingError(mapping.table, self.path)
        if "no such column" in str(error):
            return DatabaseError(
                f"table {mapping.table} in {self.path} changed under the daemon ({error}): "
                f"{mapping.origin} reads {mapping.columns()}"
            )
        return error

    def ack(
        self,
        last_id: int,
        synced: Sequence[tuple[str, Any]],
        failures: Sequence[SyncFailure],
    ) -> None:
        """Remove claimed entries up to last_id, record failures, close errors a later sync
        superseded (`synced`: (mapping, key) pairs). Entries enqueued after the claim have
        higher ids and stay queued. A record has at most one open error: the same failure again
        adds nothing (a no-op UPDATE of an invalid row), another one takes the place of the
        old."""
        self.ack_batches(last_id, [(synced, failures)])

    def ack_batches(
        self,
        last_id: int,
        batches: Sequence[tuple[Sequence[tuple[str, Any]], Sequence[SyncFailure]]],
    ) -> None:
        """`ack` of consecutive batches, (synced, failures) each, in one write transaction:
        each batch's errors in turn, as if acknowledged one by one. The commit does not wait
        for the disk (see `without_fsync`): an acknowledgement lost to a power cut only means
        its entries are applied again."""
        now = utc_now()
        with self.without_fsync(), self.write() as conn:
            conn.execute("DELETE FROM outbox WHERE id <= ?", (last_id,))
            open_errors = bool(
                conn.execute("SELECT 1 FROM sync_errors WHERE resolved_at IS NULL").fetchone()
            )
            for synced, failures in batches:
                if synced and open_errors:  # usually there are none: nothing to close
                    _supersede(conn, synced, now, keep=failures)
                if failures:
                    _record_failures(conn, failures, now)
                    open_errors = True

    def close_errors(self, records: Sequence[tuple[str, Any]]) -> None:
        """Close the open errors of these (mapping, key) records: they synced another way."""
        with self.write() as conn:
            _supersede(conn, records, utc_now(), keep=())

    def enqueue(self, mapping: str, entries: Sequence[tuple[Any, str]]) -> None:
        """Add (key, op) markers of a mapping to the outbox, in order, as the triggers would
        (`enqueue_statement`): a run of keys with one statement goes in one executemany."""
        statements = [enqueue_statement(mapping, key, op) for key, op in entries]
        with self.write() as conn:
            for sql, run in groupby(statements, key=itemgetter(0)):
                conn.executemany(sql, [params for _, params in run])

    def data_version(self) -> int:
        """Changes whenever another connection commits (cheap: poll it to wake up)."""
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def wal_uncheckpointed_bytes(self) -> int:
        """The WAL's bytes a checkpoint cannot copy back into the database (0 when the file is
        not in WAL mode). It runs a PASSIVE checkpoint, which waits for no one and copies what
        it can, as a commit's automatic one would: what is left is held by a reader's
        snapshot (a transaction left open, a long query, a backup), and the -wal file grows
        with every write until that reader ends (0.3 ms a call, with frames to copy)."""
        _, frames, copied = self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if frames <= 0:
            return 0
        (page_size,) = self.conn.execute("PRAGMA page_size").fetchone()
        return int((frames - copied) * page_size)

    def schema_version(self) -> int:
        """Changes whenever any connection changes the schema (a few microseconds to ask)."""
        return int(self.conn.execute("PRAGMA schema_version").fetchone()[0])

    # -- the daemon's own state -----------------------------------------------------------------

    def fill_asked(self, mapping: str) -> bool:
        """Whether `init` asked the daemon to fill this mapping's collection from its table."""
        return self.get_meta(fill_key(mapping)) is not None

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

    # -- figures --------------------------------------------------------------------------------

    def backlog(self, mappings: Sequence[str] | None = None) -> tuple[int, float | None, int]:
        """(pending entries, age of the oldest in seconds, open sync errors), of the mappings
        named or of all. The oldest is the first in line, the lowest id: found in the primary
        key, where min(enqueued_at) read every entry (175 ms with a million waiting, every
        second while the daemon drained them).

        The daemon asks every second. The figures are read again only once the file has
        changed (`PRAGMA data_version`: another connection committed; `total_changes`: this
        one wrote, but for its writes `aside`), and the open errors, whose count walks each
        of them, no more often than keeps that count to OPEN_ERRORS_COUNT_SHARE of the time
        (OPEN_ERRORS_COUNT_FREE_S)."""
        names = tuple(mappings or ())
        chosen = "" if mappings is None else f"mapping IN ({', '.join('?' * len(names))})"
        changed = (self.data_version(), self.conn.total_changes - self._aside)
        now = time.monotonic()
        key = None if mappings is None else names
        seen = self._backlogs.get(key) or _Backlog()
        if seen.changed != changed:
            outbox = f"outbox WHERE {chosen}" if chosen else "outbox"  # a WHERE slows count(*)
            (pending,) = self.conn.execute(f"SELECT count(*) FROM {outbox}", names).fetchone()
            first = self.conn.execute(
                f"SELECT enqueued_at FROM {outbox} ORDER BY id LIMIT 1", names
            ).fetchone()
            seen = replace(
                seen, changed=changed, pending=pending, oldest=None if first is None else first[0]
            )
        if seen.errors_changed != changed and now >= seen.errors_due:
            started = time.thread_time()
            (open_errors,) = self.conn.execute(
                "SELECT count(*) FROM sync_errors WHERE resolved_at IS NULL"
                + (f" AND {chosen}" if chosen else ""),
                names,
            ).fetchone()
            took = time.thread_time() - started
            due = now + took / OPEN_ERRORS_COUNT_SHARE if took > OPEN_ERRORS_COUNT_FREE_S else now
            seen = replace(seen, open_errors=open_errors, errors_changed=changed, errors_due=due)
        self._backlogs[key] = seen
        age = None if seen.oldest is None else max(0.0, round(time.time() - seen.oldest, 3))
        return seen.pending, age, seen.open_errors

    def count_rows(self, mapping: Mapping) -> int | None:
        """Rows the mapping covers (None while its table is gone)."""
        try:
            return count_rows(self.conn, mapping)
        except sqlite3.OperationalError as error:
            if "no such table" not in str(error):
                raise
            return None

    def counts(self, mapping: Mapping) -> dict[str, Any]:
        """The backlog of one mapping, and the rows it covers."""
        pending, oldest_age, open_errors = self.backlog([mapping.name])
        return {
            "pending": pending,
            "oldest_pending_age_s": oldest_age,
            "sync_errors_open": open_errors,
            "rows": self.count_rows(mapping),
        }

    # -- pages of the tables audit and reindex walk ---------------------------------------------

    def scan_rows(
        self, mapping: Mapping, chunk: int = DEFAULT_PAGE_ROWS, *, sort_keys: bool = False
    ) -> Iterator[list[Found]]:
        """Every row the mapping covers, as `read_rows` gives them (SQLite's lines with their
        keys in order, with `sort_keys`), in rowid order: unlike paging by key, this visits a
        loose legacy table's NULL and duplicate keys too (a WITHOUT ROWID table, by its
        primary key). A row left to the mapper is read again by itself."""
        if not table_exists(self.conn, mapping.table):  # a migration took it away
            raise TableMissingError(mapping.table, self.path)
        order = page_key(self.conn, mapping.table)
        width = order.count(",") + 1
        table = quote_identifier(mapping.table)
        where = mapping.where or ""
        again, covered = (
            f"SELECT {mapping.columns()} FROM {table}",
            f" AND ({where})" if where else "",
        )
        columns = f"{quote_identifier(mapping.key)}, {mapping.line_sql(sort_keys=sort_keys)}"

        def fit(rows: list[tuple[Any, ...]]) -> int:  # each row's line is its last column
            return rows_fitting(len(rows), sum(len(row[-1] or b"") for row in rows), chunk)

        first = min(chunk, FIRST_READ_ROWS)
        for rows in pages(
            self.conn, table, order, columns, where=where, chunk=first, fit=fit, raw=True
        ):
            found: list[Found] = []
            for row in rows:
                key, line = row[width:]
                if written(line):
                    found.append((key, line, ()))
                else:  # read again for the mapper (gone meanwhile: left out)
                    marks, bound = _all_stored(row[:width])
                    by_key = f"{again} WHERE ({order}) = ({marks}){covered}"
                    for values in self.fetch_raw(by_key, bound):
                        found.append((values[0], None, values))
            yield found

    def scan_outbox_keys(self, mapping: str, chunk: int = DEFAULT_PAGE_ROWS) -> Iterator[list[Any]]:
        """The key of every waiting outbox entry of a mapping, as `row_key` makes it (text
        that is not UTF-8 must not fail the read: it stays RawText, as the rows' keys do)."""
        for rows in pages(
            self.conn,
            "outbox",
            "id",
            "record_key",
            where="mapping = ?",
            params=(mapping,),
            chunk=chunk,
            raw=True,
        ):
            yield [row_key(key) for _, key in rows]

    def scan_open_error_keys(
        self, mapping: str, chunk: int = DEFAULT_PAGE_ROWS
    ) -> Iterator[list[Any]]:
        """The key of every open sync error of a mapping, as `row_key` makes it."""
        where = "resolved_at IS NULL AND mapping = ?"
        for rows in pages(
            self.conn,
            "sync_errors",
            "id",
            "record_key",
            where=where,
            params=(mapping,),
            chunk=chunk,
            raw=True,
        ):
            yield [row_key(key) for _, key in rows]


def _supersede(
    conn: sqlite3.Connection,
    records: Sequence[tuple[str, Any]],
    now: str,
    keep: Sequence[SyncFailure],
) -> None:
    """Close the open errors of these (mapping, key) records as superseded, except one that
    says exactly what a failure in `keep` says (it stays open, as the record's one open
    error). The keys go through temporary tables, bound as they are: a key of any type (a
    BLOB too, which JSON cannot carry) finds the errors recorded under it."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS superseded (mapping, record_key)")
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS kept (mapping, record_key, op, error)")
    try:
        conn.executemany("INSERT INTO temp.superseded VALUES (?, ?)", records)
        conn.executemany(
            "INSERT INTO temp.kept VALUES (?, ?, ?, ?)",
            [(f.mapping, f.key, f.op, f.error) for f in keep],
        )
        conn.execute(
            "UPDATE sync_errors SET resolved_at = ?, resolution = 'superseded'"
            " WHERE resolved_at IS NULL"
            " AND ((mapping, record_key) IN (SELECT * FROM temp.superseded)"  # the index
            "      OR (record_key IS NULL AND mapping IN"  # IN never matches a NULL key
            "          (SELECT mapping FROM temp.superseded WHERE record_key IS NULL)))"
            " AND NOT EXISTS (SELECT 1 FROM temp.kept AS k WHERE k.mapping = sync_errors.mapping"
            "  AND k.record_key IS sync_errors.record_key AND k.op = sync_errors.op"
            "  AND k.error = sync_errors.error)",
            (now,),
        )
    finally:
        conn.execute("DELETE FROM temp.superseded")
        conn.execute("DELETE FROM temp.kept")


def _record_failures(conn: sqlite3.Connection, failures: Sequence[SyncFailure], now: str) -> None:
    """Each failure becomes its record's open error (see `Database.ack`)."""
    _supersede(conn, [(f.mapping, f.key) for f in failures], now, keep=failures)
    conn.executemany(
        "INSERT INTO sync_errors (outbox_id, mapping, record_key, op, document,"
        " http_status, error, attempts, failed_at) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?"
        " WHERE NOT EXISTS (SELECT 1 FROM sync_errors WHERE resolved_at IS NULL"
        " AND mapping = ? AND record_key IS ?)",
        [
            (
                f.outbox_id,
                f.mapping,
                f.key,
                f.op,
                f.document,
                f.http_status,
                f.error,
                f.attempts,
                now,
                f.mapping,
                f.key,
            )
            for f in failures
        ],
    )


def file_identity(path: Path) -> tuple[int, int] | None:
    """The file a path names (device, inode); None when it names none we can reach (a
    directory moved away, one we may no longer search)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def as_stored(value: Any) -> tuple[str, Any]:
    """The placeholder and the parameter that bind a value read raw so that it compares equal
    to the value its row stores: a RawText (TEXT that is not UTF-8) as the TEXT of its bytes.
    Bound as it is, it would be a BLOB, another key; decoded with replacement characters,
    another text, which sorts elsewhere (a page would skip the rows between) and names no
    row (a row read again would be lost)."""
    if type(value) is RawText:
        return "CAST(? AS TEXT)", bytes(value)
    return "?", value


def enqueue_statement(mapping: str, key: Any, op: str) -> tuple[str, tuple[str, Any, str]]:
    """The SQL and the parameters of one outbox entry, its key stored as the triggers write it
    (`as_stored`)."""
    mark, bound = as_stored(key)
    sql = f"INSERT INTO outbox (mapping, record_key, op) VALUES (?, {mark}, ?)"
    return sql, (mapping, bound, op)


def record_keys(key: Any) -> list[Any]:
    """The keys of one record: the key itself, and for bytes that are not UTF-8 both the BLOB
    and the TEXT of them (RawText). sync_errors holds such TEXT as a BLOB, so a table holding
    both has them as one record, whose error stays open while either row does."""
    if not isinstance(key, bytes):
        return [key]
    try:
        key.decode()
    except UnicodeDecodeError:
        return [bytes(key), RawText(key)]
    return [key]


def covers(conn: sqlite3.Connection, mapping: Mapping, key: Any) -> bool:
    """Whether the mapping covers a row of this key (its `where` included), matched with IS: a
    NULL key too (a loose table may hold many), a RawText one as the TEXT it was read from,
    and never another key the column's collation takes for it (`Mapping.select_claimed`)."""
    where = f" AND ({mapping.where})" if mapping.where else ""
    column, (value, bound) = quote_identifier(mapping.key), as_stored(key)
    row = conn.execute(
        f"SELECT 1 FROM {quote_identifier(mapping.table)}"
        f" WHERE {column} IS {value} AND {column} IS {value} COLLATE BINARY{where} LIMIT 1",
        (bound, bound),
    ).fetchone()
    return row is not None


def table_exists(conn: sqlite3.Connection, table: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    return row is not None


def page_key(conn: sqlite3.Connection, table: str) -> str:
    """What to page `table` by: its rowid, under a name no column hides (rowid, _rowid_, oid:
    an application may have a column called rowid), or the primary key of a WITHOUT ROWID
    table."""
    name = quote_identifier(table)
    columns = {row[1].lower() for row in conn.execute(f"PRAGMA table_xinfo({name})")}
    for alias in ("rowid", "_rowid_", "oid"):
        if alias in columns:
            continue
        try:
            conn.execute(f"SELECT {alias} FROM {name} LIMIT 0").fetchall()
            return alias
        except sqlite3.OperationalError:
            break  # WITHOUT ROWID: no alias of the rowid exists
    key = [row for row in conn.execute(f"PRAGMA table_info({name})") if row[5]]
    if not key:
        raise DatabaseError(
            f"table {table} has no primary key and every name of its rowid is a column: "
            "outbox-sync cannot read it in pages"
        )
    return ", ".join(quote_identifier(row[1]) for row in sorted(key, key=lambda row: row[5]))


def row_key(value: Any) -> Any:
    """A key as read raw, as the outbox and the audit's scratch file hold it: text decoded,
    text that is not UTF-8 left RawText (see `Database.read_claimed`), a BLOB as bytes."""
    return _text(value) if type(value) is RawText else value


def written(line: bytes | None) -> bool:
    """Whether SQLite wrote the line of a row: not NULL, and UTF-8 (SQLite passes text that is
    not UTF-8 through, which only the Python mapper can name)."""
    if line is None:
        return False
    if line.isascii():
        return True
    try:
        line.decode()
    except UnicodeDecodeError:
        return False
    return True


def rows_fitting(rows: int, size: int, most: int) -> int:
    """How many rows the next read takes, after one of `rows` rows with `size` bytes of lines:
    about READ_MAX_BYTES of them, at least 1 and at most `most`."""
    return max(1, min(most, rows * READ_MAX_BYTES // max(size, 1)))


def own_table_missing(error: sqlite3.Error) -> str | None:
    """Which of outbox-sync's own tables SQLite says is not there ("no such table: outbox"),
    or None."""
    match = re.fullmatch(r"no such table: (?:main\.)?(\w+)", str(error))
    return match[1] if match and match[1] in TABLES else None


def damaged(error: sqlite3.Error, path: object) -> DatabaseDamagedError | None:
    """What to do about a file SQLite found damaged ("database disk image is malformed"), as
    one line; None for any other error. Nothing outbox-sync can mend: the application's rows
    are in that file."""
    if not _coded(error, (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)):
        return None
    return DatabaseDamagedError(
        f"database {path} is damaged ({error}): stop the application and the daemon, look with "
        f"`sqlite3 {path} 'PRAGMA integrity_check'`, and restore the file from a backup (or "
        f"keep what `sqlite3 {path} .recover` reads), then `outbox-sync audit --repair` brings "
        "Typesense in line with it"
    )


def is_full(error: sqlite3.Error) -> bool:
    """SQLITE_FULL ("database or disk is full"): the file system holding the database, its
    journal or SQLite's temporary files has no room left (or the file is at its
    max_page_count)."""
    return _coded(error, (sqlite3.SQLITE_FULL,), ("database or disk is full",))


def is_row_error(error: sqlite3.Error) -> bool:
    """SQLITE_ERROR: the statement failed on what it read (an `sql` field's function on a row's
    value: "malformed JSON", "integer overflow"), not for want of the disk, the memory or the
    lock, which another try may not meet ("disk I/O error" is SQLITE_IOERR)."""
    return _coded(error, (sqlite3.SQLITE_ERROR,), ("malformed JSON", "integer overflow"))


def is_busy(error: sqlite3.Error) -> bool:
    """SQLITE_BUSY ("database is locked"): another connection holds the lock, and the statement
    may be tried again. Not SQLITE_LOCKED ("database table is locked", which the words matched
    until 2026-12-02): a conflict inside this connection or its shared cache, which no wait
    ends; it was tried again for the whole busy timeout."""
    # SQLITE_BUSY_RECOVERY, _SNAPSHOT and _TIMEOUT too: their primary code is SQLITE_BUSY
    return _coded(error, (sqlite3.SQLITE_BUSY,), ("database is locked", "database is busy"))


def _coded(error: sqlite3.Error, codes: tuple[int, ...], words: tuple[str, ...] = ()) -> bool:
    """Whether SQLite's primary result code for `error` is one of `codes`; for an error made
    by hand, which has none, whether its message starts with one of `words`."""
    code = getattr(error, "sqlite_errorcode", None)  # set on what SQLite raised (3.11+)
    if code is None:
        return str(error).startswith(words)
    return code & 0xFF in codes


def fetch(
    conn: sqlite3.Connection, sql: str, params: Sequence[Any] = (), *, raw: bool = False
) -> list[tuple[Any, ...]]:
    """All rows of one query; raw=True reads TEXT as bytes."""
    if not raw:
        return conn.execute(sql, params).fetchall()
    conn.text_factory = RawText
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.text_factory = str


def pages(
    conn: sqlite3.Connection,
    table: str,
    order_by: str,
    columns: str,
    *,
    where: str = "",
    params: Sequence[Any] = (),
    chunk: int = DEFAULT_PAGE_ROWS,
    fit: Callable[[list[tuple[Any, ...]]], int] | None = None,
    raw: bool = False,
) -> Iterator[list[tuple[Any, ...]]]:
    """The rows of `table` in `order_by` order (a unique, non-NULL column, or several, comma-
    separated), `chunk` per query (or, with `fit`, as many as it says after each page), each
    (*order_by values, *columns). No read transaction is held between pages, so a large table
    never holds back the application or the WAL checkpoint. raw=True reads TEXT as RawText."""
    width = order_by.count(",") + 1
    select = f"SELECT {order_by}, {columns} FROM {table}"
    rows = fetch(
        conn,
        f"{select}{' WHERE ' + where if where else ''} ORDER BY {order_by} LIMIT ?",
        (*params, chunk),
        raw=raw,
    )
    condition = f"({where}) AND " if where else ""
    while rows:
        yield rows
        if fit is not None:
            chunk = fit(rows)
        marks, last = _all_stored(rows[-1][:width])
        rows = fetch(
            conn,
            f"{select} WHERE {condition}({order_by}) > ({marks}) ORDER BY {order_by} LIMIT ?",
            (*params, *last, chunk),
            raw=raw,
        )


def _text(value: RawText) -> str | RawText:
    """The text of a TEXT value read raw, or the value itself when it is not UTF-8."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value


def _all_stored(values: Sequence[Any]) -> tuple[str, list[Any]]:
    """`as_stored` of several values: their placeholders, comma-separated, and parameters."""
    bound = [as_stored(value) for value in values]
    return ", ".join(mark for mark, _ in bound), [parameter for _, parameter in bound]


def keys_json(keys: Sequence[Any]) -> str:
    """Keys as the JSON array `select_by_keys` reads: an infinite REAL (a key column that is
    not the rowid may hold one) as 9e999, which SQLite reads back as it (json.dumps writes
    Infinity, which SQLite refuses: the whole read failed, and the daemon stopped)."""
    return f"[{','.join(map(_key_for_sqlite, keys))}]"


def _key_for_sqlite(key: Any) -> str:
    """One key as JSON that SQLite reads back as the same value, the key to look up (not
    what people are shown: `values.shown_key`)."""
    if type(key) is float and math.isinf(key):
        return "9e999" if key > 0 else "-9e999"
    return json.dumps(key)


def _bindable(value: Any) -> Any:
    """A value read raw, as it must be bound to compare equal to itself (a RawText bound as
    bytes would be a BLOB, which sorts after every TEXT)."""
    return value.decode("utf-8", "replace") if type(value) is RawText else value
