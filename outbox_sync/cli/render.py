"""How the on-call commands print for people (their --json output is the data itself)."""

import contextlib
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import click

from outbox_sync.config import Settings, format_duration
from outbox_sync.config_file import toml_inline_table, toml_value
from outbox_sync.mapping import Mapping
from outbox_sync.stats import LATENCY_BUCKETS_S

if TYPE_CHECKING:  # imported by `audit` when it runs (see cli/__init__.py)
    from outbox_sync.audit import Audit, AuditSummary, RepairSummary
    from outbox_sync.schema import Installed

# Ids shown per kind of drift on a terminal; --json lists them all.
SHOWN_IDS = 20


# Lines per write: click.echo looks at the terminal and flushes at every call, which took more
# time than the rest when listing 300,000 sync errors.
ECHO_LINES = 1000


def echo_lines(lines: Iterable[str]) -> None:
    lines = iter(lines)
    while chunk := list(itertools.islice(lines, ECHO_LINES)):
        click.echo("\n".join(chunk))


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def error_table(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    yield (
        f"{'ID':>6}  {'COLLECTION':12}  {'RECORD':>10}  {'OP':6}  {'HTTP':4}  {'FAILED AT':20}  "
        f"{'STATUS':10}  ERROR"
    )
    for row in rows:
        http = "-" if row["http_status"] is None else str(row["http_status"])
        state = row["resolution"] or "open"
        collection = row.get("collection") or f"({row['mapping']})"
        # the key as audit, retry and show name it: a TEXT key quoted, its line breaks escaped
        yield (
            f"{row['id']:>6}  {shorten(collection, 12):12}  {row['record_key']!r:>10}  "
            f"{row['op']:6}  {http:4}  {row['failed_at']:20}  {state:10}  "
            f"{shorten(row['error'], 100)}"
        )


def error_details(error: dict[str, Any]) -> Iterator[str]:
    state = "open" if error["resolved_at"] is None else f"closed: {error['resolution']}"
    http = error["http_status"] if error["http_status"] is not None else "- (our validation)"
    record = {
        True: f"a row of mapping {error['mapping']}",
        False: f"no row of mapping {error['mapping']} (deleted, or outside its where)",
        None: f"of mapping {error['mapping']}, which is not configured",
    }[error["record_exists"]]
    for name, value in (
        ("sync error", f"{error['id']} ({state})"),
        ("record", f"{error['record_key']!r}, {record}, {error['pending']} outbox entries"),
        ("operation", error["op"]),
        ("http status", http),
        ("attempts", error["attempts"]),
        ("outbox entry", error["outbox_id"]),
        ("failed at", error["failed_at"]),
        ("resolved at", error["resolved_at"] or "-"),
        ("note", error["note"] or "-"),
    ):
        yield f"{name:13} {value}"
    yield "error:"
    for line in error["error"].splitlines():  # a text it quotes may hold line breaks
        yield f"  {line}"
    yield "document sent:" if error["http_status"] is not None else "row:"
    document = error["document"]
    if document is None:
        yield "  -"
        return
    with contextlib.suppress(ValueError):  # a row that failed validation is shown as stored
        document = json.dumps(json.loads(document), indent=2, ensure_ascii=False)
    for line in document.splitlines():
        yield f"  {line}"


def audit_lines(
    collection: str, checked: "Audit", summary: "AuditSummary", repaired: "RepairSummary | None"
) -> Iterator[str]:
    from outbox_sync.audit import KINDS

    verdict = "consistent" if summary.consistent else "drift found"
    yield (
        f"audit of collection {collection!r}: {summary.rows} rows, "
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
        yield f"  {label:10} {count:>8}  {', '.join(shown)}{more}".rstrip()
    if summary.pending or summary.known_errors:
        yield (
            f"not drift: {summary.pending} records waiting in the outbox, "
            f"{summary.known_errors} with an open sync error (`outbox-sync errors list`)"
        )
    if shared := summary.counts["shared"]:
        yield (
            f"shared: {shared} keys more than one row holds; a document shows one of them, and "
            "no repair can show them all: make the key column unique"
        )
    if repaired is not None:
        deleted = f"; deleted {len(repaired.deleted)} documents no row can have" * bool(
            repaired.deleted
        )
        yield (
            f"repair: {repaired.enqueued} records enqueued for the daemon{deleted}; "
            "run audit again once it has caught up"
        )
    elif not summary.consistent:
        yield "`outbox-sync audit --repair` enqueues them for the daemon to fix"


def status_lines(figures: dict[str, Any]) -> Iterator[str]:
    width = max(map(len, figures), default=0)
    for name, value in figures.items():
        if name == "collections":
            continue
        if name == "last_audit" and value is not None:
            outcome = "consistent" if value["consistent"] else f"drift {value['drift']}"
            if not value["ok"]:
                outcome = f"failed: {value['error']}"
            value = (
                f"{value['finished_at']} ({value['reason']}): {outcome}, "
                f"{value['enqueued']} repairs queued"
            )
        elif isinstance(value, list):
            value = "; ".join(value)
        yield f"{name:{width}} {'-' if value is None else value}"
    for collection, one in figures.get("collections", {}).items():
        shown = ", ".join(f"{k} {'-' if v is None else v}" for k, v in one.items())
        yield f"{'collection ' + collection:{width}} {shown}"


def search_lines(collection: str, mapping: Mapping, result: dict[str, Any]) -> Iterator[str]:
    """What a search found: a line a document (its id and fields, the match highlighted where
    the terminal can show it), then the facet counts."""
    hits = result.get("hits", [])
    yield f"found {result.get('found', 0)} in {collection!r}, showing {len(hits)}"
    for hit in hits:
        document = hit["document"]
        marked = {h["field"]: h.get("value") or h.get("snippet") for h in hit.get("highlights", [])}
        parts = [f"{document.get('id', '')!s:>10}"]
        for field_ in mapping.fields:
            if field_.name in document:
                value = marked.get(field_.name) or str(document[field_.name])
                parts.append(f"{field_.name}={highlighted(str(value), 60)}")
        yield "  ".join(parts)
    for facet in result.get("facet_counts", []):
        counts = facet.get("counts", [])
        # Typesense counts the most frequent values only (10 unless asked): say how many it left
        left = facet.get("stats", {}).get("total_values", len(counts)) - len(counts)
        yield (
            f"facet {facet['field_name']}: "
            + ", ".join(f"{c['value']} ({c['count']})" for c in counts)
            + f", … and {left} more values" * (left > 0)
        )


def highlighted(text: str, width: int) -> str:
    """Typesense's <mark>…</mark> as bold on a terminal (click drops the styling elsewhere),
    shortened to `width` characters of its text: the text is cut, not the tags (a tag cut in
    half matched nothing and printed as it was)."""
    parts = re.split(r"<mark>(.*?)</mark>", " ".join(text.split()))
    cut = sum(map(len, parts)) > width
    room = width - 1 if cut else width
    shown = []
    for i, part in enumerate(parts):
        part = part[:room]
        room -= len(part)
        shown.append(click.style(part, bold=True, underline=True) if i % 2 and part else part)
    return "".join(shown) + "…" * cut


def facet_counts(result: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {
        facet["field_name"]: {c["value"]: c["count"] for c in facet.get("counts", [])}
        for facet in result.get("facet_counts", [])
    }


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


def effective_config(settings: Settings) -> dict[str, Any]:
    """The settings and mappings in the shape of the configuration file (secrets masked)."""
    values: dict[str, Any] = {
        "db": str(settings.db_path),
        "typesense_url": ",".join(settings.typesense_urls) or None,
        "timeout": settings.timeout_s,
        "embedded_port": settings.embedded_port,
        "ca_file": settings.ca_file,
        "batch_size": settings.batch_size,
        "audit_every": format_duration(settings.audit_every_s),
        "metrics_address": ":".join(map(str, settings.metrics_address or ())) or None,
        # not settings of the file: what they are, as comments
        "# config": str(settings.config_file) if settings.config_file else "(none: built-in)",
        "# api_key": "(none)" if settings.api_key is None else "*** (set)",
    }
    effective = {k: v for k, v in values.items() if v is not None}
    effective["sync"] = [
        {
            "name": m.name,
            "table": m.table,
            "key": m.key,
            "collection": m.collection,
            **({"where": m.where} if m.where else {}),
            **(
                {"default_sorting_field": m.default_sorting_field}
                if m.default_sorting_field
                else {}
            ),
            "fields": [
                {
                    **f.schema(),
                    **({"column": f.column} if f.column else {}),
                    **({"sql": f.sql} if f.sql else {}),
                }
                for f in m.fields
            ],
            **(
                {"depends_on": [{"table": d.table, "key": d.key} for d in m.depends_on]}
                if m.depends_on
                else {}
            ),
        }
        for m in settings.mappings
    ]
    return effective


def toml_lines(effective: dict[str, Any]) -> Iterator[str]:
    """The effective configuration as TOML (it reads back as a --config file)."""
    for key, value in effective.items():
        if key.startswith("#"):
            yield f"{key}: {value}"
        elif key != "sync":
            yield f"{key} = {toml_value(value)}"
    for mapping in effective["sync"]:
        yield ""
        yield "[[sync]]"
        for key, value in mapping.items():
            if key == "fields":
                yield "fields = ["
                for field_ in value:
                    yield f"  {toml_inline_table(field_)},"
                yield "]"
            elif key != "depends_on":
                yield f"{key} = {toml_value(value)}"
        for dependency in mapping.get("depends_on", []):
            yield ""
            yield "[[sync.depends_on]]"
            for key, value in dependency.items():
                yield f"{key} = {toml_value(value)}"


def installed(found: "Installed", path: object) -> Iterator[str]:
    """What `uninstall` is about to remove."""

    def named(items: list[tuple[str, str]]) -> str:
        by_table = itertools.groupby(items, key=lambda item: item[1])
        return "; ".join(
            f"{', '.join(name for name, _ in names)} on {table}" for table, names in by_table
        )

    yield f"outbox-sync in {path}, to remove:"
    if found.triggers:
        yield f"  triggers: {named(found.triggers)}"
    if found.indexes:
        yield f"  key indexes: {named(found.indexes)}"
    if found.tables:
        yield f"  tables: {', '.join(found.tables)}"
    if found.pending or found.open_errors:
        yield (
            f"  with them: pending changes (not in Typesense yet): {found.pending}; open sync "
            f"errors: {found.open_errors} (`outbox-sync errors list --json` keeps a copy)"
        )
    yield (
        "The application's tables and rows, the collections in Typesense and the embedded "
        "server's data stay as they are."
    )
