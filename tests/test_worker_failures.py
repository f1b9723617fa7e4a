"""Failure branches of the worker, driven by a fake index (the real server is tested in
test_sync.py and test_daemon.py; here we need failures on demand)."""

import threading
from pathlib import Path

from outbox_sync import sync_errors
from outbox_sync.db import Database
from outbox_sync.errors import TypesenseUnavailableError
from outbox_sync.mapping import SEQUENCES
from outbox_sync.typesense_index import ImportResult
from outbox_sync.worker import daemon
from tests.support.app import app_connection, insert_rows
from tests.support.fake_index import FakeIndex


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
