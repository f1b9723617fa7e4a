"""The on-call commands against odd data and odd options, as a hostile review tried them:
`--since` far off, keys and errors with line breaks, highlights and facets cut short, the
weekly page under any locale and with stdout closed, an infinite key."""

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from outbox_sync import config_file, schema, sync_errors
from outbox_sync.db import Database
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import Worker, daemon
from tests.support.app import ROW_SQL, app_connection, make_row
from tests.support.characters import CHARACTERS, TAGS, characters_config
from tests.support.cli import ROOT, invoke, one_line, run_module, without_settings
from tests.support.daemon import drain, record_failure
from tests.support.typesense import Server


def test_a_report_from_a_future_since_is_one_clear_line(db_path: Path, db: Database) -> None:
    """`report --since 2099-01-01 --html FILE` (a mistyped year) ended in an IndexError
    traceback: the page charts the days of the window, and one starting after now has none."""
    record_failure(db, 1, 7, "refused", http_status=400, attempts=2)
    page = db_path.parent / "review.html"
    result = invoke(["report", "--since", "2099-01-01", "--html", str(page)], None, db_path)
    assert "Traceback" not in result.output and not isinstance(result.exception, IndexError)
    assert result.exit_code == 2 and "--since" in one_line(result) and "future" in result.output
    # and `errors list` said "no open sync errors matching" of a window that holds nothing
    listed = invoke(["errors", "list", "--since", "2099-01-01"], None, db_path)
    assert listed.exit_code == 2 and "is in the future" in one_line(listed)


def test_a_match_past_the_shown_width_never_prints_a_mark_tag(
    db_path: Path, worker: Worker, typesense_server: Server, collection: str
) -> None:
    """The text view cut the highlighted value at 60 characters, tags included: a match near
    the cut printed `<mark>ne…` as it was, on a terminal or not."""
    comment = "x" * 50 + " needle and more words after it"
    app_connection(db_path).execute(ROW_SQL, make_row(1, comment=comment))
    drain(worker)
    shown = {}
    for color in (False, True):
        result = invoke(["search", "needle"], typesense_server, db_path, collection, color=color)
        assert result.exit_code == 0, result.output
        assert "<mark" not in result.output and "</mark" not in result.output
        shown[color] = result.output
    assert f"comment={'x' * 50} needle a…  created_at=" in shown[False]
    assert f"{'x' * 50} {click.style('needle', bold=True, underline=True)} a…" in shown[True]


def test_the_html_page_is_written_as_the_utf8_it_declares(tmp_path: Path, db_path: Path) -> None:
    """The page says `<meta charset="utf-8">` and was written in the locale's encoding: under
    a locale that is not UTF-8 (here ASCII) `report --html` ended in a UnicodeEncodeError
    traceback, after the text report had been printed."""
    Database(db_path, create=True).close()
    invoke(["init"], None, db_path)
    page = tmp_path / "review.html"
    env = without_settings(
        OUTBOX_SYNC_DB=str(db_path), LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0"
    )
    env["PYTHONPATH"] = str(ROOT)
    result = run_module(["report", "--html", str(page)], env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert '<meta charset="utf-8">' in page.read_text(encoding="utf-8")


def test_errors_list_shows_each_error_on_one_line_whatever_its_key(
    tmp_path: Path, db_path: Path, db: Database
) -> None:
    """The RECORD column printed a TEXT key as it is: a key with a line break split its row in
    two (the second line looked like another error), and an empty key showed as nothing."""
    config = tmp_path / "outbox-sync.toml"
    config.write_text(characters_config())
    _, mappings = config_file.load(config, {})
    app_connection(db_path).executescript(f"{CHARACTERS}; {TAGS};")
    schema.init(db, list(mappings))
    for outbox_id, key in enumerate(["two\nlines", "", "a\tb"], start=1):
        record_failure(db, outbox_id, key, "refused", mapping="characters", http_status=400)
    result = invoke(["errors", "list"], None, db_path, OUTBOX_SYNC_CONFIG=str(config))
    assert result.exit_code == 0, result.output
    _, *rows = result.output.splitlines()
    assert len(rows) == 3, result.output
    assert [row.split()[2] for row in rows] == ["'two\\nlines'", "''", "'a\\tb'"]


def test_the_report_counts_one_kind_of_error_whatever_text_it_names(
    db_path: Path, db: Database
) -> None:
    """An error kind is the message without its particulars, but a quoted text with an
    apostrophe (SQLite's quote() doubles it: 'it''s') left '……' where others left '…': the
    review counted one way of failing as two kinds."""
    for outbox_id, text in enumerate(["'seven'", "'it''s'", "'l''arbre d''or'"], start=1):
        message = f"sequence_number: expected an integer, got text {text}"
        record_failure(db, outbox_id, outbox_id, message)
    result = invoke(["report", "--json"], None, db_path)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["given_up"]["by_kind"] == [
        {"kind": "validation: sequence_number: expected an integer, got text …", "count": 3}
    ]


def test_facet_counts_say_when_typesense_left_values_out(
    db_path: Path, worker: Worker, typesense_server: Server, collection: str
) -> None:
    """Typesense counts the 10 most frequent values of a facet unless asked for more: with 13
    element types, `search --facet element_type` listed 10 as if they were all."""
    app = app_connection(db_path)
    app.executemany(ROW_SQL, [make_row(i, element_type=f"t{i:02d}") for i in range(1, 14)])
    drain(worker)
    args = ["search", "*", "--facet", "element_type"]
    result = invoke(args, typesense_server, db_path, collection)
    assert result.exit_code == 0, result.output
    facet = result.output.splitlines()[-1]
    assert facet.startswith("facet element_type: ") and facet.count("(1)") == 10
    assert facet.endswith("… and 3 more values"), facet


def test_errors_show_indents_every_line_of_the_error(db_path: Path, db: Database) -> None:
    """A message naming a text with a line break ('q<newline>z', as SQLite quotes it) went on
    at the left margin under `error:`, where the next heading of the page is."""
    record_failure(db, 1, 7, "sequence_number: expected an integer, got text 'q\nz'")
    result = invoke(["errors", "show", "1"], None, db_path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    at = lines.index("error:")
    assert lines[at + 1 : at + 4] == [
        "  sequence_number: expected an integer, got text 'q",
        "  z'",
        "row:",
    ]


@pytest.mark.parametrize("command", [["errors", "list"], ["report"]])
def test_a_since_of_hundreds_of_digits_is_one_clear_line(
    db_path: Path, db: Database, command: list[str]
) -> None:
    """A duration no float holds ended in an OverflowError traceback (a shorter one too far
    back is said as such: tests/test_hardening.py)."""
    result = invoke([*command, "--since", "9" * 400 + "d"], None, db_path)
    assert result.exit_code == 2 and "is too far from today" in one_line(result)


def test_the_html_page_is_written_when_stdout_is_closed(tmp_path: Path, db_path: Path) -> None:
    """`report --html FILE | head -1`: the text report went to stdout first, and a reader gone
    (EPIPE) ended the command before it wrote the page, silently: no page, nothing said."""
    Database(db_path, create=True).close()
    invoke(["init"], None, db_path)
    page = tmp_path / "review.html"
    env = without_settings(OUTBOX_SYNC_DB=str(db_path), PYTHONPATH=str(ROOT))
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    try:
        result = subprocess.run(
            [sys.executable, "-m", "outbox_sync", "report", "--html", str(page)],
            env=env,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    assert page.exists(), result.stderr
    assert '<meta charset="utf-8">' in page.read_text(encoding="utf-8")


THINGS = """
[[sync]]
table = "things"
key = "k"
collection = "{collection}"
fields = [ {{ name = "name", type = "string" }} ]
"""


def test_an_infinite_key_in_an_integer_column_is_a_sync_error_not_a_crash(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """An INTEGER key column that is not the rowid holds a REAL 1e999 (Inf) as it is: the drain
    raised sqlite3.OperationalError 'malformed JSON', which stops the daemon (every mapping)."""
    path = tmp_path / "things.db"
    app = app_connection(path)
    app.execute("CREATE TABLE things (k INTEGER UNIQUE, name TEXT)")
    config = tmp_path / "outbox-sync.toml"
    config.write_text(THINGS.format(collection=collection))
    _, mappings = config_file.load(config, {})
    db = Database(path, create=True)
    schema.init(db, list(mappings))
    [mapping] = schema.check(db, list(mappings))
    index = TypesenseIndex(
        [typesense_server.url], typesense_server.api_key, collection, mapping=mapping
    )
    index.ensure_collection()
    worker = daemon(db, [index])
    app.execute("INSERT INTO things VALUES (1e999, 'x'), (7, 'y')")
    drain(worker)
    [error] = sync_errors.find(db)
    assert error["error"] == "k: expected an integer, got real Inf"
    assert index.retrieve("7") is not None
    # and on-call reads it as JSON (Python's json.dumps wrote the key as Infinity, no JSON)
    env = {"OUTBOX_SYNC_CONFIG": str(config)}
    for args in (["errors", "list", "--json"], ["errors", "show", str(error["id"]), "--json"]):
        shown = invoke(args, typesense_server, path, **env)
        assert shown.exit_code == 0, shown.output
        json.loads(shown.output, parse_constant=not_json)


def not_json(constant: str) -> None:
    raise AssertionError(f"{constant} is no JSON")
