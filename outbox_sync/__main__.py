"""outbox-sync as a process: `python -m outbox_sync`, and the `outbox-sync` console script,
which imports `entry` from here."""

import gc

gc.disable()  # before the command line's imports too: see cli.entry

from outbox_sync.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry()
