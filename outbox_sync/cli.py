"""The command line: parse options, call the library, turn its errors into one clear line."""

import contextlib
import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import click
import structlog

from outbox_sync import __version__, logs
from outbox_sync.config import DEFAULT_COLLECTION, DEFAULT_DB, Settings, build_settings
from outbox_sync.db import DaemonLock, Database
from outbox_sync.errors import ConfigError, OutboxSyncError, TypesenseError
from outbox_sync.localserver import DEFAULT_EMBEDDED_PORT, LocalTypesense, embedded_api_key
from outbox_sync.notify import notify
from outbox_sync.telemetry import Telemetry, serve_metrics
from outbox_sync.typesense_index import DEFAULT_TIMEOUT_S, TypesenseIndex
from outbox_sync.worker import DEFAULT_BATCH_SIZE, Worker

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def connection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--db, --typesense-url, --api-key-file, --collection, --timeout, --embedded-port,
    --ca-file: each also
    from its environment variable; a flag wins over the environment."""
    options = [
        click.option(
            "--db",
            envvar="OUTBOX_SYNC_DB",
            default=DEFAULT_DB,
            show_default=True,
            metavar="PATH",
            help="SQLite database file [env: OUTBOX_SYNC_DB].",
        ),
        click.option(
            "--typesense-url",
            envvar="TYPESENSE_URL",
            metavar="URL[,URL...]",
            help="Typesense node URL, or several comma-separated nodes of a cluster "
            "[env: TYPESENSE_URL]. Unset: start the embedded Typesense on "
            "127.0.0.1 (needs the 'embedded' extra).",
        ),
        click.option(
            "--api-key-file",
            envvar="OUTBOX_SYNC_API_KEY_FILE",
            metavar="PATH",
            help="File holding the Typesense API key; otherwise the key is read from "
            "TYPESENSE_API_KEY. Never pass the key itself on the command line.",
        ),
        click.option(
            "--collection",
            envvar="OUTBOX_SYNC_COLLECTION",
            default=DEFAULT_COLLECTION,
            show_default=True,
            help="Typesense collection [env: OUTBOX_SYNC_COLLECTION].",
        ),
        click.option(
            "--timeout",
            "timeout_s",
            envvar="OUTBOX_SYNC_TIMEOUT",
            type=float,
            default=DEFAULT_TIMEOUT_S,
            show_default=True,
            metavar="SECONDS",
            help="Timeout of one Typesense request [env: OUTBOX_SYNC_TIMEOUT].",
        ),
        click.option(
            "--embedded-port",
            envvar="OUTBOX_SYNC_EMBEDDED_PORT",
            type=click.IntRange(1, 65535),
            default=DEFAULT_EMBEDDED_PORT,
            show_default=True,
            help="Port of the embedded Typesense on 127.0.0.1, used when no --typesense-url "
            "is set [env: OUTBOX_SYNC_EMBEDDED_PORT].",
        ),
        click.option(
            "--ca-file",
            envvar="OUTBOX_SYNC_CA_FILE",
            metavar="PATH",
            help="CA bundle to verify an https Typesense with [env: OUTBOX_SYNC_CA_FILE].",
        ),
    ]

    @functools.wraps(command)
    def wrapper(
        db: str,
        typesense_url: str | None,
        api_key_file: str | None,
        collection: str,
        timeout_s: float,
        embedded_port: int,
        ca_file: str | None,
        **kwargs: Any,
    ) -> Any:
        settings = build_settings(
            db=db,
            typesense_url=typesense_url,
            api_key_file=api_key_file,
            collection=collection,
            timeout_s=timeout_s,
            ca_file=ca_file,
            embedded_port=embedded_port,
        )
        logs.configure(click.get_current_context().obj["log_level"], (settings.api_key or "",))
        return command(settings, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


class Group(click.Group):
    """Turns our errors into one line on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OutboxSyncError as error:
            raise click.ClickException(str(error)) from None


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="outbox-sync")
@click.option(
    "--log-level",
    envvar="OUTBOX_SYNC_LOG_LEVEL",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Log verbosity [env: OUTBOX_SYNC_LOG_LEVEL]. Logs go to stderr: JSON lines "
    "when it is not a terminal.",
)
@click.pass_context
def main(ctx: click.Context, log_level: str) -> None:
    """Keep a Typesense collection in step with the `sequences` table of a SQLite file.

    Triggers on `sequences` record every insert, update and delete in an `outbox` table; the
    daemon (`run`) applies them to Typesense in order, retries a failed record once, and moves
    records that still fail into `sync_errors` for a human.

    \b
    Quick start (embedded Typesense, no setup):
      outbox-sync init        # tables and triggers in ./sequences.db
      outbox-sync run         # sync until Ctrl-C
    """
    ctx.obj = {"log_level": log_level}


@main.command()
@connection_options
@click.option(
    "--backfill",
    is_flag=True,
    help="Enqueue every existing row again, even if init already did once.",
)
def init(settings: Settings, backfill: bool) -> None:
    """Prepare the database: create `sequences` if absent, the `outbox` and `sync_errors` tables
    and the triggers, and enqueue rows that exist already (once). Safe to run again."""
    db = Database(settings.db_path, create=True)
    enqueued = db.init(backfill=backfill)
    click.echo(f"initialised {settings.db_path}: {enqueued} existing rows enqueued for sync")


@contextlib.contextmanager
def typesense(settings: Settings, *, start_embedded: bool) -> Iterator[TypesenseIndex]:
    """The index to work with; with no URL configured, the embedded server (started by `run`,
    only reached by the other commands)."""
    if not settings.embedded:
        assert settings.api_key is not None
        yield TypesenseIndex(
            settings.typesense_urls,
            settings.api_key,
            settings.collection,
            timeout_s=settings.timeout_s,
            ca_file=settings.ca_file,
        )
        return
    key = settings.api_key or embedded_api_key(settings.embedded_dir)
    server = LocalTypesense(settings.embedded_dir, api_key=key, port=settings.embedded_port)
    if start_embedded:
        structlog.get_logger("outbox_sync").info(
            "embedded_typesense_starting",
            url=server.url,
            data_dir=str(settings.embedded_dir),
            note="no TYPESENSE_URL set: using the embedded server",
        )
        server.start()
    try:
        yield TypesenseIndex([server.url], key, settings.collection, timeout_s=settings.timeout_s)
    finally:
        server.stop()


@main.command()
@connection_options
@click.option("--once", is_flag=True, help="Drain the outbox, then exit (for cron or scripts).")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 50_000),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    envvar="OUTBOX_SYNC_BATCH_SIZE",
    help="Outbox entries applied per Typesense request [env: OUTBOX_SYNC_BATCH_SIZE].",
)
@click.option(
    "--metrics-address",
    envvar="OUTBOX_SYNC_METRICS_ADDRESS",
    metavar="HOST:PORT",
    help="Serve Prometheus /metrics and /healthz there, e.g. 127.0.0.1:9464 "
    "[env: OUTBOX_SYNC_METRICS_ADDRESS]. Off by default; bind a non-loopback host only "
    "where the network is yours.",
)
def run(settings: Settings, once: bool, batch_size: int, metrics_address: str | None) -> None:
    """Run the sync daemon: apply outbox entries to Typesense as they are committed.

    Creates the collection if it is missing (and refuses one with another schema). While
    Typesense is unreachable, entries stay queued and the daemon retries with a capped backoff.
    SIGTERM or Ctrl-C finishes the current batch and exits 0; a second one exits at once.
    Only one daemon may work a database file at a time.
    """
    log = structlog.get_logger("outbox_sync")
    db = Database(settings.db_path)
    db.check_schema()
    metrics_at = parse_address(metrics_address) if metrics_address else None
    lock = DaemonLock(settings.db_path)
    lock.acquire()
    stop = threading.Event()
    telemetry = Telemetry()
    if metrics_at is not None:
        try:
            serve_metrics(telemetry, *metrics_at)
        except OSError as error:
            raise ConfigError(f"cannot serve metrics on {metrics_address}: {error}") from None
        log.info("metrics_serving", address=metrics_address, paths=["/metrics", "/healthz"])

    def request_stop(signum: int, _: Any) -> None:
        if stop.is_set():
            log.warning("stopping_now", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("stopping", signal=signal.Signals(signum).name)
        notify("STOPPING=1")
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with typesense(settings, start_embedded=True) as index:
        log.info(
            "started",
            db=str(settings.db_path),
            collection=settings.collection,
            nodes=list(settings.typesense_urls) or ["embedded"],
            batch_size=batch_size,
            once=once,
        )
        Worker(db, index, batch_size=batch_size, telemetry=telemetry).run(stop, once=once)
    log.info("stopped", pending=db.counts()["pending"])
    lock.release()


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT) -> (host, port); ConfigError otherwise."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"metrics address {address!r} must look like 127.0.0.1:9464")
    return host, int(port)


@main.command()
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(settings: Settings, as_json: bool) -> None:
    """Show the backlog, open sync errors, and what Typesense holds.

    Fields: pending (outbox entries), oldest_pending_age_s, sync_errors_open, rows (in
    `sequences`), documents (in Typesense; null when unreachable), typesense_ok.
    """
    figures = Database(settings.db_path).counts()
    figures["documents"], figures["typesense_ok"] = None, False
    with typesense(settings, start_embedded=False) as index:
        try:
            figures["documents"] = index.count()
            figures["typesense_ok"] = True
        except TypesenseError as error:
            figures["typesense_error"] = str(error)
    if as_json:
        click.echo(json.dumps(figures))
        return
    for name, value in figures.items():
        click.echo(f"{name:22} {'-' if value is None else value}")


@main.group()
def errors() -> None:
    """Review the records given up on (`sync_errors`)."""


@errors.command("list")
@connection_options
@click.option("--all", "include_resolved", is_flag=True, help="Include resolved errors.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of objects.")
def errors_list(settings: Settings, include_resolved: bool, as_json: bool) -> None:
    """List open sync errors (with --all, resolved ones too), oldest first."""
    rows = Database(settings.db_path).list_errors(include_resolved=include_resolved)
    if as_json:
        click.echo(json.dumps(rows, default=str))
        return
    if not rows:
        click.echo("no sync errors" if include_resolved else "no open sync errors")
        return
    click.echo(f"{'ID':>6}  {'RECORD':>10}  {'OP':6}  {'HTTP':4}  {'FAILED AT':20}  ERROR")
    for row in rows:
        http = "-" if row["http_status"] is None else str(row["http_status"])
        click.echo(
            f"{row['id']:>6}  {row['sequence_id']!s:>10}  {row['op']:6}  {http:4}  "
            f"{row['failed_at']:20}  {row['error']}"
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
