"""Rows SQLite changes on its own, against a real Typesense.

A REPLACE removes the rows it conflicts with and fires no delete trigger for them (SQLite's
rule, unless the application's connection sets PRAGMA recursive_triggers). Where the conflict
is on a unique constraint other than the key, the removed row was another record: the triggers
made from the table's unique constraints note it, so its document goes too. A foreign key's
actions fire triggers; incremental BLOB I/O fires none (a known limit the audit covers)."""

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from outbox_sync import health, schema
from outbox_sync.cli import render
from outbox_sync.db import Database
from outbox_sync.lock import DaemonLock
from outbox_sync.mapping import SEQUENCES, Dependency, Field, Mapping
from tests.support.app import ROW_SQL, app_connection, make_row, schema_of, sqlite_documents
from tests.support.cli import invoke
from tests.support.daemon import drain, mapping_worker
from tests.support.typesense import Server, export

SEQUENCES_UNIQUE = (
    "CREATE TABLE sequences (id INTEGER PRIMARY KEY, element_type TEXT NOT NULL,"
    " element_id INTEGER NOT NULL, sequence_number INTEGER NOT NULL, comment TEXT,"
    " created_at TEXT NOT NULL, UNIQUE (element_type, element_id))"
)
COLUMNS = "(id, element_type, element_id, sequence_number, comment, created_at)"


def users_mapping(collection: str) -> Mapping:
    return Mapping(
        table="users", key="slug", collection=collection, fields=(Field("email", "string"),)
    )


def synced(
    tmp_path: Path, server: Server, mapping: Mapping, script: str, *statements: str
) -> dict[str, dict[str, Any]]:
    """What search holds, by document id, once the rows `script` makes are synced, then
    `statements` run and are synced too."""
    path = tmp_path / "app.db"
    app = app_connection(path)
    app.executescript(script)
    _, sync = mapping_worker(path, mapping, server, mapping.collection, backfill=True)
    drain(sync)
    for statement in statements:
        app.execute(statement)
    drain(sync)
    return export(server, mapping.collection)


@pytest.mark.parametrize(
    "statement",
    [
        f"INSERT OR REPLACE INTO sequences {COLUMNS} VALUES (3, 'script', 7, 3, 'new', 'x')",
        f"REPLACE INTO sequences {COLUMNS} VALUES (3, 'script', 7, 3, 'new', 'x')",
        "INSERT OR REPLACE INTO sequences (element_type, element_id, sequence_number,"
        " created_at) VALUES ('script', 7, 3, 'x')",
        "UPDATE OR REPLACE sequences SET element_type = 'script', element_id = 7 WHERE id = 2",
        # no REPLACE: nothing is removed, and what the guard notes syncs as it is
        f"INSERT OR IGNORE INTO sequences {COLUMNS} VALUES (3, 'script', 7, 3, 'new', 'x')",
        f"INSERT INTO sequences {COLUMNS} VALUES (3, 'script', 7, 3, 'new', 'x')"
        " ON CONFLICT (element_type, element_id) DO UPDATE SET comment = 'upserted'",
        "UPDATE sequences SET comment = 'edited', element_id = 8 WHERE id = 2",
    ],
    ids=[
        "insert-or-replace",
        "replace",
        "replace-new-id",
        "update-or-replace",
        "ignore",
        "upsert",
        "update",
    ],
)
def test_a_row_replaced_through_another_unique_constraint_leaves_search(
    tmp_path: Path, typesense_server: Server, collection: str, statement: str
) -> None:
    """Row 1 (script 7) is synced; the statement conflicts with it on (element_type,
    element_id). Search then holds exactly the rows SQLite holds."""
    path = tmp_path / "unique.db"
    app = app_connection(path)
    app.execute(SEQUENCES_UNIQUE)
    app.execute(ROW_SQL, make_row(1, element_type="script", element_id=7))
    app.execute(ROW_SQL, make_row(2, element_type="section", element_id=7))
    _, sync = mapping_worker(path, SEQUENCES, typesense_server, collection, backfill=True)
    drain(sync)
    assert set(export(typesense_server, collection)) == {"1", "2"}
    app.execute(statement)
    drain(sync)
    assert export(typesense_server, collection) == sqlite_documents(path)


def test_a_key_replaced_by_another_spelling_under_its_collation_leaves_search(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """A NOCASE key takes `BOB` and `bob` for one: REPLACE INTO of `BOB` removes the row `bob`,
    the document `bob` with it."""
    tags = Mapping(
        table="tags", key="name", collection=collection, fields=(Field("uses", "int32"),)
    )
    found = synced(
        tmp_path,
        typesense_server,
        tags,
        "CREATE TABLE tags (name TEXT PRIMARY KEY COLLATE NOCASE, uses INTEGER NOT NULL);"
        "INSERT INTO tags VALUES ('bob', 1), ('ann', 2);",
        "REPLACE INTO tags VALUES ('BOB', 3)",
    )
    assert {name: doc["uses"] for name, doc in found.items()} == {"BOB": 3, "ann": 2}


def test_a_row_of_a_table_depended_on_replaced_through_its_rowid_resyncs_its_old_document(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """Tag 1 of item `a` replaced (same id) by a tag of item `b`: `a` no longer has it."""
    items = Mapping(
        table="items",
        key="slug",
        collection=collection,
        fields=(
            Field(
                "tags",
                "string[]",
                sql="(SELECT json_group_array(tag) FROM tags WHERE tags.item = items.slug)",
            ),
        ),
        depends_on=(Dependency("tags", "item"),),
    )
    path = tmp_path / "items.db"
    app = app_connection(path)
    app.executescript(
        "CREATE TABLE items (slug TEXT PRIMARY KEY);"
        "CREATE TABLE tags (id INTEGER PRIMARY KEY, item TEXT, tag TEXT);"
        "INSERT INTO items VALUES ('a'), ('b');"
        "INSERT INTO tags VALUES (1, 'a', 'red');"
    )
    _, sync = mapping_worker(path, items, typesense_server, collection, backfill=True)
    drain(sync)
    assert export(typesense_server, collection)["a"]["tags"] == ["red"]
    app.execute("REPLACE INTO tags VALUES (1, 'b', 'blue')")
    drain(sync)
    found = {slug: doc["tags"] for slug, doc in export(typesense_server, collection).items()}
    assert found == {"a": [], "b": ["blue"]}


def test_a_unique_index_added_or_dropped_under_the_daemon_changes_its_triggers(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """The daemon's schema watch makes the trigger for a UNIQUE index an application adds (and
    audits: a REPLACE may have come first); once the index is dropped, it takes the trigger's
    lookup away, so that the column can be dropped too."""
    path = tmp_path / "later.db"
    app = app_connection(path)
    app.execute(SEQUENCES_UNIQUE.replace(", UNIQUE (element_type, element_id)", ""))
    db, sync = mapping_worker(path, SEQUENCES, typesense_server, collection)
    audits: list[str] = []
    watch = schema.SchemaWatch(db, [SEQUENCES], audits.append)
    watch(0.0)
    app.execute(ROW_SQL, make_row(1, comment="one"))
    app.execute("CREATE UNIQUE INDEX sequences_comment ON sequences (comment)")
    watch(1.0)
    assert audits == ["triggers repaired"]
    assert schema.trigger_problems(db.conn, [SEQUENCES]) == []
    drain(sync)
    app.execute(ROW_SQL.replace("INSERT", "REPLACE"), make_row(2, comment="one"))
    drain(sync)
    assert export(typesense_server, collection) == sqlite_documents(path)
    assert list(export(typesense_server, collection)) == ["2"]
    app.execute("DROP INDEX sequences_comment")
    assert schema.trigger_problems(db.conn, [SEQUENCES]) == [
        "sequences_outbox_insert_replaced was for unique constraints no longer there",
        "sequences_outbox_update_replaced was for unique constraints no longer there",
    ]
    with pytest.raises(sqlite3.OperationalError, match="sequences_outbox_insert_replaced"):
        app.execute("ALTER TABLE sequences DROP COLUMN comment")  # the trigger reads it
    watch(2.0)
    assert schema.trigger_problems(db.conn, [SEQUENCES]) == []
    app.execute("ALTER TABLE sequences DROP COLUMN comment")


def test_the_unique_constraints_are_those_a_replace_removes_rows_through(tmp_path: Path) -> None:
    app = app_connection(tmp_path / "shapes.db")
    app.executescript(
        "CREATE TABLE rowid_key (id INTEGER PRIMARY KEY, a TEXT UNIQUE COLLATE NOCASE, b, c);"
        "CREATE UNIQUE INDEX pair ON rowid_key (c, b);"
        "CREATE UNIQUE INDEX partial ON rowid_key (b) WHERE b > 0;"
        "CREATE UNIQUE INDEX expression ON rowid_key (lower(c));"
        "CREATE INDEX plain ON rowid_key (c);"
        "CREATE TABLE int_key (id INT PRIMARY KEY, a);"
        "CREATE TABLE no_rowid (k TEXT, n INTEGER, PRIMARY KEY (n, k)) WITHOUT ROWID;"
        "CREATE TABLE implicit (a, b);"
        "CREATE TABLE made (a TEXT PRIMARY KEY, b GENERATED ALWAYS AS (lower(a)) UNIQUE,"
        " c GENERATED ALWAYS AS (upper(a)) STORED, UNIQUE (c, a));"
    )
    assert schema.unique_constraints(app, "rowid_key") == [
        (("a", "NOCASE", False),),
        (("b", "BINARY", False),),
        (("c", "BINARY", False), ("b", "BINARY", False)),
        (("id", "BINARY", False),),
    ]
    assert schema.unique_constraints(app, "int_key") == [(("id", "BINARY", False),)]
    assert schema.unique_constraints(app, "no_rowid") == [
        (("n", "BINARY", False), ("k", "BINARY", False))
    ]
    assert schema.unique_constraints(app, "made") == [
        (("a", "BINARY", False),),
        (("b", "BINARY", True),),
        (("c", "BINARY", True), ("a", "BINARY", False)),
    ]
    assert schema.unique_constraints(app, "implicit") == []
    assert schema.unique_constraints(app, "absent") == []


def test_the_built_in_table_as_init_makes_it_has_no_replace_triggers(tmp_path: Path) -> None:
    """Its only unique constraint is its key: the application's inserts pay no lookup."""
    db = Database(tmp_path / "plain.db", create=True)
    schema.init(db, [SEQUENCES])
    names = [t.name for t in schema.owned_triggers(db.conn, [SEQUENCES])]
    assert names == [t.name for t in SEQUENCES.triggers()]
    assert not [n for n in names if n.endswith("_replaced")]


def test_rows_a_foreign_key_deletes_or_changes_sync(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """ON DELETE CASCADE deletes rows of `sequences`, ON DELETE SET NULL changes others: SQLite
    fires their triggers, so search follows."""
    path = tmp_path / "keys.db"
    app = app_connection(path)
    app.executescript(
        "PRAGMA foreign_keys = ON;"
        "CREATE TABLE scripts (id INTEGER PRIMARY KEY);"
        "CREATE TABLE sequences (id INTEGER PRIMARY KEY, element_type TEXT NOT NULL,"
        " element_id INTEGER NOT NULL REFERENCES scripts (id) ON DELETE CASCADE,"
        " sequence_number INTEGER NOT NULL, comment TEXT, created_at TEXT NOT NULL,"
        " seen_in INTEGER REFERENCES scripts (id) ON DELETE SET NULL);"
        "INSERT INTO scripts VALUES (1), (2);"
    )
    for i, (script, seen_in) in enumerate([(1, 2), (2, 1), (2, 2)], start=1):
        app.execute(
            ROW_SQL.replace("created_at)", "created_at, seen_in)").replace("?)", "?, ?)"),
            (*make_row(i, element_id=script), seen_in),
        )
    _, sync = mapping_worker(path, SEQUENCES, typesense_server, collection, backfill=True)
    drain(sync)
    assert set(export(typesense_server, collection)) == {"1", "2", "3"}
    app.execute("UPDATE sequences SET comment = NULL")  # synced: the next change must show
    drain(sync)
    app.execute("DELETE FROM scripts WHERE id = 1")  # cascades to 1, sets 2's seen_in NULL
    queued = app.execute("SELECT record_key, op FROM outbox").fetchall()
    assert sorted(queued) == [(1, "delete"), (2, "upsert")]
    drain(sync)
    assert export(typesense_server, collection) == sqlite_documents(path)
    assert set(export(typesense_server, collection)) == {"2", "3"}


def test_a_value_rewritten_through_blob_io_fires_no_trigger_and_the_audit_finds_it(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    path = tmp_path / "blob.db"
    app = app_connection(path)
    app.execute(SEQUENCES_UNIQUE)
    app.execute(ROW_SQL, make_row(1, comment="aaaa"))
    _, sync = mapping_worker(path, SEQUENCES, typesense_server, collection, backfill=True)
    drain(sync)
    with app.blobopen("sequences", "comment", 1) as blob:
        blob.write(b"bbbb")
    assert app.execute("SELECT count(*) FROM outbox").fetchone() == (0,)  # no trigger fired
    result = invoke(["audit", "--repair", "--json"], typesense_server, path, collection)
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["stale"]["ids"] == [1]
    drain(sync)
    assert export(typesense_server, collection)["1"]["comment"] == "bbbb"


def test_uninstall_removes_the_replace_triggers_with_the_others(tmp_path: Path) -> None:
    path = tmp_path / "gone.db"
    app = app_connection(path)
    app.execute(SEQUENCES_UNIQUE)
    before = schema_of(path)
    db = Database(path, create=True)
    schema.init(db, [SEQUENCES])
    removed = schema.uninstall(db)
    assert sorted(name for name, _ in removed.triggers if name.endswith("_replaced")) == [
        "sequences_outbox_insert_replaced",
        "sequences_outbox_update_replaced",
    ]
    assert schema_of(path) == before


@pytest.mark.parametrize(
    "ddl",
    [
        "CREATE TABLE users (slug TEXT PRIMARY KEY, email TEXT NOT NULL,"
        f" email_lower TEXT GENERATED ALWAYS AS (lower(email)) {kind} UNIQUE);"
        for kind in ("VIRTUAL", "STORED")
    ]
    + [  # as docs/guarantees.md suggests in place of an index on lower(email)
        "CREATE TABLE users (slug TEXT PRIMARY KEY, email TEXT NOT NULL);"
        "ALTER TABLE users ADD COLUMN email_lower TEXT GENERATED ALWAYS AS (lower(email))"
        " VIRTUAL; CREATE UNIQUE INDEX users_email ON users (email_lower);"
    ],
    ids=["virtual", "stored", "added"],
)
def test_a_row_replaced_through_a_unique_generated_column_leaves_search(
    tmp_path: Path, typesense_server: Server, collection: str, ddl: str
) -> None:
    """UNIQUE on a generated column (the email lowercased): an UPDATE OR REPLACE of the email
    conflicts through it, though the statement never names the generated column."""
    found = synced(
        tmp_path,
        typesense_server,
        users_mapping(collection),
        ddl
        + "INSERT INTO users (slug, email) VALUES ('a', 'Ann@example.org'), ('b', 'bob@x.org');",
        "UPDATE OR REPLACE users SET email = 'ANN@example.org' WHERE slug = 'b'",
        "INSERT OR REPLACE INTO users (slug, email) VALUES ('c', 'ann@EXAMPLE.org')",
    )
    assert {slug: doc["email"] for slug, doc in found.items()} == {"c": "ann@EXAMPLE.org"}


def test_the_update_trigger_the_last_version_made_for_a_generated_column_is_replaced(
    tmp_path: Path,
) -> None:
    """It was BEFORE UPDATE OF the generated column, which never fires: the daemon's first turn
    puts the new one in place, and audits for what it missed."""
    path = tmp_path / "users.db"
    app = app_connection(path)
    app.execute(
        "CREATE TABLE users (slug TEXT PRIMARY KEY, email TEXT,"
        " email_lower TEXT GENERATED ALWAYS AS (lower(email)) VIRTUAL UNIQUE)"
    )
    users = users_mapping("users")
    db = Database(path, create=True)
    schema.init(db, [users])
    name = "users_outbox_update_replaced"
    (made,) = app.execute("SELECT sql FROM sqlite_schema WHERE name = ?", (name,)).fetchone()
    assert made.startswith(f"CREATE TRIGGER {name} BEFORE UPDATE ON `users`")
    app.execute(f"DROP TRIGGER {name}")
    app.execute(made.replace("BEFORE UPDATE ON", "BEFORE UPDATE OF `email_lower` ON"))
    assert schema.trigger_problems(db.conn, [users]) == [
        f"{name} was not as the table's unique constraints make it"
    ]
    audits: list[str] = []
    schema.SchemaWatch(db, [users], audits.append)(0.0)
    assert audits == ["triggers repaired"]
    assert schema.trigger_problems(db.conn, [users]) == []
    db.close()


def test_a_constraint_that_resolves_conflicts_by_replace_is_followed_by_plain_statements(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """`UNIQUE ... ON CONFLICT REPLACE` in the table's definition: a plain INSERT or UPDATE
    replaces, with no OR REPLACE in the statement to tell."""
    found = synced(
        tmp_path,
        typesense_server,
        users_mapping(collection),
        "CREATE TABLE users (slug TEXT PRIMARY KEY, email TEXT UNIQUE ON CONFLICT REPLACE);"
        "INSERT INTO users VALUES ('a', 'a@x.org'), ('b', 'b@x.org'), ('c', 'c@x.org');",
        "INSERT INTO users VALUES ('d', 'a@x.org')",  # removes a
        "UPDATE users SET email = 'b@x.org' WHERE slug = 'c'",  # removes b
    )
    assert {slug: doc["email"] for slug, doc in found.items()} == {
        "c": "b@x.org",
        "d": "a@x.org",
    }


def test_a_unique_index_on_an_expression_is_said_not_followed(tmp_path: Path) -> None:
    """No trigger can follow it (a known limit): `init` says so, and the daemon's schema watch
    says so once for each such index that appears, so that on-call knows why a document may
    wait for the scheduled audit."""
    path = tmp_path / "sequences.db"
    app = app_connection(path)
    app.execute(SEQUENCES_UNIQUE)
    app.execute("CREATE UNIQUE INDEX by_comment ON sequences (lower(comment))")
    app.execute("CREATE UNIQUE INDEX by_number ON sequences (sequence_number)")  # followed
    result = invoke(["init"], db_path=path)
    assert result.exit_code == 0, result.output
    assert "note: by_comment on sequences: a REPLACE through a unique index on an expression" in (
        result.output
    )
    assert "by_number" not in result.output
    db = Database(path)
    watch = schema.SchemaWatch(db, [SEQUENCES], lambda reason: None)
    with capture_logs() as logged:
        watch(0.0)
        app.execute("CREATE INDEX plain ON sequences (lower(element_type))")  # not unique
        watch(1.0)
        app.execute("CREATE UNIQUE INDEX by_type ON sequences (upper(element_type), element_id)")
        watch(2.0)
        app.execute("DROP INDEX by_comment")
        watch(3.0)
    said = [e["indexes"] for e in logged if e["event"] == "unique_index_not_followed"]
    assert said == [
        ["by_comment on sequences"],
        ["by_comment on sequences", "by_type on sequences"],
    ]
    assert schema.unfollowed_uniques(db.conn, [SEQUENCES]) == ["by_type on sequences"]
    figures = health.gather(db, [], [SEQUENCES], DaemonLock(path))  # what `status` shows
    assert figures["unique_indexes_not_followed"] == ["by_type on sequences"]
    lines = list(render.status_lines(figures))
    assert "unique_indexes_not_followed by_type on sequences" in lines
    width = len("unique_indexes_not_followed ")  # the longest name: the others pad to it
    assert [line[width:] for line in lines if line.startswith("pending".ljust(width))] == ["0"]
    app.execute("DROP INDEX by_type")
    assert "unique_indexes_not_followed" not in health.gather(db, [], [SEQUENCES], DaemonLock(path))
    db.close()
