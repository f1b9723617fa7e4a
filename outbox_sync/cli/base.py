"""The command group, the options every command shares (made from config.OPTIONS), and the
mapping of our errors to one line on stderr with advice and an exit status."""

import contextlib
import functools
import gc
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from outbox_sync import __version__
from outbox_sync.config import OPTIONS, Option, Settings, build_settings
from outbox_sync.config_file import ConfigFileError
from outbox_sync.db import Database, damaged
from outbox_sync.errors import (
    CollectionNotFoundError,
    OutboxSyncError,
    TypesenseUnavailableError,
)
from outbox_sync.mapping import Mapping
from outbox_sync.report import iso, parse_since

if TYPE_CHECKING:  # see cli/__init__.py: imported where a command talks to Typesense
    from outbox_sync.typesense_index import TypesenseIndex

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
LOG_LEVELS = ("debug", "info", "warning", "error")


class Failed(click.ClickException):
    """One line on stderr and exit status 1."""


class FailedWith2(Failed):
    """For commands that keep 1 for a finding (audit: drift)."""

    exit_code = 2


class Integer(click.IntRange):
    """A whole number within bounds. click calls the type "integer range": "'abc' is not a
    valid integer range" sounds as if a range were asked for."""

    name = "integer"


def click_option(option: Option) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    default = "" if option.default is None else f"default: {option.default}; "
    return click.option(
        option.flag,
        option.name,
        envvar=option.env,
        type=Integer(*option.bounds) if option.bounds else option.type,
        metavar=option.metavar,
        help=f"{option.help} [{default}env: {option.env}]",
        shell_complete=_file_names if option.file else None,
    )


def _file_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Completion of a file name: the shell's own (what click.Path asks for)."""
    from click.shell_completion import CompletionItem

    return [CompletionItem(incomplete, type="file")]


def with_settings(
    *, daemon: bool = False, failure: type[Failed] = Failed, asks_typesense: bool = True
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give the command the shared options (and the daemon's, with daemon=True), and call it
    with the Settings they make. Our errors end it with one line with advice, as `failure`.
    asks_typesense=False: the command works on the database alone, and runs with the
    instance's settings (TYPESENSE_URL) whether or not it is given the API key."""
    options = [option for option in OPTIONS if daemon or not option.daemon_only]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(**values: Any) -> Any:
            from outbox_sync import logs

            settings = None
            try:
                given = {o.name: values.pop(o.name) for o in options}
                settings = build_settings(given, key_needed=asks_typesense)
                logs.configure(
                    click.get_current_context().find_root().params["log_level"],
                    (settings.api_key or "",),
                )
                return command(settings, **values)
            except ConfigFileError as error:  # a usage error
                raise (
                    FailedWith2(advise(error, settings))
                    if failure is Failed
                    else failure(str(error))
                ) from None
            except OutboxSyncError as error:
                raise failure(advise(error, settings)) from None
            except sqlite3.DatabaseError as error:  # a damaged file: one line, no traceback
                if settings is None or (damage := damaged(error, settings.db_path)) is None:
                    raise
                raise failure(str(damage)) from None

        decorated: Callable[..., Any] = wrapper
        for option in reversed(options):
            decorated = click_option(option)(decorated)
        return decorated

    return decorate


def advise(error: OutboxSyncError, settings: Settings | None) -> str:
    """The error's message, followed by what to do when the message does not say already."""
    message = str(error)
    if isinstance(error, TypesenseUnavailableError) and settings is not None:
        if settings.embedded:
            from outbox_sync.localserver import reached_port

            port = reached_port(settings.embedded_dir, settings.embedded_port)
            return (
                f"{message}: no --typesense-url is set, so this is the embedded Typesense on "
                f"127.0.0.1:{port}, which runs only while `outbox-sync run` "
                "does; start the daemon, or set TYPESENSE_URL to your Typesense"
            )
        return (
            f"{message}: check that Typesense is up and healthy at "
            f"{', '.join(settings.typesense_urls)} (--typesense-url, TYPESENSE_URL)"
        )
    if isinstance(error, CollectionNotFoundError):
        return (
            f"{message}: check --collection (OUTBOX_SYNC_COLLECTION); `outbox-sync run` creates "
            "the collection when it starts"
        )
    return message


class Group(click.Group):
    """Every failure is one line on stderr, usage errors included (click adds the usage and a
    hint on lines of their own): `--help` is where the usage is."""

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, standalone_mode: bool = True, **kwargs: Any
    ) -> Any:
        if not standalone_mode:
            return super().main(args, standalone_mode=False, **kwargs)
        try:
            code = super().main(args, standalone_mode=False, **kwargs)
        except click.UsageError as error:
            where = f" (see `{error.ctx.command_path} --help`)" if error.ctx else ""
            click.echo(f"Error: {error.format_message()}{where}", err=True)
            sys.exit(error.exit_code)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except click.Abort as error:
            click.echo("Aborted!", err=True)
            # Ctrl-C: 128 + SIGINT, as shells say it, never a verdict (`audit`'s 1 is drift,
            # `check`'s a warning); 1 for a prompt answered no
            sys.exit(130 if isinstance(error.__cause__, KeyboardInterrupt) else 1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="outbox-sync")
@click.option(
    "--log-level",
    envvar="OUTBOX_SYNC_LOG_LEVEL",
    default="info",
    show_default=True,
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    help="Log verbosity [env: OUTBOX_SYNC_LOG_LEVEL]. Logs go to stderr: JSON lines "
    "when it is not a terminal.",
)
def main(log_level: str) -> None:
    """Keep a Typesense collection in step with the `sequences` table of a SQLite file.

    Triggers on `sequences` record every insert, update and delete in an `outbox` table; the
    daemon (`run`) applies them to Typesense in order, retries a failed record once, and moves
    records that still fail into `sync_errors` for a human.

    \b
    Quick start (embedded Typesense, no setup):
      outbox-sync init        # tables and triggers in ./sequences.db
      outbox-sync run         # sync until Ctrl-C
    """


@dataclass(frozen=True)
class Opened:
    """The database, with every configured mapping bound to its table."""

    db: Database
    mappings: tuple[Mapping, ...]
    collection: str | None  # the one asked for with --collection

    @property
    def selected(self) -> tuple[Mapping, ...]:
        return tuple(m for m in self.mappings if self.collection in (None, m.collection))

    @property
    def asked(self) -> list[str] | None:
        """The names of the mappings --collection asks for; None without it (the whole outbox,
        entries of mappings no longer configured included)."""
        return None if self.collection is None else [m.name for m in self.selected]

    @property
    def by_name(self) -> dict[str, Mapping]:
        return {mapping.name: mapping for mapping in self.mappings}


def command_database(path: Path, *, create: bool = False) -> Database:
    """The database, closed when the command ends: every command closes what it opened, so
    that nothing waits on Python's collections at exit (see cli.entry). Closing also folds
    SQLite's WAL back into the file."""
    db = Database(path, create=create)
    click.get_current_context().call_on_close(db.close)
    return db


def open_database(settings: Settings, *, upgrade: bool = False) -> Opened:
    """The database, refused with what to do unless `init` has prepared it (`run` upgrades
    one an older version prepared: upgrade=True)."""
    import structlog

    from outbox_sync import schema

    db = command_database(settings.db_path)
    if upgrade and schema.upgrade(db):
        structlog.get_logger("outbox_sync").info(
            "database_upgraded", db=str(db.path), schema_version=schema.SCHEMA_VERSION
        )
    return Opened(db, tuple(schema.check(db, settings.mappings)), settings.collection)


@contextlib.contextmanager
def typesense(
    settings: Settings,
    opened: Opened,
    *,
    start_embedded: bool,
    heartbeat: Callable[[], None] = lambda: None,
) -> Iterator[list["TypesenseIndex"]]:
    """The index of each mapping asked for (see open_indexes)."""
    from outbox_sync.typesense_index import open_indexes

    with open_indexes(
        settings, opened.mappings, start_embedded=start_embedded, heartbeat=heartbeat
    ) as indexes:
        started()
        yield [indexes[mapping.name] for mapping in opened.selected]


def started() -> None:
    """The command's start is over (its modules imported, its clients made): the garbage
    collector, off since cli.entry began, runs from here on, as usual, for the work (a drain,
    an audit). What the start made lives to the end of the process: it is set aside
    (gc.freeze), never walked, with what it left in cycles (the embedded server's failed
    polls while it starts: ten a second, for a minute at most). A command that talks to no
    Typesense (init, errors, report, config) ends with the collector off: each reads or
    writes SQLite in SQL statements and makes a bounded number of objects. In a process of
    its own only: commands run in a test's process leave its collector as it is."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def since_value(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """--since: 30m, 12h, 7d, 2w, or an ISO date or time (UTC unless it says), as Unix time."""
    if value is None:
        return None
    now = time.time()
    try:
        since = parse_since(value, now)
    except ValueError as error:
        raise click.BadParameter(str(error), ctx, param) from None
    except OverflowError:  # a duration of hundreds of digits: no float holds it
        raise click.BadParameter(f"{value!r} is too far from today", ctx, param) from None
    if since > now:  # a window that starts after now holds nothing: a mistyped date
        raise click.BadParameter(f"{value!r} is in the future", ctx, param)
    try:
        iso(since)  # as the rows it is compared with write times
    except (OverflowError, OSError, ValueError):
        raise click.BadParameter(f"{value!r} is too far from today", ctx, param) from None
    return since


class ProgressBars:
    """Progress on stderr: one click progress bar per phase."""

    def __init__(self) -> None:
        self.phase = ""
        self.bar: Any = None
        self.done = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase != self.phase:
            self.close()
            self.phase, self.done = phase, 0
            self.bar = click.progressbar(length=max(total, 1), label=f"{phase:8}", file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@contextlib.contextmanager
def progress_bars() -> Iterator[ProgressBars | None]:
    """ProgressBars on a terminal's stderr; None elsewhere."""
    if not sys.stderr.isatty():
        yield None
        return
    bars = ProgressBars()
    try:
        yield bars
    finally:
        bars.close()
