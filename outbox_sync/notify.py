"""sd_notify: tell systemd the daemon is ready, alive or stopping, by a datagram to
$NOTIFY_SOCKET. Outside systemd (no $NOTIFY_SOCKET) every call is a no-op."""

import os
import socket

import structlog

_failure_logged = False


def notify(message: str) -> bool:
    """Send `message` ("READY=1", "WATCHDOG=1", "STATUS=...") to systemd; False if not sent."""
    global _failure_logged
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # abstract socket: the name starts with a NUL byte
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as error:
        # Once: a broken socket stays broken, and the watchdog would repeat this every beat.
        if not _failure_logged:
            _failure_logged = True
            structlog.get_logger("outbox_sync").warning(
                "notify_failed",
                socket=os.environ["NOTIFY_SOCKET"],
                message=message,
                error=str(error),
                note="systemd is not told; further failures are not logged",
            )
        return False
    return True


def watchdog_interval_s() -> float | None:
    """How often to send WATCHDOG=1: half of $WATCHDOG_USEC, or None when the watchdog is off
    (unset, invalid, or meant for another process by $WATCHDOG_PID)."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


class Watchdog:
    """Sends WATCHDOG=1 at most once per `interval_s`. Call `beat(now)` from the loop itself, so
    a stuck loop stops the pings and systemd restarts the daemon."""

    def __init__(self, interval_s: float | None) -> None:
        self.interval_s = interval_s
        self.next_beat = float("-inf")

    def beat(self, now: float) -> None:
        if self.interval_s is None or now < self.next_beat:
            return
        notify("WATCHDOG=1")
        self.next_beat = now + self.interval_s
