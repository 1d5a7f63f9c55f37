"""Every chapter executed through papermill at scale=smoke, then the book built from them.

The chapters run in a copy of the book's folder, so the results of `make book` are untouched.
"""
import json
import re

import pytest
from bs4 import BeautifulSoup
from conftest import CHAPTERS

from prefdyn.book import execute

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_executes_at_smoke_scale_and_passes_its_checks(book, chapter):
    top, results, _ = book
    result = results[chapter]
    assert result.status == "executed", result.error
    saved = json.loads((top / "book" / "_executed" / f"{chapter}.checks.json").read_text())
    assert saved == result.checks and len(saved) >= 3
    assert all(set(c) == {"claim", "predicted", "observed", "tolerance", "passed"} for c in saved)
    assert all(c["passed"] for c in saved), [c for c in saved if not c["passed"]]


def test_second_run_is_served_from_the_cache(book):
    top, _, _ = book
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFDYN_ROOT", str(top))
        again = execute.run_chapter(CHAPTERS[0], "smoke", "cpu")
    assert again.status == "cached" and again.checks


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_built_page_has_figures_table_and_no_errors(book, chapter):
    top, _, html = book
    assert html is not None and html.is_file()
    page = top / "book" / "_build" / "html" / "book" / "_executed" / f"{chapter}.html"
    soup = BeautifulSoup(page.read_text(), "html.parser")
    images = [img["src"] for img in soup.select("main img")]
    assert images, "no figures on the page"
    for src in images:
        assert (page.parent / src).resolve().is_file(), f"missing figure {src}"
    assert not soup.select(".output.error, .output.traceback"), "an error output is shown"
    assert "Traceback" not in soup.get_text()
    tables = [t for t in soup.select("table") if "tolerance" in t.get_text()]
    assert tables, "no verification table"
    for table in tables:  # this run's checks, and the recorded full-scale run where one exists
        rows = table.select("tbody tr")
        assert rows and all("pass" in r.get_text() for r in rows)
        assert not re.search(r"FAIL", table.get_text())


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_same_seed_and_scale_give_identical_checks(book, chapter):
    """Determinism: a second execution (cache bypassed) at the same seed and scale on the same machine."""
    top, results, _ = book
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFDYN_ROOT", str(top))
        again = execute.run_chapter(chapter, "smoke", "cpu", force=True)
    assert again.status == "executed", again.error
    assert again.checks == results[chapter].checks


def test_reproducibility_page_reports_every_chapter_run(book):
    top, results, html = book
    assert html is not None
    page = top / "book" / "_build" / "html" / "book" / "_executed" / "reproducibility.html"
    soup = BeautifulSoup(page.read_text(), "html.parser")
    glance = soup.select_one("table")
    rows = glance.select("tbody tr")
    assert len(rows) == len(CHAPTERS)
    for row, chapter in zip(rows, CHAPTERS):
        cells = [td.get_text(" ", strip=True) for td in row.select("td")]
        n = len(results[chapter].checks)
        assert row.select_one("a")["href"].startswith(chapter)
        assert cells[1] == f"✅ {n}/{n}" and cells[2].startswith("smoke, cpu, ")
    text = soup.get_text(" ")
    assert text.count("Git revision") == text.count("Hardware") >= len(CHAPTERS)
    assert len([t for t in soup.select("table") if "tolerance" in t.get_text()]) >= len(CHAPTERS)
