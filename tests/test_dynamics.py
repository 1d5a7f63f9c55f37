"""The formulas of prefdyn.theory.dynamics against independent computations (autograd on an explicit
softmax, brute force, closed forms, Monte Carlo). All float64 and fast."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prefdyn.theory import dynamics as dyn

YES, NO = 2, 5


def small_world(n=24, d=6, V=8, seed=0, balanced=True):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.7
    s = torch.tensor([1, -1] * (n // 2)) if balanced else torch.tensor([1] * (2 * n // 3) + [-1] * (n - 2 * n // 3))
    feats = feats + 0.8 * s[:, None].double() * torch.linspace(1, 0.2, d, dtype=torch.float64)
    W0 = torch.randn(V, d, generator=g, dtype=torch.float64)
    return feats, s, W0


def chosen_rejected(s):
    chosen = torch.where(s == 1, YES, NO)
    rejected = torch.where(s == 1, NO, YES)
    return chosen, rejected


def u_vector(V):
    u = torch.zeros(V, dtype=torch.float64)
    u[YES], u[NO] = 1.0, -1.0
    return u


def test_rank_one_dynamics_match_autograd_on_explicit_softmax():
    feats, s, W0 = small_world()
    beta, lr, steps = 0.7, 0.9, 6
    Ws = dyn.explicit_softmax_dpo(W0, feats, *chosen_rejected(s), beta=beta, lr=lr, steps=steps)
    traj = dyn.last_layer_dpo(feats, s, beta=beta, lr=lr, steps=steps)
    u = u_vector(W0.shape[0])
    for t in range(steps + 1):
        assert torch.allclose(Ws[t] - W0, torch.outer(u, traj.v[t]), atol=1e-12, rtol=0)
        assert math.isclose(traj.weight_change[t], (Ws[t] - W0).norm().item(), rel_tol=1e-10, abs_tol=1e-14)
        assert math.isclose(traj.weight_change[t], torch.linalg.matrix_norm(Ws[t] - W0, ord=2).item(),
                            rel_tol=1e-9, abs_tol=1e-14)
    assert traj.v[-1].norm() > 0


def test_margins_and_losses_equal_explicit_log_softmax():
    feats, s, W0 = small_world(seed=1)
    v = torch.randn(feats.shape[1], dtype=torch.float64)
    W = W0 + torch.outer(u_vector(W0.shape[0]), v)
    beta = 0.3
    chosen, rejected = chosen_rejected(s)
    rows = torch.arange(len(s))
    lp, lr_ = torch.log_softmax(feats @ W.T, -1), torch.log_softmax(feats @ W0.T, -1)
    h = beta * (lp[rows, chosen] - lr_[rows, chosen] - lp[rows, rejected] + lr_[rows, rejected])
    assert torch.allclose(dyn.margins(v, feats, s, beta), h, atol=1e-12)
    assert torch.allclose(dyn.dpo_losses(v, feats, s, beta), -F.logsigmoid(h), atol=1e-12)


def test_policy_accuracy_uses_reference_log_odds():
    feats, s, W0 = small_world(seed=2)
    ref = feats @ (W0[YES] - W0[NO])
    traj = dyn.last_layer_dpo(feats, s, beta=0.5, lr=2.0, steps=3, ref_logodds=ref)
    Ws = dyn.explicit_softmax_dpo(W0, feats, *chosen_rejected(s), beta=0.5, lr=2.0, steps=3)
    chosen, rejected = chosen_rejected(s)
    rows = torch.arange(len(s))
    for t in range(4):
        lp = torch.log_softmax(feats @ Ws[t].T, -1)
        acc = (lp[rows, chosen] > lp[rows, rejected]).double().mean().item()
        assert traj.policy_accuracy[t, 0] == pytest.approx(acc, abs=1e-12)


@pytest.mark.parametrize("balanced", [True, False])
def test_first_step_update(balanced):
    feats, s, _ = small_world(n=30, seed=3, balanced=balanced)
    beta, lr = 0.4, 0.25
    traj = dyn.last_layer_dpo(feats, s, beta=beta, lr=lr, steps=1)
    p = (s == 1).double().mean()
    brute = 0.5 * lr * beta * (p * feats[s == 1].mean(0) - (1 - p) * feats[s == -1].mean(0))
    assert torch.allclose(traj.v[1], brute, atol=1e-14)
    assert torch.allclose(dyn.first_step_v(feats, s, beta, lr), brute, atol=1e-14)
    m_norm = brute.norm().item() / (0.5 * lr * beta)   # the signed mean, any class balance
    assert dyn.first_step_weight_change(m_norm, beta, lr) == pytest.approx(traj.weight_change[1], rel=1e-12)
    if balanced:
        delta = feats[s == 1].mean(0) - feats[s == -1].mean(0)
        assert dyn.first_step_weight_change(delta.norm().item() / 2, beta, lr) == pytest.approx(
            traj.weight_change[1], rel=1e-12)


def test_linear_weight_bound_holds_and_is_attained_at_step_one_for_aligned_features():
    feats, s, _ = small_world(seed=4)
    beta, lr = 1.0, 3.0
    traj = dyn.last_layer_dpo(feats, s, beta=beta, lr=lr, steps=20)
    G = feats.norm(dim=1).mean().item()
    bound = dyn.weight_change_bound(np.arange(21), beta, lr, G)
    assert np.all(traj.weight_change <= bound + 1e-12)
    # all s*g equal: the first step is exactly half the bound (sigma(0) = 1/2)
    g = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    f2, s2 = torch.cat([g, -g]), torch.tensor([1, -1])
    t2 = dyn.last_layer_dpo(f2, s2, beta=beta, lr=lr, steps=1)
    assert t2.weight_change[1] == pytest.approx(0.5 * dyn.weight_change_bound(1, beta, lr, g.norm().item()), rel=1e-12)


def test_loss_drop_bounds_bracket_the_exact_drop_and_first_order_is_tight_for_small_steps():
    feats, s, _ = small_world(seed=5)
    beta = 0.5
    for lr in (0.01, 0.3, 3.0):
        traj = dyn.last_layer_dpo(feats, s, beta=beta, lr=lr, steps=1)
        drop = traj.loss[0, 0] - traj.loss[1, 0]
        assert traj.loss[0, 0] == pytest.approx(math.log(2), abs=1e-14)
        lo, hi = dyn.loss_drop_bounds(feats, s, beta, lr)
        assert lo <= drop <= hi
    m2 = dyn.signed_mean(feats, s).pow(2).sum().item()
    traj = dyn.last_layer_dpo(feats, s, beta=beta, lr=1e-4, steps=1)
    assert traj.loss[0, 0] - traj.loss[1, 0] == pytest.approx(dyn.first_order_loss_drop(m2, beta, 1e-4), rel=1e-3)


def test_joint_first_step_gains_equal_observed_margin_gains():
    feats, s, groups = dyn.synthetic_behaviours([0.5, 1.5, 3.0], n_per_class=20, d=6, common=2.0, seed=6)
    beta, lr = 0.3, 0.8
    traj = dyn.last_layer_dpo(feats, s, beta=beta, lr=lr, steps=1, groups=groups)
    pred = dyn.joint_first_step_gains(feats, s, groups, beta, lr)
    for k, name in enumerate(traj.groups):
        assert traj.margin[1, k] - traj.margin[0, k] == pytest.approx(pred[name], rel=1e-10)
    assert pred[2] > pred[1] > pred[0]


def test_priority_identity_and_level():
    g = torch.Generator().manual_seed(7)
    di, dj = torch.randn(9, generator=g, dtype=torch.float64), 0.4 * torch.randn(9, generator=g, dtype=torch.float64)
    left, right = dyn.priority_gap(di, dj)
    assert left == pytest.approx(right, rel=1e-12)
    b = (di + dj) / 2
    closed = ((di.norm() ** 2 - dj.norm() ** 2) / (2 * b.norm() * torch.maximum(di.norm(), dj.norm()))).item()
    assert dyn.priority_level(di, dj) == pytest.approx(closed, rel=1e-12)
    assert dyn.priority_level(dj, di) == pytest.approx(-closed, rel=1e-12)


def test_distributional_quantities_by_brute_force():
    feats, s, _ = small_world(seed=8)
    x = feats.numpy()
    sn = s.numpy()
    delta = x[sn == 1].mean(0) - x[sn == -1].mean(0)
    assert np.allclose(dyn.preference_gap(feats, s).numpy(), delta)
    assert dyn.distinguishability(feats, s) == pytest.approx(np.linalg.norm(delta))
    assert torch.allclose(dyn.signed_mean(feats, s), torch.tensor(delta / 2))  # balanced
    kappa, tau = dyn.concentration(feats, s)
    covs = [np.cov(x[sn == c], rowvar=False) for c in (1, -1)]
    assert kappa == pytest.approx(max(np.linalg.norm(c, 2) for c in covs))
    assert tau == pytest.approx(max(np.trace(c) for c in covs))
    with pytest.raises(ValueError):
        dyn.preference_gap(feats[s == 1], s[s == 1])
    with pytest.raises(ValueError):
        dyn.signed_mean(feats, torch.zeros_like(s))


def test_synthetic_generator_has_the_requested_distinguishability_and_noise():
    norms = [0.5, 2.0]
    feats, s, groups = dyn.synthetic_behaviours(norms, n_per_class=4000, d=5, sigma=1.5, common=3.0, seed=9)
    groups = np.array(groups)
    for k, want in enumerate(norms):
        got = dyn.distinguishability(feats[groups == k], s[groups == k])
        assert got == pytest.approx(want, abs=0.15)
    lap, _, _ = dyn.synthetic_behaviours([1.0], n_per_class=20000, d=3, sigma=1.5, noise="laplace", seed=9)
    assert lap[:, 1].std().item() == pytest.approx(1.5, rel=0.05)
    K, alpha = dyn.tail_constant("laplace", 1.5)
    noise = lap[:, 2].abs().numpy()
    for t in (1.0, 3.0, 6.0):
        assert np.mean(noise >= t) <= 2 * math.exp(-(t / K) ** alpha) + 0.01


def test_gaussian_accuracy_and_subexponential_bound_against_monte_carlo():
    n = 40000
    for noise in ("gaussian", "laplace"):
        feats, s, _ = dyn.synthetic_behaviours([2.0], n_per_class=n, d=4, sigma=1.0, noise=noise, seed=10)
        acc = ((s.double() * feats[:, 0]) > 0).double().mean().item()   # sign(s <Delta, g>)
        K, alpha = dyn.tail_constant(noise, 1.0)
        assert acc >= dyn.subexponential_accuracy_bound(2.0, K, alpha) - 0.01
        if noise == "gaussian":
            assert acc == pytest.approx(dyn.gaussian_reward_accuracy(2.0, 1.0), abs=0.006)
    # an offset of the common mean along Delta lowers the accuracy
    assert dyn.gaussian_reward_accuracy(2.0, 1.0, offset=0.7) < dyn.gaussian_reward_accuracy(2.0, 1.0)


def test_population_loss_curve_matches_a_large_sample():
    beta, lr, steps = 0.5, 4.0, 15
    feats, s, _ = dyn.synthetic_behaviours([1.5], n_per_class=20000, d=3, sigma=1.0, seed=11)
    traj = dyn.last_layer_dpo(feats, s, beta=beta, lr=lr, steps=steps)
    pop = dyn.population_loss_curve(1.5, 1.0, beta, lr, steps)
    assert pop[0] == pytest.approx(math.log(2))
    assert np.max(np.abs(traj.loss[:, 0] - pop)) < 0.01
    assert pop[-1] < pop[0] - 0.05


def test_minibatch_training_and_spearman():
    feats, s, _ = small_world(seed=12)
    t = dyn.last_layer_dpo(feats, s, beta=0.5, lr=1.0, steps=5, batch_size=4, seed=0)
    t2 = dyn.last_layer_dpo(feats, s, beta=0.5, lr=1.0, steps=5, batch_size=4, seed=0)
    assert torch.equal(t.v, t2.v) and not torch.equal(t.v[1], dyn.first_step_v(feats, s, 0.5, 1.0))
    assert dyn.spearman([1, 2, 3, 4], [10, 20, 25, 40]) == pytest.approx(1.0)
    assert dyn.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_smoothness_bounds_the_hessian_and_gives_monotone_descent():
    feats, s, _ = small_world(seed=13)
    feats = feats + 3.0        # a large common component, as in real embeddings
    beta = 0.5
    L = dyn.smoothness(feats, beta)
    v = 0.05 * torch.randn(feats.shape[1], dtype=torch.float64)
    H = torch.autograd.functional.hessian(lambda w: dyn.dpo_losses(w, feats, s, beta).mean(), v)
    assert torch.linalg.eigvalsh(H)[-1].item() <= L + 1e-12
    x = feats
    assert L == pytest.approx(beta**2 * torch.linalg.eigvalsh(x.T @ x / len(x))[-1].item())
    good = dyn.last_layer_dpo(feats, s, beta=beta, lr=1.9 / L, steps=40)
    assert np.all(np.diff(good.loss[:, 0]) <= 1e-12)
    # a step lr on W is a step lr/2 on v (dpo_step against autograd), so the limit is 4/L, not 2/L
    v.requires_grad_(True)
    grad, = torch.autograd.grad(dyn.dpo_losses(v, feats, s, beta).mean(), v)
    assert torch.allclose(dyn.dpo_step(v.detach(), feats, s, beta, 0.3), v.detach() - 0.15 * grad, atol=1e-12)
    near_limit = dyn.last_layer_dpo(feats, s, beta=beta, lr=3.9 / L, steps=40)
    assert np.all(np.diff(near_limit.loss[:, 0]) <= 1e-12)
    bad = dyn.last_layer_dpo(feats, s, beta=beta, lr=6.0 / L, steps=40)
    assert np.any(np.diff(bad.loss[:, 0]) > 0)
    after = dyn.losses_after(feats, s, [0] * len(s), beta=beta, lr=1.9 / L, steps=40)
    assert after[0] == pytest.approx(good.loss[-1, 0], rel=1e-12)


def test_gaussian_accuracy_of_direction_against_monte_carlo():
    g = torch.Generator().manual_seed(14)
    mu_p, mu_m = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64), torch.tensor([-0.5, 0.2, 2.0], dtype=torch.float64)
    w = torch.tensor([1.0, 0.3, -0.1], dtype=torch.float64)
    n = 200000
    xp = mu_p + 0.8 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    xm = mu_m + 0.8 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    mc = (((xp @ w) > 0).double().mean() + ((xm @ w) < 0).double().mean()).item() / 2
    assert dyn.gaussian_accuracy_of_direction(w, mu_p, mu_m, 0.8) == pytest.approx(mc, abs=0.003)
    e = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert dyn.gaussian_accuracy_of_direction(e, torch.tensor([1.0, 0, 4], dtype=torch.float64), torch.tensor([-1.0, 0, 4], dtype=torch.float64), 1.0) \
        == pytest.approx(dyn.gaussian_reward_accuracy(2.0, 1.0), abs=1e-12)


def test_gaussian_plugin_accuracy_is_the_closed_form_on_gaussian_classes_and_predicts_fresh_samples():
    g = torch.Generator().manual_seed(15)
    mu_p, mu_m = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64), torch.tensor([-0.5, 0.2, 2.0], dtype=torch.float64)
    w = torch.tensor([1.0, 0.3, -0.1], dtype=torch.float64)

    def sample(n_plus, n_minus):
        x = torch.cat([mu_p + 0.8 * torch.randn(n_plus, 3, generator=g, dtype=torch.float64),
                       mu_m + 0.8 * torch.randn(n_minus, 3, generator=g, dtype=torch.float64)])
        return x @ w, torch.tensor([1] * n_plus + [-1] * n_minus)

    z, s = sample(100000, 100000)
    exact = dyn.gaussian_accuracy_of_direction(w, mu_p, mu_m, 0.8)
    assert dyn.gaussian_plugin_accuracy(z, s) == pytest.approx(exact, abs=0.003)
    z, s = sample(300, 100)                                    # unbalanced: classes weighted by their shares
    zf, sf = sample(300000, 100000)
    fresh = ((sf * zf) > 0).double().mean().item()
    assert dyn.gaussian_plugin_accuracy(z, s) == pytest.approx(fresh, abs=0.03)
    skewed = torch.tensor([10.0, 0.1, 0.1, 0.1, -10.0, -0.1, -0.1, -0.1])   # all right, far from normal:
    assert 0.6 < dyn.gaussian_plugin_accuracy(skewed, torch.tensor([1, 1, 1, 1, -1, -1, -1, -1])) < 0.8   # a model, not a count
    with pytest.raises(ValueError, match="two statements of each class"):
        dyn.gaussian_plugin_accuracy(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 1, -1]))


def test_stratified_resample_keeps_strata():
    s = torch.tensor([1, -1, 1, -1, 1, -1, -1, 1])
    groups = ["a", "a", "a", "a", "b", "b", "b", "b"]
    idx = dyn.stratified_resample(s, groups, np.random.default_rng(0))
    assert len(idx) == 8
    assert [groups[i] for i in idx].count("a") == 4
    assert sorted(int(s[i]) for i in idx if groups[i] == "b") == [-1, -1, 1, 1]


def test_separate_training_equals_one_run_per_group():
    feats, s, groups = dyn.synthetic_behaviours([0.5, 2.0, 1.0], n_per_class=15, d=5, common=2.0, seed=15)
    feats, s, groups = feats[:-4], s[:-4], groups[:-4]          # unequal group sizes
    out = dyn.losses_after(feats, s, groups, beta=0.5, lr=0.3, steps=7, separate=True)
    g = np.array(groups)
    for k in range(3):
        alone = dyn.last_layer_dpo(feats[g == k], s[g == k], beta=0.5, lr=0.3, steps=7)
        assert out[k] == pytest.approx(alone.loss[-1, 0], rel=1e-12)


@pytest.mark.parametrize("separate", [False, True])
def test_resampled_losses_equal_training_on_each_resample(separate):
    feats, s, groups = dyn.synthetic_behaviours([0.5, 2.0, 1.0], n_per_class=10, d=4, common=1.0, seed=16)
    rng = np.random.default_rng(3)
    idx = [dyn.stratified_resample(s, groups, rng) for _ in range(5)]
    weights = np.stack([np.bincount(i, minlength=len(s)) for i in idx])
    batched = dyn.resampled_losses_after(feats, s, groups, weights, beta=0.5, lr=0.4, steps=9, separate=separate)
    for r, i in enumerate(idx):
        one = dyn.losses_after(feats[i], s[i], [groups[j] for j in i], beta=0.5, lr=0.4, steps=9, separate=separate)
        np.testing.assert_allclose(batched[r], [one[k] for k in (0, 1, 2)], rtol=1e-12)


def test_resampled_losses_reject_bad_weights():
    feats, s, groups = dyn.synthetic_behaviours([1.0, 2.0], n_per_class=3, d=3, seed=17)
    with pytest.raises(ValueError, match="non-negative multiplicities"):
        dyn.resampled_losses_after(feats, s, groups, np.ones((2, len(s) - 1)), beta=1, lr=1, steps=1)
    w = np.ones((1, len(s)))
    w[0, :6] = 0                                   # group 0 has no example left
    with pytest.raises(ValueError, match="positive weight in every trained group"):
        dyn.resampled_losses_after(feats, s, groups, w, beta=1, lr=1, steps=1, separate=True)


def test_fresh_batches_are_the_authors_sgd_on_the_whole_softmax_head_and_held_out_metrics_match():
    """The authors' protocol (a fresh random batch every step) against autograd on the explicit
    softmax head over the same batches; the held-out loss and policy accuracy of every step against
    the explicit log-softmax of that head on statements it never saw."""
    feats, s, W0 = small_world(n=40, seed=21)
    train, test = torch.arange(30), torch.arange(30, 40)
    beta, lr, steps, b, seed = 0.6, 0.8, 7, 9, 3
    ref = feats @ (W0[YES] - W0[NO])
    traj = dyn.last_layer_dpo(feats[train], s[train], beta=beta, lr=lr, steps=steps, batch_size=b,
                              fresh_batches=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randperm(len(train), generator=gen)[:b] for _ in range(steps)]
    assert len({tuple(x.tolist()) for x in batches}) == steps and all(len(set(x.tolist())) == b for x in batches)
    chosen, rejected = chosen_rejected(s)
    Ws = dyn.explicit_softmax_dpo(W0, feats[train], chosen[train], rejected[train], beta=beta, lr=lr, steps=steps,
                                  batches=batches)
    u = u_vector(W0.shape[0])
    for t in range(steps + 1):
        assert torch.allclose(Ws[t] - W0, torch.outer(u, traj.v[t]), atol=1e-12, rtol=0)
    held = dyn.trajectory_metrics(traj.v, feats[test], s[test], beta=beta, ref_logodds=ref[test])
    rows = torch.arange(len(test))
    ref_lp = torch.log_softmax(feats[test] @ W0.T, -1)
    for t in range(steps + 1):
        lp = torch.log_softmax(feats[test] @ Ws[t].T, -1)
        h = beta * ((lp - ref_lp)[rows, chosen[test]] - (lp - ref_lp)[rows, rejected[test]])
        assert held.loss[t, 0] == pytest.approx(-F.logsigmoid(h).mean().item(), abs=1e-12)
        acc = (lp[rows, chosen[test]] > lp[rows, rejected[test]]).double().mean().item()
        assert held.policy_accuracy[t, 0] == pytest.approx(acc, abs=1e-12)
    assert held.loss[-1, 0] != held.loss[0, 0]


def test_stable_step_bound_is_four_over_L_and_descent_holds_below_it_in_every_group():
    """4/L of the largest group's smoothness: below it every group alone and all jointly descend and the
    gradient norm never grows (co-coercivity), so every step's drop is at most the first step's
    first-order drop; at twice the bound the same features rise."""
    feats, s, groups = dyn.synthetic_behaviours([0.5, 1.5], n_per_class=20, d=5, common=4.0, seed=31)
    feats, s, groups = feats[:-14], s[:-14], groups[:-14]          # unbalanced: the gradient has a part along c
    beta = 0.7
    bound = dyn.stable_step_bound(feats, beta, groups)
    assert bound == pytest.approx(4 / dyn.smoothness(feats, beta, groups), rel=1e-12)
    g = np.array(groups)
    for rows in [g == 0, g == 1, np.ones_like(g, bool)]:
        f, sg = feats[torch.from_numpy(rows)], s[torch.from_numpy(rows)]
        run = dyn.last_layer_dpo(f, sg, beta=beta, lr=0.97 * bound, steps=60)
        assert np.all(np.diff(run.loss[:, 0]) <= 1e-12)
        grads = [torch.autograd.functional.jacobian(lambda w: dyn.dpo_losses(w, f, sg, beta).mean(), v).norm().item()
                 for v in run.v]
        assert np.all(np.diff(grads) <= 1e-12)
        d1 = dyn.first_order_drops(f, sg, [0] * len(sg), beta, 0.97 * bound)[0]
        drops = run.loss[0, 0] - run.loss[1:, 0]
        assert np.all(drops <= np.arange(1, 61) * d1 + 1e-12)          # R1(5): the first-order ratio <= 1
    assert np.any(np.diff(dyn.last_layer_dpo(feats, s, beta=beta, lr=2 * bound, steps=60).loss[:, 0]) > 0)


def test_first_order_drops_alone_and_joint_against_the_step_one_identities():
    feats, s, groups = dyn.synthetic_behaviours([0.4, 1.2, 2.5], n_per_class=30, d=6, common=2.0, seed=32)
    beta, lr = 0.4, 1e-4
    alone = dyn.first_order_drops(feats, s, groups, beta, lr)
    joint = dyn.first_order_drops(feats, s, groups, beta, lr, joint=True)
    gains = dyn.joint_first_step_gains(feats, s, groups, beta, lr)
    g = np.array(groups)
    for k in range(3):
        m2 = dyn.signed_mean(feats[g == k], s[g == k]).pow(2).sum().item()
        assert alone[k] == pytest.approx(dyn.first_order_loss_drop(m2, beta, lr), rel=1e-12)
        assert joint[k] == pytest.approx(gains[k] / 2, rel=1e-12)
        # a small step: the exact drops are the first-order ones
        one = dyn.last_layer_dpo(feats[g == k], s[g == k], beta=beta, lr=lr, steps=1)
        assert one.loss[0, 0] - one.loss[1, 0] == pytest.approx(alone[k], rel=1e-3)
    both = dyn.last_layer_dpo(feats, s, beta=beta, lr=lr, steps=1, groups=groups)
    np.testing.assert_allclose(both.loss[0] - both.loss[1], joint, rtol=1e-3)


def test_first_order_intervals_contain_the_drops_and_free_the_unclear_units():
    D1 = np.array([1.0, 2.0, -0.5, 0.01])
    drops = np.array([0.8, 1.9, -0.3, 0.5])
    lo, hi, (a, b) = dyn.first_order_intervals(D1, drops, steps=1)
    assert (a, b) == (0.6, 0.95)
    assert np.all((lo[:3] <= drops[:3] + 1e-12) & (drops[:3] <= hi[:3] + 1e-12))
    np.testing.assert_allclose(lo[:3], [0.6, 1.2, -0.475])
    np.testing.assert_allclose(hi[:3], [0.95, 1.9, -0.3])
    assert lo[3] == -np.inf and hi[3] == np.inf                       # |D1| below a tenth of the largest
    with pytest.raises(ValueError):
        dyn.first_order_intervals(D1, drops[:3], steps=1)


def _feasible_orders(lo, hi):
    """Brute force: every permutation whose values can be chosen increasing inside the intervals."""
    import itertools

    for perm in itertools.permutations(range(len(lo))):
        prev, y = -np.inf, np.empty(len(lo))
        for e in perm:
            y[e] = max(prev + 1e-9, lo[e])
            if y[e] > hi[e]:
                break
            prev = y[e]
        else:
            yield y


@pytest.mark.parametrize("seed", range(6))
def test_least_spearman_is_the_minimum_over_every_feasible_order_and_daniels_is_below_it(seed):
    from prefdyn.stats import spearman

    rng = np.random.default_rng(seed)
    n = 6
    x = rng.normal(size=n)
    centre = 2 * x + rng.normal(size=n)
    width = rng.uniform(0, 1.5, size=n)
    lo, hi = centre - width, centre + width
    brute = min(spearman(x, y) for y in _feasible_orders(lo, hi))
    assert dyn.least_spearman(x, lo, hi) == pytest.approx(brute, abs=1e-12)
    assert dyn._daniels_bound(x, lo, hi) <= brute + 1e-12
    assert dyn.least_spearman(x, lo, hi, max_states=1) == pytest.approx(dyn._daniels_bound(x, lo, hi))
    # point intervals: the statistic itself
    assert dyn.least_spearman(x, centre, centre) == pytest.approx(spearman(x, centre), abs=1e-12)


def test_least_spearman_lower_bound_is_below_the_statistic_for_any_values_in_the_intervals():
    from prefdyn.stats import spearman_lower_bound

    rng = np.random.default_rng(7)
    x = rng.normal(size=9)
    centre = 3 * x + rng.normal(size=9)
    lo, hi = centre - 0.4, centre + 0.4
    least = dyn.least_spearman_lower_bound(x, lo, hi, seed=5)
    for _ in range(10):
        assert spearman_lower_bound(x, rng.uniform(lo, hi), seed=5) >= least - 1e-12
    assert dyn.least_spearman_lower_bound(x, centre, centre, seed=5) == pytest.approx(
        spearman_lower_bound(x, centre, seed=5), abs=1e-12)
    wide = dyn.least_spearman_lower_bound(x, centre - 100, centre + 100, seed=5)
    assert wide < 0 < least


def test_forced_shares_of_signs_and_pairs():
    lo, hi = np.array([0.1, -1.0, -2.0, 0.5]), np.array([0.3, 1.0, -1.0, 0.9])
    assert dyn.forced_sign_share(lo, hi, [1, 1, -1, -1]) == pytest.approx(0.5)     # units 0 and 2
    assert dyn.forced_pair_share(lo[:2], hi[:2], lo[2:], hi[2:], [1, 1]) == pytest.approx(0.5)
    assert dyn.forced_pair_share([0.5], [0.9], [0.1], [0.6], [1]) == 0.0          # overlapping: not forced


def test_displacement_score_is_the_pairwise_sum_and_decides_step_one_displacement_exactly():
    feats, s, W0 = small_world(n=30, d=6, V=9, seed=33)
    beta, lr = 0.6, 2.0
    C = dyn.displacement_score(feats, s)
    brute = torch.stack([sum(-s[i] * s[j] * feats[i] @ feats[j] for j in range(len(s))) / len(s)
                         for i in range(len(s))]).double()
    assert torch.allclose(C, brute, atol=1e-12)
    one = dyn.last_layer_dpo(feats, s, beta=beta, lr=lr, steps=1)
    assert torch.allclose(dyn.margins(one.v[1], feats, s, beta), -lr * beta**2 * C, atol=1e-12)
    w0, l0 = dyn.answer_logps(W0, feats, one.v[0], YES, NO)
    w1, l1 = dyn.answer_logps(W0, feats, one.v[1], YES, NO)
    chosen0, chosen1 = torch.where(s == 1, w0, l0), torch.where(s == 1, w1, l1)
    assert torch.equal(chosen1 < chosen0, C > 0) and (C > 0).any() and (C < 0).any()


def test_answer_logps_is_the_explicit_softmax_and_the_chosen_answer_moves_with_the_margin():
    feats, s, W0 = small_world(n=24, d=5, V=11, seed=34)
    u = u_vector(11)
    for seed in range(5):
        v = torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
        w, l = dyn.answer_logps(W0, feats, v, YES, NO)
        lp = torch.log_softmax(feats @ (W0 + torch.outer(u, v)).T, -1)
        assert torch.allclose(w, lp[:, YES], atol=1e-12) and torch.allclose(l, lp[:, NO], atol=1e-12)
        w0, l0 = dyn.answer_logps(W0, feats, torch.zeros(5, dtype=torch.float64), YES, NO)
        fell = torch.where(s == 1, w, l) < torch.where(s == 1, w0, l0)
        assert torch.equal(fell, dyn.margins(v, feats, s, 0.5) < 0)   # no squeezing in the last layer


def test_last_layer_dpo_every_keeps_the_same_iterates():
    feats, s, _ = small_world(seed=35)
    full = dyn.last_layer_dpo(feats, s, beta=0.5, lr=0.7, steps=10)
    thin = dyn.last_layer_dpo(feats, s, beta=0.5, lr=0.7, steps=10, every=4)
    assert torch.equal(thin.v, full.v[[0, 4, 8, 10]])
    np.testing.assert_array_equal(thin.loss[:, 0], full.loss[[0, 4, 8, 10], 0])
