"""Every formula of prefdyn.theory.demonstrations against an independent computation."""
import itertools
import math
import re

import numpy as np
import pytest
import torch

from prefdyn import tabular
from prefdyn.datasets.demonstrations import (
    STYLE_MARKER,
    golden_components,
    golden_score,
    has_marker,
    load_demonstrations,
    strip_marker,
)
from prefdyn.theory import demonstrations as afd


@pytest.fixture
def tree():
    return afd.TokenTree(n_words=2, T=3)


def _sample_response(tree, logits, gen):
    """Ancestral sampling from the tabular policy, token by token (independent of the enumeration)."""
    index = {s: i for i, s in enumerate(tree.states)}
    prefix = ()
    while True:
        probs = torch.softmax(logits[index[prefix]], -1)
        a = int(torch.multinomial(probs, 1, generator=gen))
        if a == tree.eos:
            return prefix + (a,)
        prefix = prefix + (a,)
        if len(prefix) == tree.T:
            return prefix


def test_tree_enumerates_a_distribution(tree):
    # 1 + 2 + 4 ended responses and 8 cut off at T = 3
    assert len(tree.responses) == 15 and len(tree.states) == 7
    logits = tree.random_logits(torch.Generator().manual_seed(0))
    assert afd.trajectory_logprobs(tree, logits).exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_trajectory_probabilities_match_sampling(tree):
    gen = torch.Generator().manual_seed(1)
    logits = tree.random_logits(gen)
    counts = {y: 0 for y in tree.responses}
    n = 20000
    for _ in range(n):
        counts[_sample_response(tree, logits, gen)] += 1
    freq = torch.tensor([counts[y] / n for y in tree.responses], dtype=torch.float64)
    exact = afd.trajectory_logprobs(tree, logits).exp()
    assert (freq - exact).abs().max().item() < 4 * math.sqrt(0.25 / n)


def test_occupancy_is_the_mass_of_responses_through_the_prefix(tree):
    logits = tree.random_logits(torch.Generator().manual_seed(2))
    d = afd.trajectory_logprobs(tree, logits).exp()
    rho = afd.state_occupancy(tree, logits)
    for i, s in enumerate(tree.states):
        through = sum(d[j] for j, y in enumerate(tree.responses) if y[:len(s)] == s and len(y) > len(s))
        assert rho[i].item() == pytest.approx(float(through), abs=1e-12)


def test_forward_kl_three_ways_agree_and_gradients_match(tree):
    gen = torch.Generator().manual_seed(3)
    beta, pi = tree.random_logits(gen), tree.random_logits(gen).requires_grad_(True)
    kl = afd.forward_kl_three_ways(tree, beta, pi)
    assert kl["trajectory"].item() > 0
    assert kl["occupancy"].item() == pytest.approx(kl["trajectory"].item(), abs=1e-12)
    assert kl["sft"].item() == pytest.approx(kl["trajectory"].item(), abs=1e-12)
    g_kl, = torch.autograd.grad(kl["trajectory"], pi, retain_graph=True)
    g_nll, = torch.autograd.grad(kl["sft_nll"], pi)
    assert torch.allclose(g_kl, g_nll, atol=1e-12)
    same = afd.forward_kl_three_ways(tree, beta, beta)
    assert abs(same["trajectory"].item()) < 1e-12


def test_tabular_policy_realises_any_distribution_over_responses(tree):
    log_d = torch.log_softmax(torch.randn(len(tree.responses), generator=torch.Generator().manual_seed(11),
                                          dtype=torch.float64), 0)
    logits = afd.tabular_policy(tree, log_d)
    assert torch.allclose(afd.trajectory_logprobs(tree, logits), log_d, atol=1e-12)
    # and a policy's own trajectory distribution gives back the same conditionals
    start = tree.random_logits(torch.Generator().manual_seed(12))
    again = afd.tabular_policy(tree, afd.trajectory_logprobs(tree, start))
    assert torch.allclose(torch.log_softmax(again, -1), torch.log_softmax(start, -1), atol=1e-12)


def test_population_sft_losses_by_enumeration(tree):
    gen = torch.Generator().manual_seed(13)
    beta, pi = tree.random_logits(gen), tree.random_logits(gen)
    d_beta = afd.trajectory_logprobs(tree, beta).exp()
    log_pi = afd.trajectory_logprobs(tree, pi)
    summed = sum(d_beta[j] * -log_pi[j] for j in range(len(tree.responses)))
    per_token = sum(d_beta[j] * -log_pi[j] / len(y) for j, y in enumerate(tree.responses))
    log_d_beta = d_beta.log()
    assert afd.population_sft_loss(tree, log_d_beta, pi, per_token=False).item() == pytest.approx(summed.item(), abs=1e-12)
    assert afd.population_sft_loss(tree, log_d_beta, pi, per_token=True).item() == pytest.approx(per_token.item(), abs=1e-12)
    assert tree.lengths.tolist() == [len(y) for y in tree.responses]


def test_per_token_sft_optimum_is_found_by_gradient_descent(tree):
    # minimise the mean per-token loss numerically over the logits: it lands on d^beta / |y|, not d^beta
    log_d_beta = afd.trajectory_logprobs(tree, tree.random_logits(torch.Generator().manual_seed(14), scale=1.5))
    theta = torch.zeros(len(tree.states), tree.n_actions, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = afd.population_sft_loss(tree, log_d_beta, theta, per_token=True)
        loss.backward()
        return loss

    opt.step(closure)
    found = afd.trajectory_logprobs(tree, theta.detach())
    q = log_d_beta.exp() / tree.lengths
    assert torch.allclose(found, (q / q.sum()).log(), atol=1e-6)
    assert torch.allclose(afd.per_token_sft_optimum(tree, log_d_beta), (q / q.sum()).log(), atol=1e-12)
    assert (found - log_d_beta).abs().max() > 0.05


def test_toy_sft_is_gradient_descent_on_the_summed_loss(tree):
    gen = torch.Generator().manual_seed(15)
    beta, init = tree.random_logits(gen), tree.random_logits(gen)
    assert torch.equal(afd.toy_sft(tree, beta, init, 0, 1.0), init)
    one = afd.toy_sft(tree, beta, init, 1, 0.5)
    # the gradient of the forward KL (the summed loss minus a constant) by central differences
    log_d_beta = afd.trajectory_logprobs(tree, beta)
    kl = lambda logits: (log_d_beta.exp() * (log_d_beta - afd.trajectory_logprobs(tree, logits))).sum().item()
    grad = torch.zeros_like(init)
    for idx in itertools.product(range(init.shape[0]), range(init.shape[1])):
        e = torch.zeros_like(init)
        e[idx] = 1e-6
        grad[idx] = (kl(init + e) - kl(init - e)) / 2e-6
    assert torch.allclose(one, init - 0.5 * grad, atol=1e-7)


def test_extrapolation_curve_is_the_kl_to_the_demonstrator_of_the_geometric_mix():
    rng = np.random.default_rng(16)
    p_sft, p_0, p_beta = (rng.dirichlet(np.ones(9)) for _ in range(3))
    lambdas = [0.0, 0.5, 1.7]
    curve = afd.extrapolation_curve(*(torch.tensor(np.log(p)) for p in (p_sft, p_0, p_beta)), lambdas)
    for lam, value in zip(lambdas, curve):
        mix = p_sft ** (1 + lam) * p_0 ** (-lam)
        mix /= mix.sum()
        assert value == pytest.approx(float(np.sum(p_beta * np.log(p_beta / mix))), abs=1e-12)


def test_gaussian_fits_forward_matches_moments_reverse_picks_a_mode():
    x = torch.linspace(-12, 12, 24001, dtype=torch.float64)
    log_p = afd.mixture_logpdf(x, [-2.0, 2.0], 0.5)
    mean = torch.trapezoid(log_p.exp() * x, x).item()
    var = torch.trapezoid(log_p.exp() * (x - mean) ** 2, x).item()
    mu, sigma, _ = afd.fit_gaussian(log_p, x, "forward", 1.0, 1.0)
    assert mu == pytest.approx(mean, abs=1e-6) and sigma == pytest.approx(math.sqrt(var), abs=1e-6)
    assert var == pytest.approx(0.25 + 4.0, abs=1e-8)
    mu, sigma, value = afd.fit_gaussian(log_p, x, "reverse", 1.0, 1.0)
    assert abs(mu - 2) < 1e-2 and abs(sigma - 0.5) < 1e-2
    assert math.log(2) - 1e-3 < value <= math.log(2) + 1e-9
    with pytest.raises(ValueError):
        afd.fit_gaussian(log_p, x, "sideways", 0.0, 1.0)


def test_population_logistic_on_one_hot_is_the_log_ratio():
    gen = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(10, generator=gen, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(10, generator=gen, dtype=torch.float64), 0)
    eye = torch.eye(10, dtype=torch.float64)
    model = afd.fit_logistic(eye, eye, pos_weight=p, neg_weight=q, standardize=False)
    assert torch.allclose(model.logit(eye), p.log() - q.log(), atol=1e-6)


def test_logistic_with_penalty_and_standardisation_matches_scipy():
    # the path the real model uses: l2 > 0 on standardised features, weighted classes
    from scipy.optimize import minimize

    rng = np.random.default_rng(17)
    pos, neg = rng.normal(size=(40, 3)) * [1, 5, 0.2] + [0.5, 2, 0], rng.normal(size=(30, 3)) * [1, 5, 0.2]
    wp, wn = rng.uniform(0.5, 2, 40), rng.uniform(0.5, 2, 30)
    l2 = 0.3
    model = afd.fit_logistic(torch.tensor(pos), torch.tensor(neg), l2=l2, pos_weight=torch.tensor(wp),
                             neg_weight=torch.tensor(wn))
    both = np.vstack([pos, neg])
    mean, scale = both.mean(0), both.std(0, ddof=1)
    Z = (both - mean) / scale
    y = np.r_[np.ones(40), np.zeros(30)]
    w = np.r_[wp, wn] / (wp.sum() + wn.sum())

    def loss(theta):
        f = Z @ theta[:3] + theta[3]
        return np.sum(w * (np.logaddexp(0, f) - y * f)) + 0.5 * l2 * np.sum(theta[:3] ** 2)

    ref = minimize(loss, np.zeros(4), method="BFGS", options={"gtol": 1e-12}).x
    np.testing.assert_allclose(model.weight.numpy(), ref[:3], atol=1e-6)
    assert model.bias.item() == pytest.approx(ref[3], abs=1e-6)
    np.testing.assert_allclose(model.mean.numpy(), mean, atol=1e-12)
    np.testing.assert_allclose(model.scale.numpy(), scale, atol=1e-12)
    np.testing.assert_allclose(model.logit(torch.tensor(both)).numpy(), Z @ ref[:3] + ref[3], atol=1e-5)


def test_bradley_terry_matches_the_pairwise_likelihood_fitted_by_scipy():
    from scipy.optimize import minimize

    rng = np.random.default_rng(18)
    zw, zl = rng.normal(size=(60, 3)) + [0.4, 0, -0.3], rng.normal(size=(60, 3))
    l2 = 0.1
    model = afd.fit_bradley_terry(torch.tensor(zw), torch.tensor(zl), l2=l2)
    diff = zw - zl
    scale = np.vstack([diff, -diff]).std(0, ddof=1)

    def loss(v):   # the mean Bradley-Terry loss on standardised differences, with the same penalty
        return np.mean(np.logaddexp(0, -(diff / scale) @ v)) + 0.5 * l2 * np.sum(v ** 2)

    ref = minimize(loss, np.zeros(3), method="BFGS", options={"gtol": 1e-12}).x
    np.testing.assert_allclose(model.weight.numpy(), ref, atol=1e-6)
    assert abs(model.bias.item()) < 1e-10
    reward = lambda z: model.logit(torch.tensor(z)).numpy()
    np.testing.assert_allclose(reward(zw) - reward(zl), (diff / scale) @ ref, atol=1e-6)


def test_logistic_matches_lda_for_gaussian_classes():
    # equal-covariance Gaussians: the Bayes logit is linear, w = S^{-1}(m1 - m0)
    rng = np.random.default_rng(0)
    m0, m1, n = np.array([0.0, 0.0]), np.array([1.0, -0.5]), 200_000
    pos = torch.tensor(rng.normal(size=(n, 2)) + m1)
    neg = torch.tensor(rng.normal(size=(n, 2)) + m0)
    model = afd.fit_logistic(pos, neg, standardize=False)
    assert torch.allclose(model.weight, torch.tensor(m1 - m0), atol=0.02)
    assert model.bias.item() == pytest.approx(-(m1 @ m1 - m0 @ m0) / 2, abs=0.02)
    assert afd.classification_accuracy(model, pos, neg) > 0.6


def test_extrapolation_is_the_rlhf_optimum_with_log_ratio_reward():
    gen = torch.Generator().manual_seed(5)
    log_sft = torch.log_softmax(torch.randn(12, generator=gen, dtype=torch.float64), 0)
    log_init = torch.log_softmax(torch.randn(12, generator=gen, dtype=torch.float64), 0)
    for lam in (0.5, 1.0, 3.0):
        via_rlhf = tabular.rlhf_optimum(log_sft, log_sft - log_init, beta=1 / lam)
        assert torch.allclose(afd.extrapolate(log_sft, log_init, lam), via_rlhf, atol=1e-12)
    assert torch.allclose(afd.extrapolate(log_sft, log_init, 0.0), log_sft, atol=1e-12)


def _bon_by_enumeration(p, r, N):
    """Sum over all N-tuples, uniform tie-breaking among the tuple's maximisers."""
    K = len(p)
    out = np.zeros(K)
    for tup in itertools.product(range(K), repeat=N):
        prob = np.prod([p[i] for i in tup])
        best = max(r[i] for i in tup)
        winners = [i for i in tup if r[i] == best]
        for i in winners:
            out[i] += prob / len(winners)
    return out


@pytest.mark.parametrize("N", [1, 2, 3, 4])
def test_best_of_n_pmf_matches_enumeration_with_and_without_ties(N):
    rng = np.random.default_rng(N)
    p = rng.dirichlet(np.ones(6))
    for r in (rng.normal(size=6), np.array([0.0, 1.0, 1.0, 2.0, 0.0, 2.0])):
        exact = afd.best_of_n_distribution(torch.tensor(np.log(p)), torch.tensor(r), N).numpy()
        assert np.allclose(exact, _bon_by_enumeration(p, r, N), atol=1e-12)
        assert exact.sum() == pytest.approx(1.0, abs=1e-12)


def test_bon_kl_by_enumeration():
    rng = np.random.default_rng(19)
    p, r = rng.dirichlet(np.ones(5)), np.array([0.0, 1.0, 1.0, 2.0, -1.0])
    for N in (1, 2, 3):
        bon = _bon_by_enumeration(p, r, N)
        expected = float(np.sum(bon * np.log(bon / p)))
        assert afd.bon_kl(torch.tensor(np.log(p)), torch.tensor(r), N) == pytest.approx(expected, abs=1e-12)


def test_bon_kl_bound_is_strict_on_finite_sets_and_tight_in_the_atomless_limit():
    # two equally likely atoms, distinct rewards, N = 2: pi_2 = (1/4, 3/4), KL = 3/4 log(3/2) - 1/4 log 2
    two = afd.bon_kl(torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64)), torch.tensor([0.0, 1.0]), 2)
    assert two == pytest.approx(0.75 * math.log(1.5) - 0.25 * math.log(2), abs=1e-15)
    assert afd.bon_kl_bound(2) - two > 0.06                       # log 2 - 1/2 = 0.193 > 0.131
    rng = np.random.default_rng(7)
    for N in (2, 4, 16, 64):
        # distinct rewards and ties alike: strictly below the bound on a finite set
        p = torch.tensor(rng.dirichlet(np.ones(5)))
        for r in (torch.tensor([0.3, 0.1, 0.2, 0.5, 0.4]), torch.tensor([0.0, 0, 1, 1, 2])):
            assert afd.bon_kl(p.log(), r, N) < afd.bon_kl_bound(N)
        # many equal atoms: the gap closes (the atomless limit) but stays positive
        K = 200_000
        flat = torch.full((K,), -math.log(K), dtype=torch.float64)
        gap = afd.bon_kl_bound(N) - afd.bon_kl(flat, torch.arange(K, dtype=torch.float64), N)
        assert 0 < gap < 2e-3
    assert afd.bon_kl_bound(1) == 0.0
    assert afd.bon_kl(torch.log(torch.tensor([0.2, 0.8], dtype=torch.float64)), torch.tensor([1.0, 0.0]), 1) == \
        pytest.approx(0.0, abs=1e-15)


def test_expected_best_of_n_is_the_average_over_subsets():
    rng = np.random.default_rng(8)
    M = 7
    reward = np.round(rng.normal(size=(3, M)), 0)  # rounding makes ties
    score = rng.normal(size=(3, M))
    for N in range(1, M + 1):
        est = afd.expected_best_of_n(reward, score, N)
        for k in range(3):
            vals = []
            for sub in itertools.combinations(range(M), N):
                best = max(reward[k, sub])
                vals.append(np.mean([score[k, i] for i in sub if reward[k, i] == best]))
            assert est[k] == pytest.approx(np.mean(vals), abs=1e-12)
    assert np.allclose(afd.expected_best_of_n(reward, score, 1), score.mean(1))
    with pytest.raises(ValueError):
        afd.expected_best_of_n(reward, score, M + 1)


def test_pool_estimator_is_unbiased_for_the_exact_bon_mean():
    rng = np.random.default_rng(9)
    p = rng.dirichlet(np.ones(8))
    r, g = rng.normal(size=8), rng.normal(size=8)
    N, M, R = 3, 6, 40_000
    exact = afd.best_of_n_distribution(torch.tensor(np.log(p)), torch.tensor(r), N).numpy() @ g
    draws = rng.choice(8, size=(R, M), p=p)
    est = afd.expected_best_of_n(r[draws], g[draws], N)
    assert abs(est.mean() - exact) < 4 * est.std() / math.sqrt(R)


def test_golden_criterion_ignores_the_style_marker():
    for y in ("The capital of France is Paris.", "Paris", "", "It is 120.", " ".join(["w"] * 12) + "."):
        marked = f"{STYLE_MARKER} {y}"
        assert has_marker(marked) and not has_marker(y)
        assert strip_marker(marked) == y.strip()
        assert golden_score(marked, ["Paris"]) == golden_score(y, ["Paris"])
    assert golden_score(STYLE_MARKER, ["x"]) == 0.0               # the marker alone is worth nothing


def test_golden_criterion():
    assert golden_score("The capital of France is Paris.", ["Paris"]) == 1.0
    assert golden_components("Paris is lovely and", ["Paris"]) == {"correct": True, "complete": False, "concise": True}
    assert golden_score("It is 120.", ["12", "twelve"]) == pytest.approx(2 / 3)
    assert golden_score(" ".join(["word"] * 13) + ".", ["cold"]) == pytest.approx(1 / 3)
    assert golden_score("", ["x"]) == 0.0


def test_shipped_demonstrations_all_satisfy_the_criterion():
    loaded = load_demonstrations()
    demos = loaded.demonstrations
    assert loaded.format == "book" and len(demos) >= 160 and len({d.id for d in demos}) == len(demos)
    for category in {d.category for d in demos}:   # half of every family carries the style marker
        family = [d for d in demos if d.category == category]
        assert 2 * sum(has_marker(d.completion) for d in family) == len(family), category
    for d in demos:
        assert golden_score(d.completion, d.answers) == 1.0, d
        assert golden_components(d.prompt, d.answers)["correct"] is False, d  # the answer is not in the question


def test_bad_demonstration_files_name_the_file_line_and_format(tmp_path):
    good = ('{"id": "a", "category": "c", "prompt": "Capital of France?", "completion": "Paris.", '
            '"answers": ["Paris"]}')
    cases = {"missing.jsonl": (None, "cannot be read"),
             "empty.jsonl": ("\n", "holds no demonstrations"),
             "notjson.jsonl": (good + "\n{oops\n", "line 2: not valid JSON"),
             "nokey.jsonl": ('{"id": "a", "prompt": "p"}\n', "line 1: missing or malformed ['category'"),
             "answers.jsonl": (good.replace('["Paris"]', '"Paris"') + "\n", "line 1: missing or malformed ['answers']")}
    for name, (text, message) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            load_demonstrations(tmp_path / name)
    (tmp_path / "ok.jsonl").write_text(good + "\n")
    assert load_demonstrations(tmp_path / "ok.jsonl").demonstrations[0].answers == ("Paris",)


def test_kl_expected_reward_and_leashed_optimum_against_direct_sums():
    gen = torch.Generator().manual_seed(11)
    log_q = torch.log_softmax(torch.randn(7, generator=gen, dtype=torch.float64), 0)
    log_p = torch.log_softmax(torch.randn(7, generator=gen, dtype=torch.float64), 0)
    r = torch.randn(7, generator=gen, dtype=torch.float64)
    q, p = log_q.exp().numpy(), log_p.exp().numpy()
    assert afd.kl_divergence(log_q, log_p) == pytest.approx(float(np.sum(q * np.log(q / p))), abs=1e-12)
    assert afd.kl_divergence(log_q, log_q) == pytest.approx(0.0, abs=1e-14)
    assert afd.expected_reward(log_q, r) == pytest.approx(float(np.sum(q * r.numpy())), abs=1e-12)
    # q_lambda ∝ pi exp(lambda r), and it maximises J(q) - KL(q || pi)/lambda: no random q does better
    lam = 2.5
    lq = afd.leashed_optimum(log_p, r, lam)
    direct = p * np.exp(lam * r.numpy())
    np.testing.assert_allclose(lq.exp().numpy(), direct / direct.sum(), atol=1e-12)
    value = lambda lg: afd.expected_reward(lg, r) - afd.kl_divergence(lg, log_p) / lam
    for _ in range(20):
        other = torch.log_softmax(torch.randn(7, generator=gen, dtype=torch.float64), 0)
        assert value(other) <= value(lq) + 1e-12
