"""The daemon's loop: wake within milliseconds of a commit, drain the outbox (batch.py), run the
chores it is handed (jobs), and ride out Typesense outages with a capped backoff.

`loop(now)` is one turn and takes the time, so tests drive it without sleeping; `run(stop)`
turns it until `stop` is set, waiting for a change in between (litestream's monitor loop around
`Sync()`, huey's `loop(now)`).
"""

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from outbox_sync import reindex, stats
from outbox_sync.audit import Audit
from outbox_sync.batch import Applier
from outbox_sync.config import DEFAULT_BATCH_SIZE
from outbox_sync.db import Database
from outbox_sync.errors import DatabaseBusyError, TypesenseUnavailableError
from outbox_sync.telemetry import REFRESH_INTERVAL_S, Telemetry
from outbox_sync.typesense_index import TypesenseIndex

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
# When idle, ask Typesense whether it is healthy this often (for /healthz and metrics).
HEALTH_PROBE_INTERVAL_S = 5.0
# While an outage lasts, repeat the warning at most this often.
OUTAGE_LOG_INTERVAL_S = 60.0
# Saving the per-minute statistics into their minute's row: this often, and when the loop ends,
# so `report` counts the current minute too, at most this late. A save is one write transaction
# on the application's file, 4.0 ms median (p95 5.8 ms), nearly all of it the WAL fsync of the
# commit at SQLite's default synchronous=FULL (0.14 ms without), measured here with a month of
# rows: every 5 s that holds the write lock 0.08 % of the time, against 0.4 % every second.
STATS_SAVE_INTERVAL_S = 5.0


class Index(Protocol):
    """What the loop needs of the Typesense side."""

    def ensure_collection(self) -> bool: ...
    def healthy(self) -> bool: ...


class Job:
    """A chore of the loop: `run()` every `interval_s` (first at the first turn, unless
    due_at_start=False), and at the next turn after `trigger()`. It may raise
    TypesenseUnavailableError or DatabaseBusyError: the loop pauses, and the job stays due.
    after_outage: triggered by Typesense trouble (it runs once Typesense is back); at_stop: run
    once more when the loop ends."""

    def __init__(
        self,
        name: str,
        interval_s: float,
        run: Callable[[], Any],
        *,
        due_at_start: bool = True,
        after_outage: bool = False,
        at_stop: bool = False,
    ) -> None:
        self.name, self.interval_s, self.run = name, interval_s, run
        self.after_outage, self.at_stop = after_outage, at_stop
        self.next_at = float("-inf") if due_at_start else float("inf")

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def done(self, now: float) -> None:
        self.next_at = now + self.interval_s

    def trigger(self) -> None:
        self.next_at = float("-inf")


@dataclass(frozen=True)
class Turn:
    """What one turn of the loop did: entries applied, or paused (it waited out trouble)."""

    applied: int = 0
    paused: bool = False


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
        applier: Applier,
        jobs: Sequence[Job] = (),
        *,
        telemetry: Telemetry,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        idle_recheck_s: float = DEFAULT_IDLE_RECHECK_S,
        min_backoff_s: float = DEFAULT_MIN_BACKOFF_S,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
    ) -> None:
        self.db, self.index, self.applier, self.telemetry = db, index, applier, telemetry
        self.jobs = {job.name: job for job in jobs}
        self.poll_interval_s = poll_interval_s
        self.idle_recheck_s = idle_recheck_s
        self.probe_at = float("-inf")
        self.log = structlog.get_logger("outbox_sync")
        self.backoff = Backoff(self.log, min_backoff_s, max_backoff_s)

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
            while not stop.is_set():
                version = self.db.data_version()
                turn = self.loop(time.monotonic(), stop)
                if turn.paused or turn.applied:
                    continue
                if once:
                    return
                self._wait_for_change(version, stop)
        finally:
            for job in self.jobs.values():
                if job.at_stop:
                    job.run()

    def loop(self, now: float, stop: threading.Event) -> Turn:
        """One turn: the chores that are due, then up to one drain slice of batches; while
        idle (or to see whether an outage is over), a health probe now and then."""
        self.telemetry.loop_alive(now)
        try:
            for job in self.jobs.values():
                if job.due(now):
                    job.run()
                    job.done(now)
            applied = self.applier.drain(stop)
            in_outage = self.backoff.since is not None
            if not applied and (in_outage or now >= self.probe_at):
                # idle: ask Typesense now and then, so /healthz and the metrics stay true; an
                # empty outbox proves nothing about an outage, so probe to end one
                self.probe_at = now + HEALTH_PROBE_INTERVAL_S
                if not self.index.healthy():
                    raise TypesenseUnavailableError("Typesense health check failed")
                self.telemetry.reachable(True)
        except (TypesenseUnavailableError, DatabaseBusyError) as error:
            self._pause(error, stop)
            return Turn(paused=True)
        outage_s = self.backoff.succeeded(time.monotonic())
        if outage_s is not None:
            self.telemetry.outage_ended(time.time() - outage_s, time.time())
        return Turn(applied)

    def _pause(self, error: Exception, stop: threading.Event) -> None:
        """Wait out server trouble or a locked database, keeping the loop's heartbeat. After
        Typesense trouble, the reconcile job runs once it is back."""
        if isinstance(error, TypesenseUnavailableError):
            self.telemetry.reachable(False, str(error))
            for job in self.jobs.values():
                if job.after_outage:
                    job.trigger()
        deadline = time.monotonic() + self.backoff.failed(error, time.monotonic())
        while not stop.wait(max(0.0, min(1.0, deadline - time.monotonic()))):
            self.telemetry.loop_alive(time.monotonic())
            if time.monotonic() >= deadline:
                return

    def _wait_for_change(self, version: int, stop: threading.Event) -> None:
        deadline = time.monotonic() + self.idle_recheck_s
        while not stop.wait(self.poll_interval_s):
            now = time.monotonic()
            self.telemetry.loop_alive(now)
            if self.db.data_version() != version or now >= deadline:
                return


def save_stats(db: Database, telemetry: Telemetry) -> None:
    """Add what telemetry gathered since the last save to `sync_stats`."""
    taken = telemetry.take_stats()
    if taken is not None:
        try:
            stats.save(db, *taken)
        except DatabaseBusyError as error:  # statistics are not worth blocking the sync
            structlog.get_logger("outbox_sync").warning("stats_not_saved", reason=str(error))


def reconcile(db: Database, index: TypesenseIndex, telemetry: Telemetry) -> None:
    """Compare Typesense with SQLite and queue what differs. Typesense 0.24.1 can lose writes it
    acknowledged just before it restarted (seen in tests/test_daemon.py); the outbox cannot
    know, so after every outage the loop looks."""
    started = time.monotonic()
    with Audit(db, index, progress=lambda *_: telemetry.loop_alive(time.monotonic())) as audit:
        summary = audit.run()
        enqueued = 0 if summary.consistent else audit.repair().enqueued
    log = structlog.get_logger("outbox_sync")
    (log.warning if enqueued else log.info)(
        "reconciled",
        drift=summary.counts,
        enqueued=enqueued,
        duration_s=round(time.monotonic() - started, 1),
    )


def daemon(
    db: Database,
    index: TypesenseIndex,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    telemetry: Telemetry | None = None,
    **loop_options: float,
) -> Worker:
    """The daemon's worker: the loop over a batch applier, with its chores: the backlog figures
    for metrics and systemd, reindexes asked for by `outbox-sync reindex`, the statistics, and
    the reconcile after an outage."""
    telemetry = telemetry or Telemetry()
    index.observe = telemetry.request

    def heartbeat() -> None:  # a long chore must not look like a hung loop to the watchdog
        telemetry.loop_alive(time.monotonic())

    jobs = [
        Job("backlog", REFRESH_INTERVAL_S, lambda: telemetry.backlog(*db.backlog())),
        # a requested reindex runs here, pausing the sync meanwhile
        Job("reindex", REFRESH_INTERVAL_S, lambda: reindex.serve_request(db, index, heartbeat)),
        Job("stats", STATS_SAVE_INTERVAL_S, lambda: save_stats(db, telemetry), at_stop=True),
        Job(
            "reconcile",
            float("inf"),
            lambda: reconcile(db, index, telemetry),
            due_at_start=False,
            after_outage=True,
        ),
    ]
    applier = Applier(db, index, batch_size=batch_size, telemetry=telemetry)
    return Worker(db, index, applier, jobs, telemetry=telemetry, **loop_options)
