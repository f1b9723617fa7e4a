"""Audits are a property of the daemon: at start and every --audit-every, in the background,
repairing what they find, logged, exported as metrics and shown by `status`; changes keep
flowing while one runs; `audit --max-lag` does not call a stalled outbox consistent."""

import json
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from outbox_sync import reconcile
from outbox_sync import worker as worker_module
from outbox_sync.audit import Audit
from outbox_sync.db import Database
from outbox_sync.localserver import LocalTypesense, free_port
from outbox_sync.lock import DaemonLock
from outbox_sync.typesense_index import RestartWatch, TypesenseIndex
from outbox_sync.worker import Stop, daemon
from tests.support.app import ROW_SQL, app_connection, make_row, sqlite_documents
from tests.support.cli import invoke
from tests.support.daemon import Daemon, drain, running
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.typesense import Server, by_hand, export
from tests.support.wait import wait_until


def events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in daemon.output().splitlines() if line.startswith("{")]
    return [entry for entry in found if entry.get("event") == name]


def synced(server: Server) -> int:
    """The documents of `sequences`; 0 while the daemon has not made the collection yet (the
    export answers 404: a test that polled it failed when its daemon started slowly)."""
    try:
        return len(export(server, "sequences"))
    except httpx.HTTPStatusError as error:
        if error.response.status_code != 404:
            raise
        return 0


@pytest.mark.slow
def test_the_daemon_audits_on_schedule_repairs_and_reports(
    db_path: Path,
    start_daemon: Callable[..., Daemon],
    typesense_server: Server,
    collection: str,
) -> None:
    app_connection(db_path).executemany(ROW_SQL, [make_row(i) for i in range(1, 21)])
    metrics = f"127.0.0.1:{free_port()}"
    daemon = start_daemon("--audit-every", "2s", "--metrics-address", metrics)
    wait_until(lambda: events(daemon, "audit_done"), what="the audit at start")
    assert events(daemon, "audit_done")[0]["reason"] == "start"
    wait_until(lambda: len(export(typesense_server, collection)) == 20, what="the sync")
    # behind the daemon's back, while it is idle: one document gone, one that has no row
    path = f"/collections/{collection}/documents"
    by_hand(typesense_server, "DELETE", path, params={"filter_by": "id:[5]"})
    by_hand(typesense_server, "POST", path, json=make_document(999))
    wait_until(
        lambda: any(e["enqueued"] for e in events(daemon, "audit_done")),
        what="a scheduled audit to find the drift",
    )
    [found] = [e for e in events(daemon, "audit_done") if e["enqueued"]]
    assert found["reason"] == "schedule" and found["consistent"] is False
    assert found["drift"] == {"missing": 1, "extra": 1, "stale": 0, "invalid": 0, "shared": 0}
    assert found["enqueued"] == 2
    wait_until(
        lambda: export(typesense_server, collection) == sqlite_documents(db_path),
        what="the repair",
    )
    scraped = httpx.get(f"http://{metrics}/metrics").text
    assert f'outbox_sync_audit_drift{{collection="{collection}",kind="missing"}} 1.0' in scraped
    assert "outbox_sync_audit_last_success_timestamp_seconds 0.0" not in scraped
    status = invoke(["status", "--json"], typesense_server, db_path, collection)
    last = json.loads(status.output)["last_audit"]
    assert last["reason"] in ("schedule", "start") and last["ok"] is True
    assert json.loads(status.output)["daemon_pid"] == str(daemon.process.pid)
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0


def make_document(key: int) -> dict[str, Any]:
    _, kind, element, number, comment, created = make_row(key)
    return {
        "id": str(key),
        "element_type": kind,
        "element_id": element,
        "sequence_number": number,
        "comment": comment,
        "created_at": created,
    }


def test_changes_keep_flowing_while_an_audit_runs(
    db_path: Path, db: Database, index: TypesenseIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, release = threading.Event(), threading.Event()

    class HeldAudit(Audit):
        """An audit that stops half-way until the test lets it go on."""

        def _load_expected(self, give_up: Callable[[], bool] = lambda: False) -> int:
            started.set()
            assert release.wait(60)
            return super()._load_expected(give_up)

    monkeypatch.setattr(reconcile, "Audit", HeldAudit)
    app = app_connection(db_path)
    app.executemany(ROW_SQL, [make_row(i) for i in range(1, 101)])
    worker = daemon(db, [index], audit_every_s=3600)  # audits at start
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        assert started.wait(30), "the audit at start never began"
        app.execute(ROW_SQL, make_row(500, comment="written while the audit runs"))
        wait_until(lambda: index.retrieve("500"), what="the change, during the audit")
        assert not release.is_set()  # the audit is still held: it held nothing up
        release.set()
        beside = Database(db_path)  # the worker's thread has `db`: its raw reads cross ours
        wait_until(lambda: reconcile.last_audit(beside), what="the audit to finish")
    finally:
        release.set()
        stop.set()
        thread.join(30)
    assert reconcile.last_audit(db) is not None
    assert reconcile.last_audit(db).consistent  # type: ignore[union-attr]


def test_audit_does_not_call_a_stalled_outbox_consistent(
    db_path: Path, index: TypesenseIndex, typesense_server: Server, collection: str
) -> None:
    conn = app_connection(db_path)
    conn.execute(ROW_SQL, make_row(1))  # no daemon: it waits in the outbox
    fresh = invoke(["audit"], typesense_server, db_path, collection)
    assert fresh.exit_code == 0, fresh.output  # waiting records are not drift
    conn.execute("UPDATE outbox SET enqueued_at = enqueued_at - 700")
    stalled = invoke(["audit"], typesense_server, db_path, collection)
    assert stalled.exit_code == 1
    assert re.search(r"stalled: the oldest change has waited 70[01] s", stalled.output)
    lenient = invoke(["audit", "--max-lag", "1h"], typesense_server, db_path, collection)
    assert lenient.exit_code == 0, lenient.output


def test_a_loop_run_again_after_a_stop_audits_again(
    db: Database, index: TypesenseIndex, typesense_server: Server, collection: str
) -> None:
    worker = daemon(db, [index], audit_every_s=0)
    drain(worker)  # its end stops the audits
    app_connection(Path(db.path)).execute(ROW_SQL, make_row(1))
    drain(worker)
    by_hand(typesense_server, "DELETE", f"/collections/{collection}/documents/1")  # lost
    worker.after_outage()  # what an outage asks for
    drain(worker)
    record = reconcile.last_audit(db)
    assert record is not None and (record.reason, record.ok) == ("outage", True)
    assert record.drift["missing"] == 1 and "1" in export(typesense_server, collection)


def test_an_audit_owed_when_the_daemon_stops_is_done_at_its_next_start(
    db: Database, index: TypesenseIndex, typesense_server: Server, collection: str
) -> None:
    """An outage asks for an audit; the daemon stops before it is done (SIGTERM, or while it
    started the embedded server again). With --audit-every 0 no start audit followed: what
    the restart lost stayed missing until someone ran `outbox-sync audit`. It is owed: kept
    in the database, done at the next start, whatever the schedule."""
    app_connection(Path(db.path)).execute(ROW_SQL, make_row(1))
    drain(daemon(db, [index], audit_every_s=0))
    by_hand(typesense_server, "DELETE", f"/collections/{collection}/documents/1")  # lost
    worker = daemon(db, [index], audit_every_s=0)
    worker.after_outage()  # asked for...
    worker.jobs["audit"].at_stop()  # ...and the loop ends before its turn
    assert db.get_meta(reconcile.AUDIT_OWED_KEY) == "outage"
    drain(daemon(db, [index], audit_every_s=0))  # the next start
    record = reconcile.last_audit(db)
    assert record is not None and (record.reason, record.ok) == ("outage", True)
    assert "1" in export(typesense_server, collection)
    assert db.get_meta(reconcile.AUDIT_OWED_KEY) is None  # paid


def test_an_audit_that_fails_after_an_outage_is_asked_again(
    db_path: Path, typesense_server: Server, collection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Typesense restarts and lost a document: once /health answers, the daemon audits. That
    audit met a 503 of its own (the export, the server still lagging) while the loop's probes
    passed, and nothing asked again: the document stayed missing until the schedule, never
    with --audit-every 0 (found by a hostile review)."""
    monkeypatch.setattr(reconcile, "AUDIT_RETRY_S", 0.5)
    app_connection(db_path).executemany(ROW_SQL, [make_row(i) for i in range(1, 6)])
    with FaultProxy(typesense_server.url) as proxy:
        index = TypesenseIndex([proxy.url], typesense_server.api_key, collection, timeout_s=5)
        index.ensure_collection()
        db = Database(db_path)
        worker = daemon(db, [index], min_backoff_s=0.05, max_backoff_s=0.1, audit_every_s=0)
        stop = Stop()
        try:

            def turns(seconds: float) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    worker.loop(time.monotonic(), stop)
                    time.sleep(0.02)

            turns(0.5)
            assert len(export(typesense_server, collection)) == 5
            by_hand(typesense_server, "DELETE", f"/collections/{collection}/documents/3")
            proxy.add(Fault("status", status=503, path="/health", times=1))  # the outage
            proxy.add(Fault("status", status=503, path="/documents/export", times=4))
            worker.probe_at = float("-inf")
            turns(2.0)
            assert worker.typesense_down is False  # the outage is over, its audit failed
            assert "3" not in export(typesense_server, collection)
            proxy.clear()
            turns(4.0)
        finally:
            worker.jobs["audit"].run.stop()
            db.close()
            stop.close()
    assert "3" in export(typesense_server, collection)


def watching_restarts(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The loop's own health probe at start only, so a restart falls between two; the restart
    watch looking every 0.1 s. Returns what each of its looks found, as they come."""
    monkeypatch.setattr(worker_module, "HEALTH_PROBE_INTERVAL_S", 3600.0)
    monkeypatch.setattr(worker_module, "RESTART_WATCH_INTERVAL_S", 0.1)
    looks: list[list[str]] = []
    lost = RestartWatch.lost
    monkeypatch.setattr(RestartWatch, "lost", lambda *args: looks.append(lost(*args)) or looks[-1])
    return looks


def test_a_second_restart_within_ten_minutes_is_audited_too(
    db_path: Path, private_typesense: LocalTypesense, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Typesense restarts twice within RESTART_WATCH_FLAP_S (an OOM kill and systemd's restart,
    twice; a crash loop; two config changes): each restart may lose acknowledged writes. The
    watch takes the second loss for a proxy closing connections, turns itself off for the rest
    of the daemon's life, and asks no audit for that restart: what it lost stays missing until
    the schedule (never with --audit-every 0), and every later restart goes unseen too."""
    looks = watching_restarts(monkeypatch)
    app_connection(db_path).executemany(ROW_SQL, [make_row(i) for i in range(1, 6)])
    server = Server(private_typesense.url, private_typesense.api_key)
    index = TypesenseIndex([server.url], server.api_key, "sequences")
    db = Database(db_path)
    with running(daemon(db, [index], audit_every_s=0)):
        wait_until(lambda: synced(server) == 5, what="the sync")
        for lost in ("3", "4"):
            seen = len(looks)
            wait_until(lambda seen=seen: len(looks) >= seen + 2, what="the watch's connection")
            by_hand(server, "DELETE", f"/collections/sequences/documents/{lost}")  # lost
            private_typesense.stop()
            private_typesense.start()
            wait_until(
                lambda lost=lost: lost in export(server, "sequences"),
                timeout_s=20,
                what=f"the audit to put back document {lost} the restart lost",
            )


def test_a_restart_between_two_health_probes_is_seen_and_audited(
    db_path: Path, private_typesense: LocalTypesense, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Typesense restarts while the daemon is idle, between two of its health probes, and comes
    back short (0.24.1 can lose writes it acknowledged): no request failed, so the loop saw no
    outage, and nothing audited before the schedule. The restart watch's connection was closed
    by the stop: the daemon says so and audits, and the document comes back."""
    looks = watching_restarts(monkeypatch)
    app_connection(db_path).executemany(ROW_SQL, [make_row(i) for i in range(1, 6)])
    server = Server(private_typesense.url, private_typesense.api_key)
    index = TypesenseIndex([server.url], server.api_key, "sequences")
    db = Database(db_path)
    with capture_logs() as logged, running(daemon(db, [index], audit_every_s=0)):
        wait_until(lambda: synced(server) == 5, what="the sync")
        wait_until(lambda: len(looks) >= 2, what="the watch's connection")
        by_hand(server, "DELETE", "/collections/sequences/documents/3")  # what the restart lost
        private_typesense.stop()
        private_typesense.start()
        wait_until(lambda: "3" in export(server, "sequences"), what="the audit's repair")
    assert [look for look in looks if look] == [[server.url]]
    [restarted] = [entry for entry in logged if entry["event"] == "typesense_restarted"]
    assert restarted["nodes"] == [server.url]
    assert [e["reason"] for e in logged if e["event"] == "audit_done"] == ["typesense restart"]


def test_a_node_the_restart_watch_cannot_watch_is_shown_by_status(
    db_path: Path, typesense_server: Server, collection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a proxy that closes each connection, the watch turns itself off for that node:
    a blind spot only the scheduled audit covers, which a warning in the log alone left
    unseen by whoever runs `status`. The running daemon's, not an earlier one's."""
    watching_restarts(monkeypatch)
    with FaultProxy(typesense_server.url) as proxy, DaemonLock(db_path):
        proxy.http_version("HTTP/1.0")  # a connection per request
        index = TypesenseIndex([proxy.url], typesense_server.api_key, collection)
        db = Database(db_path)

        def status() -> dict[str, Any]:
            shown = invoke(["status", "--json"], typesense_server, db_path, collection)
            # the daemon runs in this process: its warning may land in the output captured
            (line,) = [line for line in shown.output.splitlines() if '"daemon_pid"' in line]
            return dict(json.loads(line))

        with running(daemon(db, [index], audit_every_s=0)):
            figures = wait_until(lambda: status().get("restarts_unwatched"), what="the node")
        db.close()
    assert figures == [f"{proxy.url} (it closes each connection after its answer)"]
    assert "restarts_unwatched" not in status()  # its daemon stopped: a new one watches


def test_a_restart_after_an_outage_the_loop_saw_is_audited(
    db_path: Path, private_typesense: LocalTypesense, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Typesense is stopped and started: the loop sees the outage (a write fails) and audits.
    The watch, looking in the turn the outage ended, counted its new connection as a loss:
    a restart nobody saw minutes later was taken for a proxy closing connections (the second
    loss within 10 minutes), turned the watch off for good and was never audited (found by a
    review)."""
    looks = watching_restarts(monkeypatch)
    app = app_connection(db_path)
    app.executemany(ROW_SQL, [make_row(i) for i in range(1, 6)])
    server = Server(private_typesense.url, private_typesense.api_key)
    index = TypesenseIndex([server.url], server.api_key, "sequences")
    worker = daemon(Database(db_path), [index], audit_every_s=0, max_backoff_s=0.5)
    with capture_logs() as logged, running(worker):
        wait_until(lambda: synced(server) == 5, what="the sync")
        wait_until(lambda: len(looks) >= 2, what="the watch's connection")
        private_typesense.stop()  # an outage the loop sees: a write fails
        app.execute(ROW_SQL, make_row(6))
        wait_until(lambda: worker.typesense_down, what="the loop to see the outage")
        private_typesense.start()
        wait_until(lambda: any(e["event"] == "audit_done" for e in logged), what="its audit")
        seen = len(looks)
        wait_until(lambda: len(looks) >= seen + 3, what="the watch's new connection")
        by_hand(server, "DELETE", "/collections/sequences/documents/3")  # what it loses
        private_typesense.stop()
        private_typesense.start()
        wait_until(lambda: "3" in export(server, "sequences"), what="the audit's repair")
    watched = [e["event"] for e in logged if e["event"].startswith(("typesense_re", "restart_"))]
    assert watched == ["typesense_restarted"]
    assert [e["reason"] for e in logged if e["event"] == "audit_done"] == [
        "outage",
        "typesense restart",
    ]


def test_a_stop_during_run_once_does_not_wait_for_the_whole_audit(
    db_path: Path, typesense_server: Server, collection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run --once` finished its audit with no look at a stop: SIGTERM waited for the whole
    audit, minutes on a large collection (found by a hostile review). Now, as for the running
    daemon, at most STOP_WAIT_S for the audit to notice."""
    monkeypatch.setattr(reconcile, "STOP_WAIT_S", 1.0)
    app_connection(db_path).executemany(ROW_SQL, [make_row(i) for i in range(1, 6)])
    with FaultProxy(typesense_server.url) as proxy:
        index = TypesenseIndex([proxy.url], typesense_server.api_key, collection, timeout_s=30)
        index.ensure_collection()
        db = Database(db_path)
        worker = daemon(db, [index], min_backoff_s=0.05, audit_every_s=3600)
        proxy.add(Fault("delay", path="/documents/export", seconds=8, times=1))
        stop = Stop()
        thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"once": True})
        thread.start()
        time.sleep(1.5)  # the audit waits on its export
        asked = time.monotonic()
        stop.set()
        thread.join(30)
        took = time.monotonic() - asked
        db.close()
        stop.close()
    assert took < 3.0
