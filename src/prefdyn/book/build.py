"""The HTML book, built from the executed notebooks by Jupyter Book (the build executes nothing).

MathJax is copied from a PyPI package into ``book/_static`` so that the pages typeset their
mathematics with no network, and the reproducibility report (:mod:`prefdyn.book.report`) and the
replication ledger (:mod:`prefdyn.book.ledger`) are written from the run records just before the build.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from .ledger import write_ledger_page
from .report import write_reproducibility_page
from .runs import ChapterError, chapter_ids, paths, root

MATHJAX_DIST = "django-static-mathjax"  # a PyPI package that ships MathJax 3 (es5 build); only its files are used
MATHJAX_PARTS = ("tex-mml-chtml.js", "input", "output", "ui", "a11y", "adaptors")


def stage_mathjax(top: Path) -> Path:
    """Copy MathJax from its PyPI package into ``book/_static/mathjax`` so the HTML typesets math
    with no network access (Sphinx's ``mathjax_path`` points there, not at a CDN)."""
    target = top / "book" / "_static" / "mathjax"
    if (target / MATHJAX_PARTS[0]).is_file():
        return target
    try:
        es5 = Path(metadata.distribution(MATHJAX_DIST).locate_file("mathjax/static/mathjax/es5"))
    except metadata.PackageNotFoundError as exc:
        raise ChapterError(f"MathJax is missing; install it with: pip install {MATHJAX_DIST}") from exc
    staging = target.with_name(".mathjax.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for part in MATHJAX_PARTS:
        (shutil.copy2 if (es5 / part).is_file() else shutil.copytree)(es5 / part, staging / part)
    os.replace(staging, target)
    return target


def build_book(log=print) -> Path:
    """Build the HTML book from the executed notebooks (the build itself executes nothing)."""
    missing = [c for c in chapter_ids() if not paths(c)["notebook"].is_file()]
    if missing:
        raise ChapterError(f"chapter(s) {missing} have not been executed; run `prefdyn run <id>` "
                           "(or `make book`) first")
    top = root()
    stage_mathjax(top)
    write_reproducibility_page()
    write_ledger_page()
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(top), "--config", str(top / "_config.yml"),
           "--toc", str(top / "book" / "_toc.yml"), "--path-output", str(top / "book"), "-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log(proc.stdout[-6000:] + proc.stderr[-6000:])
        raise ChapterError("the book build failed (warnings are errors); see the log above")
    return top / "book" / "_build" / "html" / "index.html"
