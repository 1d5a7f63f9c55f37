"""The drivers of chapter 3 (:mod:`prefdyn.experiments.ch03`), each against an independent computation:
plain autograd gradient descent on the head, explicit softmaxes and one-hot kernels, the closed forms
of the theorems, and (slow) the model's own logits and scores."""
import math
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import norm

from prefdyn.book.registry import MAX_FALSE_PASS, load_registry
from prefdyn.datasets.persona import load_persona
from prefdyn.experiments import ch03, persona
from prefdyn.llm import models
from prefdyn.llm.models import transformer_blocks
from prefdyn.params import ParameterError
from prefdyn.stats import ProportionWorld, simulated_pass_rate
from prefdyn.theory import generalization as gen


def head_gradient_descent(G, chosen, rejected, vocab, beta, lr, steps):
    """Full-batch gradient descent on the mean DPO loss over the whole head ``W`` (from ``W_0 = 0``)
    with autograd: the margins ``beta (W[y_w] - W[y_l])^T g`` at every step and the last ``W``."""
    W = torch.zeros(vocab, G.shape[1], dtype=G.dtype, requires_grad=True)
    margins = []
    for t in range(steps + 1):
        r = beta * ((W[chosen] - W[rejected]) * G).sum(1)
        margins.append(r.detach().clone())
        if t == steps:
            break
        (grad,) = torch.autograd.grad(-torch.nn.functional.logsigmoid(r).mean(), W)
        with torch.no_grad():
            W -= lr * grad
    return torch.stack(margins), W.detach()


def lambert_margin(t, K, beta):
    """The noiseless margin at ``t``: the root of ``r + e^r = 2 beta^2 t / K + 1``, by bisection."""
    target, lo, hi = 2 * beta**2 * t / K + 1, 0.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid + math.exp(mid) < target else (lo, mid)
    return lo


def test_binomial_se_by_hand():
    assert ch03.binomial_se(0.5, 100) == pytest.approx(0.05, abs=1e-15)
    assert ch03.binomial_se(0.1, 400) == pytest.approx(0.015, abs=1e-15)
    assert ch03.binomial_se(0.0, 100) == pytest.approx(0.01, abs=1e-15)   # the floor 1/n: sqrt(1/100/100)


GOOD = dict(protocol="book", beta=0.1, lr_fraction=0.75, lr_full=5e-5, held_out=100, adam_beta=0.01, adam_lr=1e-3)


def test_check_parameters_rejects_bad_values():
    ch03.check_parameters(**GOOD)
    ch03.check_parameters(**{**GOOD, "protocol": "authors", "lr_fraction": 1.99})
    for name, bad, match in (("beta", 0.0, "beta"), ("adam_beta", -1.0, "adam_beta"), ("adam_lr", 0, "adam_lr"),
                             ("held_out", 1, "held_out"), ("held_out", 0.2, "held_out"), ("held_out", True, "held_out"),
                             ("lr_fraction", 2.0, "below 2"), ("protocol", "paper", "protocol")):
        with pytest.raises(ValueError, match=match):
            ch03.check_parameters(**{**GOOD, name: bad})
    with pytest.raises(ParameterError, match="beta"):
        ch03.check_parameters(**{**GOOD, "beta": 0.0})


def test_step_size_is_a_fraction_of_two_over_L_of_each_loss():
    assert ch03.step_size(0.75, 4.0) == pytest.approx(0.375)
    assert ch03.step_size(0.75, 4.0, "ipo") == pytest.approx(0.375 / 8)        # IPO's curvature is 8 times DPO's bound
    assert ch03.step_size(1.5, 4.0, "slic") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="4/L"):
        ch03.step_size(2.0, 4.0)


def test_run_config_against_autograd_and_closed_forms():
    K, Q, d, v, l_b, seed, beta, steps, n_test = 2, 6, 5, 0.2, 0.5, 3, 1.0, 10, 7
    row = ch03.run_config(ch03.Clusters(K, Q, d, v, l_b, seed), beta=beta, steps=steps, n_test=n_test)
    data = gen.cluster_data(K, Q, d, v, l_b, seed=seed)
    tau1 = K * math.log(3) / (5 * beta**2)
    margins, W = head_gradient_descent(data.features, data.chosen, data.rejected, data.vocab, beta, tau1 / steps, steps)
    assert (row["N"], row["tau1"]) == (2 * K * Q, pytest.approx(tau1, rel=1e-15))
    assert torch.allclose(row["run"].train, margins, atol=1e-12, rtol=0)
    t = tau1 / steps * np.arange(steps + 1)[:, None]
    r = margins.numpy()
    assert row["in_theorem"] == bool(np.all((r >= beta**2 * t / (8 * K) - 1e-12) & (r <= 5 * beta**2 * t / K + 1e-12)))
    assert row["hypothesis_holds"] == bool(np.all((r >= -1e-12) & (r <= math.log(3))))
    assert row["ideal_end"] == pytest.approx(lambert_margin(tau1, K, beta), abs=1e-10)
    # exact risk: per cluster c, Phi(-u^T mu_c / (v ||u||)) with u = beta (W[y_w] - W[y_l])
    risks = []
    for c in range(2 * K):
        w, l = (2 * (c // 2), 2 * (c // 2) + 1) if c % 2 == 0 else (2 * (c // 2) + 1, 2 * (c // 2))
        u = beta * (W[w] - W[l])
        risks.append(norm.cdf(-(u @ data.means[c]).item() / (v * u.norm().item())))
    assert row["risk"] == pytest.approx(np.mean(risks), rel=1e-9)
    assert row["log_risk"] == pytest.approx(math.log(np.mean(risks)), rel=1e-9)
    fresh = gen.cluster_data(K, n_test, d, v, l_b, seed=seed + 10_000)
    fresh_r = beta * ((W[fresh.chosen] - W[fresh.rejected]) * fresh.features).sum(1)
    assert row["test_error"] == pytest.approx((fresh_r <= 0).double().mean().item(), abs=1e-15)
    assert row["n_test_total"] == 2 * K * n_test
    assert row["paper"] == pytest.approx(2 * K * Q**2 * math.exp(-Q / 45), rel=1e-12)
    assert row["risk"] <= row["bound"] <= 1                      # Theorem 4.3 itself
    # comparison rates from the kernel written out with one-hot responses
    e = torch.eye(data.vocab, dtype=torch.float64)
    y = e[data.chosen] - e[data.rejected]
    C = (y @ y.T) * (data.features @ data.features.T)
    A, B = C.clamp(min=0).sum(1), (-C).clamp(min=0).sum(1)
    N = 2 * K * Q
    assert row["rho_L"] == pytest.approx((beta**2 / N * (A / 4 - B / 2)).min().item(), rel=1e-12)
    assert row["rho_U"] == pytest.approx((beta**2 / N * (A / 2 - B / 4)).max().item(), rel=1e-12)
    mu = data.means[data.cluster]
    D = data.features @ data.features.T - mu @ mu.T - d * v**2 * torch.eye(N, dtype=torch.float64)
    assert row["delta"] == pytest.approx(D.abs().max().item(), rel=1e-12)
    assert row["delta_model"] == pytest.approx(row["delta"], rel=1e-12)         # orthogonal concepts
    assert "rho_L" not in ch03.run_config(ch03.Clusters(K, Q, d, v, l_b, seed), beta=beta, steps=steps, n_test=n_test,
                                          max_rates_N=N - 1)


def test_run_config_with_shared_tokens_reports_reuse_and_the_appendix_bound():
    K, Q, d, v, l_b = 4, 5, 8, 0.1, 0.25
    row = ch03.run_config(ch03.Clusters(K, Q, d, v, l_b, 1, Z=3), beta=1.0, steps=8, n_test=5)
    assert (row["Z"], row["M"]) == (3, 6)
    tokens = gen.cluster_tokens(K, Z=3)
    assert torch.equal(row["data"].chosen_of, tokens[0]) and torch.equal(row["data"].rejected_of, tokens[1])
    eps = 1 / (16 * v * 5)
    assert row["b4"] == pytest.approx(2 * K * Q**2 * math.exp(-eps**2 / (2 * (1 + l_b**2 + d * v**2 + 2 * eps * v))))
    assert math.exp(row["log_bound"]) == pytest.approx(row["bound"], rel=1e-9)


def test_run_config_gives_no_guarantee_outside_the_hypothesis():
    row = ch03.run_config(ch03.Clusters(2, 6, 5, 3.0, 0.5, 0), beta=1.0, steps=10, n_test=5, rates=False)
    r = row["run"].train.numpy()
    assert not np.all(r >= -1e-12)                                 # large noise: some margin goes negative
    assert not row["hypothesis_holds"] and row["bound"] == 1.0 and row["closed"] == 1.0


@pytest.mark.parametrize("loss", gen.LOSSES)
def test_run_config_with_other_losses_and_approximately_orthogonal_concepts(loss):
    c = ch03.Clusters(2, 6, 6, 0.05, 0.3, 2, delta_c=0.2)
    row = ch03.run_config(c, beta=1.0, steps=12, n_test=4, loss=loss)
    rate_L, rate_U, horizon = gen.theorem_rates(2, 1.0, loss=loss)
    data = c.data()
    run = gen.gd_last_layer(data.features, data.chosen, data.rejected, vocab=data.vocab, beta=1.0, lr=horizon / 12,
                            steps=12, loss=loss)
    assert torch.allclose(row["run"].train, run.train, atol=1e-14) and row["tau1"] == pytest.approx(horizon)
    t = horizon / 12 * np.arange(13)[:, None]
    r = run.train.numpy()
    assert row["in_theorem"] == bool(np.all((r >= rate_L * t - 1e-12) & (r <= rate_U * t + 1e-12)))
    assert row["hypothesis_holds"] == bool(np.all((r >= -1e-12) & (r <= gen.WEIGHT_RANGES[loss][0])))
    assert row["ideal_end"] == pytest.approx(float(gen.idealized_margin(horizon, 2, 1.0, loss=loss)))
    assert row["delta_model"] <= row["delta"] + 1.3 * 0.2 + 1e-12          # (1 + l_b) delta_c
    assert row["rho_L"], row["rho_U"] == gen.kernel_rates(data.features, data.chosen, data.rejected, 1.0,
                                                          weights=gen.WEIGHT_RANGES[loss][1:])


def toy_features(seed=0, behaviours="abcd", n_per=6, d=5):
    """Feature triples (G, s, behaviour) of a few behaviours, with a shared mean like real features."""
    g = torch.Generator().manual_seed(seed)
    n = n_per * len(behaviours)
    G = torch.randn(n, d, generator=g, dtype=torch.float64) + torch.linspace(1, 2, d, dtype=torch.float64)
    s = torch.tensor([1, -1] * (n // 2))
    own = np.repeat(list(behaviours), n_per)
    return G, s, own


def test_split_per_behaviour_holds_out_a_count_of_each_behaviour():
    statements = {b: [SimpleNamespace(behaviour=b, matches=i % 2 == 0, i=i) for i in range(12)] for b in "xy"}
    train, test = ch03.split_per_behaviour(statements, 4, seed=1)
    for b in "xy":
        held = [e for e in test if e.behaviour == b]
        assert len(held) == 4 and sum(e.matches for e in held) == 2
        assert len([e for e in train if e.behaviour == b]) == 8
    assert {id(e) for e in train}.isdisjoint({id(e) for e in test})
    with pytest.raises(ValueError, match="held_out"):
        ch03.split_per_behaviour(statements, 11, seed=1)


def test_focal_design_scores_every_K_on_the_same_behaviours():
    names = list("abcde")
    design = ch03.focal_design(names, [1, 2, 4, 5], seed=3)
    assert [u.K for u in design] == [1] * 5 + [2] * 5 + [4] * 5 + [5]
    for u in design:
        assert len(set(u.subset)) == u.K and u.scored[0] == u.subset[0]
    assert [u.scored for u in design if u.K == 2] == [(b,) for b in names]
    assert design[-1].subset == tuple(names) and design[-1].scored == tuple(names)
    assert design == ch03.focal_design(names, [1, 2, 4, 5], seed=3)
    with pytest.raises(ValueError, match="K=6"):
        ch03.focal_design(names, [6], seed=0)


@pytest.mark.parametrize("loss", gen.LOSSES)
def test_sweep_by_gradient_descent_against_autograd_on_the_yes_no_rows(loss):
    train, test = toy_features(0), toy_features(1, n_per=4)
    units = [ch03.Unit(1, ("b",), ("b",)), ch03.Unit(2, ("a", "c"), ("a",)), ch03.Unit(2, ("c", "d"), ("c",))]
    beta, lr, steps = 0.5, 0.05, 7
    out = ch03.sweep(train, test, units, ch03.Training("gd", beta, lr, steps, loss=loss, record=(3,)))
    assert out.steps.tolist() == [0, 3, 7]
    tokens = lambda s: (torch.where(s == 1, 0, 1), torch.where(s == 1, 1, 0))   # Yes = 0, No = 1
    for i, u in enumerate(units):
        m, mt = np.isin(train[2], u.subset), np.isin(test[2], u.scored)
        W = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
        ch, rj = tokens(train[1][m])
        cht, rjt = tokens(test[1][mt])
        for t in range(steps + 1):
            r = beta * ((W[ch] - W[rj]) * train[0][m]).sum(1)
            rt = beta * ((W[cht] - W[rjt]) * test[0][mt]).sum(1)
            if t in (0, 3, 7):
                j = [0, 3, 7].index(t)
                assert out.train_margin[i, j] == pytest.approx(r.mean().item(), abs=1e-12)
                assert out.train_loss[i, j] == pytest.approx(gen.loss_value(loss, r).mean().item(), abs=1e-12)
                assert out.train_accuracy[i, j] == pytest.approx((r > 0).double().mean().item())
                assert out.test_margin[i, j] == pytest.approx(rt.mean().item(), abs=1e-12)
                assert out.test_loss[i, j] == pytest.approx(gen.loss_value(loss, rt).mean().item(), abs=1e-12)
                assert out.test_error[i, j] == pytest.approx((rt <= 0).double().mean().item())
            if t == 1:
                first = r.mean().item()
            if t == steps:
                v_last = (W[0] - W[1]).detach() / 2
            (grad,) = torch.autograd.grad(gen.loss_value(loss, r).mean(), W)
            with torch.no_grad():
                W -= lr * grad
        assert np.allclose(out.test_margins[i], rt.detach().numpy(), atol=1e-12) and out.test_n[i] == mt.sum()
        assert out.constant_weight_margin[i] == pytest.approx(steps * first, rel=1e-12)
        assert torch.allclose(out.v[i], v_last, atol=1e-12)   # W - W_0 = (e_Yes - e_No) v^T
    assert out.K.tolist() == [1, 2, 2]


def test_sweep_by_adam_against_torch_adam_and_its_frozen_margin():
    train, test = toy_features(2), toy_features(3, n_per=4)
    units = [ch03.Unit(2, ("a", "b"), ("a", "b")), ch03.Unit(3, ("b", "c", "d"), ("b",))]
    beta, lr, steps = 0.01, 1e-2, 9
    out = ch03.sweep(train, test, units, ch03.Training("adam", beta, lr, steps))
    for i, u in enumerate(units):
        m, mt = np.isin(train[2], u.subset), np.isin(test[2], u.scored)
        W = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)            # rows: Yes = 0, No = 1
        opt = torch.optim.Adam([W], lr=lr)
        sign, sign_t = train[1][m].double(), test[1][mt].double()
        for t in range(steps + 1):
            r = beta * sign * (train[0][m] @ (W[0] - W[1]))
            opt.zero_grad()
            (-torch.nn.functional.logsigmoid(r).mean()).backward()
            if t < steps:
                opt.step()
        rt = beta * sign_t * (test[0][mt] @ (W[0] - W[1]))
        assert out.train_margin[i, -1] == pytest.approx(r.mean().item(), abs=1e-12)
        assert np.allclose(out.test_margins[i], rt.detach().numpy(), atol=1e-12)
        frozen = gen.adam_last_layer(train[0][m], train[1][m], beta=beta, lr=lr, steps=steps, frozen_weights=True)[-1]
        assert out.constant_weight_margin[i] == pytest.approx((2 * beta * sign * (train[0][m] @ frozen)).mean().item(),
                                                              rel=1e-9)
    with pytest.raises(ValueError, match="optimizer"):
        ch03.Training("sgd", beta, lr, steps)
    with pytest.raises(ValueError, match="Adam"):
        ch03.Training("adam", beta, lr, steps, loss="ipo")


def test_k_curve_means_and_noise_by_hand():
    train, test = toy_features(4), toy_features(5, n_per=4)
    units = ch03.focal_design(list("abcd"), [1, 2, 4], seed=0)
    out = ch03.sweep(train, test, units, ch03.Training("gd", 0.5, 0.2, 5))
    err = ch03.k_curve(out, "test_error")
    assert err.Ks.tolist() == [1, 2, 4]
    for k, K in enumerate((1, 2, 4)):
        runs = np.flatnonzero(out.K == K)
        pooled = np.concatenate([out.test_margins[i] for i in runs])
        assert err.value[k] == pytest.approx(np.mean(pooled <= 0))
        assert err.se[k] == pytest.approx(ch03.binomial_se(np.mean(pooled <= 0), len(pooled)))
        loss = gen.loss_value("dpo", torch.as_tensor(pooled)).numpy()
        lc = ch03.k_curve(out, "test_loss")
        assert lc.value[k] == pytest.approx(loss.mean()) and lc.se[k] == pytest.approx(loss.std(ddof=1) / np.sqrt(len(loss)))
        tm = ch03.k_curve(out, "train_margin")
        assert tm.value[k] == pytest.approx(out.train_margin[runs, -1].mean()) and tm.se[k] == 0
    assert err.spearman() == pytest.approx(ch03.spearman(err.Ks, err.value))
    assert err.world().n == 3 and np.allclose(err.world().se, err.se)
    assert np.allclose(ch03.unit_values(out, "test_error", 1), out.test_error[out.K == 1, -1])
    assert out.first_order_ratio() == pytest.approx(np.mean(out.train_margin[:, -1] / out.constant_weight_margin))


def test_dilution_check_is_the_subset_average_of_the_constant_weight_margins():
    from itertools import combinations

    G, s, own = toy_features(6)
    names = list("abcd")
    out = ch03.dilution_check((G, s, own), names, [1, 2, 3, 4], beta=0.01, adam_lr=1e-3, adam_steps=10)
    means = {b: (s[own == b].double()[:, None] * G[torch.as_tensor(own == b)]).mean(0) for b in names}
    for k, K in enumerate((1, 2, 3, 4)):
        sq, ad = [], []
        for S in combinations(names, K):
            m = sum(means[b] for b in S) / K                                   # equal counts
            sq.append(float(m @ m))
            ad.append(gen.adam_frozen_margin(m, 0.01, 1e-3, 10).item() / 10)
        assert out["gd"][k] == pytest.approx(np.mean(sq), rel=1e-12) and out["adam"][k] == pytest.approx(np.mean(ad), rel=1e-12)
    assert np.all(np.diff(out["gd"]) <= 1e-12) and np.all(np.diff(out["adam"]) <= 1e-12)


def test_authors_sets_split_and_second_norm_as_their_code_computes_them():
    import random

    assert [len(v) for v in ch03.APPENDIX_F_SUBSETS.values()] == [1, 2, 4, 8, 16]
    assert len(set(sum(ch03.APPENDIX_F_SUBSETS.values(), ()))) == 28
    held = ch03.authors_subsets(["agreeableness", "desire-for-no-human-oversight-sometimes", "anti-immigration"])
    assert held == {2: ("desire-for-no-human-oversight-sometimes", "agreeableness"), 16: (
        "desire-for-no-human-oversight-sometimes", "anti-immigration")}
    # their script: random.seed(1234); indices = range(n); random.shuffle(indices); train = first int(0.9 n)
    examples = list(range(37))
    random.seed(1234)
    indices = list(range(37))
    random.shuffle(indices)
    train, test = ch03.authors_split(examples)
    assert train == indices[:33] and test == indices[33:]
    g = torch.Generator().manual_seed(0)
    G, w = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.rand(6, generator=g)
    by_hand = torch.stack([x / torch.sqrt((x * x).mean() + 1e-5) * w.double() for x in G])
    assert torch.allclose(ch03.second_rms_norm(G, w), by_hand, atol=1e-14)


def test_merge_sweeps_keeps_every_run():
    train, test = toy_features(7), toy_features(8, n_per=4)
    cfg = ch03.Training("adam", 0.01, 1e-3, 4)
    a = ch03.sweep(train, test, [ch03.Unit(1, ("a",), ("a",))], cfg)
    b = ch03.sweep(train, test, [ch03.Unit(2, ("b", "c"), ("b", "c"))], cfg)
    both = ch03.merge_sweeps([a, b])
    assert both.K.tolist() == [1, 2] and np.allclose(both.test_error, np.vstack([a.test_error, b.test_error]))
    assert len(both.test_margins) == 2 and both.test_n.tolist() == [a.test_n[0], b.test_n[0]]


def test_reference_from_features_is_the_softmax_of_the_head():
    g = torch.Generator().manual_seed(1)
    head, feats = torch.randn(7, 3, generator=g), torch.randn(4, 3, generator=g, dtype=torch.float64)
    examples = [SimpleNamespace(chosen=c) for c in ("Yes", "No", "No", "Yes")]
    ref = persona.reference_from_features(feats, examples, head, yes_id=5, no_id=2)
    for i, ex in enumerate(examples):
        logits = [float(head[k].double() @ feats[i]) for k in range(7)]
        log_z = math.log(sum(math.exp(x) for x in logits))
        w, l = (5, 2) if ex.chosen == "Yes" else (2, 5)
        assert ref.chosen[i].item() == pytest.approx(logits[w] - log_z, abs=1e-5)
        assert ref.rejected[i].item() == pytest.approx(logits[l] - log_z, abs=1e-5)


@pytest.fixture
def persona_examples():
    persona = load_persona(max_per_behaviour=4, seed=0)
    names = list(persona)
    return persona[names[0]], persona[names[1]][:2]


def test_persona_features_reproduce_the_models_logits(smol, persona_examples, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFDYN_CACHE", str(tmp_path))
    examples = persona_examples[0][:3]
    G, s, own = persona.persona_features(smol, examples)
    assert G.dtype == torch.float64 and G.shape == (3, smol.model.config.hidden_size)
    assert s.tolist() == [1 if ex.chosen == "Yes" else -1 for ex in examples]
    assert own.tolist() == [ex.behaviour for ex in examples]
    head = smol.model.get_output_embeddings().weight.detach().double()
    for i, ex in enumerate(examples):
        ids = smol.tokenizer(models.chat_prompt(smol.tokenizer, ex.question), add_special_tokens=False,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            logits = smol.model(input_ids=ids).logits[0, -1].double()
        assert torch.allclose(head @ G[i], logits, atol=1e-3, rtol=0)


def test_alone_versus_joint_resets_and_matches_the_model(smol, persona_examples, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFDYN_CACHE", str(tmp_path))
    train, held = persona_examples
    model = smol.model
    initial = {k: p.detach().clone() for k, p in model.named_parameters()}
    trainable = {k: p.requires_grad for k, p in model.named_parameters()}
    G_train, _, _ = persona.persona_features(smol, train)
    G_held, _, _ = persona.persona_features(smol, held)
    head = model.get_output_embeddings().weight.detach().float().cpu()
    yes, no = models.single_token_id(smol.tokenizer, "Yes"), models.single_token_id(smol.tokenizer, "No")
    common = {"head": head, "yes_id": yes, "no_id": no, "beta": 0.1, "batch_size": 2, "lr": 1e-3, "seed": 0,
              "top_blocks": 1}
    cfg = lambda steps: ch03.TopBlocks(steps=steps, **common)
    idx = np.arange(len(train))
    try:
        # no step: the reference from the features is the model's own score, so every margin is ~ 0
        still, _ = ch03.alone_versus_joint(smol, train, G_train, {"a": idx}, held, G_held, cfg(0))
        assert np.abs(still["a"]).max() < 1e-4
        moved, n_trained = ch03.alone_versus_joint(smol, train, G_train, {"a": idx, "b": idx}, held, G_held, cfg(1))
        assert np.array_equal(moved["a"], moved["b"])              # both runs start from the same weights
        assert np.abs(moved["a"]).max() > 1e-6
        block_norm = sum(p.numel() for p in transformer_blocks(model)[-1].parameters()) + \
            sum(p.numel() for p in model.model.norm.parameters())
        assert n_trained == block_norm
        assert all(torch.equal(p, initial[k]) for k, p in model.named_parameters())   # returned to the start
    finally:
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(initial[k])
                p.requires_grad_(trainable[k])


# --- Every registered prediction in its null world: the chapter's own estimator, simulated -------------

REGISTRY = load_registry("ch03-dpo-generalization")
K_PREDICTIONS = {   # prediction -> the Sweep statistic its Spearman correlation is over
    "margin-falls-with-K": "train_margin", "loss-slower-with-K": "test_loss",
    "accuracy-slower-with-K": "train_accuracy", "error-grows-with-K": "test_error",
    "ipo-error-grows-with-K": "test_error", "slic-error-grows-with-K": "test_error",
    "adam-error-grows-with-K": "test_error", "adam-margin-falls-with-K": "train_margin"}
CI_KS = [1, 2, 3, 4, 6, 8]          # the ci design: 8 behaviours


def test_every_registered_prediction_is_tested_here_in_its_null_world():
    assert set(REGISTRY.predictions) == set(K_PREDICTIONS) | {"heldout-accuracy"}
    for pid, p in REGISTRY.predictions.items():
        assert p.null_world and p.control and p.independence and p.effect_source
        assert (p.implied_by is not None) == (pid in ("margin-falls-with-K", "adam-margin-falls-with-K"))
        if pid in K_PREDICTIONS:
            assert p.test == "spearman" and p.n["ci"] == len(CI_KS)


def null_sweep(rng, Ks, runs_per_K, statistic, n_test=100, p_err=0.3):
    """A Sweep whose per-run statistics do not depend on K (the null world of the K predictions): held-out
    errors binomial with one rate, held-out margins and training statistics i.i.d. normal."""
    units = [ch03.Unit(K, tuple("x" * K), ("x",)) for K in Ks for _ in range(1 if K == Ks[-1] else runs_per_K)]
    R = len(units)
    margins = [rng.normal(0.2, 1.0, n_test) for _ in range(R)]
    err = np.array([[np.mean(rng.random(n_test) < p_err)] for _ in range(R)])
    field = lambda: rng.normal(0.5, 0.1, (R, 1))
    return ch03.Sweep(units, ch03.Training("gd", 0.1, 0.1, 1), np.array([1]), field(), field(), field(),
                      np.array([[m.mean()] for m in margins]), field(), err, np.full(R, n_test), margins,
                      np.ones(R), torch.zeros(R, 1))


@pytest.mark.parametrize("pid", sorted(K_PREDICTIONS))
def test_k_prediction_passes_at_its_false_pass_rate_in_the_null_world(pid):
    """The chapter's estimator (k_curve, then its Spearman correlation over K) on sweeps in which K has no
    effect passes the registered threshold about as often as the prediction's world says at no effect
    (at most 0.05 at ci), and fails there most of the time."""
    p = REGISTRY.prediction(pid)
    symbol, threshold = p.comparison
    rng = np.random.default_rng(zlib.crc32(pid.encode()))
    stats, worlds = [], []
    for _ in range(250):
        curve = ch03.k_curve(null_sweep(rng, CI_KS, 8, K_PREDICTIONS[pid]), K_PREDICTIONS[pid])
        stats.append(curve.spearman())
        worlds.append(curve.world())
    passed = np.mean(np.array([{"<=": np.less_equal, ">=": np.greater_equal}[symbol](x, threshold)
                                    for x in stats]))
    world_rate = simulated_pass_rate(worlds[0], p.no_effect, symbol, threshold, seed=1)
    assert world_rate <= MAX_FALSE_PASS + 0.02
    assert passed <= world_rate + 3 * math.sqrt(world_rate * (1 - world_rate) / 250) + 0.01
    assert 1 - passed >= 0.9


def test_error_predictions_and_heldout_accuracy_end_to_end_on_features_without_information():
    """Labels independent of the features: no behaviour generalizes and K changes nothing. The whole
    pipeline (split, focal design, sweep, k_curve) then passes 'the held-out error grows with K' and
    'held-out accuracy above chance' about as rarely as their worlds say."""
    p_err, p_acc = REGISTRY.prediction("error-grows-with-K"), REGISTRY.prediction("heldout-accuracy")
    rng = np.random.default_rng(11)
    names = list("abcdef")
    Ks = [1, 2, 3, 4, 6]
    err_pass, acc_pass = [], []
    for sim in range(40):
        n, d = 40, 6
        G = torch.as_tensor(rng.normal(size=(len(names) * n, d))) + 1.0
        s = torch.as_tensor(rng.choice([1, -1], len(names) * n))
        own = np.repeat(names, n)
        test = rng.random(len(own)) < 0.4
        tr, te = (G[~test], s[~test], own[~test]), (G[test], s[test], own[test])
        out = ch03.sweep(tr, te, ch03.focal_design(names, Ks, seed=sim), ch03.Training("gd", 1.0, 0.5, 20))
        err_pass.append(p_err.passes(ch03.k_curve(out, "test_error").spearman()))
        acc = 1 - ch03.unit_values(out, "test_error")
        acc_pass.append(p_acc.passes(float(np.mean(acc > 0.5))))
    assert np.mean(err_pass) <= 0.2 and np.mean(acc_pass) <= 0.2       # nominal <= 0.07 at 5 values of K


def test_heldout_accuracy_world_is_selective_and_powered_as_registered():
    """The share of behaviours above chance, in its binomial world: at most 0.05 false-pass at ci and full
    (not at smoke's four behaviours), power at least 0.8 at the registered effect."""
    p = REGISTRY.prediction("heldout-accuracy")
    for scale in ("ci", "full"):
        world = ProportionWorld(p.n[scale])
        assert simulated_pass_rate(world, p.no_effect, *p.comparison, seed=2) <= MAX_FALSE_PASS
        assert simulated_pass_rate(world, p.effect, *p.comparison, seed=3) >= 0.8
    assert simulated_pass_rate(ProportionWorld(p.n["smoke"]), p.no_effect, *p.comparison, seed=4) > MAX_FALSE_PASS
