"""What the daemon tells the outside world: Prometheus metrics with a /healthz beside them, the
systemd notify protocol, and the per-minute statistics (stats.py) it gathers for `report`.

The worker and the index call into one Telemetry object; nothing here touches Typesense.
"""

import collections
import json
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from outbox_sync.notify import Watchdog, notify, watchdog_interval_s
from outbox_sync.stats import LATENCY_BUCKETS_S, STATS_BUCKET_S, bucket_index, merge

# Backlog figures are recounted at most this often (a count over a large outbox is not free).
REFRESH_INTERVAL_S = 1.0
# Statistics that only sample how things stand (the backlog's highest, request latencies: the
# health probes'). While they are all there is, the daemon is idle, and its statistics wait for
# their minute to end (`stats_due`).
SAMPLES = frozenset({"backlog_max", "latency"})
# /healthz says the loop is stuck when it has not gone round for this long (a batch can take up
# to a request timeout or two).
LOOP_STALL_S = 30.0


class Metrics:
    # Long, and left so: the declaration of every metric the daemon exports, one after the
    # other (the dashboard and the alert rules name them; tests/test_monitoring.py reads both).
    def __init__(self) -> None:
        # Imported here: a daemon that serves no /metrics (the default) never imports it, which
        # spares 0.02-0.035 s of every start (docs/performance.md).
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "outbox_sync_typesense_request_duration_seconds",
            "Duration of Typesense requests, by operation and outcome.",
            ["operation", "outcome"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.applied = Counter(
            "outbox_sync_documents_applied_total",
            "Records applied to Typesense, by operation.",
            ["operation"],
            registry=self.registry,
        )
        self.retried = Counter(
            "outbox_sync_documents_retried_total",
            "Documents Typesense refused once and that were retried.",
            registry=self.registry,
        )
        self.given_up = Counter(
            "outbox_sync_documents_failed_total",
            "Records given up on (rows written to sync_errors), by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.pending = Gauge(
            "outbox_sync_outbox_pending", "Outbox entries waiting.", registry=self.registry
        )
        self.oldest_age = Gauge(
            "outbox_sync_outbox_oldest_age_seconds",
            "Age of the oldest waiting outbox entry (0 when empty): the sync lag.",
            registry=self.registry,
        )
        self.errors_open = Gauge(
            "outbox_sync_sync_errors_open",
            "Unresolved rows of sync_errors.",
            registry=self.registry,
        )
        self.typesense_up = Gauge(
            "outbox_sync_typesense_up",
            "1 when the last request to Typesense succeeded, else 0.",
            registry=self.registry,
        )
        self.last_success = Gauge(
            "outbox_sync_last_success_timestamp_seconds",
            "Unix time of the last batch applied.",
            registry=self.registry,
        )
        self.audit_drift = Gauge(
            "outbox_sync_audit_drift",
            "Records the last audit found drifted, by collection and kind "
            "(missing, extra, stale, invalid, shared).",
            ["collection", "kind"],
            registry=self.registry,
        )
        self.audit_last_success = Gauge(
            "outbox_sync_audit_last_success_timestamp_seconds",
            "Unix time the last audit finished (0 before the first one).",
            registry=self.registry,
        )
        self.sync_paused = Gauge(
            "outbox_sync_sync_paused",
            "1 while the sync waits out trouble (Typesense unavailable, the database locked, "
            "a table gone, a full disk), else 0.",
            registry=self.registry,
        )
        self.fields_changed = Gauge(
            "outbox_sync_collection_fields_changed",
            "1 while the collection, as the daemon last looked (every minute), lacks the "
            "mapping's fields: someone altered it in Typesense. The daemon rebuilds it; one "
            "that stays 1 it could not rebuild.",
            ["collection"],
            registry=self.registry,
        )
        self.wal_uncheckpointed = Gauge(
            "outbox_sync_database_wal_uncheckpointed_bytes",
            "Bytes of the database's WAL a checkpoint could not copy back, as the daemon last "
            "looked (every minute): a reader holding an old snapshot keeps the -wal file "
            "growing with every write.",
            registry=self.registry,
        )


class Telemetry:
    def __init__(self, *, metrics: bool = True) -> None:
        # The Prometheus metrics, when /metrics is served (`serve_metrics`).
        self.metrics = Metrics() if metrics else None
        self.watchdog = Watchdog(watchdog_interval_s())
        self.loop_at = time.monotonic()
        self.up_reason = "not checked yet"
        self.refreshed_at = float("-inf")
        self.up = False
        self.paused_since: float | None = None  # monotonic: since when the sync is paused
        self.paused_reason = ""
        self._stats: dict[str, Any] = {}
        # What the daemon has applied since it started, for its "synced" log line.
        self.totals: collections.Counter[str] = collections.Counter()
        self._stats_since: float | None = None
        self._lock = threading.Lock()

    # -- called by the index and the worker -----------------------------------------------------

    def request(self, operation: str, outcome: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.request_seconds.labels(operation, outcome).observe(seconds)
        with self._lock:
            counts = self._stats_section("latency", {}).setdefault(
                operation, [0] * (len(LATENCY_BUCKETS_S) + 1)
            )
            counts[bucket_index(seconds)] += 1

    def batch_applied(self, upserted: int, deleted: int, retried: int, reasons: list[str]) -> None:
        self.totals.update(upserted=upserted, deleted=deleted, retried=retried, failed=len(reasons))
        if self.metrics is not None:
            self.metrics.applied.labels("upsert").inc(upserted)
            self.metrics.applied.labels("delete").inc(deleted)
            self.metrics.retried.inc(retried)
            for reason in reasons:
                self.metrics.given_up.labels(reason).inc()
        with self._lock:
            applied = self._stats_section("applied", {})
            applied["upsert"] = applied.get("upsert", 0) + upserted
            applied["delete"] = applied.get("delete", 0) + deleted
            self._stats["retried"] = self._stats.get("retried", 0) + retried
            failed = self._stats_section("failed", {})
            for reason in reasons:
                failed[reason] = failed.get(reason, 0) + 1
        if upserted or deleted or retried or any(r != "validation" for r in reasons):
            self.reachable(True)  # Typesense answered; rows failing validation ask it nothing
        if self.metrics is not None:
            self.metrics.last_success.set(time.time())

    def reachable(self, up: bool, reason: str = "") -> None:
        self.up, self.up_reason = up, reason
        if self.metrics is not None:
            self.metrics.typesense_up.set(1 if up else 0)

    def paused(self, since: float | None, reason: str = "") -> None:
        """The loop waits out trouble (since `since`), or (None) it works again."""
        self.paused_since, self.paused_reason = since, reason
        if self.metrics is not None:
            self.metrics.sync_paused.set(0 if since is None else 1)

    def collection_fields(self, collection: str, changed: bool) -> None:
        """Whether the collection, as the daemon looked at it now, lacks the mapping's fields."""
        if self.metrics is not None:
            self.metrics.fields_changed.labels(collection).set(1 if changed else 0)

    def wal(self, uncheckpointed_bytes: int) -> None:
        if self.metrics is not None:
            self.metrics.wal_uncheckpointed.set(uncheckpointed_bytes)

    def outage_ended(self, started: float, ended: float) -> None:
        """An outage, in Unix time, for the weekly report's "longest outage"."""
        with self._lock:
            self._stats_section("outages", []).append([round(started, 3), round(ended, 3)])

    def audit_done(self, drift: dict[str, dict[str, int]], finished_unix: float) -> None:
        """A finished audit: `drift` by collection, then by kind."""
        if self.metrics is not None:
            for collection, kinds in drift.items():
                for kind, count in kinds.items():
                    self.metrics.audit_drift.labels(collection, kind).set(count)
            self.metrics.audit_last_success.set(finished_unix)

    def ready(self) -> None:
        """Start-up checks passed: tell systemd (Type=notify)."""
        notify("READY=1")

    def loop_alive(self, now: float) -> None:
        """Called by the loop on every turn: feeds /healthz and the systemd watchdog."""
        self.loop_at = now
        self.watchdog.beat(now)

    def backlog(self, pending: int, oldest_age_s: float | None, errors_open: int) -> None:
        if self.metrics is not None:
            self.metrics.pending.set(pending)
            self.metrics.oldest_age.set(oldest_age_s or 0.0)
            self.metrics.errors_open.set(errors_open)
        with self._lock:  # the report's backlog and lag over time: the highest sample a minute
            highest = self._stats_section("backlog_max", {})
            highest["pending"] = max(highest.get("pending", 0), pending)
            highest["oldest_age_s"] = max(highest.get("oldest_age_s", 0.0), oldest_age_s or 0.0)
        notify(
            f"STATUS=backlog {pending}, oldest {oldest_age_s or 0:.1f} s, open errors {errors_open}"
        )

    def stats_due(self, now_unix: float) -> bool:
        """Whether the statistics are worth a save now: they hold work done (entries applied,
        failures, an outage), or their minute is over. An idle daemon's hold only samples:
        saving them every few seconds took 40 % of its idle CPU, as each save is a write that
        its own change watch wakes on (docs/performance.md)."""
        with self._lock:
            if self._stats_since is None:
                return False
            if not SAMPLES.issuperset(self._stats):
                return True
            return now_unix // STATS_BUCKET_S > self._stats_since // STATS_BUCKET_S

    def take_stats(self) -> tuple[int, dict[str, Any]] | None:
        """The statistics gathered since the last call, as (minute they started in, data),
        for SQLite; None when there are none."""
        with self._lock:
            if self._stats_since is None:
                return None
            taken, since = self._stats, self._stats_since
            self._stats, self._stats_since = {}, None
        return int(since // STATS_BUCKET_S * STATS_BUCKET_S), taken

    def give_back(self, since: float, taken: dict[str, Any]) -> None:
        """Statistics `take_stats` gave that could not be saved: kept for the next save, under
        the older minute."""
        with self._lock:
            self._stats = merge(taken, self._stats)
            self._stats_since = min(since, self._stats_since or since)

    def _stats_section(self, name: str, empty: Any) -> Any:
        """A section of the current statistics (call with the lock held)."""
        if self._stats_since is None:
            self._stats_since = time.time()
        return self._stats.setdefault(name, empty)

    # -- /healthz -------------------------------------------------------------------------------

    def health(self, now: float) -> tuple[bool, str]:
        if now - self.loop_at > LOOP_STALL_S:
            return False, f"sync loop has not run for {now - self.loop_at:.0f} s"
        if not self.up:
            return False, f"typesense unreachable: {self.up_reason}"
        if self.paused_since is not None and now - self.paused_since > LOOP_STALL_S:
            return False, f"sync paused for {now - self.paused_since:.0f} s: {self.paused_reason}"
        return True, "ok"


# A scraper that opens a connection and sends nothing is dropped after this long.
METRICS_CONNECTION_TIMEOUT_S = 10.0


class _QuietHandler(WSGIRequestHandler):
    timeout = METRICS_CONNECTION_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the daemon's own logs


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """A thread per connection: one slow or idle client must not block the others."""

    daemon_threads = True


def serve_metrics(telemetry: Telemetry, host: str, port: int) -> WSGIServer:
    """Serve /metrics and /healthz on host:port from a background thread (the telemetry
    must keep metrics)."""
    from prometheus_client import make_wsgi_app

    if telemetry.metrics is None:
        raise ValueError("this telemetry keeps no metrics to serve")
    metrics_app = make_wsgi_app(telemetry.metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok, reason = telemetry.health(time.monotonic())
            body = json.dumps({"status": "ok" if ok else "unhealthy", "reason": reason}).encode()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [body]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    server = make_server(
        host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
