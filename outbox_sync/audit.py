"""Audit: compare every row of `sequences` with every document in Typesense, and repair drift
through the outbox.

Both sides are compared after the daemon's own mapping (`documents.to_document`), so a record is
consistent exactly when the daemon would leave it as it is. Drift comes in five kinds:

- `missing`: a valid row with no document;
- `extra`: a document whose id no row has;
- `stale`: a valid row whose document differs (the differing fields are named);
- `invalid`: a row that fails validation and has no open sync error (nobody knows about it:
  an error closed by hand without fixing the row, or a row written while the triggers were
  missing). The daemon cannot index it; `--repair` sends it through the outbox so it becomes an
  open sync error again, where on-call sees it;
- `shared`: a key more than one row holds (a table whose key is not unique): one document
  cannot show them all, and only the application can make the key unique.

Not drift, but counted: records that look drifted while they have an open sync error (the error
already tells the story: `outbox-sync errors`), and records with an outbox entry waiting (the
daemon is about to apply them). A record the daemon has not been able to index keeps whatever
document it had; with an open error, that is expected.

Correct while the application and the daemon keep working: outbox entries are snapshotted before
the export and the read of `sequences` (which run at once), after both and at the very end, and
every record waiting in one of them is left out. Then every candidate is checked again, record
by record, with both sides read afresh (SQLite first, then Typesense): a change committed and
applied between the export's look at a record and the read of its row would otherwise look
like drift.

The snapshot compares texts, so that a record in step costs no JSON work in Python: Typesense
exports a document as canonical JSON (its keys in order, no spaces: `canonical`), SQLite writes
the expected document with its keys in order too (`Mapping.line_sql`), and reads the id of each
exported line. Where the two texts differ, both are parsed and compared as `canonical` texts
before the record becomes a candidate (a float SQLite writes with 15 digits, say, or a server
that exports in another order): the same candidates as comparing `canonical` texts throughout.

Memory stays bounded however large the table: Typesense's export is streamed into a scratch
SQLite file (in the temporary directory, TMPDIR) on a thread of its own, while the rows are
copied into another in chunks with their expected documents (Typesense writes the export with
its own CPU meanwhile), and the comparison is SQL over both files. Reads of the application's
database are short and chunked: none is open while the audit waits on the network.
"""

import contextlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from outbox_sync import db as database
from outbox_sync.db import Database, damaged, pages, row_key
from outbox_sync.errors import (
    InvalidRecordError,
    OutboxSyncError,
    TypesenseError,
    TypesenseUnavailableError,
)
from outbox_sync.mapping import Found, Mapping
from outbox_sync.typesense_index import MAX_DELETE_IDS, TypesenseIndex, export_document
from outbox_sync.values import RawText, shown_key

# "shared": a key more than one row holds (a table whose key is not unique): one document
# can show only one of them, and only the application can make it right.
KINDS = ("missing", "extra", "stale", "invalid", "shared")
# Rows per read of `sequences` and documents per scratch write: a few MB at most.
DEFAULT_CHUNK = 5000
# Candidates checked again per round: one read of SQLite, one export of their ids (in as many
# requests as their length in a URL needs: `id_filters`).
CONFIRM_CHUNK = MAX_DELETE_IDS
# The id of an exported document, as SQLite reads it from an element of a chunk's array.
EXPORTED_ID = "json_extract(e.value, '$.id')"

# (phase, done, total): phases are "export", "rows" and "confirm".
Progress = Callable[[str, int, int], None]

# Times an audit starts again when a reindex switched its collection while it ran.
SWITCH_RESTARTS = 2

# How often the export's progress is told while the rows are copied and it is not.
EXPORT_PROGRESS_S = 0.2

SCRATCH_SCHEMA = (
    "CREATE TABLE expected (key, doc TEXT, problem TEXT)",
    "CREATE TABLE pending (key PRIMARY KEY)",
    "CREATE TABLE known (key PRIMARY KEY)",
    "CREATE TABLE candidates (n INTEGER PRIMARY KEY, key, kind TEXT NOT NULL, detail TEXT)",
    "CREATE TABLE drift (n INTEGER PRIMARY KEY, key, kind TEXT NOT NULL, detail TEXT)",
    # Keys the table stores as TEXT that is not UTF-8: bound as RawText is (a BLOB, as in
    # sync_errors), they are BLOBs here too, and the repair must queue them as TEXT again.
    "CREATE TABLE text_keys (key PRIMARY KEY)",
)
# Whether a key of the scratch file is one of `text_keys`.
IS_TEXT_KEY = "key IN (SELECT key FROM text_keys)"


# An audit's scratch directory, named with its process: what a killed one left (SIGKILL, a
# power cut: no cleanup runs) is known by a process that is gone, and the next audit drops it.
SCRATCH_PREFIX = "outbox-sync-audit-"
SCRATCH_NAME = re.compile(re.escape(SCRATCH_PREFIX) + r"(\d+)-[^/]+")


def drop_stale_scratch(directory: Path) -> None:
    """Remove the scratch directories in `directory` whose audit's process is gone; ours only
    (same user), and only those named with a process id (older ones are left alone)."""
    for path in directory.glob(f"{SCRATCH_PREFIX}*"):
        match = SCRATCH_NAME.fullmatch(path.name)
        try:
            if not match or not path.is_dir() or path.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if process_exists(int(match[1])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            structlog.get_logger("outbox_sync").warning(
                "stale_audit_scratch_dropped",
                path=str(path),
                note="left by an audit whose process was killed",
            )


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


@dataclass(frozen=True)
class AuditSummary:
    rows: int  # rows of `sequences` read
    documents: int  # documents exported from Typesense
    counts: dict[str, int]  # per kind of drift
    known_errors: int  # records that differ but have an open sync error: not drift
    pending: int  # records that differed while an outbox entry waited for them: not drift

    @property
    def consistent(self) -> bool:
        return not any(self.counts.values())


@dataclass(frozen=True)
class RepairSummary:
    enqueued: int  # outbox entries written, for the daemon to apply
    deleted: list[str]  # ids of documents deleted here (see Audit.repair)


def canonical(document: dict[str, Any]) -> str:
    """One text per content: equal documents give equal texts, whatever their key order."""
    return json.dumps(document, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def same_document(actual: str | None, expected: str | None) -> bool:
    """Whether two JSON texts of documents differ only in how they are written."""
    if actual is None or expected is None:
        return False
    return canonical(json.loads(actual)) == canonical(json.loads(expected))


def scratch_problem(error: Exception) -> str:
    """What to say when SQLite fails under the audit: most likely, its scratch file's disk."""
    return (
        f"audit failed on SQLite: {error}; its scratch file in {tempfile.gettempdir()} needs "
        "about twice the size of the data: if that disk is full, set TMPDIR to one with room"
    )


def verdict(
    mapping: Mapping, row: Found | None, document: dict[str, Any] | None
) -> tuple[str, Any]:
    """(kind, detail) of drift for one record from both sides (a row as `Database.read_rows`
    gives it), or ("", None) when consistent."""
    if row is None:
        return ("", None) if document is None else ("extra", None)
    try:
        expected = json.loads(mapping.judge(row))
    except InvalidRecordError as error:
        return "invalid", str(error)
    if document is None:
        return "missing", None
    fields = sorted(
        name
        for name in expected.keys() | document.keys()
        if name not in expected or name not in document or expected[name] != document[name]
    )
    return ("stale", ", ".join(fields)) if fields else ("", None)


class Audit:
    """`with Audit(db, index) as audit: summary = audit.run()`, then `audit.ids(kind)` and
    `audit.repair()`. The scratch file goes away on close."""

    def __init__(
        self,
        db: Database,
        index: TypesenseIndex,
        *,
        chunk: int = DEFAULT_CHUNK,
        progress: Progress | None = None,
    ) -> None:
        """Rows and exported documents are read at most `chunk` at a time, and about
        db.READ_MAX_BYTES of them (rows: `Database.scan_rows`; the export: `_load_actual`)."""
        self.db, self.index, self.chunk = db, index, chunk
        self.mapping = index.mapping
        self.progress = progress or (lambda phase, done, total: None)
        # exported lines, given as one JSON array: each document under the key its id (text)
        # stands for
        self.insert_actual = (
            "INSERT OR REPLACE INTO actual (key, doc)"
            f" SELECT {self.mapping.key_of_sql(EXPORTED_ID)}, e.value FROM json_each(?) AS e"
            " WHERE CASE WHEN e.type = 'object' THEN json_type(e.value, '$.id') = 'text' END"
        )
        self._open_scratch()

    def _open_scratch(self) -> None:
        try:
            drop_stale_scratch(Path(tempfile.gettempdir()))
            self._directory = tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
            self.scratch = self._scratch_file("audit.db")
            self.scratch.create_function("same_document", 2, same_document, deterministic=True)
            for statement in SCRATCH_SCHEMA:
                self.scratch.execute(statement)
        except (OSError, sqlite3.Error) as error:
            raise OutboxSyncError(scratch_problem(error)) from None
        self.exported = 0  # documents of the export filed so far (by its thread)

    def _scratch_file(self, name: str) -> sqlite3.Connection:
        """A throwaway file: no journal, no fsync; its page cache stays small (the default)."""
        conn = sqlite3.connect(Path(self._directory.name) / name)
        conn.isolation_level = None
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA temp_store = FILE")
        return conn

    def close(self) -> None:
        self.scratch.close()
        self._directory.cleanup()

    def __enter__(self) -> "Audit":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- the audit ------------------------------------------------------------------------------

    def run(self) -> AuditSummary:
        """Compare both sides completely; raises TypesenseError, DatabaseError (the database
        damaged too), or OutboxSyncError when SQLite fails under it otherwise (a full disk for
        the scratch file). A reindex that points the name at its new collection while the
        audit exports the old one (and drops it: the export breaks off, or hangs until the
        timeout) has the audit start again on the new one, at most SWITCH_RESTARTS times."""
        restarts = 0
        while True:
            exported = self._target()
            try:
                return self._run()
            except sqlite3.Error as error:  # the application's file damaged, or the scratch's
                raise damaged(error, self.db.path) or OutboxSyncError(
                    scratch_problem(error)
                ) from None
            except TypesenseError:
                now = self._target()
                if restarts == SWITCH_RESTARTS or now is None or now == exported:
                    raise
            restarts += 1
            structlog.get_logger("outbox_sync").info(
                "audit_restarted",
                collection=self.index.collection,
                note=f"a reindex switched it from {exported} to {now} during the audit",
            )
            self.close()
            self._open_scratch()

    def _target(self) -> str | None:
        """The real collection behind the index's name (None: none, or Typesense fails)."""
        try:
            return self.index.target()
        except TypesenseError:
            return None

    def _run(self) -> AuditSummary:
        total_documents = self.index.count()  # also: a missing collection fails here, at once
        self._snapshot_pending()
        documents, rows = self._load_both(total_documents)
        self._snapshot_pending()
        pending = self._find_candidates()
        self._confirm()
        self._snapshot_pending()
        pending += self._execute("DELETE FROM drift WHERE key IN (SELECT key FROM pending)")
        pending += self._execute(
            "DELETE FROM drift WHERE key IS NULL AND EXISTS"
            " (SELECT 1 FROM pending WHERE key IS NULL)"
        )
        known = self._set_aside_known()
        counts = dict.fromkeys(KINDS, 0)
        counts.update(
            self.scratch.execute("SELECT kind, count(*) FROM drift GROUP BY kind").fetchall()
        )
        counts.pop("known", None)
        return AuditSummary(rows, documents, counts, known, pending)

    def ids(self, kind: str) -> Iterator[tuple[Any, str | None]]:
        """(record id, detail) of one kind of drift (or "known"), in id order. Detail names the
        differing fields (stale), the validation problem (invalid), or the kind (known). A key
        the table stores as TEXT that is not UTF-8 comes back RawText, as the drain reads it."""
        for rows in pages(
            self.scratch,
            "drift",
            "n",
            f"key, detail, {IS_TEXT_KEY}",
            where="kind = ?",
            params=(kind,),
        ):
            for _, key, detail, text in rows:
                yield (RawText(key) if text else key), detail

    def repair(self) -> RepairSummary:
        """Enqueue every drifted record into the outbox, so the daemon fixes it with its usual
        guarantees: missing, stale, invalid and shared ones as upserts (a shared key's document
        then shows one of its rows: only the application can make it unique), extras as
        deletes. Documents with an id that no row can have (not a decimal integer, e.g. added
        by hand as "abc") are deleted here: the daemon only ever deletes the ids it writes."""
        enqueued, deleted = 0, []
        entries: list[tuple[Any, str]] = []
        for kind in KINDS:
            for key, _ in self.ids(kind):
                if kind != "extra":
                    entries.append((key, "upsert"))
                elif self.mapping.document_id(key) is not None:
                    entries.append((key, "delete"))
                else:
                    self.index.delete_document(str(key))
                    deleted.append(str(key))
                if len(entries) >= self.chunk:  # one short write transaction per chunk
                    self.db.enqueue(self.mapping.name, entries)
                    enqueued, entries = enqueued + len(entries), []
        if entries:
            self.db.enqueue(self.mapping.name, entries)
        return RepairSummary(enqueued + len(entries), deleted)

    # -- steps ----------------------------------------------------------------------------------

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        return self.scratch.execute(sql, params).rowcount

    def _insert(self, sql: str, values: list[tuple[Any, ...]]) -> None:
        self.scratch.execute("BEGIN")
        self.scratch.executemany(sql, values)
        self.scratch.execute("COMMIT")

    def _snapshot_pending(self) -> None:
        """The keys of the records waiting in the outbox, also as their rows hold them: a
        dependency's TEXT column queues an integer key as text ('1'), which the drain matches
        to row 1 (SQLite converts it) and the scratch file, without column types, did not: the
        record waiting was drift (found by a hostile review)."""
        for keys in self.db.scan_outbox_keys(self.mapping.name, self.chunk):
            forms = [(key,) for key in keys]
            forms += [(self.mapping.key_of(key),) for key in keys if type(key) is str]
            self._insert("INSERT OR IGNORE INTO pending (key) VALUES (?)", forms)

    def _load_both(self, total_documents: int) -> tuple[int, int]:
        """Both sides into the scratch files at once: (documents, rows). The export's thread
        takes Python's lock little (the network, and one statement a chunk)."""
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="export") as thread:
            export = thread.submit(self._load_actual, stop)
            try:
                rows = self._load_expected(lambda: export.done() and bool(export.exception()))
                while wait([export], timeout=EXPORT_PROGRESS_S).not_done:
                    self.progress("export", self.exported, total_documents)
            finally:
                stop.set()  # when the rows failed: the export stops at its next chunk
            documents = export.result()  # the export's failure is the audit's
        self.progress("export", documents, total_documents)
        self.scratch.execute(
            "ATTACH DATABASE ? AS export", (str(Path(self._directory.name) / "export.db"),)
        )
        return documents, rows

    def _load_actual(self, stop: threading.Event) -> int:
        """Stream Typesense's export into its scratch file, each line as it came (on the
        export's thread, with a connection of its own)."""
        with (
            contextlib.closing(self._scratch_file("export.db")) as conn,
            contextlib.closing(self.index.export_lines()) as lines,
        ):
            conn.execute("CREATE TABLE actual (key PRIMARY KEY, doc TEXT NOT NULL)")
            batch: list[str] = []
            size, most = 0, database.READ_MAX_BYTES  # bytes: large documents, short chunks
            for line in lines:
                batch.append(line)
                size += len(line)
                if len(batch) >= self.chunk or size >= most:
                    size = 0
                    self.exported += self._flush_actual(conn, batch)
                    if stop.is_set():
                        return self.exported
            self.exported += self._flush_actual(conn, batch)
        return self.exported

    def _flush_actual(self, conn: sqlite3.Connection, batch: list[str]) -> int:
        """File exported lines in one statement: each line is an element of the array SQLite
        reads, and comes out written as SQLite writes JSON (no spaces: Typesense's lines come
        out as they went in). A line that is not one document with a text id makes SQLite
        refuse the array or file another count: then each line is read here, to name the one
        at fault."""
        conn.execute("BEGIN")
        try:
            filed = conn.execute(self.insert_actual, (f"[{','.join(batch)}]",)).rowcount
        except sqlite3.OperationalError as error:
            if "malformed JSON" not in str(error):
                raise
            filed = -1
        conn.execute("COMMIT" if filed == len(batch) else "ROLLBACK")
        if filed != len(batch):
            for line in batch:
                if not isinstance(export_document(line)["id"], str):  # raises if no document
                    raise TypesenseUnavailableError(
                        f"Typesense sent an export line whose id is not text: {line[:200]!r}"
                    )
            raise TypesenseUnavailableError("Typesense sent an export line SQLite cannot read")
        count = len(batch)
        batch.clear()
        return count

    def _load_expected(self, give_up: Callable[[], bool] = lambda: False) -> int:
        """Copy the mapping's rows into the scratch file in chunks, each with the document the
        daemon would send for it (SQLite's text, its keys in order; `canonical` for a row left
        to the Python mapper), or the validation problem that stops it; stop early once
        `give_up` says so (the export failed)."""
        total = int(self.db.count_rows(self.mapping) or 0)
        loaded = 0
        self.progress("rows", 0, total)
        for rows in self.db.scan_rows(self.mapping, self.chunk, sort_keys=True):
            if give_up():
                break
            values: list[tuple[Any, str | None, str | None]] = []
            texts: list[tuple[RawText]] = []
            for read, line, raw in rows:
                key = row_key(read)
                if type(key) is RawText:
                    texts.append((key,))
                if line is not None:
                    values.append((key, line.decode(), None))
                    continue
                try:
                    document = canonical(json.loads(self.mapping.line(raw)))
                    values.append((key, document, None))
                except InvalidRecordError as error:
                    values.append((key, None, str(error)))
            self._insert("INSERT INTO expected (key, doc, problem) VALUES (?, ?, ?)", values)
            if texts:
                self._insert("INSERT OR IGNORE INTO text_keys (key) VALUES (?)", texts)
            loaded += len(rows)
            self.progress("rows", loaded, total)
        self.scratch.execute("CREATE INDEX expected_key ON expected (key)")
        return loaded

    def _find_candidates(self) -> int:
        """Everything that differs in the snapshot, less the records waiting in the outbox
        (their count is returned)."""
        self.scratch.execute(
            "INSERT INTO candidates (key, kind, detail)"
            " SELECT e.key, CASE WHEN e.problem IS NOT NULL THEN 'invalid'"
            "   WHEN a.key IS NULL THEN 'missing' ELSE 'stale' END, e.problem"
            " FROM expected AS e LEFT JOIN actual AS a ON a.key = e.key"
            " WHERE e.problem IS NOT NULL OR a.key IS NULL"
            " OR CASE WHEN a.doc = e.doc THEN 0 ELSE NOT same_document(a.doc, e.doc) END"
        )
        self.scratch.execute(
            "INSERT INTO candidates (key, kind) SELECT key, 'extra' FROM actual AS a"
            " WHERE NOT EXISTS (SELECT 1 FROM expected AS e WHERE e.key = a.key)"
        )
        self.scratch.execute(
            "INSERT INTO candidates (key, kind, detail)"
            " SELECT key, 'shared', count(*) || ' rows' FROM expected"
            " WHERE key IS NOT NULL GROUP BY key HAVING count(*) > 1"
        )
        self.scratch.execute(  # a key is one candidate: each of its rows may have made one
            "DELETE FROM candidates WHERE kind != 'shared' AND key IN"
            " (SELECT key FROM candidates WHERE kind = 'shared')"
        )
        pending = self._execute("DELETE FROM candidates WHERE key IN (SELECT key FROM pending)")
        pending += self._execute(
            "DELETE FROM candidates WHERE key IS NULL AND EXISTS"
            " (SELECT 1 FROM pending WHERE key IS NULL)"
        )
        return pending

    def _confirm(self) -> None:
        """Check every candidate again with both sides read afresh: SQLite first, then
        Typesense. Only keys that can be records race with the daemon (it writes no other
        ids), so the others keep the snapshot's verdict."""
        (total,) = self.scratch.execute("SELECT count(*) FROM candidates").fetchone()
        done = 0
        self.progress("confirm", 0, total)
        for chunk in pages(
            self.scratch, "candidates", "n", "key, kind, detail", chunk=CONFIRM_CHUNK
        ):
            ids = {key: self.mapping.document_id(key) for _, key, _, _ in chunk}
            keys = [key for key, doc_id in ids.items() if doc_id is not None]
            rows, holders = {}, Counter[Any]()
            for row in self.db.read_rows(self.mapping, keys):
                rows[row_key(row[0])] = row
                holders[row_key(row[0])] += 1
            documents = {}
            for document in self.index.export_ids([ids[key] or "" for key in keys]):
                documents[self.mapping.key_of(str(document.get("id")))] = document
            drifted = []
            for _, key, kind, detail in chunk:
                if ids[key] is not None:
                    kind, detail = verdict(self.mapping, rows.get(key), documents.get(key))
                    if holders[key] > 1:
                        kind, detail = "shared", f"{holders[key]} rows"
                if kind:
                    drifted.append((key, kind, detail))
            self._insert("INSERT INTO drift (key, kind, detail) VALUES (?, ?, ?)", drifted)
            done += len(chunk)
            self.progress("confirm", done, total)
        self.scratch.execute("CREATE INDEX drift_kind ON drift (kind, n)")

    def _set_aside_known(self) -> int:
        """Records with an open sync error are not drift: mark them "known" (the detail keeps
        what differs). Returns how many."""
        for keys in self.db.scan_open_error_keys(self.mapping.name, self.chunk):
            self._insert("INSERT OR IGNORE INTO known (key) VALUES (?)", [(k,) for k in keys])
        update = (
            "UPDATE drift SET kind = 'known', detail = kind || coalesce(': ' || detail, '') WHERE "
        )
        known = self._execute(update + "key IN (SELECT key FROM known)")
        known += self._execute(
            update + "key IS NULL AND EXISTS (SELECT 1 FROM known WHERE key IS NULL)"
        )
        return known


def audit_json(
    audit: Audit, summary: AuditSummary, repaired: RepairSummary | None
) -> Iterator[str]:
    """The audit as one JSON object, in pieces: every id is listed, however many, without the
    whole text in memory. Ids are integers, or text for ids no valid row can have."""
    yield json.dumps(
        {
            "consistent": summary.consistent,
            "rows": summary.rows,
            "documents": summary.documents,
            "waiting_in_outbox": summary.pending,
        }
    )[:-1]
    for kind in (*KINDS, "known"):
        count = summary.known_errors if kind == "known" else summary.counts[kind]
        name = "with_open_error" if kind == "known" else kind
        yield f', "{name}": {{"count": {count}, "ids": ['
        yield from _joined(json.dumps(shown_key(key), default=str) for key, _ in audit.ids(kind))
        yield "]"
        if kind in ("stale", "invalid", "shared", "known"):  # what differs, per id
            yield ', "details": {'
            yield from _joined(
                f"{json.dumps(str(key))}: {json.dumps(detail)}" for key, detail in audit.ids(kind)
            )
            yield "}"
        yield "}"
    fixed = repaired and {"enqueued": repaired.enqueued, "deleted": repaired.deleted}
    yield f', "repaired": {json.dumps(fixed)}}}'


def _joined(items: Iterator[str], per_piece: int = 1000) -> Iterator[str]:
    """`items` joined by commas, a thousand at a time."""
    batch: list[str] = []
    separator = ""
    for item in items:
        batch.append(item)
        if len(batch) >= per_piece:
            yield separator + ", ".join(batch)
            batch, separator = [], ", "
    if batch:
        yield separator + ", ".join(batch)
