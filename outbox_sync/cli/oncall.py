"""The on-call commands: errors, audit, search, report (how they print: render.py)."""

import itertools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from outbox_sync import sync_errors
from outbox_sync.cli import render
from outbox_sync.cli.base import (
    FailedWith2,
    Integer,
    main,
    open_database,
    progress_bars,
    since_value,
    typesense,
    with_settings,
)
from outbox_sync.config import Settings, parse_duration
from outbox_sync.errors import CollectionNotFoundError, ConfigError, TypesenseRejectedError
from outbox_sync.report import DEFAULT_SINCE, build_report, iso
from outbox_sync.report_page import INSTALL_HINT, check_chart_library, page
from outbox_sync.values import shown_key

if TYPE_CHECKING:  # see cli/__init__.py
    from outbox_sync.typesense_index import TypesenseIndex

# Ids of `sync_errors` rows: SQLite integers (a larger number would overflow the binding).
ERROR_ID = Integer(1, 2**63 - 1)


@main.group()
def errors() -> None:
    """Review the records given up on (`sync_errors`)."""


@errors.command("list")
@with_settings(asks_typesense=False)
@click.option(
    "--status",
    type=click.Choice(sync_errors.STATUSES),
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
@click.option(
    "--limit",
    type=Integer(min=1),
    metavar="N",
    help="Only the first (oldest) N; a line on stderr says when more match.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of objects.")
def errors_list(
    settings: Settings,
    status: str | None,
    include_resolved: bool,
    since: float | None,
    op: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """List sync errors, oldest first.

    The open ones, unless --status or --all says otherwise; `outbox-sync errors show ID` prints
    one in full."""
    if include_resolved and status not in (None, "all"):
        raise click.UsageError("--all means --status all: give one or the other")
    status = "all" if include_resolved else status or "open"
    opened = open_database(settings)
    rows = sync_errors.scan(
        opened.db,
        status=status,
        since=None if since is None else iso(since),
        op=op,
        mappings=None if settings.collection is None else [m.name for m in opened.selected],
    )
    collections = {m.name: m.collection for m in opened.mappings}
    shown = (row | {"collection": collections.get(row["mapping"])} for row in rows)
    listed = itertools.islice(shown, limit)  # read as printed: a flood of errors in flat memory
    if as_json:  # the array written a part at a time, as json.dumps writes a list
        encode = json.JSONEncoder(default=str).encode
        items = (encode(row | {"record_key": shown_key(row["record_key"])}) for row in listed)
        click.echo("[", nl=False)
        separator = ""
        while part := list(itertools.islice(items, render.ECHO_LINES)):
            click.echo(separator + ", ".join(part), nl=False)
            separator = ", "
        click.echo("]")
    else:
        first = next(listed, None)
        if first is None:
            which = "open sync errors" if status == "open" else "sync errors"
            click.echo(f"no {which}" + (" matching" if since is not None or op else ""))
        else:
            render.echo_lines(render.error_table(itertools.chain([first], listed)))
    if limit is not None and next(shown, None) is not None:
        click.echo(f"more sync errors match: these are the first {limit} (--limit)", err=True)


@errors.command("show")
@with_settings(asks_typesense=False)
@click.argument("error_id", metavar="ID", type=ERROR_ID)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def errors_show(settings: Settings, error_id: int, as_json: bool) -> None:
    """Show one sync error in full.

    The document sent (or the row, when it failed validation), the HTTP status, the whole
    error text, attempts, when it failed and how it closed, and whether the record is in
    `sequences` and waiting in the outbox now."""
    opened = open_database(settings)
    error = sync_errors.get(opened.db, error_id, opened.by_name)
    if as_json:
        click.echo(json.dumps(error | {"record_key": shown_key(error["record_key"])}, default=str))
    else:
        render.echo_lines(render.error_details(error))


@errors.command("retry")
@with_settings(asks_typesense=False)
@click.argument("error_ids", metavar="[ID]...", nargs=-1, type=ERROR_ID)
@click.option(
    "--all", "retry_all", is_flag=True, help="Retry every open sync error (of --collection's)."
)
def errors_retry(settings: Settings, error_ids: tuple[int, ...], retry_all: bool) -> None:
    """Retry sync errors through the outbox, once their cause is fixed.

    Each record gets one outbox entry ('upsert' if its row exists, else 'delete'), so the daemon
    applies it with its usual guarantees; the record's open errors close as 'retried'. If it
    fails again, the daemon writes a new error row.
    """
    if bool(error_ids) == retry_all:
        raise click.UsageError("give the ids of the errors to retry, or --all (not both)")
    opened = open_database(settings)
    retries = sync_errors.retry(
        opened.db,
        opened.by_name,
        None if retry_all else error_ids,
        only=None if settings.collection is None else [m.name for m in opened.selected],
    )
    if not retries:
        click.echo("no open sync errors to retry")
        return
    render.echo_lines(
        f"record {retry.key!r} of {retry.mapping}: {retry.op} enqueued as outbox entry "
        f"{retry.outbox_id}; errors {', '.join(map(str, retry.closed_error_ids))} closed as retried"
        for retry in retries
    )
    click.echo(
        f"{len(retries)} records enqueued: the daemon applies them next "
        "(`outbox-sync errors list` shows any that fail again)"
    )


@errors.command("resolve")
@with_settings(asks_typesense=False)
@click.argument("error_ids", metavar="ID...", nargs=-1, type=ERROR_ID, required=True)
@click.option(
    "--note",
    required=True,
    help="Why the error is closed without a sync (kept with it, e.g. 'row fixed by hand').",
)
def errors_resolve(settings: Settings, error_ids: tuple[int, ...], note: str) -> None:
    """Close sync errors by hand, with a note.

    Their resolution becomes 'resolved' and the note is kept. Nothing is deleted: `errors list
    --status resolved` still shows them. The record is not synced again."""
    closing = tuple(dict.fromkeys(error_ids))  # an id given twice closes one error
    sync_errors.resolve(open_database(settings).db, closing, note)
    click.echo(f"closed {len(closing)} sync error{'s' * (len(closing) != 1)} as resolved")


@errors.command("prune")
@with_settings(asks_typesense=False)
@click.option(
    "--older-than",
    required=True,
    metavar="DURATION",
    help="Delete the errors closed longer ago than this: 90d, 12w (0 for every closed one).",
)
@click.option("--dry-run", is_flag=True, help="Only count them; delete nothing.")
def errors_prune(settings: Settings, older_than: str, dry_run: bool) -> None:
    """Delete closed sync errors older than an age.

    Only errors closed (superseded, retried or resolved) longer ago than --older-than go; open
    errors are never deleted, and nothing else deletes a sync error. With --collection, only
    that collection's. `report` counts the errors of its window: keep them at least as long as
    your reviews look back (7d by default). Safe while the daemon runs (short transactions).

    \b
    Example, from a weekly timer:
      outbox-sync errors prune --older-than 90d
    """
    try:
        cutoff = time.time() - parse_duration(older_than, "--older-than")
    except ConfigError:  # a usage error (2), as click's own
        raise click.BadParameter(
            f"{older_than!r} is not a duration such as 90d or 12w", param_hint="--older-than"
        ) from None
    if cutoff < 0:  # before 1970, which no error is: iso() wrote a negative year, or failed
        raise click.BadParameter(
            f"{older_than!r} reaches back before 1970", param_hint="--older-than"
        )
    before = iso(cutoff)
    opened = open_database(settings)
    count = sync_errors.prune(
        opened.db,
        before,
        None if settings.collection is None else [m.name for m in opened.selected],
        dry_run=dry_run,
    )
    errors = f"closed sync error{'s' * (count != 1)} (closed by {before})"
    click.echo(f"{'would delete' if dry_run else 'deleted'} {count} {errors}; open ones are kept")


@main.command()
@with_settings(failure=FailedWith2)  # 1 means drift
@click.option(
    "--repair",
    is_flag=True,
    help="Enqueue exactly the drifted records into the outbox (extras as deletes); the running "
    "daemon then fixes them with its usual guarantees.",
)
@click.option(
    "--max-lag",
    default="10m",
    show_default=True,
    metavar="DURATION",
    help="Exit 1 also when the oldest change waiting in the outbox is older: records waiting "
    "are not drift, but a stalled outbox is not consistent either.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object listing every drifted id."
)
def audit(settings: Settings, repair: bool, max_lag: str, as_json: bool) -> None:
    """Find drift between `sequences` and Typesense, and repair it.

    Compares every row with every document, field by field, after the daemon's own mapping, and
    reports drift: missing (row, no document), extra (document, no
    row), stale (different content) and invalid (a row that fails validation with no open sync
    error). Records waiting in the outbox, and records with an open sync error, are not drift.
    A collection whose fields are not the mapping's (altered in Typesense) is drift too.

    Exit status: 0 consistent, 1 drift found (also with --repair) or a change waiting longer
    than --max-lag, 2 error. Safe while the daemon and the application run; memory stays flat
    however large the table.
    """
    from outbox_sync.audit import Audit, audit_json
    from outbox_sync.health import fields_advice

    max_lag_s = parse_duration(max_lag, "--max-lag")
    opened = open_database(settings)
    consistent = True
    with typesense(settings, opened, start_embedded=False) as indexes, progress_bars() as bars:
        for index in indexes:
            index.take_as_it_is()  # rows judged as the daemon indexes them
            with Audit(opened.db, index, progress=bars) as checked:
                summary = checked.run()
                if bars is not None:
                    bars.close()
                consistent = consistent and summary.consistent
                repaired = checked.repair() if repair and not summary.consistent else None
                if as_json:  # one object a line, a collection each
                    for chunk in audit_json(checked, summary, repaired):
                        click.echo(chunk, nl=False)
                    click.echo()
                else:
                    render.echo_lines(
                        render.audit_lines(index.collection, checked, summary, repaired)
                    )
            if changed := index.fields_changed():  # its documents compare alike: searches fail
                consistent = False
                click.echo(fields_advice(index.collection, "; ".join(changed)), err=as_json)
    if waiting := [i.collection for i in indexes if opened.db.fill_asked(i.mapping.name)]:
        click.echo(
            f"not filled yet: {', '.join(waiting)}: `init` found rows in the table, which the "
            "daemon indexes when it starts (their documents are missing until then)",
            err=as_json,
        )
    waited_s = opened.db.backlog(opened.asked)[1] or 0.0
    if waited_s > max_lag_s:
        click.echo(
            f"stalled: the oldest change has waited {waited_s:.0f} s in the outbox (more than "
            "--max-lag): is the daemon running? (`outbox-sync check`)",
            err=as_json,
        )
    if not consistent or waited_s > max_lag_s:
        click.get_current_context().exit(1)


@main.command()
@with_settings()
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
    help="Typesense sort_by, e.g. 'sequence_number:asc' (default: best match, then the "
    "collection's default sorting field).",
)
@click.option(
    "--facet",
    "facets",
    metavar="FIELD",
    multiple=True,
    help="Count the documents found per value of this field (a facet field, e.g. "
    "element_type); may be given more than once.",
)
@click.option(
    "--limit",
    type=Integer(1, 250),
    default=10,
    show_default=True,
    help="Documents to show (Typesense gives at most 250 at once).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object a collection: found, the documents, the facet counts.",
)
def search(
    settings: Settings,
    query: str,
    filter_by: str | None,
    sort_by: str | None,
    facets: tuple[str, ...],
    limit: int,
    as_json: bool,
) -> None:
    """Search what Typesense holds (every mapping's collection, or the one of --collection).

    QUERY matches the collection's indexed text fields (for `sequences`: element_type, comment
    and created_at; '*' matches every document); on a terminal the match is highlighted. A
    quick look for on-call, without curl: `outbox-sync search '*' --filter id:=123` shows
    whether record 123 is indexed and what its document holds.
    """
    opened = open_database(settings)
    with typesense(settings, opened, start_embedded=False) as indexes:
        for index in indexes:
            result = _search(index, query, filter_by, sort_by, facets, limit)
            documents = [hit["document"] for hit in result.get("hits", [])]
            if as_json:
                counts = render.facet_counts(result)
                click.echo(
                    json.dumps(
                        {
                            "collection": index.collection,
                            "found": result.get("found", 0),
                            "documents": documents,
                            **({"facets": counts} if facets else {}),
                        }
                    )
                )
                continue
            render.echo_lines(render.search_lines(index.collection, index.mapping, result))


def _search(
    index: "TypesenseIndex",
    query: str,
    filter_by: str | None,
    sort_by: str | None,
    facets: tuple[str, ...],
    limit: int,
) -> dict[str, Any]:
    searched = [
        f.name
        for f in index.mapping.fields
        if f.element == "string" and f.index  # the text a person would look for
    ]
    params: dict[str, Any] = {
        "q": query,
        "query_by": ",".join(searched) or "id",
        "per_page": limit,
        "highlight_full_fields": ",".join(searched),
    }
    for name, value in (("filter_by", filter_by), ("sort_by", sort_by)):
        if value:
            params[name] = value
    if facets:
        params["facet_by"] = ",".join(facets)
    index.count()  # a missing collection or a wrong key is said plainly, first
    try:
        return index.search(params)
    except CollectionNotFoundError:
        raise
    except TypesenseRejectedError as error:
        raise TypesenseRejectedError(
            f"Typesense refused the search of {index.collection!r}: {error.reason}; check "
            "QUERY, --filter, --sort and --facet",
            error.http_status,
        ) from None


@main.command()
@with_settings(asks_typesense=False)
@click.option(
    "--since",
    callback=since_value,
    metavar="WHEN",
    default=DEFAULT_SINCE,
    show_default=True,
    help="Start of the window: 30m, 12h, 7d, 2w, or an ISO date or time (UTC unless it says).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object (with the charts' series)."
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Also write the review as one HTML page with charts, which opens with no network "
    f"(needs the report extra: {INSTALL_HINT}).",
)
def report(settings: Settings, since: float, as_json: bool, html_path: Path | None) -> None:
    """The weekly review of what the daemon did.

    From the statistics the daemon keeps in the database: records applied (by operation),
    retried and given up on (by HTTP status and error kind), Typesense latency (p50/p95/p99 per
    operation), outages, and the backlog now. --html draws them hour by hour, with the backlog
    and lag over time. It covers every collection the daemon syncs, whatever --collection
    says: the statistics are the daemon's.

    Latency percentiles are bucket upper bounds (≤ 5 ms means between 2.5 and 5 ms). The daemon
    adds its statistics to the current minute every few seconds, and when it stops.
    """
    if html_path is not None:
        check_chart_library()  # before the work, not after it
    figures = build_report(open_database(settings).db, since)
    summary = list(render.report_lines(figures))
    if html_path is not None:  # before stdout: a reader gone (`| head -1`) ends the command
        try:
            # as the page declares itself (`<meta charset="utf-8">`), whatever the locale
            html_path.write_text(page(figures, summary), encoding="utf-8")
        except OSError as error:
            raise click.ClickException(f"cannot write {html_path}: {error.strerror}") from None
    if as_json:
        click.echo(json.dumps(figures))
    else:
        render.echo_lines(summary)
    if html_path is not None:
        click.echo(f"wrote the weekly review with charts to {html_path}", err=True)
