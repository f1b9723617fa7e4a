"""Where a drain's time goes: `run --once` on a backlog, each import request timed inside it.

    python -m tests.bench.gaps [--rows 100000] [--runs 3]

Starts a real Typesense 0.24.1, writes a backlog of n rows after `init`, then runs `outbox-sync
run --once` in a process whose `TypesenseIndex.import_jsonl` notes when each request started and
ended. Prints, per run: the whole process; when the first request was sent (the start, and the
first batch read); the time at least one request was in flight (Typesense importing; the drain
keeps two in flight); the time none was, between the first and the last (Typesense waiting for
the daemon); what came after the last.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from outbox_sync.localserver import LocalTypesense
from tests.bench import app

API_KEY = "outbox-sync-bench"
ROOT = Path(__file__).resolve().parents[2]

DRIVER = r"""
import atexit, os, sys, time
started = time.perf_counter()
from outbox_sync import typesense_index
imported = time.perf_counter()
spans, claims = [], []
untimed = typesense_index.TypesenseIndex.import_jsonl
def timed(self, body, count, **kwargs):
    sent = time.perf_counter()
    try:
        return untimed(self, body, count, **kwargs)
    finally:  # the drain's imports, not the claim's (one line into the claims collection)
        mine = self.collection == os.environ["OUTBOX_SYNC_COLLECTION"]
        (spans if mine else claims).append((sent, time.perf_counter()))
typesense_index.TypesenseIndex.import_jsonl = timed
def report():
    end = time.perf_counter()
    # two requests may be in flight at once: the time with at least one (Typesense busy)
    busy, covered_to = 0.0, 0.0
    for sent, answered in sorted(spans):
        busy += max(0.0, answered - max(sent, covered_to))
        covered_to = max(covered_to, answered)
    first, last = min(s for s, _ in spans), max(a for _, a in spans)
    print(
        f"whole {end - started:.3f} s, outbox_sync imported at {imported - started:.3f} s, "
        f"claimed at {min(a for _, a in claims) - started:.3f} s, "
        f"first request at {first - started:.3f} s, "
        f"{len(spans)} requests, at least one in flight {busy:.3f} s, none in flight between "
        f"the first and the last {last - first - busy:.3f} s, after the last {end - last:.3f} s",
        file=sys.stderr,
    )
atexit.register(report)
from outbox_sync.cli import entry
sys.argv = ["outbox-sync", "run", "--once"]
entry()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="outbox-sync-gaps-") as workdir:
        work = Path(workdir)
        with LocalTypesense(work / "typesense", api_key=API_KEY) as server:
            for run in range(args.runs):
                db = work / f"run{run}.db"
                env = {
                    **os.environ,
                    "TYPESENSE_URL": server.url,
                    "TYPESENSE_API_KEY": API_KEY,
                    "OUTBOX_SYNC_DB": str(db),
                    "OUTBOX_SYNC_COLLECTION": f"gaps{run}",
                    "OUTBOX_SYNC_AUDIT_EVERY": "0",  # as the drains of run.py
                }
                command = [sys.executable, "-m", "outbox_sync", "init"]
                subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True)
                conn = app.connect(db)  # the bench's rows, written as its backlogs are
                app.write_bulk(conn, list(app.make_rows(1, args.rows)))
                conn.close()
                time.sleep(2)  # let Typesense settle after the previous run
                spawned = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-c", DRIVER], env=env, cwd=ROOT, capture_output=True
                )
                spawn_s = time.perf_counter() - spawned
                lines = done.stderr.decode(errors="replace").strip().splitlines()
                print(f"{args.rows:,} rows in {spawn_s:.3f} s from the spawn: ", end="")
                print(lines[-1] if lines else done.returncode)


if __name__ == "__main__":
    main()
