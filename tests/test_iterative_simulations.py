"""The simulations of chapter 4 (prefdyn.theory.iterative_simulations) against independent
computations: hand-computed preference matrices, the closed forms of the chapter's theorems,
explicit loops over the map, the first-order condition of the DPO optimum, scipy."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prefdyn import tabular
from prefdyn.theory import iterative as it
from prefdyn.theory import iterative_simulations as sim

D = torch.float64


def test_random_preferences_are_antisymmetric_shifts_of_the_generators_uniforms():
    P = sim.random_preferences(5, 4, torch.Generator().manual_seed(3))
    A = torch.rand(5, 4, 4, generator=torch.Generator().manual_seed(3), dtype=D) - 0.5
    for n in range(5):
        for i in range(4):
            for j in range(4):
                assert P[n, i, j].item() == pytest.approx(0.5 + (A[n, i, j].item() - A[n, j, i].item()) / 2, abs=1e-15)
    assert torch.allclose(P + P.transpose(-1, -2), torch.ones(5, 4, 4, dtype=D))
    assert ((P >= 0) & (P <= 1)).all()
    assert not torch.allclose(P[0], P[1])


def test_random_condorcet_preferences_have_response_0_beating_every_other():
    P = sim.random_condorcet_preferences(200, 4, torch.Generator().manual_seed(0))
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
    assert sim.condorcet_success(counterexample[None]) == (1.0, 0.0)
    assert sim.condorcet_success(transitive[None]) == (1.0, 1.0)
    assert sim.condorcet_success(torch.stack([counterexample, transitive])) == (1.0, 0.5)


def test_oscillation_scan_matches_the_ellipse_and_each_cell_iterated_alone():
    a = 0.4
    P = it.cyclic_preferences(a)
    u = torch.full((3,), -math.log(3), dtype=D)
    start = F.log_softmax(u + torch.tensor([1e-3, 0.0, 0.0], dtype=D), -1)
    alphas, betas = torch.tensor([0.2, 0.99], dtype=D), torch.tensor([1.0, 2.5, 8.0], dtype=D)
    ratio = sim.oscillation_scan(it.mrs_ipo_step, start, P, alphas, betas, 400)
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
    fixed = sim.prompt_fixed_points(log_pi0, P, alpha, beta, lam)
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
    ipo = sim.population_rounds("ipo", log_pi0, P, alpha, beta, lam, 3)
    assert ipo.shape == (4, 2, 4)
    for p in range(2):                               # eq-ch4-map, written out
        z = log_pi0[p]
        for t in range(1, 4):
            z = F.log_softmax(alpha * z + (1 - alpha) * log_pi0[p] + beta * P @ (lam * z.exp() + (1 - lam) * u), -1)
            assert torch.allclose(ipo[t, p], z, atol=1e-12)
    P_cyc = it.cyclic_preferences(0.3, K=4)          # not Bradley–Terry: the sampler matters
    dpo = sim.population_rounds("dpo", log_pi0, P_cyc, alpha, beta, lam, 2)
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
        c, rho = sim.classify_regime("ipo", uniform, P, alpha, beta, lam, a)
        # ||aC||_2 = sqrt(3) a (thm-ch4-contraction), |alpha ± i a beta lam / sqrt 3| (thm-ch4-oscillation)
        assert c == pytest.approx(alpha + beta * lam * math.sqrt(3) * a / 2, rel=1e-12)
        assert rho == pytest.approx(math.hypot(alpha, a * beta * lam / math.sqrt(3)), rel=1e-8)
    c, rho = sim.classify_regime("ipo", uniform, P, 1.0, 5.0, lam, a)
    assert c == pytest.approx(1 + 5.0 * lam * math.sqrt(3) * a / 2) and math.isnan(rho)
    c, rho = sim.classify_regime("dpo", uniform, P, 0.9, 0.4, lam, a)
    assert math.isnan(c) and rho == pytest.approx(math.hypot(0.9, 4 * a * lam / (math.sqrt(3) * 0.4)), rel=1e-12)


def test_band_width_leaves_a_stable_cell_at_half_the_oscillation_cut():
    for T in (150, 600, 2000):
        w = sim.band_width(T)
        assert (1 - w) ** (T / 4) == pytest.approx(0.5)      # ratio rho^(T/2) = index^(T/4)
    # a contracting cell just outside the band: the scan measures a ratio at most about 1/2
    a, T = 0.4, 200
    P = it.cyclic_preferences(a)
    u = torch.full((3,), -math.log(3), dtype=D)
    start = F.log_softmax(u + torch.tensor([1e-3, 0.0, 0.0], dtype=D), -1)
    index = 1 - 1.05 * sim.band_width(T)
    bl = math.sqrt(3 * (index - 0.3 ** 2)) / a
    ratio = sim.oscillation_scan(it.mrs_ipo_step, start, P, torch.tensor([0.3], dtype=D),
                                  torch.tensor([bl], dtype=D), T).item()
    assert ratio < 0.55


def test_phase_agreement_accepts_the_ellipse_and_rejects_a_wrong_boundary():
    a, T = 0.4, 300
    P = it.cyclic_preferences(a)
    u = torch.full((3,), -math.log(3), dtype=D)
    start = F.log_softmax(u + torch.tensor([1e-3, 0.0, 0.0], dtype=D), -1)
    alphas, bls = torch.linspace(0, 1, 6, dtype=D), torch.linspace(0.1, 8.0, 7, dtype=D)
    ratio = sim.oscillation_scan(it.mrs_ipo_step, start, P, alphas, bls, T).numpy()
    A, B = np.meshgrid(alphas.numpy(), bls.numpy(), indexing="ij")
    band = sim.band_width(T)
    share, wrong_cells = sim.phase_agreement(ratio, it.ipo_oscillation_index(A, a, B), band)
    assert share == 1.0 and wrong_cells == 0
    share4, wrong4 = sim.phase_agreement(ratio, A ** 2 + (a * B) ** 2 / 4, band)
    assert wrong4 >= 1 and share4 < 1
    # by hand: (alpha, beta lam) = (0.4, 4.05) has index 0.16 + 0.88 = 1.04 (oscillates), but 0.82 with /4
    assert ratio[2, 3] >= 0.9


def test_paper_regimes_match_each_cell_iterated_alone():
    P = sim.random_preferences(3, 4, torch.Generator().manual_seed(4))
    alphas, bls = torch.tensor([0.0, 0.9, 1.0], dtype=D), torch.tensor([1.0, 12.0], dtype=D)
    strength, H = sim.paper_regimes(P, alphas, bls, 60)
    assert strength.shape == H.shape == (3, 2, 3)
    u = torch.full((4,), -math.log(4), dtype=D)
    for i, al in enumerate(alphas.tolist()):
        for j, bl in enumerate(bls.tolist()):
            for m in range(3):
                traj = it.iterate(it.mrs_ipo_step, u, 60, log_pi_ref=u, mu0=u.exp(), P=P[m], alpha=al,
                                  beta=bl, lam=1.0)
                assert strength[i, j, m].item() == pytest.approx(it.cycle_strength(traj[31:]).item(),
                                                                 rel=1e-6, abs=1e-15)
                assert H[i, j, m].item() == pytest.approx(it.entropy(traj[-1]).item(), rel=1e-9, abs=1e-14)


def test_per_matrix_spearman_is_scipys_over_the_cells():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(6)
    x, y = torch.rand(3, 4, 5, generator=g, dtype=D), torch.rand(3, 4, 5, generator=g, dtype=D)
    y[..., 0] = x[..., 0] ** 2                                  # a monotone relation: 1
    rho = sim.per_matrix_spearman(x, y)
    mask = torch.rand(3, 4, 5, generator=g, dtype=D) > 0.4
    masked = sim.per_matrix_spearman(x, y, mask)
    for m in range(5):
        keep = mask[..., m]
        assert masked[m] == pytest.approx(spearmanr(x[..., m][keep], y[..., m][keep])[0])
    assert np.isnan(sim.per_matrix_spearman(x, y, torch.zeros(3, 4, 5, dtype=torch.bool))).all()
    for m in range(5):
        assert rho[m] == pytest.approx(spearmanr(x[..., m].flatten(), y[..., m].flatten())[0])
    assert rho[0] == pytest.approx(1.0)


def test_contraction_grid_is_the_contraction_factor_of_each_cell_and_matrix():
    P = sim.random_preferences(2, 4, torch.Generator().manual_seed(7))
    alphas, bls = torch.tensor([0.1, 0.5], dtype=D), torch.tensor([1.0, 3.0, 9.0], dtype=D)
    grid = sim.contraction_grid(P, alphas, bls)
    for i, j, m in itertools.product(range(2), range(3), range(2)):
        assert grid[i, j, m].item() == pytest.approx(it.contraction_factor(alphas[i].item(), bls[j].item(), 1.0, P[m]))


@pytest.mark.parametrize("rounds", [it.plugin_rounds, it.sampled_rounds])
def test_phase_averaging_never_raises_the_cycle_strength_and_keeps_the_shapes(rounds):
    P = it.cyclic_preferences(0.4)[None].expand(2, 3, 3).clone()
    traj, single, averaged = sim.phase_averaging(P, torch.tensor([[0.9], [1.0]], dtype=D),
                                                  torch.tensor([[8.0], [4.0]], dtype=D), 16, 200, 6,
                                                  torch.Generator().manual_seed(0), rounds=rounds)
    assert traj.shape == (201, 6, 2, 3) and single.shape == averaged.shape == (2,)
    assert (averaged <= single + 1e-15).all()
    assert torch.allclose(single, it.cycle_strength(traj[100:]).mean(0))
    again = rounds(torch.full((2, 3), -math.log(3), dtype=D), P, torch.tensor([[0.9], [1.0]], dtype=D),
                   torch.tensor([[8.0], [4.0]], dtype=D), 1.0, 16, 200, 6, torch.Generator().manual_seed(0))
    assert torch.equal(traj, again)                  # the map asked for, with the generator's draws


def test_phase_averaging_in_phase_runs_do_not_flatten():
    # the null world of finite-sample-phase-averaging: runs that share their draws stay in phase,
    # so their average cycles as much as each run
    P = it.cyclic_preferences(0.4)[None]
    traj = it.plugin_rounds(torch.full((1, 3), -math.log(3), dtype=D), P, 1.0, 4.0, 1.0, 32, 400, 1,
                            torch.Generator().manual_seed(2)).expand(-1, 8, -1, -1)
    tail = traj[200:]
    single, averaged = it.cycle_strength(tail).mean(0), it.cycle_strength(tail.exp().mean(1).log())
    assert torch.allclose(single, averaged) and single.item() > 1e-2


def test_fixed_point_tolerance_shrinks_to_the_population_distance_with_many_samples():
    log_pi0 = _warm_world(prompts=2)
    P, alpha, beta, lam = it.cyclic_preferences(0.4), 0.3, 2.0, 0.5
    fixed = sim.prompt_fixed_points(log_pi0, P, alpha, beta, lam)
    pop = sim.population_rounds("ipo", log_pi0, P, alpha, beta, lam, 3)[-1]
    tight = sim.fixed_point_tolerance(log_pi0, P, alpha, beta, lam, 100000, 3, 50, seed=0)
    assert torch.allclose(tight, it.total_variation(pop, fixed), atol=5e-3)
    loose = sim.fixed_point_tolerance(log_pi0, P, alpha, beta, lam, 8, 3, 400, seed=0)
    median = sim.fixed_point_tolerance(log_pi0, P, alpha, beta, lam, 8, 3, 400, seed=0, level=0.5)
    assert (loose > median).all() and (loose > tight).all()


def test_ranking_helpers_on_random_matrices():
    g = torch.Generator().manual_seed(8)
    P = sim.random_transitive_preferences(50, 4, g)
    assert torch.allclose(P + P.transpose(-1, -2), torch.ones(50, 4, 4, dtype=D))
    assert all((P[:, i, j] > 0.5).all() for i in range(4) for j in range(i + 1, 4))
    mus = torch.distributions.Dirichlet(torch.ones(5, dtype=D)).sample((40,))
    ok, ratio = sim.fixed_sampler_failures(mus)
    assert ok == 1.0 and ratio >= 1 - 1e-12
    counterexample = torch.tensor([[0.5, 0.55, 0.55], [0.45, 0.5, 0.1], [0.45, 0.9, 0.5]], dtype=D)
    smith_ok, uniform_ok, sizes = sim.smith_success(counterexample[None])
    assert (smith_ok, uniform_ok, sizes) == (1.0, 0.0, "1: 1")
    assert sim.smith_success(it.cyclic_preferences(0.2)[None])[2] == "3: 1"


def test_ratio_comparison_holds_each_ratio_at_its_value():
    P = tabular.bradley_terry(torch.tensor([1.0, 0.5, 0.0], dtype=D))
    lams, ratios = torch.tensor([0.5, 1.0], dtype=D), torch.tensor([1.0, 4.0], dtype=D)
    H_kappa, H_gamma = sim.ratio_comparison(P, 0.5, lams, ratios)
    u = torch.full((3,), -math.log(3), dtype=D)
    for i, lam in enumerate(lams.tolist()):
        for j, r in enumerate(ratios.tolist()):
            for H, beta in ((H_kappa, r * 0.5 / lam), (H_gamma, r * 0.5)):
                z = it.fixed_point(u, u.exp(), P, 0.5, beta, lam)
                assert H[i, j].item() == pytest.approx(it.entropy(z).item(), abs=1e-8)
    assert torch.allclose(H_kappa[1], H_gamma[1])                  # at lam = 1 the two ratios agree


def test_rotation_expectation_is_a_probability_per_prompt():
    P = it.cyclic_preferences(0.4)
    log_pi0 = torch.full((2, 3), -math.log(3), dtype=D)
    p = sim.rotation_expectation(log_pi0, P, (0.0, 0.9, 3.0), 1.0, 32, 20, 100, seed=0)
    assert p.shape == (2,) and ((p >= 0) & (p <= 1)).all() and (p > 0.3).all()
    assert (sim.rotation_expectation(log_pi0, P, (0.0, 0.0, 0.5), 1.0, 32, 20, 50, seed=0) == 0).all()




def test_tie_share_counts_matrices_with_a_tie_off_the_diagonal():
    P = torch.full((3, 4, 4), 0.6, dtype=D)
    P[0, 0, 1] = 0.5
    assert sim.tie_share(P) == pytest.approx(1 / 3)


def test_unforced_entropy_cells_are_those_where_the_collapse_bounds_say_nothing():
    P = tabular.bradley_terry(torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.3, 0.2, 0.1, 0.0]], dtype=D))
    alphas, bls = torch.tensor([0.0, 0.5, 1.0], dtype=D), torch.tensor([0.5, 4.0, 20.0], dtype=D)
    cells = sim.unforced_entropy_cells(P, alphas, bls)
    assert cells.shape == (3, 3, 2) and not cells[2].any()          # alpha = 1: part 1 decides
    for i, j, m in itertools.product(range(2), range(3), range(2)):
        kappa = bls[j] / (1 - alphas[i])
        delta = it.transitivity_margins(P[m], 0)[1:]                # response 0 dominates
        vacuous = it.entropy_upper_bound(kappa * delta).item() >= math.log(4) - 1e-12
        assert bool(cells[i, j, m]) == vacuous
    assert cells[..., 1].sum() > cells[..., 0].sum()                # narrow margins leave more cells open


def test_gap_change_is_the_difference_of_optima_and_summation_by_parts_gives_it():
    g = torch.Generator().manual_seed(11)
    P = sim.random_preferences(6, 4, g)
    mu, mu_new = (torch.softmax(torch.randn(6, 4, generator=g, dtype=D), -1) for _ in range(2))
    ref = torch.log_softmax(torch.randn(6, 4, generator=g, dtype=D), -1)
    before, after = (tabular.ipo_optimum(ref, P, m, beta=1.7) for m in (mu, mu_new))
    direct = (after[..., :, None] - after[..., None, :]) - (before[..., :, None] - before[..., None, :])
    assert torch.allclose(sim.gap_change(P, mu, mu_new, 1.7), direct, atol=1e-12)
    assert torch.allclose(sim.tilt_differences(P, mu, mu_new, [2, 0, 3, 1], 1.7), direct, atol=1e-12)


def test_a_top_tilt_widens_the_top_gap_of_bradley_terry_and_on_policy_sampling_concentrates_it():
    g = torch.Generator().manual_seed(12)
    r = torch.sort(torch.randn(200, 4, generator=g, dtype=D), -1, descending=True).values
    P = tabular.bradley_terry(r)
    mu = torch.softmax(torch.randn(200, 4, generator=g, dtype=D), -1)
    w = torch.sort(torch.rand(200, 4, generator=g, dtype=D), -1, descending=True).values
    mu_new = mu * w / (mu * w).sum(-1, keepdim=True)                 # a non-increasing likelihood ratio
    assert (torch.cumsum(mu_new, -1) >= torch.cumsum(mu, -1) - 1e-12).all()    # mass moved to the top
    assert (sim.gap_change(P, mu, mu_new, 2.0)[:, 0, 1] >= -1e-12).all()
    assert (sim.on_policy_entropy_change(P, 2.0) < 0).all()
    flat = tabular.bradley_terry(torch.zeros(1, 4, dtype=D))         # no preference: nothing to concentrate
    assert sim.on_policy_entropy_change(flat, 2.0).abs().item() < 1e-12


def test_dpo_sampler_spread_vanishes_exactly_for_bradley_terry_and_the_departure_measures_that():
    g = torch.Generator().manual_seed(13)
    mus = torch.softmax(torch.randn(3, 4, generator=g, dtype=D), -1)
    bt = tabular.bradley_terry(torch.randn(5, 4, generator=g, dtype=D))
    other = sim.random_preferences(5, 4, g)
    assert (sim.dpo_sampler_spread(bt, mus, 0.7) < 1e-8).all()
    assert (sim.bradley_terry_departure(bt) < 1e-8).all()
    assert (sim.dpo_sampler_spread(other, mus, 0.7) > 1e-3).all()
    assert (sim.bradley_terry_departure(other) > 1e-3).all()
    # the optimum for mu, by gradient descent on the population loss, moves from the uniform one
    K, u = 4, torch.full((4,), -math.log(4), dtype=D)
    gd = tabular.minimise(lambda th: tabular.population_dpo_loss(th, u, other[0], mus[0], 0.7), u, steps=4000, lr=2.0)
    base = it.dpo_optimum(u, other[0], u.exp(), 0.7)
    assert (torch.log_softmax(gd, -1) - base).abs().max().item() == pytest.approx(
        (it.dpo_optimum(u, other[0], mus[0], 0.7) - base).abs().max().item(), abs=1e-4)
