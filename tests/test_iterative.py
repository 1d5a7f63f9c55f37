"""The formulas of prefdyn.theory.iterative against independent computations: gradient descent on the
population losses, autograd Jacobians of the map, brute-force enumeration, explicit loops."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prefdyn import objectives, tabular
from prefdyn.theory import iterative as it

D = torch.float64


def random_world(K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_ref = torch.log_softmax(torch.randn(K, generator=g, dtype=D), -1)
    A = torch.rand(K, K, generator=g, dtype=D) - 0.5
    P = 0.5 + (A - A.T) / 2                       # P + P^T = 1, not Bradley–Terry
    mu = torch.softmax(0.5 * torch.randn(K, generator=g, dtype=D), -1)
    pi = torch.log_softmax(torch.randn(K, generator=g, dtype=D), -1)
    return log_ref, P, mu, pi


def test_cyclic_preferences_is_rock_paper_scissors():
    P = it.cyclic_preferences(0.4)
    assert torch.allclose(P + P.T, torch.ones(3, 3, dtype=D))
    assert P[0, 1] == pytest.approx(0.9) and P[1, 2] == pytest.approx(0.9) and P[2, 0] == pytest.approx(0.9)
    assert torch.allclose(P @ torch.full((3,), 1 / 3, dtype=D), torch.full((3,), 0.5, dtype=D))
    with pytest.raises(ValueError):
        it.cyclic_preferences(0.6)


def test_mrs_ipo_step_is_the_gd_minimiser_of_the_population_loss_with_mixed_reference_and_sampler():
    log_ref, P, mu0, log_pi = random_world()
    alpha, beta, lam = 0.6, 1.7, 0.3
    ref = torch.log_softmax(alpha * log_pi + (1 - alpha) * log_ref, -1)
    mu = lam * log_pi.exp() + (1 - lam) * mu0
    gd = tabular.minimise(lambda th: tabular.population_ipo_loss(th, ref, P, mu, beta), ref, steps=6000, lr=2.0)
    step = it.mrs_ipo_step(log_pi, log_ref, mu0, P, alpha, beta, lam)
    assert (torch.log_softmax(gd, -1) - step).abs().max() < 1e-8
    # and it is the explicit formula softmax(alpha log pi + (1-alpha) log ref + beta P mu)
    explicit = torch.log_softmax(alpha * log_pi + (1 - alpha) * log_ref + beta * P @ mu, -1)
    assert torch.allclose(step, explicit, atol=1e-12)


def test_dpo_optimum_matches_gradient_descent_and_first_order_condition():
    log_ref, P, mu, _ = random_world(seed=1)
    beta = 0.8
    newton = it.dpo_optimum(log_ref, P, mu, beta)
    gd = tabular.minimise(lambda th: tabular.population_dpo_loss(th, log_ref, P, mu, beta), log_ref.clone(),
                          steps=20000, lr=8 / beta ** 2)
    assert (torch.log_softmax(gd, -1) - newton).abs().max() < 1e-6
    g = newton - log_ref
    lhs = (mu[None, :] * torch.sigmoid(beta * (g[:, None] - g[None, :]))).sum(-1)
    assert torch.allclose(lhs, P @ mu, atol=1e-10)


def test_dpo_optimum_is_sampling_invariant_for_bradley_terry_only():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(4, generator=g, dtype=D)
    log_ref = torch.log_softmax(torch.randn(4, generator=g, dtype=D), -1)
    mus = [torch.softmax(torch.randn(4, generator=g, dtype=D), -1) for _ in range(3)]
    bt = [it.dpo_optimum(log_ref, tabular.bradley_terry(r), m, 0.5) for m in mus]
    assert all(torch.allclose(b, tabular.rlhf_optimum(log_ref, r, 0.5), atol=1e-9) for b in bt)
    P = it.cyclic_preferences(0.3, K=4)
    cyc = [it.dpo_optimum(log_ref, P, m, 0.5) for m in mus]
    assert (cyc[0] - cyc[1]).abs().max() > 1e-3


def test_newton_leaves_untouched_directions_where_gradient_descent_leaves_them():
    # only responses 0 and 1 are ever compared: logits 2 and 3 must not move relative to each other
    W = torch.zeros(1, 4, 4, dtype=D)
    W[0, 0, 1] = 0.7
    W[0, 1, 0] = 0.3
    ref = torch.zeros(1, 4, dtype=D)
    x0 = torch.tensor([0.1, -0.2, 0.5, -1.0], dtype=D)
    fit = it.minimise_newton(lambda z: it.pair_table_loss(z[None], ref, W, "ipo", 2.0), x0)
    gd = tabular.minimise(lambda z: it.pair_table_loss(z[None], ref, W, "ipo", 2.0), x0, steps=3000, lr=0.2)
    assert torch.allclose(fit, gd, atol=1e-8)
    assert fit[2] == pytest.approx(0.5) and fit[3] == pytest.approx(-1.0)


def test_quotient_jacobian_matches_autograd_of_the_map():
    log_ref, P, mu0, log_pi = random_world(seed=4)
    alpha, beta, lam = 0.7, 2.5, 0.6

    def F_logits(z):                               # the map on logits (log pi up to a constant)
        return it.mrs_ipo_step(F.log_softmax(z, -1), log_ref, mu0, P, alpha, beta, lam)

    J = torch.autograd.functional.jacobian(F_logits, log_pi)
    B = it._centring_basis(4)
    Q = torch.eye(4, dtype=D) - 0.25                 # outputs compared modulo constants
    assert torch.allclose(B.T @ Q @ J @ B, it.quotient_jacobian(log_pi, P, alpha, beta, lam), atol=1e-10)


@pytest.mark.parametrize("alpha,a,bl", [(0.3, 0.4, 2.0), (0.9, 0.4, 4.0), (1.0, 0.1, 1.0), (0.0, 0.25, 7.0)])
def test_oscillation_index_is_the_squared_spectral_radius_at_uniform(alpha, a, bl):
    P = it.cyclic_preferences(a)
    u = torch.full((3,), -math.log(3), dtype=D)
    rho = it.spectral_radius(it.quotient_jacobian(u, P, alpha, bl, 1.0))
    assert rho ** 2 == pytest.approx(float(it.ipo_oscillation_index(alpha, a, bl)), abs=1e-12)


def test_dpo_oscillation_index_matches_finite_difference_jacobian_of_the_dpo_map():
    a, alpha, beta, lam = 0.3, 0.5, 0.7, 0.8
    P = it.cyclic_preferences(a)
    u = torch.full((3,), -math.log(3), dtype=D)
    B = it._centring_basis(3)
    eps = 1e-5
    cols = []
    for k in range(2):
        dz = eps * B[:, k]
        plus = it.mrs_dpo_step(F.log_softmax(u + dz, -1), u, u.exp(), P, alpha, beta, lam)
        minus = it.mrs_dpo_step(F.log_softmax(u - dz, -1), u, u.exp(), P, alpha, beta, lam)
        cols.append(B.T @ (plus - minus) / (2 * eps))
    J = torch.stack(cols, 1)
    rho2 = it.spectral_radius(J) ** 2
    assert rho2 == pytest.approx(float(it.dpo_oscillation_index(alpha, a, lam / beta)), rel=1e-6)


def test_contraction_factor_bounds_the_map_lipschitz_constant_in_quotient_norm():
    log_ref, P, mu0, _ = random_world(seed=5)
    alpha, beta, lam = 0.4, 1.5, 0.7
    c = it.contraction_factor(alpha, beta, lam, P)
    g = torch.Generator().manual_seed(6)
    Q = torch.eye(4, dtype=D) - 0.25
    worst = 0.0
    for _ in range(300):
        z1, z2 = (torch.randn(4, generator=g, dtype=D) * 2 for _ in range(2))
        f1 = it.mrs_ipo_step(F.log_softmax(z1, -1), log_ref, mu0, P, alpha, beta, lam)
        f2 = it.mrs_ipo_step(F.log_softmax(z2, -1), log_ref, mu0, P, alpha, beta, lam)
        worst = max(worst, ((Q @ (f1 - f2)).norm() / (Q @ (z1 - z2)).norm()).item())
    assert worst <= c + 1e-12
    assert worst > alpha  # the bound is not vacuous here


def test_fixed_point_solves_its_equation():
    log_ref, P, mu0, _ = random_world(seed=7)
    alpha, beta, lam = 0.5, 3.0, 0.6
    z = it.fixed_point(log_ref, mu0, P, alpha, beta, lam)
    rhs = F.log_softmax(log_ref + beta / (1 - alpha) * P @ (lam * z.exp() + (1 - lam) * mu0), -1)
    assert torch.allclose(z, rhs, atol=1e-11)
    assert torch.allclose(it.mrs_ipo_step(z, log_ref, mu0, P, alpha, beta, lam), z, atol=1e-11)


def test_strong_transitivity_and_margins_by_brute_force():
    r = torch.tensor([2.0, 0.5, -1.0, 1.0], dtype=D)
    P = tabular.bradley_terry(r)
    order = torch.argsort(r, descending=True).tolist()
    assert it.is_strongly_transitive(P, order, strict=True)
    assert not it.is_strongly_transitive(it.cyclic_preferences(0.2), [0, 1, 2])
    d = it.transitivity_margins(P, 0)
    brute = torch.tensor([min(P[0, k] - P[j, k] for k in range(4)) for j in range(4)], dtype=D)
    assert torch.allclose(d, brute) and d[0] == 0 and (d[1:] > 0).all()


def test_entropy_upper_bound_holds_on_random_policies():
    g = torch.Generator().manual_seed(8)
    for K in (2, 3, 5):
        logits = 4 * torch.randn(2000, K, generator=g, dtype=D)
        logits[:, 0] += 3
        log_pi = F.log_softmax(logits, -1)
        top = log_pi.argmax(-1) == 0
        odds = (log_pi[:, :1] - log_pi[:, 1:])[top]
        H = it.entropy(log_pi[top])
        assert (H <= it.entropy_upper_bound(odds) + 1e-12).all()
        slack = it.entropy_upper_bound(odds - 0.5)   # weaker lower bounds on the odds: still an upper bound
        assert (H <= slack + 1e-12).all()


def test_entropy_total_variation_ranking_accuracy_by_hand():
    log_pi = torch.log(torch.tensor([0.5, 0.25, 0.25], dtype=D))
    assert it.entropy(log_pi).item() == pytest.approx(1.5 * math.log(2))
    q = torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=D))
    assert it.total_variation(log_pi, q).item() == pytest.approx(0.3)
    P = tabular.bradley_terry(torch.tensor([0.0, 1.0, 2.0], dtype=D))   # 2 > 1 > 0
    assert it.ranking_accuracy(q, P).item() == pytest.approx(1.0)
    assert it.ranking_accuracy(q.flip(0), P).item() == pytest.approx(0.0)
    assert it.ranking_accuracy(log_pi, P).item() == pytest.approx(0.0)   # 0.25 = 0.25 is a tie: wrong


def test_logit_gaps_match_the_optimum():
    log_ref, P, mu, _ = random_world(seed=9)
    beta = 1.3
    opt = tabular.ipo_optimum(log_ref, P, mu, beta)
    assert torch.allclose(it.logit_gaps(log_ref, P, mu, beta), opt[:, None] - opt[None, :], atol=1e-12)


def test_pair_counts_and_table_loss_equal_an_explicit_loop():
    P = it.cyclic_preferences(0.4)
    samples = [[0, 1, 1, 2, -1, 0], [2, 2, -1]]
    W = it.pair_counts(samples, P, np.random.default_rng(0))
    rng = np.random.default_rng(0)                  # re-draw the same labels by hand
    c = np.array([0, 1, 1, 2, 0])
    s_all, t_all = np.triu_indices(5, 1)
    differ = c[s_all] != c[t_all]
    s, t = s_all[differ], t_all[differ]
    first = rng.random(len(s)) < P.numpy()[c[s], c[t]]
    lp = torch.log_softmax(torch.randn(2, 3, dtype=D), -1)
    ref = torch.randn(2, 3, dtype=D)
    for loss, fn in (("ipo", lambda w, l: objectives.ipo_loss(lp[0, w], lp[0, l], ref[0, w], ref[0, l], beta=2.0)),
                     ("dpo", lambda w, l: objectives.dpo_loss(lp[0, w], lp[0, l], ref[0, w], ref[0, l], beta=2.0))):
        explicit = sum(fn(c[i], c[j]) if f else fn(c[j], c[i]) for i, j, f in zip(s, t, first)) / len(s_all)
        assert it.pair_table_loss(lp, ref, W, loss, 2.0).item() == pytest.approx(float(explicit), rel=1e-12)
    assert W[0].sum().item() == pytest.approx(len(s) / len(s_all))
    assert W[1].sum() == 0     # two equal candidates: nothing to learn


def test_soft_pair_counts_are_the_expected_hard_counts():
    P = it.cyclic_preferences(0.4)
    samples = [[0, 1, 1, 2, -1, 0, 2]]
    soft = it.pair_counts(samples, P, soft=True)
    hard = torch.stack([it.pair_counts(samples, P, np.random.default_rng(k)) for k in range(4000)]).mean(0)
    assert torch.allclose(soft, hard, atol=0.01)
    c = [0, 1, 1, 2, 0, 2]
    n = len(c) * (len(c) - 1) / 2
    brute = torch.zeros(3, 3, dtype=D)
    for i in range(len(c)):
        for j in range(i + 1, len(c)):
            if c[i] != c[j]:
                brute[c[i], c[j]] += P[c[i], c[j]] / n
                brute[c[j], c[i]] += P[c[j], c[i]] / n
    assert torch.allclose(soft[0], brute, atol=1e-15)


def test_iterate_at_alpha_one_collapses_with_the_proved_rate():
    r = torch.tensor([1.0, 0.3, -0.5, 0.0], dtype=D)
    P = tabular.bradley_terry(r)
    log_pi0 = F.log_softmax(torch.tensor([0.0, 1.0, 0.5, 0.2], dtype=D), -1)
    beta, lam = 2.0, 0.5
    traj = it.iterate(it.mrs_ipo_step, log_pi0, 40, P=P, alpha=1.0, beta=beta, lam=lam)
    delta = it.transitivity_margins(P, 0)[1:]
    for t in range(41):
        odds = traj[t, 0] - traj[t, 1:]
        assert (odds >= (log_pi0[0] - log_pi0[1:]) + t * beta * delta - 1e-9).all()
        assert it.entropy(traj[t]) <= it.entropy_upper_bound((log_pi0[0] - log_pi0[1:]) + t * beta * delta) + 1e-12
    assert it.entropy(traj[-1]) < 1e-3


def test_oscillation_ratio_separates_contracting_and_growing_orbits():
    P = it.cyclic_preferences(0.4)
    u = torch.full((3,), -math.log(3), dtype=D)
    start = F.log_softmax(u + torch.tensor([1e-3, 0, 0], dtype=D), -1)
    stable = it.iterate(it.mrs_ipo_step, start, 400, log_pi_ref=u, mu0=u.exp(), P=P, alpha=0.3, beta=2.0, lam=1.0)
    wild = it.iterate(it.mrs_ipo_step, start, 400, log_pi_ref=u, mu0=u.exp(), P=P, alpha=0.9, beta=4.0, lam=1.0)
    assert it.oscillation_ratio(stable, u) < 0.5
    assert it.oscillation_ratio(wild, u) > 0.9
    fast = it.iterate(it.mrs_ipo_step, start, 400, log_pi_ref=u, mu0=u.exp(), P=P, alpha=0.0, beta=0.5, lam=1.0)
    assert it.oscillation_ratio(fast, u) == 0.0          # converged to round-off: not an oscillation


@pytest.mark.parametrize("step", [it.mrs_ipo_step, it.mrs_dpo_step])
def test_a_batch_of_alphas_and_betas_iterates_like_each_cell_alone(step):
    """The chapter's phase diagram runs every (alpha, beta) cell in one batch: same orbits and ratios
    as one scalar run per cell."""
    P = it.cyclic_preferences(0.4)
    u = torch.full((3,), -math.log(3), dtype=D)
    start = F.log_softmax(u + torch.tensor([1e-3, 0, 0], dtype=D), -1)
    cells = torch.cartesian_prod(torch.tensor([0.0, 0.5, 0.9], dtype=D), torch.tensor([0.5, 3.0], dtype=D))
    batch = it.iterate(step, start.expand(len(cells), 3), 60, log_pi_ref=u, mu0=u.exp(), P=P,
                       alpha=cells[:, :1], beta=cells[:, 1:], lam=1.0)
    ratios = it.oscillation_ratio(batch, u)
    assert ratios.shape == (len(cells),)
    for i, (alpha, beta) in enumerate(cells.tolist()):
        alone = it.iterate(step, start, 60, log_pi_ref=u, mu0=u.exp(), P=P, alpha=alpha, beta=beta, lam=1.0)
        assert torch.allclose(batch[:, i], alone, atol=1e-12)
        assert float(ratios[i]) == pytest.approx(float(it.oscillation_ratio(alone, u)), rel=1e-6)   # a ratio of small deviations


def smith_by_reachability(P):
    """The Smith set as the responses that reach every other along strict wins (the top strongly
    connected component of the majority graph), by transitive closure."""
    K = len(P)
    reach = (P > 0.5).numpy() | np.eye(K, dtype=bool)
    for k in range(K):
        reach = reach | (reach[:, [k]] & reach[[k], :])
    return sorted(i for i in range(K) if reach[i].all())


def test_smith_set_is_the_set_of_responses_that_reach_all_others():
    g = torch.Generator().manual_seed(11)
    sizes = set()
    for _ in range(200):
        A = torch.rand(5, 5, generator=g, dtype=D) - 0.5
        P = 0.5 + (A - A.T) / 2
        S = it.smith_set(P)
        assert S == smith_by_reachability(P)
        sizes.add(len(S))
    assert {1, 3} <= sizes                       # Condorcet winners and genuine cycles both occur
    assert it.smith_set(it.cyclic_preferences(0.3)) == [0, 1, 2]
    with pytest.raises(ValueError, match="tie"):
        it.smith_set(torch.full((3, 3), 0.5, dtype=D))


def test_smith_sampler_is_a_minimax_strategy_on_the_smith_set_and_puts_it_on_top():
    g = torch.Generator().manual_seed(12)
    for _ in range(100):
        A = torch.rand(5, 5, generator=g, dtype=D) - 0.5
        P = 0.5 + (A - A.T) / 2
        mu, S, gap = it.smith_sampler(P, eta=0.0)
        rest = [j for j in range(5) if j not in S]
        assert mu.sum().item() == pytest.approx(1.0) and (mu >= -1e-12).all()
        if rest:
            assert mu[rest].abs().max().item() < 1e-12
        assert ((P @ mu)[S] >= 0.5 - 1e-9).all()                   # every member wins at least half
        if rest:
            assert gap == pytest.approx(min(0.5 - P[j, k].item() for j in rest for k in S))
            mu_eta, _, _ = it.smith_sampler(P)                      # eta = 0.9 g/(1+g)
            s = P @ mu_eta
            assert s[S].min() - s[rest].max() >= 0.1 * gap / (1 + gap) * (1 - 1e-9)   # (1-eta)g - eta


def test_condorcet_counterexample_defeats_every_sampler_by_its_proved_margin():
    g = torch.Generator().manual_seed(13)
    for K in (3, 4, 6):
        for _ in range(50):
            mu = torch.distributions.Dirichlet(torch.full((K,), 0.3, dtype=D)).sample()
            P, c, b = it.condorcet_counterexample(mu, delta=0.2)
            assert torch.allclose(P + P.T, torch.ones(K, K, dtype=D))
            assert all(P[c, j] > 0.5 for j in range(K) if j != c)
            if K == 3:                               # no ties among the others: a Smith set of one
                assert it.smith_set(P) == [c]
            s = P @ mu
            assert (s[b] - s[c]).item() >= mu.max().item() * (0.5 - 0.2) / 2 - 1e-12
    with pytest.raises(ValueError):
        it.condorcet_counterexample(torch.tensor([0.5, 0.5], dtype=D))


def test_no_sampler_orders_the_transitive_example_by_lp_and_by_a_grid():
    P = it.TRANSITIVE_NO_SAMPLER
    assert torch.allclose(P + P.T, torch.ones(4, 4, dtype=D))
    assert all(P[i, j] > 0.5 for i in range(4) for j in range(i + 1, 4))
    assert not it.is_strongly_transitive(P, [0, 1, 2, 3])
    value, mu = it.best_order_gap(P, [0, 1, 2, 3])
    gaps = (P[:-1] - P[1:]) @ mu
    assert gaps.min().item() == pytest.approx(value, abs=1e-9)        # the LP's sampler attains it
    assert value <= -0.025 + 1e-12
    n = 40                                                          # every sampler on a simplex grid
    grid = torch.tensor([c for c in itertools.product(range(n + 1), repeat=3) if sum(c) <= n], dtype=D)
    mus = torch.cat([grid, n - grid.sum(1, keepdim=True)], 1) / n
    worst = ((mus @ P.T)[:, :-1] - (mus @ P.T)[:, 1:]).min(1).values
    assert worst.max().item() <= value + 1e-12
    assert ((mus @ P.T)[:, 0] - (mus @ P.T)[:, 1] + (mus @ P.T)[:, 2] - (mus @ P.T)[:, 3]).max() <= -0.05 + 1e-12
    bt = tabular.bradley_terry(torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=D))   # strongly transitive
    assert it.best_order_gap(bt, [0, 1, 2, 3])[0] > 0


def test_monotone_entropy_threshold_is_the_root_and_entropy_falls_below_it():
    for K in (3, 4, 6):
        e = it.monotone_entropy_threshold(K)
        h = -(e * math.log(e) + (1 - e) * math.log(1 - e))
        assert e == pytest.approx(math.exp(-(h + e * math.log(K - 1))), abs=1e-9)
        g = torch.Generator().manual_seed(K)
        for _ in range(300):                        # policies with less than e off the top response
            z = torch.randn(K, generator=g, dtype=D) * 2
            z[0] = torch.logsumexp(z[1:], 0) + math.log((1 - e) / e) + torch.rand(1, generator=g).item() * 4
            L = (z[0] - z[1:]).clone().requires_grad_(True)
            log_pi = F.log_softmax(torch.cat([torch.zeros(1, dtype=D), -L]), -1)
            assert 1 - log_pi[0].exp().item() < e
            (grad,) = torch.autograd.grad(it.entropy(log_pi), L)
            assert (grad < 0).all()                 # raising any log-odds of the top lowers H
    assert it.monotone_entropy_threshold(2) == 0.5


def test_collapse_burn_in_is_the_first_round_the_proved_sum_is_small_and_entropy_then_falls():
    P = tabular.bradley_terry(torch.tensor([1.2, 0.8, 0.1, 0.0], dtype=D))
    log_pi0 = F.log_softmax(torch.tensor([0.0, 1.0, 2.0, 2.5], dtype=D), -1)
    beta, lam = 1.5, 0.3
    delta = it.transitivity_margins(P, 0)[1:]
    L0 = log_pi0[0] - log_pi0[1:]
    t0 = it.collapse_burn_in(L0, beta, delta)
    eps = it.monotone_entropy_threshold(4)
    sums = [torch.exp(-L0 - t * beta * delta).sum().item() for t in range(t0 + 1)]
    assert sums[-1] < eps and all(x >= eps for x in sums[:-1])
    traj = it.iterate(it.mrs_ipo_step, log_pi0, t0 + 60, P=P, alpha=1.0, beta=beta, lam=lam)
    H = it.entropy(traj)
    assert (H[t0 + 1:] < H[t0:-1]).all()
    assert H[1] > H[0]                               # before the burn-in it can rise
    with pytest.raises(ValueError):
        it.collapse_burn_in(L0, beta, torch.tensor([0.1, 0.0, 0.2], dtype=D))


def test_kl_from_uniform_is_the_kl_divergence_and_grows_at_alpha_one_on_the_cycle():
    log_pi = F.log_softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=D), -1)
    u = torch.full((3,), 1 / 3, dtype=D)
    brute = (u * (u.log() - log_pi)).sum(-1)
    assert torch.allclose(it.kl_from_uniform(log_pi), brute, atol=1e-14)
    P = it.cyclic_preferences(0.3)
    start = F.log_softmax(torch.tensor([0.2, 0.0, -0.1], dtype=D), -1)
    for lam in (0.3, 1.0):
        traj = it.iterate(it.mrs_ipo_step, start, 80, log_pi_ref=u.log(), mu0=u, P=P, alpha=1.0, beta=2.0, lam=lam)
        assert (it.kl_from_uniform(traj).diff() > 0).all()
    still = it.iterate(it.mrs_ipo_step, u.log(), 5, log_pi_ref=u.log(), mu0=u, P=P, alpha=1.0, beta=2.0, lam=1.0)
    assert torch.allclose(it.kl_from_uniform(still), torch.zeros(6, dtype=D), atol=1e-14)


def test_cycle_strength_is_the_variance_over_rounds_averaged_over_candidates():
    pis = torch.tensor([[[0.8, 0.2], [0.5, 0.5]], [[0.2, 0.8], [0.5, 0.5]]], dtype=D)   # (rounds+1, prompts, K)
    # prompt 0 alternates 0.8 <-> 0.2 (variance 0.09 per candidate); prompt 1 stands still
    assert torch.allclose(it.cycle_strength(pis.log()), torch.tensor([0.09, 0.0], dtype=D), atol=1e-15)
    longer = torch.cat([torch.full((3, 2, 2), 0.5, dtype=D), pis]).log()
    assert torch.allclose(it.cycle_strength(longer, burn_in=3), it.cycle_strength(pis.log()), atol=1e-15)


def test_cyclic_advances_counts_net_changes_of_clear_leaders_in_cyclic_order():
    P = it.cyclic_preferences(0.4)              # 0 beats 1, 1 beats 2, 2 beats 0: on-policy goes 0 -> 2 -> 1 -> 0
    def path(leaders, top=0.8):
        rows = [[top if k == l else (1 - top) / 2 for k in range(3)] for l in leaders]
        return torch.tensor(rows, dtype=D).log()[:, None, :]
    assert it.cyclic_advances(path([0, 2, 1, 0]), P).item() == 3
    assert it.cyclic_advances(path([0, 1, 2, 0]), P).item() == 0            # against the cycle
    assert it.cyclic_advances(path([0, 1, 0, 2, 1, 0, 2]), P).item() == 5   # -1, then +5 from there
    assert it.cyclic_advances(path([0, 2, 1, 0], top=0.4), P).item() == 0   # no clear leader
    mixed = torch.cat([path([0, 2]), path([1], top=0.4), path([1, 0])])
    assert it.cyclic_advances(mixed, P).item() == 3                         # unclear rounds skipped
    assert it.cyclic_advances(torch.cat([path([0, 2, 1, 0]), path([0, 1, 2, 0])], 1), P).tolist() == [3, 0]


def test_preference_matrices_follow_the_papers_recipe_with_the_same_draws():
    scores = np.random.default_rng(0).integers(0, 5, size=(6, 4, 5))
    P, attr = it.preference_matrices(scores, np.random.default_rng(7))
    draws = np.random.default_rng(7).integers(0, 5, size=(6, 6))
    assert np.array_equal(attr, draws)
    for n in range(6):
        for p, (i, j) in enumerate(zip(*np.triu_indices(4, 1))):
            d = scores[n, i, draws[n, p]] - scores[n, j, draws[n, p]]
            assert P[n, i, j].item() == pytest.approx(1 / (1 + math.exp(-d)))
            assert P[n, j, i].item() == pytest.approx(1 / (1 + math.exp(d)))
        assert (P[n].diagonal() == 0.5).all()


def test_is_cyclic_and_strongly_transitive_against_enumerating_orders():
    g = torch.Generator().manual_seed(5)
    raw = torch.randint(-2, 3, (300, 4, 4), generator=g).to(D)
    P = torch.sigmoid(torch.triu(raw, 1) - torch.triu(raw, 1).transpose(-1, -2))   # ties where raw = 0
    for p, cyc, strong in zip(P, it.is_cyclic(P), it.strongly_transitive(P)):
        wins = [(i, j) for i in range(4) for j in range(4) if p[i, j] > 0.5]
        acyclic = any(all(o.index(i) < o.index(j) for i, j in wins) for o in itertools.permutations(range(4)))
        assert bool(cyc) == (not acyclic)
        assert bool(strong) == any(it.is_strongly_transitive(p, o) for o in itertools.permutations(range(4)))
    assert it.is_cyclic(it.cyclic_preferences(0.2)[None]).item()
    assert it.strongly_transitive(tabular.bradley_terry(torch.tensor([0.0, 2.0, 1.0], dtype=D))[None]).item()


def test_sampled_ipo_round_is_the_newton_minimiser_of_the_sampled_loss():
    P = 0.5 + (lambda A: (A - A.T) / 2)(torch.rand(4, 4, generator=torch.Generator().manual_seed(2), dtype=D) - 0.5)
    g = torch.Generator().manual_seed(3)
    for counts in ([3, 0, 5, 1], [2, 2, 2, 2], [0, 0, 4, 1], [0, 6, 0, 0]):
        log_pi = F.log_softmax(torch.randn(4, generator=g, dtype=D), -1)
        ref = F.log_softmax(torch.randn(4, generator=g, dtype=D), -1)
        samples = [[k for k, c in enumerate(counts) for _ in range(c)]]
        W = it.pair_counts(samples, P, soft=True)
        newton = it.minimise_newton(lambda z: it.pair_table_loss(z[None], ref[None], W, "ipo", 1.7), log_pi)
        closed = it.sampled_ipo_round(log_pi, ref, torch.tensor(counts, dtype=D), P, 1.7)
        assert torch.allclose(F.log_softmax(newton, -1), closed, atol=1e-9), counts


def test_sampled_rounds_are_seeded_and_follow_the_population_map_with_many_samples():
    P = it.cyclic_preferences(0.3)
    log_pi0 = F.log_softmax(torch.tensor([0.3, -0.1, 0.0], dtype=D), -1)
    run = lambda seed, n: it.sampled_rounds(log_pi0, P, 0.5, 2.0, 0.6, n, 4, 3, torch.Generator().manual_seed(seed))
    assert run(0, 10).shape == (5, 3, 3) and torch.equal(run(0, 10), run(0, 10))
    assert not torch.equal(run(0, 10), run(1, 10))
    pop = it.iterate(it.mrs_ipo_step, log_pi0, 4, P=P, alpha=0.5, beta=2.0, lam=0.6,
                     mu0=torch.full((3,), 1 / 3, dtype=D))
    assert (run(2, 200000).exp() - pop.exp()[:, None]).abs().max() < 0.01


def test_plugin_round_is_the_ipo_optimum_for_the_empirical_sampler_and_moves_every_response():
    log_ref, P, _, log_pi = random_world(seed=9)
    counts = torch.tensor([0.0, 5.0, 0.0, 3.0], dtype=D)
    step = it.plugin_round(log_pi, log_ref, counts, P, 1.3)
    assert torch.allclose(step, tabular.ipo_optimum(log_ref, P, counts / 8, beta=1.3), atol=1e-12)
    # the same round of the sampled-loss minimiser leaves the unsampled responses' logits alone
    sampled = it.sampled_ipo_round(log_pi, log_ref, counts, P, 1.3)
    assert torch.allclose((sampled - log_pi)[0] - (sampled - log_pi)[2], torch.zeros((), dtype=D), atol=1e-12)
    assert not torch.allclose((step - log_pi)[0], (step - log_pi)[2])


def test_plugin_rounds_follow_the_population_map_with_many_samples_and_draw_like_the_sampled_map():
    P = it.cyclic_preferences(0.3)
    log_pi0 = F.log_softmax(torch.tensor([0.3, -0.1, 0.0], dtype=D), -1)
    run = lambda fn, seed, n: fn(log_pi0, P, 0.5, 2.0, 0.6, n, 4, 3, torch.Generator().manual_seed(seed))
    pop = it.iterate(it.mrs_ipo_step, log_pi0, 4, P=P, alpha=0.5, beta=2.0, lam=0.6,
                     mu0=torch.full((3,), 1 / 3, dtype=D))
    assert (run(it.plugin_rounds, 2, 200000).exp() - pop.exp()[:, None]).abs().max() < 0.01
    # one round from the same state and generator: the same draws, so a round with every candidate
    # drawn gives the plug-in update's logits up to the shift the sampled minimiser keeps
    a, b = run(it.plugin_rounds, 5, 400)[1], run(it.sampled_rounds, 5, 400)[1]
    assert torch.allclose(a, b, atol=1e-12)


def test_a_round_with_one_distinct_candidate_changes_nothing_and_the_sampled_map_freezes_near_a_vertex():
    log_ref, P, _, log_pi = random_world(seed=10)
    assert torch.equal(it.sampled_ipo_round(log_pi, log_ref, torch.tensor([0.0, 7.0, 0.0, 0.0], dtype=D), P, 2.0),
                       F.log_softmax(log_pi, -1))
    vertex = F.log_softmax(torch.tensor([12.0, 0.0, 0.0], dtype=D), -1)       # pi(0) = 1 - 1.2e-5
    g = torch.Generator().manual_seed(4)
    stuck = it.sampled_rounds(vertex, it.cyclic_preferences(0.4), 1.0, 8.0, 1.0, 32, 20, 50, g)
    moving = it.plugin_rounds(vertex, it.cyclic_preferences(0.4), 1.0, 8.0, 1.0, 32, 20, 50, g)
    assert it.frozen(stuck, 10).double().mean() > 0.9         # all 32 draws coincide: (1 - 1.2e-5)^32
    assert not it.frozen(moving, 10).any()
    assert it.frozen(stuck, 10).shape == (50,)


def test_fixed_point_takes_a_batch_of_betas_and_lams():
    log_ref, P, mu0, _ = random_world(seed=8)
    betas = torch.tensor([[0.5], [2.0], [4.0]], dtype=D)
    lams = torch.tensor([[1.0], [0.5], [0.2]], dtype=D)
    batch = it.fixed_point(log_ref.expand(3, 4), mu0, P, 0.4, betas, lams)
    for k in range(3):
        alone = it.fixed_point(log_ref, mu0, P, 0.4, betas[k].item(), lams[k].item())
        assert torch.allclose(batch[k], alone, atol=1e-10)
