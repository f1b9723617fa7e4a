"""The idle loop: commit-to-wake-up latency and idle CPU of the wake-up (outbox_sync/wakeup.py)
against today's loop, which asks `PRAGMA data_version` every 1 ms (worker.py).

    python -m tests.bench --only idle       # with the suite (also the real daemon's idle CPU)
    python -m tests.bench.idle [--quick]    # alone, without Typesense (no daemon row)

Both loops run as a separate "waiter" process that copies worker.py's idle loop: read
data_version, look at the table, acknowledge (an own write, as the daemon does), wait for a
change with a 1 s recheck. A separate writer process commits rows. Times are
`time.monotonic()`, CLOCK_MONOTONIC, one clock for every process on Linux.
"""

import argparse
import bisect
import contextlib
import faulthandler
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outbox_sync.db import Database
from outbox_sync.wakeup import DEFAULT_FALLBACK_POLL_S, ChangeWatch
from tests.bench import app
from tests.bench.run import (
    FULL,
    QUICK,
    ROOT,
    Context,
    Row,
    daemon,
    init_db,
    percentile,
    ratio_row,
    say,
    table,
)

TODAY_POLL_S = 0.001  # worker.DEFAULT_POLL_INTERVAL_S when this was written
IDLE_RECHECK_S = 1.0  # worker.DEFAULT_IDLE_RECHECK_S
# (journal_mode, the writer's synchronous, commits per second): WAL as after `init` with
# SQLite's default FULL (the WAL event comes before the fsync, see wakeup.py), WAL with NORMAL,
# and a rollback journal. DELETE mode's fsyncs (journal, database) for every commit and every
# acknowledgement saturated this disk at 50/s: the 1 ms poll's p50 grew to 75-270 ms.
JOURNALS = (("wal", "full", 50.0), ("wal", "normal", 50.0), ("delete", "full", 10.0))
IDLE_TARGET = 0.002  # of a core, for the whole daemon (the target)
OWN_WRITE_EVERY_S = 0.5  # longer than wakeup.RECHECK_WINDOW_S: each write is a burst of its own
READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Durations:
    idle_s: float  # CPU of a waiting loop, per repetition
    latency_s: float  # per latency run
    own_writes: int  # per own-write run, one every OWN_WRITE_EVERY_S
    daemon_s: float  # the real daemon's idle CPU


DURATIONS = {False: Durations(10.0, 5.0, 20, 30.0), True: Durations(3.0, 2.0, 6, 10.0)}


# -- CPU ----------------------------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """User + system CPU of a whole process, its ended threads included (/proc/PID/stat, in
    clock ticks: 10 ms here)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads_cpu_ns(pid: int) -> dict[int, int]:
    """CPU time of each live thread of a process, in nanoseconds (/proc/PID/task/*/schedstat)."""
    cpu = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                cpu[int(task)] = int(schedstat.read().split()[0])
        except FileNotFoundError:  # ended since the listing
            continue
    return cpu


def process_cpu_share(pid: int, seconds: float) -> tuple[float, str]:
    """The share of one core a whole process uses over the next `seconds` (0.01 = 1 %), and
    how it was measured. Its threads' schedstat, in nanoseconds; if a thread ended meanwhile
    (its time leaves schedstat with it), /proc/PID/stat, whose 10 ms ticks resolve 0.03 % of
    a core over 30 s: 0.2 % is 6 ticks."""
    threads, ticks, started = threads_cpu_ns(pid), process_cpu_s(pid), time.monotonic()
    time.sleep(seconds)
    now, ticks_now = threads_cpu_ns(pid), process_cpu_s(pid)
    elapsed = time.monotonic() - started
    if threads.keys() <= now.keys():  # a thread started meanwhile counts from 0
        return sum(ns - threads.get(task, 0) for task, ns in now.items()) / 1e9 / elapsed, "ns"
    return (ticks_now - ticks) / elapsed, "ticks"


def thread_cpu_s(pid: int) -> float:
    """CPU time of a process's main thread in nanoseconds' resolution (its schedstat): for the
    single-threaded waiters, whose idle CPU is below what clock ticks can resolve."""
    return threads_cpu_ns(pid)[pid] / 1e9


# Open sync errors in the database of the second idle row: each was counted every second
# until the backlog's figures were read only once the file changed (4.5 % of a core idle
# with 300,000).
IDLE_OPEN_ERRORS = 100_000


def daemon_idle_cpu(
    ctx: Context, seconds: float, warmup_s: float = 3.0, open_errors: int = 0
) -> tuple[float, str]:
    """The idle share of a core of a whole `outbox-sync run` process on an empty outbox, over
    `seconds` after `warmup_s` (startup and the first health probes), and how it was measured
    (process_cpu_share); with `open_errors` sync errors waiting for a human."""
    db = ctx.workdir / "idle-daemon.db"
    init_db(ctx, db)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            " INSERT INTO sync_errors (outbox_id, mapping, record_key, op, error, attempts,"
            " failed_at) SELECT i, 'sequences', i, 'upsert', 'refused', 2,"
            " '2026-01-01T00:00:00Z' FROM n",
            (open_errors,),
        )
    with daemon(ctx, db, ctx.fresh_name("idle")) as process:
        time.sleep(warmup_s)
        return process_cpu_share(process.pid, seconds)


# -- the processes --------------------------------------------------------------------------


def fresh_db(path: Path, journal: str) -> Path:
    """A database after `outbox-sync init` (WAL) with a one-row table for the waiter's own
    writes, in the given journal mode."""
    for stale in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        stale.unlink(missing_ok=True)
    subprocess.run(
        [sys.executable, "-m", "outbox_sync", "init"],
        env={**os.environ, "OUTBOX_SYNC_DB": str(path)},
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("CREATE TABLE bench_own (n INTEGER)")
        conn.execute("INSERT INTO bench_own VALUES (0)")
        conn.execute(f"PRAGMA journal_mode={journal}")
    return path


def waiter(args: argparse.Namespace) -> None:
    """The waiting loop of worker.run, `--how` poll (today), watch or fallback. On SIGTERM it
    writes what it saw to `--out`: [monotonic time, highest row id] at every change seen, the
    number of look-ups (data_version asked) and of own writes."""
    database = Database(args.db)
    stop = threading.Event()
    watch = None
    if args.how != "poll":
        watch = ChangeWatch(args.db, use_inotify=args.how == "watch")

    def request_stop(*_: Any) -> None:
        # Not stop.set() here: a handler that runs while the main thread is inside
        # stop.wait()'s lock deadlocks on it (17 of 30 SIGTERMs against a stop.wait(0) loop;
        # one hung poll waiter in a bench run). interrupt() takes no lock.
        threading.Thread(target=stop.set).start()
        if watch is not None:
            watch.interrupt()

    def top() -> int:
        return int(
            database.conn.execute("SELECT coalesce(max(id), 0) FROM sequences").fetchone()[0]
        )

    def own_write() -> None:
        with database.write() as conn:
            conn.execute("UPDATE bench_own SET n = n + 1")

    signal.signal(signal.SIGTERM, request_stop)
    faulthandler.register(signal.SIGUSR1)
    seen: list[tuple[float, int]] = []
    looks = own_writes = 0
    every = args.own_write_every
    next_own = time.monotonic() + every if every else float("inf")
    highest = top()
    print("ready", watch.mode if watch else "poll", flush=True)
    while not stop.is_set():
        version = database.data_version()
        current = top()
        if current != highest:
            seen.append((time.monotonic(), current))
            highest = current
            if args.ack:
                own_write()
                own_writes += 1
        if time.monotonic() >= next_own:
            own_write()
            own_writes += 1
            next_own += every
        timeout_s = min(IDLE_RECHECK_S, next_own - time.monotonic())
        deadline = time.monotonic() + timeout_s
        if watch is None:  # worker._wait_for_change as it is today
            while not stop.wait(TODAY_POLL_S):
                looks += 1
                if database.data_version() != version or time.monotonic() >= deadline:
                    break
        else:  # the same loop around the watch
            while not stop.is_set():
                watch.wait(deadline - time.monotonic())
                looks += 1
                if database.data_version() != version or time.monotonic() >= deadline:
                    break
    args.out.write_text(json.dumps({"seen": seen, "looks": looks, "own_writes": own_writes}))


def writer(args: argparse.Namespace) -> None:
    """Commit `--count` rows one at a time at `--rate` per second; writes [[id, monotonic time
    just after the commit], ...] to `--out`."""
    conn = app.connect(args.db)
    conn.execute(f"PRAGMA synchronous={args.synchronous}")
    jitter = random.Random(5)
    commits = []
    started = time.monotonic()
    for number, row in enumerate(app.make_rows(1, args.count)):
        delay = started + number / args.rate + jitter.uniform(0, 0.002) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        conn.execute(app.INSERT, row)
        commits.append((row[0], time.monotonic()))
    conn.close()
    args.out.write_text(json.dumps(commits))


def module_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.bench.idle", *args]


@contextlib.contextmanager
def waiting(db: Path, how: str, *options: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """A waiter process, ready; yields its pid and a dict that holds its report once the
    block is left (SIGTERM)."""
    out = db.with_suffix(f".{how}.json")
    out.unlink(missing_ok=True)
    process = subprocess.Popen(
        module_command("waiter", "--db", str(db), "--how", how, "--out", str(out), *options),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    report: dict[str, Any] = {}
    try:
        assert process.stdout is not None
        timer = threading.Timer(READY_TIMEOUT_S, process.kill)
        timer.start()
        line = process.stdout.readline()
        timer.cancel()
        if not line.startswith("ready"):
            raise RuntimeError(f"waiter {how} did not start: {line!r}")
        yield process.pid, report
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(READY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGUSR1)  # faulthandler: where it is stuck, on stderr
            time.sleep(1)
            process.kill()
            process.wait()
            raise
    report.update(json.loads(out.read_text()))


# -- measurements -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyRun:
    latencies_ms: list[float]
    cpu_share: float  # of the waiter while the writer wrote
    looks: int


def latency_once(
    workdir: Path, how: str, journal: str, synchronous: str, rate: float, seconds: float
) -> LatencyRun:
    """A writer commits one row at a time, `rate` per second (with up to 2 ms of jitter: no
    phase lock with the 1 ms poll) for `seconds`; per row, the time from the return of its
    commit to the waiter's look that saw it."""
    db = fresh_db(workdir / f"latency-{journal}-{synchronous}.db", journal)
    commits_out = workdir / "commits.json"
    with waiting(db, how, "--ack") as (pid, report):
        cpu, started = thread_cpu_s(pid), time.monotonic()
        options = {"--db": db, "--rate": rate, "--count": int(rate * seconds)}
        options |= {"--synchronous": synchronous, "--out": commits_out}
        arguments = [str(part) for option in options.items() for part in option]
        subprocess.run(module_command("writer", *arguments), cwd=ROOT, check=True)
        share = (thread_cpu_s(pid) - cpu) / (time.monotonic() - started)
        time.sleep(0.2)  # the last commit is seen within milliseconds
    commits = json.loads(commits_out.read_text())
    seen_at = [at for at, _ in report["seen"]]
    highest = [top for _, top in report["seen"]]
    latencies = []
    for key, committed_at in commits:
        index = bisect.bisect_left(highest, key)
        if index == len(highest):
            raise RuntimeError(f"waiter {how} never saw row {key} ({journal}, {synchronous})")
        latencies.append((seen_at[index] - committed_at) * 1000)
    return LatencyRun(latencies, share, report["looks"])


def idle_once(
    workdir: Path, how: str, seconds: float, *options: str
) -> tuple[float, dict[str, Any]]:
    """The waiter's share of a core over `seconds` with nobody writing (or with its own
    writes, given --own-write-every), and its report."""
    db = fresh_db(workdir / "idle.db", "wal")
    with waiting(db, how, *options) as (pid, report):
        time.sleep(0.5)  # past the start (imports, first look-ups)
        cpu, started = thread_cpu_s(pid), time.monotonic()
        time.sleep(seconds)
        share = (thread_cpu_s(pid) - cpu) / (time.monotonic() - started)
    return share, report


def bench_idle(ctx: Context) -> list[Row]:
    """Wake-up latency and idle CPU, the watch against today's 1 ms poll; with a Typesense in
    ctx (the suite), also the idle CPU of a real `outbox-sync run`."""
    quick = ctx.plan == QUICK
    durations = DURATIONS[quick]
    repeats = ctx.plan.repeats
    rows = []
    for journal, synchronous, rate in JOURNALS:
        runs: dict[str, list[LatencyRun]] = {"poll": [], "watch": []}
        for _ in range(repeats):
            for how in runs:
                runs[how].append(
                    latency_once(ctx.workdir, how, journal, synchronous, rate, durations.latency_s)
                )
            say(
                f"latency {journal}/{synchronous}: "
                + ", ".join(
                    f"{how} p50 {statistics.median(r[-1].latencies_ms):.2f} ms"
                    for how, r in runs.items()
                )
            )
        case = f"{journal}, synchronous={synchronous}, {rate:g} commits/s"
        for name, fraction in (("p50", 0.5), ("p99", 0.99)):
            rows.append(
                ratio_row(
                    f"wake-up {name}, {case}: watch vs 1 ms poll",
                    [percentile(run.latencies_ms, fraction) for run in runs["watch"]],
                    [percentile(run.latencies_ms, fraction) for run in runs["poll"]],
                    "ms",
                    ("<=", 1.0),
                    note="from the return of the commit (writer) to the look-up that saw it "
                    "(waiter, which acknowledges each change as the daemon does)"
                    if (name, journal, synchronous) == ("p50", "wal", "full")
                    else "",
                )
            )
        rows.append(
            ratio_row(
                f"CPU, {case}: watch vs 1 ms poll",
                [run.cpu_share * 100 for run in runs["watch"]],
                [run.cpu_share * 100 for run in runs["poll"]],
                "% core",
                note="the waiting loop, its acknowledgements included" if journal == "wal" else "",
            )
        )

    idle: dict[str, list[float]] = {"poll": [], "watch": [], "fallback": []}
    own: dict[str, list[tuple[float, dict[str, Any]]]] = {"fallback": [], "watch": []}
    every = ["--own-write-every", str(OWN_WRITE_EVERY_S)]
    own_seconds = durations.own_writes * OWN_WRITE_EVERY_S
    for _ in range(repeats):
        for how in idle:
            idle[how].append(idle_once(ctx.workdir, how, durations.idle_s)[0])
        for how in own:
            own[how].append(idle_once(ctx.workdir, how, own_seconds, *every))
        say(
            "idle CPU: "
            + ", ".join(f"{how} {shares[-1] * 100:.3f} %" for how, shares in idle.items())
        )
    rows.append(
        ratio_row(
            "idle CPU of the waiting loop: watch vs 1 ms poll",
            [share * 100 for share in idle["watch"]],
            [share * 100 for share in idle["poll"]],
            "% core",
            ("<=", IDLE_TARGET * 100),
            absolute_target=True,
            note=f"{durations.idle_s:g} s per run, nobody writing; main thread's schedstat",
        )
    )
    rows.append(
        ratio_row(
            "idle CPU of the waiting loop: fallback poll vs 1 ms poll",
            [share * 100 for share in idle["fallback"]],
            [share * 100 for share in idle["poll"]],
            "% core",
            note="ChangeWatch(use_inotify=False), wakeup.DEFAULT_FALLBACK_POLL_S",
        )
    )

    def per_own_write(how: str) -> tuple[list[float], list[float]]:
        """CPU (us) and look-ups per own write, above the same loop's idle."""
        cpu, looks = [], []
        idle_share = statistics.median(idle[how])
        idle_looks = own_seconds / (IDLE_RECHECK_S if how == "watch" else DEFAULT_FALLBACK_POLL_S)
        for share, report in own[how]:
            cpu.append((share - idle_share) * own_seconds / report["own_writes"] * 1e6)
            looks.append((report["looks"] - idle_looks) / report["own_writes"])
        return cpu, looks

    (watch_cpu, watch_looks), (write_cpu, _) = per_own_write("watch"), per_own_write("fallback")
    rows.append(
        ratio_row(
            "CPU per own write (acknowledgement): watch vs the write alone",
            watch_cpu,
            write_cpu,
            "us",
            note=f"one own write every {OWN_WRITE_EVERY_S:g} s, nobody else writing, above the "
            "loop's idle; the write alone: the same in fallback mode, where it wakes nothing",
        )
    )
    rows.append(
        Row(
            "look-ups per own write: watch",
            "looks",
            statistics.median(watch_looks),
            None,
            None,
            spread=(min(watch_looks), max(watch_looks)),
            values=watch_looks,
            note="the rechecks of wakeup.py (RECHECK_*), above the 1 s idle recheck",
        )
    )
    ways = {
        "ns": "its threads' schedstat (ns)",
        "ticks": "/proc/PID/stat (10 ms ticks: a thread ended meanwhile)",
    }
    daemons = [  # (what the database holds, the warm-up, open sync errors)
        ("empty outbox", 3.0, 0),
        ("empty outbox, open sync errors, from 10 s (start audit done)", 10.0, IDLE_OPEN_ERRORS),
    ]
    for what, warmup_s, open_errors in daemons if ctx.url else []:
        measured = [
            daemon_idle_cpu(ctx, durations.daemon_s, warmup_s, open_errors) for _ in range(repeats)
        ]
        shares = [share * 100 for share, _ in measured]
        say(f"daemon idle CPU, {what}: {', '.join(f'{share:.3f} %' for share in shares)}")
        how = "; ".join(sorted({ways[way] for _, way in measured}))
        with_errors = f" with {open_errors:,} open sync errors" if open_errors else ""
        rows.append(
            ratio_row(
                f"idle CPU of `outbox-sync run`{with_errors} vs the 1 ms poll loop",
                shares,
                [share * 100 for share in idle["poll"]],
                "% core",
                ("<=", IDLE_TARGET * 100),
                absolute_target=True,
                note=f"whole process over {durations.daemon_s:g} s, {what}; {how}",
            )
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.idle", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    wait = commands.add_parser("waiter", help="(internal) a waiting loop")
    wait.add_argument("--db", type=Path, required=True)
    wait.add_argument("--how", choices=("poll", "watch", "fallback"), required=True)
    wait.add_argument("--out", type=Path, required=True)
    wait.add_argument("--ack", action="store_true", help="an own write after each change")
    wait.add_argument("--own-write-every", type=float, default=0.0, metavar="SECONDS")
    write = commands.add_parser("writer", help="(internal) a steady writer")
    write.add_argument("--db", type=Path, required=True)
    write.add_argument("--rate", type=float, required=True)
    write.add_argument("--count", type=int, required=True)
    write.add_argument("--synchronous", required=True)
    write.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "waiter":
        waiter(args)
    elif args.command == "writer":
        writer(args)
    else:
        with tempfile.TemporaryDirectory(prefix="outbox-sync-idle-") as workdir:
            rows = bench_idle(Context(QUICK if args.quick else FULL, Path(workdir)))
        print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
