"""The application side of the benchmarks: rows of `sequences` and the ways an application
writes them. Run as a module it is the steady writer of the lag benchmark:

    python -m tests.bench.app --db PATH --rate 50 --seconds 10 --out commits.json
"""

import argparse
import json
import random
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

INSERT = (
    "INSERT INTO sequences (id, element_type, element_id, sequence_number, comment, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
ELEMENT_TYPES = ("gene", "protein", "transcript", "exon", "variant")
SYLLABLES = ("ka", "lo", "mi", "ne", "su", "ta", "ri", "vo", "pe", "dax", "qui", "zor")
WORDS = tuple(a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES)
ROWS_PER_TRANSACTION = 10_000


def make_rows(first_id: int, count: int) -> Iterator[tuple[Any, ...]]:
    """Deterministic rows whose documents are ~180 bytes of JSON. sequence_number == id, so a
    reader can find new documents with one range filter."""
    rng = random.Random(first_id)
    for key in range(first_id, first_id + count):
        yield (
            key,
            ELEMENT_TYPES[key % len(ELEMENT_TYPES)],
            rng.randrange(10**9, 2**31),  # element_id is an int32
            key,
            " ".join(rng.choices(WORDS, k=7)),
            f"2024-{1 + key % 12:02d}-{1 + key % 28:02d}T{key % 24:02d}:{key % 60:02d}:00Z",
        )


def connect(db: Path) -> sqlite3.Connection:
    """How a typical application opens the file: default synchronous, a busy timeout, and
    transactions it controls itself."""
    return sqlite3.connect(db, timeout=30.0, isolation_level=None)


def write_bulk(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """executemany, ROWS_PER_TRANSACTION rows per transaction."""
    for start in range(0, len(rows), ROWS_PER_TRANSACTION):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT, rows[start : start + ROWS_PER_TRANSACTION])
        conn.execute("COMMIT")


def write_rows_for(conn: sqlite3.Connection, first_id: int, seconds: float) -> int:
    """One commit per row (autocommit INSERT) for `seconds`; returns the number of commits."""
    rows = make_rows(first_id, 10**9)
    deadline = time.perf_counter() + seconds
    commits = 0
    while time.perf_counter() < deadline:
        conn.execute(INSERT, next(rows))
        commits += 1
    return commits


def write_steadily(db: Path, rate: float, seconds: float) -> list[tuple[int, float]]:
    """Commit one row at a time on a fixed schedule (open loop: a late commit does not push
    the next ones back). Returns (id, time.time() just after the commit) per row."""
    rows = list(make_rows(1, int(rate * seconds)))
    conn = connect(db)
    commits = []
    start = time.perf_counter()
    for number, row in enumerate(rows):
        delay = start + number / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        conn.execute(INSERT, row)
        commits.append((row[0], time.time()))
    conn.close()
    return commits


def write_without_waiting(db: Path, rate: float, seconds: float) -> tuple[int, int, float]:
    """Commit one row at a time at random moments, `rate` a second on average (a Poisson
    process, whatever happens: such a writer finds the lock taken as often as it is taken),
    without a busy timeout, as the sqlite3 shell does: a commit that finds another
    connection's write lock fails (SQLITE_BUSY) and its row is skipped. A moment the writer
    missed by more than 1 ms (still busy) is left out. With synchronous=NORMAL: at FULL a
    commit waits ~1 ms for the disk here, too long for 1,000 a second. Returns (attempts,
    failures, seconds)."""
    conn = sqlite3.connect(db, timeout=0, isolation_level=None)
    conn.execute("PRAGMA synchronous = NORMAL")
    rows = make_rows(1, 10**9)
    gaps = random.Random(7)
    attempts = failures = 0
    at = started = time.perf_counter()
    while (at := at + gaps.expovariate(rate)) < started + seconds:
        if (delay := at - time.perf_counter()) > 0:
            time.sleep(delay)
        elif delay < -0.001:
            continue
        attempts += 1
        try:
            conn.execute(INSERT, next(rows))
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) and "busy" not in str(error):
                raise
            failures += 1
    conn.close()
    return attempts, failures, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--rate", type=float, required=True, help="commits per second")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True, help="JSON [[id, commit time], ...]")
    args = parser.parse_args()
    args.out.write_text(json.dumps(write_steadily(args.db, args.rate, args.seconds)))


if __name__ == "__main__":
    main()
