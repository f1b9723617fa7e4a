"""`outbox-sync check`: one state per test, in the Nagios plugin convention (exit 0 OK,
1 WARNING, 2 CRITICAL, 3 UNKNOWN, one line with performance data), against a real Typesense."""

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from outbox_sync import health
from outbox_sync.db import Database, SyncFailure
from outbox_sync.localserver import free_port
from outbox_sync.lock import DaemonLock
from outbox_sync.reconcile import LAST_AUDIT_KEY, AuditRecord
from outbox_sync.typesense_index import TypesenseIndex
from tests.support.app import ROW_SQL, app_connection, make_row
from tests.support.characters import initialized_characters
from tests.support.cli import invoke
from tests.support.typesense import Server


@pytest.fixture
def running(db_path: Path, index: TypesenseIndex) -> Iterator[DaemonLock]:
    """The daemon's lock held, as by a running daemon; the collection exists."""
    with DaemonLock(db_path) as lock:
        yield lock


def check(
    server: Server, db_path: Path, collection: str, *args: str, **env: str
) -> tuple[int, str]:
    result = invoke(["check", *args], server, db_path, collection, **env)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output  # one line, as monitors read it
    return result.exit_code, lines[0]


def audited(db: Database, **changes: object) -> None:
    record = AuditRecord(
        reason="schedule",
        finished_at="2026-01-01T00:00:00Z",
        finished_unix=time.time(),
        ok=True,
        consistent=True,
        drift={"missing": 0, "extra": 0, "stale": 0, "invalid": 0},
        enqueued=0,
        duration_s=0.1,
    )
    db.set_meta(LAST_AUDIT_KEY, json.dumps(asdict(record) | changes))


@pytest.mark.usefixtures("running")
def test_ok(typesense_server: Server, db_path: Path, collection: str) -> None:
    code, line = check(typesense_server, db_path, collection)
    assert code == 0, line
    assert line.startswith("OUTBOX-SYNC OK - daemon ")
    assert "| lag=0s;60;60 pending=0 errors_open=0" in line


def test_no_daemon_is_critical(
    typesense_server: Server, db_path: Path, collection: str, index: TypesenseIndex
) -> None:
    code, line = check(typesense_server, db_path, collection)
    assert (code, line.split(" - ")[0]) == (2, "OUTBOX-SYNC CRITICAL")
    assert "no daemon runs on this database" in line


@pytest.mark.usefixtures("running")
def test_typesense_down_is_critical(
    typesense_server: Server, db_path: Path, collection: str
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    code, line = check(typesense_server, db_path, collection, TYPESENSE_URL=down)
    assert code == 2 and "Typesense does not answer" in line


@pytest.mark.usefixtures("running")
def test_missing_triggers_are_critical(
    typesense_server: Server, db_path: Path, collection: str
) -> None:
    app_connection(db_path).execute("DROP TRIGGER sequences_outbox_update")
    code, line = check(typesense_server, db_path, collection)
    assert code == 2 and "sequences_outbox_update is missing" in line


@pytest.mark.usefixtures("running")
def test_a_missing_table_is_critical(
    typesense_server: Server, db_path: Path, collection: str
) -> None:
    app_connection(db_path).execute("DROP TABLE sequences")
    code, line = check(typesense_server, db_path, collection)
    assert code == 2 and "table sequences is gone" in line


@pytest.mark.usefixtures("running")
def test_a_change_waiting_past_max_lag_is_critical(
    typesense_server: Server, db_path: Path, collection: str
) -> None:
    conn = app_connection(db_path)
    conn.execute(ROW_SQL, make_row(1))
    conn.execute("UPDATE outbox SET enqueued_at = enqueued_at - 90")
    code, line = check(typesense_server, db_path, collection, "--max-lag", "2m")
    assert code == 0, line  # 90 s is within 2 minutes
    code, line = check(typesense_server, db_path, collection)
    assert code == 2 and "the oldest change has waited 90 s (> 60 s)" in line
    assert "pending=1" in line


@pytest.mark.usefixtures("running")
def test_open_sync_errors_are_a_warning(
    typesense_server: Server, db_path: Path, collection: str, db: Database
) -> None:
    failure = SyncFailure(
        outbox_id=1,
        mapping="sequences",
        key=7,
        op="upsert",
        document=None,
        http_status=None,
        error="comment: is NULL",
        attempts=1,
    )
    db.ack(0, [], [failure])
    code, line = check(typesense_server, db_path, collection)
    assert (code, line.split(" - ")[0]) == (1, "OUTBOX-SYNC WARNING")
    assert "1 open sync error |" in line


@pytest.mark.usefixtures("running")
@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({}, None),
        (
            {"consistent": False, "drift": {"missing": 3, "extra": 0}, "enqueued": 3},
            "the last audit found drift (3 missing) and repaired it",
        ),
        (
            {"consistent": False, "drift": {"missing": 0, "shared": 2}, "enqueued": 2},
            "the last audit found drift (2 shared) and repaired it (a shared key is one more "
            "than one row holds: make it unique)",
        ),
        ({"ok": False, "error": "Typesense unreachable"}, "the last audit failed"),
        ({"finished_unix": time.time() - 80 * 3600}, "the last audit is 80 h old"),
    ],
)
def test_the_last_audit(
    typesense_server: Server,
    db_path: Path,
    collection: str,
    db: Database,
    changes: dict[str, object],
    says: str | None,
) -> None:
    audited(db, **changes)
    code, line = check(typesense_server, db_path, collection)
    assert code == (0 if says is None else 1), line
    assert says is None or says in line


def test_a_check_that_cannot_run_is_unknown(
    typesense_server: Server, tmp_path: Path, collection: str, db_path: Path
) -> None:
    code, line = check(typesense_server, tmp_path / "missing.db", collection)
    assert code == 3 and line.startswith("OUTBOX-SYNC UNKNOWN - database ")
    code, line = check(typesense_server, db_path, collection, "--max-lag", "soon")
    assert code == 3 and "--max-lag 'soon' must be a duration" in line
    code, line = check(typesense_server, db_path, collection, "--no-such-option")
    assert code == 3 and "No such option '--no-such-option'" in line


@pytest.mark.usefixtures("running")
def test_json(typesense_server: Server, db_path: Path, collection: str) -> None:
    app_connection(db_path).execute("DROP TRIGGER sequences_outbox_delete")
    result = invoke(["check", "--json"], typesense_server, db_path, collection)
    figures = json.loads(result.output)
    assert result.exit_code == 2
    assert figures["status"] == "CRITICAL" and figures["triggers_ok"] is False
    assert figures["trigger_problems"] == ["sequences_outbox_delete is missing"]
    assert figures["summary"].startswith("OUTBOX-SYNC CRITICAL - ")


def test_a_key_column_without_its_index_is_a_warning(tmp_path: Path) -> None:
    # what a rebuild of character_tags leaves while no daemon runs to make the index again
    path = tmp_path / "characters.db"
    conn, mapping, db = initialized_characters(path)
    figures = health.gather(db, [], [mapping], DaemonLock(path))
    assert figures["key_indexes_ok"] is True and "unindexed_keys" not in figures
    conn.execute("DROP INDEX outbox_sync_character_tags_slug")
    figures = health.gather(db, [], [mapping], DaemonLock(path))
    assert figures["key_indexes_ok"] is False
    assert figures["unindexed_keys"] == ["character_tags(slug)"]
    _, line = health.verdict(figures, max_lag_s=60, max_audit_age_s=3600)
    assert "no index on character_tags(slug): every lookup scans;" in line
    conn.execute("DROP TABLE character_tags")  # a table gone says so, and nothing of its index
    figures = health.gather(db, [], [mapping], DaemonLock(path))
    assert figures["table_ok"] is False and figures["key_indexes_ok"] is None
    conn.close()


def test_a_reindex_holding_the_daemon_lock_is_no_daemon(
    typesense_server: Server, db_path: Path, index: TypesenseIndex, collection: str
) -> None:
    # `outbox-sync reindex` run while no daemon runs holds the daemon lock: `check` and
    # `status` took it for a daemon syncing, and a second reindex waited 60 s for it to answer
    assert invoke(["reindex"], typesense_server, db_path, collection).exit_code == 0
    lock_file = DaemonLock(db_path).path
    assert lock_file.read_text() == f"{os.getpid()} reindex\n"
    with DaemonLock(db_path, role="reindex"):
        code, line = check(typesense_server, db_path, collection)
        assert code == 2
        assert (
            f"no daemon runs on this database (reindex (pid {os.getpid()}) holds its lock)" in line
        )
        status = invoke(["status", "--json"], typesense_server, db_path, collection)
        figures = json.loads(status.output)
        assert figures["daemon_pid"] is None
        assert figures["lock_holder"] == f"reindex (pid {os.getpid()})"
        started = time.monotonic()
        again = invoke(["reindex"], typesense_server, db_path, collection)
        assert again.exit_code == 1 and time.monotonic() - started < 10
        assert f"`outbox-sync reindex` (pid {os.getpid()}) is working this database" in again.output
    with DaemonLock(db_path):  # a daemon's lock: as before, a daemon
        figures = json.loads(
            invoke(["status", "--json"], typesense_server, db_path, collection).output
        )
        assert figures["daemon_pid"] == str(os.getpid()) and "lock_holder" not in figures


def test_an_audit_record_narrowed_to_collections_it_did_not_cover_is_none() -> None:
    # `status --collection NEW`, a mapping added after the daemon's last audit: that audit
    # never looked at it, so it says nothing of it (it read "consistent")
    parts = {
        "sequences": {"drift": {"missing": 2, "extra": 0}, "enqueued": 2},
        "characters": {"drift": {"missing": 0, "extra": 1}, "enqueued": 1},
    }
    record = AuditRecord(
        reason="schedule",
        finished_at="2026-01-01T00:00:00Z",
        finished_unix=0.0,
        ok=True,
        consistent=False,
        drift={"missing": 2, "extra": 1},
        enqueued=3,
        duration_s=0.1,
        collections=parts,
    )
    assert record.of(["places"]) is None
    characters = record.of(["characters"])
    assert characters is not None
    assert (characters.drift, characters.enqueued) == ({"missing": 0, "extra": 1}, 1)
    both = record.of(["sequences", "characters"])
    assert both is not None and (both.drift, both.consistent) == (record.drift, False)
    failed = AuditRecord(**(asdict(record) | {"ok": False, "error": "Typesense down"}))
    assert failed.of(["places"]) is failed  # a failed audit is one for every collection
