import json
import math

import pytest
import torch

from prefdyn.book import runs
from prefdyn.book.verify import Verification, VerificationFailed
from prefdyn.params import Run


def test_close_passes_only_within_tolerance():
    v = Verification("t")
    assert v.close("a", 1.0, 1.0 + 5e-7, atol=1e-6).passed
    assert not v.close("b", 1.0, 1.0 + 2e-6, atol=1e-6).passed
    assert not v.close("nan never passes", 0.0, math.nan, atol=1e9).passed


def test_bounds_and_table_mark_failures():
    v = Verification("t")
    assert v.at_least("x", 0.3, 0.2).passed
    assert not v.at_least("y", 0.1, 0.2).passed
    assert v.at_most("z", 0.1, 0.2).passed
    assert not v.at_most("w", 0.3, 0.2).passed
    table = v.table()
    assert table.count("FAIL") == 2 and table.count("pass") == 2
    assert not v.passed


def test_finish_saves_json_where_the_executor_asks_then_raises_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    monkeypatch.setenv(runs.CHAPTER_ENV, "ch99-test")
    monkeypatch.setenv(runs.CHECKS_ENV, str(path))
    v = Verification()
    assert v.chapter == "ch99-test"                  # the id comes from the executor, not the chapter
    v.close("ok", 0.0, 0.0, atol=1e-9)
    v.at_least("bad", 0.0, 1.0)
    with pytest.raises(VerificationFailed, match="ch99-test: 1 check"):
        v.finish(Run("smoke", torch.device("cpu"), 0, {}))
    saved = json.loads(path.read_text())
    assert [c["passed"] for c in saved] == [True, False]
    assert set(saved[0]) == {"claim", "predicted", "observed", "tolerance", "passed"}


def test_finish_without_checks_fails_and_a_hand_run_writes_no_json(tmp_path, monkeypatch):
    monkeypatch.delenv(runs.CHECKS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VerificationFailed, match="no checks"):
        Verification("t").finish()
    v = Verification("t")
    v.close("ok", 0.0, 0.0, atol=1e-9)
    v.finish()
    assert list(tmp_path.iterdir()) == []
