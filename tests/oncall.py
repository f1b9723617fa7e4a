"""Helpers for the tests of the on-call commands (errors, audit, search, report): the CLI
pointed at the test server, and Typesense changed by hand, behind the daemon's back."""

import os
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner, Result

from outbox_sync.cli import main
from tests.conftest import Server


def invoke(
    args: list[str], server: Server, db_path: Path, collection: str, **env: str | None
) -> Result:
    """`outbox-sync ARGS` against the test server; other outbox-sync settings unset."""
    environment: dict[str, str | None] = {
        name: None for name in os.environ if name.startswith(("OUTBOX_SYNC_", "TYPESENSE_"))
    }
    environment.update(
        TYPESENSE_URL=server.url,
        TYPESENSE_API_KEY=server.api_key,
        OUTBOX_SYNC_DB=str(db_path),
        OUTBOX_SYNC_COLLECTION=collection,
    )
    environment.update(env)
    return CliRunner().invoke(main, args, env=environment)


def by_hand(server: Server, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request to Typesense, as someone with curl would send it."""
    response = httpx.request(
        method,
        f"{server.url}{path}",
        headers={"X-TYPESENSE-API-KEY": server.api_key},
        timeout=10,
        **kwargs,
    )
    response.raise_for_status()
    return response


def one_line(result: Result) -> str:
    """The output of a failed command, checked to be one line without a traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]
