"""Applying the outbox: claim the oldest entries, read their records' current rows, send them to
Typesense, acknowledge. `apply_once()` is one batch; `drain()` pipelines batches until the outbox
is empty (litestream's `Sync()`: one step, called by the loop in worker.py).

One batch may hold entries of several mappings: each mapping's rows are read with its own SELECT
(SQLite writes the finished JSON line of each valid row, see mapping.py) and imported into its
own collection.
"""

import sqlite3
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator
from collections.abc import Mapping as Lookup
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from typing import Any, Protocol

import structlog

from outbox_sync import db as database
from outbox_sync.db import (
    FIRST_READ_ROWS,
    Claimed,
    Database,
    OutboxEntry,
    SyncFailure,
    is_row_error,
    row_key,
    rows_fitting,
    written,
)
from outbox_sync.errors import InvalidRecordError, TypesenseUnavailableError
from outbox_sync.mapping import Found, Mapping
from outbox_sync.telemetry import Telemetry
from outbox_sync.typesense_index import ACCEPTED, IN_FLIGHT, ImportResult, free_request_bodies
from outbox_sync.values import RawText

# A long drain hands back to the loop this often, for its chores (metrics, triggers, reindex
# requests, statistics); it keeps the loop's heartbeat itself (watchdog, /healthz). Each
# hand-back lets the requests in flight finish and Typesense wait for the next slice's first
# batch, 0.04-0.07 s (tests.bench.gaps): at 1 s that was 0.14-0.23 s of a 100k drain, at 5 s
# 0.13 s of a 300k one and 0.7 s of a 1M one.
DRAIN_SLICE_S = 15.0
# A drain of small batches only (a steady trickle of commits: nothing to pipeline, nothing in
# flight between them) hands back this often, so that the loop's chores run once a second as
# when it is idle: under a writer that never paused, the checks of the file, the lock and the
# triggers, and the report of an audit, waited for the whole slice.
TRICKLE_SLICE_S = 1.0
# Within a drain, the acknowledgements of small batches wait for each other at most this long
# (a batch's worth of entries goes at once): a writer committing 1,000 rows a second makes
# hundreds of small batches a second, and each acknowledgement is a write transaction.
ACK_INTERVAL_S = 0.1


class Stopping(Protocol):
    def is_set(self) -> bool: ...


class Index(Protocol):
    """What applying batches needs of the Typesense side (a fake can stand in, in unit tests):
    one collection, and the mapping its documents are made by."""

    observe: Callable[[str, str, float], None] | None
    mapping: Mapping

    def import_jsonl(self, body: bytes, count: int) -> list[ImportResult]: ...
    def delete_ids(self, ids: list[str]) -> int: ...


@dataclass
class BatchReport:
    entries: int = 0
    upserted: int = 0
    deleted: int = 0
    retried: int = 0
    failures: list[SyncFailure] = field(default_factory=list)


# An upsert or a delete of a batch: the outbox entry's id, the record's key, and its line (an
# upsert) or its document id (a delete). Tuples: a batch makes thousands of them.
Change = tuple[int, Any, bytes]
Removal = tuple[int, Any, str]


@dataclass
class Work:
    """What one batch sends to one collection."""

    upserts: list[Change] = field(default_factory=list)
    deletes: list[Removal] = field(default_factory=list)


@dataclass
class Batch:
    """Claimed entries on their way through prepare -> apply -> acknowledge."""

    last_id: int  # the highest entry id claimed and read: acknowledging removes up to it
    report: BatchReport
    full: bool = False  # it holds as many entries as were asked for, or was cut: more may wait
    work: dict[str, Work] = field(default_factory=dict)  # by mapping
    synced: list[tuple[str, Any]] = field(default_factory=list)  # (mapping, key)
    records: set[tuple[str, Any]] = field(default_factory=set)  # (mapping, key) it touches
    judged_bytes: int = 0  # of the lines the Python mapper wrote (SQLite's read them as empty)

    @contextmanager
    def reading(self, entry: OutboxEntry) -> Iterator[None]:
        """Give up on `entry`'s record where SQLite fails on its row as the mapping says (an
        `sql` field or `where` on its value: `is_row_error`); any other failure is raised."""
        try:
            yield
        except sqlite3.OperationalError as error:
            if not is_row_error(error):
                raise
            self.fail(entry, None, f"SQLite cannot read its row as the mapping says: {error}")

    def fail(self, entry: OutboxEntry, document: str | None, error: str, **result: Any) -> None:
        """Give up on `entry`'s record: a sync error after one attempt (validation), or with
        the attempts and HTTP status Typesense's answers add."""
        self.report.failures.append(
            SyncFailure(
                outbox_id=entry.id,
                mapping=entry.mapping,
                key=entry.key,
                op="upsert",
                document=document,
                error=error,
                http_status=result.get("http_status"),
                attempts=result.get("attempts", 1),
            )
        )


class Applier:
    def __init__(
        self, db: Database, indexes: Lookup[str, Index], *, batch_size: int, telemetry: Telemetry
    ) -> None:
        """`indexes` by mapping name; entries of a mapping not there (a mapping taken out of
        the configuration) are acknowledged with a warning."""
        self.db, self.indexes = db, indexes
        self.batch_size, self.telemetry = batch_size, telemetry
        # the next claim's: the first is small, as the rows' size is not known yet (_prepare)
        self.claim_size = min(batch_size, FIRST_READ_ROWS)
        self.log = structlog.get_logger("outbox_sync")
        self.unknown_logged: set[str] = set()
        # The highest entry id acknowledged (None until the first acknowledgement), and what
        # to call when entries no acknowledgement removed are gone (`_missing`).
        self.acked: int | None = None
        self.on_missing: Callable[[int], None] = lambda count: None
        # The schema version the loop's watch last checked (None: none to keep to): a drain
        # ends where it changed, before a batch read by a schema the mappings were not bound
        # to is sent (`_batches`).
        self.schema_seen: Callable[[], int | None] = lambda: None
        self.schema_moved = False  # the last drain ended so

    def apply_once(self) -> BatchReport:
        """Apply the oldest batch of outbox entries and acknowledge it. Raises
        TypesenseUnavailableError (nothing acknowledged: the batch is applied again later)."""
        batch = self._prepare(after=0)
        if batch is None:
            return BatchReport()
        self._apply(batch)
        self._ack([batch])
        return batch.report

    def drain(self, stop: Stopping, max_seconds: float = DRAIN_SLICE_S) -> int:
        """Apply batches until the outbox is empty, `stop` is set or `max_seconds` have
        passed (so the loop's chores go on during a long drain; TRICKLE_SLICE_S while the
        batches are small); how many entries were acknowledged. Pipelined: while Typesense
        imports a batch (on an import thread), the next is read and encoded, and sent beside
        it if the two share no record (Typesense takes the second request's body while it
        indexes the first, and is never left waiting for the daemon between them). A record's
        changes are still applied in commit order: a batch that touches a record in flight
        waits for that answer, and failed lines are retried before the batch after the next
        is sent. Acknowledgements go in outbox order and are coalesced (`Acks`); all that was
        applied is acknowledged before the drain returns or raises."""
        acks = Acks(self._ack, self.batch_size)
        started, self.schema_moved = time.monotonic(), False
        batches = self._batches(stop, started + max_seconds)
        try:
            batch = next(batches, None)
            while batch is not None and not batch.full:
                # all there is: no next batch to overlap with, so spare the thread hand-off
                # (the low-latency path); what came meanwhile is applied next
                self._apply(batch)
                acks.add(batch)
                if time.monotonic() - started >= min(TRICKLE_SLICE_S, max_seconds):
                    batch = None  # the loop's turn: nothing is in flight to wait for
                    break
                batch = next(batches, None)
            if batch is not None:
                self._pipeline(batch, batches, acks)
        finally:
            acks.flush()
        return acks.acknowledged

    def _pipeline(self, batch: Batch, batches: Iterator[Batch], acks: "Acks") -> None:
        flights: deque[tuple[Batch, Future[None]]] = deque()
        with ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="import") as http:
            try:
                upcoming: Batch | None = batch
                while upcoming is not None or flights:
                    if (
                        upcoming is not None
                        and len(flights) < IN_FLIGHT
                        and all(
                            upcoming.records.isdisjoint(flying.records) for flying, _ in flights
                        )
                    ):
                        flights.append((upcoming, http.submit(self._apply, upcoming)))
                        upcoming = next(batches, None)  # read and encoded while they import
                        continue
                    done, answer = flights.popleft()
                    answer.result()  # server trouble: raise, `upcoming` is never sent
                    free_request_bodies()
                    acks.add(done)
            finally:
                wait([answer for _, answer in flights])  # no request left running behind an error

    def _batches(self, stop: Stopping, until: float) -> Iterator[Batch]:
        """Prepared batches in outbox order, while there are entries, time and no stop, and
        the schema the watch last checked: a batch read after a migration is let go, its
        entries left queued, and the loop's watch looks before another is read. A drain goes on
        for DRAIN_SLICE_S: rows a migration made VIRTUAL JSON columns of went to Typesense as
        objects meanwhile, each a sync error (found by a hostile review)."""
        batch = self._prepare(after=0)
        while batch is not None:
            seen = self.schema_seen()  # after the read: a migration it may have seen shows
            if seen is not None and self.db.schema_version() != seen:
                self.schema_moved = True
                return
            yield batch
            now = time.monotonic()
            self.telemetry.loop_alive(now)  # a drain is the loop at work
            if stop.is_set() or now >= until:
                return
            batch = self._prepare(after=batch.last_id)

    def _prepare(self, after: int) -> Batch | None:
        """Claim the entries after id `after`, read their records' current rows (SQLite writes
        the JSON lines, in the statement that reads each mapping's entries) and sort them into
        upserts, deletes and failures (SQLite and CPU only). The reads stop once their lines
        pass READ_MAX_BYTES, the batch ending at the last entry read (`_cut`), and the next
        claim takes as many entries as make about READ_MAX_BYTES at this batch's size per entry
        (up to batch_size: `rows_fitting`), so that large rows keep the daemon's memory bounded,
        even rows larger than the last batch's."""
        asked = self.claim_size
        claimed = self.db.claim(asked, after=after)
        if not claimed:
            return None
        entries = sum(count for _, count, _, _ in claimed)
        batch = Batch(
            max(last for _, _, last, _ in claimed), BatchReport(entries=entries), entries == asked
        )
        reads: list[tuple[Mapping, list[Claimed]]] = []
        size = 0
        for name, count, _, _ in claimed:
            index = self.indexes.get(name)
            if index is None:
                self._unknown(name, count)
                continue
            # the mapping as the collection lets it be (see ensure_collection)
            rows, read, upto = self._read(
                batch, index.mapping, after, database.READ_MAX_BYTES - size
            )
            reads.append((index.mapping, rows))
            size += read
            if upto < batch.last_id:
                self._cut(batch, reads, after, upto)
        first = min(first for _, _, _, first in claimed)
        self._missing(after, first, batch.last_id, batch.report.entries)
        for mapping, rows in reads:
            self._prepare_mapping(batch, mapping, rows)
        # the next claim is sized by the lines that go: SQLite's, and the mapper's, read as
        # empty (a claim of such rows grew to batch_size however large they were: found by a
        # hostile review); the read's estimate of the latter is left out
        size = batch.judged_bytes
        for _, rows in reads:
            size += sum(map(len, filter(None, map(itemgetter(3), rows))))
        self.claim_size = rows_fitting(batch.report.entries, size, self.batch_size)
        return batch

    def _cut(
        self, batch: Batch, reads: list[tuple[Mapping, list[Claimed]]], after: int, last: int
    ) -> None:
        """End the batch at entry `last`, where a read stopped: the entries read after it are
        let go, left queued for the next batch."""
        batch.last_id, batch.full = last, True
        for _, rows in reads:
            del rows[bisect_right(rows, last, key=itemgetter(0)) :]
        batch.report.failures = [f for f in batch.report.failures if f.outbox_id <= last]
        batch.report.entries = self.db.count_entries(after, last)

    def _prepare_mapping(self, batch: Batch, mapping: Mapping, entries: list[Claimed]) -> None:
        work = batch.work.setdefault(mapping.name, Work())
        # the last entry per record wins; its record's state, read with it, is what goes. By
        # type too: a dependency's REAL 5.0 is 5 to Python, and names no document once the row
        # is gone: it must not take the place of 5's delete (a row found gives its own key).
        # Only a float is set apart: a tuple for every key cost 1 ms more per 5,000 entries
        latest = {(k if type(k := e[2]) is not float else (float, k)): e for e in entries}
        batch.records.update(zip(repeat(mapping.name), (e[2] for e in latest.values())))
        if mapping.key_kind == "integer":  # a dependency's TEXT '5' names 5's document
            # (`_judge_gone`): one record with 5 for the pipeline, which sends side by side
            # only batches of no record in common: a delete so named landed after the next
            # batch's upsert of 5, and the document was gone (found by a hostile review)
            texts = (key for key in latest if type(key) is str)
            batch.records.update((mapping.name, mapping.key_of(key)) for key in texts)
        judged = []  # rows SQLite left to the Python mapper
        for entry_id, deleted, key, line in latest.values():
            if line and (line.isascii() or written(line)):  # nearly every row
                work.upserts.append((entry_id, key, line))
            elif line is not None and type(key) is not RawText:
                judged.append(OutboxEntry(entry_id, mapping.name, key, _op(deleted)))
            else:  # no row, or a key that is not UTF-8 (see Database.read_claimed)
                self._gone(
                    batch, work, mapping, OutboxEntry(entry_id, mapping.name, key, _op(deleted))
                )
        if not judged:
            return
        # read again, raw (one gone meanwhile is left out)
        rows = self._read_rows(batch, mapping, judged)
        for entry in judged:
            if entry.id not in rows:
                continue  # SQLite could not read it: given up on
            row = rows[entry.id]
            if row is None:
                self._gone(batch, work, mapping, entry)
                continue
            try:
                line = mapping.judge(row)
                work.upserts.append((entry.id, entry.key, line))
                batch.judged_bytes += len(line)
            except InvalidRecordError as error:
                batch.fail(entry, mapping.describe_row(row[2]), str(error))

    def _read_rows(
        self, batch: Batch, mapping: Mapping, entries: list[OutboxEntry]
    ) -> dict[int, Found | None]:
        """The raw row of each entry (None: gone meanwhile), by entry id; none for one given
        up on. Reading the raw values reads every `sql` field, which the verdict may not have
        (an earlier check failed first): one SQLite fails on failed the read, and the daemon
        stopped at every start (found by a hostile review). Then each is read alone, and one
        that fails is given up on with SQLite's words, as in `_read`."""

        def read(some: list[OutboxEntry]) -> dict[int, Found | None]:
            found = {
                row_key(row[0]): row for row in self.db.read_rows(mapping, [e.key for e in some])
            }
            return {entry.id: found.get(entry.key) for entry in some}

        try:
            return read(entries)
        except sqlite3.OperationalError as error:
            if not is_row_error(error):
                raise
        rows: dict[int, Found | None] = {}
        for entry in entries:
            with batch.reading(entry):
                rows |= read([entry])
        return rows

    def _read(
        self, batch: Batch, mapping: Mapping, after: int, max_bytes: int
    ) -> tuple[list[Claimed], int, int]:
        """The batch's entries of `mapping` with their rows (`Database.read_claimed`), the bytes
        of their lines, and the id they are read up to: the batch's last, or an earlier one
        once the lines passed `max_bytes`. A row SQLite cannot read as the mapping says (an
        `sql` field failing on its value: malformed JSON, an integer overflow) fails the
        statement for every entry: they are read one by one then, and each whose row fails is
        given up on with SQLite's words, so that the others sync and the daemon goes on. Any
        other failure (the disk, the memory, the lock) is raised, its entries left queued: a
        disk I/O error became sync errors, its changes acknowledged and never applied (found by
        a hostile review)."""
        try:
            rows, size = self.db.read_claimed(mapping, after, batch.last_id, max_bytes)
            return rows, size, rows[-1][0] if rows and size >= max_bytes else batch.last_id
        except sqlite3.OperationalError as error:
            if not is_row_error(error):
                raise
        read: list[Claimed] = []
        size = 0
        for entry_id, deleted, key in self.db.claimed_entries(mapping, after, batch.last_id):
            with batch.reading(OutboxEntry(entry_id, mapping.name, key, _op(deleted))):
                rows, line_bytes = self.db.read_claimed(mapping, entry_id - 1, entry_id)
                read += rows
                size += line_bytes
            if size >= max_bytes:
                return read, size, entry_id
        return read, size, batch.last_id

    def _gone(self, batch: Batch, work: Work, mapping: Mapping, entry: OutboxEntry) -> None:
        """An entry whose record has no row the mapping covers (gone, or outside `where`), or
        whose key no document can have. A row whose `where` SQLite fails on (a NULL key's:
        the claim does not look it up) is given up on, as a batch's read does: it stopped
        the daemon at every start (found by a hostile review)."""
        with batch.reading(entry):
            self._judge_gone(batch, work, mapping, entry)

    def _judge_gone(self, batch: Batch, work: Work, mapping: Mapping, entry: OutboxEntry) -> None:
        doc_id = mapping.document_id(entry.key)  # only a delete needs it: the line has it
        if doc_id is None and type(entry.key) is str:  # a dependency's TEXT '5' for INTEGER 5,
            # whose row left the mapping's `where`: it names 5's document, unless a row of 5
            # is covered still (a loose key column may hold both) (found by a review)
            key = mapping.key_of(entry.key)
            if key is not entry.key and not self.db.covers(mapping, key):
                doc_id = mapping.document_id(key)
        if doc_id is not None:
            work.deletes.append((entry.id, entry.key, doc_id))
        elif _json(entry.key) or not self.db.covers(mapping, entry.key):
            batch.synced.append((mapping.name, entry.key))  # no document can have it: done
        else:  # NULL, a BLOB or text that is not UTF-8, whose rows the claim does not look up:
            # while one the mapping covers remains (an upsert, a delete of one of several)
            batch.fail(entry, None, mapping.key_problem(entry.key) or "")

    def _unknown(self, mapping: str, count: int) -> None:
        if mapping not in self.unknown_logged:
            self.unknown_logged.add(mapping)
            self.log.warning(
                "unknown_mapping",
                mapping=mapping,
                entries=count,
                note="no mapping of this name is configured: its outbox entries are dropped",
            )

    def _apply(self, batch: Batch) -> None:
        """Send the batch to Typesense (network only: runs on the import thread)."""
        for name, work in batch.work.items():
            index = self.indexes[name]
            if work.upserts:
                self._apply_upserts(batch, index, name, work.upserts)
            if work.deletes:
                index.delete_ids([doc_id for _, _, doc_id in work.deletes])
                batch.synced.extend(zip(repeat(name), [key for _, key, _ in work.deletes]))
                batch.report.deleted += len(work.deletes)

    def _apply_upserts(self, batch: Batch, index: Index, name: str, upserts: list[Change]) -> None:
        """Import, then retry the documents that failed once, immediately; the ones failing
        twice become sync_errors. A 5xx on a line is server trouble: nothing is given up."""
        pending = upserts
        for attempt in (1, 2):
            results = index.import_jsonl(b"\n".join([line for _, _, line in pending]), len(pending))
            if results.count(ACCEPTED) == len(results):  # nearly always
                batch.synced.extend(zip(repeat(name), [key for _, key, _ in pending]))
                batch.report.upserted += len(pending)
                return
            failed: list[tuple[Change, ImportResult]] = []
            for upsert, result in zip(pending, results, strict=True):
                if result.ok:
                    batch.synced.append((name, upsert[1]))
                    batch.report.upserted += 1
                elif result.http_status is not None and result.http_status >= 500:
                    raise TypesenseUnavailableError(
                        f"Typesense answered {result.http_status} for a document: {result.error}",
                        result.http_status,
                    )
                else:
                    failed.append((upsert, result))
            if attempt == 1:
                batch.report.retried += len(failed)
            pending = [upsert for upsert, _ in failed]
            if not pending:
                return
        for (entry_id, key, line), result in failed:
            batch.fail(
                OutboxEntry(entry_id, name, key, "upsert"),
                line.decode(),
                result.error or "import failed",
                http_status=result.http_status,
                attempts=2,
            )

    def _missing(self, after: int, first: int, last: int, entries: int) -> None:
        """Call `on_missing` with how many entries are gone that no acknowledgement removed
        (someone deleted them: "clearing" a grown outbox), if any. The outbox has no gaps
        otherwise: one writer at a time, AUTOINCREMENT ids, and a rollback gives its ids back.
        The claim after id `after` (0: from the oldest, whose id follows the last one
        acknowledged) holds `entries` ids from `first` to `last`."""
        follows = after or self.acked  # the id the claim's first should follow; None: unknown
        skipped = 0 if follows is None else first - follows - 1  # < 0: ids went back (SchemaWatch)
        gone = last - first + 1 - entries + max(0, skipped)
        if gone > 0:
            self.on_missing(gone)

    def _ack(self, batches: list[Batch]) -> None:
        """Acknowledge applied batches, consecutive ones, in one write transaction."""
        self.db.ack_batches(
            batches[-1].last_id, [(batch.synced, batch.report.failures) for batch in batches]
        )
        self.acked = batches[-1].last_id
        for report in (batch.report for batch in batches):
            self.telemetry.batch_applied(
                report.upserted,
                report.deleted,
                report.retried,
                [str(f.http_status or "validation") for f in report.failures],
            )
            for failure in report.failures:
                self.log.warning(
                    "record_failed",
                    mapping=failure.mapping,
                    key=failure.key,
                    op=failure.op,
                    http_status=failure.http_status,
                    error=failure.error,
                )
            self.log.debug(
                "batch_applied",
                entries=report.entries,
                upserted=report.upserted,
                deleted=report.deleted,
                retried=report.retried,
                failed=len(report.failures),
            )


class Acks:
    """Batches applied and not acknowledged yet. They are acknowledged together, in one write
    transaction (each holds the application's write lock), once they hold `limit` entries or
    the oldest has waited ACK_INTERVAL_S, and at `flush`."""

    def __init__(self, acknowledge: Callable[[list[Batch]], None], limit: int) -> None:
        self.acknowledge, self.limit = acknowledge, limit
        self.batches: list[Batch] = []
        self.entries = self.acknowledged = 0
        self.since = 0.0

    def add(self, batch: Batch) -> None:
        if not self.batches:
            self.since = time.monotonic()
        self.batches.append(batch)
        self.entries += batch.report.entries
        if self.entries >= self.limit or time.monotonic() - self.since >= ACK_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if self.batches:
            self.acknowledge(self.batches)
            self.acknowledged += self.entries
            self.batches, self.entries = [], 0


# A tuple, made once: `str | int | float` would make a union at every call (twice per entry).
JSON_SCALARS = (str, int, float)


def _json(key: Any) -> bool:
    """A key `Database.read_rows` can look up (a JSON scalar: not NULL, not a BLOB)."""
    return isinstance(key, JSON_SCALARS)


def _op(deleted: int) -> str:
    return "delete" if deleted else "upsert"
