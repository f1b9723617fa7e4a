"""An application writing to the database from its own process: random inserts, updates,
deletes and id changes, each in its own transaction.

Usage: python -m tests.support.writer DB SEED N [STOP_FILE] -- N operations, then on until
STOP_FILE exists (when given)."""

import os
import random
import sqlite3
import sys

from tests.support.app import ROW_SQL, make_row


def write(path: str, seed: int, operations: int, stop_file: str | None = None) -> None:
    rng = random.Random(seed)
    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    base = seed * 1_000_000  # each writer owns its id range
    step = 0
    while step < operations or (stop_file and not os.path.exists(stop_file)):
        step += 1
        key = base + rng.randrange(500)
        choice = rng.random()
        if choice < 0.5:
            conn.execute(
                ROW_SQL.replace("INSERT", "INSERT OR REPLACE"),
                make_row(key, comment=f"w{seed} s{step}"),
            )
        elif choice < 0.75:
            conn.execute(
                "UPDATE sequences SET sequence_number = ?, comment = ? WHERE id = ?",
                (step, f"u{step}", key),
            )
        elif choice < 0.9:
            conn.execute("DELETE FROM sequences WHERE id = ?", (key,))
        else:
            conn.execute(
                "UPDATE OR REPLACE sequences SET id = ? WHERE id = ?",
                (base + rng.randrange(500), key),
            )
    conn.close()


if __name__ == "__main__":
    write(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
