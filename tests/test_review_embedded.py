"""A hostile review of the embedded Typesense `outbox-sync run` starts without a TYPESENSE_URL:
its files edited, its start slow, signals while it starts, the on-call commands beside it."""

from pathlib import Path

import pytest

from outbox_sync.localserver import free_port
from tests.support.cli import error_lines, run_module, without_settings

pytestmark = pytest.mark.slow


def embedded_env(tmp_path: Path) -> dict[str, str]:
    return without_settings(
        OUTBOX_SYNC_DB=str(tmp_path / "sequences.db"),
        OUTBOX_SYNC_EMBEDDED_PORT=str(free_port()),
    )


def servers_of(data_dir: Path) -> list[int]:
    """The typesense-server processes running on `data_dir` (whoever their parent is)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"--data-dir={data_dir / 'data'}".encode() in argv:
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize(
    "key",
    ["clé-secrète-0123456789", "0123456789abcdef\nNOTE-a3f9 added by hand"],
    ids=["non-ascii", "two-lines"],
)
def test_an_embedded_api_key_no_header_can_carry_is_one_clear_line(
    tmp_path: Path, key: str
) -> None:
    """An api-key file edited by hand into a key no HTTP header can carry: the daemon died with
    a UnicodeEncodeError traceback, or (a second line) waited for ever as if Typesense were
    unreachable, `run --once` included, writing the key into its log. A key from
    TYPESENSE_API_KEY or --api-key-file is refused so, never echoed."""
    env = embedded_env(tmp_path)
    assert run_module(["init"], env=env).returncode == 0
    data_dir = tmp_path / "sequences.db.typesense"
    data_dir.mkdir()
    (data_dir / "api-key").write_text(key + "\n")
    result = run_module(["run", "--once"], env=env, timeout_s=15)
    assert result.returncode == 1, result.stderr
    [line] = error_lines(result.stderr)
    assert "Traceback" not in result.stderr
    assert f"API key in {data_dir / 'api-key'}" in line
    assert "NOTE-a3f9" not in result.stderr and "secrète" not in result.stderr
    assert not servers_of(data_dir)
