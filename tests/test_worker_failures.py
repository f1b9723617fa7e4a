"""Failure branches of the worker, driven by a fake index (the real server is tested in
test_sync.py and test_daemon.py; here we need failures on demand)."""

import threading
import time
from pathlib import Path

import pytest

from outbox_sync import sync_errors
from outbox_sync.db import Database, SyncFailure
from outbox_sync.errors import TypesenseUnavailableError
from outbox_sync.mapping import SEQUENCES
from outbox_sync.typesense_index import ImportResult
from outbox_sync.worker import daemon
from tests.support.app import app_connection, insert_rows
from tests.support.fake_index import FakeIndex, OverlapIndex


def test_a_refused_document_is_retried_once_immediately(db_path: Path, db: Database) -> None:
    insert_rows(db_path, range(1, 6))
    index = FakeIndex(bad="3", refusals=1)
    report = daemon(db, [index]).applier.apply_once()
    assert index.imports == [["1", "2", "3", "4", "5"], ["3"]]
    assert (report.upserted, report.retried, report.failures) == (5, 1, [])
    assert db.counts(SEQUENCES)["pending"] == 0


def test_a_document_refused_twice_goes_to_sync_errors_and_the_queue_moves_on(
    db_path: Path, db: Database
) -> None:
    insert_rows(db_path, range(1, 6))
    index = FakeIndex(bad="3", refusals=2)
    report = daemon(db, [index]).applier.apply_once()
    assert sorted(index.documents) == ["1", "2", "4", "5"]
    assert report.upserted == 4
    [error] = sync_errors.find(db)
    assert (error["record_key"], error["op"], error["http_status"], error["attempts"]) == (
        3,
        "upsert",
        400,
        2,
    )
    assert error["error"] == "Field `comment` must be a string."
    assert '"id":"3"' in error["document"]  # the document actually sent
    assert db.counts(SEQUENCES)["pending"] == 0


def test_server_trouble_keeps_the_batch_queued_and_writes_no_sync_errors(
    db_path: Path, db: Database
) -> None:
    insert_rows(db_path, range(1, 4))
    index = FakeIndex(down=1)
    worker = daemon(db, [index])
    try:
        worker.applier.apply_once()
    except TypesenseUnavailableError:
        pass
    else:
        raise AssertionError("expected TypesenseUnavailableError")
    assert db.counts(SEQUENCES)["pending"] == 3
    assert sync_errors.find(db) == []
    worker.applier.apply_once()
    assert sorted(index.documents) == ["1", "2", "3"]
    assert db.counts(SEQUENCES)["pending"] == 0


def test_the_loop_backs_off_through_an_outage_then_drains(db_path: Path, db: Database) -> None:
    insert_rows(db_path, range(1, 4))
    index = FakeIndex(down=3)
    worker = daemon(db, [index], min_backoff_s=0.01, max_backoff_s=0.02)
    delays: list[float] = []
    failed = worker.backoff.failed
    worker.backoff.failed = lambda error, now: delays.append(failed(error, now)) or delays[-1]  # type: ignore[method-assign]
    worker.run(threading.Event(), once=True)
    assert delays == [0.01, 0.02, 0.02]  # capped exponential
    assert sorted(index.documents) == ["1", "2", "3"]
    assert worker.backoff.since is None  # recovered
    assert sync_errors.find(db) == []


def test_entries_written_during_a_batch_survive_its_acknowledgement(
    db_path: Path, db: Database
) -> None:
    insert_rows(db_path, range(1, 3))
    app = app_connection(db_path)

    class WritingIndex(FakeIndex):
        def import_jsonl(self, body: bytes, count: int) -> list[ImportResult]:
            if not self.imports:  # while the first batch is in flight, the app writes again
                app.execute("UPDATE sequences SET comment = 'late change' WHERE id = 1")
            return super().import_jsonl(body, count)

    index = WritingIndex()
    worker = daemon(db, [index])
    worker.applier.apply_once()
    assert db.counts(SEQUENCES)["pending"] == 1  # the late marker is still queued
    worker.applier.apply_once()
    assert b"late change" in index.documents["1"]


def test_a_drain_acknowledges_the_small_batches_of_a_steady_writer_together(
    db_path: Path, db: Database
) -> None:
    """Each acknowledgement is a write transaction on the application's file: a writer that
    commits while batches are in flight makes a small batch each time, and the drain
    acknowledges them in one transaction (batch.ACK_INTERVAL_S), all before it returns."""
    insert_rows(db_path, [1])
    app = app_connection(db_path)

    class WritingIndex(FakeIndex):
        def import_jsonl(self, body: bytes, count: int) -> list[ImportResult]:
            if len(self.imports) < 4:  # the application commits one row while each is in flight
                insert_rows(app, [len(self.imports) + 2])
            return super().import_jsonl(body, count)

    index = WritingIndex()
    worker = daemon(db, [index])
    transactions: list[str] = []
    db.conn.set_trace_callback(lambda sql: sql == "BEGIN IMMEDIATE" and transactions.append(sql))
    assert worker.applier.drain(threading.Event()) == 5
    assert index.imports == [["1"], ["2"], ["3"], ["4"], ["5"]]
    assert len(transactions) == 1
    assert db.counts(SEQUENCES)["pending"] == 0


def test_batches_acknowledged_together_keep_each_batchs_errors_in_turn(
    db_path: Path, db: Database
) -> None:
    """A record refused in one batch and synced in the next has no open error, as when each
    batch was acknowledged by itself; refused after it synced, it has one."""
    insert_rows(db_path, range(1, 3))
    failure = {"op": "upsert", "document": "{}", "http_status": 400, "attempts": 2}
    refused = [
        SyncFailure(outbox_id=i, mapping="sequences", key=i, error="refused", **failure)
        for i in (1, 2)
    ]
    db.ack_batches(2, [([], [refused[0]]), ([("sequences", 1)], []), ([("sequences", 2)], [])])
    db.ack_batches(2, [([], [refused[1]])])
    errors = sync_errors.find(db, status="all")
    assert [(e["record_key"], e["resolved_at"] is None) for e in errors] == [(1, False), (2, True)]


@pytest.mark.parametrize(("journal", "relaxed"), [("wal", True), ("delete", False)])
def test_an_acknowledgement_waits_for_the_disk_only_where_it_must(
    db_path: Path, db: Database, journal: str, relaxed: bool
) -> None:
    """In WAL mode a commit that does not wait for the fsync can be lost to a power cut but
    never corrupts the file (the entries are applied again); in a rollback journal it could."""
    db.conn.execute(f"PRAGMA journal_mode = {journal}")
    statements: list[str] = []
    db.conn.set_trace_callback(statements.append)
    db.ack(0, [], [])
    db.conn.set_trace_callback(None)
    assert ("PRAGMA synchronous = NORMAL" in statements) is relaxed
    assert db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again


def test_the_backlogs_age_is_the_first_entry_in_line(db_path: Path, db: Database) -> None:
    """Found by the primary key: min(enqueued_at) read the whole outbox, every second while
    the daemon drained it. Entries are enqueued in id order, so the two agree unless the clock
    went back."""
    insert_rows(db_path, range(1, 4))
    app = app_connection(db_path)
    now = time.time()
    app.execute("UPDATE outbox SET enqueued_at = ? - 100 * (4 - id)", (now,))  # 300, 200, 100 s
    app.execute("UPDATE outbox SET enqueued_at = ? WHERE id = 3", (now - 999,))
    pending, age, _ = db.backlog()
    assert pending == 3
    assert age is not None and 299 <= age < 330


def test_a_drain_sends_a_batch_beside_the_one_in_flight_when_they_share_no_record(
    db_path: Path, db: Database
) -> None:
    insert_rows(db_path, range(1, 9))
    index = OverlapIndex()
    assert daemon(db, [index], batch_size=2).applier.drain(threading.Event()) == 8
    assert max(len(together) for together in index.seen_together) == 2  # never more
    assert sorted(index.documents, key=int) == [str(i) for i in range(1, 9)]
    assert db.counts(SEQUENCES)["pending"] == 0


def test_a_batch_touching_a_record_in_flight_waits_for_that_answer(
    db_path: Path, db: Database
) -> None:
    """Entries 1-2 are records 1, 2; entries 3-4 update record 1 and add 3; entries 5-6 add 4
    and 5: the second batch waits for the first, the third goes beside the second."""
    insert_rows(db_path, [1, 2])
    app = app_connection(db_path)
    app.execute("UPDATE sequences SET comment = 'second version' WHERE id = 1")
    insert_rows(app, [3, 4, 5])
    index = OverlapIndex(hold_s=0.1)
    assert daemon(db, [index], batch_size=2).applier.drain(threading.Event()) == 6
    assert [together[-1] for together in index.seen_together] == [
        ["1", "2"],
        ["1", "3"],
        ["4", "5"],
    ]
    assert [len(together) for together in index.seen_together] == [1, 1, 2]
    for together in index.seen_together:
        ids = [doc_id for request in together for doc_id in request]
        assert len(ids) == len(set(ids))  # no record in two requests at once
    assert b"second version" in index.documents["1"]


def test_a_refused_line_is_retried_before_a_later_batch_touching_it_is_sent(
    db_path: Path, db: Database
) -> None:
    insert_rows(db_path, range(1, 5))  # batches [1, 2], [3, 4], then the update of 2
    app = app_connection(db_path)
    app.execute("UPDATE sequences SET comment = 'newer' WHERE id = 2")
    index = OverlapIndex(bad="2", refusals=1)
    assert daemon(db, [index], batch_size=2).applier.drain(threading.Event()) == 5
    first_retry = index.imports.index(["2"])
    assert index.imports[first_retry + 1 :].count(["2"]) == 1  # the update, after the retry
    assert index.imports.index(["1", "2"]) < first_retry
    assert b"newer" in index.documents["2"]
    assert sync_errors.find(db) == []


def test_server_trouble_on_one_of_two_batches_in_flight_acknowledges_neither_past_it(
    db_path: Path, db: Database
) -> None:
    insert_rows(db_path, range(1, 7))

    class FirstFails(OverlapIndex):  # the first batch's request fails, once
        def import_jsonl(self, body: bytes, count: int) -> list[ImportResult]:
            results = super().import_jsonl(body, count)
            if self.imports.count(["1", "2"]) == 1 and body.startswith(b'{"id":"1"'):
                raise TypesenseUnavailableError("Typesense answered 503", 503)
            return results

    index = FirstFails()
    applier = daemon(db, [index], batch_size=2).applier
    with pytest.raises(TypesenseUnavailableError):
        applier.drain(threading.Event())
    assert len(index.seen_together[1]) == 2  # the second batch was in flight beside it
    assert db.counts(SEQUENCES)["pending"] == 6  # the second, applied, is sent again
    assert applier.drain(threading.Event()) == 6
    assert sorted(index.documents, key=int) == [str(i) for i in range(1, 7)]
    assert sync_errors.find(db) == []
