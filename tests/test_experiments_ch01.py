"""Chapter 1's real-model driver (prefdyn.experiments.ch01) and its three registered predictions in
their null worlds: the chapter's own estimator run on simulated units where the paper's claim is
false passes at about its stated false-pass rate, and fails at the registered threshold."""
import math
from collections import Counter

import numpy as np
import pytest
import torch

from prefdyn import stats
from prefdyn.book.registry import load_registry
from prefdyn.datasets.persona import PersonaExample
from prefdyn.experiments import ch01
from prefdyn.params import ParameterError

REGISTRY = load_registry("ch01-rlhf-dpo-ipo")


def fake_persona(behaviours=("a", "b"), n=40):
    return {b: [PersonaExample(b, f"q {b} {i}", f"s {b} {i}", *(("Yes", "No") if i % 2 else ("No", "Yes")))
                for i in range(n)] for b in behaviours}


# --- the data of a run ------------------------------------------------------------------------------

def test_held_out_and_training_samples_are_balanced_disjoint_and_seeded():
    persona = fake_persona()
    test, pool = ch01.held_out_split(persona, 10, seed=3)
    assert Counter((ex.behaviour, ex.matches) for ex in test) == {(b, m): 5 for b in "ab" for m in (True, False)}
    assert all(ex not in pool[ex.behaviour] for ex in test) and sum(map(len, pool.values())) == 60
    assert ch01.held_out_split(persona, 10, seed=3)[0] == test != ch01.held_out_split(persona, 10, seed=4)[0]
    runs = [ch01.training_sample(pool, 8, seed=3, run=r) for r in range(3)]
    assert all(Counter(ex.matches for ex in r) == {True: 8, False: 8} for r in runs)
    assert runs[0] == ch01.training_sample(pool, 8, seed=3, run=0) and runs[0] != runs[1]
    assert not {id(ex) for r in runs for ex in r} & {id(ex) for ex in test}
    with pytest.raises(ValueError, match="balanced statements asked for"):
        ch01.held_out_split(persona, 41, seed=0)


def test_the_chapters_behaviours_are_the_first_of_a_set_or_the_names_given():
    from prefdyn.datasets.persona import IM_LI_BEHAVIOURS, behaviour_split

    assert ch01.chapter_behaviours(None, 8) == list(IM_LI_BEHAVIOURS)
    assert ch01.chapter_behaviours("replication", 3) == behaviour_split()["replication"][:3]
    assert ch01.chapter_behaviours(["b", "a", "b"], 8) == ["b", "a"]
    assert ch01.chapter_behaviours("narcissism, risk-seeking", 8) == ["narcissism", "risk-seeking"]


def test_the_protocol_refuses_bad_sizes():
    good = dict(train_per_behaviour=2, test_per_behaviour=2, steps=1, batch=2, lr=1e-5, beta=0.1, eval_every=1,
                curve_per_behaviour=1, runs=2)
    ch01.DPOConfig(**good)
    with pytest.raises(ParameterError, match="beta=-0.1 must be a positive float"):
        ch01.DPOConfig(**{**good, "beta": -0.1})
    with pytest.raises(ValueError, match="curve_per_behaviour"):
        ch01.DPOConfig(**{**good, "curve_per_behaviour": 3})


# --- the predictions in their null worlds -----------------------------------------------------------

def pass_rate(prediction, values_of, sims=400, seed=0):
    rng = np.random.default_rng(seed)
    return np.mean([prediction.passes(values_of(rng)) for _ in range(sims)])


@pytest.mark.parametrize("pid, draw", [
    # held-out margins: skewed, heavy-tailed like the pilot's, centred at 0 (the trained model has no
    # preference for y_w on statements it was not trained on)
    ("heldout-margin", lambda rng, n: rng.gamma(0.6, 1.0, n) - 0.6),
    # held-out accuracy gains in {-1, 0, 1}: as many statements lost as won
    ("heldout-accuracy", lambda rng, n: rng.choice([-1.0, 0.0, 1.0], size=n, p=[0.2, 0.6, 0.2])),
])
def test_the_held_out_predictions_pass_rarely_where_dpo_does_not_generalise(pid, draw):
    p = REGISTRY.prediction(pid)
    n = p.n["ci"]
    statistic = lambda rng: stats.bootstrap_mean_ci(  # noqa: E731
        draw(rng, n), n_boot=400, seed=int(rng.integers(1 << 30)))[1]
    false_pass = pass_rate(p, statistic, sims=300)
    assert false_pass <= 0.06                          # the 95% interval's lower end: about 2.5%
    assert 0 < false_pass or p.passes(1.0)             # a statistic that can pass
    # where the effect is the registered one, the same estimator passes at the simulated power
    shifted = lambda rng: stats.bootstrap_mean_ci(   # noqa: E731
        (lambda v: v + p.effect * v.std(ddof=1))(draw(rng, n)), n_boot=400, seed=int(rng.integers(1 << 30)))[1]
    assert pass_rate(p, shifted, sims=100) >= 0.8


def test_the_training_loss_prediction_passes_rarely_where_runs_do_not_lower_the_loss():
    """The chapter's statistic, the share of runs whose training loss fell, where a run is as likely to
    raise it as to lower it: it passes at 0.5^R for R runs (a quarter of the time at R = 2, so a pass
    at ci is no evidence), about 0.035 at full's eight runs (7 of 8 needed), as ProportionWorld says."""
    p = REGISTRY.prediction("dpo-lowers-training-loss")
    for scale, expected in (("ci", 0.25), ("full", 9 / 256)):
        runs = p.n[scale]
        statistic = lambda rng: float(np.mean(rng.normal(0.0, 0.1, runs) > 0))   # noqa: E731
        assert pass_rate(p, statistic, sims=4000) == pytest.approx(expected, abs=0.02)
        world = stats.ProportionWorld(runs)
        assert stats.simulated_pass_rate(world, p.no_effect, *p.comparison, seed=1) == pytest.approx(expected, abs=0.03)
    assert stats.simulated_pass_rate(stats.ProportionWorld(p.n["full"]), p.effect, *p.comparison, seed=2) >= 0.8


def test_the_registrations_carry_what_the_verdict_rule_needs():
    for pid in ("heldout-margin", "heldout-accuracy", "dpo-lowers-training-loss"):
        p = REGISTRY.prediction(pid)
        assert p.version >= 2 and p.reason and p.null_world and p.independence and p.control, pid
        assert p.setting == "real model"


# --- the run on the real model ------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_scores_its_training_and_held_out_statements(smol, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFDYN_CACHE", str(tmp_path))
    from prefdyn.datasets.persona import load_persona
    from prefdyn.llm.models import kept_weights

    persona = load_persona(behaviours=["narcissism", "risk-seeking"])
    cfg = ch01.DPOConfig(train_per_behaviour=4, test_per_behaviour=4, steps=2, batch=4, lr=5e-5, beta=0.1,
                         eval_every=1, curve_per_behaviour=2, runs=2)
    test, pool = ch01.held_out_split(persona, cfg.test_per_behaviour, seed=0)
    before = {k: v.clone() for k, v in smol.model.state_dict().items()}
    with kept_weights(smol.model):
        run = ch01.dpo_run(smol, ch01.training_sample(pool, 4, 0, 0), cfg, 0, test=test, curve=[0, 1, 4, 5])
    assert all(torch.equal(v, before[k]) for k, v in smol.model.state_dict().items())
    evals = [h for h in run.history if "test_margin" in h]
    assert [h["step"] for h in evals] == [0, 1, 2] and abs(evals[0]["test_margin"]) < 1e-5
    assert run.train_drop.shape == run.train_margin.shape == (8,) and run.margin.shape == run.gain.shape == (8,)
    np.testing.assert_allclose(run.train_drop, math.log(2) + np.log(1 / (1 + np.exp(-run.train_margin))), atol=1e-6)
    w, l = run.after
    np.testing.assert_allclose(run.margin, 0.1 * ((w - run.before[0]) - (l - run.before[1])).numpy(), atol=1e-5)
    assert set(np.unique(run.gain)) <= {-1.0, 0.0, 1.0}
    # the reference from the shared feature cache is the model's own scoring of the pairs
    from prefdyn.experiments.persona import persona_pairs
    from prefdyn.llm.train import ReferenceLogps

    exact = ReferenceLogps.of(smol, persona_pairs(smol.tokenizer, test))
    np.testing.assert_allclose(run.before[0], exact.chosen, atol=1e-4)
    np.testing.assert_allclose(run.before[1], exact.rejected, atol=1e-4)
    others = ch01.repeat_runs(smol, pool, cfg, 0, [1])
    assert len(others) == 1 and others[0].margin is None and others[0].seed == 1
    assert all(torch.equal(v, before[k]) for k, v in smol.model.state_dict().items())
