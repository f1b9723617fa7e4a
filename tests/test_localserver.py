"""The embedded Typesense: restarts keep its ports."""

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from outbox_sync.errors import ConfigError
from outbox_sync.localserver import PORTS_FILE, LocalTypesense, free_port
from tests.conftest import API_KEY


@pytest.fixture
def stopped() -> Iterator[list[LocalTypesense]]:
    """Servers a test starts: stopped at the end whatever happens."""
    servers: list[LocalTypesense] = []
    yield servers
    for server in servers:
        server.stop()


def started(
    servers: list[LocalTypesense], data_dir: Path, port: int | None = None
) -> LocalTypesense:
    # a new object for each start, as each `outbox-sync run` makes one
    server = LocalTypesense(data_dir, api_key=API_KEY, port=port)
    servers.append(server)
    server.start()
    return server


@pytest.mark.slow
def test_a_restart_reuses_the_ports_kept_in_the_data_directory(
    tmp_path: Path, stopped: list[LocalTypesense]
) -> None:
    first = started(stopped, tmp_path, port=free_port())
    first.stop()
    saved = json.loads((tmp_path / PORTS_FILE).read_text())
    assert saved == {"api_port": first.port, "peering_port": first.peering_port}
    log_size = first.log_file.stat().st_size

    again = started(stopped, tmp_path)  # no port given: the saved ones
    assert (again.port, again.peering_port) == (first.port, first.peering_port)
    # a new peering port makes 0.24.1 wait ~12.5 s for this before it elects itself
    restart_log = first.log_file.read_bytes()[log_size:]
    assert b"Resetting peers" not in restart_log


@pytest.mark.slow
def test_a_saved_peering_port_taken_by_another_program_is_replaced(
    tmp_path: Path, stopped: list[LocalTypesense]
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        # as a previous start left it (a fresh directory: no raft state to wait for)
        (tmp_path / PORTS_FILE).write_text(json.dumps({"api_port": 1, "peering_port": taken}))
        server = started(stopped, tmp_path, port=free_port())
        assert server.peering_port != taken
    saved = json.loads((tmp_path / PORTS_FILE).read_text())
    assert saved == {"api_port": server.port, "peering_port": server.peering_port}


def test_an_explicit_peering_port_in_use_is_refused(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = LocalTypesense(tmp_path, api_key=API_KEY, port=free_port(), peering_port=taken)
        with pytest.raises(ConfigError, match=f"peering port {taken} .* already in use"):
            server.start()
