"""outbox-sync benchmarks (issue 5).

    python -m tests.bench [--quick] [--json] [--only drain,lag,writer,memory,scaling]

Starts its own Typesense (the real 0.24.1 binary, as the tests do) in a temporary directory.
Every figure is a ratio to a reference measured in the same run on the same machine; absolute
numbers are printed beside it, never asserted. Each measurement is repeated: the table shows
the median and the spread (min-max) of the measured value. Progress goes to stderr; the table
to stdout, or with --json to stderr while stdout gets one JSON object.
"""

import argparse
import compileall
import contextlib
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import typesense
from typesense import exceptions as ts

from outbox_sync.config import parse_node
from outbox_sync.localserver import LocalTypesense
from outbox_sync.mapping import COLUMNS, SEQUENCES
from outbox_sync.schema import schema_statements
from outbox_sync.values import RawText
from tests.bench import app, reader

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "outbox-sync-bench"
SEQUENCES_DDL = next(s for s in schema_statements() if "TABLE IF NOT EXISTS sequences" in s)
RUNNING_DRAIN_POLL_S = 0.005  # how often the running drain's reader asks if the outbox is empty
# After the writer finished, how long the reader waits for the last documents.
LAG_GRACE_S = 30.0
DAEMON_START_TIMEOUT_S = 60.0
# Before each timed step, wait (at most SETTLE_MAX_S) until Typesense uses less than
# SETTLE_CPU of a core, so work left from the previous step (dropping a big collection, say)
# does not slow the next one.
SETTLE_CPU = 0.05
SETTLE_MAX_S = 30.0


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, int]  # drain backlogs, small and large
    repeats: int  # repetitions of every measurement...
    large_repeats: int  # ...but a drain of the large backlog
    lag_cases: tuple[tuple[float, float], ...]  # (commits per second, seconds)
    writer_rows: int  # bulk writer: rows, in transactions of app.ROWS_PER_TRANSACTION
    writer_seconds: float  # row-at-a-time writer: how long it writes
    batch_sizes: tuple[int, ...] = (1000, 5000, 10_000)  # raw ceiling: the best one counts
    naive_sample: int = 2000  # records sent one POST each; the rate is extrapolated
    reference_upserts: int = 300  # single upserts timed for the lag reference


FULL = Plan((100_000, 1_000_000), 3, 2, ((50, 10), (2000, 5)), 500_000, 3.0)
QUICK = Plan((20_000, 100_000), 3, 2, ((50, 4), (2000, 2)), 200_000, 1.0)


@dataclass
class Row:
    name: str
    unit: str
    value: float | None  # median of the repetitions
    reference: float | None
    ratio: float | None  # value / reference
    target: str = ""
    met: bool | None = None
    spread: tuple[float, float] | None = None  # min-max of the value
    values: list[float] = field(default_factory=list)
    references: list[float] = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class ProcessRun:
    seconds: float
    peak_rss_mb: float  # 10^6 bytes
    cpu_s: float = 0.0  # the process's own CPU time (user + system)
    server_cpu_s: float = 0.0  # Typesense's CPU time meanwhile


@dataclass
class Context:
    plan: Plan
    workdir: Path
    url: str = ""  # the Typesense of the benchmark running now
    client: Any = None
    server_pid: int = 0
    typesense_version: str = ""
    backlogs: dict[int, Path] = field(default_factory=dict)
    drains: dict[int, list[ProcessRun]] = field(default_factory=dict)
    ceilings: dict[int, list[float]] = field(default_factory=dict)  # seconds, best batch size
    # Typesense's CPU seconds during each raw import, by backlog and batch size
    import_cpu: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    idle: list[ProcessRun] = field(default_factory=list)  # run --once on an empty outbox
    floor: list[float] = field(default_factory=list)  # seconds: LIBRARIES_FLOOR
    batch_size: int | None = None  # the best batch size for the raw ceiling
    names: int = 0

    def fresh_name(self, prefix: str) -> str:
        self.names += 1
        return f"bench_{prefix}_{self.names}"

    def env(self, db: Path, collection: str, **settings: str) -> dict[str, str]:
        return {
            **os.environ,
            "TYPESENSE_URL": self.url,
            "TYPESENSE_API_KEY": API_KEY,
            "OUTBOX_SYNC_DB": str(db),
            "OUTBOX_SYNC_COLLECTION": collection,
            "OUTBOX_SYNC_LOG_LEVEL": "info",
            **settings,
        }

    def connect(self, server: LocalTypesense) -> None:
        assert server.process is not None
        self.url, self.client = server.url, make_client(server.url)
        self.server_pid = server.process.pid
        self.typesense_version = str(self.client.debug.retrieve().get("version"))

    def repeats(self, n: int) -> int:
        return self.plan.large_repeats if n == max(self.plan.sizes) else self.plan.repeats


class BenchError(Exception):
    """A run went wrong (a process failed, documents are missing): its figures mean nothing."""


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- statistics and rows ----------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def ratio_row(
    name: str,
    values: Sequence[float],
    references: Sequence[float],
    unit: str,
    target: tuple[str, float] | None = None,
    *,
    absolute_target: bool = False,
    note: str = "",
) -> Row:
    """A row comparing the median of `values` with the median of `references`. The target
    applies to the ratio, or with absolute_target to the value itself (in `unit`)."""
    value, reference = statistics.median(values), statistics.median(references)
    ratio = value / reference if reference else None
    row = Row(name, unit, value, reference, ratio, spread=(min(values), max(values)), note=note)
    row.values, row.references = list(values), list(references)
    if target is not None:
        op, limit = target
        checked = value if absolute_target else ratio
        row.target = f"{op} {limit:g}{' ' + unit if absolute_target else 'x'}"
        if checked is not None:
            row.met = checked >= limit if op == ">=" else checked <= limit
    return row


# -- Typesense ----------------------------------------------------------------------------------


@contextlib.contextmanager
def typesense_server(data_dir: Path) -> Iterator[LocalTypesense]:
    server = LocalTypesense(data_dir, api_key=API_KEY)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def server_cpu_s(ctx: Context) -> float:
    """The CPU time (user + system) the Typesense process has used so far."""
    with open(f"/proc/{ctx.server_pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(ctx: Context) -> None:
    """Wait until the Typesense process is (nearly) idle."""
    deadline = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < deadline:
        before = server_cpu_s(ctx)
        time.sleep(0.25)
        if server_cpu_s(ctx) - before < SETTLE_CPU * 0.25:
            return


def make_client(url: str) -> Any:
    config: Any = {
        "nodes": [parse_node(url)],
        "api_key": API_KEY,
        "num_retries": 0,
        "connection_timeout_seconds": 120,
    }
    return typesense.Client(config)


@contextlib.contextmanager
def fresh_collection(ctx: Context, prefix: str) -> Iterator[Any]:
    """A new, empty collection with the daemon's schema; yields its documents endpoint."""
    name = ctx.fresh_name(prefix)
    ctx.client.collections.create(SEQUENCES.collection_schema(name))
    try:
        yield ctx.client.collections[name].documents
    finally:
        drop_collection(ctx, name)


def drop_collection(ctx: Context, name: str) -> None:
    with contextlib.suppress(ts.ObjectNotFound):
        ctx.client.collections[name].delete()


def count_documents(ctx: Context, name: str) -> int:
    return int(ctx.client.collections[name].retrieve()["num_documents"])


def import_seconds(ctx: Context, bodies: Sequence[bytes], count: int) -> float:
    """Raw ceiling: pre-encoded JSONL bodies imported straight into a fresh collection."""
    with fresh_collection(ctx, "ceiling") as documents:
        settle(ctx)
        started, cpu = time.perf_counter(), server_cpu_s(ctx)
        import_all(documents, bodies, count)
        seconds = time.perf_counter() - started
        ctx.import_cpu.setdefault((count, len(bodies)), []).append(server_cpu_s(ctx) - cpu)
    return seconds


def rebuild_seconds(ctx: Context, bodies: Sequence[bytes], count: int) -> float:
    """Raw ceiling of a rebuild with no downtime, what `reindex` does: the same import into a
    fresh collection while a full one of the same documents stays (it answers searches until
    the switch; call this while one exists), then the drop of a full collection."""
    with fresh_collection(ctx, "rebuild") as documents:
        settle(ctx)
        started = time.perf_counter()
        import_all(documents, bodies, count)
    return time.perf_counter() - started  # leaving the block dropped the collection


def import_all(documents: Any, bodies: Sequence[bytes], count: int) -> None:
    succeeded = sum(
        documents.import_(body, {"action": "upsert"}).count('"success":true') for body in bodies
    )
    if succeeded != count:
        raise BenchError(f"raw import: {succeeded} of {count} documents succeeded")


def single_upsert_seconds(
    ctx: Context, docs: Sequence[dict[str, Any]], *, read: bool = False, rate: float = math.inf
) -> list[float]:
    """The naive sync: one POST (single-document upsert) per record, one retry on error, into
    a fresh collection. Returns the seconds each record took. With `read`, while the lag's
    reader searches the collection as it does during a lag run (in a process of its own). With
    a `rate`, each upsert starts on the schedule of a writer committing that many a second (as
    the lag's writer does: a late one does not push the next ones back), not right after the
    one before."""
    durations = []
    with fresh_collection(ctx, "single") as documents, contextlib.ExitStack() as stack:
        settle(ctx)
        if read:
            stack.enter_context(reading(ctx, documents.collection_name))
        start = time.perf_counter()
        for number, doc in enumerate(docs):
            if (delay := start + number / rate - time.perf_counter()) > 0:
                time.sleep(delay)
            started = time.perf_counter()
            try:
                documents.upsert(doc)
            except (ts.TypesenseClientError, httpx.HTTPError):
                documents.upsert(doc)
            durations.append(time.perf_counter() - started)
    return durations


@contextlib.contextmanager
def reading(ctx: Context, collection: str) -> Iterator[None]:
    """The lag's reader searching `collection` in another process, from its first answer on."""
    command = [sys.executable, "-m", "tests.bench.reader", ctx.url, API_KEY, collection]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        if not process.stdout.readline():  # it says so once its first search was answered
            raise BenchError(f"the lag's reader did not start (exit {process.wait()})")
        yield
    finally:
        process.kill()
        process.wait()


# -- SQLite and the daemon --------------------------------------------------------------------


def init_db(ctx: Context, db: Path, table: str | None = None) -> None:
    """A database prepared with `outbox-sync init` (after `table`, SQL that makes `sequences`,
    where given)."""
    for stale in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        stale.unlink(missing_ok=True)
    if table is not None:
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
            conn.execute(table)
    subprocess.run(
        [sys.executable, "-m", "outbox_sync", "init"],
        env=ctx.env(db, "unused"),
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


def backlog(ctx: Context, n: int) -> Path:
    """A database after `outbox-sync init` into which the application wrote n rows with
    executemany: its outbox holds n entries. Made once, copied for every run."""
    if n not in ctx.backlogs:
        db = ctx.workdir / f"backlog-{n}.db"
        say(f"writing a backlog of {n:,} rows")
        init_db(ctx, db)
        conn = app.connect(db)
        app.write_bulk(conn, list(app.make_rows(1, n)))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        ctx.backlogs[n] = db
    return ctx.backlogs[n]


def document_lines(db: Path) -> list[bytes]:
    """The JSONL lines the daemon sends for this database's rows, built the daemon's way."""
    conn = sqlite3.connect(db)
    conn.text_factory = RawText  # as the daemon reads them
    query = f"SELECT {', '.join(COLUMNS)} FROM sequences ORDER BY id"
    lines = [SEQUENCES.line(row) for row in conn.execute(query)]
    conn.close()
    return lines


def sample_documents(first_id: int, count: int) -> list[dict[str, Any]]:
    """Documents for the rows app.make_rows(first_id, count), built the daemon's way."""
    return [
        SEQUENCES.document(tuple(RawText(v.encode()) if isinstance(v, str) else v for v in row))
        for row in app.make_rows(first_id, count)
    ]


def log_tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# Starts a command and reports its wall time and peak RSS. Needed because on Linux a child's
# ru_maxrss starts at its parent's RSS at fork: the daemon must be forked by this small process,
# not by the bench, which holds hundreds of MB of documents.
MEASURE = """
import resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.call(sys.argv[2:])
seconds = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as out:
    out.write(f"{seconds} {usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
sys.exit(code)
"""


# The drains measure the sync: without the audit the daemon starts with (every 24 h and at
# start by default), which reads every row and exports every document (the audit rows measure
# it; `drain ... with the start audit` shows what it adds to a drain).
NO_AUDIT = {"OUTBOX_SYNC_AUDIT_EVERY": "0"}


def run_once(ctx: Context, db: Path, collection: str, **settings: str) -> ProcessRun:
    """`outbox-sync run --once` as a whole process: wall time and its own peak RSS."""
    return checked(ctx, db, collection, "run", "--once", **settings)


def checked(ctx: Context, db: Path, collection: str, *args: str, **settings: str) -> ProcessRun:
    """`outbox-sync ARGS` as a whole process, which must succeed."""
    run, code = measured(ctx, db, collection, *args, **settings)
    if code:
        log = ctx.workdir / f"{collection}-{args[0]}.log"
        raise BenchError(f"{' '.join(args)} exited {code}:\n{log_tail(log)}")
    return run


def measured(
    ctx: Context, db: Path, collection: str, *args: str, **settings: str
) -> tuple[ProcessRun, int]:
    """`outbox-sync ARGS` as a whole process (through MEASURE): wall time, peak RSS, exit."""
    return measured_command(
        ctx,
        [sys.executable, "-m", "outbox_sync", *args],
        ctx.env(db, collection, **settings),
        ctx.workdir / f"{collection}-{args[0]}.log",
    )


def measured_command(
    ctx: Context, command: Sequence[str], env: dict[str, str], log: Path
) -> tuple[ProcessRun, int]:
    """A command as a whole process (through MEASURE): wall time, peak RSS, exit status."""
    figures = ctx.workdir / "measure.txt"
    server_before = server_cpu_s(ctx) if ctx.server_pid else 0.0
    with open(log, "wb") as output:
        code = subprocess.call(
            [sys.executable, "-c", MEASURE, str(figures), *command],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
    server = server_cpu_s(ctx) - server_before if ctx.server_pid else 0.0
    seconds, max_rss_kib, cpu = figures.read_text().split()
    return ProcessRun(float(seconds), int(max_rss_kib) * 1024 / 1e6, float(cpu), server), code


@contextlib.contextmanager
def daemon(
    ctx: Context, db: Path, collection: str, **settings: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`outbox-sync run` in the background, from the moment it has created the collection
    until SIGTERM."""
    log = ctx.workdir / f"{collection}.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "outbox_sync", "run"],
            env=ctx.env(db, collection, **settings),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
        try:
            deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"daemon did not start:\n{log_tail(log)}")
                with contextlib.suppress(ts.ObjectNotFound):
                    ctx.client.collections[collection].retrieve()
                    break
                time.sleep(0.02)
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    drop_collection(ctx, collection)


# -- 1. drain, backfill, reindex ---------------------------------------------------------------


def fresh_copy(source: Path, db: Path) -> Path:
    for stale in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        stale.unlink(missing_ok=True)
    shutil.copyfile(source, db)
    return db


def check_synced(ctx: Context, db: Path, collection: str, n: int, what: str) -> None:
    documents = count_documents(ctx, collection)
    conn = sqlite3.connect(db)
    (pending,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
    conn.close()
    if documents != n or pending:
        raise BenchError(f"{what} of {n}: {documents} documents, {pending} entries left")


def drain_once(ctx: Context, n: int, **settings: str) -> tuple[ProcessRun, str]:
    """Copy the backlog, drain it into a fresh collection (the daemon creates it), check.
    Returns the run and the collection, which the caller drops."""
    db = fresh_copy(backlog(ctx, n), ctx.workdir / "drain.db")
    collection = ctx.fresh_name("drain")
    settle(ctx)
    run = run_once(ctx, db, collection, **(settings or NO_AUDIT))
    check_synced(ctx, db, collection, n, "drain")
    say(
        f"drain {n:,}{' (defaults)' if settings else ''}: {run.seconds:.2f} s, peak RSS "
        f"{run.peak_rss_mb:.0f} MB, CPU {run.cpu_s:.2f} s, Typesense's {run.server_cpu_s:.2f} s"
    )
    return run, collection


def running_drain_once(ctx: Context, n: int) -> float:
    """A running daemon's drain of n rows committed at once (the backlog's rows copied in one
    transaction): seconds from the commit to an empty outbox. What a daemon that runs pays
    for a backlog, the start excepted."""
    db = ctx.workdir / "running.db"
    init_db(ctx, db)
    with daemon(ctx, db, collection := ctx.fresh_name("running"), **NO_AUDIT):
        settle(ctx)
        with contextlib.closing(app.connect(db)) as conn:
            conn.execute("ATTACH DATABASE ? AS backlog", (str(backlog(ctx, n)),))
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO main.sequences SELECT * FROM backlog.sequences")
            conn.execute("COMMIT")
            committed = time.perf_counter()
            while conn.execute("SELECT 1 FROM main.outbox LIMIT 1").fetchone():
                time.sleep(RUNNING_DRAIN_POLL_S)
            seconds = time.perf_counter() - committed
        check_synced(ctx, db, collection, n, "running drain")
    say(f"drain {n:,} by a running daemon: {seconds:.2f} s")
    return seconds


def reindex_once(ctx: Context, n: int, collection: str) -> ProcessRun:
    """`outbox-sync reindex` of the collection a drain of the backlog of n filled, as a whole
    process (no daemon runs: it rebuilds by itself)."""
    db = ctx.workdir / "drain.db"
    settle(ctx)
    run = checked(ctx, db, collection, "reindex")
    check_synced(ctx, db, collection, n, "reindex")
    say(f"reindex {n:,}: {run.seconds:.2f} s")
    return run


def app_table(ctx: Context, n: int) -> Path:
    """A database holding only the application's table with n rows (no outbox-sync yet):
    made once, copied for every run."""
    db = ctx.workdir / f"app-{n}.db"
    if not db.exists():
        say(f"writing a table of {n:,} rows")
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(SEQUENCES_DDL)
        with contextlib.closing(app.connect(db)) as conn:
            app.write_bulk(conn, list(app.make_rows(1, n)))
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db


def backfill_once(ctx: Context, n: int) -> tuple[ProcessRun, float]:
    """`outbox-sync init` on a table of n rows (it asks the daemon to fill the collection from
    the table), then `run --once` (which does): the two processes' times added up, and the
    seconds of `init` alone."""
    db = fresh_copy(app_table(ctx, n), ctx.workdir / "backfill.db")
    collection = ctx.fresh_name("backfill")
    settle(ctx)
    init = checked(ctx, db, collection, "init")
    run = run_once(ctx, db, collection, **NO_AUDIT)
    check_synced(ctx, db, collection, n, "backfill")
    drop_collection(ctx, collection)
    say(f"backfill {n:,}: init {init.seconds:.2f} s + run --once {run.seconds:.2f} s")
    both = ProcessRun(
        init.seconds + run.seconds,
        max(init.peak_rss_mb, run.peak_rss_mb),
        init.cpu_s + run.cpu_s,
        init.server_cpu_s + run.server_cpu_s,
    )
    return both, init.seconds


def idle_runs(ctx: Context) -> list[ProcessRun]:
    """`run --once` on an empty outbox (audits off, as the drains): the process's fixed cost
    in time and memory."""
    while len(ctx.idle) < ctx.plan.repeats:
        ctx.idle.append(empty_run(ctx, **NO_AUDIT))
    return ctx.idle


def empty_run(ctx: Context, **settings: str) -> ProcessRun:
    empty = ctx.workdir / "empty.db"
    init_db(ctx, empty)
    run = run_once(ctx, empty, name := ctx.fresh_name("idle"), **settings)
    drop_collection(ctx, name)
    return run


def drain_runs(ctx: Context, n: int) -> list[ProcessRun]:
    if n not in ctx.drains:
        ctx.drains[n] = []
        for _ in range(ctx.repeats(n)):
            run, collection = drain_once(ctx, n)
            drop_collection(ctx, collection)
            ctx.drains[n].append(run)
    return ctx.drains[n]


def bench_drain(ctx: Context) -> list[Row]:
    """Drain of each backlog, `init`'s backfill and `reindex` vs (a) the raw import ceiling at
    the best batch size (swept on the small backlog, reused for the large one), (b) the naive
    one-POST-per-record sync."""
    # Naive first, on a Typesense that has seen no bulk import: right after one, single writes
    # are 2-3x slower for the next few thousand (measured here), which would flatter the drain.
    sample = sample_documents(1, ctx.plan.naive_sample)
    naive = [len(sample) / sum(single_upsert_seconds(ctx, sample)) for _ in range(ctx.plan.repeats)]
    say(f"naive: {', '.join(f'{rate:.0f}' for rate in naive)} records/s")
    return [row for n in ctx.plan.sizes for row in drain_rows(ctx, n, naive)]


def drain_rows(ctx: Context, n: int, naive_rates: list[float]) -> list[Row]:
    lines = document_lines(backlog(ctx, n))
    sizes = ctx.plan.batch_sizes if ctx.batch_size is None else (ctx.batch_size,)
    sweep: dict[int, list[float]] = {size: [] for size in sizes}
    small = n == min(ctx.plan.sizes)
    ctx.drains[n] = []
    runs: dict[str, list[ProcessRun]] = {"reindex": [], "backfill": [], "defaults": []}
    running: list[float] = []  # seconds: drains by a running daemon
    rebuilds: list[float] = []  # seconds: the raw ceiling of a rebuild (import beside + drop)
    inits: list[float] = []  # seconds: `init` on the table, the backfill's first process

    def bodies(size: int) -> list[bytes]:
        return [b"\n".join(lines[i : i + size]) for i in range(0, n, size)]

    def best() -> int:
        """The batch size of the fastest raw import so far."""
        return min(sizes, key=lambda size: statistics.median(sweep[size]))

    for _ in range(ctx.repeats(n)):  # interleaved, so drift hits all alike
        for size in sizes:
            sweep[size].append(import_seconds(ctx, bodies(size), n))
            say(f"raw import {n:,} at {size:,}/request: {sweep[size][-1]:.2f} s")
        run, collection = drain_once(ctx, n)
        ctx.drains[n].append(run)
        runs["reindex"].append(reindex_once(ctx, n, collection))
        size = best()
        rebuilds.append(rebuild_seconds(ctx, bodies(size), n))  # beside the reindexed collection
        say(f"raw rebuild {n:,} at {size:,}/request (import beside, drop): {rebuilds[-1]:.2f} s")
        drop_collection(ctx, collection)
        backfill, init_s = backfill_once(ctx, n)
        runs["backfill"].append(backfill)
        inits.append(init_s)
        running.append(running_drain_once(ctx, n))
        if small:  # what the audit at start adds (the default settings)
            run, collection = drain_once(ctx, n, OUTBOX_SYNC_AUDIT_EVERY="24h")
            drop_collection(ctx, collection)
            runs["defaults"].append(run)
    ctx.batch_size = best()
    ctx.ceilings[n] = sweep[ctx.batch_size]
    ceiling = [n / seconds for seconds in ctx.ceilings[n]]
    startup_s = statistics.median(run.seconds for run in idle_runs(ctx))
    floor_s = statistics.median(library_floor(ctx))
    raw_cpu = statistics.median(ctx.import_cpu[(n, math.ceil(n / ctx.batch_size))])

    def rate_row(what: str, process_runs: list[ProcessRun], note: str) -> Row:
        # Where the time goes: on 2 cores, the CPU the process takes is taken from Typesense
        cpu = statistics.median(run.cpu_s for run in process_runs)
        server = statistics.median(run.server_cpu_s for run in process_runs)
        # Each round's run against that round's raw import: the hour moves both (the raw
        # import of 100k varied by 40 % across ten rounds on one server, 2026-12-02)
        rounds = [
            raw_s / run.seconds for raw_s, run in zip(ctx.ceilings[n], process_runs, strict=True)
        ]
        note += (
            f"; CPU: its own {cpu:.2f} s, Typesense's {server:.2f} s (the raw import: Typesense"
            f" {raw_cpu:.2f} s); per round: {', '.join(f'{r:.3g}x' for r in rounds)}"
        )
        return ratio_row(
            f"{what} {n:,}: rate vs raw import ({ctx.batch_size:,}/request)",
            [n / run.seconds for run in process_runs],
            ceiling,
            "docs/s",
            (">=", 0.9),
            note=note,
        )

    rows = [
        rate_row(
            "drain",
            ctx.drains[n],
            f"whole `run --once` process, audits off; on an empty outbox it takes "
            f"{startup_s:.2f} s",
        ),
        ratio_row(
            f"drain {n:,}: the most a whole process can reach, vs raw import",
            [n / (seconds + floor_s) for seconds in ctx.ceilings[n]],
            ceiling,
            "docs/s",
            note=f"a process that spends only the libraries' floor ({floor_s:.2f} s: the "
            "interpreter, the imports and a client) and then drains at the raw import's rate",
        ),
        ratio_row(
            f"drain {n:,}: rate vs naive (1 POST/record)",
            [n / run.seconds for run in ctx.drains[n]],
            naive_rates,
            "docs/s",
            (">=", 60),
            note=f"naive: {ctx.plan.naive_sample:,} records into an empty collection, "
            "extrapolated (it slows a little as the collection grows: flattered at large n)",
        ),
        ratio_row(
            f"drain {n:,} by a running daemon: rate vs raw import ({ctx.batch_size:,}/request)",
            [n / seconds for seconds in running],
            ceiling,
            "docs/s",
            note="`outbox-sync run` running, audits off; n rows committed in one transaction, "
            "timed from the commit to an empty outbox",
        ),
        rate_row("backfill", runs["backfill"], "`init` on a table of n rows + `run --once`"),
        ratio_row(
            f"backfill {n:,}: the most `init` and a whole process can reach, vs raw import",
            [
                n / (raw_s + init_s + floor_s)
                for raw_s, init_s in zip(ctx.ceilings[n], inits, strict=True)
            ],
            ceiling,
            "docs/s",
            note=f"each round's `init` as measured ({statistics.median(inits):.2f} s), then a "
            "process that spends only the libraries' floor and fills at the raw import's rate",
        ),
        rate_row("reindex", runs["reindex"], "`outbox-sync reindex` as a whole process"),
        ratio_row(
            f"reindex {n:,}: the most a whole process can reach, vs raw import",
            [n / (seconds + floor_s) for seconds in rebuilds],
            ceiling,
            "docs/s",
            note="a process that spends only the libraries' floor and then rebuilds at the raw "
            "rebuild's rate (below)",
        ),
        ratio_row(
            f"reindex {n:,}: rate vs raw rebuild (import beside a full collection, then drop)",
            [n / run.seconds for run in runs["reindex"]],
            [n / seconds for seconds in rebuilds],
            "docs/s",
            note="the reference imports the same bodies into a fresh collection while the "
            "reindexed one (n documents) stays, as a rebuild with no downtime must, then drops "
            f"a full collection; the plain raw import is {statistics.median(ceiling):,.0f} docs/s",
        ),
    ]
    if runs["defaults"]:
        rows.append(
            ratio_row(
                f"drain {n:,} with the start audit (defaults) vs without",
                [run.seconds for run in runs["defaults"]],
                [run.seconds for run in ctx.drains[n]],
                "s",
                note="the daemon audits at start by default (--audit-every 24h)",
            )
        )
    return rows


# -- start ---------------------------------------------------------------------------------------


# What `run` cannot start without: the official Typesense client (httpx comes with it), the
# logging, the command line, the retries and SQLite (prometheus_client only serves /metrics,
# which are off by default, as in the bench).
RUN_LIBRARIES = ("typesense", "structlog", "click", "tenacity", "sqlite3")
# Imports them, makes a client as `run` does before its first request (httpx imports httpcore
# only then: ~0.04 s here), and exits the way outbox-sync's processes do (cli.entry: out of the
# collector's sight at exit, which skips ~0.05 s of walking what the imports made).
LIBRARIES_FLOOR = (
    f"import {', '.join(RUN_LIBRARIES)}; import gc; "
    "typesense.Client({'nodes': [{'host': '127.0.0.1', 'port': 9, 'protocol': 'http'}], "
    "'api_key': 'unused', 'verify': False}); gc.freeze()"
)


def library_floor(ctx: Context) -> list[float]:
    """Seconds of LIBRARIES_FLOOR as a whole process, at least `repeats` of them: measured
    here unless the start benchmark has measured them (interleaved with its other commands)."""
    env = ctx.env(ctx.workdir / "empty.db", "unused")
    while len(ctx.floor) < ctx.plan.repeats:
        command = [sys.executable, "-c", LIBRARIES_FLOOR]
        run, code = measured_command(ctx, command, env, ctx.workdir / "libraries.log")
        if code:
            raise BenchError(f"the libraries' floor exited {code}: see libraries.log")
        ctx.floor.append(run.seconds)
    return ctx.floor


def bench_start(ctx: Context) -> list[Row]:
    """What every command pays before it does anything: `--version`, and `run --once` on an
    empty outbox, vs a Python that does nothing (and `run --once` vs one that only imports the
    libraries it needs)."""
    runs: dict[str, list[float]] = {
        "pass": [],
        "libraries": [],
        "version": [],
        "once": [],
        "defaults": [],
    }
    env = ctx.env(ctx.workdir / "empty.db", "unused")
    for _ in range(ctx.plan.repeats * 2):
        for name, command in (
            ("pass", [sys.executable, "-c", "pass"]),
            ("libraries", [sys.executable, "-c", LIBRARIES_FLOOR]),
            ("version", [sys.executable, "-m", "outbox_sync", "--version"]),
        ):
            run, code = measured_command(ctx, command, env, ctx.workdir / f"{name}.log")
            if code:
                raise BenchError(f"{' '.join(command)} exited {code}")
            runs[name].append(run.seconds)
        runs["once"].append(empty_run(ctx, **NO_AUDIT).seconds)
        runs["defaults"].append(empty_run(ctx).seconds)
    ctx.floor += runs["libraries"]  # the drain's bound takes them too
    say(", ".join(f"{k} {statistics.median(v):.3f} s" for k, v in runs.items()))
    return [
        ratio_row(
            "`outbox-sync --version` vs `python -c pass`", runs["version"], runs["pass"], "s"
        ),
        ratio_row(
            "`run --once` on an empty outbox vs `python -c pass`",
            runs["once"],
            runs["pass"],
            "s",
            note="audits off, as the drains; it creates the collection, probes Typesense and "
            "writes its statistics",
        ),
        ratio_row(
            "`run --once` on an empty outbox vs importing the libraries it needs",
            runs["once"],
            runs["libraries"],
            "s",
            note=f"a Python that imports {', '.join(RUN_LIBRARIES)}, makes a client and does "
            "nothing else (then freezes them, as outbox-sync does at exit): the floor of any "
            "`run` built on them",
        ),
        ratio_row(
            "`run --once` on an empty outbox, defaults, vs `python -c pass`",
            runs["defaults"],
            runs["pass"],
            "s",
            note="with the audit at start (an empty table)",
        ),
    ]


# -- 2. lag -------------------------------------------------------------------------------------


def watch(
    url: str, collection: str, total: int, writer: subprocess.Popen[bytes]
) -> tuple[dict[int, tuple[float, float]], float]:
    """When each id 1..total first became searchable: poll a search for sequence_number >= the
    lowest id not seen yet (sequence_number == id), noting time.time() when the search that
    first showed it was sent and when its answer came. Typesense answered it in between: the
    document was searchable by then, and not yet when it answered the search before. Also
    returns the median cycle."""
    seen: dict[int, tuple[float, float]] = {}
    answers: list[float] = []
    lowest, deadline = 1, math.inf
    with reader.client(url, API_KEY) as http:
        while lowest <= total and time.monotonic() < deadline:
            if deadline == math.inf and writer.poll() is not None:
                deadline = time.monotonic() + LAG_GRACE_S
            sent = time.time()
            documents = reader.search(http, collection, lowest)
            now = time.time()
            answers.append(now)
            for document in documents:
                seen.setdefault(document["sequence_number"], (sent, now))
            while lowest in seen:
                lowest += 1
            time.sleep(reader.LAG_POLL_S)
    return seen, statistics.median(b - a for a, b in itertools.pairwise(answers))


def peak_backlog(commit_times: Sequence[float], seen_times: Sequence[float]) -> int:
    """The most records ever committed but not yet searchable."""
    events = sorted([(t, 1) for t in commit_times] + [(t, -1) for t in seen_times])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


@dataclass(frozen=True)
class LagRun:
    lags_ms: list[float]  # commit -> the middle of the search that first showed it
    answered_ms: list[float]  # commit -> the answer to that search (before 2026-11-30)
    missing: int
    peak_backlog: int
    achieved_rate: float
    poll_cycle_ms: float


def lag_once(ctx: Context, rate: float, seconds: float) -> LagRun:
    db = ctx.workdir / "lag.db"
    init_db(ctx, db)
    commits_file = ctx.workdir / "commits.json"
    total = int(rate * seconds)
    writer_command = [sys.executable, "-m", "tests.bench.app", "--db", str(db)]
    writer_command += ["--rate", str(rate), "--seconds", str(seconds), "--out", str(commits_file)]
    settle(ctx)
    with daemon(ctx, db, collection := ctx.fresh_name("lag")):
        writer = subprocess.Popen(writer_command, cwd=ROOT)
        seen, poll_cycle_s = watch(ctx.url, collection, total, writer)
        if writer.wait():
            raise BenchError(f"lag writer exited {writer.returncode}")
    commits = json.loads(commits_file.read_text())
    shown = [(seen[key], committed) for key, committed in commits if key in seen]
    span = commits[-1][1] - commits[0][1]
    return LagRun(
        [((sent + answered) / 2 - committed) * 1000 for (sent, answered), committed in shown],
        [(answered - committed) * 1000 for (_, answered), committed in shown],
        total - len(shown),
        peak_backlog([t for _, t in commits], [answered for _, answered in seen.values()]),
        (len(commits) - 1) / span if span > 0 else math.inf,
        poll_cycle_s * 1000,
    )


def bench_lag(ctx: Context) -> list[Row]:
    """Commit-to-searchable lag with the daemon running and a writer committing one row at a
    time at a steady rate, vs the round trip of one single-document upsert sent at that rate."""
    sample = sample_documents(1, ctx.plan.reference_upserts)
    rows = []
    targets = {50: {"p50": 2.0, "p99": 5.0}, 2000: {"p99": 30.0}}
    for rate, seconds in ctx.plan.lag_cases:
        references, back_to_back, quiet, runs = [], [], [], []
        for _ in range(ctx.plan.repeats):
            # after warm-up; the reference is timed under the reader, as the lag is, and at the
            # lag's rate: one upsert 20 ms after the last takes ~1 ms longer here than one
            # right after it (docs/performance.md), and that is what a sync per commit sends
            quiet.append(statistics.median(single_upsert_seconds(ctx, sample)[20:]) * 1000)
            durations = single_upsert_seconds(ctx, sample, read=True)
            back_to_back.append(statistics.median(durations[20:]) * 1000)
            durations = single_upsert_seconds(ctx, sample, read=True, rate=rate)
            references.append(statistics.median(durations[20:]) * 1000)
            runs.append(lag_once(ctx, rate, seconds))
            say(
                f"lag {rate:g}/s: p50 {percentile(runs[-1].lags_ms, 0.5):.1f} ms, "
                f"p99 {percentile(runs[-1].lags_ms, 0.99):.1f} ms, "
                f"single upsert {references[-1]:.2f} ms at {rate:g}/s "
                f"({back_to_back[-1]:.2f} ms back to back, {quiet[-1]:.2f} ms without the reader)"
            )
        missing = sum(run.missing for run in runs)
        cycle_ms = statistics.median(run.poll_cycle_ms for run in runs)
        reference, quiet_reference = statistics.median(references), statistics.median(quiet)
        back_to_back_reference = statistics.median(back_to_back)
        lag_p50 = statistics.median(percentile(run.lags_ms, 0.5) for run in runs)
        lag_p99 = statistics.median(percentile(run.lags_ms, 0.99) for run in runs)
        answered = [
            statistics.median(percentile(run.answered_ms, fraction) for run in runs) / reference
            for fraction in (0.5, 0.99)
        ]
        note = (
            f"the reader saw Typesense every {cycle_ms:.2f} ms (median); counted to the answer "
            f"of that search (an upper bound): p50 {answered[0]:.3g}x, p99 {answered[1]:.3g}x; "
            f"one upsert right after the one before (the reference until 2026-12-01), under "
            f"the reader: {back_to_back_reference:.2f} ms (p50 "
            f"{lag_p50 / back_to_back_reference:.3g}x, p99 {lag_p99 / back_to_back_reference:.3g}x "
            f"that); without the reader: {quiet_reference:.2f} ms (p50 "
            f"{lag_p50 / quiet_reference:.3g}x that)"
        ) + (f"; {missing} records never became searchable" if missing else "")
        for label, fraction in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
            limit = targets.get(int(rate), {}).get(label)
            rows.append(
                ratio_row(
                    f"lag {rate:g}/s {label} vs single upsert round trip at that rate (both read)",
                    [percentile(run.lags_ms, fraction) for run in runs],
                    references,
                    "ms",
                    None if limit is None else ("<=", limit),
                    note=note if label == "p50" else "",
                )
            )
        rows.append(
            ratio_row(
                f"lag {rate:g}/s writer: achieved vs asked commit rate",
                [run.achieved_rate for run in runs],
                [rate] * len(runs),
                "commits/s",
            )
        )
        if rate >= 1000:
            rows.append(
                ratio_row(
                    f"lag {rate:g}/s peak backlog vs rows written per second",
                    [run.peak_backlog for run in runs],
                    [rate] * len(runs),
                    "rows",
                    ("<=", 1.0),
                    note="bounded: never more than 1 s of writes unsearchable",
                )
            )
    return rows


# -- 3. writer overhead -----------------------------------------------------------------------

WRITER_KINDS = ("plain", "triggers", "daemon")
# A table with a unique constraint besides its key, after init: with the triggers that note the
# rows a REPLACE removes through it (guarded), and with those two dropped (unique).
UNIQUE_KINDS = ("unique", "guarded")
UNIQUE_DDL = SEQUENCES_DDL.replace("\n);", ",\n    UNIQUE (element_type, sequence_number)\n);")


def write_rate(ctx: Context, kind: str, mode: str) -> float:
    """Rows (bulk) or commits (row at a time) per second of the application, on a database
    without triggers (plain), after init (triggers), or after init with the daemon draining."""
    db = ctx.workdir / f"writer-{kind}.db"
    if kind == "plain":  # same table, same journal mode as after init: only triggers differ
        for stale in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            stale.unlink(missing_ok=True)
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(SEQUENCES_DDL)
    else:
        init_db(ctx, db, UNIQUE_DDL if kind in UNIQUE_KINDS else None)
    if kind == "unique":
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
            for event in ("insert", "update"):
                conn.execute(f"DROP TRIGGER sequences_outbox_{event}_replaced")
    draining = daemon(ctx, db, ctx.fresh_name("writer")) if kind == "daemon" else None
    with draining or contextlib.nullcontext(), contextlib.closing(app.connect(db)) as conn:
        settle(ctx)
        if mode == "bulk":
            rows = list(app.make_rows(1, ctx.plan.writer_rows))
            started = time.perf_counter()
            app.write_bulk(conn, rows)
            return len(rows) / (time.perf_counter() - started)
        return app.write_rows_for(conn, 1, ctx.plan.writer_seconds) / ctx.plan.writer_seconds


def bench_writer(ctx: Context) -> list[Row]:
    """Application write throughput: triggers vs none, and triggers with the daemon draining."""
    rows = []
    for mode, unit in (("bulk", "rows/s"), ("row-at-a-time", "commits/s")):
        rates: dict[str, list[float]] = {kind: [] for kind in WRITER_KINDS}
        for _ in range(ctx.plan.repeats):
            for kind in WRITER_KINDS:
                rates[kind].append(write_rate(ctx, kind, "bulk" if mode == "bulk" else "row"))
            say(f"writer {mode}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()))
        rows.append(
            ratio_row(
                f"writer {mode}: with triggers vs without",
                rates["triggers"],
                rates["plain"],
                unit,
                (">=", 0.75) if mode == "bulk" else None,
            )
        )
        rows.append(
            ratio_row(
                f"writer {mode}: triggers + daemon draining vs triggers",
                rates["daemon"],
                rates["triggers"],
                unit,
                (">=", 0.8),
            )
        )
    rates = {kind: [] for kind in UNIQUE_KINDS}
    for _ in range(ctx.plan.repeats):
        for kind in UNIQUE_KINDS:
            rates[kind].append(write_rate(ctx, kind, "bulk"))
        say("writer bulk, UNIQUE: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()))
    rows.append(
        ratio_row(
            "writer bulk, UNIQUE (element_type, sequence_number): with the REPLACE triggers vs "
            "without",
            rates["guarded"],
            rates["unique"],
            "rows/s",
            note="what those triggers cost the application's inserts (a table whose only unique "
            "constraint is its key, as the built-in one, has none)",
        )
    )
    return rows


# -- write lock ----------------------------------------------------------------------------------

LOCK_RATE = 1000.0  # commits per second of the writer that takes no busy timeout


def bench_lock(ctx: Context) -> list[Row]:
    """The daemon's share of the application's write lock: a writer without a busy timeout
    (app.write_without_waiting) commits LOCK_RATE rows a second while the daemon syncs them;
    its commits that find the lock taken fail. Without the daemon, the same writer."""
    shares: dict[str, list[tuple[int, int, float]]] = {"daemon": [], "alone": []}
    for _ in range(ctx.plan.repeats):
        for kind in shares:
            db = ctx.workdir / "lock.db"
            init_db(ctx, db)
            syncing = daemon(ctx, db, ctx.fresh_name("lock")) if kind == "daemon" else None
            with syncing or contextlib.nullcontext():
                settle(ctx)
                shares[kind].append(
                    app.write_without_waiting(db, LOCK_RATE, ctx.plan.writer_seconds)
                )
        say(", ".join(f"{k}: {v[-1][1]} of {v[-1][0]} failed" for k, v in shares.items()))
    alone_failed, alone_attempts = (sum(run[i] for run in shares["alone"]) for i in (1, 0))
    return [
        ratio_row(
            f"writer at {LOCK_RATE:,.0f} commits/s, no busy timeout, daemon syncing: failed vs "
            "attempted commits",
            [failed for _, failed, _ in shares["daemon"]],
            [attempts for attempts, _, _ in shares["daemon"]],
            "commits",
            ("<=", 0.01),
            note="the share of the time the daemon holds the write lock (commits at random "
            f"moments find it taken that often); without the daemon: {alone_failed} of "
            f"{alone_attempts} failed",
        ),
        ratio_row(
            f"writer at {LOCK_RATE:,.0f} commits/s with the daemon: achieved vs asked rate",
            [attempts / seconds for attempts, _, seconds in shares["daemon"]],
            [LOCK_RATE] * ctx.plan.repeats,
            "commits/s",
        ),
    ]


# -- 4. memory ----------------------------------------------------------------------------------


def bench_memory(ctx: Context) -> list[Row]:
    """Peak RSS of `run --once` draining each backlog vs draining an empty outbox."""
    idle = [run.peak_rss_mb for run in idle_runs(ctx)]
    rows = []
    for n in sorted(ctx.plan.sizes, reverse=True):
        rows.append(
            ratio_row(
                f"daemon peak RSS draining {n:,} vs empty outbox",
                [run.peak_rss_mb for run in drain_runs(ctx, n)],
                idle,
                "MB",
                ("<=", 100) if n == max(ctx.plan.sizes) else None,
                absolute_target=True,
            )
        )
    return rows


# -- 5. scaling ---------------------------------------------------------------------------------


def bench_scaling(ctx: Context) -> list[Row]:
    small, large = ctx.plan.sizes
    rows = [
        ratio_row(
            f"drain time {large:,} / {small:,}",
            [run.seconds for run in drain_runs(ctx, large)],
            [run.seconds for run in drain_runs(ctx, small)],
            "s",
            ("<=", 11),
            note=f"linear would be {large / small:g}",
        )
    ]
    if small in ctx.ceilings and large in ctx.ceilings:
        rows.append(
            ratio_row(
                f"raw import time {large:,} / {small:,} (for comparison)",
                ctx.ceilings[large],
                ctx.ceilings[small],
                "s",
            )
        )
    return rows


# -- 6. audit -----------------------------------------------------------------------------------


def export_and_scan_seconds(ctx: Context, db: Path, collection: str) -> float:
    """The least an audit must do: stream Typesense's export, and read every row once."""
    started = time.perf_counter()
    with httpx.stream(
        "GET",
        f"{ctx.url}/collections/{collection}/documents/export",
        headers={"X-TYPESENSE-API-KEY": API_KEY},
        timeout=600,
    ) as response:
        for _ in response.iter_bytes():
            pass
    conn = sqlite3.connect(db)
    for _ in conn.execute(f"SELECT {', '.join(COLUMNS)} FROM sequences"):
        pass
    conn.close()
    return time.perf_counter() - started


def bench_audit(ctx: Context) -> list[Row]:
    """`outbox-sync audit` over the large backlog once synced: peak RSS (absolute target), and
    its time vs a raw export plus a full scan of `sequences`."""
    n = max(ctx.plan.sizes)
    db = ctx.workdir / "audit.db"
    for stale in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        stale.unlink(missing_ok=True)
    shutil.copyfile(backlog(ctx, n), db)
    collection = ctx.fresh_name("audit")
    run_once(ctx, db, collection)
    audits, references = [], []
    for _ in range(ctx.repeats(n)):
        settle(ctx)
        references.append(export_and_scan_seconds(ctx, db, collection))
        settle(ctx)
        run, code = measured(ctx, db, collection, "audit", "--json")
        if code != 0:
            raise BenchError(f"audit of a synced collection exited {code}")
        audits.append(run)
        say(f"audit {n:,}: {run.seconds:.2f} s, peak RSS {run.peak_rss_mb:.0f} MB")
    drop_collection(ctx, collection)
    return [
        ratio_row(
            f"audit peak RSS over {n:,} rows vs empty outbox run",
            [run.peak_rss_mb for run in audits],
            [run.peak_rss_mb for run in idle_runs(ctx)],
            "MB",
            ("<=", 200) if n >= 1_000_000 else None,
            absolute_target=True,
        ),
        ratio_row(
            f"audit time over {n:,} rows vs raw export + full scan",
            [run.seconds for run in audits],
            references,
            "s",
            ("<=", 1.5),
        ),
    ]


def bench_idle(ctx: Context) -> list[Row]:
    """Wake-up latency and idle CPU: tests/bench/idle.py."""
    from tests.bench import idle  # imported here: it builds on this module

    return idle.bench_idle(ctx)


BENCHMARKS: dict[str, Callable[[Context], list[Row]]] = {
    "start": bench_start,
    "drain": bench_drain,
    "lag": bench_lag,
    "writer": bench_writer,
    "lock": bench_lock,
    "memory": bench_memory,
    "scaling": bench_scaling,
    "audit": bench_audit,
    "idle": bench_idle,
}


# -- output -------------------------------------------------------------------------------------


def number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


HEADER = ("benchmark", "value", "reference", "ratio", "target", "met", "value min-max", "n")


def cells(row: Row) -> tuple[str, ...]:
    """A row as the tables show it, a cell per HEADER."""
    spread = f"{number(row.spread[0])}-{number(row.spread[1])}" if row.spread else "-"
    return (
        row.name,
        f"{number(row.value)} {row.unit}",
        f"{number(row.reference)} {row.unit}",
        "-" if row.ratio is None else f"{row.ratio:.3g}x",
        row.target,
        {True: "yes", False: "NO", None: ""}[row.met],
        spread,
        str(len(row.values)),
    )


def table(rows: Sequence[Row]) -> str:
    lines = [HEADER, *(cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    text = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    text.insert(1, "-" * len(text[0]))
    notes = [f"  {row.name}: {row.note}" for row in rows if row.note]
    return "\n".join(text + (["", "notes:", *notes] if notes else []))


def markdown(rows: Sequence[Row]) -> str:
    """The table as Markdown, its notes as a list below: docs/performance.md holds it as
    printed (tests/test_docs.py renders the saved runs it names again and compares)."""
    lines = [HEADER, tuple("---" for _ in HEADER), *(cells(row) for row in rows)]
    text = ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines]
    notes = [f"- {row.name}: {row.note}" for row in rows if row.note]
    return "\n".join(text + (["", *notes] if notes else []))


def saved_rows(path: Path) -> list[Row]:
    """The rows of a run saved with --json."""
    rows = json.loads(path.read_text())["rows"]
    return [Row(**{**row, "spread": row["spread"] and tuple(row["spread"])}) for row in rows]


BATCH = re.compile(r" \([\d,]+/request\)")  # the raw import's batch size, in a row's name


def history(paths: Sequence[Path]) -> str:
    """Every row with a target across saved runs, as Markdown: in how many runs it was met,
    and the median and min-max of what its target judges (the ratio, or the value where the
    target is absolute: MB, % of a core). Rows keep the order of the newest whole suite (a
    run's file is named DATE-COMMIT.json, or DATE-COMMIT-BENCHMARK.json for a part); the raw
    import's batch size, which the bench picks anew in each run, is left out of the names."""
    runs = sorted(paths, key=lambda path: (path.stem.count("-") == 3, path.name), reverse=True)
    figures: dict[tuple[str, str], list[Row]] = {}
    for path in runs:
        for row in saved_rows(path):
            if row.target and row.ratio is not None:
                figures.setdefault((BATCH.sub("", row.name), row.target), []).append(row)
    lines = ["| figure | target | runs | met | median | min-max |", "| --- " * 6 + "|"]
    for (name, target), rows in figures.items():
        relative = target.endswith("x")
        unit = "x" if relative else f" {rows[0].unit}"
        measured = [row.ratio if relative else row.value for row in rows]
        found = [figure for figure in measured if figure is not None]
        met = sum(1 for row in rows if row.met)
        cell = name.replace("|", "\\|")
        lines.append(
            f"| {cell} | {target} | {len(rows)} | {met} | "
            f"{number(statistics.median(found))}{unit} | "
            f"{number(min(found))}-{number(max(found))}{unit} |"
        )
    return "\n".join(lines)


def environment(ctx: Context) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "commit": commit,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "settings": {k: v for k, v in os.environ.items() if k.startswith("OUTBOX_SYNC_")},
        "plan": asdict(ctx.plan),
        "raw_import_batch_size": ctx.batch_size,
        "typesense": ctx.typesense_version,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller backlogs, shorter runs")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, table on stderr")
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated: {','.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--markdown",
        metavar="RUN.json",
        type=Path,
        help="print the table of a run saved with --json as Markdown (as docs/performance.md "
        "holds it), and run nothing",
    )
    parser.add_argument(
        "--history",
        metavar="RUN.json",
        type=Path,
        nargs="+",
        help="print, for every figure with a target, in how many of these saved runs it was "
        "met, with its median and spread (as docs/performance.md holds it), and run nothing",
    )
    args = parser.parse_args(argv)
    if args.history:
        print(history(args.history))
        return 0
    if args.markdown:
        print(markdown(saved_rows(args.markdown)))
        return 0
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}")
    plan = QUICK if args.quick else FULL
    # Compile the package once, as installing it does: with PYTHONDONTWRITEBYTECODE set (as in
    # the development containers) every process the bench starts would compile it again.
    compileall.compile_dir(ROOT / "outbox_sync", quiet=1)
    started = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="outbox-sync-bench-") as workdir:
        ctx = Context(plan, Path(workdir))
        for name in BENCHMARKS:  # in this order: memory and scaling reuse the drains
            if name in chosen:
                say(f"== {name}")
                # A fresh server for each benchmark: no state carries over from the previous.
                with typesense_server(ctx.workdir / f"typesense-{name}") as server:
                    ctx.connect(server)
                    rows += BENCHMARKS[name](ctx)
        info = environment(ctx)
    info["seconds"] = round(time.monotonic() - started, 1)
    print(table(rows), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps({"environment": info, "rows": [asdict(row) for row in rows]}, indent=2))
    return 0
