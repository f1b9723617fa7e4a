"""sd_notify against real datagram sockets, the way systemd listens."""

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from outbox_sync import notify as sd
from outbox_sync.notify import Watchdog, notify, watchdog_interval_s


def receive(listener: socket.socket) -> bytes:
    return listener.recv(4096)


def nothing_waiting(listener: socket.socket) -> bool:
    """True if no datagram is queued. Sending is synchronous: a sent one would be there."""
    timeout = listener.gettimeout()
    listener.setblocking(False)
    try:
        listener.recv(4096)
    except BlockingIOError:
        return True
    finally:
        listener.settimeout(timeout)
    return False


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sd, "_failure_logged", False)


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A socket bound to a file, as systemd's /run/systemd/notify."""
    address = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(address))
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(address))
        yield listener


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A socket in the abstract namespace, named "@..." in $NOTIFY_SOCKET."""
    name = f"outbox-sync-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield listener


def test_without_notify_socket_nothing_is_sent() -> None:
    with capture_logs() as logs:
        assert notify("READY=1") is False
    assert logs == []


@pytest.mark.parametrize(
    "message",
    ["READY=1", "WATCHDOG=1", "STOPPING=1", "STATUS=applied 5000 entries, 12 pending"],
)
def test_each_message_arrives_as_one_datagram(path_socket: socket.socket, message: str) -> None:
    assert notify(message) is True
    assert receive(path_socket) == message.encode()
    assert nothing_waiting(path_socket)


def test_abstract_socket(abstract_socket: socket.socket) -> None:
    assert notify("READY=1") is True
    assert receive(abstract_socket) == b"READY=1"


def test_several_assignments_in_one_message_and_utf8(path_socket: socket.socket) -> None:
    assert notify("READY=1\nSTATUS=synchronisé") is True
    assert receive(path_socket) == "READY=1\nSTATUS=synchronisé".encode()


def test_messages_keep_their_order(abstract_socket: socket.socket) -> None:
    for message in ("READY=1", "WATCHDOG=1", "STOPPING=1"):
        assert notify(message)
    assert [receive(abstract_socket) for _ in range(3)] == [
        b"READY=1",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]


def test_a_send_failure_is_logged_once_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with capture_logs() as logs:
        assert notify("READY=1") is False
        assert notify("WATCHDOG=1") is False
    assert len(logs) == 1
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["event"] == "notify_failed"
    assert logs[0]["socket"] == str(tmp_path / "nobody-listens")
    assert "No such file" in logs[0]["error"]


def test_a_closed_listener_is_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    address = tmp_path / "gone"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(address))
    monkeypatch.setenv("NOTIFY_SOCKET", str(address))  # the file stays, nobody receives
    with capture_logs() as logs:
        assert notify("READY=1") is False
    assert [entry["event"] for entry in logs] == ["notify_failed"]
    assert "refused" in logs[0]["error"]


@pytest.mark.parametrize(
    ("usec", "expected_s"),
    [("30000000", 15.0), ("1000000", 0.5), ("1", 0.0000005)],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    monkeypatch: pytest.MonkeyPatch, usec: str, expected_s: float
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert watchdog_interval_s() == pytest.approx(expected_s)


def test_watchdog_interval_for_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 15.0


@pytest.mark.parametrize(
    "environment",
    [
        {},  # no watchdog configured
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)},  # someone else's
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "30s"},
        {"WATCHDOG_USEC": ""},
    ],
)
def test_no_watchdog_interval(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert watchdog_interval_s() is None


def test_watchdog_beats_at_most_once_per_interval(path_socket: socket.socket) -> None:
    watchdog = Watchdog(15.0)
    watchdog.beat(100.0)
    assert receive(path_socket) == b"WATCHDOG=1"
    watchdog.beat(100.1)
    watchdog.beat(114.9)
    assert nothing_waiting(path_socket)
    watchdog.beat(115.0)
    assert receive(path_socket) == b"WATCHDOG=1"


def test_watchdog_off_sends_nothing(path_socket: socket.socket) -> None:
    watchdog = Watchdog(None)
    watchdog.beat(0.0)
    watchdog.beat(1e9)
    assert nothing_waiting(path_socket)
