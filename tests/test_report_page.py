"""`outbox-sync report --html` in a real browser: Debian's Chromium, driven by playwright (which
downloads no browser of its own here: it is given /usr/bin/chromium).

A real worker syncs real rows through a real Typesense, gives up on some (Typesense's own 400s
and our validation) and lives through a Typesense restart; a week of older statistics and sync
errors is added by hand so the charts span the window. The page must load with no console
error and no request past its own file, and every chart must draw the data written.

Without Chromium (or when it cannot start) the test is skipped, saying why; .ci/run installs it.
"""

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Route, sync_playwright
from playwright.sync_api import Error as PlaywrightError
from structlog.testing import capture_logs

from outbox_sync import stats
from outbox_sync.db import Database
from outbox_sync.localserver import LocalTypesense
from outbox_sync.mapping import SEQUENCES
from outbox_sync.stats import LATENCY_BUCKETS_S
from outbox_sync.typesense_index import TypesenseIndex
from outbox_sync.worker import daemon
from tests.support.app import ROW_SQL, app_connection, make_row
from tests.support.cli import invoke
from tests.support.typesense import Server, by_hand, export, refusing_collection
from tests.support.wait import wait_until

# Root needs --no-sandbox; the rest keeps Chromium off the network it would call home on (this
# machine has none) and off the GPU it does not have.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# Set to a path (docs/images/weekly-review.png) to keep the test's screenshot there.
SCREENSHOT_ENV = "OUTBOX_SYNC_REVIEW_SCREENSHOT"
HOUR_S = 3600
REFUSED = "HTTP 400: Field `comment` must be an int32."
INVALID = "validation: sequence_number: expected an integer, got text …"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    executable = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if executable is None:
        pytest.skip("no Chromium to test the page in: apt-get install chromium (.ci/run does)")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(
                executable_path=executable, args=CHROMIUM_ARGS, timeout=60_000
            )
        except PlaywrightError as error:
            pytest.skip(f"Chromium ({executable}) did not start: {error.message.splitlines()[0]}")
        yield browser
        browser.close()


@pytest.mark.slow  # restarts Typesense
def test_the_page_draws_every_chart_offline(
    chromium: Browser,
    db_path: Path,
    db: Database,
    private_typesense: LocalTypesense,
    tmp_path: Path,
) -> None:
    server = Server(private_typesense.url, private_typesense.api_key)
    started = time.time()
    run_a_daemon(db_path, db, private_typesense)
    live = report_json(server, db_path, "--since", time_of(started - 60))
    assert live["applied"]["upsert"] >= 31 and live["applied"]["delete"] == 5
    assert live["outages"]["count"] == 1
    add_a_week_of_history(db, before=started - 2 * HOUR_S)

    page_path = tmp_path / "weekly-review.html"
    figures = report_json(server, db_path, "--since", "7d", "--html", str(page_path))
    assert page_path.stat().st_size > 1_000_000  # plotly.js is in it

    charts = open_offline(chromium, page_path, tmp_path / "weekly-review.png")
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(tmp_path / "weekly-review.png", os.environ[SCREENSHOT_ENV])
    assert set(charts) == CHARTS
    for chart in charts.values():  # in the SVG: a bar for every figure but 0, a marker for each
        figures_drawn = sum(
            1
            for trace in chart["traces"]
            for value in trace["y"]
            if (value if trace["type"] == "bar" else value is not None)
        )
        assert chart["drawn"] == figures_drawn > 0, chart["id"]

    # records applied: every hour's bar, the daemon's own hours among them
    hours = figures["series"]["hours"]
    run_hours = [i for i, hour in enumerate(hours) if hour >= time_of(started // HOUR_S * HOUR_S)]
    applied = {trace["name"]: trace["y"] for trace in charts["chart-applied"]["traces"]}
    for operation in ("upsert", "delete"):
        assert total(applied[operation]) == figures["applied"][operation]
        assert total(applied[operation][i] for i in run_hours) == live["applied"][operation]
    assert sum(1 for n in applied["upsert"] if n) > 100  # the week, hour by hour

    # sync errors: the daemon's two kinds today, beside the older ones
    errors_by_kind = {trace["name"]: trace["y"] for trace in charts["chart-errors"]["traces"]}
    assert errors_by_kind[REFUSED][-1] == 3 and errors_by_kind[INVALID][-1] == 1
    assert (
        total(total(counts) for counts in errors_by_kind.values()) == (figures["given_up"]["total"])
    )

    # latency: a row per operation, each with p50, p95 and p99 for every hour it was seen
    operations = set(figures["series"]["latency"])
    assert {"import", "delete", "health"} <= operations
    latency = charts["chart-latency"]["traces"]
    assert {trace["meta"] for trace in latency} == operations
    for operation in ("import", "delete"):
        traces = [trace for trace in latency if trace["meta"] == operation]
        assert [trace["name"] for trace in traces] == ["p50", "p95", "p99"]
        for trace in traces:
            seen = [value for value in trace["y"] if value is not None]
            assert seen and set(seen) <= set(LATENCY_BUCKETS_S)
            assert any(trace["y"][i] is not None for i in run_hours)

    # outages: the one the daemon lived through and the two of the history, on the time line
    outages = charts["chart-outages"]["traces"]
    assert len(outages) == figures["outages"]["count"] == 3
    assert all(figures["since"] <= iso_of(trace["x"][0]) < figures["until"] for trace in outages)

    # backlog and lag: the highest samples; the row written during the outage waited
    backlog = {trace["name"]: trace["y"] for trace in charts["chart-backlog"]["traces"]}
    pending, lag = backlog["pending (max)"], backlog["lag: oldest entry's age (max)"]
    assert max(pending[i] or 0 for i in run_hours) >= 1
    assert max(lag[i] or 0 for i in run_hours) > 0
    assert sum(1 for value in pending if value is not None) > 100


def test_the_page_of_an_empty_database_loads_too(
    chromium: Browser, db_path: Path, tmp_path: Path
) -> None:
    page_path = tmp_path / "weekly-review.html"
    server = Server("http://127.0.0.1:9", "unused")  # report asks nothing of Typesense
    report_json(server, db_path, "--html", str(page_path))
    charts = open_offline(chromium, page_path, tmp_path / "weekly-review.png")
    assert set(charts) == CHARTS
    for chart in charts.values():
        assert chart["drawn"] == 0 and "in this window" in chart["note"], chart["id"]


def open_offline(chromium: Browser, page_path: Path, screenshot: Path) -> dict[str, Any]:
    """Open the page with every request but its own file blocked; check it asked for nothing
    else and logged no error; each chart as CHARTS_JS finds it, by id; a screenshot."""
    context = chromium.new_context(viewport={"width": 1100, "height": 900})
    requested: list[str] = []

    def only_the_file(route: Route) -> None:
        requested.append(route.request.url)
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            route.abort()  # nothing may leave the machine; the asserts below say what tried

    context.route("**/*", only_the_file)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(page_path.as_uri(), wait_until="load")
    assert requested == [page_path.as_uri()]  # here, before a missing script times out below
    page.wait_for_function(
        "() => [...document.querySelectorAll('.plotly-graph-div')]"
        ".every(div => div._fullLayout && div.querySelector('.main-svg'))",
        timeout=15_000,
    )
    charts = {chart["id"]: chart for chart in page.evaluate(CHARTS_JS)}
    page.screenshot(path=screenshot, full_page=True)
    context.close()
    assert errors == []
    assert requested == [page_path.as_uri()]
    return charts


CHARTS = {"chart-applied", "chart-errors", "chart-latency", "chart-outages", "chart-backlog"}
# Each chart as plotly.js holds it (its data, decoded), how many bars or markers it drew (plotly
# keeps an empty shape for a bar of 0 or null: not counted) and the notes written on it.
CHARTS_JS = """() => [...document.querySelectorAll('.plotly-graph-div')].map(div => ({
    id: div.id,
    traces: div._fullData.map(trace => ({
        name: trace.name,
        type: trace.type,
        meta: trace.meta,
        x: Array.from(trace.x || []),
        y: Array.from(trace.y || []),
    })),
    drawn: [...div.querySelectorAll('.barlayer .point path, .scatterlayer .point')]
        .filter(shape => shape.getBBox().width > 0 && shape.getBBox().height > 0).length,
    note: [...div.querySelectorAll('.annotation-text')].map(text => text.textContent).join(),
}))"""


def run_a_daemon(db_path: Path, db: Database, typesense: LocalTypesense) -> None:
    """A worker as `outbox-sync run` makes it: 35 rows written, 5 deleted, 3 refused by
    Typesense, 1 by our validation, and a Typesense restart in the middle."""
    index = TypesenseIndex([typesense.url], typesense.api_key, "sequences")
    worker = daemon(db, [index], min_backoff_s=0.05, max_backoff_s=0.2)
    app = app_connection(db_path)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    by_hand_server = Server(typesense.url, typesense.api_key)
    with capture_logs() as logged:
        thread.start()
        try:
            app.executemany(ROW_SQL, [make_row(i) for i in range(1, 31)])
            wait_until(lambda: pending(db_path) == 0, what="the rows to sync")
            app.execute("DELETE FROM sequences WHERE id <= 5")
            wait_until(lambda: pending(db_path) == 0, what="the deletes")
            # a broken migration behind the daemon's back: its collection made again with
            # `comment` an int32, so Typesense refuses rows with a comment (400)
            target = str(index.target())
            kept = export(by_hand_server, "sequences")
            by_hand(by_hand_server, "DELETE", f"/collections/{target}")
            refusing_collection(by_hand_server, target)
            app.executemany(ROW_SQL, [make_row(i) for i in (31, 32, 33)])
            app.execute(ROW_SQL, make_row(34, sequence_number="ten"))
            wait_until(lambda: open_errors(db_path) == 4, what="the sync errors")
            # the repair: the collection as it was, its documents back
            by_hand(by_hand_server, "DELETE", f"/collections/{target}")
            by_hand(
                by_hand_server, "POST", "/collections", json=SEQUENCES.collection_schema(target)
            )
            lines = "\n".join(json.dumps(document) for document in kept.values())
            by_hand(
                by_hand_server,
                "POST",
                f"/collections/{target}/documents/import",
                params={"action": "upsert"},
                content=lines.encode(),
            )
            app.execute(ROW_SQL, make_row(35, comment=None))
            wait_until(lambda: pending(db_path) == 0, what="the row after the repair")

            typesense.stop()
            app.execute(ROW_SQL, make_row(36, comment=None))
            wait_until(lambda: worker.backoff.since is not None, what="the worker to pause")
            time.sleep(1.0)  # a backlog of 1 that ages: the lag chart's sample
            typesense.start()
            wait_until(
                lambda: (
                    any(entry["event"] == "audit_done" for entry in logged)
                    and pending(db_path) == 0
                ),
                what="the check after the outage and its repairs",
            )
        finally:
            stop.set()
            thread.join(30)
    assert not thread.is_alive()


def add_a_week_of_history(db: Database, before: float) -> None:
    """Statistics for every hour of the week up to `before`, as an older daemon saved them
    (one minute per hour), two outages, and sync errors on three earlier days."""
    first = int(before - 6.5 * 86400) // HOUR_S * HOUR_S
    for n, hour in enumerate(range(first, int(before) // HOUR_S * HOUR_S, HOUR_S)):
        fast, slow = [0] * (len(LATENCY_BUCKETS_S) + 1), [0] * (len(LATENCY_BUCKETS_S) + 1)
        fast[3 + n % 2] = 40
        fast[6] = n % 3
        slow[5] = 2
        data: dict[str, Any] = {
            "applied": {"upsert": 120 + n * 37 % 90, "delete": n % 7},
            "latency": {"import": fast, "delete": slow, "health": [0, 0, 12] + [0] * 11},
            "backlog_max": {"pending": 5 + n * 13 % 40, "oldest_age_s": 0.2 + n * 7 % 30 / 10},
        }
        if n in (40, 100):
            data["outages"] = [[hour + 60, hour + 60 + 20 * (n // 40)]]
        stats.save(db, hour + 30 * 60, data)
    with db.write() as conn:
        conn.executemany(
            "INSERT INTO sync_errors (outbox_id, mapping, record_key, op, http_status, error,"
            " attempts,"
            " failed_at) VALUES (0, 'sequences', ?, 'upsert', ?, ?, 2, ?)",
            [
                (1000 + days, status, error, time_of(before - days * 86400))
                for days, status, error in [
                    (2, 400, "Field `comment` must be an int32."),
                    (2, None, "sequence_number: expected an integer, got text 'x'"),
                    (4, 400, "Field `element_id` must be an int32."),
                    (5, None, "sequence_number: 3000000000 is outside the range -1..2"),
                ]
            ],
        )


def report_json(server: Server, db_path: Path, *args: str) -> Any:
    import json

    result = invoke(["report", "--json", *args], server, db_path, "sequences")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def pending(db_path: Path) -> int:
    return int(Database(db_path).counts(SEQUENCES)["pending"])


def open_errors(db_path: Path) -> int:
    return int(Database(db_path).counts(SEQUENCES)["sync_errors_open"])


def time_of(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def iso_of(plotted: str) -> str:
    """A time as the chart holds it (2024-05-01 12:00:00) as the report writes it."""
    return plotted[:19].replace(" ", "T") + "Z"


def total(values: Any) -> int:
    return sum(value or 0 for value in values)
