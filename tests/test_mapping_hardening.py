"""Mappings of any table under writes a hostile review made: depends_on (a key held as REAL, a
table depended on through two columns), a mapped table gone when the daemon starts."""

from pathlib import Path

import pytest

from outbox_sync import schema, sync_errors, worker
from outbox_sync.errors import DatabaseError
from outbox_sync.mapping import Dependency, Field, Mapping
from outbox_sync.typesense_index import TypesenseIndex
from tests.support.app import app_connection
from tests.support.characters import (
    CHARACTER_SQL,
    CHARACTERS,
    character,
    characters_index,
    initialized_characters,
)
from tests.support.daemon import drain, mapping_worker
from tests.support.typesense import API_KEY, Server, export


def test_a_daemon_started_while_a_text_keyed_table_is_gone_reads_it_anew_once_back(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """A daemon that starts while a migration has the mapped table renamed away takes no key
    kind from it: `check` left the mapping unbound, INTEGER by default. Once the table was
    back, every TEXT key was judged so: each row a sync error ("expected an integer"), the
    audit's too. It stops now, as for a key column made another type, and its next start
    reads the table as it is."""
    app, mapping, db = initialized_characters(tmp_path / "app.db", collection)
    index = characters_index(db, mapping, typesense_server, collection)
    app.execute(CHARACTER_SQL, character("bob"))
    drain(worker.daemon(db, [index]))
    app.execute("ALTER TABLE characters RENAME TO characters_old")  # a migration begins
    [unbound] = schema.check(db, [mapping])  # the daemon starts meanwhile
    index = TypesenseIndex([typesense_server.url], API_KEY, collection, mapping=unbound)
    sync = worker.daemon(db, [index], audit_every_s=0)
    app.executescript(  # the migration ends
        f"{CHARACTERS}; INSERT INTO characters SELECT * FROM characters_old;"
        " DROP TABLE characters_old;"
    )
    app.execute(CHARACTER_SQL, character("alice"))
    with pytest.raises(
        DatabaseError, match=r"table characters .* was gone when the daemon started"
    ):
        drain(sync)
    sync.jobs["audit"].at_stop()
    [bound] = schema.check(db, [mapping])  # the next start
    index = TypesenseIndex([typesense_server.url], API_KEY, collection, mapping=bound)
    drain(worker.daemon(db, [index], audit_every_s=0))
    assert sync_errors.find(db) == []
    assert set(export(typesense_server, collection)) == {"alice", "bob"}


def items_mapping(collection: str) -> Mapping:
    """`items` (an INTEGER key) with the tags of `item_tags`."""
    tags = (
        "(SELECT json_group_array(tag) FROM"
        " (SELECT tag FROM item_tags t WHERE t.item_id = items.id ORDER BY tag))"
    )
    return Mapping(
        table="items",
        key="id",
        collection=collection,
        fields=(Field("name", "string"), Field("tags", "string[]", sql=tags)),
        depends_on=(Dependency("item_tags", "item_id"),),
    )


def test_an_item_deleted_with_its_tags_held_as_real_leaves_no_document(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """item_tags.item_id is REAL: a tag of item 5 holds 5.0, and its trigger queues 5.0. Deleting
    the item and its tags queued (5, delete) then (5.0, upsert): one key to Python, so the
    batch kept the last, whose REAL key names no document, and acknowledged the item's delete
    unapplied: its document stayed in search."""
    path = tmp_path / "items.db"
    app = app_connection(path)
    app.executescript(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL);"
        "CREATE TABLE item_tags (item_id REAL, tag TEXT);"
    )
    db, sync = mapping_worker(path, items_mapping(collection), typesense_server, collection)
    app.execute("INSERT INTO items (id, name) VALUES (5, 'five')")
    app.execute("INSERT INTO item_tags (item_id, tag) VALUES (5, 'red')")
    drain(sync)
    assert export(typesense_server, collection)["5"]["tags"] == ["red"]
    app.executescript(
        "BEGIN; DELETE FROM items WHERE id = 5; DELETE FROM item_tags WHERE item_id = 5; COMMIT;"
    )
    drain(sync)
    assert export(typesense_server, collection) == {}
    assert sync_errors.find(db) == []


def test_a_table_depended_on_through_two_key_columns_resyncs_the_documents_of_both(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """`friendships` names a person in each of two columns, so the mapping depends on it twice
    (`a`, then `b`). Both dependencies made triggers of one name: `init` failed ("trigger
    friendships_outbox_people_insert already exists") and nothing could sync."""
    friends = (
        "(SELECT json_group_array(friend) FROM (SELECT f.b AS friend FROM friendships f"
        " WHERE f.a = people.slug UNION SELECT f.a FROM friendships f WHERE f.b = people.slug"
        " ORDER BY 1))"
    )
    people = Mapping(
        table="people",
        key="slug",
        collection=collection,
        fields=(Field("friends", "string[]", sql=friends),),
        depends_on=(Dependency("friendships", "a"), Dependency("friendships", "b")),
    )
    path = tmp_path / "people.db"
    app = app_connection(path)
    app.executescript(
        "CREATE TABLE people (slug TEXT PRIMARY KEY);"
        "CREATE TABLE friendships (a TEXT, b TEXT);"
        "INSERT INTO people VALUES ('ann'), ('bob'), ('cy');"
    )
    _, sync = mapping_worker(path, people, typesense_server, collection, backfill=True)
    app.execute("INSERT INTO friendships VALUES ('ann', 'bob')")
    drain(sync)
    found = {slug: doc["friends"] for slug, doc in export(typesense_server, collection).items()}
    assert found == {"ann": ["bob"], "bob": ["ann"], "cy": []}
    app.execute("UPDATE friendships SET b = 'cy'")  # bob's friendship is cy's now
    drain(sync)
    found = {slug: doc["friends"] for slug, doc in export(typesense_server, collection).items()}
    assert found == {"ann": ["cy"], "bob": [], "cy": ["ann"]}


OUR_NAMES = "outbox_sync_id INTEGER, outbox_sync_delete INTEGER NOT NULL, outbox_sync_line TEXT"


@pytest.mark.parametrize(
    ("table", "key"),
    [
        (f"CREATE TABLE notes (id INTEGER PRIMARY KEY, outbox_sync_key TEXT, {OUR_NAMES})", "id"),
        (
            f"CREATE TABLE notes (outbox_sync_key TEXT PRIMARY KEY, id INT, {OUR_NAMES})",
            "outbox_sync_key",
        ),
    ],
    ids=["integer-key", "text-key-named-as-ours"],
)
def test_a_table_with_columns_named_as_the_drains_own_syncs_them(
    tmp_path: Path, typesense_server: Server, collection: str, table: str, key: str
) -> None:
    """The drain's query named the outbox's columns `outbox_sync_id`, `outbox_sync_key` and
    `outbox_sync_delete` beside the table's: a table with a column of one of those names made
    every change of it a sync error ("ambiguous column name"). The table's columns are its
    own, in the mapping's fields and its `where` too."""
    path = tmp_path / "notes.db"
    app = app_connection(path)
    app.execute(table)
    mapping = Mapping(
        table="notes",
        key=key,
        collection=collection,
        fields=(Field("outbox_sync_id", "int32"), Field("outbox_sync_line", "string")),
        where="outbox_sync_delete = 0",
    )
    db, sync = mapping_worker(path, mapping, typesense_server, collection)
    insert = (
        f"INSERT INTO notes ({key}, outbox_sync_id, outbox_sync_delete, outbox_sync_line)"
        " VALUES (?, ?, ?, ?)"
    )
    app.executemany(insert, [(1, 10, 0, "kept"), (2, 20, 1, "left out"), (3, 30, 0, "third")])
    drain(sync)
    assert sync_errors.find(db) == []
    found = {
        k: (d["outbox_sync_id"], d["outbox_sync_line"])
        for k, d in export(typesense_server, collection).items()
    }
    assert found == {"1": (10, "kept"), "3": (30, "third")}
    app.execute(f"UPDATE notes SET outbox_sync_delete = 1 WHERE {key} = 1")
    app.execute(f"DELETE FROM notes WHERE {key} = 3")
    app.execute(f"UPDATE notes SET outbox_sync_delete = 0 WHERE {key} = 2")
    drain(sync)
    assert sync_errors.find(db) == []
    assert {k: d["outbox_sync_line"] for k, d in export(typesense_server, collection).items()} == {
        "2": "left out"
    }
