"""Applying the outbox: claim the oldest entries, read their records' current rows, send them to
Typesense, acknowledge. `apply_once()` is one batch; `drain()` pipelines batches until the outbox
is empty (litestream's `Sync()`: one step, called by the loop in worker.py).

One batch may hold entries of several mappings: each mapping's rows are read with its own SELECT
(SQLite writes the finished JSON line of each valid row, see mapping.py) and imported into its
own collection.
"""

import time
from collections import deque
from collections.abc import Callable, Iterator
from collections.abc import Mapping as Lookup
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from outbox_sync.db import Database, OutboxEntry, SyncFailure, row_key
from outbox_sync.errors import InvalidRecordError, TypesenseUnavailableError
from outbox_sync.mapping import Mapping
from outbox_sync.telemetry import Telemetry
from outbox_sync.typesense_index import IN_FLIGHT, ImportResult, free_request_bodies

# A long drain hands back to the loop this often, for its chores (metrics, triggers, reindex
# requests, statistics); it keeps the loop's heartbeat itself (watchdog, /healthz). Each
# hand-back lets the requests in flight finish and Typesense wait for the next slice's first
# batch, 0.04-0.07 s (tests.bench.gaps): at 1 s that was 0.14-0.23 s of a 100k drain, at 5 s
# 0.13 s of a 300k one and 0.7 s of a 1M one.
DRAIN_SLICE_S = 15.0
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


@dataclass
class Work:
    """What one batch sends to one collection."""

    upserts: list[tuple[OutboxEntry, bytes]] = field(default_factory=list)
    deletes: list[tuple[OutboxEntry, str]] = field(default_factory=list)  # and the document id


@dataclass
class Batch:
    """Claimed entries on their way through prepare -> apply -> acknowledge."""

    entries: list[OutboxEntry]
    report: BatchReport
    work: dict[str, Work] = field(default_factory=dict)  # by mapping
    synced: list[tuple[str, Any]] = field(default_factory=list)  # (mapping, key)
    records: set[tuple[str, Any]] = field(default_factory=set)  # (mapping, key) it touches

    @property
    def last_id(self) -> int:
        return self.entries[-1].id

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
        self.log = structlog.get_logger("outbox_sync")
        self.unknown_logged: set[str] = set()

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
        passed (so the loop's chores go on during a long drain); how many entries were
        acknowledged. Pipelined: while Typesense imports a batch (on an import thread), the
        next is read and encoded, and sent beside it if the two share no record (Typesense
        takes the second request's body while it indexes the first, and is never left
        waiting for the daemon between them). A record's changes are still applied in commit
        order: a batch that touches a record in flight waits for that answer, and failed
        lines are retried before the batch after the next is sent. Acknowledgements go in
        outbox order and are coalesced (`Acks`); all that was applied is acknowledged before
        the drain returns or raises."""
        acks = Acks(self._ack, self.batch_size)
        batches = self._batches(stop, time.monotonic() + max_seconds)
        try:
            batch = next(batches, None)
            while batch is not None and len(batch.entries) < self.batch_size:
                # all there is: no next batch to overlap with, so spare the thread hand-off
                # (the low-latency path); what came meanwhile is applied next
                self._apply(batch)
                acks.add(batch)
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
        """Prepared batches in outbox order, while there are entries, time and no stop."""
        batch = self._prepare(after=0)
        while batch is not None:
            yield batch
            now = time.monotonic()
            self.telemetry.loop_alive(now)  # a drain is the loop at work
            if stop.is_set() or now >= until:
                return
            batch = self._prepare(after=batch.last_id)

    def _prepare(self, after: int) -> Batch | None:
        """Claim the entries after id `after`, read their records' current rows (SQLite writes
        the JSON lines) and sort them into upserts, deletes and failures (SQLite and CPU
        only)."""
        entries = self.db.claim(self.batch_size, after=after)
        if not entries:
            return None
        batch = Batch(entries, BatchReport(entries=len(entries)))
        # the last marker per record wins; its state is read now
        latest = {(entry.mapping, entry.key): entry for entry in entries}
        batch.records = set(latest)
        by_mapping: dict[str, list[OutboxEntry]] = {}
        for entry in latest.values():
            by_mapping.setdefault(entry.mapping, []).append(entry)
        for name, group in by_mapping.items():
            index = self.indexes.get(name)
            if index is None:
                self._unknown(name, len(group))
            else:  # the mapping as the collection lets it be (see ensure_collection)
                self._prepare_mapping(batch, index.mapping, group)
        return batch

    def _prepare_mapping(self, batch: Batch, mapping: Mapping, group: list[OutboxEntry]) -> None:
        work = batch.work.setdefault(mapping.name, Work())
        # One entry per record here. Keys no document can have are looked up too: a tag of a
        # character keyed '' that is gone, or one outside the `where`, is no record to report.
        found = self.db.read_rows(mapping, [entry.key for entry in group if _json(entry.key)])
        rows = {row_key(row[0]): row for row in found}
        for entry in group:
            row = rows.get(entry.key)
            if row is not None:  # the judge also refuses a key no document can have
                try:
                    work.upserts.append((entry, mapping.judge(row)))
                except InvalidRecordError as error:
                    batch.fail(entry, mapping.describe_row(row[2]), str(error))
                continue
            doc_id = mapping.document_id(entry.key)  # only a delete needs it: the line has it
            if doc_id is None:  # no document can have this key
                if entry.op == "delete" or _json(entry.key):  # no row of it: nothing to do
                    batch.synced.append((mapping.name, entry.key))
                else:  # NULL or a BLOB: its row cannot be looked up by it
                    batch.fail(entry, None, mapping.key_problem(entry.key) or "")
            else:  # gone, or outside the mapping's `where`
                work.deletes.append((entry, doc_id))

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
                self._apply_upserts(batch, index, work.upserts)
            if work.deletes:
                index.delete_ids([doc_id for _, doc_id in work.deletes])
                batch.synced.extend((name, entry.key) for entry, _ in work.deletes)
                batch.report.deleted += len(work.deletes)

    def _apply_upserts(
        self, batch: Batch, index: Index, upserts: list[tuple[OutboxEntry, bytes]]
    ) -> None:
        """Import, then retry the documents that failed once, immediately; the ones failing
        twice become sync_errors. A 5xx on a line is server trouble: nothing is given up."""
        pending = upserts
        for attempt in (1, 2):
            results = index.import_jsonl(b"\n".join([line for _, line in pending]), len(pending))
            failed: list[tuple[OutboxEntry, bytes, ImportResult]] = []
            for (entry, line), result in zip(pending, results, strict=True):
                if result.ok:
                    batch.synced.append((entry.mapping, entry.key))
                    batch.report.upserted += 1
                elif result.http_status is not None and result.http_status >= 500:
                    raise TypesenseUnavailableError(
                        f"Typesense answered {result.http_status} for a document: {result.error}",
                        result.http_status,
                    )
                else:
                    failed.append((entry, line, result))
            if attempt == 1:
                batch.report.retried += len(failed)
            pending = [(entry, line) for entry, line, _ in failed]
            if not pending:
                return
        for entry, line, result in failed:
            error = result.error or "import failed"
            batch.fail(entry, line.decode(), error, http_status=result.http_status, attempts=2)

    def _ack(self, batches: list[Batch]) -> None:
        """Acknowledge applied batches, consecutive ones, in one write transaction."""
        self.db.ack_batches(
            batches[-1].last_id, [(batch.synced, batch.report.failures) for batch in batches]
        )
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
        self.entries += len(batch.entries)
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
