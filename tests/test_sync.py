"""Worker.run_once against a real Typesense: what reaches search, what lands in sync_errors."""

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from outbox_sync import schema, sync_errors
from outbox_sync.db import Database
from outbox_sync.errors import SchemaMismatchError, TypesenseRejectedError
from outbox_sync.mapping import SEQUENCES
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import Worker, daemon
from tests.support.app import ROW_SQL, app_connection, insert_rows, make_row, sqlite_documents
from tests.support.daemon import drain, running
from tests.support.typesense import Server, by_hand, export
from tests.support.wait import wait_until

SOURCE_EXAMPLE = (123, "script", 456, 1, "Initial script creation", "2023-10-01T12:00:00Z")


@pytest.mark.answer_shapes
def test_source_example_end_to_end(db_path: Path, worker: Worker, index: TypesenseIndex) -> None:
    conn = app_connection(db_path)
    conn.execute(ROW_SQL, SOURCE_EXAMPLE)
    conn.execute(ROW_SQL, (124, "section", 457, 2, "Opening section", "2023-10-01T12:01:00Z"))
    conn.execute(ROW_SQL, (125, "script", 458, 0, "Second script draft", "2023-10-01T12:02:00Z"))
    drain(worker)

    assert index.retrieve("123") == {
        "id": "123",
        "element_type": "script",
        "element_id": 456,
        "sequence_number": 1,
        "comment": "Initial script creation",
        "created_at": "2023-10-01T12:00:00Z",
    }
    found = index.search({"q": "initial", "query_by": "comment"})
    assert [hit["document"]["id"] for hit in found["hits"]] == ["123"]

    faceted = index.search({"q": "*", "facet_by": "element_type"})
    counts = {c["value"]: c["count"] for c in faceted["facet_counts"][0]["counts"]}
    assert counts == {"script": 2, "section": 1}

    ordered = index.search({"q": "*", "sort_by": "sequence_number:asc"})
    assert [hit["document"]["id"] for hit in ordered["hits"]] == ["125", "123", "124"]

    conn.execute(
        "UPDATE sequences SET comment = 'Revised opening', sequence_number = 7 WHERE id = 123"
    )
    drain(worker)
    document = index.retrieve("123")
    assert document is not None
    assert (document["comment"], document["sequence_number"]) == ("Revised opening", 7)
    assert index.search({"q": "initial", "query_by": "comment"})["found"] == 0

    conn.execute("DELETE FROM sequences WHERE id = 123")
    drain(worker)
    assert index.retrieve("123") is None
    assert Database(db_path).counts(SEQUENCES)["pending"] == 0


@pytest.mark.answer_shapes
def test_superseded_entries_converge_to_what_sqlite_holds(
    db_path: Path, worker: Worker, typesense_server: Server, collection: str
) -> None:
    conn = app_connection(db_path)
    insert_rows(conn, range(1, 301))
    for i in range(1, 301, 3):
        conn.execute(
            "UPDATE sequences SET comment = 'changed', sequence_number = ? WHERE id = ?",
            (i * 10, i),
        )
    conn.execute("DELETE FROM sequences WHERE id % 7 = 0")
    conn.execute("UPDATE sequences SET id = id + 1000 WHERE id % 11 = 0")
    worker.applier.batch_size = 64  # many batches, each with repeated markers
    drain(worker)
    assert export(typesense_server, collection) == sqlite_documents(db_path)
    assert Database(db_path).counts(SEQUENCES) | {"rows": None} == {
        "pending": 0,
        "oldest_pending_age_s": None,
        "sync_errors_open": 0,
        "rows": None,
    }


def test_bad_rows_of_a_legacy_table_land_in_sync_errors_while_neighbours_sync(
    tmp_path: Path, typesense_server: Server, collection: str, index: TypesenseIndex
) -> None:
    path = tmp_path / "legacy.db"
    conn = app_connection(path)
    conn.execute(
        "CREATE TABLE sequences"
        " (id, element_type, element_id, sequence_number, comment, created_at)"
    )
    insert_rows(conn, range(1, 11))
    conn.execute("UPDATE sequences SET sequence_number = 'twelve' WHERE id = 3")
    conn.execute("UPDATE sequences SET element_id = NULL WHERE id = 5")
    conn.execute("UPDATE sequences SET sequence_number = 3000000000 WHERE id = 7")
    conn.execute("UPDATE sequences SET id = 'abc' WHERE id = 9")
    db = Database(path)
    schema.init(db, [SEQUENCES])
    drain(daemon(db, [index]))

    assert sorted(export(typesense_server, collection), key=int) == ["1", "2", "4", "6", "8", "10"]
    errors = {row["record_key"]: row for row in sync_errors.find(db)}
    assert set(errors) == {3, 5, 7, "abc"}
    assert errors[3]["error"] == "sequence_number: expected an integer, got text 'twelve'"
    assert errors[5]["error"] == "element_id: is NULL but the field is required"
    assert "sequence_number: 3000000000 is outside the range" in errors[7]["error"]
    assert errors["abc"]["error"] == "id: expected an integer, got text 'abc'"
    assert errors[3]["op"] == "upsert" and errors[3]["http_status"] is None
    assert '"sequence_number": "twelve"' in errors[3]["document"]
    assert db.counts(SEQUENCES)["pending"] == 0

    # the application fixes the row: the next sync succeeds and closes the error
    conn.execute("UPDATE sequences SET sequence_number = 12 WHERE id = 3")
    drain(daemon(db, [index]))
    assert index.retrieve("3") is not None
    assert {row["record_key"] for row in sync_errors.find(db)} == {5, 7, "abc"}
    closed = [row for row in sync_errors.find(db, status="all") if row["record_key"] == 3]
    assert closed[0]["resolution"] == "superseded" and closed[0]["resolved_at"]


@pytest.mark.answer_shapes
def test_a_collection_deleted_under_the_daemon_is_made_again_and_audited_back(
    db_path: Path,
    db: Database,
    worker: Worker,
    index: TypesenseIndex,
    typesense_server: Server,
    collection: str,
) -> None:
    conn = app_connection(db_path)
    insert_rows(conn, range(1, 21))
    drain(daemon(db, [index]))  # a run's end stops its audits for good: the worker is fresh
    by_hand(typesense_server, "DELETE", f"/collections/{index.target()}")  # behind the alias
    insert_rows(conn, range(21, 26))
    with structlog.testing.capture_logs() as logs:
        # the import's 404 is the collection's (a lookup says so, whatever the wording)
        assert worker.loop(time.monotonic(), threading.Event()).paused
        assert [e["event"] for e in logs] == ["collection_missing"]
        drain(worker)
    [audited] = [e for e in logs if e["event"] == "audit_done"]
    assert export(typesense_server, collection) == sqlite_documents(db_path)
    assert (audited["reason"], audited["drift"]["missing"], audited["enqueued"]) == (
        "outage",
        20,
        20,
    )
    assert db.counts(SEQUENCES)["pending"] == 0 and sync_errors.find(db) == []


@pytest.mark.answer_shapes
def test_deleting_a_record_that_never_reached_search_is_success(
    db_path: Path, db: Database, worker: Worker, typesense_server: Server, collection: str
) -> None:
    conn = app_connection(db_path)
    conn.execute(ROW_SQL, make_row(1))
    conn.execute("DELETE FROM sequences WHERE id = 1")
    conn.execute(ROW_SQL, make_row(2))
    drain(worker)
    assert list(export(typesense_server, collection)) == ["2"]
    assert db.counts(SEQUENCES)["sync_errors_open"] == 0


def test_an_incompatible_collection_stops_with_what_differs(
    typesense_server: Server, collection: str
) -> None:
    import httpx

    httpx.post(
        f"{typesense_server.url}/collections",
        json={
            "name": collection,
            "fields": [
                {"name": "element_type", "type": "string"},
                {"name": "sequence_number", "type": "string"},
                {"name": "owner", "type": "string"},
            ],
        },
        headers={"X-TYPESENSE-API-KEY": typesense_server.api_key},
    ).raise_for_status()
    index = TypesenseIndex([typesense_server.url], typesense_server.api_key, collection)
    with pytest.raises(SchemaMismatchError) as caught:
        index.ensure_collection()
    message = str(caught.value)
    assert "field element_type has facet=False, expected True" in message
    assert "field sequence_number has type='string', expected 'int32'" in message
    assert "field element_id is missing" in message
    assert "field owner is required by the collection" in message


def test_a_wrong_api_key_is_refused_clearly(typesense_server: Server, collection: str) -> None:
    index = TypesenseIndex([typesense_server.url], "wrong-key", collection)
    with pytest.raises(TypesenseRejectedError, match="refused the API key"):
        index.ensure_collection()


@pytest.mark.answer_shapes
def test_ensure_collection_creates_the_source_schema(index: TypesenseIndex) -> None:
    info: dict[str, Any] = index.client.collections[index.collection].retrieve()
    fields = {field["name"]: field for field in info["fields"]}
    assert fields["element_type"]["facet"] is True
    assert fields["sequence_number"]["sort"] is True
    assert fields["created_at"]["type"] == "string" and fields["created_at"]["sort"] is True
    assert fields["comment"]["optional"] is True
    assert index.ensure_collection() is False  # exists and matches: nothing to do


def test_the_idle_loop_wakes_on_a_commit_not_on_a_timer(
    db_path: Path, db: Database, index: TypesenseIndex
) -> None:
    # With the periodic recheck an hour away, only PRAGMA data_version can wake the loop.
    worker = daemon(db, [index], idle_recheck_s=3600)
    idle = threading.Event()
    wait_for_change = worker._wait_for_change

    def waiting(version: int, stop: threading.Event) -> None:
        idle.set()
        wait_for_change(version, stop)

    worker._wait_for_change = waiting  # type: ignore[method-assign]
    with running(worker, join_s=10) as thread:
        assert idle.wait(20), "the worker never went idle"
        app_connection(db_path).execute(ROW_SQL, make_row(42))
        wait_until(lambda: index.retrieve("42") is not None, timeout_s=20, what="the wake-up")
    assert not thread.is_alive()  # stop ends the idle wait promptly
