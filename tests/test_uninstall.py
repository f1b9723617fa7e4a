"""`outbox-sync uninstall`: it removes what `init` made (triggers, key indexes, tables) and
nothing of the application's, says what it removes and asks first, is refused while a daemon
works the file or while something else uses its tables, and a daemon that was waiting for its
lock does not make them again. `init` installs outbox-sync again, and the daemon then indexes
the tables anew, against a real Typesense."""

import sqlite3
from pathlib import Path

import pytest

from outbox_sync import schema
from outbox_sync.db import Database
from outbox_sync.lock import DaemonLock
from tests.support.app import app_connection, schema_of
from tests.support.characters import (
    CHARACTERS,
    TAGS,
    characters_config,
    expected_characters,
    insert_characters,
    slug,
)
from tests.support.cli import invoke, one_line
from tests.support.daemon import record_failure
from tests.support.typesense import Server, export


def characters_app(tmp_path: Path, collection: str) -> tuple[sqlite3.Connection, Path, Path]:
    """The application's tables of docs/tables.md with rows, before any `init`: its connection,
    the database and the configuration file mapping it into `collection`."""
    path, config = tmp_path / "app.db", tmp_path / "outbox-sync.toml"
    config.write_text(characters_config(collection))
    conn = app_connection(path)
    conn.executescript(f"{CHARACTERS}; {TAGS};")
    insert_characters(conn, range(1, 41))
    return conn, path, config


def test_uninstall_removes_what_init_made_and_init_installs_it_again(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    conn, path, config = characters_app(tmp_path, collection)
    before = schema_of(path)
    env = {"OUTBOX_SYNC_CONFIG": str(config)}
    assert invoke(["init"], typesense_server, path, **env).exit_code == 0
    assert invoke(["run", "--once"], typesense_server, path, **env).exit_code == 0
    assert export(typesense_server, collection) == expected_characters(conn)
    made = {row[:2] for row in schema_of(path)} - {row[:2] for row in before}
    assert ("index", "outbox_sync_character_tags_slug") in made  # the key index init made
    assert len([kind for kind, _ in made if kind == "trigger"]) >= 6  # both tables'

    conn.execute("UPDATE characters SET bio = 'waiting' WHERE slug = ?", (slug(1),))
    result = invoke(["uninstall", "--yes"], typesense_server, path, **env)
    assert result.exit_code == 0, result.output
    assert "pending changes: 1; open sync errors: 0" in result.output
    assert schema_of(path) == before  # as it was before init: the application's alone
    assert not DaemonLock(path).path.exists()

    # the application writes as before, and nothing records its changes any more
    conn.execute("DELETE FROM characters WHERE slug = ?", (slug(2),))
    insert_characters(conn, range(41, 46))
    conn.execute("UPDATE characters SET bio = 'changed' WHERE slug = ?", (slug(3),))
    assert schema_of(path) == before
    assert export(typesense_server, collection) != expected_characters(conn)  # left as it was
    refused = one_line(invoke(["run", "--once"], typesense_server, path, **env))
    assert "is missing outbox, sync_errors, sync_stats, outbox_sync_meta" in refused
    assert "outbox-sync init" in refused

    # installed again: the daemon indexes the table anew, the changes made meanwhile with it
    assert invoke(["init"], typesense_server, path, **env).exit_code == 0
    result = invoke(["run", "--once"], typesense_server, path, **env)
    assert result.exit_code == 0, result.output
    assert export(typesense_server, collection) == expected_characters(conn)


def test_uninstall_says_what_it_removes_and_changes_nothing_unless_told_yes(
    db_path: Path, db: Database
) -> None:
    app = app_connection(db_path)
    app.execute(
        "INSERT INTO sequences (id, element_type, element_id, sequence_number, created_at)"
        " VALUES (1, 'script', 1, 1, '2024-01-01T00:00:00Z')"
    )
    record_failure(db, 1, 1, "refused")
    before = schema_of(db_path)
    for answer in ("n\n", ""):  # no, and no answer at all (no terminal)
        result = invoke(["uninstall"], db_path=db_path, input=answer)
        assert result.exit_code == 1, result.output
        assert schema_of(db_path) == before
    lines = result.output.splitlines()
    assert lines[:3] == [
        f"outbox-sync in {db_path}, to remove:",
        "  triggers: sequences_outbox_delete, sequences_outbox_insert, sequences_outbox_update"
        " on sequences",
        "  tables: outbox, sync_errors, sync_stats, outbox_sync_meta",
    ]
    assert "pending changes (not in Typesense yet): 1; open sync errors: 1" in lines[3]
    assert "`outbox-sync errors list --json` keeps a copy" in lines[3]
    assert lines[-1].startswith("Remove them? [y/N]")

    result = invoke(["uninstall"], db_path=db_path, input="y\n")
    assert result.exit_code == 0, result.output
    assert f"removed outbox-sync from {db_path}" in result.output
    assert [row[1] for row in schema_of(db_path)] == ["sequences"]
    assert app.execute("SELECT count(*) FROM sequences").fetchone() == (1,)
    again = invoke(["uninstall"], db_path=db_path)
    assert again.exit_code == 0
    assert again.output == f"nothing of outbox-sync's in {db_path}\n"


def test_uninstall_is_refused_while_a_daemon_works_the_file(db_path: Path) -> None:
    before = schema_of(db_path)
    with DaemonLock(db_path):
        line = one_line(invoke(["uninstall", "--yes"], db_path=db_path))
    assert "another outbox-sync daemon" in line
    assert "stop it first" in line
    assert schema_of(db_path) == before


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        (
            "CREATE TRIGGER audit_trail AFTER DELETE ON sequences BEGIN"
            " INSERT INTO sync_errors (outbox_id, mapping, op, error, attempts, failed_at)"
            " VALUES (0, 'x', 'delete', 'gone', 0, 'now'); END",
            "trigger audit_trail on table sequences",
        ),
        ("CREATE VIEW backlog AS SELECT count(*) FROM outbox", "view backlog"),
    ],
)
def test_uninstall_is_refused_while_something_else_uses_its_tables(
    db_path: Path, sql: str, named: str
) -> None:
    app_connection(db_path).execute(sql)
    before = schema_of(db_path)
    line = one_line(invoke(["uninstall", "--yes"], db_path=db_path))
    assert line.startswith(f"Error: {named} in {db_path} uses outbox-sync's tables"), line
    assert line.endswith("Nothing was removed")
    assert schema_of(db_path) == before


@pytest.mark.parametrize("command", [["run", "--once"], ["reindex"]])
def test_a_command_that_waited_for_the_lock_of_uninstall_does_not_install_it_again(
    db_path: Path,
    typesense_server: Server,
    collection: str,
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
) -> None:
    """`run` and `reindex` read the schema, then take the lock: an `uninstall` may hold it
    meanwhile and remove outbox-sync. Taken, the lock is the time to look again; a daemon
    going on would make the tables and the triggers again (its schema check repairs them)."""
    acquire = DaemonLock.acquire

    def uninstall_first(self: DaemonLock, *args: float) -> None:
        if self.role != "uninstall":
            db = Database(db_path)
            schema.uninstall(db)
            db.close()
        acquire(self, *args)

    monkeypatch.setattr(DaemonLock, "acquire", uninstall_first)
    line = one_line(invoke(command, typesense_server, db_path, collection))
    assert "is missing outbox, sync_errors, sync_stats, outbox_sync_meta" in line
    assert [row[1] for row in schema_of(db_path)] == ["sequences"]


def test_uninstall_removes_the_triggers_of_a_mapping_no_longer_configured(
    tmp_path: Path,
) -> None:
    """Its triggers are found by what they do (write the outbox), not by the configuration: a
    mapping taken out of the file before the uninstall leaves no trigger writing a table that
    is gone, which would fail each of the application's writes."""
    conn, path, config = characters_app(tmp_path, "characters")
    before = schema_of(path)
    assert invoke(["init"], db_path=path, OUTBOX_SYNC_CONFIG=str(config)).exit_code == 0
    result = invoke(["uninstall", "--yes"], db_path=path)  # the built-in mapping only
    assert result.exit_code == 0, result.output
    assert schema_of(path) == before
    insert_characters(conn, range(41, 43))
    conn.execute("DELETE FROM character_tags")


MAIL = (
    "CREATE TABLE outbox (id INTEGER PRIMARY KEY, recipient TEXT, body TEXT);"
    " CREATE TRIGGER mail_new_character AFTER INSERT ON characters BEGIN"
    " INSERT INTO outbox (recipient, body) VALUES ('editor@example.com', NEW.name); END"
)


def test_an_application_table_named_outbox_is_refused_by_init_and_left_by_uninstall(
    tmp_path: Path, typesense_server: Server, collection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An application with an `outbox` of its own (its mail, say). `init` took it for its own:
    it made the other tables, and triggers that write columns the table lacks, which then
    failed every write to a mapped table, while `status` and `run` crashed on it. `init`
    refuses it now, changing nothing; on a file an older `init` prepared so, every command
    says what happened, and `uninstall` removes what is outbox-sync's, leaving the
    application's table, its rows and its trigger."""
    conn, path, config = characters_app(tmp_path, collection)
    conn.executescript(MAIL)
    insert_characters(conn, [41])
    before, mail = schema_of(path), conn.execute("SELECT * FROM outbox").fetchall()
    assert len(mail) == 1  # the application's own trigger wrote it
    env = {"OUTBOX_SYNC_CONFIG": str(config)}
    refused = one_line(invoke(["init"], typesense_server, path, **env))
    assert f"{path} has its own outbox (columns id, recipient, body)" in refused
    assert "Nothing was changed" in refused
    assert schema_of(path) == before

    # the file an older init left: it did not look at the shape of the outbox
    monkeypatch.setattr(schema, "foreign_tables", lambda conn: {})
    assert invoke(["init"], typesense_server, path, **env).exit_code == 0
    monkeypatch.undo()
    with pytest.raises(sqlite3.OperationalError, match="has no column named mapping"):
        insert_characters(conn, [42])
    for command in (["status"], ["run", "--once"], ["errors", "list"]):
        said = one_line(invoke(command, typesense_server, path, **env))
        assert "has its own outbox (columns id, recipient, body)" in said, command
        assert "An older outbox-sync's init took them for its own" in said
        assert f"`outbox-sync uninstall --db {path}`" in said

    result = invoke(["uninstall", "--yes"], typesense_server, path, **env)
    assert result.exit_code == 0, result.output
    assert "tables sync_errors, sync_stats, outbox_sync_meta (" in result.output
    assert schema_of(path) == before  # the application's outbox and trigger among it
    # its rows too (a read: a connection SQLite failed to prepare a statement for compiles the
    # next against the schema it last read until a transaction reads the file again)
    assert conn.execute("SELECT * FROM outbox").fetchall() == mail
    insert_characters(conn, [42])
    assert conn.execute("SELECT * FROM outbox").fetchall() == [
        *mail,
        (2, "editor@example.com", f"Name of {slug(42)}"),
    ]
