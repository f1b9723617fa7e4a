"""How long the embedded Typesense takes to be ready again after a stop.

    python -m tests.bench.restart [--runs 5] [--documents 5]

Each run: start a server in a fresh temporary directory, write a few documents through an
alias (as the daemon does), stop it, then start it again with a new LocalTypesense on the same
directory (as every `outbox-sync run` makes its own) and time start() until /health says ok.
Also reports whether the documents were all there after the restart. Prints the median and
the spread; asserts nothing (the machine is shared and noisy).

To time another version of localserver.py, put its tree first on PYTHONPATH and run this file
by its path from outside the repository.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from outbox_sync.localserver import LocalTypesense, free_port
from outbox_sync.mapping import SEQUENCES

API_KEY = "outbox-sync-bench"


def one_restart(data_dir: Path, port: int, documents: int) -> tuple[float, bool]:
    server = LocalTypesense(data_dir, api_key=API_KEY, port=port)
    server.start()
    headers = {"X-TYPESENSE-API-KEY": API_KEY}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        http.post("/collections", json=SEQUENCES.collection_schema("bench_v1")).raise_for_status()
        http.put("/aliases/bench", json={"collection_name": "bench_v1"}).raise_for_status()
        for i in range(documents):
            line = json.dumps(
                {
                    "id": str(i),
                    "element_type": "script",
                    "element_id": i,
                    "sequence_number": i,
                    "created_at": "2026-01-01T00:00:00Z",
                }
            )
            http.post("/collections/bench/documents/import", content=line).raise_for_status()
    server.stop()
    again = LocalTypesense(data_dir, api_key=API_KEY, port=port)
    started = time.monotonic()
    again.start(timeout_s=120)
    seconds = time.monotonic() - started
    with httpx.Client(base_url=again.url, headers=headers, timeout=30) as http:
        time.sleep(1)  # the replay goes on after /health says ok
        complete = http.get("/collections/bench").json().get("num_documents") == documents
    again.stop()
    return seconds, complete


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--documents", type=int, default=5)
    args = parser.parse_args()
    times, complete = [], 0
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="outbox-sync-restart-") as directory:
            seconds, whole = one_restart(Path(directory), free_port(), args.documents)
        times.append(seconds)
        complete += whole
        print(f"run {run + 1}: ready after {seconds:.2f} s, all there: {whole}", file=sys.stderr)
    print(
        f"restart: median {statistics.median(times):.2f} s "
        f"(min {min(times):.2f}, max {max(times):.2f}, {args.runs} runs); "
        f"documents all there after {complete} of {args.runs} restarts"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
