"""The docs stay true to the repository: every link to a page or an anchor resolves, every
test a page names as the proof of a promise exists, and the benchmark tables are the saved runs
they name."""

import re
from pathlib import Path

import pytest

from tests.bench.run import markdown, saved_rows

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")
# `tests/file.py::test_name`, and `…test_name` for another test of the file named before it
TEST_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`|`…(test_\w+)`")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a page."""
    found = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_links_resolve(page: Path) -> None:
    for target, anchor in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        linked = (page.parent / target).resolve() if target else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(linked), (
                f"{page.name} links to {target}#{anchor}: no such heading"
            )


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_file_named_exists(page: Path) -> None:
    for path in re.findall(
        r"`((?:tests|docs|docker|systemd|outbox_sync)/[\w/.@-]+)", page.read_text()
    ):
        assert (ROOT / path.split("::")[0]).exists(), f"{page.name} names {path}: no such file"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_test_named_as_proof_exists(page: Path) -> None:
    current: Path | None = None
    for path, name, sibling in TEST_REFERENCE.findall(page.read_text()):
        if path:
            current = ROOT / path
            assert current.exists(), f"{page.name} names {path}, which does not exist"
        assert current is not None, f"{page.name}: …{sibling} follows no file"
        test = name or sibling
        assert re.search(rf"def {test}\b", current.read_text()), (
            f"{page.name} names {current.relative_to(ROOT)}::{test}, which does not exist"
        )


def test_the_benchmark_tables_are_the_saved_runs_they_name() -> None:
    """docs/performance.md holds each table as `python -m tests.bench --markdown RUN.json`
    prints it from the run it names: a figure cannot be edited by hand, nor a run replaced
    without its table."""
    page = (ROOT / "docs" / "performance.md").read_text()
    runs = re.findall(r"`(docs/bench/[\w.-]+\.json)`", page)
    assert runs, "docs/performance.md names no saved run"
    for run in runs:
        assert markdown(saved_rows(ROOT / run)) in page, (
            f"docs/performance.md does not hold the table of {run}: paste the output of "
            f"`python -m tests.bench --markdown {run}`"
        )
