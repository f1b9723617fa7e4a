"""Sleep until the database file may have changed: inotify on its directory, else a slow poll.

A wake-up only means "maybe, look": `PRAGMA data_version` stays the truth. The loop checks it
after every `wait()`, whatever `wait()` returned:

    watch = ChangeWatch(db_path)   # log watch.mode (and watch.reason when it is "poll")
    while not stop.is_set() and db.data_version() == version:
        watch.wait(remaining_s)

A signal handler that stops the loop must also call `watch.interrupt()`: PEP 475 retries a
select() interrupted by a signal, so setting a flag alone leaves the wait running to its end.

Which events a commit raises (strace and inotify traces here, Linux 6.18, SQLite 3.x):
- WAL: write()s to `-wal`, then the wal-index header in `-shm` is updated through mmap, which
  raises no event. With synchronous=FULL (SQLite's and Python's default) an fsync sits in
  between, so the event comes *before* the commit is visible: 0.9 ms median, 5.8 ms p90, 10 ms
  p99, 50 ms at worst in 300 commits (0.05 ms with synchronous=NORMAL); 0.16-0.20 ms median
  on another day's disk. Hence the rechecks after every event (RECHECK_*).
- DELETE (rollback journal): `-journal` created, written, the main file written, then
  `-journal` unlinked: the unlink is the commit. While the journal has content no look-up is
  asked for (see _journal_busy). TRUNCATE and PERSIST end with a write to the journal.
- A checkpoint writes the main file; a new `-wal` or `-journal` is a creation in the
  directory. A watch on the directory sees the files come and go (creations, deletions,
  renames), and one on each file sees it written: a directory watch for writes too would wake
  us for every write to every file beside the database (a log, another database).
The daemon's own writes (its acknowledgements) raise the same events, and cannot be told from
another process's: each costs one burst of rechecks, ~16 look-ups, ~3 ms of CPU here
(tests/bench/idle.py).
"""

import contextlib
import ctypes
import errno
import os
import re
import select
import struct
import sys
import time
from pathlib import Path
from typing import Any

# Where no event can be had: ask SQLite this often. A look-up woken from sleep costs an idle
# loop ~170 us of CPU here (tests/bench/idle.py: 0.17 % of a core at 0.1 s), so 0.25 s keeps the
# whole daemon within the 0.2 % target, for +125 ms of lag on average on the rare systems that
# fall back here (and gentle on a network file system, where each look may be a round trip).
DEFAULT_FALLBACK_POLL_S = 0.25
# After an event, look at once, then again after RECHECK_MIN_S, and so on at intervals that
# grow with the time since the event (by RECHECK_GROWTH of it: a commit is seen at most 50 %
# later than it became visible) until RECHECK_WINDOW_S, because the commit that wrote to the
# WAL may still be in its fsync (above: 0.2-0.9 ms median, up to 50 ms). That makes 19 look-ups
# per burst of events (0, 0.1, 0.2, 0.3, 0.45, 0.68 ... 131 ms); a commit slower than the window
# is seen at the caller's timeout or the next event. With a first recheck at 0.5 ms, a commit
# whose fsync took 0.2 ms was seen 0.3 ms late: 0.1 ms cut the wake-up p50 from 0.32 to 0.16 ms
# (tests/bench/idle.py), for ~2 more look-ups per own write (16 against 14).
RECHECK_MIN_S = 0.0001
RECHECK_GROWTH = 0.5
# While a rollback journal holds looks back (see _journal_busy), recheck it no more often than
# this when no event comes (the writer's pages bring checks as any event does). Its unlink
# (the commit) comes before the writer lets go of its lock: with synchronous=FULL the
# directory is fsync'ed in between, and a look then sleeps 1 ms in SQLite's busy handler.
# Checks 0.1 ms apart, each pacing the next look by LOOK_PACE_S, made the wake-up p50 0.59 ms
# in DELETE mode, against 0.33 ms with these (tests/bench/idle.py).
HELD_RECHECK_S = 0.0005
RECHECK_WINDOW_S = 0.1
# Events that keep coming bring looks spaced as the rechecks after an event are, counted from
# the first of them, and no closer than this once that spacing reaches it (a writer streaming
# pages into the WAL): today's 1 ms poll, no more. Spacing every event's look this far from the
# last one held back the look that saw a commit: a commit writes its pages one write() each,
# so its next page's event came while the look the first one brought found nothing yet, and
# the commit was seen 1 ms after that look (wake-up p99 0.9-1.5 ms in WAL mode with
# synchronous=NORMAL; 0.25-0.32 ms since, tests/bench/idle.py).
LOOK_PACE_S = 0.001

# inotify(7). Not IN_ACCESS/IN_OPEN/IN_CLOSE_*: readers (our own included) would wake us.
IN_MODIFY = 0x2  # a write to the database, -wal or -journal (or a truncation): on each file
IN_MOVED_TO = 0x80  # the database replaced by a rename (a restore)
IN_CREATE = 0x100  # a -wal or -journal created
IN_DELETE = 0x200  # -journal unlinked: the commit point in DELETE mode
IN_Q_OVERFLOW = 0x4000  # the kernel dropped events: something happened
IN_IGNORED = 0x8000  # the watch is gone (directory deleted, file system unmounted)
IN_ONLYDIR = 0x1000000
DIRECTORY_EVENTS = IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_ONLYDIR
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
# Enough for ~1,500 events; more stay queued and the next read takes them.
READ_SIZE = 64 * 1024
# File systems where another host may write the file: its commits raise no event here.
REMOTE_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "virtiofs", "ceph", "glusterfs", "lustre"}
    | {"afs", "gpfs", "fuse.sshfs", "fuse.glusterfs", "fuse.s3fs"}
)


class ChangeWatch:
    """Wakes the loop when the database file (or its -wal or -journal) may have changed.

    `mode` is "inotify" or "poll"; `reason` says why it polls. Use it from one thread;
    `interrupt()` from any thread or a signal handler."""

    def __init__(
        self,
        db_path: Path,
        *,
        use_inotify: bool = True,
        poll_interval_s: float = DEFAULT_FALLBACK_POLL_S,
    ) -> None:
        # SQLite resolves a symlinked database and puts -wal and -journal beside the target.
        path = Path(db_path).resolve()
        self._directory = path.parent
        self._names = {os.fsencode(path.name) + suffix for suffix in (b"", b"-wal", b"-journal")}
        self._journal = Path(f"{path}-journal")
        self._deferred_since: float | None = None  # since when looks wait for the journal
        self.poll_interval_s = poll_interval_s
        self.mode, self.reason = "poll", "inotify switched off"
        self._looked_at = time.monotonic()  # when wait() last returned: the caller looked
        self._event_at = float("-inf")  # when the last event about the database was read
        self._burst_at = float("-inf")  # when the events that keep coming began
        self._inotify = self._directory_wd = -1
        self._file_wds: set[int] = set()  # the watches on the files of `_names` that exist
        self._libc: Any = None
        # select() below: these descriptors are opened with the daemon, far below its limit
        # (FD_SETSIZE, 1024); poll() would do, but counts in milliseconds.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)  # interrupt() must never block
        if use_inotify:
            failure = self._watch_directory()
            self.mode, self.reason = ("poll", failure) if failure else ("inotify", "")

    def _watch_directory(self) -> str | None:
        """Start inotify on the database's directory and its files; None, or why not."""
        directory = self._directory
        fs = filesystem_type(directory)
        if fs in REMOTE_FILESYSTEMS:
            return f"{directory} is on {fs}: another host's commits raise no inotify event"
        libc = inotify_libc()
        if libc is None:
            return f"no inotify on {sys.platform}"
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:  # EMFILE: fs.inotify.max_user_instances reached
            return f"inotify_init1: {os.strerror(ctypes.get_errno())}"
        self._directory_wd = libc.inotify_add_watch(fd, os.fsencode(directory), DIRECTORY_EVENTS)
        if self._directory_wd < 0:
            error = ctypes.get_errno()  # ENOSPC: fs.inotify.max_user_watches reached
            os.close(fd)
            return f"inotify_add_watch {directory}: {os.strerror(error)}"
        self._inotify, self._libc = fd, libc
        for name in self._names:
            if failure := self._watch_file(name):
                self._stop_inotify(failure)
                return failure
        return None

    def _watch_file(self, name: bytes) -> str | None:
        """Watch the writes to one of the database's files, if it exists; None, or why not."""
        path = os.fsencode(self._directory) + b"/" + name
        wd = self._libc.inotify_add_watch(self._inotify, path, IN_MODIFY)
        if wd >= 0:
            self._file_wds.add(wd)
            return None
        error = ctypes.get_errno()
        if error == errno.ENOENT:  # not there (yet): its creation is an event of the directory
            return None
        return f"inotify_add_watch {os.fsdecode(path)}: {os.strerror(error)}"

    def wait(self, timeout_s: float) -> bool:
        """Block until the file may have changed, `interrupt()` is called or `timeout_s` has
        passed; False in the last case only. Then ask SQLite whether something changed."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            if self._read_events():
                if self._quiet():
                    self._burst_at = now
                self._event_at = now
            look_at = self._next_look()
            if look_at <= now and self._journal_busy(now):
                self._looked_at = now  # a look of our own: it paces the next ones all the same
                continue
            if look_at <= now or deadline <= now:
                self._looked_at = now
                return look_at <= now
            # An event cannot bring a look-up closer than _pace() after the last one: until
            # then sleep on the wake-up pipe alone, so a writer streaming pages into the WAL
            # does not wake us for every write().
            fds = [self._wake_r]
            if self._inotify >= 0 and look_at > self._looked_at + self._pace():
                fds.append(self._inotify)
            readable, _, _ = select.select(fds, [], [], min(look_at, deadline) - now)
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)  # every interrupt so far: one wake-up
                self._looked_at = time.monotonic()
                return True

    def _next_look(self) -> float:
        """When the caller should look next: at once after a new event, but no sooner than
        _pace() after the last look, then again and again until RECHECK_WINDOW_S (see
        RECHECK_*)."""
        if self.mode == "poll":
            return self._looked_at + self.poll_interval_s
        if self._event_at > self._looked_at:
            return max(self._event_at, self._looked_at + self._pace())
        age = self._looked_at - self._event_at
        if age > RECHECK_WINDOW_S:
            return float("inf")
        shortest = RECHECK_MIN_S if self._deferred_since is None else HELD_RECHECK_S
        return self._looked_at + max(shortest, age * RECHECK_GROWTH)

    def _pace(self) -> float:
        """How soon after the last look an event may bring the next one (see LOOK_PACE_S)."""
        if self._quiet():
            return RECHECK_MIN_S
        age = self._looked_at - self._burst_at
        return min(LOOK_PACE_S, max(RECHECK_MIN_S, age * RECHECK_GROWTH))

    def _quiet(self) -> bool:
        """Whether no event came in the last LOOK_PACE_S before the last look: the next one
        begins a burst. Judged at the look, not when the next is read: a wake-up that comes
        late (a busy machine) must not end a burst whose writer wrote on meanwhile."""
        return self._looked_at - self._event_at > LOOK_PACE_S

    def _journal_busy(self, now: float) -> bool:
        """Whether a rollback-journal transaction is writing (its -journal has content) and
        has not been at it for RECHECK_WINDOW_S yet. Looking now would take a read lock that
        holds its commit back, and sleep in SQLite's busy handler (measured, DELETE mode at
        50 commits/s: wake-up p50 259 ms against 34 ms for the 1 ms poll); the unlink of
        the journal (its commit) raises an event instead. The cap is for PERSIST mode, whose
        journal keeps content, and for a hot journal left by a crash."""
        try:
            busy = os.stat(self._journal).st_size > 0
        except FileNotFoundError:
            busy = False
        if not busy:
            self._deferred_since = None
            return False
        if self._deferred_since is None:
            self._deferred_since = now
        return now - self._deferred_since < RECHECK_WINDOW_S

    def _read_events(self) -> bool:
        """Take every pending event in one read; whether one concerns the database."""
        if self._inotify < 0:
            return False
        try:
            data = os.read(self._inotify, READ_SIZE)
        except BlockingIOError:
            return False
        relevant, offset = False, 0
        while offset < len(data):
            wd, mask, _, length = EVENT.unpack_from(data, offset)
            name = data[offset + EVENT.size : offset + EVENT.size + length].rstrip(b"\0")
            offset += EVENT.size + length
            if mask & IN_IGNORED and wd != self._directory_wd:
                self._file_wds.discard(wd)  # a file of ours deleted: a new one is a creation
            elif mask & IN_IGNORED:
                self._stop_inotify("the watch on the directory ended (deleted or unmounted?)")
                return True
            elif wd in self._file_wds or mask & IN_Q_OVERFLOW:
                relevant = True
            elif name in self._names:
                relevant = True
                # a new -wal or -journal (or database): watch its writes from now on; those
                # before are seen by the look this event brings
                if mask & (IN_CREATE | IN_MOVED_TO) and (failure := self._watch_file(name)):
                    self._stop_inotify(failure)
                    return True
        return relevant

    def _stop_inotify(self, reason: str) -> None:
        os.close(self._inotify)  # its watches with it
        self._inotify = self._directory_wd = -1
        self._file_wds.clear()
        self.mode, self.reason = "poll", reason

    def interrupt(self) -> None:
        """End the current or the next `wait()` at once. Async-signal-safe (one write to a
        pipe): call it from the SIGTERM handler or another thread."""
        # BlockingIOError: the pipe is full, so a wake-up is pending anyway; EBADF: closed.
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def close(self) -> None:
        """Close the watch's file descriptors; `interrupt()` afterwards does nothing."""
        fds = (self._inotify, self._wake_r, self._wake_w)
        self._inotify = self._wake_r = self._wake_w = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> "ChangeWatch":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def inotify_libc() -> Any:
    """libc with inotify_init1 and inotify_add_watch, or None (not Linux, or no such calls)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        return None
    return libc


def filesystem_type(path: Path) -> str:
    """The type of the file system holding `path` ("ext4", "nfs4"...), from the longest mount
    point above it in /proc/self/mountinfo; "" where unknown."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    target, found, fstype = str(path), "", ""
    for line in lines:
        fields = line.split()
        # mountinfo escapes blanks and backslashes in paths as \ooo
        mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(found):  # a later mount hides an earlier one
            found, fstype = mount_point, fields[fields.index("-") + 1]
    return fstype
