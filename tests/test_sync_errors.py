"""`sync_errors.retry` over many open errors: short write transactions, each record once."""

from collections import Counter
from pathlib import Path

import pytest

from outbox_sync import sync_errors
from outbox_sync.db import Database
from outbox_sync.mapping import SEQUENCES
from tests.support.app import insert_rows
from tests.support.daemon import record_failure


def test_retrying_every_open_error_takes_short_transactions_of_retry_chunk_records(
    db_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sync_errors, "RETRY_CHUNK", 3)
    insert_rows(db_path, range(1, 6))  # records 1-5 exist: upserts; 6-10 are gone: deletes
    for outbox_id, key in enumerate(range(1, 11), 1):
        record_failure(db, outbox_id, key, "refused", http_status=400, attempts=2)
    # 5 and 8 with a second open error each, as a database from before one open error per
    # record may hold
    db.conn.execute(
        "INSERT INTO sync_errors (outbox_id, mapping, record_key, op, http_status, error,"
        " attempts, failed_at) SELECT 10 + id, mapping, record_key, op, http_status, error,"
        " attempts, failed_at FROM sync_errors WHERE record_key IN (5, 8) ORDER BY id"
    )
    db.conn.execute("DELETE FROM outbox")

    statements: list[str] = []
    db.conn.set_trace_callback(statements.append)
    try:
        retries = sync_errors.retry(db, {"sequences": SEQUENCES})
    finally:
        db.conn.set_trace_callback(None)

    transactions: list[list[str]] = []  # what each BEGIN IMMEDIATE ... COMMIT held
    outside: list[str] = []
    writing = False
    for statement in statements:
        if statement.startswith("BEGIN IMMEDIATE"):
            transactions.append([])
            writing = True
        elif writing:
            transactions[-1].append(statement)
            writing = statement not in ("COMMIT", "ROLLBACK")
        else:
            outside.append(statement)
    # 10 records in transactions of at most 3, each committed, and no write outside them
    inserts = [sum(s.startswith("INSERT INTO outbox") for s in t) for t in transactions]
    assert inserts == [3, 3, 3, 1]
    assert [t[-1] for t in transactions] == ["COMMIT"] * 4
    assert [s for s in outside if s.startswith(("INSERT", "UPDATE", "DELETE"))] == []
    # every record retried once, as an upsert if its row exists, else a delete
    assert Counter(retry.key for retry in retries) == Counter(range(1, 11))
    assert {r.key: r.op for r in retries} == {
        key: "upsert" if key <= 5 else "delete" for key in range(1, 11)
    }
    assert {r.key: r.closed_error_ids for r in retries}[5] == (5, 11)
    outbox = db.conn.execute("SELECT record_key, op FROM outbox ORDER BY id").fetchall()
    assert outbox == [(r.key, r.op) for r in retries]
    # and every error closed as retried
    assert sync_errors.find(db) == []
    everything = sync_errors.find(db, status="all")
    assert len(everything) == 12 and {e["resolution"] for e in everything} == {"retried"}
