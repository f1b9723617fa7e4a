"""An application writing to the database from its own process, each change in its own transaction:
on `sequences`, random inserts, updates, deletes and id changes; on `characters` (the custom
mapping of docs/tables.md), random inserts, updates, deletes, soft deletes and undeletes, and tags
added and removed.

Usage: python -m tests.support.writer DB SEED N [STOP_FILE [TABLE]] -- N operations, then on until
STOP_FILE exists (when given); TABLE: sequences (the default) or characters."""

import os
import random
import sqlite3
import sys

from tests.support.app import ROW_SQL, make_row


def write(
    path: str, seed: int, operations: int, stop_file: str | None = None, table: str = "sequences"
) -> None:
    rng = random.Random(seed)
    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    change = write_character if table == "characters" else write_sequence
    step = 0
    while step < operations or (stop_file and not os.path.exists(stop_file)):
        step += 1
        change(conn, rng, seed, step)
    conn.close()


def write_sequence(conn: sqlite3.Connection, rng: random.Random, seed: int, step: int) -> None:
    base = seed * 1_000_000  # each writer owns its id range
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


def write_character(conn: sqlite3.Connection, rng: random.Random, seed: int, step: int) -> None:
    slug = f"w{seed}/{rng.randrange(300)} é"  # each writer owns its keys
    choice = rng.random()
    if choice < 0.4:
        conn.execute(
            "INSERT OR REPLACE INTO characters (slug, name, age, weight, active)"
            " VALUES (?, ?, ?, ?, ?)",
            (slug, f"w{seed} s{step}", step % 90, step / 8, step % 2),
        )
    elif choice < 0.6:
        conn.execute("UPDATE characters SET name = ? WHERE slug = ?", (f"u{step}", slug))
    elif choice < 0.7:
        conn.execute("DELETE FROM characters WHERE slug = ?", (slug,))
    elif choice < 0.8:  # soft delete, or undelete
        conn.execute(
            "UPDATE characters SET deleted_at = CASE WHEN deleted_at IS NULL THEN 'now' END"
            " WHERE slug = ?",
            (slug,),
        )
    elif choice < 0.9:
        conn.execute("INSERT INTO character_tags (slug, tag) VALUES (?, ?)", (slug, f"t{step % 4}"))
    else:
        conn.execute(
            "DELETE FROM character_tags WHERE rowid ="
            " (SELECT min(rowid) FROM character_tags WHERE slug = ?)",
            (slug,),
        )


if __name__ == "__main__":
    write(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6])
