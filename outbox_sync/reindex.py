"""Zero-downtime reindex: fill a new versioned collection from SQLite, point the alias at it,
drop the old one.

Only the process holding the daemon lock applies changes to Typesense, and it pauses applying
while it rebuilds: so `outbox-sync reindex` either takes the lock itself (no daemon running) or
asks the running daemon to do it, through `outbox_sync_meta`, and follows its progress: the
daemon's half is `serve_request`, the asking side's `follow`.

Why nothing committed during the rebuild is lost: the outbox is not touched. Every change
committed while the new collection fills leaves an entry that is still queued when the alias
switches, and the daemon applies it to the new collection right after. Entries whose change the
fill already saw are applied once more, which is harmless (the daemon writes current state).
Searches keep answering from the old collection until the alias switches, atomically.
"""

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from outbox_sync.db import Database
from outbox_sync.documents import document_line
from outbox_sync.errors import (
    InvalidRecordError,
    OutboxSyncError,
    TypesenseError,
)
from outbox_sync.lock import DaemonLock
from outbox_sync.typesense_index import TypesenseIndex

REQUEST_KEY = "reindex_request"
STATUS_KEY = "reindex_status"
# Rows per read and per import while filling (the daemon's batch size, for the same reasons).
DEFAULT_CHUNK = 5000
# How often the daemon publishes its progress to a waiting `outbox-sync reindex`.
PROGRESS_INTERVAL_S = 0.5
# How long the running daemon has to pick up a request (it looks every second), and how often
# the asking side looks at the progress.
PICKUP_TIMEOUT_S = 30.0
FOLLOW_INTERVAL_S = 0.2

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ReindexResult:
    old: str | None
    new: str
    rows: int
    indexed: int
    invalid: int  # rows that fail validation: they stay in sync_errors, not in the index
    requeued: int  # rows Typesense refused: queued again, so the daemon's policy applies


def rebuild(
    db: Database,
    index: TypesenseIndex,
    *,
    chunk: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
) -> ReindexResult:
    """Rebuild the collection behind `index.collection`. The caller makes sure nothing else
    applies changes meanwhile (it holds the daemon lock)."""
    old = index.target()
    new = index.create_versioned()
    fresh = index.on_collection(new)
    total = int(db.counts()["rows"])
    rows_seen = indexed = invalid = 0
    refused: list[Any] = []
    try:
        for rows in db.scan_sequences(chunk):
            lines, keys = [], []
            for row in rows:
                try:
                    lines.append(document_line(row))
                    keys.append(row[0])
                except InvalidRecordError:
                    invalid += 1
            if lines:
                results = fresh.import_jsonl(b"\n".join(lines), len(lines))
                for key, result in zip(keys, results, strict=True):
                    if result.ok:
                        indexed += 1
                    else:
                        refused.append(key)
            rows_seen += len(rows)
            if progress is not None:
                progress(rows_seen, max(total, rows_seen))
    except BaseException:
        with contextlib.suppress(TypesenseError):
            index.drop_collection(new)
        raise
    if old == index.collection:
        # A plain collection holds the name: it must go before the alias can take it (the one
        # moment without the collection; later reindexes are pure alias switches).
        index.drop_collection(old)
        index.point_alias(new)
    else:
        index.point_alias(new)
        if old is not None:
            index.drop_collection(old)
    if refused:
        db.enqueue([(key, "upsert") for key in refused])
    return ReindexResult(old, new, rows_seen, indexed, invalid, len(refused))


def serve_request(
    db: Database, index: TypesenseIndex, heartbeat: Callable[[], None] = lambda: None
) -> bool:
    """In the daemon: run a reindex another process asked for, publishing progress and the
    outcome in outbox_sync_meta, and calling `heartbeat` as it goes (the systemd watchdog must
    not take a long rebuild for a hung loop). False when nothing was asked."""
    token = db.get_meta(REQUEST_KEY)
    if token is None:
        return False
    log = structlog.get_logger("outbox_sync")
    log.info("reindex_started", request=token)
    published = 0.0

    def publish(state: str, **fields: Any) -> None:
        db.set_meta(STATUS_KEY, json.dumps({"request": token, "state": state, **fields}))

    def report(done: int, total: int) -> None:
        nonlocal published
        heartbeat()
        if time.monotonic() - published >= PROGRESS_INTERVAL_S:
            published = time.monotonic()
            publish("running", done=done, total=total)

    try:
        result = rebuild(db, index, progress=report)
    except OutboxSyncError as error:
        log.warning("reindex_failed", error=str(error))
        publish("failed", error=str(error))
    else:
        log.info("reindex_finished", **asdict(result))
        publish("done", **asdict(result))
    db.set_meta(REQUEST_KEY, None)
    return True


def request(db: Database) -> str:
    """Ask the running daemon for a reindex; the token to follow in `status`."""
    token = f"{time.time():.6f}"
    db.set_meta(STATUS_KEY, None)
    db.set_meta(REQUEST_KEY, token)
    return token


def status(db: Database, token: str) -> dict[str, Any] | None:
    """The daemon's progress on request `token` (None until it starts)."""
    raw = db.get_meta(STATUS_KEY)
    if raw is None:
        return None
    state: dict[str, Any] = json.loads(raw)
    return state if state.get("request") == token else None


def follow(db: Database, lock: DaemonLock, progress: Progress) -> dict[str, Any]:
    """Ask the running daemon (holder of `lock`) to reindex and wait for its outcome, passing
    its progress on; OutboxSyncError if it fails, never takes it up, or dies meanwhile."""
    token = request(db)
    asked = time.monotonic()
    while True:
        state = status(db, token)
        if state is not None and state["state"] != "running":
            break
        if state is not None:
            progress(state["done"], state["total"])
        elif time.monotonic() - asked > PICKUP_TIMEOUT_S:
            db.set_meta(REQUEST_KEY, None)
            raise OutboxSyncError(
                "the running daemon did not take up the reindex within "
                f"{PICKUP_TIMEOUT_S:.0f} s: check its logs (is Typesense reachable?)"
            )
        if lock.holder() is None:  # the daemon died meanwhile
            db.set_meta(REQUEST_KEY, None)
            raise OutboxSyncError("the daemon stopped before finishing the reindex: run it again")
        time.sleep(FOLLOW_INTERVAL_S)
    if state["state"] == "failed":
        raise OutboxSyncError(f"reindex failed, the old collection stays in use: {state['error']}")
    return state
