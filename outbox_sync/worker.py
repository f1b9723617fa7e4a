"""The daemon's loop: wake within milliseconds of a commit, drain the outbox (batch.py), run the
chores it is handed (jobs), and ride out Typesense outages with a capped backoff.

`loop(now)` is one turn and takes the time, so tests drive it without sleeping; `run(stop)`
turns it until `stop` is set, waiting for a change in between (litestream's monitor loop around
`Sync()`, huey's `loop(now)`).
"""

import contextlib
import json
import os
import select
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from outbox_sync import reindex, stats
from outbox_sync.batch import Applier
from outbox_sync.claims import Claims
from outbox_sync.config import DEFAULT_BATCH_SIZE
from outbox_sync.db import Database, is_busy
from outbox_sync.errors import (
    CollectionNotFoundError,
    DatabaseBusyError,
    DatabaseFullError,
    OutboxSyncError,
    StoppingError,
    TypesenseUnavailableError,
)
from outbox_sync.health import RESTART_WATCH_OFF_KEY
from outbox_sync.localserver import LocalTypesense
from outbox_sync.lock import DaemonLock
from outbox_sync.notify import notify
from outbox_sync.reconcile import Reconciler
from outbox_sync.schema import SchemaWatch
from outbox_sync.telemetry import REFRESH_INTERVAL_S, Telemetry
from outbox_sync.typesense_index import RestartWatch, TypesenseIndex
from outbox_sync.wakeup import ChangeWatch

# Without a change watch (wakeup.py), how often the idle loop asks SQLite whether anything
# committed (`PRAGMA data_version`, a few microseconds): 4 % of a core, measured. The daemon
# waits on the watch instead: 0.02 % idle, and a shorter commit-to-wake-up time
# (tests/bench/idle.py).
DEFAULT_POLL_INTERVAL_S = 0.001
# Look at the outbox at least this often even when data_version says nothing changed.
DEFAULT_IDLE_RECHECK_S = 1.0
# Backoff while Typesense is unavailable: doubles from the minimum up to the maximum.
DEFAULT_MIN_BACKOFF_S = 0.25
DEFAULT_MAX_BACKOFF_S = 10.0
# When idle, ask Typesense whether it is healthy this often (for /healthz and metrics).
HEALTH_PROBE_INTERVAL_S = 5.0
# How often the restart watch (typesense_index.RestartWatch) uses its connections.
RESTART_WATCH_INTERVAL_S = HEALTH_PROBE_INTERVAL_S
# While an outage lasts, repeat the warning at most this often.
OUTAGE_LOG_INTERVAL_S = 60.0
# While changes flow, one `synced` line this often (nothing while idle).
PROGRESS_INTERVAL_S = 60.0
# How often the WAL's uncheckpointed bytes are measured for /metrics (a checkpoint each).
WAL_LOOK_INTERVAL_S = 60.0
# Saving the per-minute statistics into their minute's row: this often while there is work (so
# `report` counts the current minute too, at most this late), when the loop ends, and while idle
# once a minute (Telemetry.stats_due). A save is one write transaction on the application's
# file, 4.0 ms median (p95 5.8 ms) when its commit waited for the WAL's fsync (SQLite's default
# synchronous=FULL), 0.14 ms without, which it now does without (stats.save), measured here with
# a month of rows.
STATS_SAVE_INTERVAL_S = 5.0


class Index(Protocol):
    """What the loop needs of the Typesense side."""

    def ensure_collection(self) -> bool: ...
    def health_problem(self) -> str | None: ...


class Stopping(Protocol):
    """What the loop asks of a stop request: a threading.Event, or a Stop."""

    def is_set(self) -> bool: ...
    def wait(self, timeout: float, /) -> bool: ...


class Stop:
    """A request to stop that a signal handler may make: `threading.Event.set()` takes a lock
    the interrupted thread may hold (a deadlock, reproduced with the loop in `stop.wait()`);
    this sets a flag and writes a byte to a pipe, which wakes `wait()` and the loop's change
    watch (`wakers`)."""

    def __init__(self) -> None:
        self._set = False
        self.signal: str | None = None  # the signal that asked, if one did
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self.wakers: list[Callable[[], None]] = []

    def set(self, signal: str | None = None) -> None:
        self.signal = self.signal or signal
        self._set = True
        with contextlib.suppress(OSError):  # full or closed: a wake-up is pending anyway
            os.write(self._write, b"x")
        for wake in self.wakers:
            wake()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout_s: float) -> bool:
        if not self._set:
            select.select([self._read], [], [], max(0.0, timeout_s))
        return self._set

    def close(self) -> None:
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


class Job:
    """A chore of the loop: `run(now)` every `interval_s` (0: every turn), first at the first
    turn, or one interval after it with due_at_start=False. It may raise a retryable error
    (Typesense trouble, a locked database, a missing table): the loop pauses, and the job stays
    due. at_stop: what to do when the loop ends. settle: for `run --once`, finish what the job
    has under way (or leave it, once the stop it is given is set); True when that queued
    entries the loop must apply before it stops. first: the job runs before the collections
    are touched, first in each turn and also while the loop, at start, waits for them: the
    embedded server's supervision (nothing failing for want of Typesense, as that check, may
    keep it from starting a dead server) and the claims (nothing is written to a collection
    another database feeds)."""

    def __init__(
        self,
        name: str,
        interval_s: float,
        run: Callable[[float], Any],
        *,
        due_at_start: bool = True,
        at_stop: Callable[[], Any] | None = None,
        settle: Callable[[Stopping], bool] | None = None,
        first: bool = False,
    ) -> None:
        self.name, self.interval_s, self.run = name, interval_s, run
        self.at_stop, self.settle = at_stop, settle
        self.first = first
        self.next_at: float | None = float("-inf") if due_at_start else None

    def due(self, now: float) -> bool:
        if self.next_at is None:  # the first turn
            self.next_at = now + self.interval_s
        return now >= self.next_at

    def done(self, now: float) -> None:
        self.next_at = now + self.interval_s


@dataclass(frozen=True)
class Turn:
    """What one turn of the loop did: entries applied, or paused (it waited out trouble), or
    the drain ended at a schema change, which the next turn's watch looks at (`again`)."""

    applied: int = 0
    paused: bool = False
    again: bool = False


class Backoff:
    """Capped exponential delay, with one log line when trouble starts, a reminder now and then,
    and one when it ends."""

    def __init__(self, log: Any, minimum_s: float, maximum_s: float) -> None:
        self.log, self.minimum_s, self.maximum_s = log, minimum_s, maximum_s
        self.delay_s = minimum_s
        self.since: float | None = None
        self.logged_at = 0.0

    def failed(self, error: Exception, now: float, **context: Any) -> float:
        delay = self.delay_s
        if self.since is None or now - self.logged_at >= OUTAGE_LOG_INTERVAL_S:
            self.log.warning(
                "sync_paused",
                reason=str(error),
                retry_in_s=delay,
                outage_s=0.0 if self.since is None else round(now - self.since, 1),
                **context,
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
        indexes: Sequence[Index],
        applier: Applier,
        jobs: Sequence[Job] = (),
        *,
        telemetry: Telemetry,
        after_outage: Callable[[], None] = lambda: None,
        watch_changes: bool = False,
        embedded: bool = False,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        idle_recheck_s: float = DEFAULT_IDLE_RECHECK_S,
        min_backoff_s: float = DEFAULT_MIN_BACKOFF_S,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
    ) -> None:
        self.db, self.indexes, self.applier, self.telemetry = db, indexes, applier, telemetry
        self.jobs = {job.name: job for job in jobs}
        self.after_outage = after_outage
        self.watch_changes = watch_changes
        self.embedded = embedded  # Typesense is the daemon's own server, at no URL given
        self.watch: ChangeWatch | None = None  # while `run` runs, with watch_changes
        self.typesense_down = self.collection_lost = False
        self.poll_interval_s = poll_interval_s
        self.idle_recheck_s = idle_recheck_s
        self.probe_at = float("-inf")
        self.stopping: Stopping | None = None  # the turn's stop request, for the long chores
        self.log = structlog.get_logger("outbox_sync")
        self.backoff = Backoff(self.log, min_backoff_s, max_backoff_s)

    def run(self, stop: Stopping, *, once: bool = False) -> None:
        """Work until `stop` is set (or, with once=True, until the outbox is empty). Server
        trouble and a locked database pause the loop; other errors end it."""
        # Ready once the database is ours: waiting for Typesense here must not look like a
        # failed start to systemd (it would restart the daemon in a loop during an outage).
        self.telemetry.ready()
        # `once` never waits for a change: no watch, whose teardown alone (the kernel's, for an
        # inotify instance) took 8-15 ms of a `run --once`
        if self.watch_changes and not once:
            self.watch = watch_changes(self.db)
            if isinstance(stop, Stop):
                stop.wakers.append(self.watch.interrupt)  # SIGTERM ends the wait at once
        self.stopping = stop  # a job run below may wait: a stop ends its wait
        try:
            while not stop.is_set():
                try:
                    # a dead embedded server is started again here too: the check needs it
                    self._run_jobs(time.monotonic(), first=True)
                    self._ensure_collections()
                    break
                except TypesenseUnavailableError as error:
                    hint = {} if self.embedded else start_hint(error)  # no URL to be wrong
                    self._show_backlog()
                    self._pause(error, stop, **hint)
            while not stop.is_set():
                version = self._data_version()
                turn = self.loop(time.monotonic(), stop)
                if turn.paused or turn.applied or turn.again:
                    continue
                if once:
                    if any([job.settle(stop) for job in self.jobs.values() if job.settle]):
                        continue  # an audit queued repairs: apply them too
                    return
                self._wait_for_change(version, stop)
        finally:
            if isinstance(stop, Stop) and stop.signal is not None:  # said here, not by the handler
                self.log.info("stopping", signal=stop.signal)
                notify("STOPPING=1")
            for job in reversed(self.jobs.values()):  # the first started last: the owed
                # audit and the statistics are saved before the claims, given back over the
                # network, wait for a Typesense that may be away
                if job.at_stop is not None:
                    job.at_stop()
            if self.watch is not None:
                self.watch.close()  # its inotify instance: 128 a user, by default
                self.watch = None

    def loop(self, now: float, stop: Stopping) -> Turn:
        """One turn: the chores that are due, then up to one drain slice of batches; while
        idle (or to see whether an outage is over), a health probe now and then."""
        self.telemetry.loop_alive(now)
        self.stopping = stop
        try:
            self._run_jobs(now, first=True)  # the rest may need Typesense, and the claims
            if self.collection_lost:
                self._ensure_collections()
                self.collection_lost = False
            self._run_jobs(now, first=False)
            applied = self.applier.drain(stop)
            in_outage = self.backoff.since is not None
            if in_outage or (not applied and now >= self.probe_at):
                # idle: ask Typesense now and then, so /healthz and the metrics stay true; an
                # empty outbox proves nothing about an outage, nor does a batch applied without
                # a request (rows failing validation), so probe to end one
                self.probe_at = now + HEALTH_PROBE_INTERVAL_S
                if (problem := self.indexes[0].health_problem()) is not None:
                    raise TypesenseUnavailableError(f"Typesense health check failed: {problem}")
                self.telemetry.reachable(True)
        except CollectionNotFoundError as error:
            # deleted behind our back (or lost by a failed reindex): make it again, or adopt a
            # rebuilt one, then audit: every row missing from it is queued again
            self.log.warning("collection_missing", reason=str(error), note="recreating, auditing")
            self.collection_lost = self.typesense_down = True  # audit once it is back
            return Turn(paused=True)
        except OutboxSyncError as error:
            if not error.retryable:
                raise
            self._pause(error, stop)
            return Turn(paused=True)
        except sqlite3.OperationalError as error:  # a read the application's lock held up, or
            explained = self.db.explain(error)  # one of our tables dropped under the daemon
            if not explained.retryable:
                raise
            self._pause(explained, stop)
            return Turn(paused=True)
        outage_s = self.backoff.succeeded(time.monotonic())
        self.telemetry.paused(None)
        if outage_s is not None and self.typesense_down:  # not a locked database, a lost table
            self.telemetry.outage_ended(time.time() - outage_s, time.time())
        if self.typesense_down:  # and back now
            self.typesense_down = False
            self.after_outage()
        return Turn(applied, again=self.applier.schema_moved)

    def _show_backlog(self) -> None:
        """The backlog figures (metrics, systemd's status) while the loop, at start, waits for
        Typesense: its backlog job runs only once the loop turns, so an outage from the start
        left them at 0, and the lag alert silent, while the changes piled up."""
        try:
            self.telemetry.backlog(*self.db.backlog())
        except sqlite3.OperationalError as error:  # the application's lock: shown next time
            if not is_busy(error):
                raise

    def _run_jobs(self, now: float, *, first: bool) -> None:
        """The jobs that are due, among those that run first or among the others."""
        for job in self.jobs.values():
            if job.first == first and job.due(now):
                job.run(now)
                job.done(now)

    def _ensure_collections(self) -> None:
        for index in self.indexes:
            index.ensure_collection()

    def _pause(self, error: Exception, stop: Stopping, **context: Any) -> None:
        """Wait out server trouble, a locked database or a missing table, keeping the loop's
        heartbeat. Once Typesense answers again after trouble, `after_outage` is called (the
        daemon audits: it may have lost writes)."""
        if isinstance(error, TypesenseUnavailableError):
            self.telemetry.reachable(False, str(error))
            self.typesense_down = True
        deadline = time.monotonic() + self.backoff.failed(error, time.monotonic(), **context)
        self.telemetry.paused(self.backoff.since, str(error))
        while not stop.wait(max(0.0, min(1.0, deadline - time.monotonic()))):
            self.telemetry.loop_alive(time.monotonic())
            if time.monotonic() >= deadline:
                return

    def _wait_for_change(self, version: int | None, stop: Stopping) -> None:
        """Sleep until another connection may have committed (the change watch says so, or,
        without one, a 1 ms poll), or `idle_recheck_s` has passed; data_version says whether
        one did."""
        deadline = time.monotonic() + self.idle_recheck_s
        while not stop.is_set():
            if self.watch is not None:
                watching = self.watch.mode == "inotify"
                self.watch.wait(max(0.0, deadline - time.monotonic()))
                if watching and self.watch.mode != "inotify":  # gave up: as at start, say so
                    self.log.warning(
                        "change_watch",
                        mode=self.watch.mode,
                        reason=self.watch.reason,
                        note="polling the database from now on",
                    )
            elif stop.wait(self.poll_interval_s):
                return
            now = time.monotonic()
            self.telemetry.loop_alive(now)
            if version is None or self._data_version() != version or now >= deadline:
                return

    def _data_version(self) -> int | None:
        """PRAGMA data_version; None when the application's lock holds the read up (a file in
        rollback-journal mode): then there may be a change, and the turn finds out."""
        try:
            return self.db.data_version()
        except sqlite3.OperationalError as error:
            if not is_busy(error):
                raise
            return None


def watch_changes(db: Database) -> ChangeWatch:
    """A watch on the database's files; said in the log when it has to poll instead."""
    watch = ChangeWatch(Path(db.path))
    if watch.mode != "inotify":
        structlog.get_logger("outbox_sync").info(
            "change_watch", mode=watch.mode, reason=watch.reason, note="polling the database"
        )
    return watch


def start_hint(error: TypesenseUnavailableError) -> dict[str, str]:
    """At start, a refused connection is as likely a wrong URL as an outage: say so."""
    if "ConnectError" not in str(error):
        return {}
    return {
        "hint": "nothing accepts connections there: if Typesense is up, the URL may be wrong "
        "(--typesense-url, TYPESENSE_URL)"
    }


class Progress:
    """A loop job: one `synced` line a minute while changes flow (what was applied since the
    last, the lag, the backlog), nothing while idle."""

    def __init__(self, db: Database, telemetry: Telemetry) -> None:
        self.db, self.telemetry = db, telemetry
        self.seen: Counter[str] = Counter()

    def __call__(self, now: float) -> None:
        since = self.telemetry.totals - self.seen
        if not since:
            return
        self.seen = Counter(self.telemetry.totals)
        pending, lag_s, open_errors = self.db.backlog()
        structlog.get_logger("outbox_sync").info(
            "synced",
            upserted=since["upserted"],
            deleted=since["deleted"],
            failed=since["failed"],
            retried=since["retried"],
            pending=pending,
            lag_s=lag_s or 0.0,
            sync_errors_open=open_errors,
        )


def save_stats(db: Database, telemetry: Telemetry, *, when_due: bool = False) -> None:
    """Add what telemetry gathered since the last save to `sync_stats` (with `when_due`: only
    if Telemetry.stats_due)."""
    if when_due and not telemetry.stats_due(time.time()):
        return
    taken = telemetry.take_stats()
    if taken is not None:
        try:
            stats.save(db, *taken)
        except (DatabaseBusyError, DatabaseFullError) as error:  # not worth blocking the sync
            telemetry.give_back(*taken)  # the next save tries again
            structlog.get_logger("outbox_sync").warning("stats_not_saved", reason=str(error))


def supervise(
    server: LocalTypesense,
    reconciler: Reconciler,
    heartbeat: Callable[[], None] = lambda: None,
) -> None:
    """Start the embedded server again if it died, then audit: it may have come back without
    writes it had acknowledged. Waiting for it to be ready (up to a minute) keeps the loop's
    `heartbeat`; the daemon stopping ends the wait (the server is stopped with the daemon).
    Its log is kept under LOG_MAX_BYTES (LocalTypesense.trim_log)."""
    if server.process is None or server.process.poll() is None:
        server.trim_log()
        return
    structlog.get_logger("outbox_sync").warning(
        "embedded_typesense_exited",
        exit_code=server.process.returncode,
        note="starting it again, then auditing",
    )
    try:
        server.start(heartbeat=heartbeat)
    except StoppingError:  # the daemon stops the server with itself: the audit is owed to
        reconciler.request("embedded restart")  # its next start (Reconciler.stop)
        return
    except OutboxSyncError as error:
        message = f"the embedded Typesense did not come back: {error}"
        raise TypesenseUnavailableError(message) from None
    reconciler.request("embedded restart")


def restart_job(
    db: Database,
    watch: RestartWatch,
    request: Callable[[str], None],
    in_outage: Callable[[], bool],
) -> Job:
    """A loop job: asks for an audit (`request(reason)`) when Typesense restarted between two
    requests (typesense_index.RestartWatch). A restart the loop saw as an outage is its own to
    audit: nothing is asked while `in_outage()`, and the watch forgets its connections when
    the outage ends. The nodes it no longer watches are kept for `status` (RESTART_WATCH_OFF_KEY,
    with this process's pid: a daemon started since is not told by them)."""
    log = structlog.get_logger("outbox_sync")
    shown = db.get_meta(RESTART_WATCH_OFF_KEY)  # what `status` reads: written when it changes

    def look(_: float) -> None:
        nonlocal shown
        # the time of the look, not of the turn: a chore before it (a reindex) may take minutes
        if (lost := watch.lost(time.monotonic())) and not in_outage():
            log.warning(
                "typesense_restarted",
                nodes=lost,
                note="it closed a connection in use: it may have lost writes, auditing",
            )
            request("typesense restart")
        off = json.dumps({"pid": os.getpid(), "nodes": watch.off}) if watch.off else None
        if off != shown:
            db.set_meta(RESTART_WATCH_OFF_KEY, off)
            shown = off

    return Job("restarts", RESTART_WATCH_INTERVAL_S, look, due_at_start=False, at_stop=watch.close)


def daemon(
    db: Database,
    indexes: Sequence[TypesenseIndex],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    telemetry: Telemetry | None = None,
    audit_every_s: float = 0.0,
    server: LocalTypesense | None = None,
    lock: DaemonLock | None = None,
    claims: bool = False,
    **loop_options: float,
) -> Worker:
    """The daemon's worker over one index per mapping: the loop over a batch applier, with its
    chores: that the database's path still names the file it opened, the backlog figures for
    metrics and systemd, the fills `init` asked for and the reindexes asked for by
    `outbox-sync reindex`, the statistics, the triggers (put back when a migration took them),
    the embedded `server` if there is one (started again if it died), and audits: at start and
    every `audit_every_s` unless that is 0; after an outage, a trigger repair and an embedded
    restart always. With `claims`, it claims its collections first (claims.py)."""
    telemetry = telemetry or Telemetry()
    for index in indexes:
        index.observe = telemetry.request
    # A statement the application's lock holds up waits up to the busy timeout (30 s), and a
    # turn may make several (reads, in a rollback journal; statistics, an audit's record: they
    # give up and the turn goes on, then the acknowledgement): the loop's heartbeat goes on
    # while they wait, and a stop ends a wait within a moment (Database.wait_for_lock), or a
    # few such waits went past the watchdog's 90 s or systemd's TimeoutStopSec. A loop stuck
    # anywhere else still misses the watchdog.
    db.on_wait = lambda: telemetry.loop_alive(time.monotonic())

    backlog = Job("backlog", REFRESH_INTERVAL_S, lambda now: telemetry.backlog(*db.backlog()))
    # before the first write to a collection: another database's may be there
    claimed = Claims(db, indexes) if claims else None

    def heartbeat() -> None:
        """Between the chunks of a long chore (a fill, a reindex): keep the loop's heartbeat, so
        the watchdog does not take it for a hung loop, the claims, which the loop's job cannot
        refresh meanwhile (another database's daemon took them once CLAIM_FRESH_S had gone by),
        and the backlog figures, so that the lag alert sees the changes waiting meanwhile; end
        the chore if the daemon stops."""
        now = time.monotonic()
        telemetry.loop_alive(now)
        if claimed is not None:
            claimed.keep(now)
        if backlog.due(now):
            with contextlib.suppress(OutboxSyncError, sqlite3.Error):  # taken at the next beat
                backlog.run(now)
            backlog.done(now)
        if worker.stopping is not None and worker.stopping.is_set():
            raise StoppingError("the daemon is stopping")

    def check_files() -> None:
        db.check_same_file()
        if lock is not None:
            lock.check()

    mappings = [index.mapping for index in indexes]
    reconciler = Reconciler(db, indexes, telemetry, every_s=audit_every_s)
    jobs = []
    if claimed is not None:
        # every turn asks; `keep` claims once CLAIM_REFRESH_S has passed since its last claim,
        # the heartbeat's during a long chore included: one schedule for both
        jobs.append(Job("claims", 0, claimed.keep, at_stop=claimed.give_back, first=True))
    jobs += [
        Job("file", REFRESH_INTERVAL_S, lambda now: check_files()),
        Job("schema", 0, watch := SchemaWatch(db, mappings, reconciler.request)),
        backlog,
        # the fills `init` asked for, then a requested reindex, run here, pausing the sync
        Job(
            "reindex",
            REFRESH_INTERVAL_S,
            lambda now: (
                reindex.serve_fills(db, indexes, heartbeat)
                or reindex.serve_request(db, indexes, heartbeat)
            ),
        ),
        Job(
            "collections",
            reindex.COLLECTION_WATCH_INTERVAL_S,
            # at the first turn too: the document count it takes is what a change by another
            # is told from (one taken a minute later missed what was deleted meanwhile)
            reindex.CollectionWatch(
                db, indexes, reconciler.request, heartbeat, telemetry.collection_fields
            ),
        ),
        Job(
            "stats",
            STATS_SAVE_INTERVAL_S,
            lambda now: save_stats(db, telemetry, when_due=True),
            at_stop=lambda: save_stats(db, telemetry),
        ),
        Job("audit", 0, reconciler, settle=reconciler.settle, at_stop=reconciler.stop),
        Job("progress", PROGRESS_INTERVAL_S, Progress(db, telemetry), due_at_start=False),
    ]
    if telemetry.metrics is not None:  # a figure for /metrics alone: no look without it
        jobs.append(
            Job(
                "wal", WAL_LOOK_INTERVAL_S, lambda now: telemetry.wal(db.wal_uncheckpointed_bytes())
            )
        )
    if server is not None and server.started_empty:
        # documents synced before the server's data went are in no outbox entry: only an
        # audit puts them back (with --audit-every 0 nothing else would; on a first start it
        # is the start audit's work, or the fill's and cheap)
        reconciler.request("embedded server empty")
    if server is not None:
        jobs.append(
            Job(
                "embedded",
                HEALTH_PROBE_INTERVAL_S,
                lambda now: supervise(server, reconciler, heartbeat),
                first=True,
            )
        )
    # the embedded server is the daemon's own: `supervise` sees it restart
    restarts = indexes[0].restart_watch() if server is None else None
    if restarts is not None:
        jobs.append(restart_job(db, restarts, reconciler.request, lambda: worker.typesense_down))

    def after_outage() -> None:
        reconciler.request("outage")
        if restarts is not None:
            restarts.forget()

    by_name = {index.mapping.name: index for index in indexes}
    applier = Applier(db, by_name, batch_size=batch_size, telemetry=telemetry)

    def entries_missing(count: int) -> None:
        """Someone deleted outbox entries the daemon had not applied: their changes reach
        Typesense only through an audit (else the next scheduled one, a day later)."""
        structlog.get_logger("outbox_sync").warning(
            "outbox_entries_deleted",
            entries=count,
            note="changes not yet applied were deleted from the outbox by hand; auditing",
        )
        reconciler.request("outbox entries deleted")

    applier.on_missing = entries_missing
    applier.schema_seen = lambda: watch.version
    worker = Worker(
        db,
        indexes,
        applier,
        jobs,
        telemetry=telemetry,
        after_outage=after_outage,
        watch_changes=True,
        embedded=server is not None,
        **loop_options,
    )
    # here, not above: a wait for the lock before the worker is made (the claims' first write
    # of the database's id) asked a worker that was not there yet, and the daemon crashed
    db.stopping = lambda: worker.stopping is not None and worker.stopping.is_set()
    return worker
