"""Running as a service: Prometheus metrics and /healthz from a live daemon, and the systemd
notify protocol over a real datagram socket."""

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from outbox_sync.db import Database
from outbox_sync.localserver import LocalTypesense, free_port
from outbox_sync.mapping import SEQUENCES
from tests.support.app import ROW_SQL, app_connection, insert_rows, make_row
from tests.support.daemon import Daemon
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def healthz(url: str) -> tuple[int, dict[str, str]]:
    response = httpx.get(f"{url}/healthz", timeout=5)
    return response.status_code, response.json()


def test_metrics_match_what_happened_and_healthz_follows_typesense(
    db_path: Path,
    start_daemon: Callable[..., Daemon],
    daemon_env: dict[str, str],
    private_typesense: LocalTypesense,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = daemon_env | {
        "TYPESENSE_URL": private_typesense.url,
        "OUTBOX_SYNC_METRICS_ADDRESS": f"127.0.0.1:{port}",
        "OUTBOX_SYNC_TIMEOUT": "2",
    }
    conn = app_connection(db_path)
    insert_rows(conn, range(1, 81))  # with what follows, 91 entries: the first claim's 100
    conn.execute("DELETE FROM sequences WHERE id <= 10")
    conn.execute(ROW_SQL, make_row(500, element_id="not a number"))
    started = time.time()
    daemon = start_daemon(env=env)
    wait_until(lambda: Database(db_path).counts(SEQUENCES)["pending"] == 0, what="the drain")

    def settled() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        metrics = scrape(url)
        return metrics if metrics[("outbox_sync_sync_errors_open", ())] == 1 else None

    metrics = wait_until(settled, what="the backlog gauges to refresh")
    # one batch saw the final state: 70 rows to index, 10 deleted, 1 invalid
    applied = "outbox_sync_documents_applied_total"
    assert metrics[(applied, (("operation", "upsert"),))] == 70
    assert metrics[(applied, (("operation", "delete"),))] == 10
    assert metrics[("outbox_sync_documents_failed_total", (("reason", "validation"),))] == 1
    assert metrics[("outbox_sync_outbox_pending", ())] == 0
    assert metrics[("outbox_sync_outbox_oldest_age_seconds", ())] == 0
    assert metrics[("outbox_sync_typesense_up", ())] == 1
    assert metrics[("outbox_sync_last_success_timestamp_seconds", ())] >= started
    imports = (
        "outbox_sync_typesense_request_duration_seconds_count",
        (("operation", "import"), ("outcome", "ok")),
    )
    assert metrics[imports] >= 1
    assert healthz(url) == (200, {"status": "ok", "reason": "ok"})

    private_typesense.stop()
    _, body = wait_until(
        lambda: (r := healthz(url))[0] == 503 and r,
        timeout_s=30,
        what="/healthz to notice the outage",
    )
    assert body["status"] == "unhealthy" and "typesense" in body["reason"]
    assert scrape(url)[("outbox_sync_typesense_up", ())] == 0
    private_typesense.start()
    wait_until(lambda: healthz(url)[0] == 200, timeout_s=30, what="/healthz to recover")
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_the_wal_a_reader_holds_back_is_in_the_metrics(
    db_path: Path, start_daemon: Callable[..., Daemon], daemon_env: dict[str, str]
) -> None:
    """The daemon measures it at its first turn, then every minute, only when it serves
    /metrics (a PASSIVE checkpoint each time)."""
    port = free_port()
    reader = app_connection(db_path)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM sequences").fetchone()
    insert_rows(db_path, range(1, 2001))
    daemon = start_daemon(env=daemon_env | {"OUTBOX_SYNC_METRICS_ADDRESS": f"127.0.0.1:{port}"})
    wait_until(lambda: Database(db_path).counts(SEQUENCES)["pending"] == 0, what="the drain")
    held = scrape(f"http://127.0.0.1:{port}")[("outbox_sync_database_wal_uncheckpointed_bytes", ())]
    assert held > 100_000
    reader.execute("COMMIT")
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_notify_protocol_ready_watchdog_status_stopping(
    tmp_path: Path, db_path: Path, start_daemon: Callable[..., Daemon], daemon_env: dict[str, str]
) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(30)
        env = daemon_env | {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
        daemon = start_daemon(env=env)
        received: list[str] = []

        def receive_until(message: str) -> None:
            while message not in received:
                received.append(sock.recv(4096).decode())

        receive_until("READY=1")
        receive_until("WATCHDOG=1")
        app_connection(db_path).execute(ROW_SQL, make_row(1))
        while not any(m.startswith("STATUS=backlog") for m in received):
            received.append(sock.recv(4096).decode())
        count = received.count("WATCHDOG=1")
        while received.count("WATCHDOG=1") < count + 3:  # keeps beating while idle
            received.append(sock.recv(4096).decode())
        daemon.process.send_signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert daemon.wait() == 0
    assert received.index("READY=1") < received.index("STOPPING=1")
    statuses = [m for m in received if m.startswith("STATUS=")]
    assert statuses and "open errors" in statuses[-1]
