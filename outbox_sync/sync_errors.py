"""The on-call workflow over `sync_errors`: find, show, retry through the outbox, resolve by hand.

A row of `sync_errors` closes with a resolution: 'superseded' (a later sync of the record
succeeded: the daemon closes it), 'retried' (sent through the outbox again) or 'resolved' (closed
by hand, with a note). Nothing deletes one but `prune`, which an operator runs: closed rows older
than an age they choose.
"""

import json
import sqlite3
from collections.abc import Iterator, Sequence
from collections.abc import Mapping as Lookup
from dataclasses import dataclass
from typing import Any

from outbox_sync.db import (
    Database,
    as_stored,
    covers,
    enqueue_statement,
    is_row_error,
    pages,
    record_keys,
    table_exists,
    utc_now,
)
from outbox_sync.errors import ClosedSyncError, ConfigError, UnknownSyncError
from outbox_sync.mapping import Mapping

# The columns of `sync_errors`, in the order people read them.
COLUMNS = (
    "id, outbox_id, mapping, record_key, op, document, http_status, error, attempts, failed_at,"
    " resolved_at, resolution, note"
)
STATUSES = ("open", "resolved", "all")
# Records retried per write transaction: `errors retry --all` over thousands of errors must not
# hold the application's write lock for all of it.
RETRY_CHUNK = 200
# Rows deleted per write transaction by `prune`, for the same reason.
PRUNE_CHUNK = 1000
# Rows `scan` reads at a time: a row keeps the document sent, or the row, which may be large
# (a text of 70 KB failed validation).
PAGE_ROWS = 500


@dataclass(frozen=True)
class Retry:
    """One record sent through the outbox again by `retry`."""

    mapping: str
    key: Any
    op: str
    outbox_id: int
    closed_error_ids: tuple[int, ...]


def find(db: Database, **filters: Any) -> list[dict[str, Any]]:
    """Rows of `sync_errors`, oldest first: `scan`'s, as a list."""
    return list(scan(db, **filters))


def scan(
    db: Database,
    *,
    status: str = "open",
    since: str | None = None,
    op: str | None = None,
    mappings: Sequence[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows of `sync_errors`, oldest first, read a page at a time (a flood of errors is
    listed in flat memory). status: 'open', 'resolved' or 'all'; since: an ISO time (as in
    failed_at) the failure happened at or after; op: 'upsert' or 'delete'; mappings: only
    those of these mappings (by name)."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
    conditions, params = [], []
    if status != "all":
        conditions.append(f"resolved_at IS {'NOT ' if status == 'resolved' else ''}NULL")
    if since is not None:
        conditions.append("failed_at >= ?")
        params.append(since)
    if op is not None:
        conditions.append("op = ?")
        params.append(op)
    if mappings is not None:
        conditions.append("mapping IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(list(mappings)))
    names = [name.strip() for name in COLUMNS.split(",")]
    where = " AND ".join(conditions)
    for rows in pages(
        db.conn, "sync_errors", "id", COLUMNS, where=where, params=params, chunk=PAGE_ROWS
    ):
        for row in rows:
            yield dict(zip(names, row[1:], strict=True))  # after `pages`' own id


def get(db: Database, error_id: int, mappings: Lookup[str, Mapping]) -> dict[str, Any]:
    """One row of `sync_errors`, with what the record looks like now: `record_exists` (its
    mapping covers a row of its key; None when the mapping is not configured) and `pending`
    (outbox entries waiting for it)."""
    cursor = db.conn.execute(f"SELECT {COLUMNS} FROM sync_errors WHERE id = ?", (error_id,))
    row = cursor.fetchone()
    if row is None:
        raise UnknownSyncError(error_id)
    names = [column[0] for column in cursor.description]
    error = dict(zip(names, row, strict=True))
    mapping = mappings.get(error["mapping"])
    key = error["record_key"]
    error["record_exists"] = None if mapping is None else bool(_row_keys(db.conn, mapping, key))
    error["pending"] = sum(
        db.conn.execute(
            f"SELECT count(*) FROM outbox WHERE mapping = ? AND record_key IS {mark}",
            (error["mapping"], bound),
        ).fetchone()[0]
        for mark, bound in map(as_stored, record_keys(key))
    )
    return error


def retry(
    db: Database,
    mappings: Lookup[str, Mapping],
    error_ids: Sequence[int] | None = None,
    only: Sequence[str] | None = None,
) -> list[Retry]:
    """Send the records of these open errors (every open one with None, of the mappings named
    in `only` if given) through the outbox again: one entry per record, 'upsert' if its
    mapping covers a row of its key, else 'delete'. Every open error of those records closes as
    'retried' (a new failure writes a new row). Unknown or closed ids raise UnknownSyncError or
    ClosedSyncError, and nothing changes; so does an error of a mapping no longer configured
    (ConfigError). Records are retried in short transactions of RETRY_CHUNK each."""
    if error_ids is None:
        records = [
            (mapping, key)
            for rows in pages(
                db.conn, "sync_errors", "id", "mapping, record_key", where="resolved_at IS NULL"
            )
            for _, mapping, key in rows
            if only is None or mapping in only
        ]
    else:
        records = [(mapping, key) for _, mapping, key in _open_errors(db.conn, error_ids)]
    records = list(dict.fromkeys(records))
    if unknown := sorted({name for name, _ in records if name not in mappings}):
        raise ConfigError(
            f"sync errors of mapping {', '.join(unknown)}, which is not configured: give its "
            "--config, or close them with `outbox-sync errors resolve`"
        )
    retries: list[Retry] = []
    for start in range(0, len(records), RETRY_CHUNK):
        with db.write() as conn:
            chunk = records[start : start + RETRY_CHUNK]
            retries.extend(_retry_records(conn, mappings, chunk))
    return retries


def _retry_records(
    conn: sqlite3.Connection, mappings: Lookup[str, Mapping], records: Sequence[tuple[str, Any]]
) -> list[Retry]:
    now = utc_now()
    retries = []
    for name, key in records:
        closed = tuple(
            error_id
            for (error_id,) in conn.execute(
                "SELECT id FROM sync_errors WHERE resolved_at IS NULL AND mapping = ?"
                " AND record_key IS ? ORDER BY id",
                (name, key),
            )
        )
        if not closed:  # closed meanwhile (a sync superseded it): nothing to retry
            continue
        held = _row_keys(conn, mappings[name], key)
        op = "upsert" if held else "delete"
        queued = held[0] if held else key  # as its row holds it: a RawText as TEXT
        outbox_id = conn.execute(*enqueue_statement(name, queued, op)).lastrowid
        assert outbox_id is not None  # an INSERT always sets it
        conn.execute(
            "UPDATE sync_errors SET resolved_at = ?, resolution = 'retried', note = ?"
            " WHERE resolved_at IS NULL AND mapping = ? AND record_key IS ?",
            (now, f"re-enqueued as outbox entry {outbox_id} ({op})", name, key),
        )
        retries.append(Retry(name, key, op, outbox_id, closed))
    return retries


def resolve(db: Database, error_ids: Sequence[int], note: str) -> None:
    """Close these open errors by hand (resolution 'resolved'), keeping the note. Unknown or
    closed ids raise UnknownSyncError or ClosedSyncError, and nothing changes."""
    now = utc_now()
    with db.write() as conn:
        _open_errors(conn, error_ids)
        conn.executemany(
            "UPDATE sync_errors SET resolved_at = ?, resolution = 'resolved', note = ?"
            " WHERE id = ?",
            [(now, note, error_id) for error_id in error_ids],
        )


def prune(
    db: Database, before: str, only: Sequence[str] | None = None, *, dry_run: bool = False
) -> int:
    """Delete the closed errors (of the mappings in `only`, if given) that closed by `before`
    (an ISO time, as `resolved_at` writes it: whole seconds); how many (would be, with dry_run)
    deleted. Open errors are never deleted. In short transactions of PRUNE_CHUNK rows each; ids
    are never reused (AUTOINCREMENT)."""
    closed = "resolved_at IS NOT NULL AND resolved_at <= ?" + (
        " AND mapping IN (SELECT value FROM json_each(?))" if only is not None else ""
    )
    params = (before, json.dumps(list(only))) if only is not None else (before,)
    if dry_run:
        counted = db.conn.execute(f"SELECT count(*) FROM sync_errors WHERE {closed}", params)
        return int(counted.fetchone()[0])
    deleted, last = 0, 0
    while True:
        with db.write() as conn:
            ids = [
                error_id
                for (error_id,) in conn.execute(
                    f"SELECT id FROM sync_errors WHERE id > ? AND {closed} ORDER BY id LIMIT ?",
                    (last, *params, PRUNE_CHUNK),
                )
            ]
            conn.execute(
                "DELETE FROM sync_errors WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(ids),),
            )
        deleted += len(ids)
        if len(ids) < PRUNE_CHUNK:
            return deleted
        last = ids[-1]


def _open_errors(conn: sqlite3.Connection, error_ids: Sequence[int]) -> list[tuple[int, str, Any]]:
    """(id, mapping, key) of these errors, each once; raise unless every one is open."""
    found = {
        row[0]: row
        for row in conn.execute(
            "SELECT id, mapping, record_key, resolution FROM sync_errors"
            " WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(error_ids)),),
        )
    }
    for error_id in error_ids:
        if error_id not in found:
            raise UnknownSyncError(error_id)
        if found[error_id][3] is not None:
            raise ClosedSyncError(error_id, found[error_id][3])
    return [found[error_id][:3] for error_id in dict.fromkeys(error_ids)]


def _row_keys(conn: sqlite3.Connection, mapping: Mapping, key: Any) -> list[Any]:
    """The `record_keys` of this key that a row the mapping covers has: none while its table is
    gone (the daemon waits for it)."""
    if not table_exists(conn, mapping.table):
        return []
    return [form for form in record_keys(key) if _holds(conn, mapping, form)]


def _holds(conn: sqlite3.Connection, mapping: Mapping, key: Any) -> bool:
    """`covers`, with a row whose `where` SQLite fails on counted in: it is there, and the
    daemon gives up on it again, saying why (it failed `errors show` and `retry`)."""
    try:
        return covers(conn, mapping, key)
    except sqlite3.OperationalError as error:
        if not is_row_error(error):
            raise
        return True
