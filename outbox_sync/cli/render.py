"""How the on-call commands print for people (their --json output is the data itself)."""

import contextlib
import itertools
import json
from collections.abc import Iterable, Iterator
from typing import Any

import click

from outbox_sync.audit import KINDS, Audit, AuditSummary, RepairSummary
from outbox_sync.stats import LATENCY_BUCKETS_S

# Ids shown per kind of drift on a terminal; --json lists them all.
SHOWN_IDS = 20


def echo_lines(lines: Iterable[str]) -> None:
    for line in lines:
        click.echo(line)


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def error_table(rows: list[dict[str, Any]]) -> Iterator[str]:
    yield f"{'ID':>6}  {'RECORD':>10}  {'OP':6}  {'HTTP':4}  {'FAILED AT':20}  {'STATUS':10}  ERROR"
    for row in rows:
        http = "-" if row["http_status"] is None else str(row["http_status"])
        state = row["resolution"] or "open"
        yield (
            f"{row['id']:>6}  {row['sequence_id']!s:>10}  {row['op']:6}  {http:4}  "
            f"{row['failed_at']:20}  {state:10}  {shorten(row['error'], 100)}"
        )


def error_details(error: dict[str, Any]) -> Iterator[str]:
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
        yield f"{name:13} {value}"
    yield "error:"
    yield f"  {error['error']}"
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
    collection: str, checked: Audit, summary: AuditSummary, repaired: RepairSummary | None
) -> Iterator[str]:
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
    for name, value in figures.items():
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
        yield f"{name:22} {'-' if value is None else value}"


def document_table(documents: list[dict[str, Any]]) -> Iterator[str]:
    yield f"{'ID':>10}  {'TYPE':12}  {'ELEMENT':>10}  {'SEQ':>10}  {'CREATED AT':20}  COMMENT"
    columns = ("id", "element_type", "element_id", "sequence_number", "created_at", "comment")
    for document in documents:
        key, element_type, element_id, number, created_at, comment = (
            str(document.get(name, "")) for name in columns
        )
        yield (
            f"{key:>10}  {element_type:12}  {element_id:>10}  {number:>10}  {created_at:20}  "
            f"{shorten(comment, 60)}"
        )


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
