"""Later work on the papers' claims: what other papers found about each claim since it was made.

``chapters/claims/later-work.yml`` holds

* ``papers``: each later paper once — ``key`` (its BibTeX key in ``book/references.bib``, so the
  references page carries it), ``arxiv`` (its arXiv id, ``YYMM.NNNNN``), ``title``, ``authors``,
  ``year``, ``venue`` (``null`` where none was read) and ``read_where``: where its abstract or text
  was read (the addresses of the copies), because the book states only what it has read;
* ``claims``: for a claim id of a chapter registry (:mod:`prefdyn.book.registry`), a list of
  ``{paper, relation, finding, section, note}``: the paper's key, how its finding bears on the claim
  (``supports``, ``qualifies`` or ``contradicts``), the finding in one line in the book's own words,
  the MyST label of the book's section that tests that finding (``null`` where none does) and an
  optional note.

:func:`load_later_work` reads and checks the file (every claim id in a registry, every paper listed
once with where it was read and referred to by some claim, every section label defined in a
chapter); :func:`later_for` gives a claim's entries. The replication ledger shows them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from .registry import RegistryError, claims_dir, load_registry, registry_path
from .runs import chapter_ids, root

RELATIONS = ("supports", "qualifies", "contradicts")
ARXIV_ID = re.compile(r"(\d{2})(\d{2})\.(\d{4,5})")      # new-style arXiv id YYMM.NNNN(N), no version
KEY = re.compile(r"[A-Za-z][A-Za-z0-9_:-]*")            # a BibTeX key
LABEL = re.compile(r"^\(([A-Za-z0-9][\w.:-]*)\)=\s*$", re.MULTILINE)   # a MyST target, `(ch2-rate)=`
PAPER_KEYS = ("key", "arxiv", "title", "authors", "year", "venue", "read_where")
ENTRY_KEYS = ("paper", "relation", "finding", "section")
OPTIONAL_ENTRY_KEYS = ("note",)


class LaterWorkError(RegistryError):
    """``later-work.yml`` is malformed or refers to a claim, paper or section that does not exist."""


@dataclass(frozen=True)
class LaterPaper:
    key: str
    arxiv: str
    title: str
    authors: str
    year: int
    venue: str | None
    read_where: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv}"


@dataclass(frozen=True)
class Later:
    """What one later paper found about one claim."""

    claim: str
    paper: LaterPaper
    relation: str
    finding: str
    section: str | None
    note: str = ""


@dataclass(frozen=True)
class LaterWork:
    papers: dict            # key -> LaterPaper, in the file's order
    claims: dict            # claim id -> tuple[Later, ...], in the file's order
    claim_ids: frozenset    # every claim id of the chapters' registries

    def later_for(self, claim_id: str) -> tuple[Later, ...]:
        if claim_id not in self.claim_ids:
            raise LaterWorkError(f"{claim_id!r} is not a claim of any chapter registry "
                                 f"({claims_dir()}/<chapter>.yml)")
        return self.claims.get(claim_id, ())


def later_work_path() -> Path:
    return claims_dir() / "later-work.yml"


def section_labels() -> set[str]:
    """Every MyST target, ``(label)=``, defined in a chapter."""
    return {m for c in chapter_ids() for m in LABEL.findall((root() / "chapters" / f"{c}.md").read_text())}


def registry_claim_ids() -> frozenset:
    """The ids of the claims of every chapter that has a registry."""
    return frozenset(c.id for ch in chapter_ids() if registry_path(ch).is_file() for c in load_registry(ch).claims)


def is_arxiv_id(text: str) -> bool:
    """``YYMM.NNNNN`` (from 2015) or ``YYMM.NNNN`` (2007-2014), month 01-12, no version suffix."""
    m = ARXIV_ID.fullmatch(text)
    if not m:
        return False
    yy, mm, number = int(m[1]), int(m[2]), m[3]
    return yy >= 7 and 1 <= mm <= 12 and len(number) == (4 if yy < 15 else 5)


def _text(value, where: str, key: str, one_line: bool = True) -> str:
    if not isinstance(value, str) or not value.strip():
        raise LaterWorkError(f"{where}: {key} must be a non-empty string, not {value!r}")
    if one_line and "\n" in value.strip():
        raise LaterWorkError(f"{where}: {key} must be one line")
    return value.strip()


def _keys(entry, required: tuple, optional: tuple, where: str) -> None:
    if not isinstance(entry, dict):
        raise LaterWorkError(f"{where}: must be a mapping with the keys {', '.join(required)}")
    missing = [k for k in required if k not in entry]
    if missing:
        raise LaterWorkError(f"{where}: missing {', '.join(missing)}")
    unknown = [k for k in entry if k not in required + optional]
    if unknown:
        raise LaterWorkError(f"{where}: unknown keys {', '.join(map(str, unknown))} (allowed: "
                             f"{', '.join(required + optional)})")


def parse_paper(entry, where: str) -> LaterPaper:
    if isinstance(entry, dict) and isinstance(entry.get("key"), str):
        where = f"{where} {entry['key'].strip()!r}"
    _keys(entry, PAPER_KEYS, (), where)
    key = _text(entry["key"], where, "key")
    if not KEY.fullmatch(key):
        raise LaterWorkError(f"{where}: key must be a BibTeX key (letters, digits, _ : -, starting with a letter)")
    arxiv = entry["arxiv"].strip() if isinstance(entry["arxiv"], str) else None
    if arxiv is None or not is_arxiv_id(arxiv):
        raise LaterWorkError(f"{where}: arxiv {entry['arxiv']!r} is not an arXiv id of the form YYMM.NNNNN "
                             f"(quote it, \"2410.08847\", so YAML keeps it a string; no version suffix)")
    year = entry["year"]
    if isinstance(year, bool) or not isinstance(year, int) or not 1900 < year < 2200:
        raise LaterWorkError(f"{where}: year {year!r} must be a year such as 2024")
    venue = entry["venue"]
    if venue is not None:
        venue = _text(venue, where, "venue")
    read = entry["read_where"]
    read = [read] if isinstance(read, str) else read
    if not isinstance(read, list) or not read:
        raise LaterWorkError(f"{where}: read_where must say where the paper's abstract or text was read "
                             f"(an address, or a list of them)")
    return LaterPaper(key, arxiv, _text(entry["title"], where, "title"), _text(entry["authors"], where, "authors"),
                      year, venue, tuple(_text(r, where, "read_where") for r in read))


def parse_later_work(data, where: str, claim_ids, labels) -> LaterWork:
    """Check ``data`` (the parsed ``later-work.yml``, named ``where`` in errors) against the registries'
    claim ids and the chapters' section labels."""
    if not isinstance(data, dict) or set(data) != {"papers", "claims"}:
        raise LaterWorkError(f"{where}: must hold exactly two keys, papers (a list) and claims (a mapping)")
    if not isinstance(data["papers"], list) or not isinstance(data["claims"], dict):
        raise LaterWorkError(f"{where}: papers must be a list and claims a mapping from claim id to a list")
    papers: dict[str, LaterPaper] = {}
    for i, entry in enumerate(data["papers"]):
        paper = parse_paper(entry, f"{where}: paper {i + 1}")
        if paper.key in papers:
            raise LaterWorkError(f"{where}: paper {paper.key!r} is listed twice")
        arxiv_twin = next((p.key for p in papers.values() if p.arxiv == paper.arxiv), None)
        if arxiv_twin:
            raise LaterWorkError(f"{where}: papers {arxiv_twin!r} and {paper.key!r} have the same arXiv id "
                                 f"{paper.arxiv}")
        papers[paper.key] = paper
    claims: dict[str, tuple[Later, ...]] = {}
    for claim, entries in data["claims"].items():
        cw = f"{where}: claim {claim!r}"
        if claim not in claim_ids:
            raise LaterWorkError(f"{cw} is not a claim of any chapter registry (chapters/claims/<chapter>.yml)")
        if not isinstance(entries, list) or not entries:
            raise LaterWorkError(f"{cw}: give a non-empty list of {{paper, relation, finding, section}}")
        found = []
        for j, entry in enumerate(entries):
            ew = f"{cw}, entry {j + 1}"
            _keys(entry, ENTRY_KEYS, OPTIONAL_ENTRY_KEYS, ew)
            key = entry["paper"]
            if not isinstance(key, str) or key not in papers:
                raise LaterWorkError(f"{ew}: paper {key!r} is not in the papers list of {where}; add it there "
                                     f"(key, arxiv, title, authors, year, venue, read_where)")
            ew = f"{cw}, entry {j + 1} ({key})"
            if entry["relation"] not in RELATIONS:
                raise LaterWorkError(f"{ew}: relation {entry['relation']!r} is not one of {', '.join(RELATIONS)}")
            section = entry["section"]
            if section is not None and (not isinstance(section, str) or section not in labels):
                raise LaterWorkError(f"{ew}: section {section!r} is not a label, (label)=, of any chapter; "
                                     f"name one that tests the finding, or null")
            note = _text(entry["note"], ew, "note") if entry.get("note") is not None else ""
            found.append(Later(claim, papers[key], entry["relation"], _text(entry["finding"], ew, "finding"),
                               section, note))
        if len({f.paper.key for f in found}) < len(found):
            raise LaterWorkError(f"{cw}: a paper appears twice; say all it found about the claim in one entry")
        claims[claim] = tuple(found)
    used = {f.paper.key for found in claims.values() for f in found}
    unused = [k for k in papers if k not in used]
    if unused:
        raise LaterWorkError(f"{where}: papers {', '.join(unused)} bear on no claim; refer to them or remove them")
    return LaterWork(papers, claims, frozenset(claim_ids))


def _stamp(path: Path) -> tuple:
    """What the result of :func:`load_later_work` depends on: the file's text, the registries' and
    the chapters' modification times."""
    files = [registry_path(c) for c in chapter_ids()] + [root() / "chapters" / f"{c}.md" for c in chapter_ids()]
    return (path.read_bytes(),) + tuple((str(f), f.stat().st_mtime_ns if f.is_file() else None) for f in files)


def load_later_work(path: Path | None = None) -> LaterWork:
    """The book's later work, checked; raises :class:`LaterWorkError` naming the file and the entry."""
    path = Path(path) if path is not None else later_work_path()
    if not path.is_file():
        raise LaterWorkError(f"{path} is missing: it lists the later papers bearing on the claims "
                             f"(see prefdyn.book.later)")
    return _load(str(path), _stamp(path))


@lru_cache(maxsize=4)
def _load(path: str, stamp: tuple) -> LaterWork:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise LaterWorkError(f"{path}: not valid YAML ({err})") from None
    return parse_later_work(data, path, registry_claim_ids(), section_labels())


def later_for(claim_id: str) -> tuple[Later, ...]:
    """The later work bearing on ``claim_id`` (empty if none); an id of no registry raises."""
    return load_later_work().later_for(claim_id)
