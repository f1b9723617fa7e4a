"""What people and monitors ask of an installation: the figures `status` prints, and the verdict
`check` gives in the Nagios/Icinga plugin convention (exit 0 OK, 1 WARNING, 2 CRITICAL,
3 UNKNOWN, one summary line with performance data)."""

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from outbox_sync.db import Database
from outbox_sync.errors import TypesenseError, TypesenseUnavailableError
from outbox_sync.lock import DaemonLock
from outbox_sync.mapping import Mapping

if TYPE_CHECKING:  # the CLI reads the constants below at start: Typesense's client waits
    from outbox_sync.typesense_index import TypesenseIndex

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
DEFAULT_MAX_LAG = "60s"
# The daemon audits every 24 h by default: two missed audits are worth a look.
DEFAULT_MAX_AUDIT_AGE = "50h"
# outbox_sync_meta: the Typesense nodes the running daemon's restart watch turned itself off
# for, and why (typesense_index.RestartWatch), as JSON {"pid": the daemon's, "nodes": {url: why}}.
RESTART_WATCH_OFF_KEY = "restart_watch_off"


def gather(
    db: Database,
    indexes: Sequence["TypesenseIndex"],
    mappings: Sequence[Mapping],
    lock: DaemonLock,
    explain: Callable[[TypesenseError], str] = str,
    *,
    asked: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Everything `status` shows: the backlog and open errors, rows and documents, whether
    Typesense answers, whether a daemon runs, the tables, triggers and key indexes, the last
    audit; in all, and per collection (`collections`, of `indexes`: the ones asked for). The
    backlog and the last audit's figures are of the mappings `asked` for (None: the whole
    outbox, every collection). The tables, triggers and key indexes of every configured
    mapping (`mappings`) are checked."""
    from outbox_sync import claims  # here, as TypesenseIndex above
    from outbox_sync.reconcile import last_audit
    from outbox_sync.schema import (
        missing_tables,
        trigger_problems,
        unfollowed_uniques,
        unindexed_keys,
    )

    pending, oldest, open_errors = db.backlog(asked)
    figures: dict[str, Any] = {
        "pending": pending,
        "oldest_pending_age_s": oldest,
        "sync_errors_open": open_errors,
        "rows": 0,
        "documents": 0,
        "typesense_ok": True,
        # held back by a reader's old snapshot: the -wal file grows (OutboxSyncWalHeldBack)
        "wal_uncheckpointed_bytes": None,
    }
    with contextlib.suppress(sqlite3.Error):  # a file this user may only read: not known
        figures["wal_uncheckpointed_bytes"] = db.wal_uncheckpointed_bytes()
    if waiting := [i.collection for i in indexes if db.fill_asked(i.mapping.name)]:
        figures["fill_pending"] = waiting  # rows init found: the daemon indexes them at start
    collections = {}
    for index in indexes:
        one = db.counts(index.mapping)
        one["documents"] = None
        try:
            info = index.info()
            one["documents"] = int(info["num_documents"])
            if changed := index.fields_changed(info):
                one["fields_changed"] = "; ".join(changed)
            if index.server is None and (other := claims.other_claim(db, index)):
                # another database's daemon feeds it (this one's refuses it: on-call's why), or
                # fed it last (they take turns, each audit deleting the other's documents)
                one["claimed_by" if claims.fresh(other) else "last_fed_by"] = claims.holder(other)
        except TypesenseError as error:
            figures["typesense_ok"] = False
            figures["typesense_error"] = explain(error)
        collections[index.collection] = one
    for total in ("rows", "documents"):  # None when one is unknown
        values = [one[total] for one in collections.values()]
        figures[total] = None if None in values else sum(values)
    holder = lock.holder()
    figures["daemon_pid"] = holder.pid if holder is not None and holder.role == "daemon" else None
    if holder is not None and holder.role != "daemon":  # a reindex run without a daemon
        figures["lock_holder"] = f"{holder.role} (pid {holder.pid})"
    gone = missing_tables(db.conn, mappings)
    figures["table_ok"] = not gone
    if gone:
        figures["missing_tables"] = gone
    problems = trigger_problems(db.conn, mappings)
    figures["triggers_ok"] = not problems
    if problems:
        figures["trigger_problems"] = [p.replace(" was ", " is ") for p in problems]
    unindexed = [] if gone else unindexed_keys(db.conn, mappings)
    figures["key_indexes_ok"] = None if gone else not unindexed
    if unindexed:
        figures["unindexed_keys"] = [f"{table}({column})" for table, column in unindexed]
    if unfollowed := [] if gone else unfollowed_uniques(db.conn, mappings):
        # a REPLACE through one leaves a document until the scheduled audit (a known limit)
        figures["unique_indexes_not_followed"] = unfollowed
    audit = last_audit(db)
    if audit is not None and asked is not None:  # its figures for the collections asked for
        audit = audit.of([index.collection for index in indexes])
    figures["last_audit"] = None if audit is None else asdict(audit)
    if unwatched := restart_watch_off(db, figures["daemon_pid"]):
        figures["restarts_unwatched"] = unwatched
    figures["collections"] = collections
    return figures


def fields_advice(collection: str, changed: str) -> str:
    """What `check` and `audit` say of a collection that lacks the mapping's fields."""
    return (
        f"collection {collection} does not have the mapping's fields ({changed}): searches on "
        f"them fail; `outbox-sync reindex --collection {collection}` rebuilds it (a running "
        "daemon does, within a minute, where someone altered it in Typesense)"
    )


def restart_watch_off(db: Database, daemon_pid: str | None) -> list[str]:
    """The nodes the running daemon no longer watches for restarts, each with why (what an
    earlier daemon wrote tells nothing of this one)."""
    off = json.loads(db.get_meta(RESTART_WATCH_OFF_KEY) or "{}")
    if daemon_pid is None or str(off.get("pid")) != daemon_pid:
        return []
    return [f"{node} ({why})" for node, why in off["nodes"].items()]


def trouble(error: TypesenseError) -> str:
    """What `check` says of a failing Typesense: that it does not answer only when it does not
    (a missing collection, a refused key: the error's own sentence)."""
    if isinstance(error, TypesenseUnavailableError):
        return f"Typesense does not answer ({error.reason})"
    return str(error)


def verdict(
    figures: dict[str, Any], *, max_lag_s: float, max_audit_age_s: float, now: float | None = None
) -> tuple[int, str]:
    """(exit status, summary line) of `check` for the figures of `gather`."""
    now = time.time() if now is None else now
    found: list[tuple[int, str]] = []
    if figures["daemon_pid"] is None:
        busy = f" ({figures['lock_holder']} holds its lock)" if "lock_holder" in figures else ""
        found.append((CRITICAL, f"no daemon runs on this database{busy}"))
    if not figures["typesense_ok"]:
        found.append((CRITICAL, figures["typesense_error"]))
    for name, one in figures.get("collections", {}).items():
        if "fields_changed" in one:
            found.append((CRITICAL, fields_advice(name, one["fields_changed"])))
        if "claimed_by" in one:
            found.append(
                (
                    CRITICAL,
                    f"collection {name} is synced from another database: {one['claimed_by']}",
                )
            )
        elif "last_fed_by" in one:
            found.append(
                (
                    WARNING,
                    f"collection {name} was last synced from another database: "
                    f"{one['last_fed_by']} (if both sync it, each audit deletes the other's "
                    "documents)",
                )
            )
    if not figures["table_ok"]:
        found.append((CRITICAL, f"table {', '.join(figures['missing_tables'])} is gone"))
    elif not figures["triggers_ok"]:
        problems = "; ".join(figures["trigger_problems"])
        found.append((CRITICAL, f"triggers not intact ({problems}): the daemon repairs them"))
    if figures["key_indexes_ok"] is False:
        columns = ", ".join(figures["unindexed_keys"])
        found.append(
            (WARNING, f"no index on {columns}: every lookup scans; the daemon makes them again")
        )
    lag = figures["oldest_pending_age_s"] or 0.0
    if lag > max_lag_s:
        found.append(
            (CRITICAL, f"the oldest change has waited {lag:.0f} s (> {_plain(max_lag_s)} s)")
        )
    if open_errors := figures["sync_errors_open"]:
        found.append((WARNING, f"{open_errors} open sync error{'s' if open_errors > 1 else ''}"))
    found.extend(_audit_findings(figures["last_audit"], max_audit_age_s, now))
    status = max((level for level, _ in found), default=OK)
    text = "; ".join(message for _, message in sorted(found, key=lambda f: -f[0]))
    if not text:
        pid = figures["daemon_pid"]
        text = f"daemon {pid} syncing, {figures['pending']} pending, Typesense answers"
    perfdata = (
        f"lag={_plain(lag)}s;{_plain(max_lag_s)};{_plain(max_lag_s)} pending={figures['pending']} "
        f"errors_open={figures['sync_errors_open']}"
    )
    return status, f"OUTBOX-SYNC {STATES[status]} - {text} | {perfdata}"


def _plain(seconds: float) -> str:
    """A number as perfdata may hold it ([-0-9.]: the plugin guidelines): `:g` wrote a lag of
    17 days, or --max-lag 3w, as 1.5e+06, which a monitor's perfdata parser refuses."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def _audit_findings(
    audit: dict[str, Any] | None, max_age_s: float, now: float
) -> list[tuple[int, str]]:
    if audit is None:
        return []  # a new installation: its first audit comes at the daemon's start
    age = now - audit["finished_unix"]
    found = []
    if not audit["ok"]:
        found.append((WARNING, f"the last audit failed ({audit['error']})"))
    elif not audit["consistent"]:
        drift = ", ".join(f"{n} {kind}" for kind, n in audit["drift"].items() if n)
        repaired = " and repaired it" if audit["enqueued"] else ""
        if audit["drift"].get("shared"):
            repaired += " (a shared key is one more than one row holds: make it unique)"
        found.append((WARNING, f"the last audit found drift ({drift}){repaired}"))
    if age > max_age_s:
        found.append((WARNING, f"the last audit is {age / 3600:.0f} h old"))
    return found
