"""`outbox-sync` as the tests run it: in-process through click's CliRunner (`invoke`), or as a
process (`run_module`), always without the outbox-sync settings of this process's environment,
so that a developer's own TYPESENSE_URL or OUTBOX_SYNC_DB never leaks into a test."""

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from click.testing import CliRunner, Result

from outbox_sync.cli import main
from tests.support.typesense import Server

ROOT = Path(__file__).resolve().parents[2]
# The environment variables outbox-sync reads start with these.
SETTING_PREFIXES = ("OUTBOX_SYNC_", "TYPESENSE_")


def without_settings(**settings: str) -> dict[str, str]:
    """This process's environment less every outbox-sync setting, plus `settings`."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
    return environment | settings


def invoke(
    args: Sequence[str],
    server: Server | None = None,
    db_path: Path | None = None,
    collection: str | None = None,
    color: bool = False,
    input: str | None = None,
    **env: str | None,
) -> Result:
    """`outbox-sync ARGS` in-process, with no outbox-sync setting from this environment; the
    server, database and collection, when given, set through their environment variables, then
    `env` (None unsets a variable). color: as on a terminal (click keeps the styling). input:
    what the command reads on stdin (none: an empty stdin)."""
    environment: dict[str, str | None] = {
        name: None for name in os.environ if name.startswith(SETTING_PREFIXES)
    }
    if server is not None:
        environment.update(TYPESENSE_URL=server.url, TYPESENSE_API_KEY=server.api_key)
    if db_path is not None:
        environment.update(OUTBOX_SYNC_DB=str(db_path))
    if collection is not None:
        environment.update(OUTBOX_SYNC_COLLECTION=collection)
    environment.update(env)
    # The command configures structlog for its run (its level, a stderr that is CliRunner's
    # buffer): put back this process's own after, or a later test in it logs through them
    # (`--log-level error` left capture_logs seeing nothing, in the tests that ran after).
    saved = structlog.get_config()
    try:
        return CliRunner().invoke(main, list(args), input=input, env=environment, color=color)
    finally:
        structlog.configure(**saved)


def run_module(
    args: Sequence[str], env: dict[str, str], timeout_s: float = 60, **options: Any
) -> subprocess.CompletedProcess[str]:
    """`python -m outbox_sync ARGS` as a process from the repository root, its output kept."""
    return subprocess.run(
        [sys.executable, "-m", "outbox_sync", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        **options,
    )


def one_line(result: Result) -> str:
    """The output of a failed command, checked to be one line without a traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def error_lines(output: str) -> list[str]:
    """The lines of a run's output that are not JSON log lines."""
    return [line for line in output.splitlines() if line.strip() and not line.startswith("{")]
