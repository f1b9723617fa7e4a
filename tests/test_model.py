"""A model-based randomized test (hypothesis stateful) of the whole sync against a real Typesense,
over two mappings at once: the built-in `sequences`, and the custom `characters` of
docs/tables.md (TEXT keys with `/ % ? # , ' "`, a backtick, spaces and non-ASCII; a soft delete
by its `where`; int32, float, bool and string[] fields, optional ones; the tags of
`character_tags`, a table it depends on; a unique index on the name, NOCASE, through which a
REPLACE removes another character).

An application starts with a few characters, makes random inserts, updates, deletes and key
changes on both tables, soft-deletes and undeletes characters, gives them a name another holds
(an UPDATE or INSERT OR REPLACE removes that one), adds, removes and moves their tags (some in
multi-statement transactions, some rolled back, some with invalid values); the daemon takes
steps (one batch, `Applier.apply_once`, or the pipelined `Applier.drain` its loop runs); it is
killed at any point of a step (after its claim, before or after Typesense accepted a request,
just before its acknowledgement commits) and restarted as fresh objects; the application writes
while a batch is in flight; a fault proxy drops, delays, truncates and refuses requests.

What each committed state should be is what the mapping's Python reference (`Mapping.line`)
makes of the rows SQLite holds right after the commit.

Also checked at every step: `sync_errors` only ever receives states that fail validation, with
the reference's error and the row (a line Typesense refuses once is retried and goes through; a
5xx is never given up on).

Checked after every step, per collection: Typesense holds only states of records that SQLite
really committed, and never goes back to an older state of a record (ordering per record).
Checked when the faults stop and the outbox drains, per collection: every document equals the
reference's document of its row, nothing extra, and `sync_errors` holds exactly the records whose
data is invalid, each naming its mapping, with the reference's error.

CI runs a small budget (30 examples of 40 steps, ~30 s). A longer run, by hand:

    OUTBOX_SYNC_LONG_TESTS=1 python -m pytest tests/test_model.py   # ~500 examples, minutes

`OUTBOX_SYNC_MODEL_EXAMPLES=N` sets the number of examples of either run.
"""

import contextlib
import json
import math
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import httpx
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from outbox_sync import schema, sync_errors
from outbox_sync.db import Database
from outbox_sync.errors import InvalidRecordError, TypesenseUnavailableError
from outbox_sync.mapping import SEQUENCES, Mapping
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import Worker, daemon
from tests.support.characters import (
    CHARACTERS,
    TAGS,
    characters_mapping,
    reference_documents,
    reference_key,
    reference_rows,
    same_document,
)
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.typesense import Server

LONG = bool(os.environ.get("OUTBOX_SYNC_LONG_TESTS"))
MODEL_SETTINGS = settings(
    max_examples=int(os.environ.get("OUTBOX_SYNC_MODEL_EXAMPLES", 500 if LONG else 30)),
    stateful_step_count=60 if LONG else 40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # The example database would be a `.hypothesis/` folder in the work tree: only by hand.
    database=settings.default.database if LONG else None,
    # Every step talks to a real server: shrinking takes minutes. In CI a failure is reported
    # as found (with its seed); the long run by hand shrinks it.
    phases=tuple(Phase) if LONG else (Phase.explicit, Phase.reuse, Phase.generate),
    print_blob=True,
)
# Per request through the proxy: short, so that `delay` and `stall` faults cost little.
TIMEOUT_S = 0.3
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
MAX_TEXT_BYTES = 64 * 1024  # every string field's limit
SEQUENCE_COLUMNS = ("element_type", "element_id", "sequence_number", "comment")
CHARACTER_COLUMNS = ("name", "bio", "age", "weight", "active")


class Killed(BaseException):
    """The daemon dies here: nothing after this point of the step runs (like SIGKILL)."""


class NotUtf8(bytes):
    """Bytes the application stores as TEXT with CAST(? AS TEXT): text that is not UTF-8. (Plain
    bytes are stored as a BLOB.)"""


class Long(str):
    """A long text, shown short in hypothesis's reports."""

    def __repr__(self) -> str:
        return f"Long({self[0]!r} * {len(self)})"


# -- what the application writes ----------------------------------------------------------------


def mostly(valid: st.SearchStrategy[Any], *invalid: st.SearchStrategy[Any]) -> Any:
    """`valid` 19 times in 20 (and hypothesis shrinks towards it): 4 in 5 rows are valid.
    (st.one_of would not do: it draws among distinct strategies, duplicates count once.)"""
    return st.integers(0, 19).flatmap(lambda n: st.one_of(*invalid) if n == 19 else valid)


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
# Names that the characters' unique index (NOCASE: `CHARACTER_NAMES`) takes for one: an
# INSERT OR REPLACE or an UPDATE OR REPLACE with one of them removes the character holding it,
# which SQLite does without firing a delete trigger.
NAMES = st.sampled_from(["Ann", "ann"])
CHARACTER_NAMES = "CREATE UNIQUE INDEX characters_name ON characters (name COLLATE NOCASE)"
SEQUENCE_FIELDS = st.fixed_dictionaries(
    {
        "element_type": mostly(
            TEXT,
            st.just(NotUtf8(b"script\xff")),
            st.just(Long("t" * (MAX_TEXT_BYTES + 1))),
        ),
        "element_id": mostly(
            st.integers(*INT32), st.integers(*INT64), st.just(1.5), st.just("twelve")
        ),
        "sequence_number": mostly(
            st.integers(*INT32),
            st.sampled_from([2**31, -(2**31) - 1]),
            st.just("seven"),
        ),
        "comment": mostly(
            st.none() | TEXT | st.just(Long("é" * (MAX_TEXT_BYTES // 2))),  # exactly the limit
            st.just(NotUtf8(b"caf\xe9")),
            st.just(Long("c" * (MAX_TEXT_BYTES + 1))),
        ),
    }
)
# The values each column's affinity keeps as they are (SQLite would make text '7' of an
# integer in a TEXT column, 3.0 of an integer in a REAL one): what is written is what is read.
CHARACTER_FIELDS = st.fixed_dictionaries(
    {
        "name": mostly(
            TEXT | NAMES,
            st.just(NotUtf8(b"n\xffme")),
            st.just(b"\x00blob"),
            st.just(Long("n" * (MAX_TEXT_BYTES + 1))),
        ),
        "bio": mostly(st.none() | TEXT, st.just(NotUtf8(b"caf\xe9")), st.just(b"blob")),
        "age": mostly(
            st.none() | st.integers(*INT32),
            st.just(1.5),
            st.sampled_from([2**31, -(2**31) - 1]),
            st.just("old"),
        ),
        "weight": mostly(
            st.none() | st.floats(allow_nan=False, allow_infinity=False),
            st.sampled_from([math.inf, -math.inf]),
            st.just("heavy"),
        ),
        "active": mostly(st.sampled_from([0, 1]), st.just(2), st.just("yes")),
    }
)
TAG = mostly(TEXT, st.none(), st.just(NotUtf8(b"t\xffg")))  # a NULL is an element null
KEYS = st.integers(1, 8)
# Every character a URL, a filter or SQL quotes; a backtick, a backslash and spaces around the
# key (a filter would misread them: deleted by URL, one by one); and the empty key, which no
# document can have (a sync error naming the key).
SLUGS = st.sampled_from(
    ["a/b", "50%", "q?x#1", "sp ace,co", "dq\"sq'x", "bt`x", "bs\\", " sp", "ünï", ""]
)
SEQUENCE_OPERATIONS = st.one_of(
    st.tuples(st.just("sequences"), st.just("insert"), KEYS, SEQUENCE_FIELDS),
    st.tuples(st.just("sequences"), st.just("upsert"), KEYS, SEQUENCE_FIELDS),
    st.tuples(st.just("sequences"), st.just("update"), KEYS, SEQUENCE_FIELDS),
    st.tuples(st.just("sequences"), st.just("delete"), KEYS),
    st.tuples(st.just("sequences"), st.just("move"), KEYS, KEYS, st.booleans()),
)
CHARACTER_OPERATIONS = st.one_of(
    st.tuples(
        st.just("characters"),
        st.sampled_from(["insert", "upsert", "update"]),
        SLUGS,
        CHARACTER_FIELDS,
    ),
    st.tuples(
        st.just("characters"),
        st.sampled_from(["delete", "soft_delete", "undelete", "untag"]),
        SLUGS,
    ),
    st.tuples(st.just("characters"), st.just("move"), SLUGS, SLUGS, st.booleans()),
    st.tuples(
        st.just("characters"),
        st.just("name"),
        SLUGS,
        NAMES,
        # an UPDATE OR REPLACE needs the character there: twice as often as the others
        st.sampled_from(["update", "update_or_replace", "update_or_replace", "insert_or_replace"]),
    ),
    st.tuples(st.just("characters"), st.just("tag"), SLUGS, TAG),
    st.tuples(st.just("characters"), st.just("retag"), SLUGS, SLUGS),
)
OPERATIONS = st.one_of(SEQUENCE_OPERATIONS, CHARACTER_OPERATIONS)
DOCUMENT_IDS = st.one_of(KEYS.map(str), SLUGS)
FAULTS = st.one_of(
    st.builds(
        Fault, st.just("status"), status=st.sampled_from([503, 500]), times=st.sampled_from([1, 2])
    ),
    st.builds(
        Fault,
        st.sampled_from(["drop_request", "drop_response", "truncate_response"]),
        times=st.sampled_from([1, 2]),
    ),
    st.builds(Fault, st.just("delay"), seconds=st.just(TIMEOUT_S + 0.15)),
    st.builds(Fault, st.just("stall"), seconds=st.just(TIMEOUT_S + 0.15)),
    st.builds(Fault, st.just("garble_lines")),
    st.builds(
        Fault,
        st.just("fail_lines"),
        status=st.just(500),
        ids=st.sets(DOCUMENT_IDS, max_size=2),
        positions=st.sampled_from([{0}, set()]),  # the first line: it always hits something
        times=st.sampled_from([1, 2, 3]),  # past the immediate retry: never given up
    ),
)
HOW = st.sampled_from(["run_once", "drain"])
KILL_POINTS = ("after_claim", "before_import", "after_import", "after_delete", "before_ack_commit")


def value_sql(value: Any) -> tuple[str, Any]:
    if isinstance(value, NotUtf8):
        return "CAST(? AS TEXT)", bytes(value)
    return "?", value


def write_sequence(conn: sqlite3.Connection, operation: tuple[Any, ...], version: str) -> None:
    """One statement of the application on `sequences` (`version`: a created_at never written
    before, so that every state of a record is a document of its own)."""
    kind, key = operation[0], operation[1]
    if kind in ("insert", "upsert", "update"):
        row = {name: operation[2][name] for name in SEQUENCE_COLUMNS} | {"created_at": version}
        marks, values = zip(*(value_sql(v) for v in row.values()), strict=True)
        if kind == "update":
            sets = ", ".join(f"{name} = {mark}" for name, mark in zip(row, marks, strict=True))
            conn.execute(f"UPDATE sequences SET {sets} WHERE id = ?", (*values, key))
            return
        verb = "INSERT" if kind == "insert" else "INSERT OR REPLACE"
        with contextlib.suppress(sqlite3.IntegrityError):  # insert: the id is taken
            conn.execute(
                f"{verb} INTO sequences (id, {', '.join(row)}) VALUES (?, {', '.join(marks)})",
                (key, *values),
            )
    elif kind == "delete":
        conn.execute("DELETE FROM sequences WHERE id = ?", (key,))
    else:  # move: the id changes (a fresh version, so the model can tell states apart)
        new, replace_ = operation[2], operation[3]
        verb = "UPDATE OR REPLACE" if replace_ else "UPDATE"
        with contextlib.suppress(sqlite3.IntegrityError):
            conn.execute(
                f"{verb} sequences SET id = ?, created_at = ? WHERE id = ?", (new, version, key)
            )


def write_character(conn: sqlite3.Connection, operation: tuple[Any, ...], version: str) -> None:
    """One statement of the application on `characters` or `character_tags`."""
    kind, slug = operation[0], operation[1]
    if kind in ("insert", "upsert", "update"):
        marks, values = zip(*(value_sql(operation[2][c]) for c in CHARACTER_COLUMNS), strict=True)
        if kind == "update":
            sets = ", ".join(f"{c} = {m}" for c, m in zip(CHARACTER_COLUMNS, marks, strict=True))
            with contextlib.suppress(sqlite3.IntegrityError):  # the name is taken
                conn.execute(f"UPDATE characters SET {sets} WHERE slug = ?", (*values, slug))
            return
        verb = "INSERT" if kind == "insert" else "INSERT OR REPLACE"
        with contextlib.suppress(sqlite3.IntegrityError):
            conn.execute(
                f"{verb} INTO characters (slug, {', '.join(CHARACTER_COLUMNS)})"
                f" VALUES (?, {', '.join(marks)})",
                (slug, *values),
            )
    elif kind == "delete":
        conn.execute("DELETE FROM characters WHERE slug = ?", (slug,))
    elif kind == "soft_delete":
        conn.execute("UPDATE characters SET deleted_at = ? WHERE slug = ?", (version, slug))
    elif kind == "undelete":
        conn.execute("UPDATE characters SET deleted_at = NULL WHERE slug = ?", (slug,))
    elif kind == "name":  # a name another character may hold
        statement = {
            "update": "UPDATE characters SET name = ?2 WHERE slug = ?1",
            "update_or_replace": "UPDATE OR REPLACE characters SET name = ?2 WHERE slug = ?1",
            "insert_or_replace": "INSERT OR REPLACE INTO characters (slug, name, active)"
            " VALUES (?1, ?2, 1)",
        }[operation[3]]
        with contextlib.suppress(sqlite3.IntegrityError):  # update: the name is taken
            conn.execute(statement, (slug, operation[2]))
    elif kind == "move":
        verb = "UPDATE OR REPLACE" if operation[3] else "UPDATE"
        with contextlib.suppress(sqlite3.IntegrityError):
            conn.execute(f"{verb} characters SET slug = ? WHERE slug = ?", (operation[2], slug))
    elif kind == "tag":
        mark, value = value_sql(operation[2])
        conn.execute(f"INSERT INTO character_tags (slug, tag) VALUES (?, {mark})", (slug, value))
    elif kind == "untag":  # one of its tags
        conn.execute(
            "DELETE FROM character_tags WHERE rowid ="
            " (SELECT min(rowid) FROM character_tags WHERE slug = ?)",
            (slug,),
        )
    else:  # retag: one of its tags goes to another character
        conn.execute(
            "UPDATE character_tags SET slug = ? WHERE rowid ="
            " (SELECT max(rowid) FROM character_tags WHERE slug = ?)",
            (operation[2], slug),
        )


WRITERS: dict[str, Callable[[sqlite3.Connection, tuple[Any, ...], str], None]] = {
    "sequences": write_sequence,
    "characters": write_character,
}


# -- the machine --------------------------------------------------------------------------------


class SyncMachine(RuleBasedStateMachine):
    server: ClassVar[Server]
    proxy: ClassVar[FaultProxy]
    http: ClassVar[httpx.Client]  # to Typesense, not through the proxy

    def __init__(self) -> None:
        super().__init__()
        self.proxy.clear()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-model-"))
        self.path = self.dir / "app.db"
        # check_same_thread=False: it also writes from the worker's import thread (a hook)
        self.app = sqlite3.connect(
            self.path, timeout=30, isolation_level=None, check_same_thread=False
        )
        self.app.executescript(f"{CHARACTERS}; {TAGS}; {CHARACTER_NAMES};")
        prefix = f"model_{uuid.uuid4().hex[:12]}"
        wanted = [
            replace(m, collection=f"{prefix}_{m.name}") for m in (SEQUENCES, characters_mapping())
        ]
        db = Database(self.path, create=True)
        schema.init(db, wanted)
        self.mappings: list[Mapping] = schema.check(db, wanted)  # the key kinds of the tables
        db.close()
        for index in self.indexes(self.server.url):
            index.ensure_collection()
        # What SQLite committed, read after each commit on a connection of the model's own.
        self.reader = sqlite3.connect(self.path, check_same_thread=False)
        # per mapping: id -> the documents SQLite committed for it, in commit order
        self.history: dict[str, dict[str, list[dict[str, Any]]]] = {
            m.name: {} for m in self.mappings
        }
        # per (mapping, id): the position in its history of the newest state Typesense showed
        self.seen: dict[tuple[str, str], int] = {}
        # per mapping: the committed states no document may carry, (key, error, row as JSON)
        self.invalid: dict[str, set[tuple[Any, str, str]]] = {m.name: set() for m in self.mappings}
        self.version = 0
        self.batch_size = 5
        self.worker: Worker | None = None
        self.restart()

    # -- helpers -------------------------------------------------------------------------------

    def restart(self, batch_size: int | None = None) -> None:
        """A fresh daemon: new connection, new clients, new worker (nothing carried over)."""
        if self.worker is not None:
            self.worker.db.close()
        if batch_size is not None:
            self.batch_size = batch_size
        indexes = self.indexes(self.proxy.url, timeout_s=TIMEOUT_S)
        self.worker = daemon(Database(self.path), indexes, batch_size=self.batch_size)

    def indexes(self, url: str, **options: Any) -> list[TypesenseIndex]:
        """An index per mapping, on one client, as the daemon makes them (a client costs
        ~0.1 s: it loads the CA certificates)."""
        first, *rest = self.mappings
        index = TypesenseIndex(
            [url], self.server.api_key, first.collection, mapping=first, **options
        )
        return [index, *(index.on_collection(m.collection, m) for m in rest)]

    def next_version(self) -> str:
        self.version += 1
        return f"v{self.version:06d}"

    def apply(self, operations: list[tuple[Any, ...]], commit: bool = True) -> None:
        """Run the operations in one transaction of the application; record what it committed."""
        self.app.execute("BEGIN")
        for operation in operations:
            WRITERS[operation[0]](self.app, operation[1:], self.next_version())
        if not commit:
            self.app.execute("ROLLBACK")
            return
        self.app.execute("COMMIT")
        self.record_committed_states()

    def record_committed_states(self) -> None:
        """Each record's state now, as the mapping's reference makes it of the row: a document
        (its history grows when it differs from the last), or an invalid state."""
        for mapping in self.mappings:
            history = self.history[mapping.name]
            for row in reference_rows(self.reader, mapping):
                try:
                    document = json.loads(mapping.line(row))
                except InvalidRecordError as error:
                    state = (reference_key(row), str(error), mapping.describe_row(row))
                    self.invalid[mapping.name].add(state)
                    continue
                states = history.setdefault(document["id"], [])
                if not states or states[-1] != document:
                    states.append(document)

    def export(self, mapping: Mapping) -> dict[str, dict[str, Any]]:
        response = self.http.get(f"/collections/{mapping.collection}/documents/export")
        response.raise_for_status()
        # "\n" only: documents may hold U+2028 and friends, unescaped
        lines = [line for line in response.text.split("\n") if line.strip()]
        return {doc["id"]: doc for doc in map(json.loads, lines)}

    def step(self, how: str = "run_once") -> None:
        """One batch (`run_once`), or what the daemon's loop does: a pipelined drain of batches
        (`drain`)."""
        assert self.worker is not None
        with contextlib.suppress(TypesenseUnavailableError):
            if how == "drain":
                self.worker.applier.drain(threading.Event(), 5.0)
            else:
                self.worker.applier.apply_once()

    @contextlib.contextmanager
    def patched(
        self, targets: list[tuple[object, str]], wrap: Callable[..., Any]
    ) -> Iterator[None]:
        for target, name in targets:
            setattr(target, name, wrap(getattr(target, name)))
        try:
            yield
        finally:
            for target, name in targets:
                delattr(target, name)  # back to the class's method

    def requests(self, *names: str) -> list[tuple[object, str]]:
        """These methods of every collection's index."""
        assert self.worker is not None
        return [(index, name) for index in self.worker.indexes for name in names]

    # -- rules ---------------------------------------------------------------------------------

    @initialize(
        operations=st.lists(
            st.tuples(st.just("characters"), st.just("upsert"), SLUGS, CHARACTER_FIELDS),
            min_size=2,
            max_size=5,
        )
    )
    def application_has_characters(self, operations: list[tuple[Any, ...]]) -> None:
        """A few characters to begin with: the rules' own inserts are few among their
        operations, and a name taken by another character, tags moved between characters and
        keys moved onto another's need more than one."""
        self.apply(operations)

    @rule(operations=st.lists(OPERATIONS, min_size=1, max_size=3))
    def application_writes(self, operations: list[tuple[Any, ...]]) -> None:
        self.apply(operations)

    @rule(operations=st.lists(OPERATIONS, min_size=1, max_size=3))
    def application_rolls_back(self, operations: list[tuple[Any, ...]]) -> None:
        self.apply(operations, commit=False)

    @rule(how=HOW)
    def daemon_step(self, how: str) -> None:
        self.step(how)

    @rule(
        operations=st.lists(OPERATIONS, min_size=1, max_size=2),
        when=st.sampled_from(["read", "request"]),
        how=HOW,
    )
    def application_writes_during_a_step(
        self, operations: list[tuple[Any, ...]], when: str, how: str
    ) -> None:
        """The application commits while a batch is in flight: after the claim (before the rows
        are read), or after the rows are read (before Typesense hears of them)."""
        assert self.worker is not None
        done: list[bool] = []

        def hook(original: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any) -> Any:
                if not done:
                    done.append(True)
                    self.apply(operations)
                return original(*args)

            return call

        if when == "read":
            targets = [(self.worker.db, "read_claimed")]
        else:
            targets = self.requests("import_jsonl", "delete_ids")
        with self.patched(targets, hook):
            self.step(how)
        if not done:
            self.apply(operations)

    @rule(point=st.sampled_from(KILL_POINTS), how=HOW)
    def daemon_killed_during_a_step(self, point: str, how: str) -> None:
        """Killed at the first call of that point, whichever collection it is for."""
        assert self.worker is not None

        def die_before(original: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any) -> Any:
                raise Killed(point)

            return call

        def die_after(original: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any) -> Any:
                original(*args)
                raise Killed(point)

            return call

        def die_before_commit(original: Callable[..., Any]) -> Callable[..., Any]:
            @contextlib.contextmanager
            def write() -> Iterator[sqlite3.Connection]:
                with original() as conn:
                    yield conn
                    raise Killed(point)  # rolls the transaction back, as a dead process does

            return write

        targets, wrap = {
            "after_claim": ([(self.worker.db, "read_claimed")], die_before),
            "before_import": (self.requests("import_jsonl"), die_before),
            "after_import": (self.requests("import_jsonl"), die_after),
            "after_delete": (self.requests("delete_ids"), die_after),
            "before_ack_commit": ([(self.worker.db, "write")], die_before_commit),
        }[point]
        for target, name in targets:
            setattr(target, name, wrap(getattr(target, name)))
        with contextlib.suppress(Killed):
            self.step(how)
        self.restart()

    @rule(batch_size=st.sampled_from([1, 2, 5, 100]))
    def daemon_restarts(self, batch_size: int) -> None:
        self.restart(batch_size)

    @rule(fault=FAULTS)
    def network_fault(self, fault: Fault) -> None:
        self.proxy.add(fault)

    @precondition(lambda self: not any(f.status == 400 for f in self.proxy.pending_faults()))
    @rule(doc_id=DOCUMENT_IDS)
    def typesense_refuses_a_line_once(self, doc_id: str) -> None:
        """Refused once, a line is retried at once and goes through: no sync_errors row."""
        self.proxy.add(Fault("fail_lines", status=400, ids={doc_id}))

    # -- checks --------------------------------------------------------------------------------

    @invariant()
    def typesense_holds_only_committed_states_never_going_back(self) -> None:
        for mapping in self.mappings:
            history = self.history[mapping.name]
            for doc_id, doc in self.export(mapping).items():
                states = history.get(doc_id, [])
                assert any(same_document(doc, state) for state in states), (
                    f"{mapping.name} document {doc_id} is no state SQLite committed: {doc}"
                )
                newest = self.seen.get((mapping.name, doc_id), 0)
                # the first state it can be from there on (states may come back: a soft
                # delete and an undelete)
                later = [i for i in range(newest, len(states)) if same_document(states[i], doc)]
                assert later, (
                    f"{mapping.name} document {doc_id} went back from {states[newest]} to {doc}"
                )
                self.seen[(mapping.name, doc_id)] = later[0]

    @invariant()
    def sync_errors_hold_only_invalid_states(self) -> None:
        # Typesense refusing a line once (all the model injects) must never reach sync_errors:
        # every row, open or closed, is a state of the record that failed our validation, with
        # the reference's error and the row it was made of.
        rows = self.reader.execute(
            "SELECT mapping, record_key, http_status, error, document FROM sync_errors"
        ).fetchall()
        for mapping, key, http_status, error, document in rows:
            assert http_status is None, f"a record was given up on after {http_status}: {error}"
            assert (key, error, document) in self.invalid[mapping], (mapping, key, error, document)

    def drain_and_check(self) -> None:
        self.proxy.clear()
        assert self.worker is not None
        self.worker.db.close()
        db = Database(self.path)
        worker = daemon(db, self.indexes(self.proxy.url), batch_size=self.batch_size)
        for _ in range(1000):
            if not worker.applier.apply_once().entries:
                break
        self.worker = worker
        (pending,) = self.reader.execute("SELECT count(*) FROM outbox").fetchone()
        assert pending == 0

        expected_errors = {}
        for mapping in self.mappings:
            documents, invalid = reference_documents(self.reader, mapping)
            in_typesense = self.export(mapping)
            covered = set(documents) | {mapping.document_id(key) for key in invalid}
            assert set(in_typesense) <= covered, f"{mapping.name}: documents nobody holds"
            for doc_id, document in documents.items():
                assert same_document(in_typesense.get(doc_id), document), (mapping.name, doc_id)
            for key in invalid:  # the last good state may stay searchable; never anything else
                doc_id = mapping.document_id(key)
                doc = in_typesense.get(doc_id) if doc_id is not None else None
                states = self.history[mapping.name].get(doc_id or "", [])
                assert doc is None or any(same_document(doc, s) for s in states), (
                    mapping.name,
                    key,
                )
            expected_errors |= {(mapping.name, key): str(error) for key, error in invalid.items()}

        errors = sync_errors.find(db)
        found = {(e["mapping"], e["record_key"]): e["error"] for e in errors}
        assert len(found) == len(errors), "a record with two open errors"
        assert found == expected_errors
        for error in errors:
            assert error["http_status"] is None and error["op"] == "upsert", error

    def teardown(self) -> None:
        try:
            if sys.exc_info()[0] is None:  # a step failed: report that, not a consequence
                self.drain_and_check()
        finally:
            if self.worker is not None:
                self.worker.db.close()
            self.app.close()
            self.reader.close()
            for mapping in self.mappings:
                with contextlib.suppress(httpx.HTTPError):
                    alias = self.http.get(f"/aliases/{mapping.collection}").json()
                    self.http.delete(f"/aliases/{mapping.collection}")
                    self.http.delete(f"/collections/{alias['collection_name']}")
            shutil.rmtree(self.dir, ignore_errors=True)


def test_the_sync_converges_under_random_writes_kills_and_faults(
    typesense_server: Server,
) -> None:
    http = httpx.Client(
        base_url=typesense_server.url,
        headers={"X-TYPESENSE-API-KEY": typesense_server.api_key},
        timeout=30,
    )
    with http, FaultProxy(typesense_server.url) as proxy:
        SyncMachine.server, SyncMachine.proxy, SyncMachine.http = typesense_server, proxy, http
        run_state_machine_as_test(SyncMachine, settings=MODEL_SETTINGS)
