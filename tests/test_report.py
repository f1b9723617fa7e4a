"""`outbox-sync report`: a Worker with a Telemetry goes through known work against a real
Typesense, its statistics are saved as the daemon saves them, and the report adds up."""

import contextlib
import json
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from outbox_sync import stats
from outbox_sync.db import Database
from outbox_sync.errors import CollectionNotFoundError
from outbox_sync.localserver import LocalTypesense
from outbox_sync.mapping import SEQUENCES
from outbox_sync.report import build_report, error_kind, parse_since
from outbox_sync.stats import LATENCY_BUCKETS_S, STATS_BUCKET_S
from outbox_sync.telemetry import Telemetry
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import STATS_SAVE_INTERVAL_S, Stop, daemon, save_stats
from tests.support.app import ROW_SQL, app_connection, make_row
from tests.support.cli import invoke, one_line
from tests.support.daemon import Daemon, record_failure
from tests.support.typesense import Server, refusing_collection
from tests.support.wait import wait_until


def report(server: Server, db_path: Path, *args: str, collection: str = "unused") -> Any:
    result = invoke(["report", "--json", *args], server, db_path, collection)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_report_adds_up_what_the_worker_did(
    db_path: Path, db: Database, typesense_server: Server, collection: str
) -> None:
    # a collection that refuses documents with a comment (400), and one row failing validation
    refusing_collection(typesense_server, collection)
    index = TypesenseIndex([typesense_server.url], typesense_server.api_key, collection)
    telemetry = Telemetry()
    worker = daemon(db, [index], telemetry=telemetry)
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


def retrieved(index: TypesenseIndex, key: str) -> dict[str, Any] | None:
    """The document, or None while it (or the collection the worker creates) is not there."""
    with contextlib.suppress(CollectionNotFoundError):
        return index.retrieve(key)
    return None


@pytest.mark.slow
def test_the_longest_outage_is_the_one_the_worker_lived_through(
    db_path: Path, db: Database, private_typesense: LocalTypesense, typesense_server: Server
) -> None:
    index = TypesenseIndex([private_typesense.url], private_typesense.api_key, "sequences")
    worker = daemon(db, [index], min_backoff_s=0.05, max_backoff_s=0.1)
    app = app_connection(db_path)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    captured = capture_logs()
    logged = captured.__enter__()
    thread.start()
    try:
        app.execute(ROW_SQL, make_row(1))
        wait_until(lambda: retrieved(index, "1"), what="the first row")
        private_typesense.stop()
        down_at = time.time()
        app.execute(ROW_SQL, make_row(2))
        wait_until(lambda: worker.backoff.since is not None, what="the worker to pause")
        time.sleep(0.5)
        private_typesense.start()
        up_at = time.time()
        wait_until(lambda: retrieved(index, "2"), what="the row written during the outage")
        wait_until(
            lambda: (
                any(entry["event"] == "audit_done" for entry in logged)
                and Database(db_path).counts(SEQUENCES)["pending"] == 0
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
    [reconciled] = [entry for entry in logged if entry["event"] == "audit_done"]
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


def test_a_running_daemon_shows_what_it_applied_a_moment_ago(
    db_path: Path, start_daemon: Callable[..., Daemon], typesense_server: Server, collection: str
) -> None:
    # `outbox-sync run` as a real process; the report must not wait for the minute to end (nor
    # for the daemon to stop) to count what it applied
    running = start_daemon()
    app_connection(db_path).executemany(ROW_SQL, [make_row(i) for i in range(1, 6)])
    wait_until(lambda: Database(db_path).counts(SEQUENCES)["pending"] == 0, what="the rows to sync")
    synced_at = time.monotonic()

    def applied() -> Any:
        figures = report(typesense_server, db_path, "--since", "10m", collection=collection)
        return figures["applied"]["upsert"] == 5 and figures

    # the minute's row gets what was applied within STATS_SAVE_INTERVAL_S; far less than the
    # minute the daemon used to wait (the timeout fails that)
    assert STATS_SAVE_INTERVAL_S <= 10
    figures = wait_until(applied, timeout_s=STATS_SAVE_INTERVAL_S + 5, what="the report")
    assert time.monotonic() - synced_at < STATS_SAVE_INTERVAL_S + 5
    assert running.process.poll() is None  # counted while running, not by the save at its stop
    assert figures["latency"]["import"]["requests"] >= 1
    # the backlog samples of the running daemon are in the minute's row too
    [row] = Database(db_path).conn.execute("SELECT data FROM sync_stats").fetchall()
    assert json.loads(row[0])["backlog_max"]["pending"] >= 0


def test_two_saves_of_one_minute_add_counts_and_keep_the_highest_backlog(db: Database) -> None:
    minute = 1_714_564_800
    stats.save(db, minute, {"applied": {"upsert": 3}})  # a row from before backlog_max existed
    stats.save(db, minute, {"applied": {"upsert": 2}, "backlog_max": {"pending": 40}})
    stats.save(
        db,
        minute,
        {"applied": {"upsert": 1}, "backlog_max": {"pending": 25, "oldest_age_s": 1.5}},
    )
    [(_, data)] = list(stats.scan(db, minute))
    assert data == {
        "applied": {"upsert": 6},
        "backlog_max": {"pending": 40, "oldest_age_s": 1.5},  # a maximum, not 65
    }


def test_the_daemon_keeps_the_highest_backlog_sample_of_the_interval() -> None:
    telemetry = Telemetry()
    telemetry.backlog(5, 0.25, 0)  # the loop refreshes the backlog every second
    telemetry.backlog(9, 2.5, 1)
    telemetry.backlog(0, None, 1)  # drained: the lag is 0, not unknown
    taken = telemetry.take_stats()
    assert taken is not None
    assert taken[1] == {"backlog_max": {"pending": 9, "oldest_age_s": 2.5}}


def test_an_idle_daemon_saves_its_samples_once_a_minute_and_work_at_once(db: Database) -> None:
    def saved_rows() -> int:
        return int(db.conn.execute("SELECT count(*) FROM sync_stats").fetchone()[0])

    telemetry = Telemetry(metrics=False)
    while True:  # the samples within one minute (sampled across a minute's end: again)
        before = time.time()
        telemetry.backlog(0, None, 0)  # what an idle loop gathers: the backlog every second,
        telemetry.request("health", "ok", 0.002)  # a health probe every 5 s
        after = time.time()
        if before // STATS_BUCKET_S == after // STATS_BUCKET_S:
            break
        telemetry.take_stats()
    next_minute = (after // STATS_BUCKET_S + 1) * STATS_BUCKET_S
    assert not telemetry.stats_due(after)
    save_stats(db, telemetry, when_due=True)  # the job, every STATS_SAVE_INTERVAL_S
    assert saved_rows() == 0
    assert telemetry.stats_due(next_minute)  # the minute is over: they are saved
    telemetry.batch_applied(1, 0, 0, [])  # work done: saved at the next turn of the job
    assert telemetry.stats_due(after)
    save_stats(db, telemetry, when_due=True)
    assert saved_rows() == 1
    taken = stats.scan(db, 0)
    assert [data["applied"] for _, data in taken] == [{"upsert": 1, "delete": 0}]
    telemetry.backlog(0, None, 0)
    save_stats(db, telemetry)  # when the loop ends: whatever there is
    assert telemetry.take_stats() is None


def latency_counts(**by_bound: int) -> list[int]:
    """A latency histogram: latency_counts(ms5=3) puts 3 requests in the ≤ 5 ms bucket."""
    counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
    for name, count in by_bound.items():
        counts[LATENCY_BUCKETS_S.index(float(name[2:]) / 1000)] += count
    return counts


def test_series_are_per_hour_sums_merged_percentiles_and_maxima(db: Database) -> None:
    hour = 1_714_564_800  # 2024-05-01T12:00:00Z
    save = stats.save
    # 12:00: 10 fast requests in one minute, 10 slow ones in another: the hour's p50 is the
    # fast bucket, its p95 the slow one, which neither minute alone says
    save(
        db,
        hour,
        {"applied": {"upsert": 4, "delete": 1}, "latency": {"import": latency_counts(ms1=10)}},
    )
    save(
        db,
        hour + 300,
        {
            "applied": {"upsert": 6},
            "latency": {"import": latency_counts(ms25=10)},
            "backlog_max": {"pending": 7, "oldest_age_s": 0.5},
        },
    )
    save(db, hour + 600, {"backlog_max": {"pending": 3, "oldest_age_s": 2.0}})
    # 13:00: statistics, but nothing applied and no backlog samples (a row from an older daemon)
    save(db, hour + 3600, {"latency": {"health": latency_counts(ms5=2)}})
    # 14:00: nothing saved (the daemon was down); 15:00: one minute
    save(db, hour + 3 * 3600 + 60, {"applied": {"delete": 2}, "backlog_max": {"pending": 1}})

    figures = build_report(db, hour, now=hour + 3 * 3600 + 120)
    series = figures["series"]
    assert series["hours"] == [
        "2024-05-01T12:00:00Z",
        "2024-05-01T13:00:00Z",
        "2024-05-01T14:00:00Z",
        "2024-05-01T15:00:00Z",
    ]
    assert series["applied"] == {"upsert": [10, 0, None, 0], "delete": [1, 0, None, 2]}
    assert series["latency"]["import"] == {
        "p50_s": [0.001, None, None, None],
        "p95_s": [0.025, None, None, None],
        "p99_s": [0.025, None, None, None],
    }
    assert series["latency"]["health"]["p50_s"] == [None, 0.005, None, None]
    assert series["backlog_max"] == {
        "pending": [7, None, None, 1],  # the highest sample of the hour, not 10
        "oldest_age_s": [2.0, None, None, None],
    }
    # the totals are the hours added up once (merging the hours into them changes no hour)
    assert figures["applied"] == {"upsert": 10, "delete": 3, "total": 13}
    assert figures["latency"]["import"]["requests"] == 20
    assert figures["stats_minutes"] == 5


def test_sync_errors_are_counted_per_day_and_kind(db: Database) -> None:
    day = 1_714_521_600  # 2024-05-01
    with db.write() as conn:
        conn.executemany(
            "INSERT INTO sync_errors (outbox_id, mapping, record_key, op, http_status, error,"
            " attempts,"
            " failed_at) VALUES (?, 'sequences', ?, 'upsert', ?, ?, 2, ?)",
            [
                (1, 1, 400, "Field `comment` must be an int32.", "2024-05-01T08:00:00Z"),
                (2, 2, 400, "Field `comment` must be an int32.", "2024-05-03T09:00:00Z"),
                (3, 3, None, "sequence_number: 'x' is not an integer", "2024-05-03T10:00:00Z"),
                (4, 4, None, "sequence_number: 'y' is not an integer", "2024-05-03T11:00:00Z"),
                (5, 5, 400, "too old to count", "2024-04-29T23:59:59Z"),
            ],
        )
    errors = build_report(db, day, now=day + 2 * 86400 + 3600)["series"]["errors_by_day"]
    assert errors == {
        "days": ["2024-05-01", "2024-05-02", "2024-05-03"],
        "by_kind": {
            "HTTP 400: Field `comment` must be an int32.": [1, 0, 1],
            "validation: sequence_number: … is not an integer": [0, 0, 2],
        },
    }


def test_html_without_plotly_says_in_one_line_what_to_install(
    db_path: Path, typesense_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "plotly", None)  # `import plotly` raises ImportError
    page = tmp_path / "review.html"
    result = invoke(["report", "--html", str(page)], typesense_server, db_path, "unused")
    assert one_line(result) == (
        "Error: --html draws its charts with plotly, which is not installed: "
        "pip install 'outbox-sync[report]'"
    )
    assert result.exit_code == 1 and not page.exists()


def test_the_page_of_an_empty_database_says_each_chart_is_empty(
    db_path: Path, typesense_server: Server, tmp_path: Path
) -> None:
    page = tmp_path / "review.html"
    result = invoke(["report", "--html", str(page)], typesense_server, db_path, "unused")
    assert result.exit_code == 0, result.output
    assert f"wrote the weekly review with charts to {page}" in result.stderr
    assert result.stdout.startswith("outbox-sync report, ")  # the text, as without --html
    text = page.read_text()
    for empty in ("records applied", "sync errors", "Typesense requests", "outages"):
        assert f"no {empty} in this window" in text
    assert "no backlog samples in this window" in text


def test_statistics_a_busy_database_could_not_take_are_saved_next_time(db_path: Path) -> None:
    """save_stats took the statistics out of memory before the save, and a locked database
    lost them for good: the weekly report undercounted (found by a hostile review)."""
    db = Database(db_path, busy_timeout_s=0.2)
    telemetry = Telemetry(metrics=False)
    telemetry.batch_applied(7, 0, 0, [])
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    with capture_logs() as logged:
        save_stats(db, telemetry)
    assert [entry["event"] for entry in logged] == ["stats_not_saved"]
    holder.execute("ROLLBACK")
    holder.close()
    telemetry.batch_applied(3, 1, 0, [])
    save_stats(db, telemetry)
    saved = [data for _, data in stats.scan(db, 0)]
    assert sum(data["applied"]["upsert"] for data in saved) == 10
    assert sum(data["applied"]["delete"] for data in saved) == 1
    db.close()


def test_a_locked_database_is_no_outage_in_the_statistics(
    db_path: Path, index: TypesenseIndex
) -> None:
    """An outage is "from the first request that failed to the one that succeeded again"
    (docs/weekly-review.md); every pause ended as one, the application's lock held past the
    busy timeout too, with no request failed (found by a hostile review)."""
    db = Database(db_path, busy_timeout_s=0.2)
    telemetry = Telemetry(metrics=False)
    worker = daemon(db, [index], telemetry=telemetry, min_backoff_s=0.05, max_backoff_s=0.1)
    stop = Stop()
    worker.loop(time.monotonic(), stop)
    app_connection(db_path).execute(ROW_SQL, make_row(1))
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    assert worker.loop(time.monotonic(), stop).paused
    holder.execute("ROLLBACK")
    holder.close()
    for _ in range(5):
        worker.loop(time.monotonic(), stop)
    taken = telemetry.take_stats()
    stop.close()
    db.close()
    assert taken is not None and taken[1]["applied"]["upsert"] == 1
    assert "outages" not in taken[1]


def test_a_report_since_long_ago_charts_what_can_exist(db_path: Path, db: Database) -> None:
    """`report --since 0001-01-01` (or `99999w`) built a grid of every hour and day since:
    millions, and the command hung (found by a hostile review). Statistics are kept 35 days
    (STATS_RETENTION_S); errors are charted from the first day that has one."""
    now = time.time()
    failed_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 90 * 86400))
    record_failure(db, 1, 7, "refused", http_status=400, attempts=2)
    db.conn.execute("UPDATE sync_errors SET failed_at = ?", (failed_at,))
    started = time.monotonic()
    report = build_report(db, parse_since("0001-01-01", now), now)
    assert time.monotonic() - started < 5
    assert report["since"] == "0001-01-01T00:00:00Z"
    assert report["given_up"]["total"] == 1
    hours = report["series"]["hours"]
    assert 35 * 24 <= len(hours) <= 35 * 24 + 2
    days = report["series"]["errors_by_day"]["days"]
    assert days[0] == failed_at[:10] and len(days) == 91
