"""Which database feeds a collection. Two daemons of two databases syncing into one collection
(a second instance whose settings forgot OUTBOX_SYNC_COLLECTION, a copy of the database run
beside it) undo each other: each one's audit deletes the other's documents as extra, and the
other's puts them back as missing. Each daemon claims its collections in a small collection on
the server (CLAIMS_COLLECTION, a document per collection), refreshes its claims while it runs
and marks them stopped when it stops; it refuses a collection another database's daemon claimed
less than CLAIM_FRESH_S ago and has not stopped (a daemon killed leaves its claim that long).
A claim stopped or gone stale is taken over, with a warning, and the database it was taken
from is told by `check` (databases whose `run --once` take turns undo each other too)."""

import json
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import structlog

from outbox_sync.db import Database
from outbox_sync.errors import (
    CollectionNotFoundError,
    OutboxSyncError,
    TypesenseRejectedError,
    TypesenseUnavailableError,
)
from outbox_sync.typesense_index import TypesenseIndex

CLAIMS_COLLECTION = "outbox_sync_claims"
# Only `seen_at` is indexed; a claim's other fields are kept as they are, for people to read.
CLAIMS_SCHEMA = {"name": CLAIMS_COLLECTION, "fields": [{"name": "seen_at", "type": "int64"}]}
CLAIM_REFRESH_S = 60.0
CLAIM_FRESH_S = 300.0
# outbox_sync_meta: the database's own id, made at its daemon's first start. With the file's
# path it tells the database apart from a copy of it elsewhere; a backup restored in place, or
# the file seen from a new container at the same path, is the same database (at another path,
# a mount moved, it is another one: refused while the old claim is fresh, then taken over).
DATABASE_ID_KEY = "database_id"


class CollectionClaimedError(OutboxSyncError):
    """Another database's daemon syncs into this collection."""


class Claims:
    """Claim the daemon's collections, or raise CollectionClaimedError: `keep` as a loop job
    (first, before anything is written), `give_back` at stop."""

    def __init__(self, db: Database, indexes: Sequence[TypesenseIndex]) -> None:
        self.names = [index.collection for index in indexes]
        self.claims = indexes[0].on_collection(CLAIMS_COLLECTION)
        self.claims.observe = None  # not the sync's requests: out of its metrics and report
        database = db.get_meta(DATABASE_ID_KEY)
        if database is None:
            database = uuid.uuid4().hex
            db.set_meta(DATABASE_ID_KEY, database)
        self.database, self.path = database, os.path.realpath(db.path)
        self.me = {
            "database": database,
            "path": self.path,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        self.off = False  # the server refused the claims (a key scoped to the collections)
        self.held: list[str] = []
        self.next_at = float("-inf")
        self.log = structlog.get_logger("outbox_sync")

    def keep(self, now: float) -> None:
        """Claim now if CLAIM_REFRESH_S has passed since the last claim (the loop asks every
        turn, a long chore between its chunks)."""
        if now >= self.next_at:
            self(now)

    def __call__(self, now: float) -> None:
        self.next_at = now + CLAIM_REFRESH_S
        if self.off:
            return
        try:
            for position, name in enumerate(self.names):
                try:
                    self._claim(name)
                except TypesenseUnavailableError as error:
                    if name not in self.held:  # at start: the loop waits for Typesense and
                        # claims again at its next turn, not CLAIM_REFRESH_S later: it syncs
                        # meanwhile, into a collection it has not claimed (a hostile review)
                        self.next_at = float("-inf")
                        raise
                    # A claim held stays fresh for CLAIM_FRESH_S: a refresh failing for a
                    # moment (a 503, a restart) must not end a long reindex or fill between
                    # two chunks (each chunk has its retry); the next one looks again, and
                    # finds another database's claim if one came meanwhile. The others wait
                    # for it too: a timeout each held the loop, and a stop, a minute with six.
                    self.log.warning(
                        "claim_not_refreshed",
                        collection=name,
                        also=self.names[position + 1 :],
                        reason=str(error),
                    )
                    break
        except TypesenseRejectedError as error:  # a key scoped to the synced collections
            self.off = True
            self.log.warning(
                "claims_off",
                reason=str(error),
                note=f"without {CLAIMS_COLLECTION}, another database syncing into the same "
                "collection goes unnoticed until the audits find each other's documents",
            )

    def _claim(self, name: str) -> None:
        try:
            claim = self.claims.retrieve(name)
        except CollectionNotFoundError:
            try:
                self.claims.create_collection(CLAIMS_SCHEMA)
            except TypesenseRejectedError as error:
                if error.http_status != 409:  # 409: another daemon made it just now
                    raise
            claim = None
        if claim is not None and not self._mine(claim):
            if fresh(claim):
                raise CollectionClaimedError(
                    f"collection {name!r} is synced from another database: {holder(claim)}. "
                    "Two databases in one collection undo each other (each audit deletes the "
                    "other's documents): give this one a collection of its own (--collection or "
                    "OUTBOX_SYNC_COLLECTION for the built-in mapping, `collection` in a "
                    "--config file's [[sync]] entry), or stop that daemon (a "
                    "daemon that did not stop cleanly gives its claim back after "
                    f"{CLAIM_FRESH_S / 60:.0f} min)"
                )
            if name not in self.held:
                self.log.warning(
                    "claim_taken_over",
                    collection=name,
                    previous=claim,
                    note="if both databases sync it, each audit deletes the other's documents",
                )
        elif claim is not None and name in self.held and not self._written_by_me(claim):
            # Our database id and path, another daemon: a copy of the file at the same path on
            # another host (a backup restored there, one image on two hosts). Not refused: it
            # is also what a restart after a crash looks like, on a host renamed since.
            self.log.warning(
                "claim_shared",
                collection=name,
                other=f"pid {claim.get('pid')} on {claim.get('host')}",
                note="a copy of this database (same id in outbox_sync_meta, same path) syncs "
                "this collection too: each audit deletes the other's documents; stop one, or "
                f"delete its {DATABASE_ID_KEY!r} from outbox_sync_meta and give it a collection "
                "of its own",
            )
        # No claim seen: create, not upsert. Two daemons started together both see none, and
        # an upsert let both write theirs (the last one stayed) and sync for a minute, each
        # audit deleting the other's documents; a create fails (409) for the later one.
        action = "create" if claim is None else "upsert"
        (result,) = self.claims.import_jsonl(self._line(name), 1, action=action)
        if result.http_status == 409:  # another daemon claimed it since we looked: look again
            self._claim(name)
            return
        if not result.ok:
            raise TypesenseRejectedError(f"Typesense refused the claim: {result.error}")
        if name not in self.held:
            self.held.append(name)

    def _line(self, name: str, **more: Any) -> bytes:
        """This daemon's claim on collection `name`, seen now, as an import line."""
        return json.dumps({"id": name, **self.me, "seen_at": int(time.time()), **more}).encode()

    def _mine(self, claim: dict[str, Any]) -> bool:
        return same_database(claim, self.database, self.path)

    def _written_by_me(self, claim: dict[str, Any]) -> bool:
        return (claim.get("host"), claim.get("pid")) == (self.me["host"], self.me["pid"])

    def give_back(self) -> None:
        """At stop: mark the claims this daemon holds stopped (another database's daemon may
        take them; the mark stays, so that `check` here can tell if one did). Typesense
        unreachable, the rest are kept too: a timeout each passed systemd's TimeoutStopSec
        with six collections (found by a hostile review)."""
        for position, name in enumerate(self.held):
            try:
                claim = self.claims.retrieve(name)
                if claim is not None and self._mine(claim):
                    self.claims.import_jsonl(self._line(name, stopped=True), 1)
            except OutboxSyncError as error:  # it goes stale by itself (CLAIM_FRESH_S)
                unreachable = isinstance(error, TypesenseUnavailableError)
                also = self.held[position + 1 :] if unreachable else []
                self.log.warning("claim_kept", collection=name, also=also, reason=str(error))
                if unreachable:
                    break
        self.held = []


def same_database(claim: dict[str, Any], database: str | None, path: str) -> bool:
    return (claim.get("database"), claim.get("path")) == (database, path)


def seen_at(claim: dict[str, Any]) -> float:
    """When the claim's daemon was last seen (Unix time); 0, never, when the claim does not say
    in a number (written by hand, or by another version): its age is unknown, as if missing."""
    seen = claim.get("seen_at")
    return float(seen) if isinstance(seen, int | float) and not isinstance(seen, bool) else 0.0


def stopped(claim: dict[str, Any]) -> bool:
    return claim.get("stopped") is True  # "no", written by hand, is no stop


def fresh(claim: dict[str, Any]) -> bool:
    """Whether the claim's daemon runs: not stopped, and seen less than CLAIM_FRESH_S ago."""
    return not stopped(claim) and time.time() - seen_at(claim) < CLAIM_FRESH_S


def holder(claim: dict[str, Any]) -> str:
    """Who holds a claim, as people find it: the database's path, its host, the daemon."""
    seen = seen_at(claim)
    ago = f"{time.time() - seen:.0f} s ago" if seen else "at a time the claim does not say"
    daemon = "stopped" if stopped(claim) else f"pid {claim.get('pid')}, seen"
    return f"{claim.get('path')} on {claim.get('host')} (its daemon {daemon} {ago})"


def other_claim(db: Database, index: TypesenseIndex) -> dict[str, Any] | None:
    """Another database's claim on the index's collection, for `status` and `check` (who feeds
    it now, or fed it last); None when there is none, or it is this database's."""
    try:
        claim = index.on_collection(CLAIMS_COLLECTION).retrieve(index.collection)
    except TypesenseRejectedError:  # no claims collection, or a key that cannot read it
        return None
    if claim is None or same_database(
        claim, db.get_meta(DATABASE_ID_KEY), os.path.realpath(db.path)
    ):
        return None
    return claim
