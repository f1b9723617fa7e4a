"""The daemon's commands: init, uninstall, run, reindex, status."""

import contextlib
import gc
import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click

from outbox_sync import health
from outbox_sync.cli import render
from outbox_sync.cli.base import (
    Failed,
    Opened,
    advise,
    command_database,
    main,
    open_database,
    progress_bars,
    typesense,
    with_settings,
)
from outbox_sync.config import Settings, parse_duration
from outbox_sync.db import Database, damaged, is_busy
from outbox_sync.errors import (
    AlreadyRunningError,
    ConfigError,
    DatabaseBusyError,
    StoppingError,
    TypesenseError,
)
from outbox_sync.lock import DaemonLock

if TYPE_CHECKING:  # see cli/__init__.py
    from outbox_sync.telemetry import Telemetry


@main.command()
@with_settings(asks_typesense=False)
@click.option(
    "--backfill",
    is_flag=True,
    help="Enqueue every existing row, even if init already asked for them once.",
)
def init(settings: Settings, backfill: bool) -> None:
    """Prepare the database: the `outbox` and `sync_errors` tables, the triggers of every
    mapping (the built-in one creates `sequences` if absent), and, once per mapping, the rows
    that exist already: the daemon indexes them straight from the table when it starts, then
    applies what changed since. Upgrades a database an older version prepared, and puts back
    triggers a migration took away. Safe to run again."""
    from outbox_sync import schema

    db = command_database(settings.db_path, create=True)
    result = schema.init(db, settings.mappings, backfill=backfill)
    if result.upgraded:
        click.echo(f"upgraded {settings.db_path} to schema {schema.SCHEMA_VERSION}: nothing lost")
    if result.repaired:
        click.echo(
            f"put back outbox-sync's triggers ({'; '.join(result.repaired)}): changes made "
            "meanwhile left no outbox entry, so the daemon audits Typesense and repairs it (now "
            "if it runs, else when it starts)"
        )
    rows = [f"{n} of {name}, read from the table" for name, n in result.filling.items()]
    rows += [f"{n} of {name}, enqueued" for name, n in result.enqueued.items()]
    click.echo(
        f"initialised {settings.db_path}: existing rows to sync: {'; '.join(rows) or 'none'}"
        + (" (the daemon indexes them when it starts)" if rows else "")
    )
    if unfollowed := schema.unfollowed_uniques(db.conn, settings.mappings):
        click.echo(f"note: {', '.join(unfollowed)}: {schema.UNFOLLOWED_NOTE}")


@main.command()
@with_settings(asks_typesense=False)
@click.option("--yes", is_flag=True, help="Remove without asking (for scripts).")
def uninstall(settings: Settings, yes: bool) -> None:
    """Remove outbox-sync from the database: the triggers that write the outbox, the key
    indexes `init` made, and its tables (`outbox`, `sync_errors`, `sync_stats`,
    `outbox_sync_meta`), in one transaction, after saying what it removes and asking. The
    application's tables and rows stay as they are, and so do the collections in Typesense and
    the embedded server's data. Refused while a daemon or a reindex works the database: stop
    the service first. `init` installs it again (the daemon then indexes each table anew)."""
    from outbox_sync import schema

    db = command_database(settings.db_path)
    with DaemonLock(settings.db_path, role="uninstall") as lock:
        found = schema.installed(db.conn)
        if not found.empty:
            found.refuse_users(db.path)
            if not yes:
                render.echo_lines(render.installed(found, db.path))
                click.confirm("Remove them?", abort=True)
            found = schema.uninstall(db)
        lock.path.unlink(missing_ok=True)
    if found.empty:
        click.echo(f"nothing of outbox-sync's in {db.path}")
        return
    left = f" (and the embedded server's data in {settings.embedded_dir})"
    click.echo(
        f"removed outbox-sync from {db.path}: {len(found.triggers)} triggers, "
        f"{len(found.indexes)} key indexes, tables {', '.join(found.tables) or 'none'}"
        + f" (pending changes: {found.pending}; open sync errors: {found.open_errors})"
        + ". The collections in Typesense stay as they are"
        + (left if settings.embedded and settings.embedded_dir.exists() else "")
    )


@main.command()
@with_settings(daemon=True)
@click.option("--once", is_flag=True, help="Drain the outbox, then exit (for cron or scripts).")
def run(settings: Settings, once: bool) -> None:
    """Run the sync daemon: apply outbox entries to Typesense as they are committed.

    Creates the collection if it is missing (and refuses one with another schema), drops what a
    killed reindex left (a `NAME_v<time>` collection no alias points at), and first indexes the
    rows `init` found in a table, straight from the table. While Typesense is
    unreachable, entries stay queued and the daemon retries with a capped backoff.
    SIGTERM, Ctrl-C or SIGHUP (its terminal closed) finishes the current batch (or a fill's or
    reindex's requests in flight) and exits 0; a second one exits at once.
    Only one daemon may work a database file at a time.
    """
    import structlog

    from outbox_sync import schema
    from outbox_sync.telemetry import Telemetry
    from outbox_sync.worker import Stop, daemon

    log = structlog.get_logger("outbox_sync")
    if settings.collection is not None and settings.config_file is not None:
        raise ConfigError(
            "the daemon syncs every mapping of the configuration: --collection (or "
            "OUTBOX_SYNC_COLLECTION) is for the on-call commands"
        )
    opened = open_database(settings, upgrade=True)
    db = opened.db
    db.check_writable()
    stop = Stop()
    # from the signal handlers on, a stop ends a wait for the application's lock within a
    # moment, during the set-up too (the claims' first write); the loop's stop once it runs
    db.stopping = stop.is_set

    def request_stop(signum: int, _: Any) -> None:
        # No log line here: the signal may land while this thread writes one, holding the
        # lock the line would wait for (a daemon that never stopped). The loop says it.
        if stop.is_set():
            os._exit(128 + signum)
        stop.set(signal.Signals(signum).name)

    def starting() -> None:
        # the embedded server may take up to a minute to be ready: a stop asked for meanwhile
        # ends the wait (and stops it), as the loop's waits for it end
        if stop.is_set():
            raise StoppingError("the daemon stopped while its embedded Typesense started")

    with DaemonLock(settings.db_path) as lock, contextlib.ExitStack() as cleanup:
        schema.check(db, settings.mappings)  # again: an `uninstall` may have held the lock
        cleanup.callback(stop.close)
        telemetry = Telemetry(metrics=settings.metrics_address is not None)
        if settings.metrics_address is not None:
            cleanup.enter_context(metrics_server(telemetry, settings.metrics_address))
        # SIGHUP too: a terminal closed or an SSH session dropped killed the daemon without a
        # word, mid-batch, and its embedded server without a snapshot
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            cleanup.callback(signal.signal, signum, signal.signal(signum, request_stop))
        try:
            indexes = cleanup.enter_context(
                typesense(settings, opened, start_embedded=True, heartbeat=starting)
            )
            log.info(
                "started",
                db=str(settings.db_path),
                collections=[index.collection for index in indexes],
                nodes=list(settings.typesense_urls) or ["embedded"],
                batch_size=settings.batch_size,
                once=once,
            )
            worker = daemon(
                db,
                indexes,
                batch_size=settings.batch_size,
                telemetry=telemetry,
                audit_every_s=settings.audit_every_s,
                server=indexes[0].server,
                lock=lock,
                claims=indexes[0].server is None,  # an embedded server is the database's own
            )
        except (StoppingError, DatabaseBusyError, sqlite3.OperationalError) as error:
            if not stop.is_set() or (
                isinstance(error, sqlite3.OperationalError) and not is_busy(error)
            ):
                raise
            # stopped during the set-up: the embedded server's start, a wait for the lock (a
            # write's, or a read's in a rollback journal)
            log.info("stopping", signal=stop.signal)  # the loop's line: it never ran
        else:
            with quiet_garbage_collector():
                worker.run(stop, once=once)
    log.info("stopped", pending=pending(db))


def pending(db: Database) -> int | None:
    """The outbox entries left, for the last line; None when the application's lock keeps the
    stopping daemon from counting them (a rollback journal: its exclusive lock holds reads up)."""
    try:
        return db.backlog()[0]
    except sqlite3.OperationalError as error:
        if not is_busy(error):
            raise
        return None


# Allocations between two collections of the youngest generation (Python's default: 700).
GC_THRESHOLD = 50_000


@contextlib.contextmanager
def quiet_garbage_collector() -> Iterator[None]:
    """Python's cyclic garbage collector took 15 % of the daemon's CPU while draining
    (tests/bench): a drain, as a reindex, makes hundreds of thousands of small objects (rows,
    lines), freed by reference counting since none is in a cycle, and each collection walked
    them and every module and client made at start. Those are set aside (gc.freeze), and the
    young generation collected every GC_THRESHOLD allocations: the few cycles wait a little
    longer. Not much longer: each import request leaves a cycle that holds its body, and at
    500,000 a 1M drain peaked at 292 MB instead of 63 MB (tests/bench, 2026-11-30)."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


@contextlib.contextmanager
def metrics_server(telemetry: "Telemetry", address: tuple[str, int]) -> Any:
    """/metrics and /healthz on `address` while the daemon runs."""
    import structlog

    from outbox_sync.telemetry import serve_metrics

    host, port = address
    try:
        server = serve_metrics(telemetry, host, port)
    except OSError as error:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {error}") from None
    structlog.get_logger("outbox_sync").info(
        "metrics_serving", address=f"{host}:{port}", paths=["/metrics", "/healthz"]
    )
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@main.command("reindex")
@with_settings()
def reindex_command(settings: Settings) -> None:
    """Rebuild collections from SQLite with zero downtime (each mapping's, or the one of
    --collection).

    Fills a new versioned collection from the mapping's rows, points the collection name (an
    alias) at it, and drops the old one: searches keep answering throughout, and nothing
    committed meanwhile is lost. Also the way to apply a mapping's changed fields.

    With a daemon running on the database, it asks the daemon to do it (the daemon pauses
    applying changes while it rebuilds, then applies what was committed meanwhile) and follows
    its progress; otherwise it does it itself, holding the daemon lock.
    """
    from outbox_sync import reindex, schema
    from outbox_sync.claims import Claims

    opened = open_database(settings)
    lock = DaemonLock(settings.db_path, role="reindex")
    collections = [mapping.collection for mapping in opened.selected]
    claimed: Claims | None = None  # doing it itself, on a Typesense of its choosing
    with progress_bars() as bars:

        def progress(done: int, total: int) -> None:
            if bars is not None:
                bars("reindex", done, total)
            if claimed is not None:
                claimed.keep(time.monotonic())

        try:
            lock.acquire()
        except AlreadyRunningError as busy:
            if busy.role != "daemon":  # another reindex: no daemon to ask
                raise
            results = reindex.follow(opened.db, lock, collections, progress)
        else:
            try:
                schema.check(opened.db, settings.mappings)  # again, as `run` does
                with (
                    typesense(settings, opened, start_embedded=True) as indexes,
                    quiet_garbage_collector(),
                ):
                    if indexes[0].server is None:  # an embedded server is the database's own
                        claimed = Claims(opened.db, indexes)
                        claimed.keep(time.monotonic())  # another database's daemon: refused
                    results = [
                        asdict(reindex.rebuild(opened.db, index, progress=progress))
                        for index in indexes
                    ]
            finally:
                if claimed is not None:
                    claimed.give_back()
                lock.release()
    for result in results:
        old = f", dropped {result['old']}" if result["old"] else ""
        lost = result.get("last_good_refused")  # absent from an older daemon's answer
        click.echo(
            f"reindexed {result['rows']} rows of {result['collection']!r} into "
            f"{result['new']}{old}: {result['indexed']} indexed, {result['invalid']} invalid "
            f"(see `outbox-sync errors list`), {result['requeued']} queued for the daemon "
            "(refused by Typesense, or invalid with no open error yet)"
            + (
                f"; the new collection refused the last good document of {lost} invalid "
                "records: no longer searchable (named by the `last_good_refused` warning in"
                " the daemon's log, or in this command's when no daemon ran)"
                if lost
                else ""
            )
        )


@main.command()
@with_settings()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(settings: Settings, as_json: bool) -> None:
    """Show the backlog, open sync errors, and what Typesense holds.

    Fields: pending (outbox entries), oldest_pending_age_s, sync_errors_open (of the collection
    --collection names, else of all), rows (in `sequences`), documents (in Typesense; null when
    unreachable; per collection, fields_changed: how its fields, altered in Typesense, differ
    from the mapping's), typesense_ok, fill_pending (collections whose rows `init` found, which the
    daemon indexes when it starts), daemon_pid (null: no daemon runs; lock_holder then names a
    reindex holding the daemon lock), table_ok, triggers_ok (and trigger_problems),
    key_indexes_ok (and unindexed_keys: key columns a migration left without the index init
    made), unique_indexes_not_followed (unique indexes on an expression: a REPLACE through one
    leaves a document until the scheduled audit), last_audit (the daemon's last audit: when,
    why, what it found and repaired). Exits 0 whatever it finds (it is for reading:
    `outbox-sync check` is for monitoring).
    """
    figures = gathered(settings, open_database(settings), lambda error: advise(error, settings))
    if as_json:
        click.echo(json.dumps(figures))
    else:
        render.echo_lines(render.status_lines(figures))


def gathered(
    settings: Settings, opened: Opened, trouble: Callable[[TypesenseError], str]
) -> dict[str, Any]:
    """What `status` and `check` show: health.gather over the mappings asked for."""
    with typesense(settings, opened, start_embedded=False) as indexes:
        return health.gather(
            opened.db,
            indexes,
            opened.mappings,
            DaemonLock(settings.db_path),
            trouble,
            asked=opened.asked,
        )


class CheckFailed(Failed):
    """`check` itself could not run: UNKNOWN (3), on stdout as monitors read it."""

    exit_code = health.UNKNOWN

    def show(self, file: Any = None) -> None:
        click.echo(f"OUTBOX-SYNC UNKNOWN - {self.format_message()}")


class CheckCommand(click.Command):
    """Bad options are UNKNOWN too, not click's usage error (2 means CRITICAL to a monitor)."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as error:
            raise CheckFailed(error.format_message()) from None


@main.command(cls=CheckCommand)
@with_settings(failure=CheckFailed)
@click.option(
    "--max-lag",
    default=health.DEFAULT_MAX_LAG,
    show_default=True,
    metavar="DURATION",
    help="CRITICAL when the oldest change has waited longer (e.g. 60s, 5m).",
)
@click.option(
    "--max-audit-age",
    default=health.DEFAULT_MAX_AUDIT_AGE,
    show_default=True,
    metavar="DURATION",
    help="WARNING when the daemon's last audit is older.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def check(settings: Settings, max_lag: str, max_audit_age: str, as_json: bool) -> None:
    """Check the sync for a monitor (Nagios/Icinga plugin convention).

    CRITICAL (exit 2): no daemon runs on the database, Typesense does not answer, the table or
    the triggers are not intact, the database is damaged, or the oldest change waits longer
    than --max-lag. WARNING (1): open sync errors, or the daemon's last audit failed, found
    drift, or is older than --max-audit-age. OK (0) otherwise; UNKNOWN (3) when the check
    itself cannot run. Prints one line (with performance data after `|`), for cron, systemd
    timers and monitors.
    """
    max_lag_s = parse_duration(max_lag, "--max-lag")
    max_audit_age_s = parse_duration(max_audit_age, "--max-audit-age")
    opened = open_database(settings)
    try:
        figures = gathered(settings, opened, health.trouble)
    except sqlite3.DatabaseError as error:  # a finding, not a check that could not run
        if (damage := damaged(error, settings.db_path)) is None:
            raise
        code, line, figures = health.CRITICAL, f"OUTBOX-SYNC CRITICAL - {damage}", {}
    else:
        code, line = health.verdict(figures, max_lag_s=max_lag_s, max_audit_age_s=max_audit_age_s)
    if as_json:
        click.echo(json.dumps({"status": health.STATES[code], "summary": line, **figures}))
    else:
        click.echo(line)
    click.get_current_context().exit(code)


@main.command("config")
@with_settings(daemon=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def config_command(settings: Settings, as_json: bool) -> None:
    """Print the effective configuration: every setting (from flags, environment variables,
    the --config file and the defaults; secrets masked) and every mapping, with its fields as
    the collection will declare them. Checks the file as every command does, and its mappings
    against the database's tables when the database is there."""
    from outbox_sync import schema

    if settings.db_path.exists():
        schema.check(command_database(settings.db_path), settings.mappings, prepared=False)
    effective = render.effective_config(settings)
    if as_json:
        click.echo(json.dumps(effective, indent=2))
    else:
        render.echo_lines(render.toml_lines(effective))
