"""A run against a recorded one: the comparison, its table, and `prefdyn reproduce` end to end."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from prefdyn.book import reproduce, runs
from prefdyn.book.reproduce import Difference, close, compare, difference_table


def run_of(observed=0.5, status="reproduced", value=1.25, n=12):
    return {"checks": [{"kind": "identity", "claim": "exact", "predicted": 0.0, "observed": 0.0, "passed": True,
                        "status": "pass", "prediction": None},
                       {"kind": "prediction", "claim": "rho", "predicted": "effect 0.8", "observed": observed,
                        "passed": observed >= 0.4, "status": status,
                        "prediction": {"id": "rho", "n": n, "power": 0.9, "false_pass": 0.01, "control": None}}],
            "reported": [{"name": "acc", "value": value, "interval": [1.0, 1.5], "description": ""},
                         {"name": "word", "value": "rises", "interval": None, "description": ""}]}


def test_close_is_exact_for_integers_words_and_verdicts_and_relative_for_floats():
    assert close(1.0, 1.0 + 0.5 * reproduce.RTOL) and not close(1.0, 1.0 + 3 * (reproduce.RTOL + reproduce.ATOL))
    assert close(0.0, reproduce.ATOL / 2) and not close(0.0, 2 * reproduce.ATOL)
    assert close(math.nan, math.nan) and not close(math.nan, 0.0) and not close(math.inf, 1e308)
    assert not close(3, 4) and not close("reproduced", "not reproduced") and not close(True, False)
    assert close({"a": [1.0, 2]}, {"a": [1.0 + 1e-9, 2]}) and not close({"a": 1}, {"b": 1}) and not close([1], [1, 2])


def test_compare_finds_moved_numbers_changed_verdicts_and_missing_rows():
    assert compare(run_of(), run_of()) == []
    moved = compare(run_of(), run_of(observed=0.3, status="not reproduced", value=1.3))
    assert {(d.row, d.field) for d in moved} == {("check: rho", "observed"), ("check: rho", "passed"),
                                                 ("check: rho", "status"), ("reported: acc", "value")}
    assert [d.verdict for d in moved].count(True) == 1
    fewer = run_of()
    fewer["reported"].pop()
    assert compare(run_of(), fewer) == [Difference("reported: word", "row", "present", "absent")]
    table = difference_table(moved)
    assert table.startswith("4 differences beyond the tolerance") and "1 of them changed verdicts" in table
    assert table.splitlines()[4].startswith("| check: rho | status | reproduced | not reproduced |")
    assert difference_table([]).startswith("Every check and reported value agrees")


def test_an_identity_is_held_to_its_result_not_to_its_rounding_residual():
    residual = run_of()
    residual["checks"][0]["observed"] = 2.5e-5          # float32 rounding on another processor: still a pass
    assert compare(run_of(), residual) == []
    broken = run_of()
    broken["checks"][0].update(observed=0.5, passed=False, status="fail")
    assert {(d.row, d.field) for d in compare(run_of(), broken)} == {("check: exact", "passed"),
                                                                     ("check: exact", "status")}


def test_reproduce_parameters_are_the_records_not_todays_defaults():
    record = {"parameters": {"scale": "ci", "model": "gemma3-270m"},
              "defaults": {"seed": "0", "data_dir": "None", "beta": "0.1", "model": '"smollm2-135m"',
                           "behaviours": '["a", "b"]'}}
    assert reproduce.reproduce_parameters(record) == {"seed": 0, "data_dir": None, "beta": 0.1, "model": "gemma3-270m",
                                                      "behaviours": ["a", "b"], "scale": "ci"}


CHAPTER = '''---
jupytext:
  text_representation: {extension: .md, format_name: myst}
kernelspec: {display_name: Python 3, language: python, name: python3}
---
# A chapter

```{code-cell} ipython3
:tags: [parameters]
scale = "ci"
device = "cpu"
seed = 0
model = "none"
x = 1.0
```

```{code-cell} ipython3
import numpy as np
from prefdyn.book.verify import Verification
from prefdyn.stats import bootstrap_mean_ci
verify = Verification(scale=scale)
values = np.random.default_rng(seed).normal(loc=x, size=30)
verify.close("exact", 0.0, 0.0, atol=1e-9, kind="identity")
verify.report("mean_lo", bootstrap_mean_ci(values, seed=seed)[1])
verify.finish()
```
'''


@pytest.fixture
def tiny_book(tmp_path):
    """A committed book with one tiny chapter (no model) and a recorded run of it at x = 2."""
    top = tmp_path / "tiny"
    (top / "chapters" / "claims").mkdir(parents=True)
    (top / "chapters" / "chx.md").write_text(CHAPTER)
    (top / "chapters" / "claims" / "papers.yml").write_text(yaml.safe_dump({}))
    (top / "chapters" / "claims" / "chx.yml").write_text(yaml.safe_dump({"claims": [], "predictions": {}}))
    (top / "_config.yml").write_text("title: t\n")
    (top / "book").mkdir()
    git = ["git", "-C", str(top), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "book"], check=True)
    env = {**os.environ, "PREFDYN_ROOT": str(top)}
    ran = subprocess.run([sys.executable, "-m", "prefdyn", "run", "chx", "--scale", "smoke", "-p", "x", "2.0"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert ran.returncode == 0, ran.stderr
    recorded = subprocess.run([sys.executable, "-m", "prefdyn", "record", "chx", "--label", "ci-x"],
                              capture_output=True, text=True, timeout=60, env=env)
    assert recorded.returncode == 0, recorded.stderr
    return top, env


def reproduce_cli(top, env, *extra, pythonpath=None):
    env = {**env, **({"PYTHONPATH": pythonpath + os.pathsep + env.get("PYTHONPATH", "")} if pythonpath else {})}
    return subprocess.run([sys.executable, "-m", "prefdyn", "reproduce", "chx", "ci-x",
                           "--out", str(top.parent / f"out{len(list(top.parent.iterdir()))}"), *extra],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_prefdyn_reproduce_reruns_a_record_and_a_perturbed_library_function_fails_it(tiny_book, tmp_path):
    top, env = tiny_book
    ok = reproduce_cli(top, env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "prefdyn run chx --scale smoke" in ok.stdout and "-p x 2.0" in ok.stdout
    assert "agrees with the recorded run" in ok.stdout
    # the same code with one library function perturbed by 1%: the comparison must catch it
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(textwrap.dedent("""
        import prefdyn.stats as s
        _real = s.bootstrap_mean_ci
        s.bootstrap_mean_ci = lambda *a, **k: tuple(1.01 * v for v in _real(*a, **k))
    """))
    bad = reproduce_cli(top, env, pythonpath=str(shim))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "| reported: mean_lo | value |" in bad.stdout
    # a record made by code this checkout does not descend from is refused before any work
    path = top / "book" / "recorded" / "chx" / "ci-x.json"
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "git": "0000000"}))
    refused = reproduce_cli(top, env)
    assert refused.returncode == 2 and "not an ancestor of this checkout" in refused.stderr


def test_a_record_of_data_outside_the_package_needs_the_readers_copy_with_the_same_checksum(tmp_path):
    data = tmp_path / "persona"
    data.mkdir()
    (data / "a.jsonl").write_text('{"x": 1}\n')
    record = {"parameters": {"data_dir": str(tmp_path / "gone")}, "data_sha256": {"data_dir": runs.data_checksum(data)}}
    with pytest.raises(runs.ChapterError, match="not on this machine; pass your copy"):
        reproduce.check_data(record, dict(record["parameters"]), {})
    params = dict(record["parameters"])
    assert reproduce.check_data(record, params, {"data_dir": str(data)}) == [
        f"data_dir: checksum matches the record ({record['data_sha256']['data_dir'][:12]}…)"]
    assert params["data_dir"] == str(data)
    (data / "a.jsonl").write_text('{"x": 2}\n')
    with pytest.raises(runs.ChapterError, match="is not the recorded run's"):
        reproduce.check_data(record, dict(record["parameters"]), {"data_dir": str(data)})
