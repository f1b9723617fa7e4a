"""`outbox-sync report`: a Worker with a Telemetry goes through known work against a real
Typesense, its statistics are saved as the daemon saves them, and the report adds up."""

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from outbox_sync import stats
from outbox_sync.db import Database
from outbox_sync.localserver import LocalTypesense
from outbox_sync.report import error_kind, parse_since
from outbox_sync.stats import STATS_BUCKET_S
from outbox_sync.telemetry import Telemetry
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import daemon
from tests.support.app import ROW_SQL, app_connection, make_row
from tests.support.cli import invoke, one_line
from tests.support.typesense import Server, refusing_collection
from tests.support.wait import wait_until


def report(server: Server, db_path: Path, *args: str) -> Any:
    result = invoke(["report", "--json", *args], server, db_path, "unused")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_report_adds_up_what_the_worker_did(
    db_path: Path, db: Database, typesense_server: Server, collection: str
) -> None:
    # a collection that refuses documents with a comment (400), and one row failing validation
    refusing_collection(typesense_server, collection)
    index = TypesenseIndex([typesense_server.url], typesense_server.api_key, collection)
    telemetry = Telemetry()
    worker = daemon(db, index, telemetry=telemetry)
    app = app_connection(db_path)
    app.executemany(ROW_SQL, [make_row(i, comment=None) for i in range(1, 9)])
    app.execute(ROW_SQL, make_row(9, comment="refused"))
    app.execute(ROW_SQL, make_row(10, comment=None, sequence_number="ten"))
    worker.applier.apply_once()  # import 9 documents, then the refused one again: 8 applied
    app.execute("DELETE FROM sequences WHERE id IN (1, 2)")
    worker.applier.apply_once()  # one delete request
    app.execute("UPDATE sequences SET sequence_number = 10 WHERE id = 10")
    worker.applier.apply_once()  # the fixed row: applied, and its error closes itself
    taken = telemetry.take_stats()
    assert taken is not None
    stats.save(db, *taken)

    figures = report(typesense_server, db_path, "--since", "1h")
    assert figures["stats_minutes"] == 1
    assert figures["applied"] == {"upsert": 9, "delete": 2, "total": 11}
    assert figures["retried"] == 1
    assert figures["given_up"]["total"] == 2
    assert figures["given_up"]["by_status"] == {"400": 1, "validation": 1}
    kinds = {kind["kind"]: kind["count"] for kind in figures["given_up"]["by_kind"]}
    assert kinds == {
        "HTTP 400: Field `comment` must be an int32.": 1,
        "validation: sequence_number: expected an integer, got text …": 1,
    }
    assert figures["errors_closed"] == {"superseded": 1}
    latency = figures["latency"]
    assert (latency["import"]["requests"], latency["delete"]["requests"]) == (3, 1)
    for operation in ("import", "delete"):
        p50, p95, p99 = (latency[operation][p] for p in ("p50_s", "p95_s", "p99_s"))
        assert 0 < p50 <= p95 <= p99 <= 10.0
        assert latency[operation]["over_last_bucket"] == 0
    assert figures["outages"] == {"count": 0, "total_s": 0.0, "longest": None}
    assert figures["backlog"] == {
        "pending": 0,
        "oldest_pending_age_s": None,
        "sync_errors_open": 1,
    }

    text = invoke(["report", "--since", "1h"], typesense_server, db_path, "unused").output
    assert "applied               11  upsert 9, delete 2" in text
    assert "given up               2  HTTP 400: 1, validation: 1" in text
    assert "1  HTTP 400: Field `comment` must be an int32." in text
    assert "superseded 1, retried 0, resolved by hand 0" in text
    assert "  import               3" in text and "  delete               1" in text


def test_the_window_leaves_out_older_minutes(
    db_path: Path, db: Database, typesense_server: Server
) -> None:
    now = time.time()
    minute = int(now // STATS_BUCKET_S * STATS_BUCKET_S)
    three_days_ago = minute - 3 * 86400
    stats.save(db, three_days_ago, {"applied": {"upsert": 100, "delete": 5}, "retried": 2})
    stats.save(db, minute, {"applied": {"upsert": 1, "delete": 0}})
    stats.save(db, minute, {"applied": {"upsert": 2, "delete": 1}})  # the same minute adds up
    assert report(typesense_server, db_path, "--since", "1d")["applied"] == {
        "upsert": 3,
        "delete": 1,
        "total": 4,
    }
    week = report(typesense_server, db_path)  # the default window: 7 days
    assert (week["applied"]["total"], week["retried"], week["stats_minutes"]) == (109, 2, 2)
    bad = invoke(["report", "--since", "yesterday"], typesense_server, db_path, "x")
    assert bad.exit_code == 2 and "'yesterday' is neither a duration" in bad.output
    missing = invoke(["report"], typesense_server, db_path.with_name("missing.db"), "x")
    assert "does not exist: create it with `outbox-sync init" in one_line(missing)


@pytest.mark.slow
def test_the_longest_outage_is_the_one_the_worker_lived_through(
    db_path: Path, db: Database, private_typesense: LocalTypesense, typesense_server: Server
) -> None:
    index = TypesenseIndex([private_typesense.url], private_typesense.api_key, "sequences")
    worker = daemon(db, index, min_backoff_s=0.05, max_backoff_s=0.1)
    app = app_connection(db_path)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    captured = capture_logs()
    logged = captured.__enter__()
    thread.start()
    try:
        app.execute(ROW_SQL, make_row(1))
        wait_until(lambda: index.retrieve("1"), what="the first row")
        private_typesense.stop()
        down_at = time.time()
        app.execute(ROW_SQL, make_row(2))
        wait_until(lambda: worker.backoff.since is not None, what="the worker to pause")
        time.sleep(0.5)
        private_typesense.start()
        up_at = time.time()
        wait_until(lambda: index.retrieve("2"), what="the row written during the outage")
        wait_until(
            lambda: (
                any(entry["event"] == "reconciled" for entry in logged)
                and Database(db_path).counts()["pending"] == 0
            ),
            what="the check after the outage and its repairs",
        )
    finally:
        stop.set()
        thread.join(20)
        captured.__exit__(None, None, None)
    figures = report(typesense_server, db_path, "--since", "10m")
    outages = figures["outages"]
    assert outages["count"] == 1
    assert 0.5 <= outages["longest"]["seconds"] <= up_at - down_at + 5
    # after the outage the worker audits; what Typesense lost in its restart (0.24.1 sometimes
    # loses the last writes it acknowledged) is applied again and counted again
    [reconciled] = [entry for entry in logged if entry["event"] == "reconciled"]
    assert figures["applied"]["upsert"] == 2 + reconciled["enqueued"]


def test_parse_since_takes_durations_and_iso_times() -> None:
    now = 1_714_600_000.0
    assert parse_since("30m", now) == now - 1800
    assert parse_since("12h", now) == now - 12 * 3600
    assert parse_since("7d", now) == now - 7 * 86400
    assert parse_since("2w", now) == now - 14 * 86400
    assert parse_since("2024-05-01", now) == 1_714_521_600
    assert parse_since("2024-05-01T12:00:00Z", now) == 1_714_564_800
    assert parse_since("2024-05-01T14:00:00+02:00", now) == 1_714_564_800
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since("last week", now)


def test_error_kinds_count_messages_without_their_particulars() -> None:
    assert error_kind(None, "sequence_number: 3000000000 is outside the range -1..2") == (
        "validation: sequence_number: N is outside the range -N..N"
    )
    assert error_kind(400, "Field `comment` must be an int32.") == (
        "HTTP 400: Field `comment` must be an int32."
    )
