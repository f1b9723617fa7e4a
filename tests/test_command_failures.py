"""Every command, old and new, meets a database or a Typesense it cannot use with one line that
says what is wrong and what to do, a non-zero exit and no traceback."""

import json
from pathlib import Path

import pytest

from outbox_sync.localserver import free_port
from tests.support.app import app_connection
from tests.support.cli import invoke, one_line
from tests.support.typesense import Server

DATABASE_COMMANDS = [
    ["status"],
    ["errors", "list"],
    ["errors", "show", "1"],
    ["errors", "retry", "--all"],
    ["errors", "resolve", "1", "--note", "x"],
    ["audit"],
    ["report"],
    ["run", "--once"],
]
TYPESENSE_COMMANDS = [["audit"], ["search", "*"]]
TYPESENSE_PROBLEMS = {
    "unreachable": "check that Typesense is up and healthy at http://127.0.0.1:",
    "wrong key": "refused the API key (401): check TYPESENSE_API_KEY or --api-key-file",
    "missing collection": "does not exist (404: Not Found): check --collection "
    "(OUTBOX_SYNC_COLLECTION); `outbox-sync run` creates the collection",
}


def broken(problem: str, server: Server, collection: str) -> dict[str, str | None]:
    """Settings that make Typesense fail in the given way (the fixture collection is never
    created, so it is missing unless the command creates it)."""
    if problem == "unreachable":
        return {"TYPESENSE_URL": f"http://127.0.0.1:{free_port()}"}
    if problem == "wrong key":
        return {"TYPESENSE_API_KEY": "wrong-key"}
    return {}


@pytest.mark.parametrize("args", DATABASE_COMMANDS, ids=" ".join)
def test_a_missing_database_says_to_init(
    tmp_path: Path, typesense_server: Server, args: list[str]
) -> None:
    missing = tmp_path / "missing.db"
    result = invoke(args, typesense_server, missing, "x")
    assert f"database {missing} does not exist: create it with `outbox-sync init" in one_line(
        result
    )


@pytest.mark.parametrize("args", DATABASE_COMMANDS, ids=" ".join)
def test_an_uninitialised_database_says_to_init(
    tmp_path: Path, typesense_server: Server, args: list[str]
) -> None:
    # the application's table, as it had it before outbox-sync (no outbox, no triggers)
    plain = tmp_path / "plain.db"
    app_connection(plain).execute(
        "CREATE TABLE sequences (id INTEGER PRIMARY KEY, element_type TEXT, element_id INTEGER,"
        " sequence_number INTEGER, comment TEXT, created_at TEXT)"
    )
    result = invoke(args, typesense_server, plain, "x")
    assert f"run `outbox-sync init --db {plain}`" in one_line(result)


@pytest.mark.parametrize("args", DATABASE_COMMANDS, ids=" ".join)
def test_a_table_init_could_not_sync_says_what_it_lacks(
    tmp_path: Path, typesense_server: Server, args: list[str]
) -> None:
    # `init` would refuse it too: the advice is the table, not init
    plain = tmp_path / "plain.db"
    app_connection(plain).execute("CREATE TABLE sequences (id INTEGER PRIMARY KEY)")
    line = one_line(invoke(args, typesense_server, plain, "x"))
    assert "table sequences has no column element_type, element_id," in line
    assert line.endswith(
        "syncs through a mapping of your own: --config FILE (OUTBOX_SYNC_CONFIG)"
        " with a [[sync]] entry (docs/tables.md)"
    )


@pytest.mark.parametrize("problem", TYPESENSE_PROBLEMS)
@pytest.mark.parametrize("args", TYPESENSE_COMMANDS, ids=" ".join)
def test_typesense_trouble_says_what_to_do(
    db_path: Path, typesense_server: Server, collection: str, args: list[str], problem: str
) -> None:
    env = broken(problem, typesense_server, collection)
    result = invoke(args, typesense_server, db_path, collection, **env)
    assert TYPESENSE_PROBLEMS[problem] in one_line(result)


@pytest.mark.parametrize("problem", TYPESENSE_PROBLEMS)
def test_status_reports_typesense_trouble_with_what_to_do(
    db_path: Path, typesense_server: Server, collection: str, problem: str
) -> None:
    # status is a report: it exits 0 and says what is wrong in typesense_error
    env = broken(problem, typesense_server, collection)
    result = invoke(["status", "--json"], typesense_server, db_path, collection, **env)
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["typesense_ok"] is False
    assert TYPESENSE_PROBLEMS[problem] in status["typesense_error"]


def test_the_daemon_refuses_a_wrong_key_in_one_line(
    db_path: Path, typesense_server: Server, collection: str
) -> None:
    args = ["--log-level", "error", "run", "--once"]  # without the "started" line
    result = invoke(args, typesense_server, db_path, collection, TYPESENSE_API_KEY="wrong-key")
    assert TYPESENSE_PROBLEMS["wrong key"] in one_line(result)
