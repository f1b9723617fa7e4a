"""The daemon as a real process against a real Typesense: signals, crashes, concurrency,
outages. These are the promises an operator relies on."""

import fcntl
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from outbox_sync.db import FIRST_READ_ROWS, Database
from outbox_sync.localserver import LocalTypesense, free_port, port_in_use
from outbox_sync.mapping import SEQUENCES
from tests.support.app import ROW_SQL, app_connection, insert_rows, make_row, sqlite_documents
from tests.support.cli import ROOT, without_settings
from tests.support.daemon import Daemon
from tests.support.typesense import API_KEY, Server, export
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow


def pending(path: Path) -> int:
    return int(Database(path).counts(SEQUENCES)["pending"])


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda signum: signum.name
)
def test_sigterm_finishes_the_batch_and_exits_0(
    db_path: Path,
    start_daemon: Callable[..., Daemon],
    typesense_server: Server,
    collection: str,
    signum: signal.Signals,
) -> None:
    """SIGINT is Ctrl-C; SIGHUP a terminal closed (it killed the daemon without a word)."""
    insert_rows(db_path, range(1, 20_001))
    daemon = start_daemon("--batch-size", "500")
    wait_until(lambda: pending(db_path) < 19_000, what="the drain to start")
    daemon.process.send_signal(signum)
    assert daemon.wait() == 0
    (stopping,) = [event for event in daemon.events() if event["event"] == "stopping"]
    assert stopping["signal"] == signum.name
    assert daemon.logged("stopped")
    # whatever was acknowledged is in Typesense; the rest is still queued, nothing in between
    left = pending(db_path)
    synced = export(typesense_server, collection)
    assert len(synced) + left == 20_000
    assert (len(synced) - FIRST_READ_ROWS) % 500 == 0  # whole batches only (the first is smaller)
    expected = sqlite_documents(db_path)
    assert all(synced[doc_id] == expected[doc_id] for doc_id in synced)


def test_a_second_daemon_on_the_same_file_exits_with_a_clear_message(
    db_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    first = start_daemon()
    wait_until(lambda: first.logged("started"), what="the first daemon")
    second = start_daemon()
    assert second.wait() == 1
    assert f"another outbox-sync daemon (pid {first.process.pid}) is already running" in (
        second.output()
    )
    assert first.process.poll() is None


def test_sigkill_mid_batch_then_restart_loses_nothing(
    db_path: Path, start_daemon: Callable[..., Daemon], typesense_server: Server, collection: str
) -> None:
    conn = app_connection(db_path)
    insert_rows(conn, range(1, 30_001))
    conn.execute("DELETE FROM sequences WHERE id % 10 = 0")
    daemon = start_daemon("--batch-size", "1000")
    wait_until(lambda: pending(db_path) < 30_000, what="the drain to start")
    daemon.process.kill()
    daemon.wait()
    assert pending(db_path) > 0  # killed mid-stream
    assert start_daemon("--once").wait(120) == 0
    assert export(typesense_server, collection) == sqlite_documents(db_path)
    assert Database(db_path).counts(SEQUENCES)["sync_errors_open"] == 0


def test_writers_in_other_processes_during_a_drain(
    db_path: Path, start_daemon: Callable[..., Daemon], typesense_server: Server, collection: str
) -> None:
    insert_rows(db_path, range(1, 5_001))
    daemon = start_daemon("--batch-size", "200")
    writers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.writer", str(db_path), str(seed), "1500"],
            cwd=ROOT,
        )
        for seed in (1, 2, 3)
    ]
    assert [writer.wait(120) for writer in writers] == [0, 0, 0]
    wait_until(lambda: pending(db_path) == 0, what="the outbox to drain")
    assert export(typesense_server, collection) == sqlite_documents(db_path)
    assert Database(db_path).counts(SEQUENCES)["sync_errors_open"] == 0
    assert daemon.process.poll() is None


def test_typesense_restart_mid_stream_loses_nothing_and_records_no_errors(
    db_path: Path,
    start_daemon: Callable[..., Daemon],
    daemon_env: dict[str, str],
    private_typesense: LocalTypesense,
    collection: str,
) -> None:
    env = daemon_env | {"TYPESENSE_URL": private_typesense.url, "OUTBOX_SYNC_TIMEOUT": "2"}
    daemon = start_daemon("--batch-size", "300", env=env)
    conn = app_connection(db_path)
    insert_rows(conn, range(1, 3_001))
    wait_until(lambda: pending(db_path) < 3_000, what="the drain to start")
    # documents lost behind the daemon's back: after the outage it must find and restore them
    # (Typesense 0.24.1 itself loses writes it acknowledged just before a restart, under load)
    httpx.delete(
        f"{private_typesense.url}/collections/{collection}/documents",
        params={"filter_by": "id:[1,2,3,4,5]"},
        headers={"X-TYPESENSE-API-KEY": API_KEY},
    ).raise_for_status()
    private_typesense.stop()
    insert_rows(conn, range(3_001, 4_001))
    conn.execute("DELETE FROM sequences WHERE id % 9 = 0")
    wait_until(lambda: daemon.logged("sync_paused"), what="the daemon to notice the outage")
    assert pending(db_path) > 0
    private_typesense.start()
    wait_until(
        lambda: any(
            e.get("reason") == "outage" for e in daemon.events() if e["event"] == "audit_done"
        ),
        what="the audit after the outage",
    )
    wait_until(lambda: pending(db_path) == 0, what="the outbox to drain after the restart")
    server = Server(private_typesense.url, API_KEY)
    assert export(server, collection) == sqlite_documents(db_path)
    assert Database(db_path).counts(SEQUENCES)["sync_errors_open"] == 0
    assert daemon.logged("sync_resumed")
    assert API_KEY not in daemon.output()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_the_embedded_default_syncs_without_any_configuration(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    db_path = tmp_path / "sequences.db"
    env = without_settings(OUTBOX_SYNC_DB=str(db_path), OUTBOX_SYNC_EMBEDDED_PORT=str(free_port()))
    subprocess.run([sys.executable, "-m", "outbox_sync", "init"], env=env, cwd=ROOT, check=True)
    app_connection(db_path).execute(ROW_SQL, make_row(123, comment="Initial script creation"))
    daemon = start_daemon(env=env)
    wait_until(lambda: pending(db_path) == 0, what="the embedded sync")
    [started] = [e for e in daemon.events() if e["event"] == "embedded_typesense_starting"]
    key = (tmp_path / "sequences.db.typesense" / "api-key").read_text().strip()
    assert oct((tmp_path / "sequences.db.typesense" / "api-key").stat().st_mode & 0o777) == "0o600"
    documents = export(Server(str(started["url"]), key), "sequences")
    assert documents["123"]["comment"] == "Initial script creation"
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
    # the embedded server went down with the daemon
    assert not port_in_use(int(str(started["url"]).rsplit(":", 1)[1]))


# Stands in for the loop of `run`: it logs now and then; what matters is only whether the main
# thread is inside a log call when SIGTERM lands.
LOGGING_LOOP = r"""
import sys, time
import structlog
from outbox_sync import worker

def run(self, stop, *, once=False):
    log = structlog.get_logger("outbox_sync")
    print("LOGGING", flush=True)
    while not stop.is_set():
        log.info("filler", pad="x" * 2000)
        time.sleep(0.02)

worker.Worker.run = run
from outbox_sync.cli import entry
sys.argv = ["outbox-sync", "run"]
entry()
"""
F_SETPIPE_SZ = 1031  # fcntl: set a pipe's capacity (Linux)


def test_sigterm_while_a_log_line_waits_on_a_full_stderr_stops_the_daemon(
    daemon_env: dict[str, str],
) -> None:
    """journald falls behind for a moment: the main thread waits inside a log line, holding
    structlog's lock of stderr. SIGTERM's handler logged too, waiting on that lock in the same
    thread: the daemon never stopped (found by a hostile review)."""
    process = subprocess.Popen(
        [sys.executable, "-c", LOGGING_LOOP],
        env=daemon_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        fcntl.fcntl(process.stderr.fileno(), F_SETPIPE_SZ, 4096)
        assert process.stdout.readline().strip() == b"LOGGING"
        time.sleep(1.0)  # stderr is full: the main thread waits inside a log line
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        threading.Thread(target=process.stderr.read, daemon=True).start()  # read again
        assert process.wait(timeout=15) == 0
    finally:
        process.kill()
        process.wait()
