"""Failure branches of the worker, driven by a fake index (the real server is tested in
test_sync.py and test_daemon.py; here we need failures on demand)."""

import threading
from pathlib import Path

from outbox_sync.db import Database
from outbox_sync.errors import TypesenseUnavailableError
from outbox_sync.typesense_index import ImportResult
from outbox_sync.worker import Worker
from tests.conftest import ROW_SQL, app_connection, make_row


class FakeIndex:
    """Refuses the document with id `bad` `refusals` times; fails whole requests while
    `down` > 0 (counting down)."""

    def __init__(self, bad: str = "", refusals: int = 0, down: int = 0) -> None:
        self.bad, self.refusals, self.down = bad, refusals, down
        self.imports: list[list[str]] = []
        self.documents: dict[str, bytes] = {}
        self.observe = None

    def ensure_collection(self) -> bool:
        return False

    def healthy(self) -> bool:
        return self.down == 0

    def import_jsonl(self, body: bytes, count: int) -> list[ImportResult]:
        if self.down > 0:
            self.down -= 1
            raise TypesenseUnavailableError("Typesense answered 503: Not Ready or Lagging", 503)
        lines = body.split(b"\n")
        ids = [line.split(b'"id":"')[1].split(b'"')[0].decode() for line in lines]
        self.imports.append(ids)
        results = []
        for doc_id, line in zip(ids, lines, strict=True):
            if doc_id == self.bad and self.refusals > 0:
                self.refusals -= 1
                results.append(ImportResult(False, 400, "Field `comment` must be a string."))
            else:
                self.documents[doc_id] = line
                results.append(ImportResult(True))
        return results

    def delete_ids(self, ids: list[str]) -> int:
        for doc_id in ids:
            self.documents.pop(doc_id, None)
        return len(ids)


def write_rows(path: Path, count: int) -> None:
    app_connection(path).executemany(ROW_SQL, [make_row(i) for i in range(1, count + 1)])


def test_a_refused_document_is_retried_once_immediately(db_path: Path, db: Database) -> None:
    write_rows(db_path, 5)
    index = FakeIndex(bad="3", refusals=1)
    report = Worker(db, index).run_once()
    assert index.imports == [["1", "2", "3", "4", "5"], ["3"]]
    assert (report.upserted, report.retried, report.failures) == (5, 1, [])
    assert db.counts()["pending"] == 0


def test_a_document_refused_twice_goes_to_sync_errors_and_the_queue_moves_on(
    db_path: Path, db: Database
) -> None:
    write_rows(db_path, 5)
    index = FakeIndex(bad="3", refusals=2)
    report = Worker(db, index).run_once()
    assert sorted(index.documents) == ["1", "2", "4", "5"]
    assert report.upserted == 4
    [error] = db.list_errors()
    assert (error["sequence_id"], error["op"], error["http_status"], error["attempts"]) == (
        3,
        "upsert",
        400,
        2,
    )
    assert error["error"] == "Field `comment` must be a string."
    assert '"id":"3"' in error["document"]  # the document actually sent
    assert db.counts()["pending"] == 0


def test_server_trouble_keeps_the_batch_queued_and_writes_no_sync_errors(
    db_path: Path, db: Database
) -> None:
    write_rows(db_path, 3)
    index = FakeIndex(down=1)
    worker = Worker(db, index)
    try:
        worker.run_once()
    except TypesenseUnavailableError:
        pass
    else:
        raise AssertionError("expected TypesenseUnavailableError")
    assert db.counts()["pending"] == 3
    assert db.list_errors() == []
    worker.run_once()
    assert sorted(index.documents) == ["1", "2", "3"]
    assert db.counts()["pending"] == 0


def test_the_loop_backs_off_through_an_outage_then_drains(db_path: Path, db: Database) -> None:
    write_rows(db_path, 3)
    index = FakeIndex(down=3)
    worker = Worker(db, index, min_backoff_s=0.01, max_backoff_s=0.02)
    delays: list[float] = []
    failed = worker.backoff.failed
    worker.backoff.failed = lambda error, now: delays.append(failed(error, now)) or delays[-1]  # type: ignore[method-assign]
    worker.run(threading.Event(), once=True)
    assert delays == [0.01, 0.02, 0.02]  # capped exponential
    assert sorted(index.documents) == ["1", "2", "3"]
    assert worker.backoff.since is None  # recovered
    assert db.list_errors() == []


def test_entries_written_during_a_batch_survive_its_acknowledgement(
    db_path: Path, db: Database
) -> None:
    write_rows(db_path, 2)
    app = app_connection(db_path)

    class WritingIndex(FakeIndex):
        def import_jsonl(self, body: bytes, count: int) -> list[ImportResult]:
            if not self.imports:  # while the first batch is in flight, the app writes again
                app.execute("UPDATE sequences SET comment = 'late change' WHERE id = 1")
            return super().import_jsonl(body, count)

    index = WritingIndex()
    worker = Worker(db, index)
    worker.run_once()
    assert db.counts()["pending"] == 1  # the late marker is still queued
    worker.run_once()
    assert b"late change" in index.documents["1"]
