import contextlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from prefdyn.book import build, execute
from prefdyn.llm import models

REPO = Path(__file__).resolve().parents[1]
# PREFDYN_TEST_CHAPTERS=ch01-rlhf-dpo-ipo,... limits the notebook tests to some chapters while one is written
CHAPTERS = [c for c in sorted(p.stem for p in (REPO / "chapters").glob("*.md"))
            if not os.environ.get("PREFDYN_TEST_CHAPTERS") or c in os.environ["PREFDYN_TEST_CHAPTERS"].split(",")]


MODEL_FIXTURES = {"smol", "book"}   # a test that uses one of these loads the real model or executes notebooks


def pytest_collection_modifyitems(items):
    """Mark every test that loads the model or runs notebooks as ``slow``, so ``make test-fast``
    (``-m "not slow"``) runs neither."""
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@contextlib.contextmanager
def restoring(model):
    """Run the block on the session's shared model, then put back its weights, make every weight
    trainable again (the state :func:`smol` hands out) and return it to eval mode."""
    saved = {k: v.detach().clone() for k, v in model.named_parameters()}
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(saved[k])
        model.requires_grad_(True)
        model.eval()


@pytest.fixture(scope="session")
def smol():
    """The real packaged SmolLM2-135M-Instruct, loaded once for the whole test session."""
    return models.load_policy("smollm2-135m", "cpu")


@pytest.fixture(scope="session")
def gemma():
    """The real packaged Gemma 3 270M (the pretrained base model, Q4_K_M), loaded once."""
    return models.load_policy("gemma3-270m", "cpu")


@pytest.fixture(params=["smol", "gemma"])
def packaged(request):
    """Each packaged model in turn, for the tests that must hold for every model family."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def book(tmp_path_factory):
    """Every chapter executed at scale=smoke in a copy of the book's folder, and the HTML built from them."""
    top = tmp_path_factory.mktemp("book")
    (top / "chapters").mkdir()
    for chapter in CHAPTERS:
        shutil.copy(REPO / "chapters" / f"{chapter}.md", top / "chapters")
    shutil.copytree(REPO / "chapters" / "claims", top / "chapters" / "claims")
    shutil.copytree(REPO / "book", top / "book", ignore=shutil.ignore_patterns("_build", "_executed", "_static"))
    shutil.copy(REPO / "_config.yml", top / "_config.yml")
    toc = top / "book" / "_toc.yml"  # without the chapters left out by PREFDYN_TEST_CHAPTERS
    toc.write_text("".join(line for line in toc.read_text().splitlines(keepends=True)
                           if "book/_executed/ch" not in line or line.split("/")[-1].strip() in CHAPTERS))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFDYN_ROOT", str(top))
        results = {c: execute.run_chapter(c, "smoke", "cpu") for c in CHAPTERS}
        html = build.build_book() if all(r.status != "failed" for r in results.values()) else None
        yield top, results, html
