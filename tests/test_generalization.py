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


def test_gd_last_layer_margins_match_autograd_explicit_softmax():
    """Margins of gd_last_layer equal beta*(log-ratio differences) of autograd GD on a full softmax head."""
    data = small(K=2, Q=6, d=5)
    beta, lr, steps = 0.8, 0.7, 5
    W0 = torch.randn(data.vocab, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    Ws = dyn.explicit_softmax_dpo(W0, data.features, data.chosen, data.rejected, beta=beta, lr=lr, steps=steps)
    run = gen.gd_last_layer(data.features, data.chosen, data.rejected, vocab=data.vocab, beta=beta, lr=lr, steps=steps,
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
    run = gen.gd_last_layer(data.features, data.chosen, data.rejected, vocab=data.vocab, beta=beta, lr=lr, steps=steps,
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
    run = gen.gd_last_layer(data.features, data.chosen, data.rejected, vocab=data.vocab, beta=beta, lr=10 / steps, steps=steps)
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
    run = gen.gd_last_layer(data.features, data.chosen, data.rejected, vocab=data.vocab, beta=1.0, lr=0.5, steps=10)
    dW = run.delta_W[-1]
    exact = gen.exact_risk(dW, data, 1.0)
    test = gen.cluster_data(2, 40000, 6, 0.6, 0.5, seed=9)
    r = gen.margins(dW, test.features, test.chosen, test.rejected, 1.0)
    for c in range(4):
        mc = (r[test.cluster == c] <= 0).double().mean().item()
        assert abs(mc - exact[c]) < 4 * math.sqrt(exact[c] * (1 - exact[c]) / 40000) + 1e-4
    assert np.allclose(np.exp(gen.exact_risk(dW, data, 1.0, log=True)), exact)


def test_paper_bound_and_figure_4_against_lambert_w():
    """2KQ^2 e^(-Q/r) = p on its falling branch is Q = -2r W_{-1}(-sqrt(p/2K)/(2r)) (Lambert W, branch -1):
    Q e^(-Q/2r) = sqrt(p/2K), so (-Q/2r) e^(-Q/2r) = -sqrt(p/2K)/(2r). Figure 4 and the K = 10 remark."""
    from scipy.special import lambertw

    def lambert_Q(K, p, rate):
        return -2 * rate * lambertw(-math.sqrt(p / (2 * K)) / (2 * rate), -1).real

    for K in (1, 10, 100, 1000, 3.7):
        for rate in (45.0, 23.3):
            assert gen.required_Q(K, 0.05, rate) == pytest.approx(lambert_Q(K, 0.05, rate), rel=1e-9)
    assert [round(gen.required_Q(K)) for K in (1, 10, 100, 1000)] == [763, 880, 994, 1108]
    q10 = lambert_Q(10, 0.05, 45.0)
    assert 875 < q10 < 880                       # "K = 10 requires more than 875 samples per value"
    assert gen.paper_bound(10, 875) > 0.05 > gen.paper_bound(10, 880)
    assert gen.paper_bound(10, q10) == pytest.approx(0.05, rel=1e-9)


def test_the_closed_form_follows_from_the_union_bound_of_appendix_b4():
    """Over a grid of everything the conditions allow (Z l_b^2 <= 1/4, 1/4 <= l_b <= 1/2, d <= 5Q,
    v = 1/(32 sqrt Q), Q >= 40), the Appendix B.4 bound at eps = 1/(16 v (Z+2)) never exceeds
    2KQ^2 e^(-Q/45), nor the book's 2KQ^2 e^(-Q/(18 * bracket_max)); the bracket's largest value on the
    grid is bracket_max."""
    worst_bracket = 0.0
    for Q in (40, 100, 763, 5000):
        v = 1 / (32 * math.sqrt(Q))
        for l_b in np.linspace(0.25, 0.5, 11):
            for Z in range(1, 5):
                if Z * l_b**2 > 0.25 + 1e-12:
                    continue
                eps = 1 / (16 * v * (Z + 2))
                assert eps == pytest.approx(2 * math.sqrt(Q) / (Z + 2)) and eps >= math.sqrt(Q) / 3 - 1e-12
                for d in (1, Q, 5 * Q):
                    bracket = 1 + l_b**2 + d * v**2 + 2 * eps * v
                    worst_bracket = max(worst_bracket, bracket)
                    by_hand = 2 * 3 * Q**2 * math.exp(-eps**2 / (2 * bracket))
                    b4 = gen.union_bound_b4(3, Q, Z, l_b, d, v)
                    assert b4 == pytest.approx(by_hand, rel=1e-12)
                    assert b4 <= gen.paper_bound(3, Q) and b4 <= gen.paper_bound(3, Q, 18 * gen.bracket_max()) * (1 + 1e-12)
    assert worst_bracket == pytest.approx(gen.bracket_max(), rel=1e-12)
    assert 18 * gen.bracket_max() == pytest.approx(23.34, abs=0.01) and 2 * 9 * 2.5 == 45


def test_the_confidence_term_is_at_least_one_up_to_vacuity_Q():
    """The failure floor 8KQ^(9/4) e^(-Q^(3/4)/256) >= 1 on a dense grid below vacuity_Q (about 1.43e5
    for K = 1) and < 1 just above it; it is below the theorem's failure term for any constant c."""
    for K in (1, 10, 1000):
        q0 = gen.vacuity_Q(K)
        Q = np.unique(np.geomspace(1, q0 * (1 - 1e-9), 20000))
        log_floor = math.log(8 * K) + 2.25 * np.log(Q) - Q**0.75 / 256   # by hand, in logs
        assert np.all(log_floor >= -1e-9) and np.all(gen.paper_failure_floor(K, Q) >= 1 - 1e-9)
        assert gen.paper_failure_floor(K, q0 * 1.001) < 1
    assert gen.vacuity_Q(1) == pytest.approx(1.43e5, rel=0.01)
    for c in (1e-3, 1.0, 1e3):
        Q = np.array([40.0, 880.0, 1e5])
        full = 8 * Q**2.25 * np.exp(-np.minimum(c * np.sqrt(Q) / 5, Q**0.75 / 256))
        assert np.all(gen.paper_failure_floor(1, Q) <= full * (1 + 1e-12))


def test_paper_conditions_at_their_boundaries():
    ok = gen.paper_conditions(4, 0.25, 200, 1 / (32 * math.sqrt(40)), 40)
    assert all(ok.values())
    assert not gen.paper_conditions(5, 0.25, 200, 0.001, 40)["Z ≤ 1/(4 l_b²)"]
    assert not gen.paper_conditions(2, 0.5, 200, 0.001, 40)["Z ≤ 1/(4 l_b²)"]
    assert not gen.paper_conditions(1, 0.5, 201, 0.001, 40)["d ≤ 5Q"]
    assert not gen.paper_conditions(1, 0.5, 10, 1.0001 / (32 * math.sqrt(40)), 40)["v ≤ 1/(32√Q)"]
    assert not gen.paper_conditions(1, 0.51, 10, 0.001, 40)["1/4 ≤ l_b ≤ 1/2"]
    assert not gen.paper_conditions(1, 0.5, 10, 0.001, 39)["Q ≥ 40"]


def test_book_train_conditions_at_their_boundaries():
    # delta (1 + M/2) + M l_b^2/2 <= 3/4, delta < 1 - l_b^2, d v^2 <= 2Q
    assert gen.book_train_conditions(0.75, 0, 0.25, 10, 0.1, 40)
    assert not gen.book_train_conditions(0.7501, 0, 0.25, 10, 0.1, 40)
    assert not gen.book_train_conditions(0.75, 0, 0.5, 10, 0.1, 40)       # delta < 1 - l_b^2 is strict
    assert gen.book_train_conditions(0.625 / 3 - 1e-12, 4, 0.25, 10, 0.1, 40)   # 3 delta + 1/8 <= 3/4
    assert not gen.book_train_conditions(0.625 / 3 + 1e-9, 4, 0.25, 10, 0.1, 40)
    assert gen.book_train_conditions(0.1, 8, 0.25, 10, 0.1, 40) and not gen.book_train_conditions(0.1001, 8, 0.25, 10, 0.1, 40)
    assert gen.book_train_conditions(0.0, 0, 0.5, 80, 1.0, 40) and not gen.book_train_conditions(0.0, 0, 0.5, 81, 1.0, 40)


def test_token_pairs_reuse_by_brute_force():
    """Distinct response sets, no token in more than Z pairs, largest reuse min(Z, K); M (other clusters a
    cluster shares a token with) from the one-hot preference kernel, at most 4(Z-1)."""
    for K in range(1, 13):
        for Z in range(1, 5):
            chosen, rejected, V = gen.cluster_tokens(K, Z=Z)
            pairs = [frozenset((int(chosen[2 * k]), int(rejected[2 * k]))) for k in range(K)]
            assert len(set(pairs)) == K and all(len(p) == 2 for p in pairs)
            uses = [sum(t in p for p in pairs) for t in range(V)]
            assert max(uses) == min(Z, K) if Z > 1 else max(uses) == 1
            overlap = gen.preference_overlap(chosen, rejected, chosen, rejected)
            pair_of = torch.arange(2 * K) // 2
            other = pair_of[:, None] != pair_of[None, :]
            M = int(((overlap != 0) & other).sum(1).max()) if K > 1 else 0
            assert gen.token_reuse(chosen, rejected) == (max(uses), M)
            assert M <= 4 * (max(uses) - 1)
            assert set(torch.unique(overlap[other]).tolist()) <= {-1.0, 0.0, 1.0}   # one shared token at most
    assert gen.token_reuse(*gen.cluster_tokens(8, Z=3)[:2]) == (3, 8)   # 8 > 2Z: the corrected remark
    data = gen.cluster_data(4, 3, 6, 0.0, 0.25, Z=4)
    assert data.vocab == 5 and torch.equal(data.chosen_of, gen.cluster_tokens(4, Z=4)[0])


def test_risk_floor_against_the_best_direction_and_random_heads():
    """Phi(-1/v) is the risk of u = c_k for both clusters of a pair, and no head does better."""
    from scipy.stats import norm

    K, d, v, l_b = 2, 5, 0.4, 0.5
    data = gen.cluster_data(K, 1, d, v, l_b)
    dW = torch.zeros(data.vocab, d, dtype=torch.float64)
    dW[0, 1], dW[1, 1], dW[2, 2], dW[3, 2] = 0.5, -0.5, 0.5, -0.5     # u_k = e_{1+k} = c_k
    assert np.allclose(gen.exact_risk(dW, data, 1.0), norm.cdf(-1 / v))
    assert gen.risk_floor(v) == pytest.approx(norm.cdf(-1 / v), rel=1e-14)
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):
        dW = torch.randn(data.vocab, d, generator=rng, dtype=torch.float64)
        assert gen.exact_risk(dW, data, 1.0).reshape(K, 2).mean(1).min() >= gen.risk_floor(v) - 1e-15


def test_log_cluster_bound_far_below_floating_point():
    norms = torch.tensor([1.0, 1.2], dtype=torch.float64)
    assert math.exp(gen.cluster_bound(0.3, 0.2, norms, log=True)) == pytest.approx(gen.cluster_bound(0.3, 0.2, norms))
    assert gen.cluster_bound(-0.1, 0.2, norms, log=True) == 0.0
    # s*/(v ||g||) = 200 and 1000/6: log Phi(-x) = -x^2/2 - log(x sqrt(2 pi)) + O(1/x^2), the larger term dominates
    log_b = gen.cluster_bound(1.0, 0.005, norms, log=True)
    x = 1.0 / (0.005 * 1.2)
    assert gen.cluster_bound(1.0, 0.005, norms) == 0.0
    assert log_b == pytest.approx(math.log(2) - x**2 / 2 - math.log(x * math.sqrt(2 * math.pi)), rel=1e-6)


def test_adam_last_layer_matches_torch_adam_on_an_explicit_softmax_head():
    """torch.optim.Adam on the whole head W (V x d, random W_0) with the DPO loss written from log-softmaxes:
    the margins at every step equal 2 beta s v^T g with v from adam_last_layer."""
    g = torch.Generator().manual_seed(2)
    N, d, V, yes, no = 14, 6, 7, 2, 5
    G = torch.randn(N, d, generator=g, dtype=torch.float64)
    s = torch.tensor([1, -1] * 7)
    beta, lr, steps = 0.3, 0.05, 12
    W0 = torch.randn(V, d, generator=g, dtype=torch.float64)
    W = W0.clone().requires_grad_(True)
    opt = torch.optim.Adam([W], lr=lr)
    w_tok = torch.where(s == 1, yes, no)
    l_tok = torch.where(s == 1, no, yes)
    rows = torch.arange(N)
    ref = torch.log_softmax(G @ W0.T, -1)
    vs = gen.adam_last_layer(G, s, beta=beta, lr=lr, steps=steps)
    for t in range(steps + 1):
        lp = torch.log_softmax(G @ W.T, -1) - ref
        r = beta * (lp[rows, w_tok] - lp[rows, l_tok])
        assert torch.allclose(r.detach(), 2 * beta * s.double() * (G @ vs[t]), atol=1e-10)
        opt.zero_grad()
        (-torch.nn.functional.logsigmoid(r).mean()).backward()
        opt.step()
    moved = (W.detach() - W0).abs().sum(1)
    assert torch.all(moved[[i for i in range(V) if i not in (yes, no)]] == 0)


def test_gaussian_fit_by_brute_force_and_for_isotropic_clusters():
    """The authors' normalisation: every feature divided by the root of the mean squared norm over all
    groups together (persona_structure.ipynb's trace(X X^T)/n), then per group the covariance's Frobenius
    norm (1/n) and the mean squared distance to the group mean, averaged over groups."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64) + 2.0
    X[12:] *= 3.0                                           # groups of different scales: one common factor
    groups = ["a"] * 12 + ["b"] * 18
    scale = math.sqrt(np.trace(X.numpy() @ X.numpy().T) / 30)
    fro, dist = [], []
    for idx in (slice(0, 12), slice(12, 30)):
        x = X[idx].numpy() / scale
        cov = np.cov(x.T, bias=True)
        fro.append(np.sqrt((cov**2).sum()))
        dist.append(np.mean([np.sum((row - x.mean(0)) ** 2) for row in x]))
    assert gen.gaussian_fit(X, groups) == pytest.approx((np.mean(fro), np.mean(dist)), rel=1e-12)
    # N(mu, s^2 I) in d dimensions with ||mu|| = 1 and s small: ||Sigma||_F ~ s^2 sqrt(d), E||x - mu||^2 ~ d s^2
    # (the mean squared norm is 1 + d s^2, so the features shrink by that factor)
    d, sd = 50, 0.02
    Y = torch.randn(20000, d, generator=g, dtype=torch.float64) * sd
    Y[:, 0] += 1.0
    fro1, dist1 = gen.gaussian_fit(Y, ["x"] * len(Y))
    shrink = 1 + d * sd**2
    assert dist1 == pytest.approx(d * sd**2 / shrink, rel=0.03)
    assert fro1 == pytest.approx(sd**2 * math.sqrt(d) / shrink, rel=0.05)


def test_group_cosines_by_double_loop():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(9, 3, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    groups = list("aabbbcccc")
    for centre in (False, True):
        Y = X - X.mean(0) if centre else X
        M, names = gen.group_cosines(X, groups, centre=centre)
        assert names == ["a", "b", "c"]
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                cos = [float(Y[p] @ Y[q] / (Y[p].norm() * Y[q].norm()))
                       for p in range(9) for q in range(9) if groups[p] == a and groups[q] == b]
                assert M[i, j] == pytest.approx(np.mean(cos), abs=1e-12)


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


# --- The paper's Section 7 losses, Appendix C, the no-flip threshold and K-dilution -----------------------

@pytest.mark.parametrize("loss", gen.LOSSES)
def test_loss_weight_is_minus_the_derivative_of_the_loss(loss):
    r = torch.linspace(-2.0, 3.0, 101, dtype=torch.float64)
    r = r[(r - 1).abs() > 1e-9].requires_grad_(True)            # SLiC: away from the hinge
    (grad,) = torch.autograd.grad(gen.loss_value(loss, r).sum(), r)
    assert torch.allclose(gen.loss_weight(loss, r.detach()), -grad, atol=1e-14)
    assert gen.loss_value("slic", torch.tensor([0.0, 1.0, 2.0])).tolist() == [1.0, 0.0, 0.0]
    assert gen.loss_weight("slic", torch.tensor([1.0])).item() == 0.0      # the subgradient at the hinge
    with pytest.raises(ValueError, match="loss"):
        gen.loss_weight("kto", r)


@pytest.mark.parametrize("loss", gen.LOSSES)
def test_gd_last_layer_for_each_loss_matches_autograd_and_the_kernel_recursion(loss):
    """Autograd gradient descent on the whole head with the loss written from log-softmaxes; Lemma 4.1
    with -f' in place of sigma(-r) (the paper's Section 7) on training and unseen samples."""
    data, test = small(K=3, Q=6, d=7, v=0.3, shared=True, seed=1), small(K=3, Q=4, d=7, v=0.3, shared=True, seed=2)
    beta, lr, steps = 0.9, 0.4, 15
    W0 = torch.randn(data.vocab, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W = W0.clone().requires_grad_(True)
    rows = torch.arange(len(data.features))
    ref = torch.log_softmax(data.features @ W0.T, -1)
    run = gen.gd_last_layer(data.features, data.chosen, data.rejected, vocab=data.vocab, beta=beta, lr=lr, steps=steps,
                            loss=loss, tests=[(test.features, test.chosen, test.rejected)])
    for t in range(steps + 1):
        lp = torch.log_softmax(data.features @ W.T, -1) - ref
        r = beta * (lp[rows, data.chosen] - lp[rows, data.rejected])
        assert torch.allclose(run.train[t], r.detach(), atol=1e-11)
        (grad,) = torch.autograd.grad(gen.loss_value(loss, r).mean(), W)
        with torch.no_grad():
            W -= lr * grad
    C = gen.margin_kernel(data.features, data.chosen, data.rejected, data.features, data.chosen, data.rejected)
    X = gen.margin_kernel(test.features, test.chosen, test.rejected, data.features, data.chosen, data.rejected)
    k, (kt,) = gen.kernel_recursion(C, beta, lr, steps, cross=[X], loss=loss)
    assert torch.allclose(k, run.train, atol=1e-12) and torch.allclose(kt, run.tests[0], atol=1e-12)


def test_ipo_margins_in_closed_form_against_the_recursion_and_the_flow():
    from scipy.linalg import expm

    data, test = small(K=2, Q=5, d=6, v=0.3, shared=True, seed=3), small(K=2, Q=3, d=6, v=0.3, shared=True, seed=4)
    C = gen.margin_kernel(data.features, data.chosen, data.rejected, data.features, data.chosen, data.rejected)
    X = gen.margin_kernel(test.features, test.chosen, test.rejected, data.features, data.chosen, data.rejected)
    beta, lr, steps = 0.7, 0.3, 40
    r, (rt,) = gen.ipo_margins(C, beta, lr, steps, cross=[X])
    k, (kt,) = gen.kernel_recursion(C, beta, lr, steps, cross=[X], loss="ipo")
    assert torch.allclose(r, k, atol=1e-12) and torch.allclose(rt, kt, atol=1e-12)
    # the flow tau dr/dt = (2 beta^2/N) C (1 - r): r(t) = (I - exp(-A t)) 1, by scipy's matrix exponential
    A = 2 * beta**2 * C.numpy() / len(C)
    flow = gen.gradient_flow_margins(C, beta, [0.5, 2.0], loss="ipo")
    for i, t in enumerate((0.5, 2.0)):
        assert np.allclose(flow[i], (np.eye(len(C)) - expm(-A * t)) @ np.ones(len(C)), atol=1e-8)
    with pytest.raises(ValueError, match="flow"):
        gen.gradient_flow_margins(C, beta, [1.0], loss="slic")


@pytest.mark.parametrize("loss", gen.LOSSES)
def test_idealized_margin_of_each_loss_solves_its_ode_and_matches_noiseless_gd(loss):
    K, beta = 3, 1.2
    a = 2 * beta**2 / K
    t = np.linspace(0, 2.5, 501)
    r = gen.idealized_margin(t, K, beta, loss=loss)
    w = {"dpo": lambda x: 1 / (1 + np.exp(x)), "ipo": lambda x: 2 * (1 - x), "slic": lambda x: (x < 1) * 1.0}[loss]
    assert r[0] == pytest.approx(0, abs=1e-14)
    inside = (r[2:] < 1 - 1e-9) | (loss != "slic")            # central differences away from the hinge
    assert np.allclose(np.gradient(r, t)[1:-1][inside], (a * w(r[1:-1]))[inside], rtol=2e-3, atol=1e-9)
    data = small(K=K, Q=3, d=6, v=0.0, l_b=0.3)
    steps = 2500
    run = gen.gd_last_layer(data.features, data.chosen, data.rejected, vocab=data.vocab, beta=beta, lr=2.5 / steps,
                            steps=steps, loss=loss)
    assert torch.allclose(run.train[-1], torch.full_like(run.train[-1], float(r[-1])), atol=5e-3)


@pytest.mark.parametrize("loss", gen.LOSSES)
def test_theorem_rates_of_each_loss(loss):
    r_max, q_lo, q_hi = gen.WEIGHT_RANGES[loss]
    rL, rU, horizon = gen.theorem_rates(5, 0.4, tau=2.0, loss=loss)
    assert rU * horizon == pytest.approx(r_max) and rL / rU == pytest.approx(q_lo / (20 * q_hi))
    assert q_hi <= 2 * q_lo                                  # what the extension needs
    w = gen.loss_weight(loss, torch.linspace(0, r_max * (1 - 1e-9), 1001, dtype=torch.float64))
    assert w.min().item() == pytest.approx(q_lo, abs=1e-6) and w.max().item() == pytest.approx(q_hi, abs=1e-12)
    if loss == "dpo":   # the paper's Theorem 4.2
        assert rL == pytest.approx(0.4**2 / (8 * 5 * 2.0)) and horizon == pytest.approx(5 * 2.0 * math.log(3) / (5 * 0.4**2))


@pytest.mark.parametrize("weights", [(0.25, 0.5), (1.0, 2.0), (1.0, 1.0)])
def test_rates_and_slack_with_other_weight_ranges_by_brute_force(weights):
    data = small(K=3, Q=5, d=8, v=0.4, shared=True)
    beta, (q_lo, q_hi) = 0.9, weights
    C = gen.margin_kernel(data.features, data.chosen, data.rejected, data.features, data.chosen, data.rejected)
    rho_L, rho_U = gen.empirical_rates(C, beta, weights=weights)
    rng = np.random.default_rng(1)
    for _ in range(200):
        w = torch.tensor(rng.uniform(q_lo, q_hi, C.shape[0]))
        drive = beta**2 / C.shape[0] * (C @ w)
        assert rho_L <= drive.min().item() + 1e-12 and drive.max().item() <= rho_U + 1e-12
    mean = data.means[0]
    s = gen.test_slack(data.features, data.chosen, data.rejected, mean, 0, 1, weights)
    c = gen.preference_overlap(torch.tensor([0]), torch.tensor([1]), data.chosen, data.rejected)[0]
    a = (c * (data.features @ mean)).tolist()
    worst = lambda slack: sum(min(q * (ai + abs(ci) * e) for q in weights for e in (-slack, slack))
                              for ai, ci in zip(a, c.tolist()))
    if s > 0:
        assert worst(s) == pytest.approx(0, abs=1e-9) and worst(0.9 * s) > 0


def test_approximately_orthogonal_means_and_the_deviation_they_add():
    """<c_k, e_k> = 1 - delta^2/8 and unit norm; the inner products of the means move by at most
    (1 + l_b) delta from the orthogonal model's, so delta_model <= delta + (1 + l_b) delta_c."""
    K, d, l_b, delta_c = 4, 12, 0.4, 0.3
    mu = gen.cluster_means(K, d, l_b, delta_c=delta_c, seed=3)
    mu0 = gen.cluster_means(K, d, l_b)
    c = (mu[0::2] - mu[1::2]) / 2
    assert torch.allclose(c.norm(dim=1), torch.ones(K, dtype=torch.float64))
    assert torch.allclose(c[torch.arange(K), torch.arange(1, K + 1)], torch.full((K,), 1 - delta_c**2 / 8, dtype=torch.float64))
    assert torch.allclose((c - torch.eye(d, dtype=torch.float64)[1:K + 1]).norm(dim=1), torch.full((K,), delta_c / 2, dtype=torch.float64))
    assert (mu @ mu.T - mu0 @ mu0.T).abs().max().item() <= (1 + l_b) * delta_c + 1e-12
    assert torch.equal(gen.cluster_means(K, d, l_b, delta_c=0.0, seed=9), mu0)
    data = gen.cluster_data(K, 20, d, 0.05, l_b, seed=5, delta_c=delta_c)
    delta, delta_model = gen.inner_product_deviation(data), gen.inner_product_deviation(data, means=mu0)
    assert delta_model <= delta + (1 + l_b) * delta_c + 1e-12 and delta_model > delta
    with pytest.raises(ValueError, match="delta_c"):
        gen.cluster_means(K, d, l_b, delta_c=3.0)


def test_subset_mean_average_by_brute_force_and_the_dilution_identity():
    """The average of ||m_S||^2 over K-subsets with equal counts is a/K + b(1 - 1/K) (a the mean squared
    norm, b the mean inner product of two different groups), never rising with K; with counts, by hand."""
    from itertools import combinations

    g = torch.Generator().manual_seed(0)
    B, d = 6, 5
    m = torch.randn(B, d, generator=g, dtype=torch.float64) + 0.5
    sq = lambda x: (x * x).sum(-1)
    a = sq(m).mean().item()
    b = ((m @ m.T).sum().item() - sq(m).sum().item()) / (B * (B - 1))
    values = [gen.subset_mean_average(m, K, sq, chunk=4) for K in range(1, B + 1)]
    assert np.allclose(values, [a / K + b * (1 - 1 / K) for K in range(1, B + 1)], atol=1e-12)
    assert np.all(np.diff(values) <= 1e-12)
    l1 = [gen.subset_mean_average(m, K, lambda x: x.abs().sum(-1)) for K in range(1, B + 1)]
    assert np.all(np.diff(l1) <= 1e-12)                       # any convex function of the subset mean
    counts = [1, 2, 3, 1, 5, 2]
    by_hand = np.mean([sq(sum(counts[k] * m[k] for k in S) / sum(counts[k] for k in S)).item()
                       for S in combinations(range(B), 3)])
    assert gen.subset_mean_average(m, 3, sq, counts) == pytest.approx(by_hand, rel=1e-12)


def test_adam_with_frozen_weights_moves_lr_per_step_and_gives_the_frozen_margin():
    g = torch.Generator().manual_seed(7)
    G = torch.randn(20, 5, generator=g, dtype=torch.float64)
    s = torch.tensor([1, -1] * 10)
    beta, lr, steps = 0.05, 1e-3, 30
    vs = gen.adam_last_layer(G, s, beta=beta, lr=lr, steps=steps, frozen_weights=True)
    grad = -(beta / 20) * (0.5 * s.double()[:, None] * G).sum(0)
    assert torch.allclose(vs[-1], -steps * lr * grad / (grad.abs() + 1e-8), atol=1e-13)
    m = (s.double()[:, None] * G).mean(0)
    margin = (2 * beta * s.double() * (G @ vs[-1])).mean()
    assert gen.adam_frozen_margin(m, beta, lr, steps).item() == pytest.approx(margin.item(), rel=1e-10)
    free = gen.adam_last_layer(G, s, beta=beta, lr=lr, steps=steps)
    assert torch.allclose(free[1], vs[1])                    # the first step is the same


def test_no_flip_odds_from_the_log_odds_identity():
    """With single-token answers the policy's log-odds are the reference's plus r/beta (explicit softmaxes):
    a pair whose reference odds against y_w exceed exp(r_max/beta) stays unflipped while r <= r_max."""
    g = torch.Generator().manual_seed(8)
    V, d, beta = 6, 4, 0.5
    W0, W = torch.randn(V, d, generator=g, dtype=torch.float64), torch.randn(V, d, generator=g, dtype=torch.float64)
    x = torch.randn(50, d, generator=g, dtype=torch.float64)
    lp, lp0 = torch.log_softmax(x @ W.T, -1), torch.log_softmax(x @ W0.T, -1)
    r = beta * ((lp[:, 1] - lp0[:, 1]) - (lp[:, 3] - lp0[:, 3]))
    assert torch.allclose(lp[:, 1] - lp[:, 3], lp0[:, 1] - lp0[:, 3] + r / beta, atol=1e-12)
    assert gen.no_flip_odds(beta) == pytest.approx(3 ** (1 / beta)) and gen.no_flip_odds(0.1, 0.7) == pytest.approx(math.exp(7))
    beyond = (lp0[:, 3] - lp0[:, 1]) > math.log(gen.no_flip_odds(beta, r.max().item()))
    assert not torch.any((lp[:, 1] > lp[:, 3]) & beyond)


def test_descent_step_bound_is_four_over_L_and_descends_below_it():
    """dyn.descent_step_bound: full-batch gradient descent on a last layer's DPO loss never rises for a step
    below 4/L, on features with a large shared mean (where L is largest)."""
    g = torch.Generator().manual_seed(2)
    G = torch.randn(40, 6, generator=g, dtype=torch.float64) * 0.3 + torch.tensor([3.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    s = torch.tensor([1] * 30 + [-1] * 10)
    beta = 0.7
    L = dyn.smoothness(G, beta)
    assert dyn.descent_step_bound(L) == pytest.approx(4 / L)
    run = gen.gd_last_layer(G, torch.where(s == 1, 0, 1), torch.where(s == 1, 1, 0), vocab=2, beta=beta,
                            lr=0.999 * dyn.descent_step_bound(L), steps=200)
    losses = gen.loss_value("dpo", run.train).mean(1)
    assert torch.all(torch.diff(losses) <= 1e-12)
    with pytest.raises(ValueError, match="positive"):
        dyn.descent_step_bound(0.0)
