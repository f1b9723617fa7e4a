"""Configuration and mappings a hostile review broke: a file that ended in a traceback or named
the wrong thing, a value on which SQLite and the Python mapper disagreed or SQLite failed, and
one row that stopped the daemon. Each test failed on the code before its fix."""

import sqlite3
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest

from outbox_sync.errors import InvalidRecordError
from outbox_sync.mapping import Field, Mapping
from outbox_sync.values import RawText
from tests.support.app import app_connection
from tests.support.cli import invoke, one_line, run_module, without_settings
from tests.support.typesense import Server, export


def files(tmp_path: Path, toml: str, ddl: str) -> tuple[dict[str, str], sqlite3.Connection]:
    """A configuration file and a database of the application's tables (no Typesense)."""
    config = tmp_path / "outbox-sync.toml"
    config.write_text(toml)
    db_path = tmp_path / "app.db"
    app = app_connection(db_path)
    app.executescript(ddl)
    return {"OUTBOX_SYNC_CONFIG": str(config), "OUTBOX_SYNC_DB": str(db_path)}, app


def served(
    tmp_path: Path, server: Server, toml: str, ddl: str
) -> tuple[dict[str, str], sqlite3.Connection]:
    """The same, for processes that reach `server`."""
    env, app = files(tmp_path, toml, ddl)
    return without_settings(**env, TYPESENSE_URL=server.url, TYPESENSE_API_KEY=server.api_key), app


def sync_once(env: dict[str, str]) -> Any:
    init = run_module(["init"], env=env)
    assert init.returncode == 0, init.stderr
    return run_module(["run", "--once", "--audit-every", "0"], env=env, timeout_s=120)


NAME = 'fields = [{ name = "n", type = "string" }]\n'


# -- (1) configuration ---------------------------------------------------------------------------


def test_a_dependency_without_its_table_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    toml = f'[[sync]]\ntable = "a"\nkey = "id"\ncollection = "a"\n{NAME}'
    toml += '[[sync.depends_on]]\nkey = "id"\n'
    env, _ = files(tmp_path, toml, "CREATE TABLE a (id INTEGER PRIMARY KEY, n TEXT)")
    result = invoke(["config"], **env)
    assert "depends_on[0]" in one_line(result)
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("entry", "ddl"),
    [
        ('table = "order-items"\n', 'CREATE TABLE "order-items" (id INTEGER PRIMARY KEY, n TEXT)'),
        ('table = "a"\nname = "a b"\n', "CREATE TABLE a (id INTEGER PRIMARY KEY, n TEXT)"),
    ],
)
def test_a_table_or_mapping_name_that_needs_quoting_is_synced_or_named(
    tmp_path: Path, entry: str, ddl: str
) -> None:
    """The trigger names are made from the table's and the mapping's names without quoting:
    `init` fails with SQLite's 'near "-": syntax error', naming neither the file nor the
    entry (while the table's own name is quoted everywhere else)."""
    env, _ = files(tmp_path, f'[[sync]]\n{entry}key = "id"\ncollection = "a"\n{NAME}', ddl)
    result = invoke(["init"], **env)
    assert result.exit_code == 0 or "[[sync]] 1" in result.output, result.output


def test_the_printed_configuration_reads_back_with_text_outside_the_bmp(tmp_path: Path) -> None:
    """`outbox-sync config` writes strings with json.dumps: '😀' becomes the surrogate pair
    \\ud83d\\ude00, which TOML refuses ('It is TOML that reads back as a --config file')."""
    toml = f'[[sync]]\ntable = "a"\nkey = "id"\ncollection = "a"\nwhere = "n != \'😀\'"\n{NAME}'
    env, _ = files(tmp_path, toml, "CREATE TABLE a (id INTEGER PRIMARY KEY, n TEXT)")
    result = invoke(["config"], **env)
    assert result.exit_code == 0, result.output
    printed = "\n".join(line for line in result.output.splitlines() if not line.startswith("#"))
    assert tomllib.loads(printed)["sync"][0]["where"] == "n != '😀'"


def test_a_where_with_a_misspelt_double_quoted_column_is_refused(tmp_path: Path) -> None:
    """SQLite takes a double-quoted name that names no column for a string literal: the
    misspelt `"deleted" IS NULL` is accepted at load and is false for every row, so nothing
    is ever indexed, without a word (the code quotes its own names with backticks for this
    very reason, values.quote_identifier)."""
    toml = (
        '[[sync]]\ntable = "a"\nkey = "id"\ncollection = "a"\n'
        "where = '\"deleted\" IS NULL'\n" + NAME
    )
    env, _ = files(tmp_path, toml, "CREATE TABLE a (id INTEGER PRIMARY KEY, n TEXT, deleted_at)")
    result = invoke(["config"], **env)
    assert result.exit_code == 2, result.output


# -- (2) rows: SQLite's line against the reference ----------------------------------------------

FLOATS = Mapping(
    table="t", key="k", collection="c", fields=(Field("w", "float"), Field("ws", "float[]"))
)


@pytest.mark.parametrize(
    ("w", "ws"), [(-(2**63), "[]"), (1.5, "[-9223372036854775808]")], ids=["float", "float[]"]
)
def test_the_smallest_integer_in_a_float_field_is_a_line_not_a_failed_query(
    w: Any, ws: str
) -> None:
    """_not_finite takes abs() of the value: abs(-9223372036854775808) is SQLite's 'integer
    overflow' error, so the statement reading the batch fails, where the reference indexes the
    row (an integer is a number)."""
    conn = sqlite3.connect(":memory:")
    conn.text_factory = RawText
    conn.execute("CREATE TABLE t (k, w, ws)")
    conn.execute("INSERT INTO t VALUES (1, ?, ?)", (w, ws))
    row = conn.execute(f"SELECT {FLOATS.columns()} FROM t").fetchone()
    expected = FLOATS.line(row)
    line, verdict = conn.execute(
        f"SELECT {FLOATS.line_sql()}, {FLOATS.verdict_sql()} FROM t"
    ).fetchone()
    assert (line, verdict) == (expected, None)


# -- rows that stop the daemon ---------------------------------------------------------------------


def test_one_row_whose_sql_fails_at_run_time_is_a_sync_error_not_a_stopped_daemon(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """`sql = "json_extract(meta, '$.x')"` is accepted at load (bind runs it on no row); one row
    whose meta is not JSON makes SQLite raise 'malformed JSON' for the whole batch: the daemon
    exits with a traceback, every start again, and the rows after it are never indexed."""
    toml = (
        f'[[sync]]\ntable = "a"\nkey = "id"\ncollection = "{collection}"\n'
        'fields = [{ name = "x", type = "string", optional = true,'
        " sql = \"json_extract(meta, '$.x')\" }]\n"
    )
    env, app = served(
        tmp_path, typesense_server, toml, "CREATE TABLE a (id INTEGER PRIMARY KEY, meta)"
    )
    assert sync_once(env).returncode == 0
    app.executemany("INSERT INTO a VALUES (?, ?)", [(1, "not json"), (2, '{"x": "two"}')])
    run = run_module(["run", "--once", "--audit-every", "0"], env=env, timeout_s=120)
    assert "Traceback" not in run.stderr, run.stderr[-300:]
    assert run.returncode == 0
    assert export(typesense_server, collection) == {"2": {"id": "2", "x": "two"}}
    open_errors = app.execute("SELECT record_key, error FROM sync_errors").fetchall()
    assert open_errors == [(1, "SQLite cannot read its row as the mapping says: malformed JSON")]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ('{ name = "w", type = "float" }', -(2**63)),
        ('{ name = "w", type = "string[]" }', "[" * 1500 + "]" * 1500),
    ],
    ids=["smallest-integer-in-float", "deep-array"],
)
def test_one_bad_value_does_not_stop_the_daemon(
    tmp_path: Path, typesense_server: Server, collection: str, field: str, value: Any
) -> None:
    """A float field holding -9223372036854775808 (SQLite: abs() 'integer overflow' in the
    generated check), or an array text nested 1500 deep (the Python mapper: RecursionError,
    not an InvalidRecordError): the drain raises, the daemon exits 1 with a traceback, and
    the good row in the same batch is never indexed."""
    toml = f'[[sync]]\ntable = "a"\nkey = "id"\ncollection = "{collection}"\nfields = [{field}]\n'
    env, app = served(
        tmp_path, typesense_server, toml, "CREATE TABLE a (id INTEGER PRIMARY KEY, w)"
    )
    assert sync_once(env).returncode == 0
    good = 1.5 if "float" in field else '["ok"]'
    app.executemany("INSERT INTO a VALUES (?, ?)", [(1, value), (2, good)])
    run = run_module(["run", "--once", "--audit-every", "0"], env=env, timeout_s=120)
    assert "Traceback" not in run.stderr, run.stderr[-300:]
    assert run.returncode == 0
    assert "2" in export(typesense_server, collection)


# -- (3) schema changes and keys -------------------------------------------------------------------


def documents(server: Server, collection: str) -> dict[str, dict[str, Any]]:
    try:
        return export(server, collection)
    except httpx.HTTPStatusError:
        return {}


# -- verdicts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "text"),
    [
        (Field("ns", "int64[]"), "[9223372036854775808]"),
        (Field("ws", "float[]"), "[1" + "0" * 400 + "]"),
        (Field("ws", "float[]"), "[1" + "0" * 5000 + "]"),
    ],
    ids=["int64-past-range", "integer-literal-past-double", "5000-digit-integer"],
)
def test_sqlite_and_the_mapper_give_the_same_verdict_for_integers_past_int64_in_arrays(
    field: Field, text: str
) -> None:
    """SQLite's json_each types an integer literal past int64 'integer' while its value is a
    REAL: the SQL verdict says 'element 0 is integer 9.22337203685478e+18' / 'integer Inf'
    where the mapper says 'real ...'. Past 4300 digits Python's json refuses the integer
    (int max_str_digits, a ValueError): the mapper says 'expected a JSON array' of a valid
    array, which is what sync_errors records."""
    one = Mapping(table="t", key="k", collection="c", fields=(field,))
    conn = sqlite3.connect(":memory:")
    conn.text_factory = RawText
    conn.execute(f"CREATE TABLE t (k, {field.name})")
    conn.execute("INSERT INTO t VALUES (1, ?)", (text,))
    row = conn.execute(f"SELECT {one.columns()}, {one.verdict_sql()} FROM t").fetchone()
    with pytest.raises(InvalidRecordError) as caught:
        one.document(row[:-1])
    assert row[-1].decode() == str(caught.value)


def test_two_mappings_whose_trigger_names_collide_are_one_line_naming_the_entries(
    tmp_path: Path,
) -> None:
    """Trigger names are `{table}_{name}_outbox_*`: the table `x_y` and the table `x` mapped
    under the name `y` both get `x_y_outbox_insert`. The file loads; init fails with SQLite's
    'trigger x_y_outbox_insert already exists', naming no entry (exit 1)."""
    entry = '[[sync]]\ntable = "{}"\nkey = "id"\ncollection = "{}"\n{}'
    toml = entry.format("x_y", "c1", "") + NAME + entry.format("x", "c2", 'name = "y"\n') + NAME
    env, _ = files(
        tmp_path,
        toml,
        "CREATE TABLE x_y (id INTEGER PRIMARY KEY, n TEXT);"
        " CREATE TABLE x (id INTEGER PRIMARY KEY, n TEXT)",
    )
    result = invoke(["init"], **env)
    assert result.exit_code == 2 and "[[sync]] 2" in result.output, result.output


def test_a_field_option_typesense_refuses_is_one_line_naming_the_entry(
    tmp_path: Path, typesense_server: Server, collection: str
) -> None:
    """`index = false` without `optional` (or `sort` on a `string[]`): `config` and `init`
    take it, and Typesense refuses the collection. `run` said only "Typesense answered 400:
    Field `n` must be optional ...", naming neither the file, the entry nor the collection."""
    toml = (
        f'[[sync]]\ntable = "a"\nkey = "id"\ncollection = "{collection}"\n'
        'fields = [{ name = "n", type = "string", index = false }]\n'
    )
    env, _ = served(tmp_path, typesense_server, toml, "CREATE TABLE a (id INTEGER PRIMARY KEY, n)")
    run = sync_once(env)
    [line] = [line for line in run.stderr.splitlines() if line.startswith("Error")]
    assert run.returncode != 0
    assert env["OUTBOX_SYNC_CONFIG"] in line and f"collection {collection!r}" in line, line
    assert "must be optional" in line, line


def test_a_table_named_in_another_case_is_named_as_the_database_has_it(tmp_path: Path) -> None:
    """`table = "Chars"` for the table `chars`: init said to create a table that is there."""
    toml = '[[sync]]\ntable = "Chars"\nkey = "id"\ncollection = "c"\n' + NAME
    env, _ = files(tmp_path, toml, "CREATE TABLE chars (id INTEGER PRIMARY KEY, n TEXT)")
    result = invoke(["init"], **env)
    assert result.exit_code != 0
    line = one_line(result)
    assert "table Chars does not exist" in line and "but chars does" in line, line
