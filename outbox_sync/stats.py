"""The daemon's per-minute statistics, kept in SQLite (`sync_stats`) for `outbox-sync report`.

One row a minute holds a small JSON object: records applied per operation, documents retried,
records given up on per reason, Typesense latency histograms per operation, outages, and the
highest backlog seen (`backlog_max`: pending entries and the age of the oldest). The daemon
(telemetry.py) gathers them in memory and adds them to their minute's row every few seconds; two
rows of the same minute add up (`merge`), except the backlog, a level, which keeps its maximum.
Rows written before `backlog_max` existed simply lack it.
"""

import copy
import json
from collections.abc import Iterator
from typing import Any

from outbox_sync.db import Database, pages

# Upper bounds (seconds) of the latency buckets, shared by Prometheus and the SQLite stats.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Statistics are summed per minute.
STATS_BUCKET_S = 60
# How long per-minute statistics are kept: a month covers any weekly review.
STATS_RETENTION_S = 35 * 24 * 3600
# Sections that hold samples of a level, not counts: 40 entries pending at 12:00:05 and 40 still
# pending at 12:00:10 are 40, not 80, so two rows of one minute keep the higher figure.
MAX_SECTIONS = frozenset({"backlog_max"})


def merge(into: dict[str, Any], other: dict[str, Any], *, highest: bool = False) -> dict[str, Any]:
    """Add `other` into `into`: numbers add up (in MAX_SECTIONS: the higher one stays), latency
    counts add up bucket by bucket, outages are listed one after the other. `other` is copied,
    never shared: the report merges one row into its hour and the hour into the totals."""
    for key, value in other.items():
        mine = into.get(key)
        if mine is None:
            into[key] = copy.deepcopy(value)
        elif isinstance(value, dict):
            merge(mine, value, highest=highest or key in MAX_SECTIONS)
        elif key == "outages":
            mine.extend(copy.deepcopy(value))
        elif isinstance(value, list):
            into[key] = [a + b for a, b in zip(mine, value, strict=True)]
        elif highest:
            into[key] = max(mine, value)
        else:
            into[key] = mine + value
    return into


def bucket_index(seconds: float) -> int:
    """The latency bucket `seconds` falls in (len(LATENCY_BUCKETS_S): past the last bound)."""
    for index, bound in enumerate(LATENCY_BUCKETS_S):
        if seconds <= bound:
            return index
    return len(LATENCY_BUCKETS_S)


def percentile(counts: list[int], fraction: float) -> float | None:
    """The bucket upper bound below which `fraction` of the observations fall (None if none;
    inf when it lies past the last bound)."""
    total = sum(counts)
    if not total:
        return None
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= fraction * total:
            return LATENCY_BUCKETS_S[index] if index < len(LATENCY_BUCKETS_S) else float("inf")
    return float("inf")


def save(db: Database, bucket: int, data: dict[str, Any]) -> None:
    """Add one interval's statistics to its minute's row; prune rows past the retention. The
    commit does not wait for the disk (`Database.without_fsync`): statistics are not worth
    holding the application's write lock for, nor a reason for `Database.backlog` to count
    again (`aside`): saved once a minute while idle, each recounted the open errors."""
    with db.aside(), db.without_fsync(), db.write() as conn:
        row = conn.execute("SELECT data FROM sync_stats WHERE bucket = ?", (bucket,)).fetchone()
        merged = merge(json.loads(row[0]), data) if row else data
        conn.execute(
            "INSERT OR REPLACE INTO sync_stats (bucket, data) VALUES (?, ?)",
            (bucket, json.dumps(merged, separators=(",", ":"))),
        )
        conn.execute("DELETE FROM sync_stats WHERE bucket < ?", (bucket - STATS_RETENTION_S,))


def scan(db: Database, since_bucket: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(minute, statistics) from `since_bucket` (Unix time of a minute) on, oldest first."""
    recent = "bucket >= ?"
    for rows in pages(
        db.conn, "sync_stats", "bucket", "data", where=recent, params=(since_bucket,)
    ):
        for bucket, data in rows:
            yield bucket, json.loads(data)
