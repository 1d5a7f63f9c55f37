"""Every chapter executed through papermill at scale=smoke, then the book built from them.

The chapters run in a copy of the book's folder, so the results of `make book` are untouched.
"""
import json
import re

import pytest
from bs4 import BeautifulSoup
from conftest import CHAPTERS

from prefdyn.book import execute, reproduce
from prefdyn.book.registry import load_papers, load_registry
from prefdyn.book.runs import is_failure, load_checks
from prefdyn.book.verify import summary_line

pytestmark = pytest.mark.slow


def png_width(path) -> int:
    """The natural width of a PNG, from its header."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big")


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_executes_at_smoke_scale_and_its_identities_and_bounds_hold(book, chapter):
    top, results, _ = book
    result = results[chapter]
    assert result.status == "executed", result.error
    saved = json.loads((top / "book" / "_executed" / f"{chapter}.checks.json").read_text())
    assert set(saved) == {"chapter", "scale", "checks", "reported"} and saved["scale"] == "smoke"
    assert saved["checks"] == result.checks and len(saved["checks"]) >= 3
    assert {c["kind"] for c in saved["checks"]} <= {"identity", "bound", "prediction"}
    assert not [c for c in saved["checks"] if is_failure(c)]
    for c in saved["checks"]:
        if c["kind"] == "prediction":   # its registration travelled with the result
            registered = load_registry(chapter).prediction(c["prediction"]["id"])
            assert c["tolerance"] == registered.passes_if and c["prediction"]["registered_n"] == registered.n["smoke"]
            assert 0 <= c["prediction"]["power"] <= 1 and 0 <= c["prediction"]["false_pass"] <= 1


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
    tables = [t for t in soup.select("table")   # the identity and bound tables, by their header
              if [th.get_text(strip=True) for th in t.select("thead th")][-2:] == ["tolerance", "result"]]
    assert tables, "no verification table of identities or bounds"
    for table in tables:  # identities and bounds of this run: a failure would be a bug
        rows = table.select("tbody tr")
        assert rows and all(r.select("td")[-1].get_text(strip=True) == "pass" for r in rows)
    assert "identit" in soup.select_one("main").get_text()   # the summary line counts checks by kind
    assert any(t.select_one("th") and t.select_one("th").get_text(strip=True) == "row"
               and "this run" in t.get_text() for t in soup.select("table")), "no table of this run beside the recorded ones"
    outputs = " ".join(o.get_text(" ") for o in soup.select(".cell_output"))
    for stray in ("|---|", "np.float64(", "Run(scale=", "it/s]", str(top)):
        assert stray not in outputs, f"stray output {stray!r}"
    assert not re.search("[\u2705\u274c\U0001F300-\U0001FAFF]", soup.get_text()), "an emoji (an empty box without an emoji font)"
    for src in images:   # shown at its natural size in the ~780 px column, so its labels stay legible
        assert png_width(page.parent / src) <= 800, f"{src} is {png_width(page.parent / src)} px wide: use book.figures.panels"


DETERMINISM_CHAPTER = "ch03-dpo-generalization" if "ch03-dpo-generalization" in CHAPTERS else CHAPTERS[0]


@pytest.mark.parametrize("chapter", [DETERMINISM_CHAPTER])
def test_same_seed_and_scale_give_identical_checks(book, chapter):
    """Determinism end to end on one chapter: a second execution (cache bypassed) at the same seed and
    scale on the same machine. Every driver has a determinism test of its own in its module's tests,
    and every chapter is held to its committed reference run (test_chapter_reproduces_its_reference_run)."""
    top, results, _ = book
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFDYN_ROOT", str(top))
        again = execute.run_chapter(chapter, "smoke", "cpu", force=True)
    assert again.status == "executed", again.error
    assert again.checks == results[chapter].checks



@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_reproduces_its_reference_run(book, chapter):
    """This checkout's smoke run gives the numbers of the committed reference run
    (book/recorded/<chapter>/reference-smoke.json) within prefdyn reproduce's tolerance: every check's
    observed and expected value, result and verdict, every reported value. A change that moves a
    published number fails here, with the table of what moved, until the reference is re-recorded
    (`prefdyn record <chapter> --label reference-smoke`) in the same commit."""
    top, results, _ = book
    assert results[chapter].status != "failed", results[chapter].error
    recorded = reproduce.find_record(chapter, reproduce.REFERENCE_LABEL)
    assert recorded["scale"] == "smoke" and set(recorded["parameters"]) <= {"scale", "device"}, \
        "the reference is a smoke run with the chapter's defaults"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFDYN_ROOT", str(top))
        live = load_checks(chapter)
    differences = reproduce.compare(recorded, live)
    assert not differences, reproduce.difference_table(differences)

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
        assert row.select_one("a")["href"].startswith(chapter)
        assert cells[1] == summary_line(results[chapter].checks) and cells[2].startswith("smoke, cpu, ")
    text = soup.get_text(" ")
    assert text.count("Git revision") == text.count("Device that ran it") == text.count("; hardware: ") >= len(CHAPTERS)
    assert len([t for t in soup.select("table") if "tolerance" in t.get_text()]) >= len(CHAPTERS)


def test_ledger_page_lists_every_declared_claim_by_paper_and_links_its_chapter(book):
    top, _, html = book
    assert html is not None
    page = top / "book" / "_build" / "html" / "book" / "_executed" / "ledger.html"
    soup = BeautifulSoup(page.read_text(), "html.parser")
    titles = [h.get_text(" ", strip=True) for h in soup.select("main h2")]
    papers = [p["title"] for p in load_papers().values()]
    assert [t.rstrip("#").strip() for t in titles if t.rstrip("#").strip() in papers] == papers, titles
    summaries = [t for t in soup.select("main table")     # one summary table per paper: claim, this book, section
                 if [th.get_text(strip=True) for th in t.select("thead th")] == ["claim", "this book", "section"]]
    rows = [tr for t in summaries for tr in t.select("tbody tr")]
    declared = [c for paper in load_papers() for chapter in CHAPTERS for c in load_registry(chapter).claims
                if c.paper == paper]   # grouped by paper, in the order of papers.yml
    assert len(rows) == len(declared)
    for row, claim in zip(rows, declared):
        cells = row.select("td")
        assert cells[0].get_text(strip=True) == claim.id
        link = cells[-1].select_one("a")
        assert link is not None and link["href"].split("#")[0].endswith(".html"), claim.id
        assert (page.parent / link["href"].split("#")[0]).resolve().is_file()


def test_chapter_pages_offer_their_myst_source_and_one_search_box(book):
    top, _, html = book
    assert html is not None
    out = top / "book" / "_build" / "html"
    for chapter in CHAPTERS:
        page = out / "book" / "_executed" / f"{chapter}.html"
        soup = BeautifulSoup(page.read_text(), "html.parser")
        link = soup.select_one("a[href$='_myst/%s.md']" % chapter)
        assert link is not None, f"{chapter}: no MyST source in the download menu"
        assert (page.parent / link["href"]).resolve().read_text() == (top / "chapters" / f"{chapter}.md").read_text()
        fields = [b for b in soup.select("button.search-button-field") if not b.find_parent(class_="navbar-persistent--mobile")]
        assert len(fields) == 1, f"{chapter}: {len(fields)} search fields on a wide screen"
        assert not soup.select("a.btn-source-repository-button"), "a repository link although no URL is configured"


def test_figures_and_theorems_are_numbered_within_their_chapter(book):
    """Fig. 3.2 and Theorem 3.1 in chapter 3, not numbers running on across the book."""
    top, _, html = book
    assert html is not None
    for i, chapter in enumerate(CHAPTERS, start=1):
        soup = BeautifulSoup((top / "book" / "_build" / "html" / "book" / "_executed" / f"{chapter}.html").read_text(),
                             "html.parser")
        numbers = [s.get_text(strip=True) for s in soup.select("main figcaption .caption-number")]
        numbers += [s.get_text(" ", strip=True) for s in soup.select("main .proof .caption-number, main p.admonition-title")
                    if re.match(r"(Theorem|Lemma|Proposition|Definition|Corollary)\s+\d", s.get_text(" ", strip=True))]
        assert numbers, f"{chapter}: no numbered figure or theorem"
        wrong = [n for n in numbers if not re.search(rf"\b{i}\.\d+", n)]
        assert not wrong, f"{chapter} is chapter {i}, but: {wrong[:5]}"


def test_proof_index_lists_results_by_chapter_without_internal_paths(book):
    top, _, html = book
    assert html is not None
    soup = BeautifulSoup((top / "book" / "_build" / "html" / "prf-prf.html").read_text(), "html.parser")
    text = soup.select_one("main").get_text(" ")
    assert "_executed" not in text and "thm-" not in text
    entries = [a.get_text(" ", strip=True) for a in soup.select("main table a")]
    assert entries and all(re.match(r"(Theorem|Lemma|Proposition|Definition|Corollary|Remark) \d+\.\d+ \(", e)
                           for e in entries), entries
    headings = [h.get_text(strip=True) for h in soup.select("main table tr.cap")]
    chapter_titles = [BeautifulSoup((top / "book" / "_build" / "html" / "book" / "_executed" / f"{c}.html").read_text(),
                                    "html.parser").select_one("main h1").get_text(strip=True).rstrip("#") for c in CHAPTERS]
    chapter_titles = [re.sub(r"^\d+\.\s*", "", t) for t in chapter_titles]     # the chapter's number
    assert headings and headings == [t for t in chapter_titles if t in headings], "chapters out of the book's order"


def test_introduction_states_the_recorded_headline(book):
    from prefdyn.book.ledger import recorded_headline
    top, _, html = book
    assert html is not None
    intro = BeautifulSoup((top / "book" / "_build" / "html" / "book" / "intro.html").read_text(), "html.parser")
    def words(text):   # the build typesets quotes and code (a code span's text is its own node); compare the words
        text = re.sub(r"\s+", " ", text.replace("\u2019", "'").replace("`", ""))
        return re.sub(r" ([,.;:])", r"\1", text)
    first = recorded_headline().splitlines()[0]
    assert words(first) in words(intro.select_one("main").get_text(" "))
