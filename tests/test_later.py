"""Later work on the claims (chapters/claims/later-work.yml): the loader's checks, and the book's own file."""
import copy
import re
from pathlib import Path

import pytest
import yaml

from prefdyn.book import later, registry

REPO = Path(__file__).resolve().parents[1]
BOOK_PAPERS = ("im-li-2024", "im-li-2025", "chen-he-jordan-yao-2026", "sun-van-der-schaar-2024")

PAPER = {"key": "doe2025later", "arxiv": "2501.01234", "title": "A Later Paper", "authors": "J. Doe",
         "year": 2025, "venue": None, "read_where": ["abstract: https://example.org/2501.01234"]}
ENTRY = {"paper": "doe2025later", "relation": "qualifies", "finding": "It holds only for small models.",
         "section": "cha-sec"}
LATER = {"papers": [PAPER], "claims": {"c": [ENTRY]}}


def tiny_book(tmp_path, monkeypatch, later_work):
    """A book folder with one chapter (label ``cha-sec``), one claim ``c``, and ``later_work``."""
    monkeypatch.setenv("PREFDYN_ROOT", str(tmp_path))
    claims = tmp_path / "chapters" / "claims"
    claims.mkdir(parents=True)
    (claims / "papers.yml").write_text(yaml.safe_dump({"p1": {"title": "T", "authors": "A", "venue": "V",
                                                              "arxiv": "0000.00000", "readable": "all"}}))
    (tmp_path / "chapters" / "cha.md").write_text("---\n---\n# Cha\n\n(cha-sec)=\n## A section\n")
    (claims / "cha.yml").write_text(yaml.safe_dump({"predictions": {}, "claims": [
        {"id": "c", "paper": "p1", "where": "Thm 1", "claim": "x", "status": "derived", "section": "cha-sec"},
        {"id": "d", "paper": "p1", "where": "Thm 2", "claim": "y", "status": "derived", "section": "cha-sec"}]}))
    if later_work is not None:
        (claims / "later-work.yml").write_text(yaml.safe_dump(later_work, allow_unicode=True))
    return claims / "later-work.yml"


def changed(edit):
    data = copy.deepcopy(LATER)
    edit(data)
    return data


# --- the loader ----------------------------------------------------------------------------------

def test_a_well_formed_file_loads_and_later_for_gives_each_claims_entries(tmp_path, monkeypatch):
    tiny_book(tmp_path, monkeypatch, LATER)
    (found,) = later.later_for("c")
    assert (found.claim, found.paper.key, found.relation, found.section) == ("c", "doe2025later", "qualifies",
                                                                           "cha-sec")
    assert found.paper.url == "https://arxiv.org/abs/2501.01234"
    assert found.paper.read_where == ("abstract: https://example.org/2501.01234",)
    assert later.later_for("d") == ()                     # a claim of a registry without later work


def test_a_claim_of_no_registry_is_refused_by_later_for(tmp_path, monkeypatch):
    tiny_book(tmp_path, monkeypatch, LATER)
    with pytest.raises(later.LaterWorkError, match="'nope' is not a claim of any chapter registry"):
        later.later_for("nope")


def set_in(data, path, value):
    *head, last = path
    for k in head:
        data = data[k]
    if value is DELETE:
        del data[last]
    else:
        data[last] = value


DELETE = object()


@pytest.mark.parametrize("path, value, match", [
    (("claims", "no-such-claim"), [ENTRY], r"claim 'no-such-claim' is not a claim of any chapter registry"),
    (("claims", "c", 0, "relation"), "refutes", r"claim 'c', entry 1 \(doe2025later\): relation 'refutes' is not "
                                                r"one of supports, qualifies, contradicts"),
    (("papers", 0, "arxiv"), "2501.1234", r"paper 1 'doe2025later': arxiv '2501.1234' is not an arXiv id"),
    (("papers", 0, "arxiv"), 2501.0123, r"arxiv 2501.0123 is not an arXiv id .*quote it"),
    (("papers", 0, "arxiv"), "2501.01234v2", r"no version suffix"),
    (("claims", "c", 0, "paper"), "ghost2024", r"claim 'c', entry 1: paper 'ghost2024' is not in the papers list"),
    (("papers", 0, "read_where"), DELETE, r"paper 1 'doe2025later': missing read_where"),
    (("papers", 0, "read_where"), [], r"read_where must say where the paper's abstract or text was read"),
    (("papers", 0, "read_where"), [" "], r"read_where must be a non-empty string"),
    (("claims", "c", 0, "section"), "no-such-label", r"section 'no-such-label' is not a label"),
    (("claims", "c", 0, "finding"), "line one\nline two", r"finding must be one line"),
    (("claims", "c", 0, "finding"), "", r"finding must be a non-empty string"),
    (("claims", "c", 0, "relaton"), "supports", r"unknown keys relaton"),
    (("claims", "c", 0, "section"), DELETE, r"entry 1: missing section"),
    (("papers", 0, "year"), "2025", r"year '2025' must be a year"),
    (("papers", 0, "key"), "2025doe", r"key must be a BibTeX key"),
    (("claims", "c"), [], r"claim 'c': give a non-empty list"),
])
def test_a_malformed_entry_is_refused_naming_the_file_and_the_entry(tmp_path, monkeypatch, path, value, match):
    file = tiny_book(tmp_path, monkeypatch, changed(lambda d: set_in(d, path, value)))
    with pytest.raises(later.LaterWorkError, match=match) as err:
        later.load_later_work()
    assert str(file) in str(err.value)


def test_a_paper_listed_twice_or_unused_or_repeated_under_a_claim_is_refused(tmp_path, monkeypatch):
    twin = {**PAPER, "key": "doe2025twin"}
    file = tiny_book(tmp_path, monkeypatch, LATER)
    for edit, match in [
        (lambda d: d["papers"].append(copy.deepcopy(PAPER)), "paper 'doe2025later' is listed twice"),
        (lambda d: d["papers"].append(twin), "same arXiv id 2501.01234"),
        (lambda d: d["papers"].append({**twin, "arxiv": "2502.00001"}), "papers doe2025twin bear on no claim"),
        (lambda d: d["claims"]["c"].append(dict(ENTRY, relation="supports")), "claim 'c': a paper appears twice"),
    ]:
        file.write_text(yaml.safe_dump(changed(edit)))
        with pytest.raises(later.LaterWorkError, match=match):
            later.load_later_work(file)


def test_a_missing_or_shapeless_file_is_refused(tmp_path, monkeypatch):
    tiny_book(tmp_path, monkeypatch, None)
    with pytest.raises(later.LaterWorkError, match="later-work.yml is missing"):
        later.load_later_work()
    tiny_book(tmp_path / "b", monkeypatch, {"papers": []})
    with pytest.raises(later.LaterWorkError, match="exactly two keys, papers .* and claims"):
        later.load_later_work()


def test_an_edit_to_the_file_is_seen_by_the_next_load(tmp_path, monkeypatch):
    file = tiny_book(tmp_path, monkeypatch, LATER)
    assert later.later_for("c")[0].relation == "qualifies"
    file.write_text(yaml.safe_dump(changed(lambda d: set_in(d, ("claims", "c", 0, "relation"), "contradicts"))))
    assert later.later_for("c")[0].relation == "contradicts"


# --- the book's own file ---------------------------------------------------------------------------

@pytest.fixture
def book_later(monkeypatch):
    monkeypatch.setenv("PREFDYN_ROOT", str(REPO))
    return later.load_later_work()


def test_every_claim_of_the_books_file_is_a_registry_claim(book_later, monkeypatch):
    ids = {c.id for ch in ("ch01-rlhf-dpo-ipo", "ch02-dpo-dynamics", "ch03-dpo-generalization",
                           "ch04-ipo-sampling-iterative", "ch05-alignment-from-demonstrations")
           for c in registry.load_registry(ch).claims}
    assert set(book_later.claims) <= ids
    assert book_later.claim_ids == ids


def test_every_paper_of_the_books_file_is_referenced_and_was_read_somewhere(book_later):
    used = {f.paper.key for found in book_later.claims.values() for f in found}
    assert used == set(book_later.papers)
    for paper in book_later.papers.values():
        assert paper.read_where and all(re.search(r"https?://\S+", r) for r in paper.read_where), paper.key


def test_every_section_of_the_books_file_is_a_label_of_some_chapter(book_later):
    labels = set()
    for md in (REPO / "chapters").glob("*.md"):
        labels |= set(re.findall(r"^\(([\w.:-]+)\)=\s*$", md.read_text(), flags=re.MULTILINE))
    sections = {f.section for found in book_later.claims.values() for f in found if f.section}
    assert sections and sections <= labels


def test_the_references_page_carries_every_later_paper_once(book_later):
    bib = (REPO / "book" / "references.bib").read_text()
    keys = re.findall(r"^@\w+\{([^,\s]+),", bib, flags=re.MULTILINE)
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    assert set(book_later.papers) <= set(keys)
    for paper in book_later.papers.values():    # the bib entry names the same arXiv id
        entry = bib[bib.index("{" + paper.key + ","):].split("\n@", 1)[0]
        assert paper.arxiv in entry, paper.key


def test_every_paper_of_the_book_has_later_work(book_later):
    claims_of = {p: set() for p in BOOK_PAPERS}
    for ch in (REPO / "chapters" / "claims").glob("ch*.yml"):
        for c in registry.load_registry(ch.stem).claims:
            claims_of.setdefault(c.paper, set()).add(c.id)
    for paper in BOOK_PAPERS:
        assert claims_of[paper] & set(book_later.claims), paper


@pytest.mark.parametrize("text, ok", [("2410.08847", True), ("1412.6980", True), ("0704.0001", True),
                                      ("2410.0884", False), ("1412.69801", False), ("2413.00001", False),
                                      ("0612.1234", False), ("2410.08847v2", False), ("hep-th/9901001", False)])
def test_arxiv_ids_have_the_length_of_their_year(text, ok):
    assert later.is_arxiv_id(text) is ok
