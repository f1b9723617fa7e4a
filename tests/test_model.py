"""A model-based randomized test (hypothesis stateful) of the whole sync against a real Typesense.

An application makes random inserts, updates, deletes and id changes (some in multi-statement
transactions, some rolled back, some with invalid values); the daemon takes steps
(`Worker.run_once`, or the pipelined `Worker.drain` its loop runs); it is killed at any point
of a step (after its claim, before or after Typesense accepted a request, just before its
acknowledgement commits) and restarted as fresh objects; the application writes while a batch
is in flight; a fault proxy drops, delays, truncates and refuses requests.

Also checked at every step: `sync_errors` only ever receives states that fail validation (a line
Typesense refuses once is retried and goes through; a 5xx is never given up on).

Checked after every step: Typesense holds only states of records that SQLite really committed,
and never goes back to an older state of a record (ordering per record). Checked when the faults
stop and the outbox drains: every document equals its SQLite row, nothing extra, and
`sync_errors` holds exactly the records whose data is invalid (each error naming an invalid
field).

CI runs a small budget (20 examples of 40 steps, ~25 s). A longer run, by hand:

    OUTBOX_SYNC_LONG_TESTS=1 python -m pytest tests/test_model.py   # ~500 examples, minutes

`OUTBOX_SYNC_MODEL_EXAMPLES=N` sets the number of examples of either run.
"""

import contextlib
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from outbox_sync import schema, sync_errors
from outbox_sync.db import Database
from outbox_sync.errors import TypesenseUnavailableError
from outbox_sync.mapping import SEQUENCES
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import Worker, daemon
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.typesense import Server

LONG = bool(os.environ.get("OUTBOX_SYNC_LONG_TESTS"))
MODEL_SETTINGS = settings(
    max_examples=int(os.environ.get("OUTBOX_SYNC_MODEL_EXAMPLES", 500 if LONG else 20)),
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
COLUMNS = "id, element_type, element_id, sequence_number, comment, created_at"
FIELD_NAMES = ("element_type", "element_id", "sequence_number", "comment")


class Killed(BaseException):
    """The daemon dies here: nothing after this point of the step runs (like SIGKILL)."""


class NotUtf8(bytes):
    """Bytes the application stores as TEXT with CAST(? AS TEXT): text that is not UTF-8."""


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
FIELDS = st.fixed_dictionaries(
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
KEYS = st.integers(1, 8)
OPERATIONS = st.one_of(
    st.tuples(st.just("insert"), KEYS, FIELDS),
    st.tuples(st.just("upsert"), KEYS, FIELDS),
    st.tuples(st.just("update"), KEYS, FIELDS),
    st.tuples(st.just("delete"), KEYS),
    st.tuples(st.just("move"), KEYS, KEYS, st.booleans()),
)
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
        ids=st.sets(KEYS.map(str), max_size=2),
        positions=st.sampled_from([{0}, set()]),  # the first line: it always hits something
        times=st.sampled_from([1, 2, 3]),  # past the immediate retry: never given up
    ),
)
HOW = st.sampled_from(["run_once", "drain"])
KILL_POINTS = ("after_claim", "before_import", "after_import", "after_delete", "before_ack_commit")


def invalid_fields(row: dict[str, Any]) -> list[str]:
    """The fields of a row that no document may carry: the oracle, written apart from
    outbox_sync.documents on purpose."""

    def text_ok(value: Any, limit: int) -> bool:
        return isinstance(value, str) and len(value.encode()) <= limit

    def int_ok(value: Any, bounds: tuple[int, int]) -> bool:
        return isinstance(value, int) and bounds[0] <= value <= bounds[1]

    bad = []
    if not text_ok(row["element_type"], MAX_TEXT_BYTES):
        bad.append("element_type")
    if not int_ok(row["element_id"], INT32):  # the source document's int32
        bad.append("element_id")
    if not int_ok(row["sequence_number"], INT32):
        bad.append("sequence_number")
    if row["comment"] is not None and not text_ok(row["comment"], MAX_TEXT_BYTES):
        bad.append("comment")
    return bad


def document(key: int, row: dict[str, Any]) -> dict[str, Any]:
    doc = {"id": str(key)} | {k: v for k, v in row.items() if v is not None}
    return doc


def value_sql(value: Any) -> tuple[str, Any]:
    if isinstance(value, NotUtf8):
        return "CAST(? AS TEXT)", bytes(value)
    return "?", value


def stored(value: Any) -> Any:
    """A value as SQLite gives it back with text_factory=bytes."""
    return (
        value.encode()
        if isinstance(value, str)
        else bytes(value)
        if isinstance(value, bytes)
        else value
    )


# -- the machine --------------------------------------------------------------------------------


class SyncMachine(RuleBasedStateMachine):
    server: ClassVar[Server]
    proxy: ClassVar[FaultProxy]

    def __init__(self) -> None:
        super().__init__()
        self.proxy.clear()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-model-"))
        self.path = self.dir / "app.db"
        schema.init(Database(self.path, create=True), [SEQUENCES])
        # check_same_thread=False: it also writes from the worker's import thread (a hook)
        self.app = sqlite3.connect(
            self.path, timeout=30, isolation_level=None, check_same_thread=False
        )
        self.collection = f"model_{uuid.uuid4().hex[:12]}"
        TypesenseIndex([self.server.url], self.server.api_key, self.collection).ensure_collection()
        self.http = httpx.Client(
            base_url=self.server.url,
            headers={"X-TYPESENSE-API-KEY": self.server.api_key},
            timeout=30,
        )
        self.rows: dict[int, dict[str, Any]] = {}  # what SQLite holds (committed)
        self.history: dict[str, dict[str, dict[str, Any]]] = {}  # id -> version -> document
        self.seen_version: dict[str, str] = {}  # the newest version Typesense showed, per id
        self.invalid_versions: set[str] = set()  # committed states no document may carry
        self.version = 0
        self.batch_size = 5
        self.worker: Worker | None = None
        self.restart()

    # -- helpers -------------------------------------------------------------------------------

    def restart(self, batch_size: int | None = None) -> None:
        """A fresh daemon: new connection, new client, new worker (nothing carried over)."""
        if self.worker is not None:
            self.worker.db.close()
        if batch_size is not None:
            self.batch_size = batch_size
        index = TypesenseIndex(
            [self.proxy.url], self.server.api_key, self.collection, timeout_s=TIMEOUT_S
        )
        self.worker = daemon(Database(self.path), [index], batch_size=self.batch_size)

    def next_version(self) -> str:
        self.version += 1
        return f"v{self.version:06d}"

    def apply(self, operations: list[tuple[Any, ...]], commit: bool = True) -> None:
        """Run the operations in one transaction of the application; update the model."""
        rows = {key: dict(row) for key, row in self.rows.items()}
        self.app.execute("BEGIN")
        for operation in operations:
            self.apply_one(operation, rows)
        if not commit:
            self.app.execute("ROLLBACK")
            return
        self.app.execute("COMMIT")
        for key in set(rows) | set(self.rows):
            row = rows.get(key)
            if row is not None and not invalid_fields(row):
                self.history.setdefault(str(key), {})[row["created_at"]] = document(key, row)
            elif row is not None:
                self.invalid_versions.add(row["created_at"])
        self.rows = rows

    def apply_one(self, operation: tuple[Any, ...], rows: dict[int, dict[str, Any]]) -> None:
        kind, key = operation[0], operation[1]
        if kind in ("insert", "upsert", "update"):
            # in column order (fixed_dictionaries sorts its keys)
            row = {name: operation[2][name] for name in FIELD_NAMES}
            row["created_at"] = self.next_version()
            marks, values = zip(*(value_sql(v) for v in row.values()), strict=True)
            if kind == "update":
                sets = ", ".join(f"{name} = {mark}" for name, mark in zip(row, marks, strict=True))
                self.app.execute(f"UPDATE sequences SET {sets} WHERE id = ?", (*values, key))
                if key in rows:
                    rows[key] = row
                return
            verb = "INSERT" if kind == "insert" else "INSERT OR REPLACE"
            try:
                self.app.execute(
                    f"{verb} INTO sequences ({COLUMNS}) VALUES (?, {', '.join(marks)})",
                    (key, *values),
                )
            except sqlite3.IntegrityError:
                assert kind == "insert" and key in rows
                return
            rows[key] = row
        elif kind == "delete":
            self.app.execute("DELETE FROM sequences WHERE id = ?", (key,))
            rows.pop(key, None)
        else:  # move: the id changes (a fresh version, so the model can tell states apart)
            new, replace = operation[2], operation[3]
            version = self.next_version()
            verb = "UPDATE OR REPLACE" if replace else "UPDATE"
            try:
                self.app.execute(
                    f"{verb} sequences SET id = ?, created_at = ? WHERE id = ?", (new, version, key)
                )
            except sqlite3.IntegrityError:
                assert not replace and new in rows and new != key
                return
            if key in rows:
                rows[new] = dict(rows.pop(key), created_at=version)

    def export(self) -> dict[str, dict[str, Any]]:
        response = self.http.get(f"/collections/{self.collection}/documents/export")
        response.raise_for_status()
        # "\n" only: documents may hold U+2028 and friends, unescaped
        lines = [line for line in response.text.split("\n") if line.strip()]
        return {doc["id"]: doc for doc in map(json.loads, lines)}

    def step(self, how: str = "run_once") -> None:
        """One batch (`run_once`), or what the daemon's loop does: a pipelined drain of batches
        (`drain`, when the worker has it)."""
        assert self.worker is not None
        with contextlib.suppress(TypesenseUnavailableError):
            if how == "drain" and True:
                self.worker.applier.drain(threading.Event(), 5.0)
            else:
                self.worker.applier.apply_once()

    @contextlib.contextmanager
    def patched(self, target: object, name: str, wrap: Callable[..., Any]) -> Iterator[None]:
        original = getattr(target, name)
        setattr(target, name, wrap(original))
        try:
            yield
        finally:
            delattr(target, name)  # back to the class's method

    # -- rules ---------------------------------------------------------------------------------

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

        with contextlib.ExitStack() as stack:
            if when == "read":
                stack.enter_context(self.patched(self.worker.db, "read_rows", hook))
            else:
                stack.enter_context(self.patched(self.worker.indexes[0], "import_jsonl", hook))
                stack.enter_context(self.patched(self.worker.indexes[0], "delete_ids", hook))
            self.step(how)
        if not done:
            self.apply(operations)

    @rule(point=st.sampled_from(KILL_POINTS), how=HOW)
    def daemon_killed_during_a_step(self, point: str, how: str) -> None:
        assert self.worker is not None
        db, index = self.worker.db, self.worker.indexes[0]

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

        target, name, wrap = {
            "after_claim": (db, "read_rows", die_before),
            "before_import": (index, "import_jsonl", die_before),
            "after_import": (index, "import_jsonl", die_after),
            "after_delete": (index, "delete_ids", die_after),
            "before_ack_commit": (db, "write", die_before_commit),
        }[point]
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
    @rule(key=KEYS)
    def typesense_refuses_a_line_once(self, key: int) -> None:
        """Refused once, a line is retried at once and goes through: no sync_errors row."""
        self.proxy.add(Fault("fail_lines", status=400, ids={str(key)}))

    # -- checks --------------------------------------------------------------------------------

    @invariant()
    def typesense_holds_only_committed_states_never_going_back(self) -> None:
        for doc_id, doc in self.export().items():
            versions = self.history.get(doc_id, {})
            assert doc == versions.get(doc.get("created_at", "")), (
                f"document {doc_id} is no state SQLite committed: {doc}"
            )
            newest = self.seen_version.get(doc_id, "")
            assert doc["created_at"] >= newest, (
                f"document {doc_id} went back from {newest} to {doc['created_at']}"
            )
            self.seen_version[doc_id] = doc["created_at"]

    @invariant()
    def sync_errors_hold_only_invalid_states(self) -> None:
        # Typesense refusing a line once (all the model injects) must never reach sync_errors:
        # every row, open or closed, is a state of the record that failed our validation.
        rows = self.app.execute("SELECT http_status, error, document FROM sync_errors").fetchall()
        for http_status, error, doc in rows:
            assert http_status is None, f"a record was given up on after {http_status}: {error}"
            assert error.split(":")[0] in FIELD_NAMES, error
            assert json.loads(doc)["created_at"] in self.invalid_versions, (error, doc[:200])

    def drain_and_check(self) -> None:
        self.proxy.clear()
        assert self.worker is not None
        self.worker.db.close()
        db = Database(self.path)
        index = TypesenseIndex([self.proxy.url], self.server.api_key, self.collection)
        worker = daemon(db, [index], batch_size=self.batch_size)
        for _ in range(1000):
            if not worker.applier.apply_once().entries:
                break
        self.worker = worker

        # the model is what SQLite holds
        raw = sqlite3.connect(self.path)
        raw.text_factory = bytes
        in_sqlite = {row[0]: row[1:] for row in raw.execute(f"SELECT {COLUMNS} FROM sequences")}
        (pending,) = raw.execute("SELECT count(*) FROM outbox").fetchone()
        raw.close()
        assert in_sqlite == {
            key: tuple(stored(v) for v in row.values()) for key, row in self.rows.items()
        }
        assert pending == 0

        invalid = {key: invalid_fields(row) for key, row in self.rows.items()}
        documents = self.export()
        assert set(documents) <= {str(key) for key in self.rows}, "documents nobody holds"
        for key, row in self.rows.items():
            doc = documents.get(str(key))
            if not invalid[key]:
                assert doc == document(key, row)
            else:  # the last good state may stay searchable; never anything else
                assert doc is None or doc == self.history[str(key)].get(doc["created_at"])

        errors = sync_errors.find(db)
        assert {e["record_key"] for e in errors} == {k for k, bad in invalid.items() if bad}
        latest = {e["record_key"]: e for e in errors}  # oldest first: the last one wins
        for key, error in latest.items():
            assert error["http_status"] is None and error["op"] == "upsert"
            assert error["error"].split(":")[0] in invalid[key], error

    def teardown(self) -> None:
        try:
            if sys.exc_info()[0] is None:  # a step failed: report that, not a consequence
                self.drain_and_check()
        finally:
            if self.worker is not None:
                self.worker.db.close()
            self.app.close()
            with contextlib.suppress(httpx.HTTPError):
                alias = self.http.get(f"/aliases/{self.collection}").json()
                self.http.delete(f"/aliases/{self.collection}")
                self.http.delete(f"/collections/{alias['collection_name']}")
            self.http.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def test_the_sync_converges_under_random_writes_kills_and_faults(
    typesense_server: Server,
) -> None:
    with FaultProxy(typesense_server.url) as proxy:
        SyncMachine.server, SyncMachine.proxy = typesense_server, proxy
        run_state_machine_as_test(SyncMachine, settings=MODEL_SETTINGS)
