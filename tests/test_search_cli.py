"""`outbox-sync search`: what Typesense holds, without curl, through the collection's alias."""

import json
from pathlib import Path

import click
import pytest

from outbox_sync.worker import Worker
from tests.support.app import ROW_SQL, app_connection
from tests.support.cli import invoke, one_line
from tests.support.daemon import drain
from tests.support.typesense import Server

ROWS = [
    (123, "script", 456, 1, "Initial script creation", "2023-10-01T12:00:00Z"),
    (124, "section", 457, 2, "Opening section", "2023-10-01T12:01:00Z"),
    (125, "script", 458, 0, "Second script draft", "2023-10-01T12:02:00Z"),
]


@pytest.fixture
def indexed(db_path: Path, worker: Worker) -> None:
    app_connection(db_path).executemany(ROW_SQL, ROWS)
    drain(worker)


def search(server: Server, db_path: Path, collection: str, *args: str) -> tuple[int, list[str]]:
    result = invoke(["search", *args, "--json"], server, db_path, collection)
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    return found["found"], [document["id"] for document in found["documents"]]


@pytest.mark.usefixtures("indexed")
def test_search_by_comment_filter_sort_and_limit(
    db_path: Path, typesense_server: Server, collection: str
) -> None:
    assert search(typesense_server, db_path, collection, "initial") == (1, ["123"])
    assert search(typesense_server, db_path, collection, "script") == (2, ["123", "125"])
    assert search(
        typesense_server,
        db_path,
        collection,
        "*",
        "--filter",
        "element_type:=script",
        "--sort",
        "sequence_number:asc",
    ) == (2, ["125", "123"])
    assert search(typesense_server, db_path, collection, "*", "--filter", "id:=124") == (
        1,
        ["124"],
    )
    found, ids = search(typesense_server, db_path, collection, "*", "--limit", "1")
    assert found == 3 and len(ids) == 1
    assert search(typesense_server, db_path, collection, "nothing-like-it") == (0, [])


@pytest.mark.usefixtures("indexed")
def test_the_terminal_view_shows_the_documents(
    db_path: Path, typesense_server: Server, collection: str
) -> None:
    result = invoke(["search", "opening"], typesense_server, db_path, collection)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"found 1 in {collection!r}, showing 1"
    assert lines[1].split() == [
        "124",
        "element_type=section",
        "element_id=457",
        "sequence_number=2",
        "comment=Opening",
        "section",
        "created_at=2023-10-01T12:01:00Z",
    ]


@pytest.mark.usefixtures("indexed")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--filter", "nofield:=3"], "Could not find a filter field named `nofield`"),
        (["--filter", "sequence_number:>>3"], "Error with filter field `sequence_number`"),
        (["--sort", "nofield:desc"], "Could not find a field named `nofield`"),
    ],
)
def test_a_bad_filter_or_sort_is_one_clear_line(
    db_path: Path, typesense_server: Server, collection: str, args: list[str], message: str
) -> None:
    result = invoke(["search", "*", *args], typesense_server, db_path, collection)
    line = one_line(result)
    assert "Typesense refused the search of" in line and message in line
    assert "check QUERY, --filter, --sort and --facet" in line and "does not exist" not in line


@pytest.mark.usefixtures("indexed")
def test_the_query_matches_element_type_too_and_facets_count_per_value(
    db_path: Path, typesense_server: Server, collection: str, worker: Worker
) -> None:
    app_connection(db_path).execute(ROW_SQL, (126, "character", 459, 3, "Hero", "2023-10-01"))
    drain(worker)
    assert search(typesense_server, db_path, collection, "character") == (1, ["126"])

    args = ["search", "*", "--facet", "element_type", "--filter", "sequence_number:<3"]
    result = invoke([*args, "--json"], typesense_server, db_path, collection)
    assert json.loads(result.stdout)["facets"] == {"element_type": {"script": 2, "section": 1}}
    text = invoke(args, typesense_server, db_path, collection).output.splitlines()
    assert text[-1] == "facet element_type: script (2), section (1)"


@pytest.mark.usefixtures("indexed")
def test_the_match_is_highlighted_on_a_terminal_only(
    db_path: Path, typesense_server: Server, collection: str
) -> None:
    on_terminal = invoke(["search", "opening"], typesense_server, db_path, collection, color=True)
    assert click.style("Opening", bold=True, underline=True) + " section" in on_terminal.output
    piped = invoke(["search", "opening"], typesense_server, db_path, collection).output
    assert "comment=Opening section" in piped
    assert "\x1b[" not in piped and "<mark>" not in piped
