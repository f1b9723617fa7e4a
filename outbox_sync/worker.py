"""The poller: claim outbox entries in order, apply them to Typesense, acknowledge.

`run_once()` applies one batch; `run(stop)` loops, waking within milliseconds of a commit by
watching `PRAGMA data_version`, and backs off while Typesense is in trouble.
"""

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from outbox_sync import reindex
from outbox_sync.audit import Audit
from outbox_sync.db import Database, OutboxEntry, SyncFailure
from outbox_sync.documents import describe_row, document_id, document_line
from outbox_sync.errors import (
    DatabaseBusyError,
    InvalidRecordError,
    TypesenseUnavailableError,
)
from outbox_sync.telemetry import REFRESH_INTERVAL_S, STATS_BUCKET_S, Telemetry
from outbox_sync.typesense_index import ImportResult, TypesenseIndex

# Entries per batch. One import of 5,000 documents costs ~0.1 s here and reaches most of
# Typesense's throughput (see README "Performance"); larger batches only add latency.
DEFAULT_BATCH_SIZE = 5000
# How often the idle loop asks SQLite whether anything committed (`PRAGMA data_version`, a
# few microseconds). Measured idle CPU of the daemon here: 2.4 % of a core at 2 ms, 3.0 % at
# 1 ms, 4.7 % at 0.5 ms; the wake-up adds half the interval to the commit-to-search lag on
# average (a single-document upsert takes ~1 ms), so 1 ms.
DEFAULT_POLL_INTERVAL_S = 0.001
# Look at the outbox at least this often even when data_version says nothing changed.
DEFAULT_IDLE_RECHECK_S = 1.0
# Backoff while Typesense is unavailable: doubles from the minimum up to the maximum.
DEFAULT_MIN_BACKOFF_S = 0.25
DEFAULT_MAX_BACKOFF_S = 10.0
# A long drain hands back to the loop this often, for its chores (watchdog, metrics, reindex).
DRAIN_SLICE_S = 1.0
# When idle, ask Typesense whether it is healthy this often (for /healthz and metrics).
HEALTH_PROBE_INTERVAL_S = 5.0
# While an outage lasts, repeat the warning at most this often.
OUTAGE_LOG_INTERVAL_S = 60.0


class Index(Protocol):
    observe: Callable[[str, str, float], None] | None

    def ensure_collection(self) -> bool: ...
    def healthy(self) -> bool: ...
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
class Batch:
    """Claimed entries on their way through prepare -> apply -> acknowledge."""

    entries: list[OutboxEntry]
    report: BatchReport
    upserts: list[tuple[OutboxEntry, bytes]] = field(default_factory=list)
    deletes: list[OutboxEntry] = field(default_factory=list)
    synced: list[Any] = field(default_factory=list)

    @property
    def last_id(self) -> int:
        return self.entries[-1].id


class Backoff:
    """Capped exponential delay, with one log line when trouble starts, a reminder now and then,
    and one when it ends."""

    def __init__(self, log: Any, minimum_s: float, maximum_s: float) -> None:
        self.log, self.minimum_s, self.maximum_s = log, minimum_s, maximum_s
        self.delay_s = minimum_s
        self.since: float | None = None
        self.logged_at = 0.0

    def failed(self, error: Exception, now: float) -> float:
        delay = self.delay_s
        if self.since is None or now - self.logged_at >= OUTAGE_LOG_INTERVAL_S:
            self.log.warning(
                "sync_paused",
                reason=str(error),
                retry_in_s=delay,
                outage_s=0.0 if self.since is None else round(now - self.since, 1),
            )
            self.logged_at = now
        if self.since is None:
            self.since = now
        self.delay_s = min(self.delay_s * 2, self.maximum_s)
        return delay

    def succeeded(self, now: float) -> float | None:
        """Reset; the length of the outage that just ended, if any."""
        outage = None if self.since is None else now - self.since
        if outage is not None:
            self.log.info("sync_resumed", outage_s=round(outage, 1))
        self.since = None
        self.delay_s = self.minimum_s
        return outage


class Worker:
    def __init__(
        self,
        db: Database,
        index: Index,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        idle_recheck_s: float = DEFAULT_IDLE_RECHECK_S,
        min_backoff_s: float = DEFAULT_MIN_BACKOFF_S,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.db, self.index = db, index
        self.telemetry = telemetry or Telemetry()
        index.observe = self.telemetry.request
        self.refreshed_at = self.probed_at = self.stats_at = float("-inf")
        # Set by an outage: once Typesense is back, compare it with SQLite (see _reconcile).
        self.reconcile_due = False
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.idle_recheck_s = idle_recheck_s
        self.log = structlog.get_logger("outbox_sync")
        self.backoff = Backoff(self.log, min_backoff_s, max_backoff_s)

    def run_once(self) -> BatchReport:
        """Apply the oldest batch of outbox entries and acknowledge it. Raises
        TypesenseUnavailableError (nothing acknowledged: the batch is applied again later)."""
        batch = self._prepare(after=0)
        if batch is None:
            return BatchReport()
        self._apply(batch)
        self._ack(batch)
        return batch.report

    def drain(self, stop: threading.Event, max_seconds: float = DRAIN_SLICE_S) -> int:
        """Apply batches until the outbox is empty, `stop` is set or `max_seconds` have
        passed (so the loop's chores go on during a long drain); how many entries were
        acknowledged. Pipelined: while Typesense imports one batch (on a second thread), the
        next is read and encoded, and the previous acknowledged. Batches still reach Typesense
        one after the other, in order, so a record's changes are applied in commit order."""
        batch = self._prepare(after=0)
        if batch is None:
            return 0
        if len(batch.entries) < self.batch_size:  # all there is: nothing to overlap with, so
            self._apply(batch)  # spare the thread hand-off (the low-latency path)
            self._ack(batch)
            return len(batch.entries)
        acknowledged = 0
        until = time.monotonic() + max_seconds
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="import") as http:
            in_flight = http.submit(self._apply, batch)
            try:
                while True:
                    more = not stop.is_set() and time.monotonic() < until
                    upcoming = self._prepare(after=batch.last_id) if more else None
                    in_flight.result()  # server trouble: raise, `upcoming` is never sent
                    if upcoming is not None:
                        in_flight = http.submit(self._apply, upcoming)
                    self._ack(batch)
                    acknowledged += len(batch.entries)
                    if upcoming is None:
                        return acknowledged
                    batch = upcoming
            finally:
                wait([in_flight])  # never leave a request running behind an error

    def _prepare(self, after: int) -> Batch | None:
        """Claim the entries after id `after`, read their records' current rows and encode
        the documents (SQLite and CPU only)."""
        entries = self.db.claim(self.batch_size, after=after)
        if not entries:
            return None
        batch = Batch(entries, BatchReport(entries=len(entries)))
        latest: dict[Any, OutboxEntry] = {}
        for entry in entries:  # the last marker per record wins; its state is read now
            latest.pop(entry.sequence_id, None)
            latest[entry.sequence_id] = entry
        rows = self.db.read_records([k for k in latest if document_id(k) is not None])
        for key, entry in latest.items():
            row = rows.get(key)
            if document_id(key) is None:
                if entry.op == "delete":  # no document can have this id: nothing to delete
                    batch.synced.append(key)
                else:
                    batch.report.failures.append(
                        SyncFailure(
                            entry.id,
                            key,
                            "upsert",
                            None,
                            None,
                            f"id: expected an integer, got {key!r}",
                            1,
                        )
                    )
            elif row is None:
                batch.deletes.append(entry)
            else:
                try:
                    batch.upserts.append((entry, document_line(row)))
                except InvalidRecordError as error:
                    batch.report.failures.append(
                        SyncFailure(entry.id, key, "upsert", describe_row(row), None, str(error), 1)
                    )
        return batch

    def _apply(self, batch: Batch) -> None:
        """Send the batch to Typesense (network only: runs on the import thread)."""
        if batch.upserts:
            self._apply_upserts(batch.upserts, batch.synced, batch.report)
        if batch.deletes:
            self.index.delete_ids([str(entry.sequence_id) for entry in batch.deletes])
            batch.synced.extend(entry.sequence_id for entry in batch.deletes)
            batch.report.deleted = len(batch.deletes)

    def _ack(self, batch: Batch) -> None:
        report = batch.report
        self.db.ack(batch.last_id, batch.synced, report.failures)
        self.telemetry.batch_applied(
            report.upserted,
            report.deleted,
            report.retried,
            [str(f.http_status or "validation") for f in report.failures],
        )
        for failure in report.failures:
            self.log.warning(
                "record_failed",
                sequence_id=failure.sequence_id,
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

    def _apply_upserts(
        self, upserts: list[tuple[OutboxEntry, bytes]], synced: list[Any], report: BatchReport
    ) -> None:
        """Import, then retry the documents that failed once, immediately; the ones failing
        twice become sync_errors. A 5xx on a line is server trouble: nothing is given up."""
        pending = upserts
        for attempt in (1, 2):
            results = self.index.import_jsonl(b"\n".join(line for _, line in pending), len(pending))
            failed: list[tuple[OutboxEntry, bytes, ImportResult]] = []
            for (entry, line), result in zip(pending, results, strict=True):
                if result.ok:
                    synced.append(entry.sequence_id)
                    report.upserted += 1
                elif result.http_status is not None and result.http_status >= 500:
                    raise TypesenseUnavailableError(
                        f"Typesense answered {result.http_status} for a document: {result.error}",
                        result.http_status,
                    )
                else:
                    failed.append((entry, line, result))
            if not failed:
                return
            if attempt == 1:
                report.retried += len(failed)
                pending = [(entry, line) for entry, line, _ in failed]
        for entry, line, result in failed:
            report.failures.append(
                SyncFailure(
                    entry.id,
                    entry.sequence_id,
                    "upsert",
                    line.decode(),
                    result.http_status,
                    result.error or "import failed",
                    2,
                )
            )

    def run(self, stop: threading.Event, *, once: bool = False) -> None:
        """Work until `stop` is set (or, with once=True, until the outbox is empty). Server
        trouble and a locked database pause the loop; other errors end it."""
        # Ready once the database is ours: waiting for Typesense here must not look like a
        # failed start to systemd (it would restart the daemon in a loop during an outage).
        self.telemetry.ready()
        try:
            while not stop.is_set():
                try:
                    self.index.ensure_collection()
                    break
                except TypesenseUnavailableError as error:
                    self._pause(error, stop)
            else:
                return
            while not stop.is_set():
                version = self.db.data_version()
                applied = self._step(stop)
                if applied is None or applied:
                    continue
                if once:
                    return
                self._wait_for_change(version, stop)
        finally:
            self._save_stats()

    def _step(self, stop: threading.Event) -> int | None:
        """One turn of the loop: the periodic chores, then up to DRAIN_SLICE_S of batches.
        How many entries were applied; None when paused."""
        now = time.monotonic()
        self.telemetry.loop_alive(now)
        if now - self.refreshed_at >= REFRESH_INTERVAL_S:
            self.refreshed_at = now
            self.telemetry.backlog(*self.db.backlog())
            if isinstance(self.index, TypesenseIndex):
                # a requested reindex runs here, pausing the sync meanwhile
                reindex.serve_request(
                    self.db, self.index, lambda: self.telemetry.loop_alive(time.monotonic())
                )
        if now - self.stats_at >= STATS_BUCKET_S:
            self.stats_at = now
            self._save_stats()
        try:
            applied = self.drain(stop)
        except (TypesenseUnavailableError, DatabaseBusyError) as error:
            self._pause(error, stop)
            return None
        outage_s = self.backoff.succeeded(time.monotonic())
        if outage_s is not None:
            self.telemetry.outage_ended(time.time() - outage_s, time.time())
        if not applied and now - self.probed_at >= HEALTH_PROBE_INTERVAL_S:
            # idle: ask Typesense now and then, so /healthz and the metrics stay true
            self.probed_at = now
            healthy = self.index.healthy()
            self.telemetry.reachable(healthy, "health check failed")
            self.reconcile_due |= not healthy
        if self.reconcile_due and isinstance(self.index, TypesenseIndex):
            try:
                self._reconcile(self.index)
            except TypesenseUnavailableError as error:
                self._pause(error, stop)
            return None  # go round again: the repair may have queued entries
        return applied

    def _reconcile(self, index: TypesenseIndex) -> None:
        """After Typesense was unreachable, compare it with SQLite and queue what differs.
        Typesense 0.24.1 can lose writes it acknowledged just before it restarted (seen in
        tests/test_daemon.py); the outbox cannot know, so we look."""
        started = time.monotonic()
        with Audit(
            self.db, index, progress=lambda *_: self.telemetry.loop_alive(time.monotonic())
        ) as audit:
            summary = audit.run()
            enqueued = 0 if summary.consistent else audit.repair().enqueued
        self.reconcile_due = False
        log = self.log.warning if enqueued else self.log.info
        log(
            "reconciled",
            drift=summary.counts,
            enqueued=enqueued,
            duration_s=round(time.monotonic() - started, 1),
        )

    def _pause(self, error: Exception, stop: threading.Event) -> None:
        """Wait out server trouble or a locked database, keeping the loop's heartbeat."""
        if isinstance(error, TypesenseUnavailableError):
            self.telemetry.reachable(False, str(error))
            self.reconcile_due = True
        deadline = time.monotonic() + self.backoff.failed(error, time.monotonic())
        while not stop.wait(max(0.0, min(1.0, deadline - time.monotonic()))):
            self.telemetry.loop_alive(time.monotonic())
            if time.monotonic() >= deadline:
                return

    def _save_stats(self) -> None:
        taken = self.telemetry.take_stats()
        if taken is not None:
            try:
                self.db.save_stats(*taken)
            except DatabaseBusyError as error:  # statistics are not worth blocking the sync
                self.log.warning("stats_not_saved", reason=str(error))

    def _wait_for_change(self, version: int, stop: threading.Event) -> None:
        deadline = time.monotonic() + self.idle_recheck_s
        while not stop.wait(self.poll_interval_s):
            now = time.monotonic()
            self.telemetry.loop_alive(now)
            if self.db.data_version() != version or now >= deadline:
                return
