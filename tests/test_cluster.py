"""A real three-node Typesense cluster on loopback: the daemon fails over between nodes when the
leader is killed while writes flow, losing nothing and recording no sync_errors."""

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from outbox_sync.db import Database
from outbox_sync.localserver import LocalTypesense, free_port
from outbox_sync.mapping import SEQUENCES
from tests.support.app import app_connection, insert_rows, sqlite_documents
from tests.support.daemon import Daemon
from tests.support.typesense import API_KEY, Server, discard, export
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow

LEADER_STATE = 1  # /debug "state" of the Raft leader


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[LocalTypesense]]:
    ports = [(free_port(), free_port()) for _ in range(3)]
    nodes_file = tmp_path / "nodes"
    nodes_file.write_text(",".join(f"127.0.0.1:{peer}:{api}" for api, peer in ports))
    servers = [
        LocalTypesense(
            tmp_path / f"node{i}",
            api_key=API_KEY,
            port=api,
            peering_port=peer,
            extra_args=(f"--nodes={nodes_file}",),
        )
        for i, (api, peer) in enumerate(ports)
    ]
    try:
        for server in servers:
            server.start(wait=False)
        for server in servers:
            server.wait_ready(timeout_s=90)
        wait_until(lambda: leader(servers) is not None, timeout_s=90, what="a leader")
        yield servers
    finally:
        for server in servers:
            discard(server)


def state(server: LocalTypesense) -> int | None:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        response = httpx.get(
            f"{server.url}/debug", headers={"X-TYPESENSE-API-KEY": API_KEY}, timeout=2
        )
        return int(response.json()["state"])
    return None


def leader(servers: list[LocalTypesense]) -> LocalTypesense | None:
    return next((s for s in servers if s.process and state(s) == LEADER_STATE), None)


def test_killing_the_leader_while_writes_flow_loses_nothing(
    db_path: Path,
    cluster: list[LocalTypesense],
    start_daemon: Callable[..., Daemon],
    daemon_env: dict[str, str],
    collection: str,
) -> None:
    env = daemon_env | {
        "TYPESENSE_URL": ",".join(server.url for server in cluster),
        "OUTBOX_SYNC_TIMEOUT": "2",
    }
    daemon = start_daemon("--batch-size", "200", env=env)
    db = Database(db_path)
    stop_writing = threading.Event()
    written = 0

    def write() -> None:
        nonlocal written
        conn = app_connection(db_path)
        while not stop_writing.is_set() or written < 2_000:
            insert_rows(conn, range(written + 1, written + 21))
            written += 20
            stop_writing.wait(0.02)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        wait_until(
            lambda: written >= 500 and db.counts(SEQUENCES)["pending"] < written,
            timeout_s=60,
            what="syncing to start",
        )
        first = leader(cluster)
        assert first is not None and first.process is not None
        discard(first)
        survivors = [server for server in cluster if server is not first]
        wait_until(lambda: leader(survivors) is not None, timeout_s=90, what="a new leader")
        at_kill = written
        wait_until(lambda: written >= at_kill + 500, what="writes to go on")
    finally:
        stop_writing.set()
        writer.join()
    wait_until(lambda: db.counts(SEQUENCES)["pending"] == 0, timeout_s=120, what="the drain")
    reader = Server(survivors[0].url, API_KEY)
    wait_until(
        lambda: export(reader, collection) == sqlite_documents(db_path),
        timeout_s=30,
        what="the followers to catch up",
    )
    assert db.counts(SEQUENCES)["sync_errors_open"] == 0
    assert daemon.process.poll() is None
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert API_KEY not in daemon.output()
