"""`outbox-sync errors list|show|retry|resolve` on a real SQLite file, with the daemon's worker
applying retries to a real Typesense."""

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from outbox_sync import config_file, schema, sync_errors
from outbox_sync.cli import render
from outbox_sync.db import Database
from outbox_sync.mapping import SEQUENCES
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import daemon
from tests.support.app import ROW_SQL, app_connection, make_row
from tests.support.characters import (
    CHARACTERS,
    EXAMPLE,
    TAGS,
    characters_config,
    characters_index,
    initialized_characters,
    insert_not_utf8,
)
from tests.support.cli import invoke, one_line
from tests.support.daemon import drain, record_failure
from tests.support.typesense import Server, by_hand, refusing_collection


def errors(server: Server, db_path: Path, *args: str) -> Any:
    result = invoke(["errors", *args], server, db_path, "unused")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if "--json" in args else result.output


def test_list_filters_by_status_time_and_operation(
    db_path: Path, db: Database, typesense_server: Server
) -> None:
    record_failure(db, 1, 7, "bad field", document='{"id":"7"}', http_status=400, attempts=2)
    record_failure(db, 2, 8, "id: expected an integer", op="delete")
    record_failure(db, 3, 9, "comment: is 70000 bytes")
    db.ack(0, [("sequences", 9)], [])  # record 9 synced later: its error closes itself
    db.conn.execute("UPDATE sync_errors SET failed_at = '2020-01-01T00:00:00Z' WHERE id = 1")

    def ids(*args: str) -> list[int]:
        return [
            row["record_key"] for row in errors(typesense_server, db_path, "list", "--json", *args)
        ]

    assert ids() == [7, 8]
    assert ids("--status", "resolved") == [9]
    assert ids("--status", "all") == ids("--all") == [7, 8, 9]
    assert ids("--op", "delete") == [8]
    assert ids("--since", "1d") == [8]
    assert ids("--since", "2019-12-31", "--op", "upsert") == [7]
    assert ids("--since", "2020-01-01T00:00:01Z") == [8]
    table = errors(typesense_server, db_path, "list", "--all")
    assert "superseded" in table and "bad field" in table and "STATUS" in table
    assert "no open sync errors matching" in errors(
        typesense_server, db_path, "list", "--since", "1d", "--op", "upsert"
    )
    bad = invoke(["errors", "list", "--since", "last week"], typesense_server, db_path, "x")
    assert bad.exit_code == 2 and "is neither a duration" in bad.output
    both = invoke(["errors", "list", "--all", "--status", "open"], typesense_server, db_path, "x")
    assert both.exit_code == 2 and "--all means --status all" in both.output


def test_show_prints_everything_about_one_error(
    db_path: Path, db: Database, worker: daemon, typesense_server: Server
) -> None:
    app_connection(db_path).execute(ROW_SQL, make_row(4, sequence_number="four"))
    drain(worker)
    [error] = sync_errors.find(db)
    shown = errors(typesense_server, db_path, "show", str(error["id"]), "--json")
    assert shown["record_key"] == 4 and shown["http_status"] is None
    assert shown["error"] == "sequence_number: expected an integer, got text 'four'"
    assert json.loads(shown["document"])["sequence_number"] == "four"
    assert shown["attempts"] == 1 and shown["failed_at"] and shown["resolved_at"] is None
    assert shown["record_exists"] is True and shown["pending"] == 0
    text = errors(typesense_server, db_path, "show", str(error["id"]))
    assert f"sync error    {error['id']} (open)" in text
    assert "expected an integer, got text 'four'" in text
    assert '"sequence_number": "four"' in text  # the row, pretty-printed
    missing = invoke(["errors", "show", "99"], typesense_server, db_path, "x")
    assert "no sync error has id 99" in one_line(missing)


def test_an_error_closes_itself_when_the_application_fixes_the_row(
    db_path: Path, db: Database, worker: daemon, index: TypesenseIndex, typesense_server: Server
) -> None:
    app = app_connection(db_path)
    app.execute(ROW_SQL, make_row(4, sequence_number="four"))
    drain(worker)
    assert [e["record_key"] for e in errors(typesense_server, db_path, "list", "--json")] == [4]
    app.execute("UPDATE sequences SET sequence_number = 4 WHERE id = 4")
    drain(worker)
    assert errors(typesense_server, db_path, "list", "--json") == []
    [closed] = errors(typesense_server, db_path, "list", "--status", "resolved", "--json")
    assert closed["resolution"] == "superseded" and closed["resolved_at"]
    assert index.retrieve("4") is not None


def test_retry_resends_a_refused_record_once_the_collection_is_fixed(
    db_path: Path, db: Database, typesense_server: Server, collection: str
) -> None:
    refusing_collection(typesense_server, collection)
    index = TypesenseIndex([typesense_server.url], typesense_server.api_key, collection)
    worker = daemon(db, [index])
    app = app_connection(db_path)
    app.execute(ROW_SQL, make_row(1, comment=None))
    app.execute(ROW_SQL, make_row(2, comment="refused"))
    worker.applier.apply_once()
    [error] = sync_errors.find(db)
    assert (error["record_key"], error["http_status"], error["attempts"]) == (2, 400, 2)

    # retried before the cause is fixed: it fails again, and a new error row says so
    result = invoke(["errors", "retry", str(error["id"])], typesense_server, db_path, collection)
    assert result.exit_code == 0, result.output
    assert "record 2 of sequences: upsert enqueued as outbox entry" in result.output
    worker.applier.apply_once()
    [again] = sync_errors.find(db)
    assert again["id"] != error["id"] and again["record_key"] == 2
    first = sync_errors.get(db, error["id"], {"sequences": SEQUENCES})
    assert first["resolution"] == "retried" and "re-enqueued as outbox entry" in first["note"]

    # on-call rebuilds the collection with the right schema, then retries every open error
    by_hand(typesense_server, "DELETE", f"/collections/{collection}")
    index.ensure_collection()
    app.execute("UPDATE sequences SET comment = comment WHERE id = 1")  # re-send row 1 too
    result = invoke(["errors", "retry", "--all"], typesense_server, db_path, collection)
    assert result.exit_code == 0 and "1 records enqueued" in result.output
    worker.applier.apply_once()
    assert sync_errors.find(db) == []
    document = index.retrieve("2")
    assert document is not None and document["comment"] == "refused"
    history = [(e["id"], e["resolution"]) for e in sync_errors.find(db, status="all")]
    assert history == [(error["id"], "retried"), (again["id"], "retried")]  # nothing deleted


def test_retry_of_a_deleted_record_enqueues_a_delete(
    db_path: Path, db: Database, typesense_server: Server
) -> None:
    record_failure(db, 1, 5, "refused", document='{"id":"5"}', http_status=400, attempts=2)
    app_connection(db_path).execute(ROW_SQL, make_row(6))
    record_failure(db, 2, 6, "refused", document='{"id":"6"}', http_status=400, attempts=2)
    # a second open error of the same record, as a database from before one-open-error-per-
    # record may hold: retry closes them all
    db.conn.execute(
        "INSERT INTO sync_errors (outbox_id, mapping, record_key, op, document, http_status,"
        " error, attempts, failed_at) SELECT 3, mapping, record_key, op, document, http_status,"
        " error, attempts, failed_at FROM sync_errors WHERE id = 2"
    )
    db.conn.execute("DELETE FROM outbox")
    [five, six] = sync_errors.retry(db, {"sequences": SEQUENCES}, [1, 2])
    assert (five.key, five.op, five.closed_error_ids) == (5, "delete", (1,))
    assert (six.key, six.op, six.closed_error_ids) == (6, "upsert", (2, 3))
    outbox = db.conn.execute("SELECT id, record_key, op FROM outbox ORDER BY id").fetchall()
    assert outbox == [(five.outbox_id, 5, "delete"), (six.outbox_id, 6, "upsert")]
    closed = invoke(["errors", "retry", "2"], typesense_server, db_path, "x")
    assert "sync error 2 is already closed (retried)" in one_line(closed)
    neither = invoke(["errors", "retry"], typesense_server, db_path, "x")
    assert neither.exit_code == 2 and "or --all" in neither.output


def test_resolve_closes_by_hand_and_keeps_the_note(
    db_path: Path, db: Database, typesense_server: Server
) -> None:
    record_failure(db, 1, 7, "bad")
    record_failure(db, 2, 8, "bad")
    unknown = invoke(
        ["errors", "resolve", "1", "42", "--note", "x"], typesense_server, db_path, "x"
    )
    assert "no sync error has id 42" in one_line(unknown)
    assert len(sync_errors.find(db)) == 2  # all or nothing
    result = invoke(
        ["errors", "resolve", "1", "2", "--note", "row 7 fixed by hand in Typesense"],
        typesense_server,
        db_path,
        "x",
    )
    assert result.exit_code == 0 and "closed 2 sync errors" in result.output
    rows = sync_errors.find(db, status="all")
    assert [(r["resolution"], r["note"]) for r in rows] == [
        ("resolved", "row 7 fixed by hand in Typesense")
    ] * 2
    no_note = invoke(["errors", "resolve", "1"], typesense_server, db_path, "x")
    assert no_note.exit_code == 2 and "--note" in no_note.output


# -- found by a hostile review -------------------------------------------------------------------


def test_retry_all_with_collection_only_touches_that_collections_errors(
    tmp_path: Path, db_path: Path, db: Database
) -> None:
    """`errors list --collection` showed one mapping's errors, and `errors retry --all` then
    retried (and closed) every mapping's."""
    config = tmp_path / "outbox-sync.toml"
    config.write_text(EXAMPLE)
    _, mappings = config_file.load(config, {})
    app_connection(db_path).executescript(f"{CHARACTERS}; {TAGS};")
    schema.init(db, list(mappings))
    record_failure(db, 1, 7, "refused", http_status=400, attempts=2)  # mapping sequences
    record_failure(db, 2, "a", "refused", mapping="characters", http_status=400, attempts=2)
    env = {"OUTBOX_SYNC_CONFIG": str(config)}
    retried = invoke(["errors", "retry", "--all"], None, db_path, "characters", **env)
    assert retried.exit_code == 0, retried.output
    assert {e["mapping"] for e in sync_errors.find(db)} == {"sequences"}
    assert db.conn.execute("SELECT mapping, record_key FROM outbox").fetchall() == [
        ("characters", "a")
    ]


def test_retry_of_a_key_that_is_not_utf8_upserts_the_row_and_its_error_stays_open(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """sync_errors holds such a key as a BLOB, and the look-up of its row matched only a BLOB:
    `errors show` said the row was gone, and `errors retry` queued a delete, which the drain
    took for done: no error stayed open for the row still there (found by a review)."""
    path = tmp_path / "c.db"
    app, mapping, db = initialized_characters(path, collection)
    index = characters_index(db, mapping, typesense_server, collection)
    worker = daemon(db, [index])
    insert_not_utf8(app)
    drain(worker)
    [error] = sync_errors.find(db)
    assert error["error"] == "slug: is not valid UTF-8 (bad byte at offset 1)"
    config = tmp_path / "outbox-sync.toml"
    config.write_text(characters_config(collection))

    def oncall(*args: str) -> Any:
        env = {"OUTBOX_SYNC_CONFIG": str(config)}
        result = invoke(["errors", *args], typesense_server, path, collection, **env)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout) if "--json" in args else result.output

    shown = oncall("show", str(error["id"]), "--json")
    assert (shown["record_exists"], shown["pending"]) == (True, 0)
    assert "upsert enqueued" in oncall("retry", str(error["id"]))
    queued = app.execute("SELECT typeof(record_key), CAST(record_key AS BLOB), op FROM outbox")
    assert queued.fetchall() == [("text", b"A\xffB", "upsert")]
    assert oncall("show", str(error["id"]), "--json")["pending"] == 1
    drain(worker)
    [again] = sync_errors.find(db)
    assert again["id"] != error["id"]
    assert (again["record_key"], again["error"]) == (error["record_key"], error["error"])


def test_resolve_says_how_many_errors_it_closed(db_path: Path, db: Database) -> None:
    record_failure(db, 1, 7, "refused", http_status=400, attempts=2)
    result = invoke(["errors", "resolve", "1", "1", "--note", "fixed"], None, db_path)
    assert result.exit_code == 0, result.output
    assert len(sync_errors.find(db, status="resolved")) == 1
    assert result.output == "closed 1 sync error as resolved\n"


def test_errors_show_while_the_table_is_gone(db_path: Path, db: Database) -> None:
    """The daemon waits for a table that is gone; `errors show` ended in a traceback."""
    record_failure(db, 1, 7, "refused", http_status=400, attempts=2)
    app_connection(db_path).execute("DROP TABLE sequences")
    result = invoke(["errors", "show", "1", "--json"], None, db_path)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["record_exists"] is False


def test_since_before_the_year_1000_lists_every_error(db_path: Path, db: Database) -> None:
    """glibc writes the year 999 as '999', which sorts after every real time as text."""
    record_failure(db, 1, 7, "refused", http_status=400, attempts=2)
    result = invoke(["errors", "list", "--json", "--since", "0999-01-01"], None, db_path)
    assert result.exit_code == 0, result.output
    assert [e["record_key"] for e in json.loads(result.stdout)] == [7]


def test_prune_deletes_only_errors_closed_longer_ago_than_the_age(
    tmp_path: Path, db_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "outbox-sync.toml"
    config.write_text(EXAMPLE)
    _, mappings = config_file.load(config, {})
    app_connection(db_path).executescript(f"{CHARACTERS}; {TAGS};")
    schema.init(db, list(mappings))
    for outbox_id, key in enumerate([1, 2, 3, 4, 5, 6, 7], start=1):
        record_failure(db, outbox_id, key, "refused", http_status=400, attempts=2)
    record_failure(db, 8, "a", "refused", mapping="characters", http_status=400, attempts=2)
    record_failure(db, 9, "b", "refused", mapping="characters", http_status=400, attempts=2)
    sync_errors.resolve(db, [1, 2, 3, 4, 5, 8], "fixed")  # 6, 7 and 9 stay open
    old = "UPDATE sync_errors SET failed_at = '2020-01-01T00:00:00Z', resolved_at = ?"
    db.conn.execute(f"{old} WHERE id IN (1, 2, 3, 4, 6, 8, 9)", ("2020-01-02T00:00:00Z",))
    db.conn.execute("UPDATE sync_errors SET resolved_at = NULL WHERE id IN (6, 9)")
    env = {"OUTBOX_SYNC_CONFIG": str(config)}

    def prune(*args: str, collection: str | None = None) -> str:
        result = invoke(["errors", "prune", *args], None, db_path, collection, **env)
        assert result.exit_code == 0, result.output
        return result.output

    def left() -> list[int]:
        return [e["id"] for e in sync_errors.find(db, status="all")]

    assert prune("--older-than", "90d", "--dry-run").startswith("would delete 5 closed")
    assert left() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert prune("--older-than", "90d", collection="characters").startswith("deleted 1 ")
    assert left() == [1, 2, 3, 4, 5, 6, 7, 9]
    monkeypatch.setattr(sync_errors, "PRUNE_CHUNK", 2)  # 1, 2 | 3, 4 | none: three chunks
    assert prune("--older-than", "90d").startswith("deleted 4 closed sync errors (closed by")
    assert left() == [5, 6, 7, 9]  # closed today, and the open ones however old
    assert prune("--older-than", "0").startswith("deleted 1 ")
    assert left() == [6, 7, 9]
    record_failure(db, 10, 10, "refused", http_status=400, attempts=2)
    assert max(left()) == 10  # AUTOINCREMENT: no id comes back

    for bad, says in [
        ("soon", "is not a duration such as 90d"),
        ("99999999999w", "reaches back before 1970"),
    ]:
        result = invoke(["errors", "prune", "--older-than", bad], None, db_path, **env)
        assert result.exit_code == 2 and says in result.output
    missing = invoke(["errors", "prune"], None, db_path, **env)
    assert missing.exit_code == 2 and "--older-than" in missing.output
    assert left() == [6, 7, 9, 10]


def test_a_flood_of_errors_is_listed_a_page_at_a_time_and_limit_shows_the_oldest(
    db_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`errors list` read every row into memory before it printed one: 300,000 errors took
    380 MB, 880 MB with --json. They are read a page at a time now (more rows than one page
    here), and written in parts (a few lines each here); the output is what it was."""
    db.conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10003)"
        " INSERT INTO sync_errors (outbox_id, mapping, record_key, op, document, error,"
        " attempts, failed_at, resolved_at, resolution) SELECT i, 'sequences', i, 'upsert',"
        " '{\"id\":\"' || i || '\"}', 'refused: ' || i, 2, '2026-01-01T00:00:00Z',"
        " CASE WHEN i % 1000 = 0 THEN '2026-01-02T00:00:00Z' END,"
        " CASE WHEN i % 1000 = 0 THEN 'resolved' END FROM n"
    )
    monkeypatch.setattr(render, "ECHO_LINES", 7)
    rows = [row | {"collection": "sequences"} for row in sync_errors.find(db)]
    assert len(rows) == 9993 and rows[-1]["record_key"] == 10003

    def listed(*args: str) -> Result:
        result = invoke(["errors", "list", *args], None, db_path)
        assert result.exit_code == 0, result.output
        return result

    assert listed("--json").stdout == json.dumps(rows, default=str) + "\n"
    table = listed().stdout.splitlines()
    assert len(table) == 1 + 9993 and table[-1].split()[:3] == ["10003", "sequences", "10003"]
    assert listed("--all", "--json").stdout.count('"outbox_id"') == 10003
    read = []
    monkeypatch.setattr(sync_errors, "pages", _counted(sync_errors.pages, read))
    first = listed("--limit", "3")
    assert [len(page) for page in read] == [sync_errors.PAGE_ROWS]  # of 20: read as printed
    assert [line.split()[0] for line in first.stdout.splitlines()] == ["ID", "1", "2", "3"]
    assert "more sync errors match: these are the first 3 (--limit)" in first.stderr
    assert json.loads(listed("--limit", "2", "--json").stdout) == rows[:2]
    whole = listed("--status", "resolved", "--limit", "10", "--json")
    assert [e["record_key"] for e in json.loads(whole.stdout)] == list(range(1000, 10001, 1000))
    assert whole.stderr == ""  # exactly as many as match: nothing more to say
    assert listed("--status", "resolved", "--limit", "11").stderr == ""
    assert listed("--status", "resolved", "--limit", "9").stderr != ""


def _counted(pages: Any, read: list[list[Any]]) -> Any:
    """`pages` that keeps each page it yields in `read`."""

    def counting(*args: Any, **kwargs: Any) -> Any:
        for page in pages(*args, **kwargs):
            read.append(page)
            yield page

    return counting
