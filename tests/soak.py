"""Soak test, by hand (not in CI): the real daemon for N minutes under mixed writes, with
Typesense restarted now and then. The daemon's RSS, the outbox and the -wal file must stay flat,
and when the writes stop and the outbox drains, Typesense must hold exactly what SQLite holds.

    python -m tests.soak --minutes 10            # prints a table; exit 1 on drift or growth

Everything runs on 127.0.0.1: a private Typesense (its own port and data), a temporary
database, the daemon as a real process (`python -m outbox_sync run`).
"""

import argparse
import json
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outbox_sync import schema
from outbox_sync.db import Database
from outbox_sync.localserver import LocalTypesense, free_port
from outbox_sync.mapping import SEQUENCES
from tests.support.app import sqlite_documents
from tests.support.cli import without_settings
from tests.support.typesense import Server, export

API_KEY = "soak-key-4b1f"
COLLECTION = "soak"
KEYS = 50_000
COLUMNS = "id, element_type, element_id, sequence_number, comment, created_at"
TYPES = ("script", "section", "action", "character", "spoken_word")


@dataclass
class Sample:
    elapsed_s: float
    writes: int
    pending: int
    wal_mb: float
    rss_mb: float
    restarts: int


@dataclass
class Writer:
    """An application at a steady rate: inserts, updates, deletes, id changes, and now and
    then a transaction of 200 rows, each in its own commit."""

    path: Path
    rate: float
    seed: int = 1
    writes: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        rng = random.Random(self.seed)
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        started = time.monotonic()
        while not self.stop.is_set():
            ahead = self.writes / self.rate - (time.monotonic() - started)
            if ahead > 0:
                self.stop.wait(ahead)
                continue
            choice = rng.random()
            key = rng.randrange(1, KEYS)
            if choice < 0.45:
                conn.execute(
                    f"INSERT OR REPLACE INTO sequences ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    row(rng, key, self.writes),
                )
            elif choice < 0.75:
                conn.execute(
                    "UPDATE sequences SET comment = ?, sequence_number = ? WHERE id = ?",
                    (f"updated {self.writes} " + "x" * rng.randrange(200), self.writes, key),
                )
            elif choice < 0.9:
                conn.execute("DELETE FROM sequences WHERE id = ?", (key,))
            elif choice < 0.99:
                conn.execute(
                    "UPDATE OR REPLACE sequences SET id = ? WHERE id = ?",
                    (rng.randrange(1, KEYS), key),
                )
            else:
                first = rng.randrange(1, KEYS - 200)
                conn.execute("BEGIN")
                conn.executemany(
                    f"INSERT OR REPLACE INTO sequences ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    [row(rng, k, self.writes) for k in range(first, first + 200)],
                )
                conn.execute("COMMIT")
            self.writes += 1
        conn.close()


def row(rng: random.Random, key: int, step: int) -> tuple[Any, ...]:
    return (
        key,
        rng.choice(TYPES),
        rng.randrange(1, 10**9),
        step % 2**31,
        None if rng.random() < 0.1 else f"comment {step} " + "y" * rng.randrange(300),
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wal_mb(path: Path) -> float:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size / 2**20 if wal.exists() else 0.0


def pending(path: Path) -> int:
    conn = sqlite3.connect(path, timeout=60)
    try:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    finally:
        conn.close()


def drift(path: Path, server: LocalTypesense) -> tuple[int, int, int]:
    """(documents that differ from their row, rows missing from Typesense, documents no row
    has)."""
    expected = sqlite_documents(path)
    actual = export(Server(server.url, API_KEY), COLLECTION, timeout_s=120)
    differing = sum(1 for k in expected.keys() & actual.keys() if expected[k] != actual[k])
    return differing, len(expected.keys() - actual.keys()), len(actual.keys() - expected.keys())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=300, help="writes per second")
    parser.add_argument(
        "--restart-every", type=float, default=90, help="seconds between Typesense restarts"
    )
    parser.add_argument("--sample-every", type=float, default=10, help="seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="outbox-soak-"))
    db_path = work / "soak.db"
    schema.init(Database(db_path, create=True), [SEQUENCES])
    # Frequent snapshots: a restart replays only the raft log written since the last one (with
    # the default hour, a restart under this load replays minutes of writes before it is ready).
    server = LocalTypesense(
        work / "typesense",
        api_key=API_KEY,
        port=free_port(),
        extra_args=("--snapshot-interval-seconds=30",),
    )
    server.start()
    env = without_settings(
        TYPESENSE_URL=server.url,
        TYPESENSE_API_KEY=API_KEY,
        OUTBOX_SYNC_DB=str(db_path),
        OUTBOX_SYNC_COLLECTION=COLLECTION,
        OUTBOX_SYNC_TIMEOUT="5",
    )
    log = open(work / "daemon.log", "wb")  # noqa: SIM115 - closed at the end
    daemon = subprocess.Popen(
        [sys.executable, "-m", "outbox_sync", "run", "--batch-size", "2000"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    writer = Writer(db_path, args.rate)
    thread = threading.Thread(target=writer.run, name="writer")
    thread.start()

    try:
        return soak(args, work, db_path, server, daemon, log, writer, thread)
    finally:
        writer.stop.set()
        if daemon.poll() is None:
            daemon.kill()
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def soak(
    args: argparse.Namespace,
    work: Path,
    db_path: Path,
    server: LocalTypesense,
    daemon: "subprocess.Popen[bytes]",
    log: Any,
    writer: Writer,
    thread: threading.Thread,
) -> int:
    samples: list[Sample] = []
    restarts = 0
    started = time.monotonic()
    next_restart = started + args.restart_every
    deadline = started + args.minutes * 60
    print(
        f"soak: {args.minutes} min, {args.rate:.0f} writes/s, Typesense restart every "
        f"{args.restart_every:.0f} s; work dir {work}",
        flush=True,
    )
    print(
        f"{'min':>6} {'writes':>8} {'pending':>8} {'wal MB':>7} {'rss MB':>7} {'restarts':>8}",
        flush=True,
    )
    try:
        while time.monotonic() < deadline:
            time.sleep(min(args.sample_every, max(0.0, deadline - time.monotonic())))
            if daemon.poll() is not None:
                print(f"the daemon exited with {daemon.returncode}: see {work}/daemon.log")
                return 1
            if time.monotonic() >= next_restart:
                server.stop()
                time.sleep(random.uniform(1, 5))  # an outage the daemon must ride out
                server.start(timeout_s=300)
                restarts += 1
                next_restart = time.monotonic() + args.restart_every
            sample = Sample(
                round(time.monotonic() - started, 1),
                writer.writes,
                pending(db_path),
                wal_mb(db_path),
                rss_mb(daemon.pid),
                restarts,
            )
            samples.append(sample)
            print(
                f"{sample.elapsed_s / 60:6.1f} {sample.writes:8d} {sample.pending:8d} "
                f"{sample.wal_mb:7.1f} {sample.rss_mb:7.1f} {sample.restarts:8d}",
                flush=True,
            )
    finally:
        writer.stop.set()
        thread.join(60)

    # Drained: the outbox empty for 5 s in a row (after an outage the daemon audits and may
    # enqueue repairs, so one empty look is not enough).
    drain_started = time.monotonic()
    empty_since: float | None = None
    while time.monotonic() - drain_started < 300:
        if pending(db_path):
            empty_since = None
        elif empty_since is None:
            empty_since = time.monotonic()
        elif time.monotonic() - empty_since >= 5:
            break
        time.sleep(0.5)
    drained_in = (empty_since or time.monotonic()) - drain_started
    differing, missing, extra = drift(db_path, server)
    errors = Database(db_path).counts(SEQUENCES)["sync_errors_open"]
    daemon.send_signal(signal.SIGTERM)
    exit_code = daemon.wait(60)
    log.close()

    # Flat: the last third of the run against the middle third (the first is warm-up).
    third = max(1, len(samples) // 3)
    middle, last = samples[third : 2 * third] or samples, samples[-third:]
    rss_growth = statistics.mean(s.rss_mb for s in last) - statistics.mean(s.rss_mb for s in middle)
    summary = {
        "minutes": args.minutes,
        "writes": writer.writes,
        "typesense_restarts": restarts,
        "rss_mb_start_end": [samples[0].rss_mb, samples[-1].rss_mb] if samples else None,
        "rss_mb_growth_middle_to_last_third": round(rss_growth, 1),
        "pending_max": max(s.pending for s in samples) if samples else None,
        "pending_median": statistics.median(s.pending for s in samples) if samples else None,
        "wal_mb_max": round(max(s.wal_mb for s in samples), 1) if samples else None,
        "drain_after_stop_s": round(drained_in, 1),
        "drift_differing": differing,
        "drift_missing": missing,
        "drift_extra": extra,
        "sync_errors_open": errors,
        "daemon_exit": exit_code,
    }
    print(json.dumps(summary, indent=2))
    ok = (
        differing == missing == extra == errors == 0
        and exit_code == 0
        and rss_growth < 20
        and (summary["wal_mb_max"] or 0) < 64
    )
    print("soak:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
