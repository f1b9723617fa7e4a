"""What operators and monitors see of a running daemon (/metrics, /healthz, log lines, `check`),
held against what is true: a real SQLite file and a real Typesense, faults put between them by
the fault proxy."""

import contextlib
import itertools
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from structlog.testing import capture_logs

from outbox_sync import db as db_module
from outbox_sync import reindex, stats, sync_errors
from outbox_sync.db import Database
from outbox_sync.lock import DaemonLock
from outbox_sync.telemetry import Telemetry
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import daemon
from tests.support.app import ROW_SQL, app_connection, insert_rows, make_row
from tests.support.cli import invoke
from tests.support.daemon import drain, record_failure, running
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.typesense import Server
from tests.support.wait import wait_until

TIMEOUT_S = 0.6


@pytest.fixture
def proxy(typesense_server: Server) -> Iterator[FaultProxy]:
    with FaultProxy(typesense_server.url) as proxy:
        yield proxy


def gauge(telemetry: Telemetry, name: str) -> float | None:
    assert telemetry.metrics is not None
    return telemetry.metrics.registry.get_sample_value(name)


def test_the_backlog_gauges_count_while_a_daemon_starts_into_an_outage(
    db: Database, db_path: Path, typesense_server: Server, collection: str, proxy: FaultProxy
) -> None:
    # Typesense answers nothing but 503 from the daemon's start: changes pile up, and the lag
    # alert and the dashboard read these gauges
    insert_rows(app_connection(db_path), range(1, 6))
    proxy.add(Fault("status", status=503, times=None))
    index = TypesenseIndex([proxy.url], typesense_server.api_key, collection, timeout_s=TIMEOUT_S)
    telemetry = Telemetry()
    worker = daemon(db, [index], telemetry=telemetry, min_backoff_s=0.01, max_backoff_s=0.05)
    with running(worker):
        wait_until(lambda: len(proxy.requests) >= 4, timeout_s=10, what="the daemon to retry")
        wait_until(
            lambda: gauge(telemetry, "outbox_sync_outbox_pending") == 5,
            timeout_s=5,
            what="outbox_sync_outbox_pending to count the 5 waiting entries",
        )
        assert (gauge(telemetry, "outbox_sync_outbox_oldest_age_seconds") or 0) > 0
        assert gauge(telemetry, "outbox_sync_typesense_up") == 0


def test_the_backlog_gauges_count_while_the_daemon_reindexes(
    db: Database, db_path: Path, index: TypesenseIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a daemon serving a reindex (minutes for a large table) kept the gauges of before it: the
    # changes written meanwhile wait, and the lag alert could not see them
    insert_rows(app_connection(db_path), range(1, 4))
    telemetry = Telemetry()
    worker = daemon(db, [index], telemetry=telemetry, audit_every_s=0)
    drain(worker)
    seen: list[float | None] = []  # the pending gauge as the rebuild went on
    rebuild = reindex.rebuild

    def long_rebuild(*args: Any, progress: Any, **kwargs: Any) -> Any:
        def slow(done: int, total: int) -> None:  # a rebuild of many chunks: 1.5 s of them
            app_connection(db_path).execute(ROW_SQL, make_row(100))  # the application writes on
            for _ in range(15):
                time.sleep(0.1)
                progress(done, total)  # the daemon's heartbeat
            seen.append(gauge(telemetry, "outbox_sync_outbox_pending"))

        return rebuild(*args, progress=slow, **kwargs)

    monkeypatch.setattr(reindex, "rebuild", long_rebuild)
    token = reindex.request(db, [index.collection])
    # read on a connection of its own: the worker's thread reads `db` raw now and then (its
    # text factory bytes-like meanwhile), so a status read on it came back as "b'...'" once
    watched = Database(db_path)
    with running(worker), contextlib.closing(watched):
        wait_until(
            lambda: (reindex.status(watched, token) or {}).get("state") == "done",
            what="the reindex to finish",
        )
    assert seen == [1.0], "the pending gauge kept its value from before the reindex"


def test_a_batch_that_sends_nothing_does_not_end_an_outage(
    db: Database, db_path: Path, typesense_server: Server, collection: str, proxy: FaultProxy
) -> None:
    index = TypesenseIndex([proxy.url], typesense_server.api_key, collection, timeout_s=TIMEOUT_S)
    index.ensure_collection()
    telemetry = Telemetry()
    worker = daemon(db, [index], telemetry=telemetry, min_backoff_s=0.01, max_backoff_s=0.05)
    stop = threading.Event()
    now = time.monotonic()
    assert worker.loop(now, stop).applied == 0  # idle: the probe says Typesense is up
    assert gauge(telemetry, "outbox_sync_typesense_up") == 1
    proxy.add(Fault("status", status=503, times=None))  # Typesense goes away
    assert worker.loop(now + 10, stop).paused  # the next probe fails: an outage
    assert gauge(telemetry, "outbox_sync_typesense_up") == 0
    # meanwhile the application writes a row that fails validation: its batch sends nothing
    app_connection(db_path).execute(ROW_SQL, make_row(1, sequence_number="ten"))
    with capture_logs() as logs:
        worker.loop(now + 20, stop)
    events = [entry["event"] for entry in logs]
    assert "sync_resumed" not in events, events  # Typesense still answers nothing but 503
    assert gauge(telemetry, "outbox_sync_typesense_up") == 0
    assert telemetry.health(time.monotonic())[0] is False
    assert db.backlog()[2] == 1  # the row's sync error was written all the same


@pytest.mark.parametrize(
    ("shape", "fault", "cause"),
    [
        ("0.24.1", Fault("status", status=503, times=None), "503"),
        ("v30", Fault("resource_error", resource="OUT_OF_DISK", times=None), "OUT_OF_DISK"),
    ],
)
def test_an_outage_found_while_idle_says_why_in_its_log_line_and_healthz(
    db: Database, typesense_server: Server, collection: str, shape: str, fault: Fault, cause: str
) -> None:
    with FaultProxy(typesense_server.url, shape=shape) as proxy:
        index = TypesenseIndex(
            [proxy.url], typesense_server.api_key, collection, timeout_s=TIMEOUT_S
        )
        index.ensure_collection()
        telemetry = Telemetry()
        worker = daemon(db, [index], telemetry=telemetry, min_backoff_s=0.01)
        stop = threading.Event()
        now = time.monotonic()
        worker.loop(now, stop)  # idle, Typesense healthy
        proxy.add(fault)
        with capture_logs() as logs:
            assert worker.loop(now + 10, stop).paused  # the idle probe finds the trouble
    [paused] = [entry for entry in logs if entry["event"] == "sync_paused"]
    assert cause in paused["reason"], paused
    ok, reason = telemetry.health(time.monotonic())
    assert not ok and cause in reason, reason


# Nagios plugin guidelines: a perfdata value (and each threshold) is in the class [-0-9.]
PERFDATA = re.compile(r"lag=[-0-9.]+s;[-0-9.]+;[-0-9.]+ pending=\d+ errors_open=\d+$")


def test_checks_perfdata_has_no_exponent_for_a_long_lag_or_a_long_max_lag(
    db_path: Path, typesense_server: Server, collection: str
) -> None:
    TypesenseIndex([typesense_server.url], typesense_server.api_key, collection).ensure_collection()
    app = app_connection(db_path)
    app.execute(ROW_SQL, make_row(1))
    # a daemon stopped for 17 days and started again: the change waits since
    app.execute("UPDATE outbox SET enqueued_at = enqueued_at - 1500000")
    with DaemonLock(db_path):
        for max_lag in ("60s", "3w"):
            result = invoke(["check", "--max-lag", max_lag], typesense_server, db_path, collection)
            line = result.output.strip()
            assert PERFDATA.search(line), line
            if max_lag == "60s":
                assert result.exit_code == 2 and "(> 60 s)" in line, line
            else:
                assert result.exit_code == 0 and "lag=1500000" in line, line


def test_the_backlog_counts_open_errors_again_only_once_the_file_changed(
    db_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon asks for the backlog every second, and counting the open sync errors walks
    each of them: 300,000, counted every second, took an idle daemon from 0.15 % to 4.5 % of a
    core. They are counted again once the file changed, and a costly count is spaced out."""
    now, cpu = [0.0], itertools.count(step=0.25)  # each count takes 0.25 s of CPU here
    clock = SimpleNamespace(
        **vars(time) | {"monotonic": lambda: now[0], "thread_time": cpu.__next__}
    )
    monkeypatch.setattr(db_module, "time", clock)
    for outbox_id in (1, 2, 3):
        record_failure(db, outbox_id, outbox_id, "refused", http_status=400, attempts=2)
    statements: list[str] = []
    db.conn.set_trace_callback(statements.append)

    def backlog(at: float) -> tuple[int, bool, int]:
        now[0] = at
        statements.clear()
        pending, age, open_errors = db.backlog()
        return pending, age is not None, open_errors

    def counted() -> list[str]:
        return [s for s in statements if "count(*)" in s]

    assert backlog(0) == (0, False, 3) and len(counted()) == 2  # the outbox and the errors
    assert backlog(1) == (0, False, 3) and statements == ["PRAGMA data_version"]  # idle
    stats.save(db, 0, {"retried": 1})  # the daemon's own statistics, once a minute idle
    assert backlog(1.5) == (0, False, 3) and counted() == []
    app_connection(db_path).execute(ROW_SQL, make_row(1))  # another connection commits
    sync_errors.resolve(Database(db_path), [1], "fixed")
    # the outbox at once; the errors, whose last count took 0.25 s, not before 25 s
    assert backlog(2) == (1, True, 3) and len(counted()) == 1
    assert backlog(26) == (1, True, 2) and len(counted()) == 1
    assert backlog(100) == (1, True, 2) and counted() == []  # nothing changed since
    record_failure(db, 4, 4, "refused", http_status=400, attempts=2)  # its own write
    assert backlog(101) == (1, True, 3) and len(counted()) == 2
