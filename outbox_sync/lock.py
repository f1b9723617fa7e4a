"""One daemon per database file: an exclusive flock on a file beside it.

The lock is named after the database's real path (symlinks and `..` resolved): two daemons
reaching one file by two spellings would otherwise both apply, and could leave an older state
of a record in Typesense. A lock on a name cannot follow a file renamed while the daemon runs:
the daemon stops at its loop's next check (once a second, between batches) when its path no
longer names the file it opened (`Database.check_same_file`), so a daemon on the new name
soon works it alone.
"""

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import IO, NamedTuple

from outbox_sync.db import file_identity
from outbox_sync.errors import AlreadyRunningError, DatabaseError

# A reader (`check`, `status`) takes the lock shared for a moment to see whether a daemon holds
# it: a daemon starting at that very moment waits this long before concluding another one runs.
ACQUIRE_PATIENCE_S = 1.0


class Holder(NamedTuple):
    """Who holds the lock, as its file says."""

    pid: str  # "unknown" if it wrote none
    role: str  # "daemon", or "reindex": `outbox-sync reindex` run while no daemon ran


class DaemonLock:
    """An exclusive flock on a file beside the database. The kernel drops it when the process
    dies, so a crashed daemon never leaves a stale lock. The holder writes its pid and role."""

    def __init__(self, db_path: Path, role: str = "daemon") -> None:
        real = db_path.resolve()
        self.path = real.with_name(real.name + ".outbox-sync.lock")
        self.role = role
        self._file: IO[str] | None = None

    def acquire(self, patience_s: float = ACQUIRE_PATIENCE_S) -> None:
        try:
            handle = open(self.path, "a+")  # noqa: SIM115 - held for the daemon's lifetime
        except OSError as error:
            raise DatabaseError(
                f"cannot create the daemon's lock file {self.path}: {error.strerror}"
            ) from None
        deadline = time.monotonic() + patience_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                handle.seek(0)
                holder = parse_holder(handle.read())
                handle.close()
                raise AlreadyRunningError(busy(holder, self.path), holder.role) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {self.role}\n")
        handle.flush()
        self._file = handle

    def check(self) -> None:
        """While held: the lock file's name must still name the file locked. Removed or
        replaced (an operator clearing "a stale lock", a cleanup job), a second daemon would
        lock a new file there and run beside this one: take the name back if nobody has, else
        stop (DatabaseError)."""
        if self._file is None:
            return
        held = os.fstat(self._file.fileno())
        if file_identity(self.path) == (held.st_dev, held.st_ino):
            return
        old, self._file = self._file, None
        try:
            self.acquire(patience_s=0.0)
        except (AlreadyRunningError, DatabaseError) as error:
            self._file = old
            raise DatabaseError(
                f"the daemon's lock file {self.path} was removed or replaced while it ran, and "
                f"it could not take it back ({error}): stopping, so that one daemon works the "
                "file"
            ) from None
        old.close()

    def holder(self) -> Holder | None:
        """Who holds the lock, or None when nobody does. Creates nothing: works on a read-only
        directory."""
        try:
            handle = open(self.path)  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return None  # no daemon ever ran here
        except OSError as error:
            raise DatabaseError(
                f"cannot read the lock file {self.path}: {error.strerror}"
            ) from None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return parse_holder(handle.read())
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
            return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "DaemonLock":
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def parse_holder(text: str) -> Holder:
    """The lock file's "PID ROLE" (a daemon before roles wrote its pid alone)."""
    pid, _, role = text.strip().partition(" ")
    return Holder(pid or "unknown", role or "daemon")


def busy(holder: Holder, lock_path: Path) -> str:
    if holder.role == "daemon":
        return (
            f"another outbox-sync daemon (pid {holder.pid}) is already running on this database "
            f"(lock {lock_path}); stop it first, only one may work a file at a time"
        )
    return (
        f"`outbox-sync {holder.role}` (pid {holder.pid}) is working this database (lock "
        f"{lock_path}); wait for it to finish, only one process may work a file at a time"
    )
