"""Verification: kinds, registered predictions with power, reported values, recorded runs, the ledger."""
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import spearmanr

from prefdyn.book import ledger, registry, runs
from prefdyn.book.verify import Verification, VerificationFailed, runs_table, summary_line
from prefdyn.params import Run
from prefdyn.stats import (MeanWorld, ProportionWorld, SpearmanWorld, bootstrap_mean_ci, mean_lower_bounds,
                           pass_probability, simulated_pass_rate, spearman_lower_bound, world_from_json)

PAPERS = {"p1": {"title": "Paper One", "authors": "A and B", "venue": "V", "arxiv": "0000.00000", "readable": "all"}}
PREDICTION = {"claim": "x correlates with y", "statistic": "Spearman(x, y)", "test": "spearman",
              "passes_if": ">= 0.6", "n": {"smoke": 4, "ci": 12, "full": 30}, "units": "behaviours",
              "effect": 0.8, "effect_source": "stated minimal effect", "no_effect": 0.0,
              "null_world": "y is unrelated to x: the run's y values paired with x at random",
              "control": {"claim": "training moved y", "statistic": "mean |Δy|", "passes_if": ">= 0.5"},
              "independence": "behaviours are trained separately"}


def world(n: int):
    """The units of a run: n behaviours whose y rises with x."""
    return SpearmanWorld(np.arange(n, dtype=float), np.arange(n, dtype=float))


def book(tmp_path, monkeypatch, chapters=("cha",), predictions=None, claims=None):
    """A book folder with chapters, papers.yml and one registry per chapter."""
    monkeypatch.setenv("PREFDYN_ROOT", str(tmp_path))
    (tmp_path / "chapters" / "claims").mkdir(parents=True)
    (tmp_path / "chapters" / "claims" / "papers.yml").write_text(yaml.safe_dump(PAPERS))
    for chapter in chapters:
        (tmp_path / "chapters" / f"{chapter}.md").write_text(f"---\n---\n# Title of {chapter}\n")
        reg = {"predictions": predictions if predictions is not None else {"rho": PREDICTION},
               "claims": claims if claims is not None else [
                   {"id": "c", "paper": "p1", "where": "Thm 1", "claim": "x drives y", "status": "reconstructed",
                    "section": "sec", "predictions": ["rho"]}]}
        (tmp_path / "chapters" / "claims" / f"{chapter}.yml").write_text(yaml.safe_dump(reg, allow_unicode=True))
    return tmp_path


# --- operating characteristics against brute force ---------------------------------------------------

def test_proportion_power_is_the_binomial_tail_and_matches_simulation():
    rng = np.random.default_rng(1)
    k = rng.binomial(20, 0.85, size=200_000)
    assert pass_probability("proportion", 20, 0.85, ">=", 0.9) == pytest.approx(np.mean(k / 20 >= 0.9), abs=0.005)
    phat = k / 20
    lower = phat - 1.959963984540054 * np.sqrt(phat * (1 - phat) / 20)
    assert pass_probability("proportion_lower_bound", 20, 0.85, ">", 0.5) == pytest.approx(np.mean(lower > 0.5),
                                                                                          abs=0.005)


def test_mean_lower_bound_power_matches_the_bootstrap_it_models():
    """The closed form (a noncentral t) against the chapters' own percentile bootstrap on normal data."""
    rng = np.random.default_rng(2)
    for d, n in ((0.4, 30), (0.0, 30)):
        hits = [bootstrap_mean_ci(rng.normal(d, 1.0, n), n_boot=400, seed=i)[1] > 0 for i in range(600)]
        assert pass_probability("mean_lower_bound", n, d, ">", 0.0) == pytest.approx(np.mean(hits), abs=0.06)


def test_spearman_power_matches_scipy_on_the_same_model():
    rng = np.random.default_rng(3)
    r = 2 * np.sin(np.pi * 0.7 / 6)
    hits = []
    for _ in range(3000):
        x = rng.standard_normal(10)
        hits.append(spearmanr(x, r * x + np.sqrt(1 - r * r) * rng.standard_normal(10))[0] >= 0.6)
    assert pass_probability("spearman", 10, 0.7, ">=", 0.6) == pytest.approx(np.mean(hits), abs=0.04)
    assert pass_probability("spearman", 10, 0.0, ">=", 0.6) < 0.05


def test_spearman_lower_bound_agrees_with_the_fisher_z_approximation():
    """Against Bonett and Wright's Fisher-z interval for Spearman's rho, se = sqrt((1 + rho²/2)/(n - 3))."""
    from scipy.stats import norm

    assert pass_probability("spearman_lower_bound", 20, 0.0, ">", 0.0) < 0.06
    for n in (12, 24, 40):
        se = math.sqrt((1 + 0.6 ** 2 / 2) / (n - 3))
        approx = norm.cdf(math.atanh(0.6) / se - 1.959963984540054)
        assert pass_probability("spearman_lower_bound", n, 0.6, ">", 0.0) == pytest.approx(approx, abs=0.06)


def test_spearman_lower_bound_resamples_the_units():
    rng = np.random.default_rng(1)
    x = rng.normal(size=9)
    y = x + rng.normal(size=9)
    y[3] = y[4]                                                   # a tie in the data too
    draw = np.random.default_rng(7).integers(0, 9, size=(50, 9))  # the same resamples, by hand
    rho = [spearmanr(x[i], y[i]).statistic for i in draw]
    assert spearman_lower_bound(x, y, seed=7, n_boot=50) == pytest.approx(np.nanquantile(rho, 0.025), abs=1e-12)
    assert spearman_lower_bound(x, x, seed=0) == pytest.approx(1.0)          # every resample ranks alike
    assert spearman_lower_bound(x, -x, seed=0) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        spearman_lower_bound(x, y[:5], seed=0)


@pytest.mark.parametrize("args, match", [
    (("median", 10, 0.5, ">", 0), "unknown test"), (("proportion", 10, 1.5, ">", 0), r"\[0, 1\]"),
    (("spearman", 1, 0.5, ">", 0), "at least 2"), (("spearman", 10, 0.5, "!=", 0), "comparison"),
])
def test_pass_probability_refuses_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        pass_probability(*args)


# --- the registry ------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    ({"test": "median"}, "test 'median'"), ({"passes_if": "at least 0.6"}, "passes_if"),
    ({"n": {"smoke": 3, "ci": 12}}, "each of smoke, ci, full"), ({"no_effect": None}, "missing no_effect"),
    ({"control": {"claim": "c", "passes_if": ">= 1"}}, "control must have exactly the keys"),
    ({"control": {"claim": "c", "statistic": "s", "passes_if": "big"}}, "control.passes_if 'big'"),
    ({"implied_by": {"identity": "i", "regime": "r", "implied_if": ">= x"}}, "'x' is not a number"),
    ({"version": 2}, "give its `reason:`"), ({"version": 0}, "version 0"),
])
def test_a_malformed_prediction_is_refused_naming_the_fix(tmp_path, monkeypatch, change, match):
    entry = {k: v for k, v in {**PREDICTION, **change}.items() if v is not None}
    book(tmp_path, monkeypatch, predictions={"rho": entry})
    with pytest.raises(registry.RegistryError, match=match):
        registry.load_registry("cha")


def test_yaml_null_key_is_explained(tmp_path, monkeypatch):
    book(tmp_path, monkeypatch)
    path = tmp_path / "chapters" / "claims" / "cha.yml"
    path.write_text(path.read_text().replace("no_effect:", "null:"))
    with pytest.raises(registry.RegistryError, match="write the no-effect value as `no_effect:`"):
        registry.load_registry("cha")


@pytest.mark.parametrize("change, match", [
    ({"paper": "p9"}, "paper 'p9'"), ({"status": "proved"}, "status 'proved'"),
    ({"status": "not tested"}, "says why"), ({"predictions": ["nope"]}, "not registered"),
])
def test_a_malformed_claim_is_refused(tmp_path, monkeypatch, change, match):
    claim = {"id": "c", "paper": "p1", "where": "Thm 1", "claim": "x", "status": "derived", "section": "s", **change}
    book(tmp_path, monkeypatch, claims=[claim])
    with pytest.raises(registry.RegistryError, match=match):
        registry.load_registry("cha")


def test_a_chapter_without_a_registry_names_the_file(tmp_path, monkeypatch):
    book(tmp_path, monkeypatch)
    (tmp_path / "chapters" / "claims" / "cha.yml").unlink()
    with pytest.raises(registry.RegistryError, match="write .*cha.yml"):
        Verification("cha")


def test_registration_history_shows_every_version_with_its_commit(tmp_path, monkeypatch):
    book(tmp_path, monkeypatch)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "register"], check=True)
    assert registry.registration_history("cha") == {}
    path = tmp_path / "chapters" / "claims" / "cha.yml"
    path.write_text(path.read_text().replace(">= 0.6", ">= 0.4"))
    subprocess.run(git + ["commit", "-qam", "loosen"], check=True)
    path.write_text(path.read_text().replace(">= 0.4", ">= 0.3"))
    versions = registry.registration_history("cha")["rho"]
    assert [v["registration"]["passes_if"] for v in versions] == [">= 0.6", ">= 0.4", ">= 0.3"]
    assert versions[-1]["commit"] == "working tree" and len(versions[0]["commit"]) >= 7
    text = ledger.ledger_markdown()
    assert "`cha` / `rho`" in text and "passes if `>= 0.6`" in text and "passes if `>= 0.3`" in text


# --- checks ------------------------------------------------------------------------------------------

def test_identities_and_bounds_need_a_kind_and_pass_only_within_tolerance(tmp_path, monkeypatch):
    book(tmp_path, monkeypatch)
    v = Verification("cha")
    with pytest.raises(TypeError):
        v.close("a", 1.0, 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="registered and checked with Verification.predict"):
        v.close("a", 1.0, 1.0, atol=1e-6, kind="prediction")
    assert v.close("a", 1.0, 1.0 + 5e-7, atol=1e-6, kind="identity").passed
    assert not v.close("b", 1.0, 1.0 + 2e-6, atol=1e-6, kind="identity").passed
    assert not v.close("nan never passes", 0.0, math.nan, atol=1e9, kind="identity").passed
    assert v.at_least("x", 0.3, 0.2, kind="bound").passed and not v.at_most("w", 0.3, 0.2, kind="bound").passed
    assert not v.passed
    assert summary_line(v.to_json()["checks"]) == "3 identities (2 FAILED) and 2 bounds (1 FAILED)"


@pytest.mark.parametrize("observed, n, status", [
    (0.9, 30, "reproduced"), (0.1, 30, "not reproduced"),
    (0.9, 4, "inconclusive (passed; false-pass"), (0.1, 3, "inconclusive (failed; power"),
    (math.nan, 30, "not reproduced"),
])
def test_a_prediction_takes_its_threshold_from_the_registry_and_its_rates_from_the_runs_units(
        tmp_path, monkeypatch, observed, n, status):
    book(tmp_path, monkeypatch)
    v = Verification("cha", scale="ci")
    check = v.predict("rho", observed, world=world(n), control=1.0)
    assert check.status.startswith(status) and check.kind == "prediction"
    p = check.prediction
    assert p["power_closed_form"] == pytest.approx(pass_probability("spearman", n, 0.8, ">=", 0.6))
    assert p["power"] == p["power_simulated"] and p["false_pass"] == p["false_pass_simulated"]
    assert p["registered_n"] == 12 and p["n"] == n and p["version"] == 1
    assert p["control"] == {"claim": "training moved y", "statistic": "mean |Δy|", "passes_if": ">= 0.5",
                            "observed": 1.0, "passed": True}
    assert world_from_json(p["world"]).to_json() == p["world"]
    assert "registered 12" in v.table() and "control: training moved y" in v.table()
    with pytest.raises(ValueError, match="already checked"):
        v.predict("rho", observed, world=world(n), control=1.0)
    with pytest.raises(registry.RegistryError, match="'other' is not registered"):
        v.predict("other", 0.0, n=3)


@pytest.mark.parametrize("passed, power, false_pass, status", [
    (True, 0.9, 0.01, "reproduced"), (True, 0.3, 0.01, "reproduced"),
    (True, 0.9, 0.2, "inconclusive (passed; false-pass 0.20 > 0.05)"),
    (False, 0.9, 0.2, "not reproduced"), (False, 0.5, 0.01, "inconclusive (failed; power 0.50 < 0.8)"),
])
def test_the_verdict_rule_qualifies_a_pass_by_its_false_pass_rate_and_a_failure_by_its_power(
        passed, power, false_pass, status):
    from prefdyn.book.verify import outcome, prediction_status

    assert prediction_status(passed, power, false_pass) == status
    failed_control = {"claim": "oracle gain", "observed": 0.0, "passes_if": ">= 0.1", "passed": False}
    assert prediction_status(passed, power, false_pass, control=failed_control) == \
        "inconclusive (no headroom: oracle gain: measured 0.0, needs >= 0.1)"
    assert prediction_status(passed, power, false_pass, control=failed_control, implied_by="eq-1") == "implied by eq-1"
    assert outcome(prediction_status(passed, power, false_pass)) in ("reproduced", "not reproduced", "inconclusive")
    assert outcome("underpowered (passed)") == outcome("not selective (failed)") == "inconclusive"


def test_a_failed_control_a_forcing_identity_and_a_missing_world_keep_a_prediction_from_counting(tmp_path, monkeypatch):
    implied = {"identity": "eq-first-step", "regime": "first-order ratio", "implied_if": ">= 0.7"}
    book(tmp_path, monkeypatch, predictions={"rho": PREDICTION, "rho2": {**PREDICTION, "implied_by": implied},
                                             "bare": {k: v for k, v in PREDICTION.items()
                                                      if k not in ("null_world", "control")}})
    v = Verification("cha", scale="ci")
    assert v.predict("rho", 0.9, world=world(30), control=0.1).status == \
        "inconclusive (no headroom: training moved y: measured 0.1, needs >= 0.5)"
    assert v.predict("rho2", 0.9, world=world(30), control=1.0, regime=0.9).status == "implied by eq-first-step"
    assert v.predict("bare", 0.9, world=world(30)).status == "inconclusive (no null world registered)"
    v2 = Verification("cha", scale="ci")
    assert v2.predict("rho2", 0.9, world=world(30), control=1.0, regime=0.3).status == "reproduced"
    assert v2.predict("rho", 0.9, n=30, control=1.0).status == "inconclusive (power not simulated from the run's units)"
    with pytest.raises(ValueError, match="pass control= exactly when"):
        v2.predict("bare", 0.9, world=world(30), control=1.0)
    with pytest.raises(ValueError, match="pass regime= exactly when"):
        Verification("cha").predict("rho2", 0.9, world=world(30), control=1.0)
    with pytest.raises(ValueError, match="the world has 30 units"):
        Verification("cha").predict("rho", 0.9, n=12, world=world(30), control=1.0)


# --- worlds: the statistic a run computed, rebuilt from its own units ------------------------------

def test_mean_lower_bounds_are_the_bootstrap_of_bootstrap_mean_ci():
    x = np.random.default_rng(0).normal(size=17)
    assert mean_lower_bounds(x[None], 300, np.random.default_rng(5))[0] == pytest.approx(
        bootstrap_mean_ci(x, n_boot=300, seed=5)[1], abs=1e-12)


def test_the_mean_world_matches_the_noncentral_t_on_normal_units():
    values = np.random.default_rng(1).normal(size=40)
    for d in (0.0, 0.4):
        sim = simulated_pass_rate(MeanWorld(values, n_boot=400), d, ">", 0.0, seed=3, sims=800)
        assert sim == pytest.approx(pass_probability("mean_lower_bound", 40, d, ">", 0.0), abs=0.06)


def test_the_mean_world_keeps_the_runs_skew():
    """With a heavy right tail a small sample's mean clears zero mostly when it holds one of the rare
    large values, and then the bootstrap (with and without that value) is wide: the lower bound passes
    less often under the null than the normal model says. The world sees the tail; the closed form cannot."""
    values = np.random.default_rng(2).lognormal(sigma=1.5, size=8)
    sim = simulated_pass_rate(MeanWorld(values, n_boot=400), 0.0, ">", 0.0, seed=4, sims=1000)
    assert sim < pass_probability("mean_lower_bound", 8, 0.0, ">", 0.0) - 0.02


def test_the_proportion_world_is_the_binomial():
    for lower in (False, True):
        sim = simulated_pass_rate(ProportionWorld(20, lower), 0.85, ">=" if not lower else ">",
                                  0.9 if not lower else 0.5, seed=1, sims=20000)
        exact = pass_probability("proportion_lower_bound" if lower else "proportion", 20, 0.85,
                                 ">" if lower else ">=", 0.5 if lower else 0.9)
        assert sim == pytest.approx(exact, abs=0.01)


def test_the_spearman_world_without_noise_matches_the_closed_form_and_its_null_is_a_permutation():
    x = np.random.default_rng(0).normal(size=12)
    w = SpearmanWorld(x, np.random.default_rng(1).normal(size=12))
    assert simulated_pass_rate(w, 0.8, ">=", 0.6, seed=2, sims=4000) == pytest.approx(
        pass_probability("spearman", 12, 0.8, ">=", 0.6), abs=0.025)
    assert simulated_pass_rate(w, 0.8, ">=", 0.6, seed=2, sims=3000) == pytest.approx(
        pass_probability("spearman", 12, 0.8, ">=", 0.6), abs=0.05)
    rng = np.random.default_rng(3)
    perm = np.mean([spearmanr(x, rng.permutation(w.y))[0] >= 0.5 for _ in range(4000)])
    assert simulated_pass_rate(w, 0.0, ">=", 0.5, seed=4, sims=4000) == pytest.approx(perm, abs=0.015)
    lower = SpearmanWorld(x, w.y, lower_bound=True)
    assert simulated_pass_rate(lower, 0.6, ">", 0.0, seed=5, sims=400) == pytest.approx(
        pass_probability("spearman_lower_bound", 12, 0.6, ">", 0.0), abs=0.08)


def test_measurement_noise_lowers_the_spearman_worlds_power():
    """Chapter 3's case: the held-out error at each K is measured on m statements; with 12 the
    binomial noise swamps a strong trend that 1,000 statements would show."""
    K = np.array([1, 2, 3, 4, 8, 11], float)
    err = 0.20 + 0.05 * np.log(K)
    se = lambda m: np.sqrt(err * (1 - err) / m)
    power = {m: simulated_pass_rate(SpearmanWorld(K, err, se(m)), 0.97, ">=", 0.8, seed=1) for m in (12, 1000)}
    noiseless = simulated_pass_rate(SpearmanWorld(K, err), 0.97, ">=", 0.8, seed=1)
    assert power[12] < 0.2 < 0.6 < power[1000] <= noiseless + 0.03
    assert noiseless == pytest.approx(pass_probability("spearman", 6, 0.97, ">=", 0.8), abs=0.04)


@pytest.mark.parametrize("make, match", [
    (lambda: MeanWorld([1.0]), "at least 2"), (lambda: SpearmanWorld([1, 2], [1, 2]), "at least 3"),
    (lambda: SpearmanWorld([1, 2, 3], [1, 2, 3], se=-1), "non-negative"),
    (lambda: ProportionWorld(1), "at least 2"), (lambda: world_from_json({"kind": "x"}), "unknown world"),
])
def test_a_world_refuses_bad_units(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_failed_prediction_is_a_result_and_a_failed_identity_is_a_bug(tmp_path, monkeypatch):
    book(tmp_path, monkeypatch)
    path = tmp_path / "c.json"
    monkeypatch.setenv(runs.CHAPTER_ENV, "cha")
    monkeypatch.setenv(runs.CHECKS_ENV, str(path))
    v = Verification(scale="ci")
    assert v.chapter == "cha"                  # the id comes from the executor, not the chapter
    v.close("ok", 0.0, 0.0, atol=1e-9, kind="identity")
    v.predict("rho", 0.1, world=world(30), control=1.0)
    assert v.report("acc", np.float64(0.75), (0.7, 0.8), "held-out accuracy") == 0.75
    v.finish(Run("ci", torch.device("cpu"), 0, {}))       # not reproduced: no exception
    saved = json.loads(path.read_text())
    assert [c["status"] for c in saved["checks"]] == ["pass", "not reproduced"]
    assert saved["reported"] == [{"name": "acc", "value": 0.75, "description": "held-out accuracy",
                                  "interval": [0.7, 0.8]}]
    v.at_least("bad", 0.0, 1.0, kind="bound")
    with pytest.raises(VerificationFailed, match="1 identity/bound check"):
        v.finish()
    with pytest.raises(ValueError, match="already reported"):
        v.report("acc", 1.0)


def test_finish_without_checks_fails_and_a_hand_run_writes_no_json(tmp_path, monkeypatch):
    monkeypatch.delenv(runs.CHECKS_ENV, raising=False)
    monkeypatch.delenv(runs.CHAPTER_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VerificationFailed, match="no checks"):
        Verification().finish()
    v = Verification()
    with pytest.raises(ValueError, match="prefdyn run"):
        v.predict("rho", 0.0, world=world(3), control=1.0)
    v.close("ok", 0.0, 0.0, atol=1e-9, kind="identity")
    v.finish()
    assert list(tmp_path.iterdir()) == []


# --- recorded runs -----------------------------------------------------------------------------------

def finished_run(folder, chapter="cha", git="abc1234", observed=0.9, n=30, **params):
    """Write the two files `prefdyn run` leaves behind, for a run whose prediction measured ``observed``."""
    v = Verification(chapter, scale=params.get("scale", "ci"))
    v.close("exact", 0.0, 0.0, atol=1e-9, kind="identity")
    v.predict("rho", observed, world=world(n), control=1.0)
    v.report("acc", 0.75)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{chapter}.checks.json").write_text(json.dumps(v.to_json()))
    (folder / f"{chapter}.run.json").write_text(json.dumps({
        "chapter": chapter, "parameters": {"scale": "ci", **params}, "defaults": {"model": '"smollm2-135m"'},
        "seconds": 12.0, "finished": "2026-01-01T00:00:00", "packages": {"torch": "9"}, "git": git,
        "hardware": "Some CPU"}))


def test_record_keeps_a_run_by_label_with_its_revision_and_refuses_a_dirty_one(tmp_path, monkeypatch):
    book(tmp_path, monkeypatch)
    finished_run(tmp_path / "book" / "_executed", data_dir="/data/persona-dev")
    path = runs.record("cha", "ci-original")
    assert path == tmp_path / "book" / "recorded" / "cha" / "ci-original.json"
    rec = json.loads(path.read_text())
    assert rec["git"] == "abc1234" and not rec["dirty"] and rec["data"] == "/data/persona-dev"
    assert [c["status"] for c in rec["checks"]] == ["pass", "reproduced"] and rec["reported"][0]["name"] == "acc"
    finished_run(tmp_path / "gpu", git="abc1234+dirty", scale="full", observed=0.95)
    with pytest.raises(runs.ChapterError, match="uncommitted changes.*--allow-dirty"):
        runs.record("cha", "full-gpu", tmp_path / "gpu")
    assert json.loads(runs.record("cha", "full-gpu", tmp_path / "gpu", "Some GPU", allow_dirty=True)
                      .read_text())["dirty"]
    with pytest.raises(runs.ChapterError, match="label"):
        runs.record("cha", "bad label/")
    with pytest.raises(runs.ChapterError, match="no finished run"):
        runs.record("cha", "x", tmp_path / "nowhere")
    recorded = runs.load_recorded_runs("cha")
    assert [r["label"] for r in recorded] == ["ci-original", "full-gpu"]
    live = json.loads((tmp_path / "book" / "_executed" / "cha.checks.json").read_text())
    table = runs_table(live, recorded)
    assert table.splitlines()[0] == "| row | this run | `ci-original` | `full-gpu` |"
    assert "| x correlates with y | 0.9 (reproduced) | 0.9 (reproduced) | 0.95 (reproduced) |" in table
    assert "reported: acc" not in table and "2 rows on which every run agrees are not shown" in table
    assert "Some GPU" in table and "rerun: `prefdyn reproduce cha full-gpu`" in table
    # a recorded run made with the live run's parameters is held to it: moved values are marked
    same = {"scale": "ci", "data_dir": "/data/persona-dev", "model": "smollm2-135m"}
    drift = runs_table({**live, "chapter": "cha"}, recorded, parameters={**same, "device": "cuda"})
    assert "`ci-original` was made with this run's parameters: every value is reproduced" in drift
    moved = json.loads(json.dumps(live))
    moved["reported"][0]["value"] = 0.8
    drift = runs_table(moved, recorded, parameters=same)
    assert "| reported: acc | 0.8 | 0.75 *drift* | 0.75 |" in drift and "1 of its values are not reproduced" in drift


def test_a_legacy_record_reads_as_unclassified_checks(tmp_path, monkeypatch):
    book(tmp_path, monkeypatch)
    folder = tmp_path / "book" / "recorded" / "cha"
    folder.mkdir(parents=True)
    (folder / "old.json").write_text(json.dumps({"parameters": {"scale": "full"}, "hardware": "GPU", "checks": [
        {"claim": "a", "predicted": 0, "observed": 1, "tolerance": "t", "passed": False}]}))
    (rec,) = runs.load_recorded_runs("cha")
    assert rec["legacy"] and rec["checks"][0]["kind"] == "unclassified" and runs.is_failure(rec["checks"][0])


# --- the ledger --------------------------------------------------------------------------------------

def test_ledger_says_reproduced_only_for_an_adequately_powered_passing_prediction(tmp_path, monkeypatch):
    book(tmp_path, monkeypatch, chapters=("cha", "chb", "chc"))
    finished_run(tmp_path / "book" / "_executed", "cha", observed=0.9, n=30)   # reproduced
    finished_run(tmp_path / "book" / "_executed", "chb", observed=0.9, n=4)    # inconclusive
    finished_run(tmp_path / "book" / "_executed", "chc", observed=0.1, n=30)   # not reproduced
    finished_run(tmp_path / "big", "chb", observed=0.2, n=40)
    runs.record("chb", "ci-original", tmp_path / "big")
    rows = {r["chapter"]: r for r in ledger.ledger_rows()}
    assert rows["cha"]["standing"][0].startswith("reconstructed")
    assert rows["cha"]["standing"][1].startswith("**reproduced on a real LLM**: `rho` in `live`")
    assert not any(s.startswith("**reproduced on a real LLM**") for s in rows["chb"]["standing"])
    assert any(s.startswith("**not reproduced on a real LLM**: `rho` in `ci-original`") and "measured 0.2" in s
               for s in rows["chb"]["standing"])
    assert any("inconclusive" in s and "`live`" in s for s in rows["chb"]["standing"])
    assert any(s.startswith("**not reproduced on a real LLM**") for s in rows["chc"]["standing"])
    text = ledger.ledger_markdown()
    assert text.count("## Paper One") == 1 and "{ref}`sec`" in text


def test_results_of_an_earlier_registration_are_superseded_and_implied_ones_do_not_count(tmp_path, monkeypatch):
    book(tmp_path, monkeypatch)
    finished_run(tmp_path / "v1", observed=0.9, n=30)
    runs.record("cha", "ci-v1", tmp_path / "v1")
    (row,) = ledger.ledger_rows(live=False)
    assert row["standing"][1].startswith("**reproduced on a real LLM**: `rho` in `ci-v1`")
    finished_run(tmp_path / "ref", observed=0.1, n=30, scale="smoke")
    runs.record("cha", "reference-smoke", tmp_path / "ref")      # kept for the tests: never evidence
    (row,) = ledger.ledger_rows(live=False)
    assert not any("reference-smoke" in s for s in row["standing"])
    implied = {"identity": "eq-first-step", "regime": "first-order ratio", "implied_if": ">= 0.7"}
    reg = tmp_path / "chapters" / "claims" / "cha.yml"
    data = yaml.safe_load(reg.read_text())
    data["predictions"]["rho"].update(implied_by=implied, version=2, reason="the first-order identity forces it")
    reg.write_text(yaml.safe_dump(data, allow_unicode=True))
    v = Verification("cha", scale="ci")
    v.predict("rho", 0.9, world=world(30), control=1.0, regime=0.95)
    (tmp_path / "book" / "_executed" / "cha.checks.json").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "book" / "_executed" / "cha.checks.json").write_text(json.dumps(v.to_json()))
    (tmp_path / "book" / "_executed" / "cha.run.json").write_text(json.dumps({
        "chapter": "cha", "parameters": {"scale": "ci"}, "seconds": 1.0, "finished": "2026", "git": "abc"}))
    (row,) = ledger.ledger_rows()
    assert not any(s.startswith("**reproduced") for s in row["standing"])
    assert any(s.startswith("implied by a checked identity") and "`live`" in s for s in row["standing"])
    assert any(s.startswith("superseded") and "`rho` v1 in `ci-v1` (reproduced)" in s for s in row["standing"])
    assert "implied by an identity" in row["short"] and row["models"] == "unrecorded model: implied (live)"
    headline = ledger.recorded_headline()
    assert "| [`c`](claim-c) | implied by an identity |" not in headline      # the live run is not recorded
    assert "No real-model run of the current registrations is recorded yet." in headline


def test_the_ledger_splits_real_model_outcomes_by_the_model_of_each_run(tmp_path, monkeypatch):
    book(tmp_path, monkeypatch)
    finished_run(tmp_path / "book" / "_executed", observed=0.9, n=30)                     # default model
    finished_run(tmp_path / "g1", observed=0.1, n=30, model="gemma3-270m")
    runs.record("cha", "ci-gemma", tmp_path / "g1")
    finished_run(tmp_path / "g2", observed=0.9, n=30, model="gemma3-270m")
    runs.record("cha", "ci-gemma-2", tmp_path / "g2")
    (row,) = ledger.ledger_rows()
    assert row["models"] == ("smollm2-135m: reproduced (live); "
                             "gemma3-270m: not reproduced (ci-gemma), reproduced (ci-gemma-2)")
    text = ledger.ledger_markdown()
    assert "smollm2-135m, `live`: {term}`reproduced <reproduced>`" in text
    assert "gemma3-270m, `ci-gemma`: {term}`not reproduced <not reproduced>`" in text
    book(tmp_path / "x", monkeypatch, predictions={"rho": {**PREDICTION, "setting": "simulation"}})
    finished_run(tmp_path / "x" / "book" / "_executed", observed=0.9, n=30)
    (row,) = ledger.ledger_rows()
    assert row["models"] == "—"                                   # simulations are about no model


def test_the_ledger_compares_verdicts_on_development_and_replication_behaviours(tmp_path, monkeypatch):
    book(tmp_path, monkeypatch)
    finished_run(tmp_path / "dev", observed=0.9, n=30)
    runs.record("cha", "ci-dev", tmp_path / "dev")
    finished_run(tmp_path / "rep", observed=0.9, n=30, behaviours="replication")
    runs.record("cha", "ci-rep", tmp_path / "rep")
    (row,) = ledger.ledger_rows(live=False)
    (line,) = ledger.split_agreement(row["evidence"])
    assert line.startswith("- `rho` (smollm2-135m, ci): development: {term}`reproduced <reproduced>` (`ci-dev`)")
    assert line.endswith("the verdicts agree")
    finished_run(tmp_path / "rep2", observed=0.1, n=30, behaviours="replication")
    runs.record("cha", "ci-rep2", tmp_path / "rep2")
    (row,) = ledger.ledger_rows(live=False)
    assert ledger.split_agreement(row["evidence"])[0].endswith("**the verdicts disagree**")
    finished_run(tmp_path / "rep3", observed=0.9, n=4, behaviours="replication")      # underpowered
    runs.record("cha", "ci-rep3", tmp_path / "rep3")
    (row,) = ledger.ledger_rows(live=False)
    assert ledger.split_agreement(row["evidence"])[0].endswith("cannot tell (a verdict is implied or inconclusive, so not evidence)")
    assert "On the development behaviours and on the replication behaviours" in ledger.ledger_markdown()
    assert ledger.behaviour_set({"parameters": {"data_dir": "/x"}}) == "other data"
    finished_run(tmp_path / "book" / "_executed", observed=0.1, n=30, scale="smoke")     # a live smoke run
    finished_run(tmp_path / "gem", observed=0.1, n=30, model="gemma3-270m")             # another model
    runs.record("cha", "ci-gemma", tmp_path / "gem")
    (row,) = ledger.ledger_rows()
    (line,) = ledger.split_agreement(row["evidence"])       # neither is compared with the SmolLM2 ci runs
    assert "`live`" not in line and "ci-gemma" not in line


def test_a_prediction_on_synthetic_data_is_reproduced_in_simulation_not_on_a_real_llm(tmp_path, monkeypatch):
    book(tmp_path, monkeypatch, predictions={"rho": {**PREDICTION, "setting": "simulation"}})
    finished_run(tmp_path / "book" / "_executed", "cha", observed=0.9, n=30)
    (row,) = ledger.ledger_rows()
    assert row["standing"][1].startswith("**reproduced in simulation**")
    assert not any("real LLM" in s for s in row["standing"])
    book(tmp_path / "x", monkeypatch, predictions={"rho": {**PREDICTION, "setting": "toy"}})
    with pytest.raises(registry.RegistryError, match="setting 'toy'"):
        registry.load_registry("cha")


REPO = Path(__file__).resolve().parents[1]


def test_every_reproduced_row_of_the_books_ledger_points_to_an_adequate_passing_prediction(monkeypatch):
    """On the book itself: its registries parse, each claim's section exists, and each
    "reproduced" row rests on a passing prediction with power >= 0.8 in some run."""
    monkeypatch.setenv("PREFDYN_ROOT", str(REPO))
    for row in ledger.ledger_rows():
        claim = row["claim"]
        source = runs.chapter_source(row["chapter"]).read_text()
        assert f"({claim.section})=" in source, f"{row['chapter']}: no label ({claim.section})= for {claim.id}"
        if any(s.startswith("**reproduced on a real LLM**") for s in row["standing"]):
            assert any(e["status"] == "reproduced" and e["power"] >= registry.ADEQUATE_POWER
                       and e["setting"] == "real model" and e["prediction"] in claim.predictions
                       for e in row["evidence"]), claim.id


def test_markdown_tables_escape_bars_and_refuse_ragged_rows():
    from prefdyn.book.glue import markdown_table

    assert markdown_table(["a", "b"], [["|cos(c_i, c_j)|", 1]]) == "| a | b |\n|---|---|\n| \\|cos(c_i, c_j)\\| | 1 |"
    with pytest.raises(ValueError, match="2 cells, the header 3"):
        markdown_table(["a", "b", "c"], [[1, 2]])


def test_panels_fit_the_column_at_natural_size_two_per_row():
    import matplotlib

    matplotlib.use("Agg")
    from prefdyn.book import figures

    figures.use_book_style()
    for n, rows in ((1, 1), (2, 1), (3, 2), (6, 3)):
        fig, axes = figures.panels(n)
        width_px = fig.get_figwidth() * fig.dpi
        assert len(axes) == n == len(fig.axes) and width_px <= 780
        assert max(len({round(a.get_position().y0, 3) for a in axes}), 1) == rows
    with pytest.raises(ValueError):
        figures.panels(0)


def test_the_readme_headline_is_the_ledgers_and_says_what_is_not_reproduced(monkeypatch):
    """README.md's first screen is written from the registries and the recorded runs; rerun
    `prefdyn readme` after recording a run or changing a registry."""
    monkeypatch.setenv("PREFDYN_ROOT", str(REPO))
    text = (REPO / "README.md").read_text()
    block = text.split(ledger.README_START)[1].split(ledger.README_END)[0].strip()
    assert block == ledger.recorded_headline(compact=True), "README.md is out of step with the ledger: run `prefdyn readme`"
    assert "Not reproduced on a real LLM, with the control" in block and text.index(ledger.README_START) < 2500
