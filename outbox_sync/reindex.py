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

The same rebuild fills a new mapping's collection the first time (`serve_fills`): `init` asks
for it rather than queueing every row the table already holds.
"""

import contextlib
import json
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, TypeGuard

import structlog

from outbox_sync.claims import CollectionClaimedError
from outbox_sync.db import Database, enqueue_rows, fill_key, is_busy, row_key
from outbox_sync.errors import (
    CollectionNotFoundError,
    InvalidRecordError,
    OutboxSyncError,
    StoppingError,
    TypesenseError,
    TypesenseUnavailableError,
)
from outbox_sync.lock import DaemonLock
from outbox_sync.typesense_index import (
    IN_FLIGHT,
    MAX_DELETE_IDS,
    ImportResult,
    TypesenseIndex,
    free_request_bodies,
)
from outbox_sync.values import encode

# An import request of the fill: its answer to come, the keys of its lines, the rows it read.
Flight = tuple[Future[list[ImportResult]] | None, list[Any], int]

REQUEST_KEY = "reindex_request"
STATUS_KEY = "reindex_status"
# Rows per read and per import while filling (the daemon's batch size, for the same reasons).
DEFAULT_CHUNK = 5000
# How often the daemon looks at its collections in Typesense (CollectionWatch): one GET each.
COLLECTION_WATCH_INTERVAL_S = 60.0
# How often the daemon publishes its progress to a waiting `outbox-sync reindex`.
PROGRESS_INTERVAL_S = 0.5
# How long the running daemon has to pick up a request (it looks every second, every 15 s
# while it drains a backlog, then finishes the requests in flight: up to a request timeout or
# two), and how often the asking side looks at the progress.
PICKUP_TIMEOUT_S = 60.0
FOLLOW_INTERVAL_S = 0.2

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ReindexResult:
    collection: str
    old: str | None
    new: str
    rows: int
    indexed: int
    invalid: int  # rows that fail validation: in sync_errors (queued if not yet), not indexed
    requeued: int  # rows Typesense refused or invalid ones without an open error: queued, so
    # the daemon's policy applies
    last_good_refused: int = 0  # invalid rows whose last good document the new collection
    # refused (a changed schema): no longer searchable, named by a `last_good_refused` warning


def rebuild(
    db: Database,
    index: TypesenseIndex,
    *,
    chunk: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
) -> ReindexResult:
    """Rebuild the collection behind `index.collection`. The caller makes sure nothing else
    applies changes meanwhile (it holds the daemon lock).

    Everything that can fail without harm happens before the switch (filling, keeping the last
    good documents, queueing the refused rows): a failure there drops the new collection and
    the old one stays in use. After the switch, the rebuild has happened. What an earlier
    rebuild cut short left behind is dropped first, and a name an earlier one lost is pointed
    at what it left (`recover_name`) before this one makes a collection of its own: a rebuild
    cut short now leaves the name on a whole collection, never a newest half-filled one for
    the daemon's start to take."""
    old = index.target() or index.recover_name()
    if old is not None:
        index.drop_leftovers(old)
    new = index.create_versioned()
    try:
        fresh = index.on_collection(new, index.configured)
        fill = _fill(db, fresh, chunk, progress)
        lost: list[tuple[Any, str]] = []
        if old is not None and fill.invalid_ids:
            lost = _keep_last_good(index.on_collection(old), fresh, fill.invalid_ids)
        if fill.refused:  # applied by the daemon after the switch, so to the new collection
            db.enqueue(index.mapping.name, [(key, "upsert") for key in fill.refused])
    except BaseException as error:  # Ctrl-C too: no half-filled collection is left behind
        with contextlib.suppress(TypesenseError):
            index.drop_collection(new)
        if not isinstance(error, Exception):
            raise
        raise OutboxSyncError(f"{error} (the old collection stays in use)") from error
    _switch(index, old, new)
    index.mapping = fresh.mapping  # the documents are now as the mapping says
    _close_errors(db, index.mapping.name, fill.indexed_with_errors)
    if lost:
        _report_lost(index, lost)
    db.set_meta(fill_key(index.mapping.name), None)  # a rebuild is the fill `init` asked for
    return ReindexResult(
        index.collection,
        old,
        new,
        fill.rows,
        fill.indexed,
        fill.invalid,
        len(fill.refused),
        len(lost),
    )


@dataclass
class _Fill:
    rows: int = 0
    indexed: int = 0
    invalid: int = 0
    refused: list[Any] = field(default_factory=list)  # and invalid rows without an open error
    invalid_ids: dict[str, Any] = field(default_factory=dict)  # invalid rows: document id: key
    indexed_with_errors: list[Any] = field(default_factory=list)  # keys with an open error


def _fill(db: Database, fresh: TypesenseIndex, chunk: int, progress: Progress | None) -> _Fill:
    """Import every valid row into the new collection, in chunks of short reads. Pipelined as
    the daemon's drain: two chunks in flight, the next read meanwhile (chunks hold distinct
    rows: no record is in two requests at once)."""
    fill = _Fill()
    mapping = fresh.mapping
    total = int(db.count_rows(mapping) or 0)
    with_errors = {key for keys in db.scan_open_error_keys(mapping.name) for key in keys}

    def done(answer: Future[list[ImportResult]] | None, keys: list[Any], rows: int) -> None:
        results = [] if answer is None else answer.result()
        free_request_bodies()
        for key, result in zip(keys, results, strict=True):
            if not result.ok:
                fill.refused.append(key)
                continue
            fill.indexed += 1
            if key in with_errors:
                fill.indexed_with_errors.append(key)
        fill.rows += rows
        if progress is not None:
            progress(fill.rows, max(total, fill.rows))

    # Leaving the block waits for the requests still running behind an error.
    with ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="import") as http:
        flights: deque[Flight] = deque()  # the chunks Typesense imports: answers, keys, rows
        for rows in db.scan_rows(mapping, chunk):
            lines, keys = [], []
            for row in rows:
                key = row_key(row[0])
                try:
                    lines.append(mapping.judge(row))
                    keys.append(key)
                except InvalidRecordError:
                    fill.invalid += 1
                    if (doc_id := mapping.document_id(key)) is not None:
                        fill.invalid_ids[doc_id] = key
                    if key not in with_errors:  # a first fill's, or a changed mapping's
                        fill.refused.append(key)  # the drain records it in sync_errors
            if len(flights) == IN_FLIGHT:  # the oldest answer before the next request
                done(*flights.popleft())
            answer = (
                http.submit(fresh.import_jsonl, b"\n".join(lines), len(lines)) if lines else None
            )
            flights.append((answer, keys, len(rows)))
        while flights:
            done(*flights.popleft())
    return fill


def _keep_last_good(
    old: TypesenseIndex, fresh: TypesenseIndex, invalid: dict[str, Any]
) -> list[tuple[Any, str]]:
    """A record whose latest row is invalid keeps its last good document: copied from the old
    collection (docs/guarantees.md promises it stays searchable while its error is open),
    unless the new one holds the record already (a loose table's valid row of the same key,
    indexed as the mapping now says): the copy only creates, and Typesense answers 409 for an
    id it holds, in the same step as it writes the others. The (key, Typesense's reason) of
    each one the new collection refuses (a changed schema); a 5xx line is server trouble, as
    in the drain: the rebuild fails and the old collection stays."""
    doc_ids = list(invalid)
    refused = []
    for start in range(0, len(doc_ids), MAX_DELETE_IDS):
        documents = list(old.export_ids(doc_ids[start : start + MAX_DELETE_IDS]))
        if not documents:
            continue
        body = b"\n".join(map(encode, documents))
        results = fresh.import_jsonl(body, len(documents), action="create")
        for document, result in zip(documents, results, strict=True):
            if result.ok or result.http_status == 409:  # held already
                continue
            if result.http_status is not None and result.http_status >= 500:
                raise TypesenseUnavailableError(
                    f"Typesense answered {result.http_status} for a document: {result.error}",
                    result.http_status,
                )
            refused.append((invalid[str(document["id"])], result.error or "import failed"))
    return refused


# Keys of records whose last good document a rebuild lost that its warning names.
LOST_KEYS_LOGGED = 100


def _report_lost(index: TypesenseIndex, lost: list[tuple[Any, str]]) -> None:
    """Records whose last good document the rebuilt collection refused are no longer
    searchable: one warning counts them and names the first LOST_KEYS_LOGGED. Their rows are
    invalid, so each has its open error (or gets it from the drain: its entry was queued)."""
    structlog.get_logger("outbox_sync").warning(
        "last_good_refused",
        collection=index.collection,
        records=len(lost),
        keys=[key for key, _ in lost[:LOST_KEYS_LOGGED]],  # a BLOB as `errors list` shows it
        reason=lost[0][1],
        note="no longer searchable until their rows are fixed: see `outbox-sync errors list`",
    )


def _switch(index: TypesenseIndex, old: str | None, new: str) -> None:
    """Point the alias at the new collection, then the index's writes, and drop the old one.

    Writes follow the alias only once it points at the new collection. If pointing it fails,
    the error's cause (a CollectionNotFoundError) has the daemon look the name up again at
    once (`serve_request`) and follow it: a switch whose answer timed out may have been made."""
    if old != index.collection:
        try:
            index.point_alias(new)
        except TypesenseError as error:
            raise OutboxSyncError(
                f"could not point the alias at {new} ({error}): the daemon goes on with the "
                "collection the name points at, and drops the other"
            ) from CollectionNotFoundError(index.collection)
        index.retarget(new)
        if old is not None:
            try:
                index.drop_collection(old)
            except TypesenseError as error:  # the rebuild is done: only space is lost
                structlog.get_logger("outbox_sync").warning(
                    "old_collection_kept", collection=old, reason=str(error)
                )
        return
    # A plain collection holds the name: it must go before the alias can take it (the one
    # moment without the collection; later reindexes are pure alias switches).
    index.drop_collection(old)
    try:
        index.point_alias(new)
    except TypesenseError as error:
        # Writes still go to the missing name: the daemon would notice only at its next write,
        # searches getting 404 until then. The cause says so: serve_request has it look now.
        raise OutboxSyncError(
            f"dropped the plain collection {old} but could not point the alias at {new} "
            f"({error}): the daemon adopts {new} once Typesense answers, or at its next start; "
            "or run `outbox-sync reindex` again"
        ) from CollectionNotFoundError(index.collection)
    index.retarget(new)


def _close_errors(db: Database, mapping: str, keys: list[Any]) -> None:
    """The rebuild indexed these records' current rows: their open errors are superseded."""
    for start in range(0, len(keys), DEFAULT_CHUNK):
        db.close_errors([(mapping, key) for key in keys[start : start + DEFAULT_CHUNK]])


def serve_fills(
    db: Database,
    indexes: Sequence[TypesenseIndex],
    heartbeat: Callable[[], None] = lambda: None,
) -> bool:
    """In the daemon, before it drains: fill each collection `init` asked for (a new mapping
    whose table held rows) straight from its table, by `rebuild` (schema.init says what it
    saves). Changes committed since `init` wait in the outbox, applied after.

    Typesense trouble or a locked database leaves the request for a later turn (the loop
    waits it out), and so does the daemon stopping (`heartbeat` raises StoppingError between
    chunks: the new collection is dropped, and the next start fills again), and so does a
    switch that failed (which may have been made: the loop follows the name); any other failure
    queues every row instead, as `init --backfill` does, for the drain and its policy
    (retries, sync_errors): nothing is lost. False when none was asked for."""
    log = structlog.get_logger("outbox_sync")
    asked = [index for index in indexes if db.fill_asked(index.mapping.name)]
    for index in asked:
        log.info("fill_started", collection=index.collection)  # fill_finished counts the rows
        try:
            result = rebuild(db, index, progress=lambda done, total: heartbeat())
        except OutboxSyncError as error:
            if isinstance(error.__cause__, StoppingError):
                log.info("fill_stopped", collection=index.collection, note="filled at next start")
                return True
            if isinstance(error.__cause__, CollectionNotFoundError):  # a failed switch
                # (`_switch`), which may have been made: as for a reindex, the loop looks the
                # name up again at once and follows it; the fill stays asked for
                log.warning("fill_failed", collection=index.collection, reason=str(error))
                raise error.__cause__ from None
            for trouble in (error, error.__cause__):  # rebuild says which collection stays
                if _passing(trouble) or isinstance(trouble, CollectionClaimedError):
                    raise trouble from None  # claimed: queueing the rows would feed it
            with db.write() as conn:
                queued = enqueue_rows(conn, index.mapping)
            log.warning(
                "fill_failed", collection=index.collection, reason=str(error), rows_queued=queued
            )
        else:
            log.info("fill_finished", **asdict(result))
    return bool(asked)


class CollectionWatch:
    """A loop job, every COLLECTION_WATCH_INTERVAL_S: each collection as Typesense has it now
    (one request each). Three things can change there behind the daemon:

    - Its fields: Typesense alters a collection in place (PATCH /collections/NAME: a field
      dropped, or dropped and added with another type). Searches on such a field fail, the
      audit, comparing documents, finds nothing, and the daemon saw it only at its next start,
      which then refused the collection. It rebuilds such a collection from SQLite with the
      mapping's fields, as `reindex` does (no downtime), with one `collection_fields_changed`
      warning. Trouble the loop waits out leaves it for a later turn; a rebuild that fails
      otherwise, or leaves the fields as they were, is said once and not tried again until the
      collection is right again (rebuilt by hand) or the daemon starts again (`check` and the
      `outbox_sync_collection_fields_changed` metric say it meanwhile; the next start refuses
      the collection).
    - Where its name points: someone moves the alias to another collection. The daemon went on
      writing to the one it found at start, which no search reads, and its audits, reading
      through the name, queued the same repairs for ever. It writes to the one the name points
      at now, with one `collection_repointed` warning, and audits it (`request`).
    - How many documents it holds: a count that moved while the daemon sent it no write is
      another's doing (a delete by filter, an import by hand, a script with the admin key),
      which waited for the daily audit. It audits now, with one
      `documents_changed_elsewhere` warning. A change made while the daemon writes too is
      left to that audit: the count cannot tell it from the daemon's own."""

    def __init__(
        self,
        db: Database,
        indexes: Sequence[TypesenseIndex],
        request: Callable[[str], None],
        heartbeat: Callable[[], None] = lambda: None,
        seen: Callable[[str, bool], None] = lambda collection, changed: None,
    ) -> None:
        self.db, self.indexes, self.request, self.heartbeat = db, indexes, request, heartbeat
        self.seen = seen  # (collection, whether its fields are changed): the metric
        self.given_up: set[str] = set()
        # per collection, at the last look: (the real collection, its documents, index.sent)
        self.counted: dict[str, tuple[str, int, int]] = {}
        self.log = structlog.get_logger("outbox_sync")

    def __call__(self, now: float) -> None:
        for index in self.indexes:
            existing = index.info()
            if (before := index.follow(existing)) is not None:
                self.log.warning(
                    "collection_repointed",
                    collection=index.collection,
                    before=before,
                    now=index.written,
                    note="someone pointed the name at another collection: writing there now, "
                    "and auditing it against SQLite",
                )
                self.request("collection repointed")
            self._count(index, existing)
            changed = index.fields_changed(existing)
            self.seen(index.collection, bool(changed))
            if not changed:
                self.given_up.discard(index.collection)  # rebuilt by hand: the next is ours
                continue
            if index.collection in self.given_up:
                continue
            self.log.warning(
                "collection_fields_changed",
                collection=index.collection,
                changed=changed,
                note="someone altered them in Typesense: rebuilding it from SQLite with the "
                "mapping's fields (no downtime); to change the fields, change the mapping",
            )
            try:
                result = rebuild(self.db, index, progress=lambda done, total: self.heartbeat())
            except OutboxSyncError as error:
                if isinstance(error.__cause__, StoppingError):
                    return  # the old collection stays: seen again at the next start
                if isinstance(error.__cause__, CollectionNotFoundError | CollectionClaimedError):
                    raise error.__cause__ from None  # as serve_request
                if _passing(error.__cause__):
                    raise error.__cause__ from None
                self._give_up(index, str(error))
                continue
            self.log.info("reindex_finished", reason="collection fields changed", **asdict(result))
            still = index.fields_changed()
            self.seen(index.collection, bool(still))
            if still:
                self._give_up(index, "; ".join(still))

    def _count(self, index: TypesenseIndex, existing: dict[str, Any]) -> None:
        """Audit when the collection's documents changed between two looks at the same
        collection while the daemon sent it no write."""
        name, documents = str(existing.get("name")), int(existing.get("num_documents", 0))
        before = self.counted.get(index.collection)
        self.counted[index.collection] = (name, documents, index.sent)
        if before is None:
            return
        was_name, was_documents, was_sent = before
        if (was_name, was_sent) != (name, index.sent) or was_documents == documents:
            return  # another collection, a write of the daemon's own, or no change
        self.log.warning(
            "documents_changed_elsewhere",
            collection=index.collection,
            before=was_documents,
            now=documents,
            note="its documents changed while the daemon sent it nothing: someone else wrote "
            "to it (a delete by filter, an import by hand): auditing it against SQLite",
        )
        self.request("documents changed in Typesense")

    def _give_up(self, index: TypesenseIndex, reason: str) -> None:
        self.given_up.add(index.collection)
        self.log.error(
            "collection_fields_not_rebuilt",
            collection=index.collection,
            reason=reason,
            note=f"run `outbox-sync reindex --collection {index.collection}`; not tried again "
            "until the collection is right again or the daemon starts again",
        )


def _passing(error: BaseException | None) -> TypeGuard[BaseException]:
    """Trouble the loop waits out: Typesense unavailable (it backs off), a locked database."""
    if isinstance(error, sqlite3.OperationalError):
        return is_busy(error)
    return isinstance(error, OutboxSyncError) and error.retryable


def serve_request(
    db: Database,
    indexes: Sequence[TypesenseIndex],
    heartbeat: Callable[[], None] = lambda: None,
) -> bool:
    """In the daemon: run a reindex another process asked for (of the collections it names,
    among `indexes`), publishing progress and the outcome in outbox_sync_meta, and calling
    `heartbeat` as it goes (the systemd watchdog must not take a long rebuild for a hung loop;
    it raises StoppingError when the daemon stops: the request fails, the old collection stays).
    False when nothing was asked."""
    raw = db.get_meta(REQUEST_KEY)
    if raw is None:
        return False
    asked = _request(raw)
    log = structlog.get_logger("outbox_sync")
    log.info("reindex_started", request=asked["token"], collections=asked["collections"])
    published = 0.0

    def publish(state: str, **fields: Any) -> None:
        db.set_meta(STATUS_KEY, json.dumps({"request": asked["token"], "state": state, **fields}))

    def report(done: int, total: int) -> None:
        nonlocal published
        heartbeat()
        if time.monotonic() - published >= PROGRESS_INTERVAL_S:
            published = time.monotonic()
            publish("running", done=done, total=total)

    chosen = [i for i in indexes if i.collection in asked["collections"]]
    try:
        results = [asdict(rebuild(db, index, progress=report)) for index in chosen]
    except Exception as error:  # ends this request, never the daemon (nor each start after it)
        reason = str(error) or type(error).__name__
        log.warning("reindex_failed", error=reason)
        publish("failed", error=reason)
        # a failed switch (`_switch`): the loop looks the name up again at once; a claim lost
        # (the heartbeat refreshes them): the daemon stops, before the rest of its turn (an
        # audit, a drain) writes into another database's collection
        if isinstance(error.__cause__, CollectionNotFoundError | CollectionClaimedError):
            db.set_meta(REQUEST_KEY, None)
            raise error.__cause__ from None
    else:
        for result in results:
            log.info("reindex_finished", **result)
        publish("done", results=results)
    db.set_meta(REQUEST_KEY, None)
    return True


def _request(raw: str) -> dict[str, Any]:
    """A request as written by `request` (an older version wrote the bare token)."""
    try:
        asked = json.loads(raw)
    except ValueError:
        asked = None
    if not isinstance(asked, dict):
        return {"token": raw, "collections": ["sequences"]}
    return asked


def request(db: Database, collections: Sequence[str]) -> str:
    """Ask the running daemon to reindex these collections; the token to follow in `status`.
    OutboxSyncError while another request is asked or served: a second one in its place would
    be cleared when the first ends, and its caller left waiting for an answer never given."""
    token = f"{time.time():.6f}"
    with db.write() as conn:
        if conn.execute("SELECT 1 FROM outbox_sync_meta WHERE key = ?", (REQUEST_KEY,)).fetchone():
            raise OutboxSyncError(
                "the daemon is already asked for a reindex (another `outbox-sync reindex`): "
                "run this one again once it has ended"
            )
        conn.execute("DELETE FROM outbox_sync_meta WHERE key = ?", (STATUS_KEY,))
        conn.execute(
            "INSERT INTO outbox_sync_meta (key, value) VALUES (?, ?)",
            (REQUEST_KEY, json.dumps({"token": token, "collections": list(collections)})),
        )
    return token


def status(db: Database, token: str) -> dict[str, Any] | None:
    """The daemon's progress on request `token` (None until it starts)."""
    raw = db.get_meta(STATUS_KEY)
    if raw is None:
        return None
    state: dict[str, Any] = json.loads(raw)
    return state if state.get("request") == token else None


def follow(
    db: Database, lock: DaemonLock, collections: Sequence[str], progress: Progress
) -> list[dict[str, Any]]:
    """Ask the running daemon (holder of `lock`) to reindex these collections and wait for its
    outcome, passing its progress on; OutboxSyncError if it fails, never takes it up, or dies
    meanwhile. The result of each collection."""
    token = request(db, collections)
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
        raise OutboxSyncError(f"reindex failed: {state['error']}")
    results: list[dict[str, Any]] = state["results"]
    if missing := sorted(set(collections) - {result["collection"] for result in results}):
        raise OutboxSyncError(
            f"the running daemon does not sync {', '.join(map(repr, missing))}, so it rebuilt "
            "nothing of it: give the --collection (OUTBOX_SYNC_COLLECTION) and --config the "
            "daemon runs with"
        )
    return results
