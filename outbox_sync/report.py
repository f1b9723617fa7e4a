"""The weekly review: what the daemon did over a window, from the per-minute statistics it keeps
in `sync_stats` (see stats.py) and the rows of `sync_errors`.

Figures cover the minutes the daemon has saved: it writes its statistics once a minute and when
it stops, so the current minute of a running daemon is not in them yet.
"""

import re
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any

from outbox_sync import stats
from outbox_sync.db import Database, pages
from outbox_sync.stats import LATENCY_BUCKETS_S, STATS_BUCKET_S, percentile

DEFAULT_SINCE = "7d"
DURATION = re.compile(r"(\d+)\s*([smhdw])")
SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
PERCENTILES = {"p50_s": 0.50, "p95_s": 0.95, "p99_s": 0.99}
# An error kind is the message with its particulars (numbers, quoted values) blanked, so that
# "got text 'twelve'" and "got text 'seven'" count as one kind.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
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
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


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
    totals: dict[str, Any] = {}
    minutes = 0
    for _, data in stats.scan(db, int(since // STATS_BUCKET_S * STATS_BUCKET_S)):
        stats.merge(totals, data)
        minutes += 1
    applied = totals.get("applied", {})
    upserts, deletes = int(applied.get("upsert", 0)), int(applied.get("delete", 0))

    by_status: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    for http_status, error in failures_since(db, iso(since)):
        by_status["validation" if http_status is None else str(http_status)] += 1
        by_kind[error_kind(http_status, error)] += 1

    pending, oldest_age_s, open_errors = db.backlog()
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
    }


def failures_since(db: Database, since: str) -> Iterator[tuple[int | None, str]]:
    """(http_status, error) of every sync error that failed at or after `since` (ISO)."""
    recent = "failed_at >= ?"
    for rows in pages(
        db.conn, "sync_errors", "id", "http_status, error", where=recent, params=(since,)
    ):
        for _, http_status, error in rows:
            yield http_status, error


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
