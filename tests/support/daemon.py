"""The daemon as the tests run it: a real process (`Daemon`, and the processes it started:
`children`), or its worker in this process (`mapping_worker`), drained once (`drain`) or
running in a thread (`running`); and a failure recorded as the worker records one
(`record_failure`)."""

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from outbox_sync import schema
from outbox_sync.db import Database, SyncFailure
from outbox_sync.mapping import Mapping
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import Worker, daemon
from tests.support.typesense import Server


class Daemon:
    """`outbox-sync run` as a real process, its stderr (JSON logs) kept in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "outbox_sync", "run", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        return [json.loads(line) for line in self.output().splitlines() if line.startswith("{")]

    def logged(self, event: str) -> bool:
        return any(entry.get("event") == event for entry in self.events())

    def wait(self, timeout_s: float = 60) -> int:
        try:
            return self.process.wait(timeout_s)
        finally:
            self.log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the embedded server of a daemon, say)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def mapping_worker(
    path: Path, mapping: Mapping, server: Server, collection: str, *, backfill: bool = False
) -> tuple[Database, Worker]:
    """The daemon's side of the file at `path` after `init` of one mapping (with `backfill`,
    its rows queued), and the worker `run` makes of it, its collection on `server` made."""
    db = Database(path, create=True)
    schema.init(db, [mapping], backfill=backfill)
    return db, daemon(db, [mapping_index(db, mapping, server, collection)])


def mapping_index(
    db: Database, mapping: Mapping, server: Server, collection: str
) -> TypesenseIndex:
    """The index of `mapping` on `server`, bound to the file's table and its collection made, as
    the daemon makes it."""
    [bound] = schema.check(db, [mapping])
    index = TypesenseIndex([server.url], server.api_key, collection, mapping=bound)
    index.ensure_collection()
    return index


def drain(worker: Worker) -> None:
    """Apply everything waiting in the outbox (as `outbox-sync run --once`)."""
    worker.run(threading.Event(), once=True)


@contextlib.contextmanager
def running(worker: Worker, join_s: float = 30) -> Iterator[threading.Thread]:
    """`worker.run(stop)` in a thread for the block; then stop set and the thread joined (for at
    most join_s: the caller checks it ended)."""
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(join_s)


def record_failure(
    db: Database,
    outbox_id: int,
    key: Any,
    error: str,
    *,
    mapping: str = "sequences",
    op: str = "upsert",
    document: str | None = None,
    http_status: int | None = None,
    attempts: int = 1,
) -> None:
    """A record given up on, written to `sync_errors` as the worker's acknowledgement does."""
    failure = SyncFailure(
        outbox_id=outbox_id,
        mapping=mapping,
        key=key,
        op=op,
        document=document,
        http_status=http_status,
        error=error,
        attempts=attempts,
    )
    db.ack(0, [], [failure])
