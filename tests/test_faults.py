"""Network and server faults between the worker and a real Typesense, injected by a real HTTP
proxy on loopback (tests/support/faultproxy.py): what is retried, what is applied again, what is
given up on. A dropped answer after Typesense applied a change is the classic trap: the worker
must treat it as unknown and apply it again, which is safe because upserts and deletes are
idempotent."""

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import structlog

from outbox_sync import sync_errors
from outbox_sync.db import Database
from outbox_sync.errors import TypesenseUnavailableError
from outbox_sync.mapping import SEQUENCES
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import Worker, daemon
from tests.support.app import app_connection, insert_rows, sqlite_documents
from tests.support.daemon import Daemon, drain
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.typesense import Server, export
from tests.support.wait import wait_until

# Short enough that a `delay` or `stall` fault costs little, long enough for a loaded machine.
TIMEOUT_S = 0.6


@pytest.fixture
def proxy(typesense_server: Server, answer_shape: str) -> Iterator[FaultProxy]:
    with FaultProxy(typesense_server.url, shape=answer_shape) as proxy:
        yield proxy


@pytest.fixture
def proxied(db: Database, typesense_server: Server, collection: str, proxy: FaultProxy) -> Worker:
    """A worker whose every request goes through the proxy."""
    index = TypesenseIndex([proxy.url], typesense_server.api_key, collection, timeout_s=TIMEOUT_S)
    index.ensure_collection()
    return daemon(db, [index], min_backoff_s=0.01, max_backoff_s=0.05)


def in_sync(db_path: Path, server: Server, collection: str) -> bool:
    return export(server, collection) == sqlite_documents(db_path)


def prepare_mixed_batch(db_path: Path, worker: Worker) -> None:
    """20 records synced; then a batch of updates, deletes, an id change and inserts queued."""
    conn = app_connection(db_path)
    insert_rows(conn, range(1, 21))
    worker.applier.apply_once()
    conn.execute("UPDATE sequences SET comment = 'edited', sequence_number = -id WHERE id <= 5")
    conn.execute("DELETE FROM sequences WHERE id BETWEEN 6 AND 9")
    conn.execute("UPDATE sequences SET id = 100 WHERE id = 10")
    insert_rows(conn, range(21, 26))


def test_a_503_is_retried_once_immediately(
    db_path: Path, proxied: Worker, proxy: FaultProxy, typesense_server: Server, collection: str
) -> None:
    insert_rows(db_path, range(1, 6))
    proxy.add(Fault("status", status=503, path="/documents/import"))
    report = proxied.applier.apply_once()
    assert report.upserted == 5
    imports = [r for r in proxy.requests if "/documents/import" in r.path]
    assert [(r.fault, r.status) for r in imports] == [("status", 503), (None, 200)]
    assert in_sync(db_path, typesense_server, collection)
    assert Database(db_path).counts(SEQUENCES)["pending"] == 0


@pytest.mark.parametrize(
    "fault",
    [
        Fault("drop_response", times=2),
        Fault("truncate_response", times=2),
        Fault("delay", seconds=TIMEOUT_S + 0.4, times=2),
    ],
    ids=lambda fault: fault.kind,
)
def test_an_answer_lost_after_typesense_applied_the_batch_is_applied_again(
    db_path: Path,
    db: Database,
    proxied: Worker,
    proxy: FaultProxy,
    typesense_server: Server,
    collection: str,
    fault: Fault,
) -> None:
    prepare_mixed_batch(db_path, proxied)
    queued = db.counts(SEQUENCES)["pending"]
    proxy.add(replace(fault, path="/documents/import"))
    with pytest.raises(TypesenseUnavailableError):
        proxied.applier.apply_once()
    # Typesense did apply the import (twice: the immediate retry) but the worker cannot know:
    # nothing is acknowledged and nothing is given up.
    applied = export(typesense_server, collection)
    assert applied["1"]["comment"] == "edited" and "21" in applied
    assert db.counts(SEQUENCES)["pending"] == queued
    assert sync_errors.find(db) == []
    # Now the deletes lose their answers too, after Typesense deleted.
    proxy.add(replace(fault, method="DELETE"))
    with pytest.raises(TypesenseUnavailableError):
        proxied.applier.apply_once()
    assert "6" not in export(typesense_server, collection)
    assert db.counts(SEQUENCES)["pending"] == queued
    # The network heals: the same batch is applied again and converges.
    report = proxied.applier.apply_once()
    assert report.entries == queued and report.failures == []
    assert in_sync(db_path, typesense_server, collection)
    assert db.counts(SEQUENCES)["pending"] == 0 and sync_errors.find(db) == []


@pytest.mark.parametrize(
    "fault",
    [
        Fault("status", status=503, times=2),
        Fault("status", status=500, times=2),
        Fault("drop_request", times=2),
        Fault("stall", seconds=TIMEOUT_S + 0.4, times=2),
    ],
    ids=lambda fault: f"{fault.kind}-{fault.status}" if fault.kind == "status" else fault.kind,
)
def test_a_request_typesense_never_saw_changes_nothing_and_stays_queued(
    db_path: Path,
    db: Database,
    proxied: Worker,
    proxy: FaultProxy,
    typesense_server: Server,
    collection: str,
    fault: Fault,
) -> None:
    prepare_mixed_batch(db_path, proxied)
    before = export(typesense_server, collection)
    queued = db.counts(SEQUENCES)["pending"]
    proxy.add(replace(fault))
    with pytest.raises(TypesenseUnavailableError):
        proxied.applier.apply_once()
    assert export(typesense_server, collection) == before
    assert db.counts(SEQUENCES)["pending"] == queued and sync_errors.find(db) == []
    proxied.applier.apply_once()
    assert in_sync(db_path, typesense_server, collection)
    assert db.counts(SEQUENCES)["pending"] == 0 and sync_errors.find(db) == []


@pytest.mark.answer_shapes
def test_a_server_out_of_disk_pauses_the_sync_until_it_has_room_again(
    db_path: Path,
    db: Database,
    proxied: Worker,
    proxy: FaultProxy,
    typesense_server: Server,
    collection: str,
    answer_shape: str,
) -> None:
    stop = threading.Event()
    insert_rows(db_path, range(1, 6))
    assert proxied.loop(time.monotonic(), stop).applied == 5
    full = Fault("resource_error", times=None)
    proxy.add(full)
    with structlog.testing.capture_logs() as logs:
        # idle, the daemon asks /health: 26+ name the resource_error there (answering ok), and
        # the daemon pauses at once; 0.24.1 says nothing until it refuses a write
        assert proxied.loop(time.monotonic(), stop).paused is (answer_shape == "v30")
        insert_rows(db_path, range(6, 11))
        for _ in range(3):  # every write refused with 422 "running out of resource": paused
            assert proxied.loop(time.monotonic(), stop).paused
        assert sorted(export(typesense_server, collection), key=int) == ["1", "2", "3", "4", "5"]
        assert db.counts(SEQUENCES)["pending"] == 5 and sync_errors.find(db) == []
        full.times = 0  # room again
        drain(proxied)
    events = [e["event"] for e in logs]
    assert events.count("sync_paused") == 1 and events.count("sync_resumed") == 1
    [audited] = [e for e in logs if e["event"] == "audit_done"]  # after the outage
    assert audited["reason"] == "outage" and audited["consistent"] is True
    assert in_sync(db_path, typesense_server, collection)
    assert db.counts(SEQUENCES)["pending"] == 0 and sync_errors.find(db) == []


def test_a_line_refused_once_is_retried_and_synced(
    db_path: Path,
    db: Database,
    proxied: Worker,
    proxy: FaultProxy,
    typesense_server: Server,
    collection: str,
) -> None:
    insert_rows(db_path, range(1, 11))
    proxy.add(Fault("fail_lines", ids={"4", "7"}, status=400))
    report = proxied.applier.apply_once()
    assert (report.upserted, report.retried, report.failures) == (10, 2, [])
    assert in_sync(db_path, typesense_server, collection)
    assert sync_errors.find(db) == []


@pytest.mark.answer_shapes
def test_a_line_refused_twice_goes_to_sync_errors_and_the_rest_syncs(
    db_path: Path,
    db: Database,
    proxied: Worker,
    proxy: FaultProxy,
    typesense_server: Server,
    collection: str,
) -> None:
    conn = app_connection(db_path)
    insert_rows(conn, range(1, 11))
    proxy.add(Fault("fail_lines", ids={"4"}, status=400, error="Field `x` is wrong.", times=2))
    report = proxied.applier.apply_once()
    assert (report.upserted, report.retried, len(report.failures)) == (9, 1, 1)
    assert sorted(export(typesense_server, collection), key=int) == [
        str(i) for i in range(1, 11) if i != 4
    ]
    [error] = sync_errors.find(db)
    assert (error["record_key"], error["http_status"], error["attempts"]) == (4, 400, 2)
    assert error["error"] == "Field `x` is wrong."
    assert json.loads(error["document"])["id"] == "4"  # the document actually sent
    assert db.counts(SEQUENCES)["pending"] == 0
    # the next change of the record syncs, and closes its error
    conn.execute("UPDATE sequences SET comment = 'fixed' WHERE id = 4")
    proxied.applier.apply_once()
    assert in_sync(db_path, typesense_server, collection)
    assert sync_errors.find(db) == []
    [closed] = sync_errors.find(db, status="all")
    assert closed["resolution"] == "superseded"


def test_a_refused_document_holding_a_unicode_line_separator_is_still_matched_to_its_line(
    db_path: Path,
    db: Database,
    proxied: Worker,
    proxy: FaultProxy,
    typesense_server: Server,
    collection: str,
) -> None:
    # Typesense echoes a refused document in its result line, and JSON leaves U+2028, U+2029
    # and U+0085 unescaped: str.splitlines() would cut that line in two and make the whole batch
    # look like server trouble, forever. Results are split on "\n" only.
    conn = app_connection(db_path)
    insert_rows(conn, range(1, 4))
    conn.execute("UPDATE sequences SET comment = 'a\u2028b\u2029c\x85d' WHERE id = 2")
    proxy.add(Fault("fail_lines", ids={"2"}, status=400, times=2))
    report = proxied.applier.apply_once()
    assert (report.upserted, len(report.failures)) == (2, 1)
    assert [e["record_key"] for e in sync_errors.find(db)] == [2]
    assert sorted(export(typesense_server, collection)) == ["1", "3"]


def test_a_5xx_line_is_server_trouble_nothing_is_given_up(
    db_path: Path,
    db: Database,
    proxied: Worker,
    proxy: FaultProxy,
    typesense_server: Server,
    collection: str,
) -> None:
    insert_rows(db_path, range(1, 11))
    proxy.add(Fault("fail_lines", ids={"5"}, status=500, times=3))
    for _ in range(3):
        with pytest.raises(TypesenseUnavailableError, match="500"):
            proxied.applier.apply_once()
        assert db.counts(SEQUENCES)["pending"] == 10 and sync_errors.find(db) == []
    report = proxied.applier.apply_once()
    assert report.upserted == 10 and report.failures == []
    assert in_sync(db_path, typesense_server, collection)


def test_an_import_answer_with_too_few_lines_is_server_trouble(
    db_path: Path, db: Database, proxied: Worker, proxy: FaultProxy
) -> None:
    insert_rows(db_path, range(1, 6))
    proxy.add(Fault("garble_lines"))  # not retried at once: the answer came
    with pytest.raises(TypesenseUnavailableError, match="answered 4 results for 5 documents"):
        proxied.applier.apply_once()
    assert db.counts(SEQUENCES)["pending"] == 5 and sync_errors.find(db) == []
    assert proxied.applier.apply_once().upserted == 5


@pytest.mark.slow
def test_the_daemon_rides_out_faults_and_converges(
    db_path: Path,
    db: Database,
    daemon_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
    proxy: FaultProxy,
    typesense_server: Server,
    collection: str,
) -> None:
    conn = app_connection(db_path)
    insert_rows(conn, range(1, 201))
    # a 503 outage long enough for the daemon to pause and back off twice (each attempt is
    # retried once at once, so 4 answers)
    proxy.add(Fault("status", status=503, path="/documents/import", times=4))
    env = daemon_env | {"TYPESENSE_URL": proxy.url, "OUTBOX_SYNC_TIMEOUT": str(TIMEOUT_S)}
    daemon = start_daemon("--batch-size", "50", env=env)
    wait_until(lambda: db.counts(SEQUENCES)["pending"] == 0, what="the first drain")
    # then every kind of lost answer, each after Typesense applied the change
    proxy.add(
        Fault("drop_response", path="/documents/import"),
        Fault("truncate_response", method="DELETE"),
        Fault("delay", seconds=TIMEOUT_S + 0.2, path="/documents/import", times=2),
        Fault("fail_lines", ids={"150"}, status=400),
        Fault("fail_lines", ids={"77"}, status=500),
    )
    conn.execute("UPDATE sequences SET comment = 'second pass' WHERE id % 3 = 0")
    conn.execute("DELETE FROM sequences WHERE id % 7 = 0")
    conn.execute("UPDATE sequences SET id = id + 1000 WHERE id % 11 = 0")
    wait_until(lambda: not proxy.pending_faults(), what="the faults to be used up")
    wait_until(lambda: db.counts(SEQUENCES)["pending"] == 0, what="the second drain")
    assert in_sync(db_path, typesense_server, collection)
    assert sync_errors.find(db) == []
    names = [e["event"] for e in daemon.events()]
    assert "sync_paused" in names and "sync_resumed" in names
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
