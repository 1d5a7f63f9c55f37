"""Where a chapter's results live: the book's folder, the executed notebooks and the run records.

Only paths and JSON records, importing nothing of the book but :mod:`prefdyn.store`, so the
executor (:mod:`~prefdyn.book.execute`), the verification tables (:mod:`~prefdyn.book.verify`)
and the reproducibility report (:mod:`~prefdyn.book.report`) all read the same records:

* ``book/_executed/<id>.ipynb``, ``<id>.checks.json``, ``<id>.run.json``, ``<id>.key``: the last
  good run of each chapter, written by :func:`prefdyn.book.execute.run_chapter`;
* ``book/recorded/<id>/<label>.json``: a finished run kept by :func:`record` (``prefdyn record``):
  any scale, device, model or data set, with its hardware and the git revision that produced it.

The chapter being executed learns its id from the executor through the environment
(:data:`CHAPTER_ENV`, :data:`CHECKS_ENV`), so no chapter types its own id or where its checks go.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..store import atomic_write_json

LIBRARY = Path(__file__).resolve().parents[1]
CHAPTER_ENV = "PREFDYN_CHAPTER"       # set by the executor: the id of the chapter being executed
CHECKS_ENV = "PREFDYN_CHECKS_PATH"    # set by the executor: where that chapter's checks JSON goes
PARAMETERS_ENV = "PREFDYN_PARAMETERS"  # set by the executor: the run's every parameter, as JSON


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


BOOK_SKELETON = ("_config.yml", "chapters", "book")   # what a book folder holds besides its results
NOT_COPIED = shutil.ignore_patterns("_build", "_executed", "_static", "*.ipynb", ".*")


def stage_book(target: Path) -> Path:
    """Make ``target`` a book folder of its own — the chapters, their registries, the book's pages and
    recorded runs, copied from this book once — so that ``prefdyn run --out target`` writes a
    reader's runs there (not into this book's ``book/_executed``) and ``prefdyn book --from target``
    builds a book from them beside the shipped one. An existing book folder is used as it is."""
    target = Path(target).expanduser().resolve()
    if (target / "chapters").is_dir() or target == root():
        return target
    if target.exists() and any(target.iterdir()):
        raise ChapterError(f"{target} is neither empty nor a book folder; give --out a new or empty folder")
    staging = target.with_name(f".{target.name}.partial")   # copied whole, then renamed: never half a book
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in BOOK_SKELETON:
        source = root() / name
        if source.is_dir():
            shutil.copytree(source, staging / name, ignore=NOT_COPIED)
        else:
            shutil.copy2(source, staging / name)
    if target.exists():
        target.rmdir()
    os.replace(staging, target)
    return target


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


def current_parameters() -> dict | None:
    """Every parameter of the run this kernel executes (given or default), or ``None`` by hand."""
    return json.loads(os.environ[PARAMETERS_ENV]) if os.environ.get(PARAMETERS_ENV) else None


def paths(chapter: str) -> dict[str, Path]:
    out = executed_dir()
    return {"notebook": out / f"{chapter}.ipynb", "checks": out / f"{chapter}.checks.json",
            "key": out / f"{chapter}.key", "meta": out / f"{chapter}.run.json",
            "failed": out / f"{chapter}.failed.ipynb", "failed_checks": out / f"{chapter}.failed.checks.json"}


def normalise_checks(data) -> dict:
    """A checks JSON, or a recorded run, as :class:`~prefdyn.book.verify.Verification` writes it
    (``{"checks", "reported", ...}``); checks from before checks had kinds (a bare list, or a record
    whose checks carry no ``kind``) read as ``unclassified`` and the record is marked ``legacy``."""
    record = data if isinstance(data, dict) else {"checks": data}
    if not record["checks"] or "kind" in record["checks"][0]:
        return record
    return {"reported": [], **record, "legacy": True,
            "checks": [{**c, "kind": "unclassified", "status": "pass" if c["passed"] else "FAIL",
                        "prediction": None} for c in record["checks"]]}


DATA_PARAMETERS = ("data_dir", "demos_path", "scores_path")   # the chapters' parameters that name their data


def run_identity(meta: dict) -> dict:
    """The model and data set of a run, from its run record: the parameters it was given, else the
    chapter's defaults (kept as source text, so a string default loses its quotes). The data is the
    first data parameter given (:data:`DATA_PARAMETERS`); ``None`` means the book's own data."""
    params, defaults = meta.get("parameters", {}), meta.get("defaults", {})
    model = params.get("model") or defaults.get("model")
    data = next((params[k] for k in DATA_PARAMETERS if params.get(k)), None)
    return {"model": model.strip('"') if isinstance(model, str) else model, "data": data}


def data_checksum(path: Path) -> str:
    """SHA-256 of a data file, or of a folder's files (their relative paths and contents, in sorted
    order): what a recorded run keeps of the data it read from outside the package."""
    import hashlib

    path = Path(path).expanduser()
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def is_failure(check: dict) -> bool:
    """A check that failed and is not a prediction (an identity, a bound, or a legacy check): a bug,
    which fails the notebook. A failed prediction is a result."""
    return check["kind"] != "prediction" and not check["passed"]


def load_checks(chapter: str) -> dict:
    """The checks and reported values of the chapter's last good run (empty if none)."""
    path = paths(chapter)["checks"]
    return normalise_checks(json.loads(path.read_text())) if path.is_file() else {"checks": [], "reported": []}


def load_meta(chapter: str) -> dict | None:
    """The run record (``<id>.run.json``) of the chapter's last good run, if any."""
    path = paths(chapter)["meta"]
    return json.loads(path.read_text()) if path.is_file() else None


def recorded_dir(chapter: str) -> Path:
    return root() / "book" / "recorded" / chapter


def record(chapter: str, label: str, source: Path | None = None, hardware: str | None = None,
           data: str | None = None, allow_dirty: bool = False) -> Path:
    """Keep the finished run whose ``<id>.checks.json`` and ``<id>.run.json`` are in ``source``
    (default: this checkout's ``book/_executed``; or a folder brought back from another machine) as
    ``book/recorded/<id>/<label>.json``, with its hardware, model, data and git revision.

    A run whose git revision is unknown or made from a tree with uncommitted changes is refused
    unless ``allow_dirty``, and then marked ``dirty``: a recorded run must name the code that made it.
    """
    if not label or not all(ch.isalnum() or ch in "-_." for ch in label):
        raise ChapterError(f"label {label!r}: use letters, digits, '-', '_' or '.' (e.g. ci-original-data)")
    chapter_source(chapter)
    source = Path(source) if source is not None else executed_dir()
    files = {k: source / f"{chapter}.{k}.json" for k in ("checks", "run")}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise ChapterError(f"no finished run of {chapter} in {source} (missing {', '.join(missing)}); "
                           f"run it first: prefdyn run {chapter}")
    checks = normalise_checks(json.loads(files["checks"].read_text()))
    meta = json.loads(files["run"].read_text())
    git = meta.get("git")
    dirty = git is None or git.endswith("+dirty")
    if dirty and not allow_dirty:
        raise ChapterError(f"the run of {chapter} was made from "
                           f"{'an unknown revision' if git is None else 'a tree with uncommitted changes'} "
                           f"({git}); commit and rerun it, or pass --allow-dirty to record it marked as such")
    sums = {k: data_checksum(Path(str(v))) for k, v in meta.get("parameters", {}).items()
            if k in DATA_PARAMETERS and v and Path(str(v)).expanduser().exists()}
    entry = {**meta, **checks, "label": label, "dirty": dirty, "hardware": hardware or meta.get("hardware"),
             "data": data or run_identity(meta)["data"], **({"data_sha256": sums} if sums else {})}
    return atomic_write_json(recorded_dir(chapter) / f"{label}.json", entry)


def load_recorded_runs(chapter: str) -> list[dict]:
    """Every recorded run of the chapter, by label, with its model read from its run record."""
    out = []
    for path in sorted(recorded_dir(chapter).glob("*.json")):
        rec = normalise_checks(json.loads(path.read_text()))
        out.append({**rec, "model": run_identity(rec)["model"], "label": rec.get("label", path.stem)})
    return out
