"""Log output: readable on a terminal, JSON lines elsewhere, the API key blanked in both."""

import io
import json

import pytest
import structlog

from outbox_sync import logs


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_structlog() -> object:
    yield
    structlog.reset_defaults()  # later tests must not write into this test's buffer


@pytest.mark.parametrize("stream", [io.StringIO, Terminal])
def test_logs_are_json_off_a_terminal_readable_on_one_and_never_show_the_key(
    monkeypatch: pytest.MonkeyPatch, stream: type[io.StringIO]
) -> None:
    output = stream()
    monkeypatch.setattr("sys.stderr", output)
    logs.configure("info", ("s3cret-key",))
    log = structlog.get_logger("outbox_sync")
    log.info("sync_paused", reason="401 for key s3cret-key", retry_in_s=0.25)
    log.debug("batch_applied", entries=1)  # below the level: not written
    text = output.getvalue()
    assert "s3cret-key" not in text and "***" in text
    assert "batch_applied" not in text
    if stream is Terminal:
        assert "sync_paused" in text and not text.lstrip().startswith("{")
    else:
        [line] = text.splitlines()
        event = json.loads(line)
        assert (event["event"], event["level"], event["retry_in_s"]) == (
            "sync_paused",
            "info",
            0.25,
        )
        assert event["reason"] == "401 for key ***"
