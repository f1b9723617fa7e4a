"""Hostile review of declarative mappings: depends_on, several mappings, TEXT keys."""

from pathlib import Path

import pytest

from outbox_sync import schema, sync_errors, worker
from outbox_sync.errors import DatabaseError
from outbox_sync.typesense_index import TypesenseIndex
from tests.support.characters import (
    CHARACTER_SQL,
    CHARACTERS,
    character,
    characters_index,
    initialized_characters,
)
from tests.support.daemon import drain
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
