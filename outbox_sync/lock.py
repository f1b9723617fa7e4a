"""One daemon per database file: an exclusive flock on a file beside it."""

import fcntl
import os
from pathlib import Path
from typing import IO

from outbox_sync.errors import AlreadyRunningError, DatabaseError


class DaemonLock:
    """An exclusive flock on a file beside the database. The kernel drops it when the process
    dies, so a crashed daemon never leaves a stale lock."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".outbox-sync.lock")
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        try:
            handle = open(self.path, "a+")  # noqa: SIM115 - held for the daemon's lifetime
        except OSError as error:
            raise DatabaseError(
                f"cannot create the daemon's lock file {self.path}: {error.strerror}"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise AlreadyRunningError(
                f"another outbox-sync daemon (pid {holder}) is already running on this database "
                f"(lock {self.path}); stop it first, only one may work a file at a time"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "DaemonLock":
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
