"""Chapter 4's drivers (prefdyn.experiments.ch04) against independent computations: hand-computed
preference matrices, the closed forms of the chapter's theorems, explicit loops over the map, the
first-order condition of the DPO optimum, and (slow) the real model's own log-probabilities."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import restoring

from prefdyn import tabular
from prefdyn.experiments import ch04
from prefdyn.theory import iterative as it

D = torch.float64


def test_random_preferences_are_antisymmetric_shifts_of_the_generators_uniforms():
    P = ch04.random_preferences(5, 4, torch.Generator().manual_seed(3))
    A = torch.rand(5, 4, 4, generator=torch.Generator().manual_seed(3), dtype=D) - 0.5
    for n in range(5):
        for i in range(4):
            for j in range(4):
                assert P[n, i, j].item() == pytest.approx(0.5 + (A[n, i, j].item() - A[n, j, i].item()) / 2, abs=1e-15)
    assert torch.allclose(P + P.transpose(-1, -2), torch.ones(5, 4, 4, dtype=D))
    assert ((P >= 0) & (P <= 1)).all()
    assert not torch.allclose(P[0], P[1])


def test_random_condorcet_preferences_have_response_0_beating_every_other():
    P = ch04.random_condorcet_preferences(200, 4, torch.Generator().manual_seed(0))
    assert torch.allclose(P + P.transpose(-1, -2), torch.ones(200, 4, 4, dtype=D))
    assert (P[:, 0, 1:] > 0.5).all() and (P[:, 0, 1:] < 1).all()
    assert P[:, 0, 1:].std() > 0.1                   # spread over (1/2, 1), not a constant


def test_condorcet_success_on_the_counterexample_and_on_bradley_terry():
    eps, delta = 0.05, 0.1                           # prop-ch4-condorcet-fail: uniform sampling ranks b over c
    counterexample = torch.tensor([[0.5, 0.5 + eps, 0.5 + eps], [0.5 - eps, 0.5, delta],
                                   [0.5 - eps, 1 - delta, 0.5]], dtype=D)
    # by hand: (P u)_b - (P u)_c = (1/2 - 3 eps - delta)/3 > 0, so the uniform optimum puts b on top
    assert (counterexample @ torch.full((3,), 1 / 3, dtype=D)).argmax().item() == 2
    transitive = tabular.bradley_terry(torch.tensor([2.0, 1.0, 0.0], dtype=D))   # 0 on top under any sampler
    assert ch04.condorcet_success(counterexample[None]) == (1.0, 0.0)
    assert ch04.condorcet_success(transitive[None]) == (1.0, 1.0)
    assert ch04.condorcet_success(torch.stack([counterexample, transitive])) == (1.0, 0.5)


def test_oscillation_scan_matches_the_ellipse_and_each_cell_iterated_alone():
    a = 0.4
    P = it.cyclic_preferences(a)
    u = torch.full((3,), -math.log(3), dtype=D)
    start = F.log_softmax(u + torch.tensor([1e-3, 0.0, 0.0], dtype=D), -1)
    alphas, betas = torch.tensor([0.2, 0.99], dtype=D), torch.tensor([1.0, 2.5, 8.0], dtype=D)
    ratio = ch04.oscillation_scan(it.mrs_ipo_step, start, P, alphas, betas, 400)
    assert ratio.shape == (2, 3)
    # alpha^2 + a^2 beta^2 / 3 by hand: 0.09, 0.37, 3.45 in the first row; 1.03, 1.31, 4.39 in the second
    assert ((ratio >= 0.9) == torch.tensor([[False, False, True], [True, True, True]])).all()
    for i, al in enumerate(alphas):
        for j, be in enumerate(betas):
            alone = it.iterate(it.mrs_ipo_step, start, 400, log_pi_ref=u, mu0=u.exp(), P=P, alpha=al.item(),
                               beta=be.item(), lam=1.0)
            assert ratio[i, j].item() == pytest.approx(it.oscillation_ratio(alone, u).item(), rel=1e-9, abs=1e-12)


def _warm_world(prompts=3, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.log_softmax(torch.randn(prompts, K, generator=g, dtype=D), -1)


def test_prompt_fixed_points_solve_the_fixed_point_equation_of_each_prompt():
    log_pi0 = _warm_world()
    P, alpha, beta, lam = it.cyclic_preferences(0.4), 0.3, 2.0, 0.5
    fixed = ch04.prompt_fixed_points(log_pi0, P, alpha, beta, lam)
    u = torch.full((3,), 1 / 3, dtype=D)
    for p in range(3):                               # prop-ch4-fixed, with pi_ref = pi_0 of prompt p
        pi = fixed[p].exp()
        rhs = F.log_softmax(log_pi0[p] + beta / (1 - alpha) * P @ (lam * pi + (1 - lam) * u), -1)
        assert torch.allclose(fixed[p], rhs, atol=1e-10)
    assert not torch.allclose(fixed[0], fixed[1])   # each prompt its own reference


def test_population_rounds_ipo_is_the_explicit_map_and_dpo_solves_its_first_order_condition():
    log_pi0 = _warm_world(prompts=2, K=4, seed=1)
    P = tabular.bradley_terry(torch.arange(1.0, 5.0, dtype=D))
    alpha, beta, lam = 0.6, 1.5, 0.5
    u = torch.full((4,), 0.25, dtype=D)
    ipo = ch04.population_rounds("ipo", log_pi0, P, alpha, beta, lam, 3)
    assert ipo.shape == (4, 2, 4)
    for p in range(2):                               # eq-ch4-map, written out
        z = log_pi0[p]
        for t in range(1, 4):
            z = F.log_softmax(alpha * z + (1 - alpha) * log_pi0[p] + beta * P @ (lam * z.exp() + (1 - lam) * u), -1)
            assert torch.allclose(ipo[t, p], z, atol=1e-12)
    P_cyc = it.cyclic_preferences(0.3, K=4)          # not Bradley–Terry: the sampler matters
    dpo = ch04.population_rounds("dpo", log_pi0, P_cyc, alpha, beta, lam, 2)
    for p in range(2):
        for t in range(2):                           # eq-ch4-dpo-foc for the round's reference and sampler
            ref = F.log_softmax(alpha * dpo[t, p] + (1 - alpha) * log_pi0[p], -1)
            mu = lam * dpo[t, p].exp() + (1 - lam) * u
            g = dpo[t + 1, p] - ref
            foc = (mu[None, :] * torch.sigmoid(beta * (g[:, None] - g[None, :]))).sum(-1) - P_cyc @ mu
            assert foc.abs().max() < 1e-9


def test_classify_regime_against_the_closed_forms_on_cyclic_preferences():
    a, lam = 0.4, 0.5
    P = it.cyclic_preferences(a)
    uniform = torch.full((2, 3), -math.log(3), dtype=D)   # pi_0 uniform: the fixed point is the uniform policy
    for alpha, beta in ((0.3, 2.0), (0.9, 10.0)):
        c, rho = ch04.classify_regime("ipo", uniform, P, alpha, beta, lam, a)
        # ||aC||_2 = sqrt(3) a (thm-ch4-contraction), |alpha ± i a beta lam / sqrt 3| (thm-ch4-oscillation)
        assert c == pytest.approx(alpha + beta * lam * math.sqrt(3) * a / 2, rel=1e-12)
        assert rho == pytest.approx(math.hypot(alpha, a * beta * lam / math.sqrt(3)), rel=1e-8)
    c, rho = ch04.classify_regime("ipo", uniform, P, 1.0, 5.0, lam, a)
    assert c == pytest.approx(1 + 5.0 * lam * math.sqrt(3) * a / 2) and math.isnan(rho)
    c, rho = ch04.classify_regime("dpo", uniform, P, 0.9, 0.4, lam, a)
    assert math.isnan(c) and rho == pytest.approx(math.hypot(0.9, 4 * a * lam / (math.sqrt(3) * 0.4)), rel=1e-12)


def test_cycle_strength_is_the_variance_over_rounds_averaged_over_candidates():
    pis = torch.tensor([[[0.8, 0.2], [0.5, 0.5]], [[0.2, 0.8], [0.5, 0.5]]], dtype=D)   # (rounds+1, prompts, K)
    # prompt 0 alternates 0.8 <-> 0.2 (variance 0.09 per candidate); prompt 1 stands still
    assert np.allclose(ch04.cycle_strength(pis.log()), [0.09, 0.0], atol=1e-15)


def test_prompt_provenance_counts_the_shipped_prompts_and_says_they_were_written_for_the_book():
    from prefdyn.datasets.prompts import load_prompts

    text = ch04.prompt_provenance(2, 3)
    assert f"the first 2 of the {len(load_prompts('rps'))} rock–paper–scissors prompts" in text
    assert f"the first 3 of the {len(load_prompts('digits'))} digit prompts" in text
    assert "written for this book" in text


def test_trainable_state_copies_only_the_trained_weights():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    state = ch04.trainable_state(model)
    assert set(state) == {"1.weight", "1.bias"}
    saved = state["1.weight"].clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    assert torch.equal(state["1.weight"], saved)     # a copy, not a view
    model.load_state_dict(state, strict=False)
    assert torch.equal(model[1].weight, saved)


@pytest.mark.slow
def test_prepare_task_and_run_rounds_start_every_run_at_the_warm_start(smol, tmp_path, monkeypatch):
    from prefdyn.llm import logps, train

    monkeypatch.setenv("PREFDYN_CACHE", str(tmp_path))
    with restoring(smol.model):
        train.train_only_top_blocks(smol.model, 1)
        base = ch04.trainable_state(smol.model)
        P = it.cyclic_preferences(0.4)
        task = ch04.prepare_task(smol, base, "rps", ["Rock", "Scissors", "Paper"], P, [1 / 3] * 3,
                                 n_prompts=1, top_blocks=1, warm_start_steps=2, lr=1e-3)
        tok = smol.tokenizer
        assert task.candidate_ids == [tok.encode(w, add_special_tokens=False)[0] for w in ("Rock", "Scissors", "Paper")]
        assert task.offline == [[0, 1, 2]] and task.prefix_err < 1e-4
        with torch.no_grad():
            warm = logps.candidate_logps(smol.model, tok, task.prompts, task.candidate_ids, smol.device)
        assert torch.allclose(task.mass, warm.exp().sum(-1), atol=1e-6)
        assert any(not torch.equal(base[k], task.state[k]) for k in base)   # the warm start trained
        kw = dict(lam=0.5, rounds=1, n_samples=4, steps=1, lr=1e-3, seed=0, max_new_tokens=2)
        first = ch04.run_rounds(smol, task, "ipo", 0.3, 2.0, **kw)
        second = ch04.run_rounds(smol, task, "ipo", 0.3, 2.0, **kw)  # restored: the same pi_0 and the same round
        assert torch.allclose(first["log_pi"][0], F.log_softmax(warm.double(), -1), atol=1e-5)
        assert torch.equal(first["log_pi"][0], second["log_pi"][0])
        assert torch.allclose(first["log_pi"][1], second["log_pi"][1], atol=1e-6)
