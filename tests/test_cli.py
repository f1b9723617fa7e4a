"""The command line as users meet it: help, configuration errors, status and errors list."""

import gc
import json
import shutil
import sqlite3
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest

from outbox_sync import __version__, schema, sync_errors
from outbox_sync.cli import main
from outbox_sync.cli.daemon import GC_THRESHOLD, quiet_garbage_collector
from outbox_sync.db import Database
from outbox_sync.localserver import free_port
from outbox_sync.mapping import SEQUENCES
from outbox_sync.typesense_index import TypesenseIndex
from tests.support.app import app_connection, insert_rows
from tests.support.cli import ROOT, invoke, run_module, without_settings
from tests.support.daemon import record_failure
from tests.support.typesense import Server


def all_commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in group.commands.items():
        found.append((f"{prefix}{name}", command))
        if isinstance(command, click.Group):
            found += all_commands(command, f"{prefix}{name} ")
    return found


def test_every_command_explains_itself() -> None:
    commands = [("outbox-sync", main), *all_commands(main)]
    assert {name for name, _ in commands} >= {"init", "run", "status", "errors", "errors list"}
    for name, command in commands:
        assert command.help and len(command.help) > 40, f"{name} needs a docstring"
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts} needs help text"


@pytest.mark.parametrize("command", [[], ["reindex"]], ids=["outbox-sync", "reindex"])
def test_help_works_when_the_cli_package_runs_as_a_module(command: list[str]) -> None:
    """The package runs as a module (its __main__), and the help is whole, in a process of its
    own as users run it."""
    result = subprocess.run(
        [sys.executable, "-m", "outbox_sync.cli", *command, "--help"],
        env=without_settings(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    usage = " ".join(["python -m outbox_sync.cli", *command])
    assert result.stdout.startswith(f"Usage: {usage} [OPTIONS]"), result.stdout
    chosen = main.get_command(click.Context(main), command[0]) if command else main
    assert chosen is not None and chosen.help is not None
    assert " ".join(chosen.help.split()[:5]) in " ".join(result.stdout.split())
    if not command:  # every command is listed
        listed = result.stdout.split("Commands:")[1]
        assert {line.split()[0] for line in listed.strip().splitlines()} == set(main.commands)


def test_status_json_names_a_missing_collection(
    db_path: Path, typesense_server: Server, collection: str
) -> None:
    result = invoke(
        ["status", "--json", "--db", str(db_path), "--collection", collection], typesense_server
    )
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["documents"] is None and status["typesense_ok"] is False
    assert f"collection '{collection}' does not exist" in status["typesense_error"]


def test_status_json_reports_backlog_and_documents(
    db_path: Path, typesense_server: Server, collection: str, index: object
) -> None:
    insert_rows(db_path, [1, 2])
    result = invoke(
        ["status", "--json", "--db", str(db_path), "--collection", collection], typesense_server
    )
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["pending"] == 2 and status["rows"] == 2
    assert status["sync_errors_open"] == 0
    assert status["documents"] == 0 and status["typesense_ok"] is True
    assert 0 <= status["oldest_pending_age_s"] < 60
    assert status["wal_uncheckpointed_bytes"] == 0  # no reader holds the WAL back


def test_status_when_typesense_is_unreachable(db_path: Path) -> None:
    from outbox_sync.localserver import free_port

    env = {"TYPESENSE_URL": f"http://127.0.0.1:{free_port()}", "TYPESENSE_API_KEY": "k"}
    result = invoke(["status", "--json", "--db", str(db_path)], **env)
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["documents"] is None and status["typesense_ok"] is False


def test_errors_list_json(db_path: Path) -> None:
    db = Database(db_path)
    record_failure(db, 1, 7, "bad field", document='{"id":"7"}', http_status=400, attempts=2)
    record_failure(db, 2, 8, "sequence_number: is NULL")
    db.ack(0, [("sequences", 8)], [])  # record 8 synced later: its error closes itself
    result = invoke(["errors", "list", "--json", "--db", str(db_path)])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output)
    assert {k: row[k] for k in ("record_key", "op", "http_status", "error", "attempts")} == {
        "record_key": 7,
        "op": "upsert",
        "http_status": 400,
        "error": "bad field",
        "attempts": 2,
    }
    assert row["failed_at"] and row["resolved_at"] is None and "id" in row
    everything = invoke(["errors", "list", "--all", "--json", "--db", str(db_path)])
    assert [r["record_key"] for r in json.loads(everything.output)] == [7, 8]
    table = invoke(["errors", "list", "--db", str(db_path)])
    assert "bad field" in table.output and "sequence_number" not in table.output


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["status", "--db", "missing.db"], {}, "database missing.db does not exist"),
        (["status", "--typesense-url", "ftp://x"], {}, "must look like http://127.0.0.1:8108"),
        (["status", "--typesense-url", "http://127.0.0.1:1"], {}, "no Typesense API key"),
        (["status", "--collection", "a/b"], {}, "collection name 'a/b' must be"),
        (["run", "--batch-size", "0"], {}, "Invalid value for '--batch-size'"),
        (["status", "--api-key-file", "nope"], {"TYPESENSE_URL": "http://x"}, "cannot read"),
        (["run", "--batch-size", "abc"], {}, "'abc' is not a valid integer. (see"),
        (["errors", "show", "abc"], {}, "'abc' is not a valid integer. (see"),
        (["errors", "list", "--limit", "x"], {}, "'x' is not a valid integer. (see"),
        (["search", "q", "--limit", "x"], {}, "'x' is not a valid integer. (see"),
    ],
)
def test_bad_configuration_is_one_clear_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(args, **env)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_commands_on_the_database_alone_need_no_api_key(db_path: Path) -> None:
    """An instance's settings (systemd/outbox-sync.env.example) set TYPESENSE_URL; the key comes
    from a credential only the daemon's unit loads. On-call's `errors list` with those settings
    said "no Typesense API key", as did every command that never asks Typesense."""
    db = Database(db_path)
    schema.init(db, [SEQUENCES])
    record_failure(db, 1, 7, "refused", http_status=400, attempts=2)
    env = {"TYPESENSE_URL": "http://127.0.0.1:1", "OUTBOX_SYNC_DB": str(db_path)}
    for args in (
        ["init"],
        ["errors", "list"],
        ["errors", "show", "1"],
        ["errors", "retry", "1"],
        ["errors", "prune", "--older-than", "0"],
        ["report"],
    ):
        result = invoke(args, **env)
        assert result.exit_code == 0, (args, result.output)
    assert [e["resolution"] for e in sync_errors.find(db, status="all")] == []  # retried, pruned
    for args in (["status"], ["audit"], ["search", "x"], ["reindex"], ["run", "--once"]):
        result = invoke(args, **env)
        assert result.exit_code in (1, 2), args
        assert "no Typesense API key" in result.output, args
    assert "no Typesense API key" in invoke(["check"], **env).output
    uninstalled = invoke(["uninstall", "--yes"], **env)
    assert uninstalled.exit_code == 0, uninstalled.output


def test_an_api_key_file_readable_by_others_is_refused(tmp_path: Path, db_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("secret-key-value\n")
    key.chmod(0o644)
    args = ["status", "--db", str(db_path), "--typesense-url", "http://127.0.0.1:1"]
    result = invoke([*args, "--api-key-file", str(key)])
    assert result.exit_code == 1 and "readable by other users" in result.output
    key.chmod(0o600)
    result = invoke([*args, "--api-key-file", str(key), "--json"])
    assert result.exit_code == 0 and "secret-key-value" not in result.output


def test_flags_override_environment(tmp_path: Path, db_path: Path) -> None:
    env = {"OUTBOX_SYNC_DB": str(tmp_path / "missing.db")}
    result = invoke(["errors", "list", "--json", "--db", str(db_path)], **env)
    assert result.exit_code == 0 and json.loads(result.output) == []
    result = invoke(["errors", "list", "--json"], **env)
    assert result.exit_code == 1 and "missing.db does not exist" in result.output


def test_init_then_run_refuses_an_uninitialised_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.db"
    app_connection(path).execute("CREATE TABLE t (x)")
    result = invoke(["run", "--once", "--db", str(path)])
    assert result.exit_code == 1 and f"run `outbox-sync init --db {path}`" in result.output
    result = invoke(["init", "--db", str(path)])
    assert result.exit_code == 0 and "existing rows to sync: none" in result.output


def test_the_command_line_is_built_without_the_libraries_of_the_commands() -> None:
    """`--version`, `--help` and a usage error need not wait for the Typesense client, httpx,
    structlog and prometheus_client (~0.4 s of imports here): a command imports them when it
    runs."""
    heavy = ("typesense", "httpx", "structlog", "prometheus_client")
    code = f"import sys, outbox_sync.cli; print([m for m in {heavy!r} if m in sys.modules])"
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"


def python(code: str, env: dict[str, str] | None = None) -> "subprocess.CompletedProcess[str]":
    """`python -c code` from the repository, in a process of its own, which must exit 0."""
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("metrics", [False, True], ids=["metrics off", "metrics on"])
def test_the_daemon_imports_prometheus_client_only_to_serve_metrics(
    daemon_env: dict[str, str], db_path: Path, metrics: bool
) -> None:
    """Off by default, /metrics needs no prometheus_client: a `run` that serves none does not
    import it (0.02-0.035 s of every start); one that serves them does."""
    insert_rows(db_path, range(1, 4))
    env = dict(daemon_env)
    if metrics:
        env["OUTBOX_SYNC_METRICS_ADDRESS"] = f"127.0.0.1:{free_port()}"
    code = (
        "import atexit, sys; atexit.register(lambda: print('prometheus_client' in sys.modules));"
        " sys.argv = ['outbox-sync', 'run', '--once']; from outbox_sync.cli import entry; entry()"
    )
    done = python(code, env)
    assert done.stdout.splitlines()[-1] == str(metrics)
    assert "pending=0" in done.stderr or '"pending": 0' in done.stderr, done.stderr


def test_the_daemon_sets_aside_what_it_made_at_start_from_garbage_collections() -> None:
    """While it runs, the objects made at start are frozen out of the collections and the young
    generation is collected less often (the collector took 15 % of a drain's CPU); after, all
    is as it was (`run` may be invoked in-process, as here in the tests)."""
    before = gc.get_threshold()
    with quiet_garbage_collector():
        assert gc.get_threshold()[0] == GC_THRESHOLD and gc.get_freeze_count() > 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_the_process_turns_the_collector_off_before_the_command_lines_imports() -> None:
    """The console script imports the command line from outbox_sync/__main__.py (as `python
    -m outbox_sync` runs it), which turns Python's collector off first: it collected 12
    times while `--version` imported click and the command line (see cli.entry)."""
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "outbox-sync"]
    assert script.value == "outbox_sync.__main__:entry"
    code = (  # what the console script runs; counted from the first import of click
        "import atexit, gc, sys; made = []; atexit.register(lambda: print(len(made)));"
        " gc.callbacks.append(lambda phase, _: phase == 'stop' and 'click' in sys.modules"
        " and made.append(phase)); sys.argv = ['outbox-sync', '--version'];"
        " from outbox_sync.__main__ import entry; sys.exit(entry())"
    )
    assert python(code).stdout.splitlines() == [f"outbox-sync, version {__version__}", "0"]


# A `run --once` process that notes the garbage collections made from its entry point on: how
# many were made by the time its start was over (its Typesense clients made), and whether the
# collector runs, with the start's objects set aside, once the worker runs.
NOTE_COLLECTIONS = """
import atexit, contextlib, gc, json, sys
from outbox_sync import typesense_index, worker
from outbox_sync.cli import entry
collections, seen = [], {}
gc.callbacks.append(lambda phase, info: phase == "stop" and collections.append(info))
atexit.register(lambda: print(json.dumps(seen)))
made = typesense_index.open_indexes
@contextlib.contextmanager
def open_indexes(*args, **kwargs):
    with made(*args, **kwargs) as indexes:
        seen["collections at start"] = len(collections)
        yield indexes
typesense_index.open_indexes = open_indexes
work = worker.Worker.run
def run(self, stop, **kwargs):
    seen["collector on"] = gc.isenabled()
    seen["start set aside"] = gc.get_freeze_count() > 0
    return work(self, stop, **kwargs)
worker.Worker.run = run
sys.argv = ["outbox-sync", "run", "--once"]
collections.clear()
entry()
"""


def test_a_command_process_collects_no_garbage_while_it_starts(
    daemon_env: dict[str, str], db_path: Path
) -> None:
    """Python's collector walked the objects the imports made 86 times while `run --once`
    started (15-27 ms of ~0.25 s): it is off until the command has made its clients, then on
    for the work, the start's objects set aside."""
    insert_rows(db_path, range(1, 4))
    done = python(NOTE_COLLECTIONS, daemon_env)
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "collections at start": 0,
        "collector on": True,
        "start set aside": True,
    }
    assert '"pending": 0' in done.stderr or "pending=0" in done.stderr, done.stderr


def test_a_command_process_sets_aside_its_objects_from_the_collections_at_exit() -> None:
    """Python's collections at exit walked every object the libraries made at import (0.08 s
    of each command): the process's entry point freezes them first."""
    code = (
        "import atexit, gc, sys; atexit.register(lambda: print(gc.get_freeze_count() > 0));"
        " sys.argv = ['outbox-sync', 'init', '--help']; from outbox_sync.cli import entry;"
        " entry()"
    )
    assert python(code).stdout.splitlines()[-1] == "True"


@pytest.mark.parametrize(
    "command",
    [["init"], ["status"], ["run", "--once"], ["audit"], ["config"]],
    ids=lambda command: command[0],
)
def test_a_command_closes_its_database_before_it_exits(
    daemon_env: dict[str, str], db_path: Path, index: TypesenseIndex, command: list[str]
) -> None:
    """Since the objects left at exit are never collected (see above), a connection left
    open would never close, and SQLite would leave its WAL beside the file: each command
    closes the database it opened (`index`: the collection exists, for `audit`)."""
    insert_rows(db_path, range(1, 4))
    assert not Path(f"{db_path}-wal").exists()  # the application closed its connection
    done = run_module(command, daemon_env)
    assert done.returncode == 0, done.stderr
    assert not Path(f"{db_path}-wal").exists(), f"{command} left the WAL"


def test_ctrl_c_exits_130_not_a_verdict(
    db_path: Path,
    db: Database,
    index: TypesenseIndex,
    typesense_server: Server,
    collection: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C during `audit` exited 1, its code for drift (`audit || audit --repair` went on to
    repair), and during `check` 1, WARNING: it exits 130 (128 + SIGINT), as shells say it."""
    from outbox_sync.audit import Audit

    def interrupted(self: Audit) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Audit, "run", interrupted)
    result = invoke(["audit"], typesense_server, db_path, collection)
    assert (result.exit_code, result.output.strip()) == (130, "Aborted!")


def test_bash_completes_commands_options_and_file_names() -> None:
    """The script docs/configuration.md says to source, in a real bash: commands, a group's
    subcommands, options, and the shell's own file names for each option naming a file (bash
    completed nothing after --db)."""
    program = Path(sys.executable).parent / "outbox-sync"  # the console script pip installs
    if not program.exists():
        pytest.skip(f"no console script at {program}: the package is not installed")
    script = subprocess.run(
        [program], env={"_OUTBOX_SYNC_COMPLETE": "bash_source"}, capture_output=True, text=True
    )
    assert script.returncode == 0, script.stderr

    def complete(*words: str) -> list[str]:
        """What bash offers after `words`; `compopt -o default` where it completes files itself
        (compopt works only while readline completes: here a function prints what it asked)."""
        line = " ".join(f"'{word}'" for word in words)
        done = subprocess.run(
            [
                "bash",
                "-c",
                f'{script.stdout}\ncompopt() {{ echo "compopt $1 $2"; }}\n'
                f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}\n"
                f'_outbox_sync_completion {program}; printf "%s\\n" "${{COMPREPLY[@]}}"',
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.split("\n")[:-1]

    assert complete("outbox-sync", "un") == ["uninstall"]
    assert complete("outbox-sync", "errors", "re") == ["resolve", "retry"]
    assert "--once" in complete("outbox-sync", "run", "--")
    assert complete("outbox-sync", "--log-level", "w") == ["warning"]
    for option in ("--db", "--config", "--api-key-file", "--ca-file"):
        assert complete("outbox-sync", "status", option, "ap") == ["compopt -o default", ""]
    assert complete("outbox-sync", "status", "--collection", "ap") == [""]


def test_a_database_keeping_its_text_in_utf16_is_refused_saying_how_to_convert_it(
    tmp_path: Path,
) -> None:
    """A UTF-16 file (PRAGMA encoding, set before its first table) made every record a sync
    error ("Bad JSON": SQLite's lines are read as bytes) and failed every audit (found by a
    hostile review). init and the daemon refuse it; the conversion they name works."""
    path = tmp_path / "wide.db"
    wide = sqlite3.connect(path)
    wide.execute("PRAGMA encoding = 'UTF-16le'")
    wide.execute("CREATE TABLE t (x)")
    wide.close()
    for command, status in ((["init"], 1), (["run", "--once"], 1), (["audit"], 2)):
        result = invoke([*command, "--db", str(path)])
        assert result.exit_code == status, (command, result.output)
        assert "keeps its text in UTF-16le (PRAGMA encoding)" in result.output
        assert f"sqlite3 {path} .dump | sqlite3 NEW.db" in result.output
    if shutil.which("sqlite3") is None:
        pytest.skip("the sqlite3 shell is not installed: the conversion the error names")
    converted = tmp_path / "NEW.db"
    dump = subprocess.run(["sqlite3", str(path), ".dump"], capture_output=True, check=True)
    subprocess.run(["sqlite3", str(converted)], input=dump.stdout, check=True)
    result = invoke(["init", "--db", str(converted)])
    assert result.exit_code == 0, result.output
