"""The daemon's own audits: compare Typesense with SQLite and queue what differs (audit.py), in a
background thread, so changes keep flowing while a large table is read in short transactions.

The daemon cannot see everything that happens between SQLite and Typesense, so it looks:
- when it starts (it cannot know what happened while it was down);
- after an outage, and after it restarted the embedded server: Typesense 0.24.1 can come back
  from a restart with fewer documents than it acknowledged;
- after it put back triggers a migration took away (changes made meanwhile left no outbox entry);
- every `--audit-every` (default 24 h), for whatever else (a restart between two health probes).
An audit asked for and not done when the daemon stops (stopped mid-way, or not begun) is owed:
the next start does it, also with `--audit-every 0`.
Each one logs `audit_done` (or `audit_failed`), sets the audit metrics, and is kept in
`outbox_sync_meta` for `status` and `check`.
"""

import contextlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from outbox_sync.audit import KINDS, Audit
from outbox_sync.db import Database, utc_now
from outbox_sync.errors import OutboxSyncError
from outbox_sync.telemetry import Telemetry
from outbox_sync.typesense_index import TypesenseIndex

if TYPE_CHECKING:
    from outbox_sync.worker import Stopping

LAST_AUDIT_KEY = "last_audit"
# The reason of an audit asked for and not done when the daemon stopped: its next start does it.
AUDIT_OWED_KEY = "audit_owed"
DEFAULT_AUDIT_EVERY_S = 24 * 3600.0
# The audit thread's nice value: the sync itself and the application come first.
AUDIT_NICENESS = 10
# How long a stopping daemon waits for a running audit to notice (it looks between chunks of
# 5,000 rows or documents: well under a second here) before it exits anyway.
STOP_WAIT_S = 10.0
# A failed audit (Typesense not ready after a restart, a busy database) is asked again after
# this, doubled at each failure up to the hour: the outage that asked for it is over, and
# nothing else would ask again before the schedule (24 h; never with --audit-every 0).
AUDIT_RETRY_S = 60.0
AUDIT_RETRY_MAX_S = 3600.0


class AuditStopped(Exception):
    """Raised inside the audit thread when the daemon stops."""


@dataclass(frozen=True)
class AuditRecord:
    """One audit of the daemon's, as `status` and `check` read it back."""

    reason: str
    finished_at: str  # ISO, UTC
    finished_unix: float
    ok: bool  # False: the audit itself failed (see error)
    consistent: bool
    drift: dict[str, int]
    enqueued: int  # outbox entries written to repair the drift
    duration_s: float
    error: str | None = None
    # per collection: {"drift": {kind: n}, "enqueued": n}; empty in a record an older version
    # wrote, whose figures are every collection's
    collections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def of(self, collections: Sequence[str]) -> "AuditRecord | None":
        """The record of these collections only (what `status --collection` shows); None when
        the audit did not cover them (a mapping added since). A failed audit stays one."""
        if not self.ok or not self.collections:
            return self
        ours = {name: one for name, one in self.collections.items() if name in collections}
        if not ours:
            return None
        drift = {
            kind: sum(one["drift"].get(kind, 0) for one in ours.values()) for kind in self.drift
        }
        return replace(
            self,
            consistent=self.ok and not any(drift.values()),
            drift=drift,
            enqueued=sum(one["enqueued"] for one in ours.values()),
            collections=ours,
        )


def last_audit(db: Database) -> AuditRecord | None:
    raw = db.get_meta(LAST_AUDIT_KEY)
    return None if raw is None else AuditRecord(**json.loads(raw))


class Reconciler:
    """A loop job (call it every turn): starts an audit with repair when one is due, in a
    thread of its own with its own database connection, and reports it once it is done."""

    def __init__(
        self,
        db: Database,
        indexes: Sequence[TypesenseIndex],
        telemetry: Telemetry,
        *,
        every_s: float,
    ) -> None:
        self.db, self.indexes, self.telemetry, self.every_s = db, indexes, telemetry, every_s
        self.log = structlog.get_logger("outbox_sync")
        # an audit the last run owed (AUDIT_OWED_KEY) comes first; then the one at start
        self.owed = db.get_meta(AUDIT_OWED_KEY)
        self.requested: str | None = self.owed or ("start" if every_s else None)
        self.running: str | None = None  # the reason of the audit under way
        self.next_at = float("inf")
        self.thread: threading.Thread | None = None
        self.outcome: AuditRecord | None = None
        self.stopping = threading.Event()
        self.retry: tuple[float, str] | None = None  # (when, why) a failed audit runs again
        self.retry_s = AUDIT_RETRY_S

    def request(self, reason: str) -> None:
        """Audit at the next turn (one audit answers several requests)."""
        self.requested = self.requested or reason

    def __call__(self, now: float) -> None:
        if self.thread is not None:
            if self.thread.is_alive():
                return
            outcome = self._report()
            if outcome is not None and not outcome.ok:
                self.retry = (now + self.retry_s, outcome.reason)
                self.retry_s = min(2 * self.retry_s, AUDIT_RETRY_MAX_S)
            elif outcome is not None:
                self.retry, self.retry_s = None, AUDIT_RETRY_S
        if self.requested is None and self.retry is not None and now >= self.retry[0]:
            self.requested, self.retry = self.retry[1], None
        if self.requested is None and now >= self.next_at:
            self.requested = "schedule"
        if self.requested is not None:
            reason, self.requested = self.requested, None
            if self.owed is not None:  # any audit pays what the last run owed
                with contextlib.suppress(OutboxSyncError):
                    self.db.set_meta(AUDIT_OWED_KEY, None)
                self.owed = None
            self.running = reason
            self.next_at = now + self.every_s if self.every_s else float("inf")
            self.stopping.clear()  # a loop run again after a stop audits again
            self.thread = threading.Thread(
                target=self._audit, args=(reason,), name="audit", daemon=True
            )
            self.thread.start()

    def settle(self, stop: "Stopping") -> bool:
        """Finish a requested or running audit here and now (for `run --once`), unless `stop`
        is set meanwhile (SIGTERM waited for the whole audit); True when it queued entries,
        which the loop must apply before it stops."""
        if self.requested is not None and self.thread is None:
            self(time.monotonic())
        if self.thread is None:
            return False
        while self.thread.is_alive():
            if stop.wait(0.1):
                return False  # the loop ends: at_stop (`stop`) stops the audit
        outcome = self._report()
        return outcome is not None and outcome.enqueued > 0

    def stop(self) -> None:
        """Stop a running audit and wait for its thread (the loop is ending): a thread still in
        SQLite or httpx while the interpreter shuts down can crash it. An audit asked for and
        not done (stopped, not begun, or failed and not yet asked again) is owed: kept in the
        database for the next start."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(STOP_WAIT_S)
        stopped = self.running if self.thread is not None and self.outcome is None else None
        if self.thread is not None and not self.thread.is_alive() and self.outcome is not None:
            # finished since the loop's last turn: report it as that turn would have, and
            # owe it if it failed (nothing else would ask again)
            outcome = self._report()
            if outcome is not None and not outcome.ok:
                self.retry = (0.0, outcome.reason)
        owed = self.requested or stopped or (self.retry and self.retry[1])
        if owed and owed != self.owed:
            with contextlib.suppress(OutboxSyncError):
                self.db.set_meta(AUDIT_OWED_KEY, owed)
            self.owed = owed

    def _go_on(self, phase: str, done: int, total: int) -> None:
        """The audit's progress: where it stops when the daemon does."""
        if self.stopping.is_set():
            raise AuditStopped

    def _audit(self, reason: str) -> None:
        """In the audit thread: audit, repair, and leave the outcome for the loop to report."""
        with contextlib.suppress(OSError, AttributeError):  # Linux: per-thread priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), AUDIT_NICENESS)
        started = time.monotonic()
        record: dict[str, Any] = {"reason": reason, "drift": {}, "enqueued": 0, "ok": False}
        record["consistent"], record["collections"] = False, {}
        db = None
        try:
            # a stop ends its waits for the lock, the first read's as it opens too
            db = Database(
                Path(self.db.path),
                busy_timeout_s=self.db.busy_timeout_s,
                stopping=self.stopping.is_set,
            )
            drift: Counter[str] = Counter()
            for index in self.indexes:  # one collection after the other
                with Audit(db, index, progress=self._go_on) as audit:
                    summary = audit.run()
                    enqueued = 0 if summary.consistent else audit.repair().enqueued
                drift.update(summary.counts)
                record["enqueued"] += enqueued
                one = {
                    "drift": {kind: summary.counts[kind] for kind in KINDS},
                    "enqueued": enqueued,
                }
                record["collections"][index.collection] = one
            record["drift"] = {kind: drift[kind] for kind in KINDS}
            record["consistent"] = not any(drift.values())
            record["ok"] = True
        except AuditStopped:
            return  # the daemon is stopping: nothing to report
        except OutboxSyncError as error:  # e.g. Typesense down: asked again (AUDIT_RETRY_S)
            record["error"] = str(error)
        except Exception as error:  # an audit must never take the daemon down
            record["error"] = f"{type(error).__name__}: {error}"
        finally:
            if db is not None:
                db.close()
        record.update(
            finished_at=utc_now(),
            finished_unix=time.time(),
            duration_s=round(time.monotonic() - started, 3),
        )
        self.outcome = AuditRecord(**record)

    def _report(self) -> AuditRecord | None:
        """In the loop: log the finished audit, set its metrics, keep it for `status`."""
        outcome, self.outcome, self.thread = self.outcome, None, None
        if outcome is None:
            return None
        fields = asdict(outcome)
        del fields["finished_unix"]
        if not outcome.ok:
            self.log.warning("audit_failed", **fields)
        else:
            (self.log.info if outcome.consistent else self.log.warning)("audit_done", **fields)
            drift = {name: one["drift"] for name, one in outcome.collections.items()}
            self.telemetry.audit_done(drift, outcome.finished_unix)
        # a busy database only loses the record (a power cut too: the commit does not wait
        # for the disk, and so holds the application's write lock ~1 ms less)
        with contextlib.suppress(OutboxSyncError), self.db.without_fsync(), self.db.aside():
            self.db.set_meta(LAST_AUDIT_KEY, json.dumps(asdict(outcome)))
        return outcome
