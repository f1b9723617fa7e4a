"""The command line: parse options, call the library, turn its errors into one clear line."""

import contextlib
import functools
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import click
import structlog

from outbox_sync import __version__, logs, reindex
from outbox_sync.audit import KINDS, Audit, AuditSummary, RepairSummary, audit_json
from outbox_sync.config import DEFAULT_COLLECTION, DEFAULT_DB, Settings, build_settings
from outbox_sync.db import DaemonLock, Database
from outbox_sync.errors import (
    AlreadyRunningError,
    ConfigError,
    OutboxSyncError,
    TypesenseError,
    TypesenseRejectedError,
    TypesenseUnavailableError,
)
from outbox_sync.localserver import DEFAULT_EMBEDDED_PORT, LocalTypesense, embedded_api_key
from outbox_sync.notify import notify
from outbox_sync.report import DEFAULT_SINCE, build_report, iso, parse_since
from outbox_sync.telemetry import LATENCY_BUCKETS_S, Telemetry, serve_metrics
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
    db.check_writable()
    metrics_at = parse_address(metrics_address) if metrics_address else None
    stop = threading.Event()

    def request_stop(signum: int, _: Any) -> None:
        if stop.is_set():
            log.warning("stopping_now", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("stopping", signal=signal.Signals(signum).name)
        notify("STOPPING=1")
        stop.set()

    with DaemonLock(settings.db_path), contextlib.ExitStack() as cleanup:
        telemetry = Telemetry()
        if metrics_at is not None:
            try:
                server = serve_metrics(telemetry, *metrics_at)
            except OSError as error:
                raise ConfigError(f"cannot serve metrics on {metrics_address}: {error}") from None
            cleanup.callback(server.server_close)
            cleanup.callback(server.shutdown)
            log.info("metrics_serving", address=metrics_address, paths=["/metrics", "/healthz"])
        for signum in (signal.SIGTERM, signal.SIGINT):
            cleanup.callback(signal.signal, signum, signal.signal(signum, request_stop))
        index = cleanup.enter_context(typesense(settings, start_embedded=True))
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
    figures = open_database(settings).counts()
    figures["documents"], figures["typesense_ok"] = None, False
    with typesense(settings, start_embedded=False) as index:
        try:
            figures["documents"] = index.count()
            figures["typesense_ok"] = True
        except TypesenseError as error:
            figures["typesense_error"] = advise(error, settings)
    if as_json:
        click.echo(json.dumps(figures))
        return
    for name, value in figures.items():
        click.echo(f"{name:22} {'-' if value is None else value}")


# -- on-call tooling: errors, audit, search, report ---------------------------------------------


class AuditFailed(click.ClickException):
    """One line on stderr and exit status 2: audit keeps 1 for "drift found"."""

    exit_code = 2


def audit_exit_status(command: Callable[..., Any]) -> Callable[..., Any]:
    """Our errors end the command with exit status 2 (so that 1 can mean drift). Put it above
    @connection_options, so a bad flag or variable exits with 2 too."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except OutboxSyncError as error:
            raise AuditFailed(str(error)) from None

    return wrapper


def open_database(settings: Settings) -> Database:
    """The database, refused with what to do unless `init` has prepared it."""
    db = Database(settings.db_path)
    db.check_schema()
    return db


def advise(error: TypesenseError, settings: Settings) -> str:
    """The error's message, followed by what to do when the message does not say already."""
    message = str(error)
    if isinstance(error, TypesenseUnavailableError):
        if settings.embedded:
            return (
                f"{message}: no --typesense-url is set, so this is the embedded Typesense on "
                f"127.0.0.1:{settings.embedded_port}, which runs only while `outbox-sync run` "
                "does; start the daemon, or set TYPESENSE_URL to your Typesense"
            )
        return (
            f"{message}: check that Typesense is up and healthy at "
            f"{', '.join(settings.typesense_urls)} (--typesense-url, TYPESENSE_URL)"
        )
    if error.http_status == 404 and "does not exist" in message:
        return (
            f"{message}: check --collection (OUTBOX_SYNC_COLLECTION); `outbox-sync run` creates "
            "the collection when it starts"
        )
    return message


@contextlib.contextmanager
def reachable_typesense(settings: Settings) -> Iterator[TypesenseIndex]:
    """The index, for commands that read Typesense (they never start the embedded server); a
    Typesense failure inside says what to do about it."""
    with typesense(settings, start_embedded=False) as index:
        try:
            yield index
        except TypesenseError as error:
            advised = advise(error, settings)
            if advised == str(error):
                raise
            raise type(error)(advised, error.http_status) from None


def since_value(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """--since: 30m, 12h, 7d, 2w, or an ISO date or time (UTC unless it says), as Unix time."""
    if value is None:
        return None
    try:
        return parse_since(value, time.time())
    except ValueError as error:
        raise click.BadParameter(str(error), ctx, param) from None


# Ids shown per kind of drift on a terminal; --json lists them all.
SHOWN_IDS = 20


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@main.group()
def errors() -> None:
    """Review the records given up on (`sync_errors`)."""


@errors.command("list")
@connection_options
@click.option(
    "--status",
    type=click.Choice(["open", "resolved", "all"]),
    help="Which errors: open (the default), resolved (closed as superseded, retried or "
    "resolved by hand) or all.",
)
@click.option("--all", "include_resolved", is_flag=True, help="Include resolved errors.")
@click.option(
    "--since",
    callback=since_value,
    metavar="WHEN",
    help="Only errors that failed since then: 30m, 12h, 7d, 2w, or an ISO date or time.",
)
@click.option(
    "--op", type=click.Choice(["upsert", "delete"]), help="Only errors of this operation."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of objects.")
def errors_list(
    settings: Settings,
    status: str | None,
    include_resolved: bool,
    since: float | None,
    op: str | None,
    as_json: bool,
) -> None:
    """List sync errors, oldest first.

    The open ones, unless --status or --all says otherwise; `outbox-sync errors show ID` prints
    one in full."""
    if include_resolved and status not in (None, "all"):
        raise click.UsageError("--all means --status all: give one or the other")
    status = "all" if include_resolved else status or "open"
    rows = open_database(settings).find_errors(
        status=status, since=None if since is None else iso(since), op=op
    )
    if as_json:
        click.echo(json.dumps(rows, default=str))
        return
    if not rows:
        which = "open sync errors" if status == "open" else "sync errors"
        click.echo(f"no {which}" + (" matching" if since is not None or op else ""))
        return
    click.echo(
        f"{'ID':>6}  {'RECORD':>10}  {'OP':6}  {'HTTP':4}  {'FAILED AT':20}  {'STATUS':10}  ERROR"
    )
    for row in rows:
        http = "-" if row["http_status"] is None else str(row["http_status"])
        state = row["resolution"] or "open"
        click.echo(
            f"{row['id']:>6}  {row['sequence_id']!s:>10}  {row['op']:6}  {http:4}  "
            f"{row['failed_at']:20}  {state:10}  {shorten(row['error'], 100)}"
        )


@errors.command("show")
@connection_options
@click.argument("error_id", metavar="ID", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def errors_show(settings: Settings, error_id: int, as_json: bool) -> None:
    """Show one sync error in full.

    The document sent (or the row, when it failed validation), the HTTP status, the whole
    error text, attempts, when it failed and how it closed, and whether the record is in
    `sequences` and waiting in the outbox now."""
    error = open_database(settings).get_error(error_id)
    if as_json:
        click.echo(json.dumps(error, default=str))
        return
    state = "open" if error["resolved_at"] is None else f"closed: {error['resolution']}"
    http = error["http_status"] if error["http_status"] is not None else "- (our validation)"
    record = "in sequences" if error["record_exists"] else "not in sequences (deleted)"
    for name, value in (
        ("sync error", f"{error['id']} ({state})"),
        ("record", f"{error['sequence_id']!r}, {record}, {error['pending']} outbox entries"),
        ("operation", error["op"]),
        ("http status", http),
        ("attempts", error["attempts"]),
        ("outbox entry", error["outbox_id"]),
        ("failed at", error["failed_at"]),
        ("resolved at", error["resolved_at"] or "-"),
        ("note", error["note"] or "-"),
    ):
        click.echo(f"{name:13} {value}")
    click.echo("error:")
    click.echo(f"  {error['error']}")
    click.echo("document sent:" if error["http_status"] is not None else "row:")
    document = error["document"]
    if document is None:
        click.echo("  -")
        return
    with contextlib.suppress(ValueError):  # a row that failed validation is shown as stored
        document = json.dumps(json.loads(document), indent=2, ensure_ascii=False)
    for line in document.splitlines():
        click.echo(f"  {line}")


@errors.command("retry")
@connection_options
@click.argument("error_ids", metavar="[ID]...", nargs=-1, type=int)
@click.option("--all", "retry_all", is_flag=True, help="Retry every open sync error.")
def errors_retry(settings: Settings, error_ids: tuple[int, ...], retry_all: bool) -> None:
    """Retry sync errors through the outbox, once their cause is fixed.

    Each record gets one outbox entry ('upsert' if its row exists, else 'delete'), so the daemon
    applies it with its usual guarantees; the record's open errors close as 'retried'. If it
    fails again, the daemon writes a new error row.
    """
    if bool(error_ids) == retry_all:
        raise click.UsageError("give the ids of the errors to retry, or --all (not both)")
    retries = open_database(settings).retry_errors(None if retry_all else error_ids)
    if not retries:
        click.echo("no open sync errors to retry")
        return
    for retry in retries:
        closed = ", ".join(str(error_id) for error_id in retry.closed_error_ids)
        click.echo(
            f"record {retry.sequence_id!r}: {retry.op} enqueued as outbox entry "
            f"{retry.outbox_id}; errors {closed} closed as retried"
        )
    click.echo(
        f"{len(retries)} records enqueued: the daemon applies them next "
        "(`outbox-sync errors list` shows any that fail again)"
    )


@errors.command("resolve")
@connection_options
@click.argument("error_ids", metavar="ID...", nargs=-1, type=int, required=True)
@click.option(
    "--note",
    required=True,
    help="Why the error is closed without a sync (kept with it, e.g. 'row fixed by hand').",
)
def errors_resolve(settings: Settings, error_ids: tuple[int, ...], note: str) -> None:
    """Close sync errors by hand, with a note.

    Their resolution becomes 'resolved' and the note is kept. Nothing is deleted: `errors list
    --status resolved` still shows them. The record is not synced again."""
    open_database(settings).resolve_errors(error_ids, note)
    click.echo(f"closed {len(error_ids)} sync errors as resolved")


class ProgressBars:
    """Audit progress on stderr: one click progress bar per phase."""

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


@main.command()
@audit_exit_status
@connection_options
@click.option(
    "--repair",
    is_flag=True,
    help="Enqueue exactly the drifted records into the outbox (extras as deletes); the running "
    "daemon then fixes them with its usual guarantees.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object listing every drifted id."
)
def audit(settings: Settings, repair: bool, as_json: bool) -> None:
    """Find drift between `sequences` and Typesense, and repair it.

    Compares every row with every document, field by field, after the daemon's own mapping, and
    reports drift: missing (row, no document), extra (document, no
    row), stale (different content) and invalid (a row that fails validation with no open sync
    error). Records waiting in the outbox, and records with an open sync error, are not drift.

    Exit status: 0 consistent, 1 drift found (also with --repair), 2 error. Safe while the
    daemon and the application run; memory stays flat however large the table.
    """
    db = open_database(settings)
    progress = ProgressBars() if sys.stderr.isatty() else None
    with reachable_typesense(settings) as index, Audit(db, index, progress=progress) as checked:
        try:
            summary = checked.run()
        finally:
            if progress is not None:
                progress.close()
        repaired = checked.repair() if repair and not summary.consistent else None
        if as_json:
            for chunk in audit_json(checked, summary, repaired):
                click.echo(chunk, nl=False)
            click.echo()
        else:
            show_audit(settings, checked, summary, repaired)
    if not summary.consistent:
        click.get_current_context().exit(1)


def show_audit(
    settings: Settings, checked: Audit, summary: AuditSummary, repaired: RepairSummary | None
) -> None:
    verdict = "consistent" if summary.consistent else "drift found"
    click.echo(
        f"audit of collection {settings.collection!r}: {summary.rows} rows, "
        f"{summary.documents} documents: {verdict}"
    )
    for kind in (*KINDS, "known"):
        count = summary.known_errors if kind == "known" else summary.counts[kind]
        if kind == "known" and not count:
            continue
        shown = []
        for key, detail in itertools.islice(checked.ids(kind), SHOWN_IDS):
            shown.append(f"{key!r} ({shorten(detail, 60)})" if detail else repr(key))
        more = f", … and {count - len(shown)} more (--json lists all)" if count > len(shown) else ""
        label = "open error" if kind == "known" else kind
        click.echo(f"  {label:10} {count:>8}  {', '.join(shown)}{more}".rstrip())
    if summary.pending or summary.known_errors:
        click.echo(
            f"not drift: {summary.pending} records waiting in the outbox, "
            f"{summary.known_errors} with an open sync error (`outbox-sync errors list`)"
        )
    if repaired is not None:
        deleted = f"; deleted {len(repaired.deleted)} documents no row can have" * bool(
            repaired.deleted
        )
        click.echo(
            f"repair: {repaired.enqueued} records enqueued for the daemon{deleted}; "
            "run audit again once it has caught up"
        )
    elif not summary.consistent:
        click.echo("`outbox-sync audit --repair` enqueues them for the daemon to fix")


@main.command()
@connection_options
@click.argument("query")
@click.option(
    "--filter",
    "filter_by",
    metavar="FILTER",
    help="Typesense filter_by, e.g. 'id:=123' or 'element_type:=script && sequence_number:>5'.",
)
@click.option(
    "--sort",
    "sort_by",
    metavar="SORT",
    help="Typesense sort_by, e.g. 'sequence_number:asc' (default: best match, then "
    "sequence_number descending).",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 250),
    default=10,
    show_default=True,
    help="Documents to show (Typesense gives at most 250 at once).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object: found, and the documents."
)
def search(
    settings: Settings,
    query: str,
    filter_by: str | None,
    sort_by: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Search what Typesense holds.

    QUERY matches `comment` ('*' matches every document).
    A quick look for on-call, without curl: `outbox-sync search '*' --filter id:=123` shows
    whether record 123 is indexed and what its document holds.
    """
    params: dict[str, Any] = {"q": query, "query_by": "comment", "per_page": limit}
    if filter_by:
        params["filter_by"] = filter_by
    if sort_by:
        params["sort_by"] = sort_by
    with reachable_typesense(settings) as index:
        index.count()  # a missing collection or a wrong key is said plainly, first
        try:
            result = index.search(params)
        except TypesenseRejectedError as error:
            match = re.search(r"\((\d{3}): (.*)\)$", str(error))  # classify's 404 wording
            reason = match[2] if match else str(error)
            raise TypesenseRejectedError(
                f"Typesense refused the search: {reason}; check QUERY, --filter and --sort",
                error.http_status,
            ) from None
    documents = [hit["document"] for hit in result.get("hits", [])]
    if as_json:
        click.echo(json.dumps({"found": result.get("found", 0), "documents": documents}))
        return
    click.echo(
        f"found {result.get('found', 0)} in {settings.collection!r}, showing {len(documents)}"
    )
    if not documents:
        return
    click.echo(f"{'ID':>10}  {'TYPE':12}  {'ELEMENT':>10}  {'SEQ':>10}  {'CREATED AT':20}  COMMENT")
    columns = ("id", "element_type", "element_id", "sequence_number", "created_at", "comment")
    for document in documents:
        key, element_type, element_id, number, created_at, comment = (
            str(document.get(name, "")) for name in columns
        )
        click.echo(
            f"{key:>10}  {element_type:12}  {element_id:>10}  {number:>10}  {created_at:20}  "
            f"{shorten(comment, 60)}"
        )


@main.command()
@connection_options
@click.option(
    "--since",
    callback=since_value,
    metavar="WHEN",
    default=DEFAULT_SINCE,
    show_default=True,
    help="Start of the window: 30m, 12h, 7d, 2w, or an ISO date or time (UTC unless it says).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def report(settings: Settings, since: float, as_json: bool) -> None:
    """The weekly review of what the daemon did.

    From the statistics the daemon keeps in the database: records applied (by operation),
    retried and given up on (by HTTP status and error kind), Typesense latency (p50/p95/p99 per
    operation), outages, and the backlog now.

    Latency percentiles are bucket upper bounds (≤ 5 ms means between 2.5 and 5 ms). The daemon
    saves its statistics once a minute and when it stops.
    """
    figures = build_report(open_database(settings), since)
    if as_json:
        click.echo(json.dumps(figures))
        return
    for line in report_lines(figures):
        click.echo(line)


def report_lines(figures: dict[str, Any]) -> Iterator[str]:
    yield (
        f"outbox-sync report, {figures['since']} to {figures['until']} "
        f"({figures['stats_minutes']} minute(s) of daemon statistics)"
    )
    applied, given_up = figures["applied"], figures["given_up"]
    yield ""
    yield (
        f"applied        {applied['total']:>9}  upsert {applied['upsert']}, "
        f"delete {applied['delete']}"
    )
    yield f"retried        {figures['retried']:>9}  documents Typesense refused once, then retried"
    statuses = ", ".join(
        f"{'HTTP ' if status.isdigit() else ''}{status}: {count}"
        for status, count in given_up["by_status"].items()
    )
    yield f"given up       {given_up['total']:>9}  {statuses}"
    for kind in given_up["by_kind"]:
        yield f"{'':15}{kind['count']:>9}  {kind['kind']}"
    closed = figures["errors_closed"]
    yield (
        f"errors closed  {sum(closed.values()):>9}  superseded {closed.get('superseded', 0)}, "
        f"retried {closed.get('retried', 0)}, resolved by hand {closed.get('resolved', 0)}"
    )
    yield ""
    yield f"{'Typesense':15}{'requests':>9}  {'p50':>8}  {'p95':>8}  {'p99':>8}"
    for operation, latency in figures["latency"].items():
        over = f"  ({latency['over_last_bucket']} over {LATENCY_BUCKETS_S[-1]:g} s)"
        yield (
            f"  {operation:13}{latency['requests']:>9}  {seconds(latency['p50_s']):>8}  "
            f"{seconds(latency['p95_s']):>8}  {seconds(latency['p99_s']):>8}"
            + (over if latency["over_last_bucket"] else "")
        )
    outages = figures["outages"]
    longest = outages["longest"]
    yield ""
    yield (
        "outages        "
        + (
            f"{outages['count']:>9}  longest {longest['seconds']:g} s ({longest['start']} to "
            f"{longest['end']}), {outages['total_s']:g} s in all"
            if longest
            else f"{0:>9}"
        )
    )
    backlog = figures["backlog"]
    age = backlog["oldest_pending_age_s"]
    yield (
        f"backlog now    {backlog['pending']:>9}  oldest {'-' if age is None else f'{age:g} s'}, "
        f"{backlog['sync_errors_open']} open sync errors"
    )


def seconds(value: float | None) -> str:
    """A bucket bound for people: ≤5 ms, ≤1 s."""
    if value is None:
        return "-"
    return f"≤{value * 1000:g} ms" if value < 1 else f"≤{value:g} s"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


@main.command("reindex")
@connection_options
def reindex_command(settings: Settings) -> None:
    """Rebuild the collection from SQLite with zero downtime.

    Fills a new versioned collection from the rows of `sequences`, points the collection name
    (an alias) at it, and drops the old one: searches keep answering throughout, and nothing
    committed meanwhile is lost. Also the way to apply a changed collection schema.

    With a daemon running on the database, it asks the daemon to do it (the daemon pauses
    applying changes while it rebuilds, then applies what was committed meanwhile) and follows
    its progress; otherwise it does it itself, holding the daemon lock.
    """
    db = open_database(settings)
    lock = DaemonLock(settings.db_path)
    try:
        lock.acquire()
    except AlreadyRunningError:
        result = follow_daemon_reindex(db, lock)
    else:
        try:
            with typesense(settings, start_embedded=True) as index, progress_bar("reindex") as bar:
                result = asdict(reindex.rebuild(db, index, progress=bar))
        finally:
            lock.release()
    old = f", dropped {result['old']}" if result["old"] else ""
    click.echo(
        f"reindexed {result['rows']} rows into {result['new']}{old}: {result['indexed']} "
        f"indexed, {result['invalid']} invalid (see `outbox-sync errors list`), "
        f"{result['requeued']} refused by Typesense and queued again"
    )


@contextlib.contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """(done, total) -> one of ProgressBars on a terminal's stderr; nothing elsewhere."""
    if not sys.stderr.isatty():
        yield lambda done, total: None
        return
    bars = ProgressBars()
    try:
        yield lambda done, total: bars(label, done, total)
    finally:
        bars.close()


# How long the running daemon has to pick up a reindex request (it looks every second).
REINDEX_PICKUP_TIMEOUT_S = 30.0


def follow_daemon_reindex(db: Database, lock: DaemonLock) -> dict[str, Any]:
    """Ask the running daemon to reindex and wait for its verdict, showing its progress."""
    token = reindex.request(db)
    asked = time.monotonic()
    with progress_bar("reindex") as bar:
        while True:
            state = reindex.status(db, token)
            if state is not None and state["state"] != "running":
                break
            if state is not None:
                bar(state["done"], state["total"])
            elif time.monotonic() - asked > REINDEX_PICKUP_TIMEOUT_S:
                db.set_meta(reindex.REQUEST_KEY, None)
                raise OutboxSyncError(
                    "the running daemon did not take up the reindex within "
                    f"{REINDEX_PICKUP_TIMEOUT_S:.0f} s: check its logs (is Typesense reachable?)"
                )
            try:  # the daemon died meanwhile?
                lock.acquire()
            except AlreadyRunningError:
                time.sleep(0.2)
                continue
            lock.release()
            db.set_meta(reindex.REQUEST_KEY, None)
            raise OutboxSyncError("the daemon stopped before finishing the reindex: run it again")
    if state["state"] == "failed":
        raise OutboxSyncError(f"reindex failed, the old collection stays in use: {state['error']}")
    return state
