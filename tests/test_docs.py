"""The docs stay true to the repository: every link to a page or an anchor resolves, every
test a page names as the proof of a promise exists, and the benchmark tables are the saved runs
they name."""

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.bench.run import Row, history, markdown, saved_rows

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


BENCH_PAGES = [ROOT / "docs" / "performance.md", ROOT / "docs" / "performance-history.md"]
SAVED_RUNS = sorted((ROOT / "docs" / "bench").glob("*.json"))
SAVED_RUN = re.compile(r"`(docs/bench/[\w.-]+\.json)`")  # a page naming a saved run


@pytest.mark.parametrize("page", BENCH_PAGES, ids=lambda page: page.name)
def test_the_benchmark_tables_are_the_saved_runs_they_name(page: Path) -> None:
    """The performance pages hold each table as `python -m tests.bench --markdown RUN.json`
    prints it from the run it names: a figure cannot be edited by hand, nor a run replaced
    without its table."""
    text = page.read_text()
    runs = SAVED_RUN.findall(text)
    assert runs, f"{page.name} names no saved run"
    for run in runs:
        assert markdown(saved_rows(ROOT / run)) in text, (
            f"{page.name} does not hold the table of {run}: paste the output of "
            f"`python -m tests.bench --markdown {run}`"
        )


def test_every_saved_run_is_shown_and_counted() -> None:
    """Every run saved in docs/bench/ has its table on a performance page, and the summary of
    all of them on docs/performance.md is what `python -m tests.bench --history` prints now:
    a run cannot be saved and left out of the verdicts."""
    named = {ROOT / run for page in BENCH_PAGES for run in SAVED_RUN.findall(page.read_text())}
    assert SAVED_RUNS, "docs/bench/ holds no saved run"
    assert not set(SAVED_RUNS) - named, (
        f"no performance page shows {sorted(p.name for p in set(SAVED_RUNS) - named)}"
    )
    assert history(SAVED_RUNS) in BENCH_PAGES[0].read_text(), (
        "docs/performance.md does not hold the summary of the saved runs: paste the output of "
        "`python -m tests.bench --history docs/bench/*.json`"
    )


def test_the_summary_counts_each_figure_across_runs(tmp_path: Path) -> None:
    """`--history` pools a figure whose name differs only by the raw import's batch size, counts
    the runs that met its target, judges a relative target by the ratio and an absolute one by
    the value, and leaves out the rows without a target."""

    def save(name: str, *rows: Row) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps({"environment": {}, "rows": [asdict(r) for r in rows]}))
        return path

    def drain(batch: str, ratio: float) -> Row:
        return Row(
            f"drain 100,000: rate vs raw import ({batch}/request)",
            "docs/s",
            1.0,
            1.0,
            ratio,
            ">= 0.9x",
            ratio >= 0.9,
        )

    def rss(value: float) -> Row:
        return Row("peak RSS", "MB", value, 50.0, value / 50, "<= 100 MB", value <= 100)

    runs = [
        save("2026-01-01-aaaaaaa.json", drain("5,000", 0.8), rss(60), Row("start", "s", 1, 1, 1)),
        save("2026-01-02-bbbbbbb-drain.json", drain("10,000", 0.95)),
        save("2026-01-03-ccccccc.json", drain("10,000", 0.85), rss(120)),
    ]
    lines = history(runs).splitlines()
    assert lines[2:] == [
        "| drain 100,000: rate vs raw import | >= 0.9x | 3 | 1 | 0.85x | 0.8-0.95x |",
        "| peak RSS | <= 100 MB | 2 | 1 | 90 MB | 60-120 MB |",
    ]
