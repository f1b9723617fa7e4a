"""Monitoring: the Prometheus alert rules and their unit tests, Prometheus's configuration, the
Grafana dashboard and its provisioning, and the compose "monitoring" profile that runs them.

Checked with the real tools: promtool and Prometheus from Debian's prometheus package (.ci/run
installs it), against the metrics the daemon really exports, and one run of a real Prometheus
scraping a real daemon. Grafana itself does not run here (it is no Debian package): its files
are checked by parsing them.
"""

import json
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import click
import httpx
import pytest
import yaml

from outbox_sync.cli import main
from outbox_sync.config import parse_address
from outbox_sync.db import Database
from outbox_sync.localserver import free_port
from outbox_sync.mapping import SEQUENCES
from outbox_sync.telemetry import Metrics
from tests.support.app import ROW_SQL, app_connection, make_row
from tests.support.daemon import Daemon
from tests.support.wait import wait_until

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker" / "compose.yml"
PROMETHEUS_DIR = REPO / "docker" / "prometheus"
RULES = PROMETHEUS_DIR / "alerts.yml"
# the unit tests of the rules; the second file holds the cases on a scale of days
RULE_TESTS = (PROMETHEUS_DIR / "alerts.test.yml", PROMETHEUS_DIR / "alerts.days.test.yml")
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
GRAFANA_DIR = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "outbox-sync.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "outbox-sync.yml"
JOB = "outbox-sync"
# Prometheus's own series that the rules and the dashboard may name besides the daemon's.
PROMETHEUS_METRICS = {"up"}

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian: apt-get install prometheus; .ci/run installs it)",
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus is not installed (Debian: apt-get install prometheus; .ci/run installs it)",
)


# --- reading the files ------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules(text: str | None = None) -> list[dict[str, Any]]:
    """The alerting rules of alerts.yml (or of `text`), in order."""
    loaded = yaml.safe_load(RULES.read_text() if text is None else text)
    return [rule for group in loaded["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard(text: str | None = None) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text() if text is None else text)
    return loaded


def dashboard_queries(board: dict[str, Any]) -> dict[str, str]:
    """Every PromQL query of the dashboard, by where it is ("panel title / refId")."""
    queries = {
        f"{panel['title']} / {target['refId']}": target["expr"]
        for panel in board["panels"]
        for target in panel.get("targets", [])
    }
    for variable in board.get("templating", {}).get("list", []):
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        # Grafana's label_values(SELECTOR, LABEL): only SELECTOR is PromQL.
        if match := re.fullmatch(r"label_values\((.*),\s*\w+\)", query.strip()):
            query = match[1]
        queries[f"variable ${variable['name']}"] = query
    return queries


# Grafana's variables, replaced by what Grafana would put there, so that promtool and
# Prometheus can read the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def as_promql(query: str, rate_interval: str = "1m", instance: str = ".*") -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, rate_interval if variable == "$__rate_interval" else value)
    query = query.replace("$instance", instance)
    assert "$" not in query, f"a Grafana variable this test does not know: {query}"
    return query


# PromQL words that are not metric names.
PROMQL_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
    "group_right", "atan2", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects. promtool has already parsed it (the tests
    below), so blanking the parts that cannot hold a metric name is enough: strings, label
    matchers, ranges, grouping clauses; what is left and not a function or keyword is one."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr, flags=re.I
    )
    names = set()
    for match in re.finditer(r"(?<![\w.:])[a-zA-Z_:][\w:]*", expr):
        following = expr[match.end() :].lstrip()
        if following.startswith("(") or match[0].lower() in PROMQL_KEYWORDS:
            continue
        names.add(match[0])
    return names


def exported_metrics() -> set[str]:
    """The series names the daemon's registry exports: histograms as _bucket/_sum/_count,
    counters as _total, gauges as they are."""
    suffixes = {"histogram": ["_bucket", "_sum", "_count"], "counter": ["_total"], "gauge": [""]}
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }


def unknown_metrics(rules_text: str, dashboard_text: str) -> dict[str, set[str]]:
    """Metric names the rules or the dashboard use that nobody exports, by where."""
    known = exported_metrics() | PROMETHEUS_METRICS
    expressions = {f"alert {rule['alert']}": rule["expr"] for rule in alert_rules(rules_text)}
    expressions |= dashboard_queries(dashboard(dashboard_text))
    unknown = {where: metric_names(expr) - known for where, expr in expressions.items()}
    return {where: names for where, names in unknown.items() if names}


def grouping_labels(expr: str) -> set[str]:
    """The labels of the expression's `by (...)` clauses."""
    return {
        label.strip()
        for clause in re.findall(r"\bby\s*\(([^)]*)\)", expr)
        for label in clause.split(",")
    }


def promtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def copy_rules(directory: Path, rules_text: str | None = None) -> list[str]:
    """alerts.yml (or `rules_text` in its place) and its unit tests side by side in directory;
    returns the test files' paths."""
    (directory / RULES.name).write_text(RULES.read_text() if rules_text is None else rules_text)
    for tests in RULE_TESTS:
        shutil.copy(tests, directory / tests.name)
    return [str(directory / tests.name) for tests in RULE_TESTS]


def changed(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"expected {old!r} exactly once"
    return text.replace(old, new)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(COMPOSE)
    return loaded


def host_path(volume: str) -> tuple[Path, str]:
    """A compose bind mount SOURCE:TARGET[:MODE] -> (source on the host, target)."""
    source, target = volume.split(":")[:2]
    return (COMPOSE.parent / source).resolve(), target


def container_file(service: dict[str, Any], path: str) -> Path | None:
    """The repository file that a path inside the service's container is, through its bind
    mounts (None when no mount holds it)."""
    for volume in service.get("volumes", []):
        if not isinstance(volume, str) or not volume.startswith("."):
            continue  # a named volume: nothing of ours
        source, target = host_path(volume)
        try:
            return source / PurePosixPath(path).relative_to(target)
        except ValueError:
            continue  # mounted elsewhere
    return None


# --- the alert rules --------------------------------------------------------------------------


@needs_promtool
def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout
    # ...and the check can fail: a rule whose expression does not parse.
    broken = tmp_path / "alerts.yml"
    broken.write_text(
        changed(
            RULES.read_text(), "outbox_sync_typesense_up == 0", "outbox_sync_typesense_up == == 0"
        )
    )
    assert promtool("check", "rules", str(broken)).returncode != 0


@needs_promtool
def test_alert_unit_tests_pass() -> None:
    """alerts.test.yml and alerts.days.test.yml: input series, and the alerts that must and
    must not fire."""
    result = promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param("oldest_age_seconds > 60", "oldest_age_seconds > 600", id="lag-threshold"),
        pytest.param(
            "expr: outbox_sync_outbox_oldest_age_seconds > 60\n        for: 5m",
            "expr: outbox_sync_outbox_oldest_age_seconds > 60\n        for: 1m",
            id="lag-for",
        ),
        # Without the gauge, the first error of a new reason goes unseen (increase() of a
        # series born at 1 is 0).
        pytest.param(
            "delta(outbox_sync_sync_errors_open[15m]) > 0\n          or\n", "", id="errors-gauge"
        ),
        pytest.param(
            "or\n          sum by (instance, job) "
            "(increase(outbox_sync_documents_failed_total[15m])) > 0\n",
            "\n",
            id="errors-counter",
        ),
        pytest.param('up{job="outbox-sync"} == 0', 'up{job="outbox_sync"} == 0', id="down-job"),
        pytest.param(
            "outbox_sync_typesense_up == 0\n        for: 2m\n        labels:\n"
            "          severity: critical",
            "outbox_sync_typesense_up == 0\n        for: 2m\n        labels:\n"
            "          severity: warning",
            id="typesense-severity",
        ),
        # Without the guard, a daemon that never audited (0) is "too old" at once.
        pytest.param(
            "outbox_sync_audit_last_success_timestamp_seconds > 0\n          and\n",
            "",
            id="audit-guard",
        ),
        pytest.param("for: 26h", "for: 20h", id="never-audited-for"),
        # Without the guard, a Typesense outage fires this alert beside its own.
        pytest.param(
            "outbox_sync_sync_paused == 1\n          and on (instance, job)\n"
            "          outbox_sync_typesense_up == 1\n",
            "outbox_sync_sync_paused == 1\n",
            id="paused-guard",
        ),
        pytest.param(
            "outbox_sync_sync_paused == 1\n          and on (instance, job)\n"
            "          outbox_sync_typesense_up == 1\n        for: 5m",
            "outbox_sync_sync_paused == 1\n          and on (instance, job)\n"
            "          outbox_sync_typesense_up == 1\n        for: 3m",
            id="paused-for",
        ),
        pytest.param(
            "outbox_sync_collection_fields_changed == 1\n        for: 5m",
            "outbox_sync_collection_fields_changed == 1\n        for: 1m",
            id="fields-for",
        ),
        pytest.param(
            "* 1024 * 1024\n        for: 30m", "* 1024 * 1024\n        for: 15m", id="wal-for"
        ),
        pytest.param("> 512 * 1024 * 1024", "> 256 * 1024 * 1024", id="wal-threshold"),
        pytest.param("the last audit found {{ $value }}", "the last audit found", id="annotation"),
    ],
)
def test_alert_unit_tests_catch_a_changed_rule(tmp_path: Path, old: str, new: str) -> None:
    """Proves the unit tests above can fail: each change to a rule breaks at least one case."""
    tests = copy_rules(tmp_path, changed(RULES.read_text(), old, new))
    assert promtool("check", "rules", str(tmp_path / RULES.name)).returncode == 0  # still valid
    result = promtool("test", "rules", *tests)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert of alerts.yml has a case in its unit tests where it fires and one where it
    must not."""
    cases: dict[str, list[bool]] = {}
    for test in (test for tests in RULE_TESTS for test in load_yaml(tests)["tests"]):
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(bool(case.get("exp_alerts")))
    for rule in alert_rules():
        assert set(cases.get(rule["alert"], [])) == {True, False}, rule["alert"]
    assert set(cases) == {rule["alert"] for rule in alert_rules()}


REQUIRED_ALERTS = {
    # alert: the metric its expression must use
    "OutboxSyncLagHigh": {"outbox_sync_outbox_oldest_age_seconds"},
    "OutboxSyncErrorsGrowing": {
        "outbox_sync_sync_errors_open",
        "outbox_sync_documents_failed_total",
    },
    "OutboxSyncTypesenseDown": {"outbox_sync_typesense_up"},
    "OutboxSyncPaused": {"outbox_sync_sync_paused", "outbox_sync_typesense_up"},
    "OutboxSyncCollectionFieldsChanged": {"outbox_sync_collection_fields_changed"},
    "OutboxSyncWalHeldBack": {"outbox_sync_database_wal_uncheckpointed_bytes"},
    "OutboxSyncDown": {"up"},
    "OutboxSyncTargetMissing": {"up"},
    "OutboxSyncAuditDrift": {"outbox_sync_audit_drift"},
    "OutboxSyncAuditTooOld": {"outbox_sync_audit_last_success_timestamp_seconds"},
    "OutboxSyncNeverAudited": {"outbox_sync_audit_last_success_timestamp_seconds"},
}


def test_the_required_alerts_exist() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) == set(REQUIRED_ALERTS)
    for name, metrics in REQUIRED_ALERTS.items():
        assert metric_names(rules[name]["expr"]) == metrics, name
    assert "absent(" in rules["OutboxSyncTargetMissing"]["expr"]
    assert "for" not in rules["OutboxSyncErrorsGrowing"]  # every new error is worth a look


def commands_named(text: str) -> list[list[str]]:
    """Each `outbox-sync COMMAND [SUBCOMMAND] [--option...]` in a text, as words."""
    return [
        match[0].split()[1:]
        for match in re.finditer(r"outbox-sync(?: [a-z][a-z-]*)+(?: --[a-z-]+)*", text)
    ]


def test_every_alert_says_what_to_run() -> None:
    """summary, description and action, a severity; the commands the action names are real
    commands and options of the CLI."""
    for rule in alert_rules():
        annotations, name = rule["annotations"], rule["alert"]
        assert {"summary", "description", "action"} <= set(annotations), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        named = commands_named(annotations["action"])
        assert named, f"{name}: its action names no outbox-sync command"
        for words in named:
            command: click.Command = main
            for word in words:
                if word.startswith("--"):
                    options = {opt for param in command.params for opt in param.opts}
                    assert word in options, f"{name}: {' '.join(words)}"
                elif isinstance(command, click.Group) and word in command.commands:
                    command = command.commands[word]
                else:
                    assert not isinstance(command, click.Group), f"{name}: {' '.join(words)}"
                    break  # an argument (ID) or the prose that follows
            assert command is not main, f"{name}: {' '.join(words)}"


def test_the_command_check_can_fail() -> None:
    """commands_named() finds misspelt commands and options, or the test above could not fail."""
    assert commands_named("run outbox-sync errors list; outbox-sync audit --repair (ids)") == [
        ["errors", "list"],
        ["audit", "--repair"],
    ]
    errors = main.commands["errors"]
    assert isinstance(errors, click.Group) and "lists" not in errors.commands
    assert "--repare" not in {opt for param in main.commands["audit"].params for opt in param.opts}


# --- metric names -----------------------------------------------------------------------------


def test_metric_names_reads_promql() -> None:
    """The extraction the next tests rely on, on the shapes the rules and dashboard use."""
    assert metric_names(
        'histogram_quantile(0.99, sum by (operation, le) (rate(a_bucket{instance=~"$x"}[5m])))'
    ) == {"a_bucket"}
    assert metric_names('time() - b > 26 * 3600 and b > 0 or absent(up{job="c d"})') == {
        "b",
        "up",
    }
    assert metric_names("delta(c[15m]) > 0 or sum without (reason) (increase(d[1h:1m])) > 1e3") == {
        "c",
        "d",
    }


def test_every_metric_the_rules_and_dashboard_name_is_exported() -> None:
    assert unknown_metrics(RULES.read_text(), DASHBOARD.read_text()) == {}
    # ...and they do name the daemon's metrics, not nothing.
    named = set().union(*(metric_names(rule["expr"]) for rule in alert_rules()))
    named |= set().union(*map(metric_names, dashboard_queries(dashboard()).values()))
    assert len(named & exported_metrics()) >= 10


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        pytest.param(
            "rules",
            "outbox_sync_typesense_up == 0",
            "outbox_sync_typesense_ok == 0",
            id="rule-gauge",
        ),
        pytest.param(
            "rules",
            "increase(outbox_sync_documents_failed_total[",
            "increase(outbox_sync_documents_failed[",
            id="rule-counter-without-total",
        ),
        pytest.param(
            "dashboard",
            "rate(outbox_sync_typesense_request_duration_seconds_count",
            "rate(outbox_sync_typesense_request_duration_count",
            id="dashboard-histogram",
        ),
        pytest.param(
            "dashboard",
            'up{job=\\"outbox-sync\\", instance',
            'scrape_up{job=\\"outbox-sync\\", instance',
            id="dashboard-not-prometheus-own",
        ),
    ],
)
def test_a_wrong_metric_name_is_caught(file: str, old: str, new: str) -> None:
    rules, board = RULES.read_text(), DASHBOARD.read_text()
    if file == "rules":
        rules = changed(rules, old, new)
    else:
        board = changed(board, old, new)
    unknown = unknown_metrics(rules, board)
    assert len(unknown) == 1
    [(_, names)] = unknown.items()
    assert names and names <= set(re.findall(r"[a-z_]+", new))


# --- Prometheus's configuration ---------------------------------------------------------------


@needs_promtool
@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param(None, None, id="as-is"),
        pytest.param("  - alerts.yml", "  - alert.yml", id="missing-rule-file"),
        pytest.param("scrape_interval: 15s", "scrape_intervals: 15s", id="unknown-setting"),
        pytest.param("- targets:", "- target:", id="misspelt-key"),
    ],
)
def test_prometheus_config_passes_promtool_check(
    tmp_path: Path, old: str | None, new: str | None
) -> None:
    """As it is (the rules it loads included), and three broken copies that must fail."""
    for path in (PROMETHEUS_CONFIG, RULES):
        shutil.copy(path, tmp_path / path.name)
    config = tmp_path / PROMETHEUS_CONFIG.name
    if old is not None and new is not None:
        config.write_text(changed(config.read_text(), old, new))
    result = promtool("check", "config", str(config))
    if old is None:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS: 1 rule files found" in result.stdout
        assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout
    else:
        assert result.returncode != 0, result.stdout


def test_prometheus_scrapes_the_job_the_alerts_watch() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    assert [PROMETHEUS_DIR / path for path in config["rule_files"]] == [RULES]
    jobs = {scrape["job_name"] for scrape in config["scrape_configs"]}
    selected = {job for rule in alert_rules() for job in re.findall(r'job="([^"]+)"', rule["expr"])}
    assert selected == {JOB}
    assert selected <= jobs
    queried = {job for q in dashboard_queries(dashboard()).values() for job in
               re.findall(r'job="([^"]+)"', q)}  # fmt: skip
    assert queried == {JOB}


# --- the dashboard ----------------------------------------------------------------------------

# panel: what one of its queries must be (a test on the expression), all required.
REQUIRED_PANELS: dict[str, Callable[[str], bool]] = {
    "lag": lambda e: "outbox_sync_outbox_oldest_age_seconds" in metric_names(e),
    "backlog": lambda e: "outbox_sync_outbox_pending" in metric_names(e),
    "applied rate by operation": lambda e: (
        "rate(outbox_sync_documents_applied_total" in e and "operation" in grouping_labels(e)
    ),
    "Typesense latency quantiles by operation": lambda e: (
        e.startswith("histogram_quantile(0.99,")
        and "outbox_sync_typesense_request_duration_seconds_bucket" in metric_names(e)
        and {"operation", "le"} <= grouping_labels(e)
    ),
    "open errors": lambda e: "outbox_sync_sync_errors_open" in metric_names(e),
    "Typesense up": lambda e: "outbox_sync_typesense_up" in metric_names(e),
    "daemon up": lambda e: metric_names(e) == {"up"} and f'job="{JOB}"' in e,
    "audit drift": lambda e: "outbox_sync_audit_drift" in metric_names(e),
    "last audit": lambda e: "outbox_sync_audit_last_success_timestamp_seconds" in metric_names(e),
    "sync paused": lambda e: "outbox_sync_sync_paused" in metric_names(e),
    "fields changed": lambda e: "outbox_sync_collection_fields_changed" in metric_names(e),
    "wal held back": lambda e: "outbox_sync_database_wal_uncheckpointed_bytes" in metric_names(e),
    "failures by reason": lambda e: (
        "outbox_sync_documents_failed_total" in metric_names(e) and "reason" in grouping_labels(e)
    ),
}


def test_the_dashboard_has_the_required_panels() -> None:
    queries = [q for where, q in dashboard_queries(dashboard()).items() if "/" in where]
    for panel, wanted in REQUIRED_PANELS.items():
        assert any(wanted(query) for query in queries), f"no panel shows the {panel}"
    latency = [q for q in queries if q.startswith("histogram_quantile(")]
    assert {q.split(",")[0] for q in latency} == {
        "histogram_quantile(0.5",
        "histogram_quantile(0.95",
        "histogram_quantile(0.99",
    }


def test_the_dashboard_is_well_formed() -> None:
    """What Grafana needs to load it as provisioned: the provisioned datasource everywhere,
    unique ids, refIds and a layout on its 24 columns without overlaps."""
    board = dashboard()
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert board["uid"] and board["title"]
    for key in ("id", "title"):  # titles too: a person tells panels apart by them
        values = [panel[key] for panel in board["panels"]]
        assert len(values) == len(set(values)), key
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": datasource["type"], "uid": datasource["uid"]}
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)) and refs, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == datasource["uid"]


@needs_promtool
@pytest.mark.parametrize("broken", [False, True], ids=["as-is", "broken-query"])
def test_the_dashboard_queries_are_valid_promql(tmp_path: Path, broken: bool) -> None:
    """promtool parses each query, as a recording rule (it has no command for a bare query)."""
    queries = dashboard_queries(dashboard())
    if broken:
        queries["broken"] = "sum by (operation (rate(outbox_sync_documents_applied_total[1m]))"
    rules = [
        {"record": f"dashboard:query_{number}", "expr": as_promql(query)}
        for number, query in enumerate(queries.values())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    if broken:
        assert result.returncode != 0
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {len(queries)} rules found" in result.stdout


# --- compose: the monitoring profile ----------------------------------------------------------


def test_the_monitoring_profile(compose: dict[str, Any]) -> None:
    """`--profile monitoring up` runs the daemon, Prometheus and Grafana (and Typesense, which
    has no profile); every port they publish is on loopback."""
    services = compose["services"]
    monitoring = {n for n, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert monitoring == {"outbox-sync", "prometheus", "grafana"}
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]
    published = [port for s in services.values() for port in s.get("ports", [])]
    assert len(published) == 3  # typesense, prometheus, grafana; not the daemon
    for port in published:
        assert str(port).startswith("127.0.0.1:"), port


def test_the_daemon_serves_metrics_where_prometheus_scrapes(compose: dict[str, Any]) -> None:
    daemon = compose["services"]["outbox-sync"]
    host, port = parse_address(daemon["environment"]["OUTBOX_SYNC_METRICS_ADDRESS"])
    assert host == "0.0.0.0"  # reachable from the prometheus container; no host port (above)
    (scrape,) = load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
    targets = [t for config in scrape["static_configs"] for t in config["targets"]]
    assert targets == [f"outbox-sync:{port}"]


def test_prometheus_service_loads_our_files(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    (config_path,) = [
        a.partition("=")[2] for a in prometheus["command"] if a.startswith("--config.file=")
    ]
    assert container_file(prometheus, config_path) == PROMETHEUS_CONFIG
    # rule_files are relative to the configuration file: alerts.yml must be mounted beside it.
    for rule_file in load_yaml(PROMETHEUS_CONFIG)["rule_files"]:
        in_container = str(PurePosixPath(config_path).parent / rule_file)
        assert container_file(prometheus, in_container) == RULES


def test_grafana_service_loads_our_files(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    # Grafana reads provisioning from /etc/grafana/provisioning/{datasources,dashboards}.
    assert container_file(grafana, "/etc/grafana/provisioning/datasources/prometheus.yml") == (
        DATASOURCES
    )
    assert container_file(grafana, "/etc/grafana/provisioning/dashboards/outbox-sync.yml") == (
        DASHBOARD_PROVIDERS
    )
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    path = provider["options"]["path"]
    assert container_file(grafana, f"{path}/{DASHBOARD.name}") == DASHBOARD
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert container_file(grafana, home) == DASHBOARD
    # The datasource is the compose service, on Prometheus's port.
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    url = httpx.URL(datasource["url"])
    assert url.host in compose["services"]
    assert any(str(p).endswith(f":{url.port}") for p in compose["services"][url.host]["ports"])


@needs_promtool
def test_prometheus_image_is_the_version_promtool_checks(compose: dict[str, Any]) -> None:
    """The rules are checked by this promtool: the image must run the same Prometheus."""
    version = re.search(r"version (\d+\.\d+\.\d+)", promtool("--version").stdout)
    assert version is not None
    assert compose["services"]["prometheus"]["image"] == f"prom/prometheus:v{version[1]}"


# --- a real Prometheus scraping a real daemon -------------------------------------------------


class Prometheus:
    """A Prometheus server on loopback, its data in a temporary directory."""

    def __init__(self, config: Path, data: Path, log: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        assert PROMETHEUS is not None
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def api(self, path: str, **params: str) -> Any:
        try:
            response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        except httpx.HTTPError:
            return None  # not listening yet
        if response.status_code == 503:
            return None  # listening, not ready yet
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.api("query", query=promql)
        assert data is not None
        result: list[dict[str, Any]] = data["result"]
        return result

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.log.close()


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    """Starts Prometheus on our prometheus.yml, changed only to scrape `address` every second
    and evaluate the rules every second."""
    started: list[Prometheus] = []

    def start(address: str) -> Prometheus:
        config = load_yaml(PROMETHEUS_CONFIG)
        config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(PROMETHEUS_DIR / path) for path in config["rule_files"]]
        (scrape,) = config["scrape_configs"]
        scrape["static_configs"] = [{"targets": [address]}]
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        server = Prometheus(path, tmp_path / "prometheus-data", tmp_path / "prometheus.log")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@needs_prometheus
@pytest.mark.slow
def test_prometheus_scrapes_the_daemon_and_the_dashboard_shows_it(
    db_path: Path,
    start_daemon: Callable[..., Daemon],
    prometheus_for: Callable[[str], Prometheus],
) -> None:
    """Prometheus, on our config and rules, scrapes a daemon that then syncs upserts, a delete
    and one invalid row: every rule evaluates without error, the errors alert fires for that
    first error (and not before it), and every dashboard query runs, with data wherever the
    daemon exports the metrics it reads."""
    address = f"127.0.0.1:{free_port()}"
    daemon = start_daemon("--metrics-address", address)
    prometheus = prometheus_for(address)
    # Two scrapes before the error: the alert can only see a change it saw happen.
    wait_until(
        lambda: (
            prometheus.api("query", query="count_over_time(outbox_sync_sync_errors_open[1m]) >= 2")
            or {}
        ).get("result"),
        what=f"Prometheus to scrape the daemon; its log: {prometheus.log.name}",
    )
    assert prometheus.query(f'up{{job="{JOB}"}} == 1')
    assert prometheus.query('ALERTS{alertname="OutboxSyncErrorsGrowing"}') == []

    connection = app_connection(db_path)
    connection.executemany(ROW_SQL, [make_row(i) for i in range(1, 21)])
    connection.execute("DELETE FROM sequences WHERE id = 3")
    connection.execute(ROW_SQL, make_row(21, sequence_number=2**31))  # out of range: an error
    connection.close()
    wait_until(
        lambda: Database(db_path).counts(SEQUENCES)["sync_errors_open"] == 1, what="the sync"
    )
    wait_until(lambda: Database(db_path).counts(SEQUENCES)["pending"] == 0, what="the drain")
    wait_until(
        lambda: prometheus.query('ALERTS{alertname="OutboxSyncErrorsGrowing",alertstate="firing"}'),
        what="OutboxSyncErrorsGrowing to fire",
    )

    rules = [r for group in prometheus.api("rules")["groups"] for r in group["rules"]]
    assert {rule["name"] for rule in rules} == set(REQUIRED_ALERTS)
    assert [(r["name"], r["health"], r.get("lastError", "")) for r in rules] == [
        (r["name"], "ok", "") for r in rules
    ]
    assert prometheus.query('ALERTS{alertname="OutboxSyncLagHigh"}') == []

    # Rates need two samples in their window: scraped every second, 10 s holds several.
    wait_until(
        lambda: prometheus.query(f'count_over_time(up{{job="{JOB}"}}[10s]) >= 3'),
        what="three scrapes",
    )
    results = {
        where: prometheus.query(as_promql(query, rate_interval="10s"))
        for where, query in dashboard_queries(dashboard()).items()
    }
    # Before the first audit, the daemon exports no drift series (one per kind, once audited).
    audit = {"Audit drift / A", "Audit drift by kind / A"}
    empty = [where for where, result in results.items() if not result and where not in audit]
    assert empty == []

    def labels(where: str, label: str) -> set[str]:
        return {series["metric"][label] for series in results[where]}

    assert labels("Records applied per second, by operation / A", "operation") == {
        "upsert",
        "delete",
    }
    assert "import" in labels(
        "Typesense request latency by operation (p50, p95, p99) / C", "operation"
    )
    assert labels("Records given up on, by reason / A", "reason") == {"validation"}
    assert [s["value"][1] for s in results["Open sync errors / A"]] == ["1"]
    assert [s["value"][1] for s in results["Typesense up / A"]] == ["1"]
    assert [s["value"][1] for s in results["Sync paused / A"]] == ["0"]
    fields = results["Collections lacking the mapping's fields / A"]  # its first turn looked
    assert [s["value"][1] for s in fields] == ["0"]
    wal = results["Database WAL held back by a reader / A"]  # no reader holds it back
    assert [s["value"][1] for s in wal] == ["0"]
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
