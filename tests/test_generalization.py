"""The formulas of prefdyn.theory.generalization against independent computations: autograd on an explicit
softmax, brute force over one-hot vectors, scipy's ODE solver, Monte Carlo, closed forms."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prefdyn.theory import dynamics as dyn
from prefdyn.theory import generalization as gen


def small(K=3, Q=5, d=8, v=0.2, l_b=0.5, shared=False, seed=0):
    return gen.cluster_data(K, Q, d, v, l_b, shared_tokens=shared, seed=seed)


def test_cluster_data_means_tokens_and_common_random_numbers():
    data = small(K=3, Q=4, d=6, v=0.0)
    assert data.features.shape == (24, 6) and data.vocab == 6
    assert torch.allclose(data.features, data.means[data.cluster])
    # concepts orthonormal, orthogonal to b = l_b e_0; swapped preferences within a pair
    c = (data.means[0::2] - data.means[1::2]) / 2
    assert torch.allclose(c @ c.T, torch.eye(3, dtype=torch.float64))
    assert torch.allclose((data.means[0::2] + data.means[1::2]) / 2 @ c.T, torch.zeros(3, 3, dtype=torch.float64))
    assert data.chosen_of.tolist() == [0, 1, 2, 3, 4, 5] and data.rejected_of.tolist() == [1, 0, 3, 2, 5, 4]
    shared = small(K=3, shared=True)
    assert shared.vocab == 2 and set(shared.chosen_of.tolist()) == {0, 1}
    a, b = small(v=0.1, seed=4), small(v=0.3, seed=4)
    assert torch.allclose((a.features - a.means[a.cluster]) * 3, b.features - b.means[b.cluster])


def test_preference_overlap_equals_one_hot_inner_products():
    g = torch.Generator().manual_seed(1)
    V = 5
    cw, cl = torch.randint(V, (30,), generator=g), torch.randint(V, (30,), generator=g)
    keep = cw != cl
    cw, cl = cw[keep], cl[keep]
    Y = F.one_hot(cw, V).double() - F.one_hot(cl, V).double()
    assert torch.equal(gen.preference_overlap(cw, cl, cw, cl), Y @ Y.T)
    assert set(torch.unique(Y @ Y.T).tolist()) <= {-2.0, -1.0, 0.0, 1.0, 2.0}


def test_gd_dpo_margins_match_autograd_explicit_softmax():
    """Margins of gd_dpo equal beta*(log-ratio differences) of autograd GD on a full softmax head."""
    data = small(K=2, Q=6, d=5)
    beta, lr, steps = 0.8, 0.7, 5
    W0 = torch.randn(data.vocab, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    Ws = dyn.explicit_softmax_dpo(W0, data.features, data.chosen, data.rejected, beta=beta, lr=lr, steps=steps)
    run = gen.gd_dpo(data.features, data.chosen, data.rejected, vocab=data.vocab, beta=beta, lr=lr, steps=steps,
                     keep_weights=True)
    rows = torch.arange(len(data.features))
    ref = torch.log_softmax(data.features @ W0.T, -1)
    for t, W in enumerate(Ws):
        lp = torch.log_softmax(data.features @ W.T, -1) - ref
        r = beta * (lp[rows, data.chosen] - lp[rows, data.rejected])
        assert torch.allclose(run.train[t], r, atol=1e-12)


def test_pair_blocks_margins_and_sums_by_brute_force():
    """Unequal pair sizes, shuffled rows, a pair with one sample: same margins as the definition."""
    g = torch.Generator().manual_seed(5)
    N, d, V = 23, 4, 5
    G = torch.randn(N, d, generator=g, dtype=torch.float64)
    chosen = torch.randint(0, V, (N,), generator=g)
    rejected = (chosen + torch.randint(1, V, (N,), generator=g)) % V
    chosen[0], rejected[0] = 4, 3                     # make sure one pair occurs once
    chosen[1:][(chosen[1:] == 4) & (rejected[1:] == 3)] = 0
    blocks = gen.PairBlocks.of(G, chosen, rejected)
    dW = torch.randn(V, d, generator=g, dtype=torch.float64)
    assert torch.allclose(blocks.margins(dW, 0.7), gen.margins(dW, G, chosen, rejected, 0.7), atol=1e-14)
    w = torch.rand(N, generator=g, dtype=torch.float64)
    for p, (cw, cl) in enumerate(blocks.pairs.tolist()):
        rows = (chosen == cw) & (rejected == cl)
        assert torch.allclose(blocks.pair_sums(w)[p], (w[rows, None] * G[rows]).sum(0), atol=1e-14)
    assert len(blocks.pairs) == len(set(zip(chosen.tolist(), rejected.tolist())))


def test_kernel_recursion_equals_weight_space_gd_on_train_and_test():
    data, test = small(K=3, Q=7, d=9, v=0.3, seed=1), small(K=3, Q=4, d=9, v=0.3, seed=2)
    beta, lr, steps = 1.3, 2.0, 12
    run = gen.gd_dpo(data.features, data.chosen, data.rejected, vocab=data.vocab, beta=beta, lr=lr, steps=steps,
                     tests=[(test.features, test.chosen, test.rejected)])
    C = gen.margin_kernel(data.features, data.chosen, data.rejected, data.features, data.chosen, data.rejected)
    X = gen.margin_kernel(test.features, test.chosen, test.rejected, data.features, data.chosen, data.rejected)
    r, (rt,) = gen.kernel_recursion(C, beta, lr, steps, cross=[X])
    assert torch.allclose(r, run.train, atol=1e-12) and torch.allclose(rt, run.tests[0], atol=1e-12)
    # the kernel is PSD (Hadamard product of two Gram matrices)
    assert torch.linalg.eigvalsh(C).min() > -1e-9


def test_gradient_flow_is_the_small_step_limit_of_gd():
    data = small(K=2, Q=5, d=6, v=0.2)
    C = gen.margin_kernel(data.features, data.chosen, data.rejected, data.features, data.chosen, data.rejected)
    T = 3.0
    flow = gen.gradient_flow_margins(C, 1.0, [T])[-1]
    errs = []
    for steps in (50, 100, 200):
        r, _ = gen.kernel_recursion(C, 1.0, T / steps, steps)
        errs.append(np.abs(r[-1].numpy() - flow).max())
    assert errs[0] / errs[1] == pytest.approx(2, rel=0.05) and errs[1] / errs[2] == pytest.approx(2, rel=0.05)


def test_idealized_margin_solves_its_ode_and_matches_noiseless_gd():
    K, beta = 4, 1.5
    t = np.linspace(0, 10, 201)
    r = gen.idealized_margin(t, K, beta)
    a = 2 * beta**2 / K
    assert r[0] == pytest.approx(0, abs=1e-14)
    assert np.allclose(r + np.exp(r), a * t + 1, atol=1e-10)
    drdt = np.gradient(r, t)
    assert np.allclose(drdt[1:-1], a / (1 + np.exp(r[1:-1])), rtol=1e-3)
    data = small(K=K, Q=3, d=7, v=0.0, l_b=0.37)
    steps = 2000
    run = gen.gd_dpo(data.features, data.chosen, data.rejected, vocab=data.vocab, beta=beta, lr=10 / steps, steps=steps)
    assert torch.allclose(run.train[-1], torch.full_like(run.train[-1], float(r[-1])), atol=5e-3)


def test_theorem_rates_consistency():
    rL, rU, t1 = gen.theorem_rates(7, 0.3)
    assert rU * t1 == pytest.approx(math.log(3)) and rL * t1 == pytest.approx(math.log(3) / 40)


def test_empirical_rates_bound_the_drive_by_brute_force():
    data = small(K=3, Q=6, d=8, v=0.4, shared=True)
    beta = 0.9
    C = gen.margin_kernel(data.features, data.chosen, data.rejected, data.features, data.chosen, data.rejected)
    rho_L, rho_U = gen.empirical_rates(C, beta)
    N = C.shape[0]
    rng = np.random.default_rng(0)
    lo, hi = np.inf, -np.inf
    for _ in range(300):
        w = torch.tensor(rng.uniform(0.25, 0.5, N))
        drive = beta**2 / N * (C @ w)
        lo, hi = min(lo, drive.min().item()), max(hi, drive.max().item())
    assert rho_L <= lo + 1e-12 and hi <= rho_U + 1e-12
    # attained at the extreme weights (1/4 on positive entries, 1/2 on negative ones, for the worst row)
    j = int(torch.argmin((C.clamp(min=0).sum(1) / 4 - (-C).clamp(min=0).sum(1) / 2)))
    w = torch.where(C[j] > 0, 0.25, 0.5).double()
    assert beta**2 / N * (C[j] @ w).item() == pytest.approx(rho_L, rel=1e-12)


def test_test_slack_keeps_the_worst_case_drive_nonnegative():
    data = small(K=2, Q=5, d=6, v=0.2, shared=True)
    c_idx = 1
    mean = data.means[c_idx]
    cw, cl = int(data.chosen_of[c_idx]), int(data.rejected_of[c_idx])
    s = gen.test_slack(data.features, data.chosen, data.rejected, mean, cw, cl)
    c = gen.preference_overlap(torch.tensor([cw]), torch.tensor([cl]), data.chosen, data.rejected)[0]
    a = c * (data.features @ mean)
    # adversary, by brute force: weights in [1/4, 1/2] and perturbations |e_i| <= s (entering as c_i e_i);
    # the drive is linear in each (q_i, e_i), so the minimum is at a vertex: enumerate them per term
    def worst(slack):
        total = 0.0
        for ai, ci in zip(a.tolist(), c.abs().tolist()):
            total += min(q * (ai + ci * e) for q in (0.25, 0.5) for e in (-slack, slack))
        return total
    assert s > 0
    assert worst(s) == pytest.approx(0, abs=1e-9)
    assert worst(0.9 * s) > 0 and worst(1.1 * s) < 0
    # the closed-form sufficient slack (sum a+/4 - sum a-/2) / (sum |c|/2) is smaller
    simple = (a.clamp(min=0).sum() / 4 - (-a).clamp(min=0).sum() / 2) / (c.abs().sum() / 2)
    assert 0 < simple.item() <= s


def test_cluster_bound_is_a_union_of_gaussian_tails_and_dominates_monte_carlo():
    norms = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    from scipy.stats import norm
    assert gen.cluster_bound(0.3, 0.2, norms) == pytest.approx(sum(2 * norm.sf(0.3 / (0.2 * n)) for n in [1, 2, 0.5]))
    assert gen.cluster_bound(-0.1, 0.2, norms) == 1.0
    assert gen.union_bound_closed(0.3, 0.2, 2.0, 3) >= gen.cluster_bound(0.3, 0.2, norms)
    # P(max_i |g_i^T xi| >= s) by Monte Carlo is below the union bound
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xi = 0.3 * torch.randn(200000, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = ((xi @ g.T).abs().max(1).values >= 0.5).double().mean().item()
    assert p <= gen.cluster_bound(0.5, 0.3, g.norm(dim=1)) + 3e-3


def test_exact_risk_matches_monte_carlo():
    data = small(K=2, Q=10, d=6, v=0.6)
    run = gen.gd_dpo(data.features, data.chosen, data.rejected, vocab=data.vocab, beta=1.0, lr=0.5, steps=10)
    dW = run.delta_W[-1]
    exact = gen.exact_risk(dW, data, 1.0)
    test = gen.cluster_data(2, 40000, 6, 0.6, 0.5, seed=9)
    r = gen.margins(dW, test.features, test.chosen, test.rejected, 1.0)
    for c in range(4):
        mc = (r[test.cluster == c] <= 0).double().mean().item()
        assert abs(mc - exact[c]) < 4 * math.sqrt(exact[c] * (1 - exact[c]) / 40000) + 1e-4
    assert np.allclose(np.exp(gen.exact_risk(dW, data, 1.0, log=True)), exact)


def test_paper_bound_numbers():
    assert gen.paper_bound(10, 875) == pytest.approx(0.0548, abs=5e-4)
    assert gen.paper_bound(10, 880) < 0.05


def test_gaussian_plugin_risk():
    from scipy.stats import norm
    u = torch.tensor([1.0, 2.0], dtype=torch.float64)
    mean = torch.tensor([0.5, 0.1], dtype=torch.float64)
    cov = torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=torch.float64)
    x = torch.distributions.MultivariateNormal(mean, cov).sample((200000,)).double()
    mc = ((x @ u) <= 0).double().mean().item()
    assert gen.gaussian_plugin_risk(u, mean, cov) == pytest.approx(mc, abs=4e-3)
    assert gen.gaussian_plugin_risk(u, mean, cov) == pytest.approx(norm.cdf(-0.7 / math.sqrt(2 + 1.2 + 4)))


def test_cluster_geometry_recovers_the_generating_parameters():
    K, Q, d, v, l_b = 4, 3000, 12, 0.05, 0.4
    data = gen.cluster_data(K, Q, d, v, l_b, seed=0)
    s = torch.where(data.cluster % 2 == 0, 1, -1)
    geo = gen.cluster_geometry(3.0 * data.features, s, (data.cluster // 2).tolist())   # scale-free
    assert geo["scale"] == pytest.approx(3.0, rel=1e-3)
    assert geo["l_b"] == pytest.approx(l_b, abs=2e-3) and geo["v"] == pytest.approx(v, rel=2e-2)
    assert geo["max_cos_concepts"] < 0.01 and geo["max_cos_concept_b"] < 0.01
    assert np.allclose(geo["concept_norms"], 1.0, atol=3e-3)


def test_chunked_rates_and_deviation_match_direct_computation():
    data = small(K=3, Q=7, d=10, v=0.3, shared=True, seed=5)
    G, ch, rj = data.features, data.chosen, data.rejected
    C = gen.margin_kernel(G, ch, rj, G, ch, rj)
    assert gen.kernel_rates(G, ch, rj, 0.7, chunk=5) == pytest.approx(gen.empirical_rates(C, 0.7), rel=1e-12)
    mu = data.means[data.cluster]
    D = G @ G.T - mu @ mu.T - 10 * 0.3**2 * torch.eye(len(G), dtype=torch.float64)
    assert gen.inner_product_deviation(data, chunk=4) == pytest.approx(D.abs().max().item(), rel=1e-12)
