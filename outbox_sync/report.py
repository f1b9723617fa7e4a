"""The weekly review: what the daemon did over a window, from the per-minute statistics it keeps
in `sync_stats` (see stats.py) and the rows of `sync_errors`.

Figures cover what the daemon has saved: it adds its statistics to the current minute's row every
few seconds (worker.STATS_SAVE_INTERVAL_S; once a minute while idle) and when it stops. Beside the
totals, `series` holds the same figures hour by hour (and the sync errors day by day) for the
charts of the HTML page.
"""

import re
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any

from outbox_sync import stats
from outbox_sync.config import SECONDS_PER_UNIT
from outbox_sync.db import Database, pages
from outbox_sync.stats import LATENCY_BUCKETS_S, STATS_BUCKET_S, STATS_RETENTION_S, percentile

DEFAULT_SINCE = "7d"
DURATION = re.compile(r"(\d+)\s*([smhdw])")  # a whole number and its unit (2024 may be a year)
PERCENTILES = {"p50_s": 0.50, "p95_s": 0.95, "p99_s": 0.99}
# The series of the charts: statistics per hour (168 points a week), sync errors per day.
HOUR_S = 3600
DAY_S = 86400
# An error kind is the message with its particulars (numbers, quoted values) blanked, so that
# "got text 'twelve'" and "got text 'seven'" count as one kind. A quote inside a quoted text is
# doubled, as SQLite's quote() and our messages write it: 'it''s' is one value too.
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"[^\"]*\"")
_NUMBER = re.compile(r"\b\d+\b")
MAX_KIND_CHARS = 120


def parse_since(text: str, now: float) -> float:
    """Unix time of `text`: a duration back from now (`30m`, `12h`, `7d`, `2w`) or an ISO date
    or time (`2024-05-01`, `2024-05-01T12:00:00Z`, UTC unless it says otherwise)."""
    text = text.strip()
    if match := DURATION.fullmatch(text):
        return now - int(match[1]) * SECONDS_PER_UNIT[match[2]]
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30m, 12h, 7d, 2w) nor an ISO date or time "
            "(2024-05-01, 2024-05-01T12:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def iso(unix: float) -> str:
    """Unix time as `sync_errors` writes times: 2024-05-01T12:00:00Z."""
    t = time.gmtime(unix)  # the year padded by hand: glibc's %Y writes 999, not 0999
    return f"{t.tm_year:04d}-" + time.strftime("%m-%dT%H:%M:%SZ", t)


def error_kind(http_status: int | None, error: str) -> str:
    """The kind of a sync error, for counting: its status and its message without particulars."""
    text = _NUMBER.sub("N", _QUOTED.sub("…", error))
    if len(text) > MAX_KIND_CHARS:
        text = text[: MAX_KIND_CHARS - 1] + "…"
    return f"{'validation' if http_status is None else f'HTTP {http_status}'}: {text}"


def build_report(db: Database, since: float, now: float | None = None) -> dict[str, Any]:
    """Everything `outbox-sync report` shows for the window from `since` (Unix time) to now.
    Statistics count by whole minutes: the minute `since` falls in is included."""
    now = time.time() if now is None else now
    hours: dict[int, dict[str, Any]] = {}
    minutes = 0
    for bucket, data in stats.scan(db, int(since // STATS_BUCKET_S * STATS_BUCKET_S)):
        stats.merge(hours.setdefault(bucket // HOUR_S * HOUR_S, {}), data)
        minutes += 1
    totals: dict[str, Any] = {}
    for hour in hours.values():
        stats.merge(totals, hour)
    applied = totals.get("applied", {})
    upserts, deletes = int(applied.get("upsert", 0)), int(applied.get("delete", 0))

    by_status: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    by_day: dict[str, Counter[str]] = {}
    for failed_at, http_status, error in failures_since(db, iso(since)):
        kind = error_kind(http_status, error)
        by_status["validation" if http_status is None else str(http_status)] += 1
        by_kind[kind] += 1
        by_day.setdefault(failed_at[:10], Counter())[kind] += 1

    pending, oldest_age_s, open_errors = db.backlog()
    # The charts: no statistics are kept past STATS_RETENTION_S, and errors are charted from
    # the first day that has one (`--since 0001-01-01` made a grid of 17 million hours).
    kept = max(since, now - STATS_RETENTION_S)
    first_error = min(by_day, default=None)
    charted_days = (
        kept if first_error is None else min(kept, max(since, parse_since(first_error, now)))
    )
    return {
        "since": iso(since),
        "until": iso(now),
        "stats_minutes": minutes,
        "applied": {"upsert": upserts, "delete": deletes, "total": upserts + deletes},
        "retried": int(totals.get("retried", 0)),
        "given_up": {
            "total": sum(by_status.values()),
            "by_status": dict(sorted(by_status.items())),
            "by_kind": [{"kind": kind, "count": n} for kind, n in by_kind.most_common()],
        },
        "errors_closed": closed_since(db, iso(since)),
        "latency": {
            operation: latency_summary(counts)
            for operation, counts in sorted(totals.get("latency", {}).items())
        },
        "outages": outage_summary(totals.get("outages", [])),
        "backlog": {
            "pending": pending,
            "oldest_pending_age_s": oldest_age_s,
            "sync_errors_open": open_errors,
        },
        "series": {
            **hourly_series(hours, kept, now),
            "errors_by_day": daily_errors(
                by_day, [kind for kind, _ in by_kind.most_common()], charted_days, now
            ),
            "outages": [
                {"start": iso(start), "end": iso(end), "seconds": round(end - start, 3)}
                for start, end in sorted(totals.get("outages", []))
            ],
        },
    }


def hourly_series(hours: dict[int, dict[str, Any]], since: float, now: float) -> dict[str, Any]:
    """Every hour of the window, oldest first, with what the daemon saved in it: records applied
    per operation, latency percentiles per operation, and the highest backlog and lag. An hour
    with no saved statistics (the daemon was not running) is None, a gap in the charts; an hour
    with statistics but nothing of a kind counts 0 records, or None for a latency or a backlog
    it has no samples of."""
    grid = range(int(since // HOUR_S * HOUR_S), int(now) + 1, HOUR_S)
    operations = sorted({op for hour in hours.values() for op in hour.get("latency", {})})
    applied: dict[str, list[int | None]] = {"upsert": [], "delete": []}
    latency: dict[str, dict[str, list[float | None]]] = {
        op: {name: [] for name in PERCENTILES} for op in operations
    }
    backlog: dict[str, list[float | None]] = {"pending": [], "oldest_age_s": []}
    for hour in (hours.get(start) for start in grid):
        for op, counts in applied.items():
            counts.append(None if hour is None else int(hour.get("applied", {}).get(op, 0)))
        for op, percentiles in latency.items():
            histogram = None if hour is None else hour.get("latency", {}).get(op)
            summary = None if histogram is None else latency_summary(histogram)
            for name, values in percentiles.items():
                values.append(None if summary is None else summary[name])
        for figure, values in backlog.items():
            values.append(None if hour is None else hour.get("backlog_max", {}).get(figure))
    return {
        "hours": [iso(start) for start in grid],
        "applied": applied,
        "latency": latency,
        "backlog_max": backlog,
    }


def daily_errors(
    by_day: dict[str, Counter[str]], kinds: list[str], since: float, now: float
) -> dict[str, Any]:
    """Sync errors per UTC day of the window, by kind (most frequent first)."""
    days = [iso(day)[:10] for day in range(int(since // DAY_S * DAY_S), int(now) + 1, DAY_S)]
    return {
        "days": days,
        "by_kind": {kind: [by_day.get(day, Counter())[kind] for day in days] for kind in kinds},
    }


def failures_since(db: Database, since: str) -> Iterator[tuple[str, int | None, str]]:
    """(failed_at, http_status, error) of every sync error that failed at or after `since`
    (ISO)."""
    recent = "failed_at >= ?"
    columns = "failed_at, http_status, error"
    for rows in pages(db.conn, "sync_errors", "id", columns, where=recent, params=(since,)):
        for _, failed_at, http_status, error in rows:
            yield failed_at, http_status, error


def closed_since(db: Database, since: str) -> dict[str, int]:
    """How many sync errors closed at or after `since` (ISO), by resolution."""
    return dict(
        db.conn.execute(
            "SELECT resolution, count(*) FROM sync_errors WHERE resolved_at >= ?"
            " GROUP BY resolution ORDER BY resolution",
            (since,),
        ).fetchall()
    )


def latency_summary(counts: list[int]) -> dict[str, Any]:
    """Requests and percentiles of one operation. A percentile is the upper bound of the bucket
    it falls in; past the last bucket it is that last bound (as Prometheus reports it), and
    `over_last_bucket` says how many requests took longer."""
    last = LATENCY_BUCKETS_S[-1]
    summary: dict[str, Any] = {"requests": sum(counts)}
    for name, fraction in PERCENTILES.items():
        value = percentile(counts, fraction)
        summary[name] = None if value is None else min(value, last)
    summary["over_last_bucket"] = counts[-1] if len(counts) > len(LATENCY_BUCKETS_S) else 0
    return summary


def outage_summary(outages: list[list[float]]) -> dict[str, Any]:
    """How many outages, how long in all, and the longest one."""
    if not outages:
        return {"count": 0, "total_s": 0.0, "longest": None}
    start, end = max(outages, key=lambda outage: outage[1] - outage[0])
    return {
        "count": len(outages),
        "total_s": round(sum(end - start for start, end in outages), 3),
        "longest": {"seconds": round(end - start, 3), "start": iso(start), "end": iso(end)},
    }
