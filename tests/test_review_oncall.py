"""The on-call commands against odd data and odd options (found by a hostile review)."""

from pathlib import Path

from outbox_sync.db import Database
from tests.support.cli import invoke, one_line
from tests.support.daemon import record_failure


def test_a_report_from_a_future_since_is_one_clear_line(db_path: Path, db: Database) -> None:
    """`report --since 2099-01-01 --html FILE` (a mistyped year) ended in an IndexError
    traceback: the page charts the days of the window, and one starting after now has none."""
    record_failure(db, 1, 7, "refused", http_status=400, attempts=2)
    page = db_path.parent / "review.html"
    result = invoke(["report", "--since", "2099-01-01", "--html", str(page)], None, db_path)
    assert "Traceback" not in result.output and not isinstance(result.exception, IndexError)
    assert result.exit_code == 2 and "--since" in one_line(result) and "future" in result.output
    # and `errors list` said "no open sync errors matching" of a window that holds nothing
    listed = invoke(["errors", "list", "--since", "2099-01-01"], None, db_path)
    assert listed.exit_code == 2 and "is in the future" in one_line(listed)
