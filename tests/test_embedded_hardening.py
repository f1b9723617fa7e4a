"""The embedded Typesense `outbox-sync run` starts without a TYPESENSE_URL, as a hostile review
tried it: its files edited or removed, signals while it starts, the on-call commands beside it."""

import contextlib
import json
import os
import shutil
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from outbox_sync.localserver import LocalTypesense, free_port
from tests.support.app import insert_rows
from tests.support.cli import error_lines, run_module, without_settings
from tests.support.daemon import Daemon
from tests.support.typesense import Server, export
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow


def embedded_env(tmp_path: Path) -> dict[str, str]:
    return without_settings(
        OUTBOX_SYNC_DB=str(tmp_path / "sequences.db"),
        OUTBOX_SYNC_EMBEDDED_PORT=str(free_port()),
    )


def servers_of(data_dir: Path) -> list[int]:
    """The typesense-server processes running on `data_dir` (whoever their parent is): each
    runs in its directory, given `--data-dir=data` (see LocalTypesense._command)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                cwd = (entry / "cwd").resolve(strict=True)
            except OSError:
                continue
            if b"--data-dir=data" in argv and cwd == data_dir.resolve():
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize(
    "key",
    ["clé-secrète-0123456789", "0123456789abcdef\nNOTE-a3f9 added by hand"],
    ids=["non-ascii", "two-lines"],
)
def test_an_embedded_api_key_no_header_can_carry_is_one_clear_line(
    tmp_path: Path, key: str
) -> None:
    """An api-key file edited by hand into a key no HTTP header can carry: the daemon died with
    a UnicodeEncodeError traceback, or (a second line) waited for ever as if Typesense were
    unreachable, `run --once` included, writing the key into its log. A key from
    TYPESENSE_API_KEY or --api-key-file is refused so, never echoed."""
    env = embedded_env(tmp_path)
    assert run_module(["init"], env=env).returncode == 0
    data_dir = tmp_path / "sequences.db.typesense"
    data_dir.mkdir()
    (data_dir / "api-key").write_text(key + "\n")
    result = run_module(["run", "--once"], env=env, timeout_s=15)
    assert result.returncode == 1, result.stderr
    [line] = error_lines(result.stderr)
    assert "Traceback" not in result.stderr
    assert f"API key in {data_dir / 'api-key'}" in line
    assert "NOTE-a3f9" not in result.stderr and "secrète" not in result.stderr
    assert not servers_of(data_dir)


def test_sigterm_while_the_embedded_server_starts_stops_the_daemon_at_once(
    tmp_path: Path,
) -> None:
    """SIGTERM (or Ctrl-C) while `run` waited for its embedded server to be ready was left
    for after the wait: up to 60 s, past systemd's TimeoutStopSec with the stop's own time. The
    loop's waits for a server it starts again end at once; this one did not. The server, its
    peering port taken while the daemon was down, is ready only after ~12.5 s."""
    env = embedded_env(tmp_path)
    assert run_module(["init"], env=env).returncode == 0
    assert run_module(["run", "--once"], env=env).returncode == 0  # raft state to wait for
    data_dir = tmp_path / "sequences.db.typesense"
    peering_port = json.loads((data_dir / "ports.json").read_text())["peering_port"]
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", peering_port))
        squatter.listen()
        daemon = Daemon(env, tmp_path / "daemon.log")
        try:
            wait_until(lambda: servers_of(data_dir), timeout_s=30, what="the server's start")
            daemon.process.send_signal(signal.SIGTERM)
            code = daemon.wait(8)  # well before the server is ready
        finally:
            daemon.kill()
    assert code == 0, daemon.output()
    assert not error_lines(daemon.output())
    assert not daemon.logged("started")  # it never began to sync
    wait_until(lambda: not servers_of(data_dir), timeout_s=10, what="the server to be gone")


def test_the_on_call_commands_reach_the_embedded_server_where_the_daemon_started_it(
    tmp_path: Path,
) -> None:
    """`run --embedded-port P` (the move its own port-in-use error advises): `status`, `check`
    and `search`, run without that flag, went to the default port and said the embedded server
    was down, "start the daemon", while the daemon ran and synced. The server's port is kept
    in its data directory (ports.json)."""
    env = embedded_env(tmp_path)  # OUTBOX_SYNC_EMBEDDED_PORT: what the commands are given
    assert run_module(["init"], env=env).returncode == 0
    insert_rows(tmp_path / "sequences.db", [1])
    daemon = Daemon(env, tmp_path / "daemon.log", "--embedded-port", str(free_port()))
    try:

        def status() -> dict[str, Any]:
            result = run_module(["status", "--json"], env=env)
            assert result.returncode == 0, result.stderr
            return dict(json.loads(result.stdout))

        wait_until(lambda: daemon.logged("audit_done"), timeout_s=30, what="the daemon's start")
        figures = status()
        assert figures["daemon_pid"] is not None
        assert (figures["typesense_ok"], figures["documents"]) == (True, 1), figures
        found = run_module(["search", "comment"], env=env)
        assert found.returncode == 0, found.stderr
        assert "comment number 1" in found.stdout
    finally:
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0


def test_an_embedded_data_directory_removed_while_the_daemon_was_down_is_filled_again(
    tmp_path: Path,
) -> None:
    """The embedded server's data directory damaged (it exits at start, "see typesense.log")
    and removed, as one does, while the daemon was down: the daemon started a new empty
    server, made the collection, and with --audit-every 0 nothing ever put the rows back: every
    record synced before stayed unsearchable, `status` and `check` none the wiser."""
    env = embedded_env(tmp_path)
    assert run_module(["init"], env=env).returncode == 0
    insert_rows(tmp_path / "sequences.db", range(1, 6))
    assert run_module(["run", "--once", "--audit-every", "0"], env=env).returncode == 0
    data_dir = tmp_path / "sequences.db.typesense"
    key = (data_dir / "api-key").read_text().strip()
    shutil.rmtree(data_dir)
    assert run_module(["run", "--once", "--audit-every", "0"], env=env).returncode == 0
    with LocalTypesense(data_dir) as server:  # on the ports the daemon saved: quick
        assert server.api_key != key  # a new server indeed
        held = export(Server(server.url, server.api_key), "sequences")
    assert sorted(held, key=int) == ["1", "2", "3", "4", "5"]


def refusal_lines(env: dict[str, str]) -> list[str]:
    """What `status`, `check` and `search` say of the embedded server's key, one line each."""
    status = run_module(["status", "--json"], env=env)
    assert status.returncode == 0, status.stderr
    check = run_module(["check"], env=env)
    assert check.returncode == 2, check.stdout + check.stderr  # CRITICAL
    search = run_module(["search", "comment"], env=env)
    assert search.returncode == 1, search.stdout
    return [json.loads(status.stdout)["typesense_error"], check.stdout, *error_lines(search.stderr)]


@pytest.mark.parametrize("edit", ["rotated", "removed"])
def test_an_api_key_file_changed_under_the_running_daemon_is_said_so(
    tmp_path: Path, edit: str
) -> None:
    """The api-key file rotated or removed while the daemon runs: its server keeps the key it
    was started with, so `status`, `check` and `search` were refused (401) and advised to
    "check TYPESENSE_API_KEY or --api-key-file", which nobody had set. They say what changed
    and what to do: put the key back, or restart the daemon."""
    env = embedded_env(tmp_path)
    assert run_module(["init"], env=env).returncode == 0
    key_file = tmp_path / "sequences.db.typesense" / "api-key"
    daemon = Daemon(env, tmp_path / "daemon.log")
    try:
        wait_until(lambda: daemon.logged("audit_done"), timeout_s=30, what="the daemon's start")
        if edit == "rotated":
            key_file.write_text("a-rotated-key-0123456789abcdef\n")
            changed = f"runs with another key than {key_file} holds now"
        else:
            key_file.unlink()
            changed = f"{key_file}, where `outbox-sync run` keeps it, is gone"
        port = env["OUTBOX_SYNC_EMBEDDED_PORT"]
        for line in refusal_lines(env):
            assert f"the embedded Typesense on 127.0.0.1:{port}" in line and changed in line, line
            assert "restart the daemon" in line and "TYPESENSE_API_KEY" not in line, line
    finally:
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0


def test_a_server_the_daemon_starts_again_keeps_its_key_whatever_the_file_holds(
    tmp_path: Path,
) -> None:
    """The embedded server dies after its api-key file was rotated: the daemon starts it again
    with the key it holds (a server started with the file's new key would refuse the daemon's
    clients, still on the old one, for the rest of its run), and keeps syncing; the on-call
    commands, on the new key, say the file changed (they said "check TYPESENSE_API_KEY")."""
    env = embedded_env(tmp_path)
    assert run_module(["init"], env=env).returncode == 0
    data_dir = tmp_path / "sequences.db.typesense"
    daemon = Daemon(env, tmp_path / "daemon.log", "--audit-every", "0")
    try:
        wait_until(lambda: daemon.logged("audit_done"), timeout_s=30, what="the daemon's start")
        key = (data_dir / "api-key").read_text().strip()
        (data_dir / "api-key").write_text("a-rotated-key-0123456789abcdef\n")
        [server] = servers_of(data_dir)
        os.kill(server, signal.SIGKILL)
        wait_until(lambda: daemon.logged("embedded_typesense_exited"), what="the restart")
        insert_rows(tmp_path / "sequences.db", [1])
        url = f"http://127.0.0.1:{env['OUTBOX_SYNC_EMBEDDED_PORT']}"

        def synced() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return "1" in export(Server(url, key), "sequences", timeout_s=5)
            return False

        wait_until(synced, what="the row synced through the restarted server, on the old key")
        assert not error_lines(daemon.output())
        for line in refusal_lines(env):
            assert f"runs with another key than {data_dir / 'api-key'} holds now" in line, line
    finally:
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
