"""Your own tables: the example of docs/tables.md, word for word, syncs end to end through a real
Typesense (every type, TEXT keys with odd characters, soft delete and undelete, a tag re-syncing
its character), its mistakes are one line each, a key no document can have is an error only
while its row is there, the source document's own collection is accepted, and a database of the
version before mappings is upgraded in place. (Migrations of a mapped table: test_triggers.py,
for `characters` too.)"""

import json
import shutil
import signal
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from outbox_sync import schema, sync_errors, worker
from outbox_sync.db import Database
from outbox_sync.localserver import LocalTypesense, free_port
from outbox_sync.mapping import SEQUENCES, Dependency, Field, Mapping
from outbox_sync.typesense_index import TypesenseIndex
from tests.support.app import ROW_SQL, app_connection, make_row, sqlite_documents
from tests.support.characters import (
    CHARACTER_SQL,
    CHARACTERS,
    EXAMPLE,
    ODD_KEYS,
    TAGS,
    character,
    characters_index,
    characters_mapping,
    expected_characters,
    initialized_characters,
    insert_not_utf8,
)
from tests.support.cli import invoke, one_line, run_module, without_settings
from tests.support.daemon import Daemon, drain, mapping_worker
from tests.support.typesense import API_KEY, Server, export
from tests.support.wait import wait_until

ROOT = Path(__file__).resolve().parent.parent


def example(tmp_path: Path, url: str) -> tuple[dict[str, str], sqlite3.Connection]:
    """The example's configuration over a database of both tables, for Typesense at `url`."""
    config = tmp_path / "outbox-sync.toml"
    config.write_text(EXAMPLE)
    db_path = tmp_path / "tables.db"  # not the db_path fixture's, which has `sequences` already
    app = app_connection(db_path)
    app.executescript(f"{CHARACTERS}; {TAGS};")
    env = without_settings(
        OUTBOX_SYNC_CONFIG=str(config),
        OUTBOX_SYNC_DB=str(db_path),
        TYPESENSE_URL=url,
        TYPESENSE_API_KEY=API_KEY,
    )
    return env, app


@pytest.fixture
def setup(
    tmp_path: Path, private_typesense: LocalTypesense
) -> Iterator[tuple[dict[str, str], Server, sqlite3.Connection]]:
    """The example on a server of its own (the example names its collections plainly)."""
    env, app = example(tmp_path, private_typesense.url)
    yield env, Server(private_typesense.url, API_KEY), app


def characters(server: Server) -> dict[str, dict[str, Any]]:
    try:
        return export(server, "characters")
    except httpx.HTTPStatusError:
        return {}


def test_the_example_syncs_end_to_end(
    setup: tuple[dict[str, str], Server, sqlite3.Connection],
    tmp_path: Path,
    start_daemon: Callable[..., Daemon],
) -> None:
    env, server, app = setup
    app.executemany("INSERT INTO characters VALUES (?, ?, ?, ?, ?, ?, ?)", [character("alice")])
    init = run_module(["init"], env=env)  # the new mappings' triggers, and a fill of characters
    assert init.returncode == 0, init.stderr
    assert "existing rows to sync: 1 of characters, read from the table" in init.stdout
    daemon = start_daemon("--audit-every", "0", env=env)
    app.execute(ROW_SQL, make_row(7, comment="a sequence"))
    app.executemany(
        "INSERT INTO characters VALUES (?, ?, ?, ?, ?, ?, ?)",
        [character(slug, bio=f"bio of {slug}", weight=None) for slug in ODD_KEYS]
        + [character("", name="empty key"), character("bad", age=1.5, active=2)],
    )
    app.executemany(
        "INSERT INTO character_tags VALUES (?, ?)", [("alice", "lead"), ("alice", "hero")]
    )
    wait_until(lambda: characters(server) == expected_characters(app), what="the characters")
    wait_until(
        lambda: export(server, "sequences") == sqlite_documents(Path(env["OUTBOX_SYNC_DB"])),
        what="the sequence",
    )
    assert characters(server)["alice"]["tags"] == ["hero", "lead"]
    assert characters(server)["alice"]["weight"] == 61.5
    # a tag added and one removed re-sync their character, through the dependency's triggers
    app.execute("INSERT INTO character_tags VALUES ('alice', 'mentor')")
    app.execute("DELETE FROM character_tags WHERE tag = 'hero'")
    wait_until(
        lambda: characters(server).get("alice", {}).get("tags") == ["lead", "mentor"],
        what="the tags",
    )
    # soft delete and undelete; odd keys updated and deleted
    app.execute("UPDATE characters SET deleted_at = 'now' WHERE slug = 'alice'")
    wait_until(lambda: "alice" not in characters(server), what="the soft delete")
    app.execute("UPDATE characters SET deleted_at = NULL WHERE slug = 'alice'")
    app.execute("UPDATE characters SET name = 'renamed' WHERE slug IN ('a/b', 'bt`x', 'co,ma')")
    app.execute("DELETE FROM characters WHERE slug IN ('sp ace', 'sq''x', 'ünï')")
    wait_until(lambda: characters(server) == expected_characters(app), what="the changes")
    # what could not be indexed, each naming the field
    errors = invoke(["errors", "list", "--json", "--collection", "characters"], **env)
    failed = {e["record_key"]: e["error"] for e in json.loads(errors.output)}
    assert failed == {
        "": "slug: is empty, which Typesense cannot hold as an id",
        "bad": "age: expected an integer, got real 1.5",
    }
    # the on-call commands, per collection
    audited = invoke(["audit"], **env)
    assert audited.exit_code == 0, audited.output
    assert "audit of collection 'characters'" in audited.output
    status = json.loads(invoke(["status", "--json"], **env).output)
    assert set(status["collections"]) == {"sequences", "characters"}
    assert status["collections"]["characters"]["documents"] == len(expected_characters(app))
    found = invoke(["search", "renamed", "--collection", "characters", "--json"], **env)
    assert json.loads(found.output)["found"] == 3
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
    reindexed = invoke(["reindex", "--collection", "characters"], **env)
    assert reindexed.exit_code == 0 and "rows of 'characters'" in reindexed.output
    assert characters(server) == expected_characters(app)


def test_the_source_documents_collection_is_accepted(
    db_path: Path,
    typesense_server: Server,
    collection: str,
    daemon_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
) -> None:
    """A collection made from the source document's table: `id` declared int32 (Typesense
    drops it), element_id int32, comment required. Used as it is; a NULL comment is a sync
    error naming it."""
    fields = [
        {"name": "id", "type": "int32"},
        {"name": "element_type", "type": "string", "facet": True},
        {"name": "element_id", "type": "int32"},
        {"name": "sequence_number", "type": "int32", "sort": True},
        {"name": "comment", "type": "string"},
        {"name": "created_at", "type": "string", "sort": True},
    ]
    httpx.post(
        f"{typesense_server.url}/collections",
        json={"name": collection, "fields": fields},
        headers={"X-TYPESENSE-API-KEY": API_KEY},
    ).raise_for_status()
    app = app_connection(db_path)
    app.execute(ROW_SQL, make_row(1))
    app.execute(ROW_SQL, make_row(2, comment=None))
    daemon = start_daemon()
    db = Database(db_path)
    wait_until(lambda: db.counts(SEQUENCES)["pending"] == 0, what="the sync")
    assert set(export(typesense_server, collection)) == {"1"}
    errors = json.loads(invoke(["errors", "list", "--json"], **daemon_env).output)
    assert [(e["record_key"], e["error"]) for e in errors] == [
        (2, "comment: is NULL but the field is required")
    ]
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_a_database_of_the_version_before_mappings_is_upgraded_in_place(
    tmp_path: Path,
    typesense_server: Server,
    collection: str,
    daemon_env: dict[str, str],
) -> None:
    """tests/fixtures/v1.db was made by that version (see make_v1_db.py): entries waiting in
    the outbox, sync errors open and closed."""
    path = tmp_path / "v1.db"
    shutil.copy(ROOT / "tests" / "fixtures" / "v1.db", path)
    before = (
        sqlite3.connect(path)
        .execute("SELECT id, sequence_id, error, resolution FROM sync_errors ORDER BY id")
        .fetchall()
    )
    pending = sqlite3.connect(path).execute("SELECT count(*) FROM outbox").fetchone()[0]
    assert pending == 9 and len(before) == 2
    env = daemon_env | {"OUTBOX_SYNC_DB": str(path)}
    refused = invoke(["errors", "list"], **env)  # an on-call command does not change it
    assert (
        refused.exit_code == 1 and "prepared by an older outbox-sync (schema 1)" in refused.output
    )
    ran = run_module(["run", "--once", "--audit-every", "0"], env=env)
    assert ran.returncode == 0, ran.stderr
    assert export(typesense_server, collection) == sqlite_documents(path)  # nothing lost
    after = (
        sqlite3.connect(path)
        .execute("SELECT id, mapping, record_key, error FROM sync_errors ORDER BY id")
        .fetchall()
    )
    assert after == [(i, "sequences", key, error) for i, key, error, _ in before]  # all kept
    assert sqlite3.connect(path).execute("SELECT count(*) FROM outbox").fetchone()[0] == 0
    again = run_module(["init"], env=env)  # idempotent after the upgrade
    assert again.returncode == 0 and "upgraded" not in again.stdout


def test_changed_fields_tell_the_user_to_reindex_that_collection(
    setup: tuple[dict[str, str], Server, sqlite3.Connection],
) -> None:
    env, _, _ = setup
    assert run_module(["init"], env=env).returncode == 0
    assert run_module(["run", "--once", "--audit-every", "0"], env=env).returncode == 0
    config = Path(env["OUTBOX_SYNC_CONFIG"])
    config.write_text(
        EXAMPLE.replace('{ name = "age", type = "int32"', '{ name = "age", type = "float"')
    )
    refused = run_module(["run", "--once"], env=env)
    assert refused.returncode == 1
    assert "field age has type='int32', expected 'float'" in refused.stderr
    assert "Run `outbox-sync reindex --collection characters`" in refused.stderr
    assert invoke(["reindex", "--collection", "characters"], **env).exit_code == 0
    assert run_module(["run", "--once", "--audit-every", "0"], env=env).returncode == 0


def test_with_a_collection_asked_for_the_backlog_is_that_collections(
    setup: tuple[dict[str, str], Server, sqlite3.Connection],
) -> None:
    # status, check and audit named one collection, but counted and timed every entry waiting
    env, _, app = setup
    assert run_module(["init"], env=env).returncode == 0
    assert run_module(["run", "--once", "--audit-every", "0"], env=env).returncode == 0
    app.execute(ROW_SQL, make_row(7))  # a change of `sequences`, waiting an hour
    app.execute("UPDATE outbox SET enqueued_at = enqueued_at - 3600")
    characters_only = ["--collection", "characters", "--json"]
    status = json.loads(invoke(["status", *characters_only], **env).output)
    assert (status["pending"], status["oldest_pending_age_s"]) == (0, None)
    figures = json.loads(invoke(["check", *characters_only], **env).output)
    assert figures["pending"] == 0 and "waited" not in figures["summary"]
    audited = invoke(["audit", "--max-lag", "10m", "--collection", "characters"], **env)
    assert audited.exit_code == 0 and "stalled" not in audited.output, audited.output
    everything = json.loads(invoke(["status", "--json"], **env).output)
    assert everything["pending"] == 1 and everything["oldest_pending_age_s"] >= 3600
    stalled = invoke(["audit", "--max-lag", "10m", "--collection", "sequences"], **env)
    assert stalled.exit_code == 1 and "stalled:" in stalled.output


def test_with_a_collection_asked_for_the_last_audit_is_that_collections(
    setup: tuple[dict[str, str], Server, sqlite3.Connection],
) -> None:
    # the daemon's audit record summed every collection: check --collection characters warned
    # of the drift the audit had found (and repaired) in sequences
    env, server, app = setup
    assert run_module(["init"], env=env).returncode == 0
    app.executemany(ROW_SQL, [make_row(1), make_row(2)])
    assert run_module(["run", "--once", "--audit-every", "0"], env=env).returncode == 0
    httpx.delete(
        f"{server.url}/collections/sequences/documents/2", headers={"X-TYPESENSE-API-KEY": API_KEY}
    ).raise_for_status()
    assert run_module(["run", "--once"], env=env).returncode == 0  # audits at start: repairs
    sequences = json.loads(invoke(["status", "--collection", "sequences", "--json"], **env).output)
    assert sequences["last_audit"]["drift"]["missing"] == 1
    assert sequences["last_audit"]["enqueued"] == 1
    figures = json.loads(invoke(["check", "--collection", "characters", "--json"], **env).output)
    assert "drift" not in figures["summary"], figures["summary"]
    status = json.loads(invoke(["status", "--collection", "characters", "--json"], **env).output)
    assert status["last_audit"]["consistent"] and status["last_audit"]["enqueued"] == 0
    assert list(status["last_audit"]["collections"]) == ["characters"]
    whole = json.loads(invoke(["check", "--json"], **env).output)
    assert "the last audit found drift (1 missing) and repaired it" in whole["summary"]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (('name = "age"', 'name = "age", colour = "red"'), "fields[2] (age): unknown key 'colour'"),
        (
            ('type = "float"', 'type = "double"'),
            "fields[3] (weight): type: unknown Typesense type 'double'",
        ),
        (
            ("optional = true, sort = true", 'optional = "yes", sort = true'),
            "fields[2] (age): optional: expected true or false, got a string",
        ),
        (
            ('where = "deleted_at IS NULL"', 'where = "deleted_at IS NUL"'),
            "(table characters): SQLite refuses its sql or where",
        ),
        (
            ('"int32", optional = true', '"int32", sql = "max(age)", optional = true'),
            "(table characters): field age: its sql must give a value of each row, not of all "
            "rows together (an aggregate, a window): misuse of aggregate function max()",
        ),
        (
            ('key = "slug"', 'key = "handle"'),
            "(table characters): table characters has no column handle",
        ),
        (
            ('collection = "characters"', 'collection = "sequences"'),
            "collection: 'sequences' is also the collection of [[sync]] 1",
        ),
        (
            ("[[sync.depends_on]]", "extra = 1\n[[sync.depends_on]]"),
            "[[sync]] 2 (table characters): unknown key 'extra'",
        ),
    ],
)
def test_a_mistake_in_the_file_is_one_line_naming_the_file_the_entry_and_the_key(
    tmp_path: Path, change: tuple[str, str], says: str
) -> None:
    # no Typesense: a mistake in the file stops every command before it asks one
    env, _ = example(tmp_path, f"http://127.0.0.1:{free_port()}")
    config = Path(env["OUTBOX_SYNC_CONFIG"])
    assert change[0] in EXAMPLE
    config.write_text(EXAMPLE.replace(change[0], change[1], 1))
    for command in (["init"], ["status"], ["config"]):
        result = run_module(command, env=env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (command, result.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"Error: {config}, [[sync]] ")
        assert says in lines[0], lines[0]


@pytest.mark.parametrize(
    "fields",
    [
        'fields = { name = "string", bio = "string" }',
        '[sync.fields.name]\ntype = "string"\nfacet = true\n[sync.fields.bio]\ntype = "string"',
    ],
)
def test_fields_given_as_a_table_are_one_line_showing_them_as_the_array_to_write(
    tmp_path: Path, fields: str
) -> None:
    env, _ = example(tmp_path, f"http://127.0.0.1:{free_port()}")
    config = Path(env["OUTBOX_SYNC_CONFIG"])
    entry = '[[sync]]\ntable = "characters"\nkey = "slug"\ncollection = "characters"\n'
    config.write_text(entry + fields + "\n")
    result = run_module(["config"], env=env)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    said = f"Error: {config}, [[sync]] 1 (table characters): fields: expected an array of tables"
    assert line.startswith(said), line
    written = line.split("got a table: write ", 1)[1]
    assert written.startswith("fields = [{ name = ")
    config.write_text(entry + written + "\n")  # what it says to write is the same mapping
    result = run_module(["config"], env=env)
    assert result.returncode == 0, result.stderr
    facet = ", facet = true" if "facet" in fields else ""
    assert f'{{ name = "name", type = "string"{facet} }},' in result.stdout
    assert '{ name = "bio", type = "string" },' in result.stdout


def test_the_fields_to_write_keep_text_outside_the_bmp_as_toml_reads_it(tmp_path: Path) -> None:
    env, _ = example(tmp_path, f"http://127.0.0.1:{free_port()}")
    config = Path(env["OUTBOX_SYNC_CONFIG"])
    entry = '[[sync]]\ntable = "characters"\nkey = "slug"\ncollection = "characters"\n'
    config.write_text(entry + '[sync.fields.bio]\ntype = "string"\nsql = "bio || \'\U0001f3ad\'"\n')
    said = run_module(["config"], env=env).stderr.strip()
    written = said.split("got a table: write ", 1)[1]
    config.write_text(entry + written + "\n")  # json.dumps's surrogate pairs: TOML refuses them
    result = run_module(["config"], env=env)
    assert result.returncode == 0, result.stderr
    assert "sql = \"bio || '\U0001f3ad'\"" in result.stdout


def test_a_key_no_document_can_have_is_an_error_only_while_its_row_is_covered(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """A character keyed '' is a sync error naming the key while its row is there and not soft
    deleted. A tag of a character '' that is not there, or soft deleted, re-syncs no record:
    no error. (The daemon reported one, found by tests/test_model.py.)"""
    path = tmp_path / "app.db"
    app = app_connection(path)
    app.executescript(f"{CHARACTERS}; {TAGS};")
    db, sync = mapping_worker(path, characters_mapping(collection), typesense_server, collection)
    app.execute("INSERT INTO character_tags (slug, tag) VALUES ('', 'orphan')")
    drain(sync)
    assert sync_errors.find(db) == []
    app.execute(CHARACTER_SQL, character(""))
    drain(sync)
    [error] = sync_errors.find(db)
    assert error["record_key"] == "" and error["op"] == "upsert"
    assert error["error"] == "slug: is empty, which Typesense cannot hold as an id"
    assert json.loads(error["document"])["slug"] == ""  # the row, as for any invalid one
    app.execute("UPDATE characters SET deleted_at = 'now' WHERE slug = ''")
    drain(sync)
    assert sync_errors.find(db) == []  # closed: no document is wanted any more
    app.execute("DELETE FROM character_tags")  # re-syncs '', soft deleted
    drain(sync)
    assert sync_errors.find(db) == [] and export(typesense_server, collection) == {}
    db.close()


def test_a_key_that_is_not_utf8_is_an_error_and_never_names_another_record(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """A slug stored as TEXT that is not UTF-8 was decoded with a replacement character: its
    upsert was dropped with no error, and its delete deleted the document of the character
    whose slug that decoding spells (found by a hostile review)."""
    app, mapping, db = initialized_characters(tmp_path / "app.db", collection)
    index = characters_index(db, mapping, typesense_server, collection)
    sync = worker.daemon(db, [index])
    app.execute(CHARACTER_SQL, character("a\ufffd"))  # what b"a\xff" decodes to, replaced
    insert_not_utf8(app, b"a\xff")
    drain(sync)
    assert set(export(typesense_server, collection)) == {"a\ufffd"}
    [error] = sync_errors.find(db)
    assert error["error"] == "slug: is not valid UTF-8 (bad byte at offset 1)"
    app.execute("DELETE FROM characters WHERE slug = CAST(? AS TEXT)", (b"a\xff",))
    drain(sync)
    assert set(export(typesense_server, collection)) == {"a\ufffd"}
    assert sync_errors.find(db) == []  # closed: the record is gone


def items_tagged_by_text(
    tmp_path: Path,
    server: Server,
    collection: str,
    fields: tuple[Field, ...],
    where: str | None = None,
) -> tuple[sqlite3.Connection, Database, worker.Worker]:
    """`items` (INTEGER key) mapped with a dependency `item_tags` whose item_id is TEXT: the
    application's connection, the daemon's database and its worker."""
    items = Mapping(
        table="items",
        key="id",
        collection=collection,
        fields=fields,
        where=where,
        depends_on=(Dependency("item_tags", "item_id"),),
    )
    app = app_connection(tmp_path / "items.db")
    app.executescript(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL);"
        "CREATE TABLE item_tags (item_id TEXT, tag TEXT);"
    )
    db, sync = mapping_worker(tmp_path / "items.db", items, server, collection)
    return app, db, sync


def test_a_dependency_holding_the_key_as_another_type_syncs_its_record(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """item_tags.item_id is TEXT, items.id an INTEGER: the trigger queues the text '5', which
    SQLite matches to item 5 but Python did not. A tag whose line the Python mapper writes (a
    quote makes an escape) was taken for a gone record and acknowledged; an error recorded
    under 5 stayed open; two requests in flight could hold the one record (found by a hostile
    review)."""
    tags = (
        "(SELECT json_group_array(tag) FROM"
        " (SELECT tag FROM item_tags t WHERE t.item_id = items.id ORDER BY tag))"
    )
    fields = (Field("name", "string"), Field("tags", "string[]", sql=tags))
    app, db, sync = items_tagged_by_text(tmp_path, typesense_server, collection, fields)
    app.execute("INSERT INTO items (id, name) VALUES (5, 'five')")
    app.execute("INSERT INTO item_tags (item_id, tag) VALUES (5, NULL)")  # not a string
    drain(sync)
    [error] = sync_errors.find(db)
    assert (error["record_key"], error["error"]) == (5, "tags: element 0 is null, expected string")
    app.execute("""UPDATE item_tags SET tag = 'say "hi"' WHERE item_id = '5'""")
    assert app.execute("SELECT typeof(record_key) FROM outbox").fetchall() == [("text",)]
    drain(sync)
    assert export(typesense_server, collection)["5"]["tags"] == ['say "hi"']
    assert sync_errors.find(db) == []


def test_a_dependency_of_another_type_taking_its_row_out_of_where_removes_the_document(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """item_tags.item_id is TEXT and `where` reads it: deleting the tag queues the text '5' and
    nothing else, the drain finds no row the mapping covers, and no document id in the text
    of an INTEGER mapping: it took the record for one no document can have, and document 5
    stayed in search until the daily audit (found by a hostile review)."""
    where = "EXISTS (SELECT 1 FROM item_tags AS t WHERE t.item_id = items.id)"
    fields = (Field("name", "string"),)
    app, db, sync = items_tagged_by_text(tmp_path, typesense_server, collection, fields, where)
    app.execute("INSERT INTO items (id, name) VALUES (5, 'five')")
    app.execute("INSERT INTO item_tags (item_id, tag) VALUES (5, 'shown')")
    drain(sync)
    assert list(export(typesense_server, collection)) == ["5"]
    app.execute("DELETE FROM item_tags")
    assert app.execute("SELECT record_key FROM outbox").fetchall() == [("5",)]
    drain(sync)
    assert export(typesense_server, collection) == {}
    assert sync_errors.find(db) == []


def test_a_key_that_is_not_utf8_found_by_init_is_a_sync_error_too(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """The fill queued such a row under its key decoded with a replacement character, which
    names no row: the drain took it for a deleted record, and it ended with no document and
    no error (found by a hostile review)."""
    path = tmp_path / "app.db"
    app = app_connection(path)
    app.executescript(f"{CHARACTERS}; {TAGS};")
    app.execute(CHARACTER_SQL, character("good"))
    bad = character("x")[1:]
    app.execute(CHARACTER_SQL.replace("(?,", "(CAST(? AS TEXT),", 1), (b"A\xffB", *bad))
    db = Database(path, create=True)
    assert schema.init(db, [characters_mapping(collection)]).filling == {"characters": 2}
    [mapping] = schema.check(db, [characters_mapping(collection)])
    index = TypesenseIndex([typesense_server.url], API_KEY, collection, mapping=mapping)
    index.ensure_collection()
    drain(worker.daemon(db, [index]))
    assert set(export(typesense_server, collection)) == {"good"}
    [error] = sync_errors.find(db)
    assert error["error"] == "slug: is not valid UTF-8 (bad byte at offset 1)"


def one_mapping(
    tmp_path: Path, schema_sql: str, entry: str
) -> tuple[sqlite3.Connection, Path, Path]:
    """An application's database made by `schema_sql`, and beside it a configuration file of
    the one [[sync]] `entry`: the application's connection, the database and the file."""
    db_path, config = tmp_path / "app.db", tmp_path / "outbox-sync.toml"
    config.write_text(f"[[sync]]\n{entry}")
    app = app_connection(db_path)
    app.executescript(schema_sql)
    return app, db_path, config


def test_generated_columns_map_like_any_other(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """A field read from a generated column (here JSON pulled out of a document column, VIRTUAL
    and STORED) was refused: "table notes has no column title, slug", for `PRAGMA table_info`
    leaves generated columns out. Filled, updated through the column they come from, and
    audited, as a plain column is."""
    app, db_path, config = one_mapping(
        tmp_path,
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, data TEXT NOT NULL,"
        " title TEXT GENERATED ALWAYS AS (json_extract(data, '$.title')) VIRTUAL,"
        " slug TEXT GENERATED ALWAYS AS (lower(json_extract(data, '$.slug'))) STORED)",
        f'table = "notes"\nkey = "id"\ncollection = "{collection}"\nfields = [\n'
        '  { name = "title", type = "string" },\n'
        '  { name = "slug", type = "string", optional = true },\n]\n',
    )
    insert = "INSERT INTO notes (id, data) VALUES (?, ?)"
    app.execute(insert, (1, '{"title": "Hello", "slug": "HeLLo"}'))
    env = {"OUTBOX_SYNC_CONFIG": str(config)}
    for command in (["init"], ["run", "--once"]):
        result = invoke(command, typesense_server, db_path, **env)
        assert result.exit_code == 0, result.output
    app.execute("UPDATE notes SET data = ? WHERE id = 1", ('{"title": "Changed", "slug": "X"}',))
    app.execute(insert, (2, '{"title": "Two"}'))
    assert invoke(["run", "--once"], typesense_server, db_path, **env).exit_code == 0
    assert export(typesense_server, collection) == {
        "1": {"id": "1", "title": "Changed", "slug": "x"},
        "2": {"id": "2", "title": "Two"},
    }
    audit = invoke(["audit"], typesense_server, db_path, **env)
    assert audit.exit_code == 0, audit.output


def test_a_table_whose_names_need_quoting_is_filled_synced_audited_and_reindexed(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """A table named with a space, its key column too, a column named like an SQL keyword, in
    a STRICT table. The fill, the audit and the reindex page the table by a rowid SQL named
    with the table's name unquoted: `near "notes": syntax error`, so the fill queued every row
    instead, and every audit failed. And the first `init` said it had put back triggers that
    were only new (each problem was matched to the new triggers by its first word)."""
    app, db_path, config = one_mapping(
        tmp_path,
        'CREATE TABLE "my notes" ("note id" INTEGER PRIMARY KEY, "first name" TEXT NOT NULL,'
        ' "order" INTEGER NOT NULL) STRICT',
        f'table = "my notes"\nkey = "note id"\ncollection = "{collection}"\n'
        'fields = [\n  { name = "first_name", column = "first name", type = "string" },\n'
        '  { name = "order", type = "int32" },\n]\n',
    )
    insert = 'INSERT INTO "my notes" VALUES (?, ?, ?)'
    app.executemany(insert, [(1, "ana", 3), (2, "bo", 1)])
    env = {"OUTBOX_SYNC_CONFIG": str(config)}
    result = invoke(["init"], typesense_server, db_path, **env)
    assert result.output.startswith("initialised"), result.output  # nothing "put back"
    result = invoke(["run", "--once"], typesense_server, db_path, **env)
    logs = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [e["rows"] for e in logs if e["event"] == "fill_finished"] == [2], result.output
    app.execute('UPDATE "my notes" SET "first name" = \'cy\' WHERE "note id" = 2')
    app.execute(insert, (3, "di", 2))
    assert invoke(["run", "--once"], typesense_server, db_path, **env).exit_code == 0
    expected = {
        "1": {"id": "1", "first_name": "ana", "order": 3},
        "2": {"id": "2", "first_name": "cy", "order": 1},
        "3": {"id": "3", "first_name": "di", "order": 2},
    }
    assert export(typesense_server, collection) == expected
    audit = invoke(["audit"], typesense_server, db_path, **env)
    assert audit.exit_code == 0, audit.output
    reindexed = invoke(["reindex"], typesense_server, db_path, **env)
    assert reindexed.output.startswith(f"reindexed 3 rows of '{collection}'"), reindexed.output
    assert export(typesense_server, collection) == expected


def test_a_view_mapped_as_a_table_is_refused_saying_it_is_a_view(tmp_path: Path) -> None:
    """No trigger sees a view's rows change: init said the view "does not exist"."""
    app, db_path, config = one_mapping(
        tmp_path,
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL);"
        " CREATE VIEW cheap AS SELECT * FROM items WHERE price < 2;",
        'table = "Cheap"\nkey = "id"\ncollection = "cheap"\n'
        'fields = [{ name = "name", type = "string" }]\n',
    )
    line = one_line(invoke(["init"], db_path=db_path, OUTBOX_SYNC_CONFIG=str(config)))
    assert line == (
        f"Error: {config}, [[sync]] 1 (table Cheap): cheap in {db_path} is a view: outbox-sync "
        "syncs tables (no trigger sees a view's rows change); map the table it reads, with a "
        "`where`"
    )
    assert "outbox" not in {row[0] for row in app.execute("SELECT name FROM sqlite_master")}


def test_an_escaped_lone_surrogate_in_an_array_is_a_sync_error_not_a_crash(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """`["\\ud83d"]` (half an emoji, as JavaScript's JSON.stringify writes it) goes to the
    Python mapper, for its escape, and json.loads makes a lone surrogate of it, which UTF-8
    cannot hold: the daemon failed on it at every start, and nothing synced (found by a hostile
    review)."""
    items = Mapping(
        table="items",
        key="id",
        collection=collection,
        fields=(Field("tags", "string[]"), Field("counts", "int32[]", optional=True)),
    )
    app = app_connection(tmp_path / "items.db")
    app.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, tags TEXT, counts TEXT)")
    db, sync = mapping_worker(tmp_path / "items.db", items, typesense_server, collection)
    app.executemany(
        "INSERT INTO items (id, tags, counts) VALUES (?, ?, ?)",
        [
            (1, '["fine"]', None),
            (2, '["ok", "\\ud83d"]', None),
            (3, '["fine too"]', '["\\ud83d"]'),
            (4, '["\\ud83d\\ude00"]', None),  # a whole emoji, escaped: valid
        ],
    )
    drain(sync)
    assert sorted(export(typesense_server, collection)) == ["1", "4"]
    assert export(typesense_server, collection)["4"]["tags"] == ["\U0001f600"]
    errors = {e["record_key"]: e["error"] for e in sync_errors.find(db)}
    assert errors == {
        2: "tags: element 1 is text '\\ud83d' with a lone surrogate, which UTF-8 cannot hold",
        3: "counts: element 0 is text '\\ud83d' with a lone surrogate, which UTF-8 cannot hold",
    }
    assert db.conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)


def test_an_invalid_row_whose_sql_field_sqlite_fails_on_is_a_sync_error(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """The verdict stops at the first check that fails (a required field NULL), so SQLite did
    not meet the `sql` field it fails on until the row was read again for the Python mapper:
    that read failed for the whole batch, and the daemon stopped at every start, nothing
    synced (found by a hostile review)."""
    items = Mapping(
        table="items",
        key="id",
        collection=collection,
        fields=(
            Field("name", "string"),
            Field("color", "string", optional=True, sql="json_extract(data, '$.color')"),
        ),
    )
    app = app_connection(tmp_path / "items.db")
    app.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, data TEXT)")
    db, sync = mapping_worker(tmp_path / "items.db", items, typesense_server, collection)
    app.executemany(
        "INSERT INTO items VALUES (?, ?, ?)",
        [(1, "one", '{"color": "red"}'), (2, None, "not json"), (3, None, "{}"), (4, "four", None)],
    )
    drain(sync)
    assert sorted(export(typesense_server, collection)) == ["1", "4"]
    errors = {e["record_key"]: e["error"] for e in sync_errors.find(db)}
    assert errors == {
        2: "SQLite cannot read its row as the mapping says: malformed JSON",
        3: "name: is NULL but the field is required",
    }
    assert db.conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)


def test_a_row_sqlite_fails_on_found_through_a_dependency_of_another_type_is_its_records_error(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """A tag made item 5's `sql` field fail, and the dependency queued the text '5': the batch
    was read entry by entry, and the error recorded under '5', which the row's key 5 never
    closes: it stayed open once the row synced, beside any error under 5 (found by a
    hostile review)."""
    color = (
        "(SELECT json_extract(tag, '$.color') FROM item_tags AS t"
        " WHERE t.item_id = items.id ORDER BY tag LIMIT 1)"
    )
    fields = (Field("name", "string"), Field("color", "string", optional=True, sql=color))
    app, db, sync = items_tagged_by_text(tmp_path, typesense_server, collection, fields)
    app.executemany("INSERT INTO items (id, name) VALUES (?, ?)", [(5, "five"), (6, "six")])
    drain(sync)
    app.execute("INSERT INTO item_tags (item_id, tag) VALUES ('5', 'not json')")
    app.execute("UPDATE items SET name = 'SIX' WHERE id = 6")
    assert app.execute("SELECT record_key FROM outbox ORDER BY id").fetchall() == [("5",), (6,)]
    drain(sync)
    [error] = sync_errors.find(db)
    assert error["record_key"] == 5
    assert error["error"] == "SQLite cannot read its row as the mapping says: malformed JSON"
    assert export(typesense_server, collection)["6"]["name"] == "SIX"
    app.execute("""UPDATE item_tags SET tag = '{"color": "red"}' WHERE item_id = '5'""")
    drain(sync)
    assert export(typesense_server, collection)["5"]["color"] == "red"
    assert sync_errors.find(db) == []


def test_a_null_key_row_whose_where_sqlite_fails_on_is_a_sync_error_and_can_be_retried(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """A row with a NULL key, which the claim does not look up, is judged by whether the
    mapping covers it: its `where` failed on the row's text (not JSON), and the daemon
    stopped at every start; `errors show` and `errors retry` failed on it too (found by a
    hostile review)."""
    items = Mapping(
        table="items",
        key="code",
        collection=collection,
        fields=(Field("name", "string"),),
        where="json_extract(data, '$.shown') = 1",
    )
    app = app_connection(tmp_path / "items.db")
    app.execute("CREATE TABLE items (code TEXT, name TEXT, data TEXT)")
    db, sync = mapping_worker(tmp_path / "items.db", items, typesense_server, collection)
    rows = [("a", "one", '{"shown": 1}'), (None, "two", "not json")]
    app.executemany("INSERT INTO items VALUES (?, ?, ?)", rows)
    drain(sync)
    assert list(export(typesense_server, collection)) == ["a"]
    [error] = sync_errors.find(db)
    assert error["record_key"] is None
    assert error["error"] == "SQLite cannot read its row as the mapping says: malformed JSON"
    assert sync_errors.get(db, error["id"], {items.name: items})["record_exists"] is True
    [retried] = sync_errors.retry(db, {items.name: items}, [error["id"]])
    assert retried.op == "upsert"
    drain(sync)
    [again] = sync_errors.find(db)
    assert (again["record_key"], again["error"]) == (None, error["error"])
    assert again["id"] != error["id"]


def test_a_key_two_rows_hold_is_given_up_on_once_when_sqlite_fails_on_one(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """The entry-by-entry read names each entry's record by the rows of its key: each entry
    came once for each row of a key a loose key column holds twice."""
    items = Mapping(
        table="items",
        key="code",
        collection=collection,
        fields=(Field("color", "string", optional=True, sql="json_extract(data, '$.color')"),),
    )
    app = app_connection(tmp_path / "items.db")
    app.execute("CREATE TABLE items (code TEXT, data TEXT)")
    db, sync = mapping_worker(tmp_path / "items.db", items, typesense_server, collection)
    app.execute("INSERT INTO items VALUES ('b', '{}')")
    drain(sync)
    app.execute("""INSERT INTO items VALUES ('a', 'not json'), ('a', '{"color": "red"}')""")
    app.execute("UPDATE items SET data = '{\"color\": \"blue\"}' WHERE code = 'b'")
    assert db.claimed_entries(items, 0, 10) == [(2, 0, "a"), (3, 0, "a"), (4, 0, "b")]
    drain(sync)
    assert export(typesense_server, collection)["b"]["color"] == "blue"
    [error] = sync_errors.find(db)
    assert error["record_key"] == "a"
