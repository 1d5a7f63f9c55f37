"""Where a chapter's results live: the book's folder, the executed notebooks and the run records.

Only paths and JSON records, importing nothing of the book but :mod:`prefdyn.store`, so the
executor (:mod:`~prefdyn.book.execute`), the verification tables (:mod:`~prefdyn.book.verify`)
and the reproducibility report (:mod:`~prefdyn.book.report`) all read the same records:

* ``book/_executed/<id>.ipynb``, ``<id>.checks.json``, ``<id>.run.json``, ``<id>.key``: the last
  good run of each chapter, written by :func:`prefdyn.book.execute.run_chapter`;
* ``book/recorded/<id>.<scale>.json``: a run made elsewhere (at ``scale=full`` on a GPU), kept by
  :func:`record` with the hardware it ran on.

The chapter being executed learns its id from the executor through the environment
(:data:`CHAPTER_ENV`, :data:`CHECKS_ENV`), so no chapter types its own id or where its checks go.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..store import atomic_write_json

LIBRARY = Path(__file__).resolve().parents[1]
CHAPTER_ENV = "PREFDYN_CHAPTER"       # set by the executor: the id of the chapter being executed
CHECKS_ENV = "PREFDYN_CHECKS_PATH"    # set by the executor: where that chapter's checks JSON goes


class ChapterError(RuntimeError):
    """A chapter could not be run (unknown id, bad parameter, failed execution)."""


def root() -> Path:
    """The book's folder: ``$PREFDYN_ROOT``, else the current folder if it holds ``chapters/``, else the
    checkout this package was installed from in development mode."""
    if os.environ.get("PREFDYN_ROOT"):
        return Path(os.environ["PREFDYN_ROOT"]).resolve()
    if (Path.cwd() / "chapters").is_dir():
        return Path.cwd()
    return LIBRARY.parents[1]


def executed_dir() -> Path:
    return root() / "book" / "_executed"


def chapter_ids() -> list[str]:
    return sorted(p.stem for p in (root() / "chapters").glob("*.md"))


def chapter_source(chapter: str) -> Path:
    path = root() / "chapters" / f"{chapter}.md"
    if not path.is_file():
        raise ChapterError(f"unknown chapter {chapter!r}; `prefdyn list` shows: {', '.join(chapter_ids())}")
    return path


def current_chapter() -> str | None:
    """The id of the chapter this kernel executes (set by the executor), or ``None`` when a notebook
    is run by hand."""
    return os.environ.get(CHAPTER_ENV) or None


def current_checks_path() -> Path | None:
    """Where the executor wants this chapter's checks JSON, or ``None`` when run by hand."""
    return Path(os.environ[CHECKS_ENV]) if os.environ.get(CHECKS_ENV) else None


def paths(chapter: str) -> dict[str, Path]:
    out = executed_dir()
    return {"notebook": out / f"{chapter}.ipynb", "checks": out / f"{chapter}.checks.json",
            "key": out / f"{chapter}.key", "meta": out / f"{chapter}.run.json",
            "failed": out / f"{chapter}.failed.ipynb", "failed_checks": out / f"{chapter}.failed.checks.json"}


def load_checks(chapter: str) -> list[dict]:
    path = paths(chapter)["checks"]
    return json.loads(path.read_text()) if path.is_file() else []


def load_meta(chapter: str) -> dict | None:
    """The run record (``<id>.run.json``) of the chapter's last good run, if any."""
    path = paths(chapter)["meta"]
    return json.loads(path.read_text()) if path.is_file() else None


def recorded_path(chapter: str, scale: str = "full") -> Path:
    """Where a run made elsewhere (e.g. at ``scale=full`` on a GPU) is kept, committed with the book."""
    return root() / "book" / "recorded" / f"{chapter}.{scale}.json"


def record(chapter: str, source: Path, hardware: str) -> Path:
    """Keep the checks and run record that ``prefdyn run`` wrote into ``source`` (a folder brought
    back from another machine), with the hardware it ran on, as the chapter's recorded run."""
    checks = json.loads((source / f"{chapter}.checks.json").read_text())
    meta = json.loads((source / f"{chapter}.run.json").read_text())
    scale = meta["parameters"]["scale"]
    return atomic_write_json(recorded_path(chapter, scale), {**meta, "hardware": hardware, "checks": checks})


def load_recorded(chapter: str, scale: str = "full") -> dict | None:
    path = recorded_path(chapter, scale)
    return json.loads(path.read_text()) if path.is_file() else None


def summary(chapters: list[str] | None = None) -> str:
    """One line per chapter with the number of checks passed, then each failed check."""
    lines = []
    for chapter in chapters or chapter_ids():
        checks = load_checks(chapter)
        if not checks:
            lines.append(f"{chapter}: no results yet")
            continue
        passed = sum(c["passed"] for c in checks)
        lines.append(f"{chapter}: {passed}/{len(checks)} checks passed")
        lines += [f"    FAIL {c['claim']}: predicted {c['predicted']}, observed {c['observed']} ({c['tolerance']})"
                  for c in checks if not c["passed"]]
    return "\n".join(lines)
