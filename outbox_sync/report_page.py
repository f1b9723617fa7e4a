"""The weekly review as one HTML page with charts: `outbox-sync report --html FILE`.

Plotly draws the charts (the optional `report` extra): the figures are built here in Python
without pandas, and all of plotly.js (4.8 MB in plotly 7.1) is written into the page, so the file
opens in any browser with no network, from a mail attachment or an air-gapped host. The page
draws the `series` of report.build_report; nothing here reads the database.
"""

import html
from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any

from outbox_sync.errors import OutboxSyncError
from outbox_sync.report import DAY_S, HOUR_S
from outbox_sync.stats import LATENCY_BUCKETS_S

INSTALL_HINT = "pip install 'outbox-sync[report]'"
CHART_HEIGHT_PX = 340
LATENCY_ROW_PX = 170
PERCENTILE_COLORS = ("#2ca02c", "#ff7f0e", "#d62728")  # p50, p95, p99 alike in every row
# Error kinds drawn apart in the errors chart; the others are added up as "other kinds" (a
# legend of dozens of kinds reads as noise; the text report lists them all).
SHOWN_KINDS = 8
LEGEND_CHARS = 70
# plotly.js draws the charts with no link to plotly's site and no network at all.
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


class ChartLibraryMissingError(OutboxSyncError):
    """--html needs plotly (the `report` extra), and it is not installed."""


def check_chart_library() -> None:
    """Raise ChartLibraryMissingError, saying what to install, unless plotly is there."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        raise ChartLibraryMissingError(
            f"--html draws its charts with plotly, which is not installed: {INSTALL_HINT}"
        ) from None


def page(figures: dict[str, Any], summary: Sequence[str]) -> str:
    """The whole page: the text report (`summary`, as `report` prints it) and the charts.
    Long, and left so: its lines are the page's text, read top to bottom as the page is."""
    check_chart_library()
    from plotly.offline import get_plotlyjs

    series = figures["series"]
    window = (plot_time(figures["since"]), plot_time(figures["until"]))
    charts = [
        (
            "applied",
            "Records applied per hour",
            "Upserts and deletes the daemon applied to Typesense, stacked. A gap: no statistics "
            "were saved that hour (the daemon was not running).",
            applied_chart(series, window),
        ),
        (
            "errors",
            "Sync errors per day, by kind",
            "Records given up on (rows of sync_errors), by status and message without its "
            "particulars. `outbox-sync errors list --since …` shows them one by one.",
            errors_chart(series["errors_by_day"]),
        ),
        (
            "latency",
            "Typesense latency per hour, by operation",
            "p50, p95 and p99 of the hour's requests, one row per operation (the busiest first). "
            "Each is the upper bound of the histogram bucket it falls in (5 ms means between "
            "2.5 and 5 ms).",
            latency_chart(series["hours"], series["latency"], figures["latency"], window),
        ),
        (
            "outages",
            "Outages",
            "Each bar runs from the first failed request to the request that succeeded again; "
            "hover for its length.",
            outages_chart(series["outages"], window),
        ),
        (
            "backlog",
            "Backlog and lag per hour",
            "The highest figures of the hour, sampled every second: entries waiting in the "
            "outbox (left axis) and the age of the oldest one, the sync lag (right axis).",
            backlog_chart(series, window),
        ),
    ]
    sections = "\n".join(
        f'<section><h2>{html.escape(title)}</h2><p class="how">{html.escape(how)}</p>\n'
        + figure.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"chart-{name}",
            config=PLOTLY_CONFIG,
            default_height=f"{figure.layout.height}px",
        )
        + "</section>"
        for name, title, how, figure in charts
    )
    title = html.escape(f"outbox-sync weekly review, {figures['since']} to {figures['until']}")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 1em auto; padding: 0 1em; }}
pre {{ background: #f6f6f6; padding: 0.8em; overflow-x: auto; }}
.how {{ color: #555; margin: 0.2em 0; }}
</style>
<script>window.PlotlyConfig = {{MathJaxConfig: 'local'}};</script>
<script>{get_plotlyjs()}</script>
</head>
<body>
<h1>outbox-sync weekly review</h1>
<p>Times are UTC.</p>
<pre>{html.escape(chr(10).join(summary))}</pre>
{sections}
</body>
</html>
"""


def plot_time(iso: str) -> str:
    """2024-05-01T12:00:00Z as plotly.js shows dates: 2024-05-01 12:00:00. It knows no time
    zones (it draws the Z's time as it is), so the page says its times are UTC."""
    return iso.replace("T", " ").removesuffix("Z")


def base_figure(window: tuple[str, str] | None, y_title: str, **layout: Any) -> Any:
    import plotly.graph_objects as go

    figure = go.Figure()
    figure.update_layout(
        height=CHART_HEIGHT_PX,
        margin={"l": 60, "r": 60, "t": 20, "b": 40},
        legend={"orientation": "h", "y": -0.15},
        yaxis={"title": {"text": y_title}, "rangemode": "tozero"},
        **layout,
    )
    if window is not None:
        figure.update_xaxes(type="date", range=list(window))
    return figure


def say_if_empty(figure: Any, empty: bool, what: str) -> Any:
    if empty:
        figure.add_annotation(text=what, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return figure


def applied_chart(series: dict[str, Any], window: tuple[str, str]) -> Any:
    import plotly.graph_objects as go

    figure = base_figure(window, "records", barmode="stack")
    hours = [plot_time(hour) for hour in series["hours"]]
    for operation, counts in series["applied"].items():
        figure.add_trace(
            go.Bar(
                x=hours,
                y=counts,
                name=operation,
                xperiod=HOUR_S * 1000,
                xperiodalignment="middle",
                hovertemplate="%{y} " + operation + "s<extra>%{x|%Y-%m-%d %H:00}</extra>",
            )
        )
    empty = not any(n for counts in series["applied"].values() for n in counts if n)
    return say_if_empty(figure, empty, "no records applied in this window")


def errors_chart(errors_by_day: dict[str, Any]) -> Any:
    import plotly.graph_objects as go

    figure = base_figure(None, "sync errors", barmode="stack")
    days = errors_by_day["days"]
    kinds = list(errors_by_day["by_kind"].items())
    shown, others = kinds[:SHOWN_KINDS], kinds[SHOWN_KINDS:]
    if others:
        shown.append(
            ("other kinds", [sum(day) for day in zip(*(n for _, n in others), strict=True)])
        )
    for kind, counts in shown:
        label = kind if len(kind) <= LEGEND_CHARS else kind[: LEGEND_CHARS - 1] + "…"
        figure.add_trace(
            go.Bar(
                x=days,
                y=counts,
                name=label,
                xperiod=DAY_S * 1000,
                xperiodalignment="middle",
                hovertext=[kind] * len(days),
                hovertemplate="%{y} on %{x|%Y-%m-%d}<extra>%{hovertext}</extra>",
            )
        )
    after_the_last = date.fromisoformat(days[-1]) + timedelta(days=1)
    figure.update_xaxes(
        type="date", range=[days[0], after_the_last.isoformat()], tickformat="%b %d"
    )
    return say_if_empty(figure, not kinds, "no sync errors in this window")


def latency_chart(
    hours: list[str],
    latency: dict[str, dict[str, list[float | None]]],
    summary: dict[str, dict[str, Any]],
    window: tuple[str, str],
) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not latency:
        return say_if_empty(base_figure(window, ""), True, "no Typesense requests in this window")
    operations = sorted(latency, key=lambda op: -summary[op]["requests"])
    figure = make_subplots(
        rows=len(operations),
        cols=1,
        shared_xaxes=True,
        subplot_titles=operations,
        vertical_spacing=0.3 / len(operations),
    )
    figure.update_layout(
        height=LATENCY_ROW_PX * len(operations) + 80,
        margin={"l": 60, "r": 60, "t": 30, "b": 40},
        legend={"orientation": "h", "y": -40 / (LATENCY_ROW_PX * len(operations))},
    )
    # the values are always bucket bounds: tick exactly those, in words
    labels = [
        f"{bound * 1000:g} ms" if bound < 1 else f"{bound:g} s" for bound in LATENCY_BUCKETS_S
    ]
    figure.update_yaxes(type="log", tickvals=list(LATENCY_BUCKETS_S), ticktext=labels)
    figure.update_xaxes(type="date", range=list(window))
    x = [plot_time(hour) for hour in hours]
    for row, operation in enumerate(operations, start=1):
        for (name, values), color in zip(
            latency.get(operation, {}).items(), PERCENTILE_COLORS, strict=False
        ):
            figure.add_trace(
                go.Scatter(
                    x=x,
                    y=values,
                    name=name.removesuffix("_s"),
                    meta=operation,
                    legendgroup=name,
                    showlegend=row == 1,
                    mode="lines+markers",
                    line={"shape": "hv", "color": color},
                    marker={"size": 4},
                    hovertemplate="≤ %{y} s<extra>" + operation + " %{x|%Y-%m-%d %H:00}</extra>",
                ),
                row=row,
                col=1,
            )
    return figure


def outages_chart(outages: list[dict[str, Any]], window: tuple[str, str]) -> Any:
    import plotly.graph_objects as go

    figure = base_figure(window, "", showlegend=False)
    figure.update_layout(height=CHART_HEIGHT_PX // 2)
    figure.update_yaxes(showticklabels=False, rangemode=None, range=[-1, 1])
    for outage in outages:
        figure.add_trace(
            go.Scatter(
                x=[plot_time(outage["start"]), plot_time(outage["end"])],
                y=[0, 0],
                mode="lines+markers",
                line={"width": 14, "color": "#d62728"},
                marker={"size": 10, "color": "#d62728"},
                name="outage",
                hovertemplate=f"outage of {outage['seconds']:g} s<extra>%{{x}}</extra>",
            )
        )
    return say_if_empty(figure, not outages, "no outages in this window")


def backlog_chart(series: dict[str, Any], window: tuple[str, str]) -> Any:
    import plotly.graph_objects as go

    figure = base_figure(
        window,
        "entries waiting",
        yaxis2={
            "title": {"text": "oldest entry's age (s)"},
            "overlaying": "y",
            "side": "right",
            "rangemode": "tozero",
        },
    )
    hours = [plot_time(hour) for hour in series["hours"]]
    highest = series["backlog_max"]
    figure.add_trace(
        go.Scatter(
            x=hours,
            y=highest["pending"],
            name="pending (max)",
            mode="lines+markers",
            hovertemplate="%{y} waiting<extra>%{x|%Y-%m-%d %H:00}</extra>",
            marker={"size": 4},
        )
    )
    figure.add_trace(
        go.Scatter(
            x=hours,
            y=highest["oldest_age_s"],
            name="lag: oldest entry's age (max)",
            mode="lines+markers",
            yaxis="y2",
            hovertemplate="%{y:.3g} s<extra>%{x|%Y-%m-%d %H:00}</extra>",
            marker={"size": 4},
        )
    )
    empty = all(value is None for values in highest.values() for value in values)
    return say_if_empty(figure, empty, "no backlog samples in this window")
