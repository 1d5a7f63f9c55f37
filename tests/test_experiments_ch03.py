"""The drivers of chapter 3 (:mod:`prefdyn.experiments.ch03`), each against an independent computation:
plain autograd gradient descent on the head, explicit softmaxes and one-hot kernels, the closed forms
of the theorems, and (slow) the model's own logits and scores."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import norm

from prefdyn.datasets.persona import load_persona
from prefdyn.experiments import ch03, persona
from prefdyn.llm import models
from prefdyn.llm.models import transformer_blocks
from prefdyn.params import ParameterError
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


GOOD = dict(beta=0.1, lr_fraction=0.75, lr_full=5e-5, held_out=0.2, adam_beta=0.01, adam_lr=1e-3, adam_held_out=0.1)


def test_check_parameters_rejects_bad_values():
    ch03.check_parameters(**GOOD)
    for name, bad, match in (("beta", 0.0, "beta"), ("adam_beta", -1.0, "adam_beta"), ("adam_lr", 0, "adam_lr"),
                             ("held_out", 1.0, "held_out"), ("adam_held_out", 0.0, "adam_held_out"),
                             ("lr_fraction", 1.0, "below 1")):
        with pytest.raises(ValueError, match=match):
            ch03.check_parameters(**{**GOOD, name: bad})
    with pytest.raises(ParameterError, match="beta"):
        ch03.check_parameters(**{**GOOD, "beta": 0.0})


def test_run_config_against_autograd_and_closed_forms():
    K, Q, d, v, l_b, seed, beta, steps, n_test = 2, 6, 5, 0.2, 0.5, 3, 1.0, 10, 7
    row = ch03.run_config(K, Q, d, v, l_b, seed, beta=beta, steps=steps, n_test=n_test)
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
    assert "rho_L" not in ch03.run_config(K, Q, d, v, l_b, seed, beta=beta, steps=steps, n_test=n_test, max_rates_N=N - 1)


def test_run_config_with_shared_tokens_reports_reuse_and_the_appendix_bound():
    K, Q, d, v, l_b = 4, 5, 8, 0.1, 0.25
    row = ch03.run_config(K, Q, d, v, l_b, 1, beta=1.0, steps=8, n_test=5, Z=3)
    assert (row["Z"], row["M"]) == (3, 6)
    tokens = gen.cluster_tokens(K, Z=3)
    assert torch.equal(row["data"].chosen_of, tokens[0]) and torch.equal(row["data"].rejected_of, tokens[1])
    eps = 1 / (16 * v * 5)
    assert row["b4"] == pytest.approx(2 * K * Q**2 * math.exp(-eps**2 / (2 * (1 + l_b**2 + d * v**2 + 2 * eps * v))))
    assert math.exp(row["log_bound"]) == pytest.approx(row["bound"], rel=1e-9)


def test_run_config_gives_no_guarantee_outside_the_hypothesis():
    row = ch03.run_config(2, 6, 5, 3.0, 0.5, 0, beta=1.0, steps=10, n_test=5, rates=False)
    r = row["run"].train.numpy()
    assert not np.all(r >= -1e-12)                                 # large noise: some margin goes negative
    assert not row["hypothesis_holds"] and row["bound"] == 1.0 and row["closed"] == 1.0


def test_last_layer_run_against_autograd_on_the_yes_no_rows():
    g = torch.Generator().manual_seed(0)
    G_tr, G_te = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    s_tr, s_te = torch.tensor([1, -1] * 6), torch.tensor([1, -1, -1] * 3)
    own_tr, own_te = np.array(list("abc") * 4), np.array(list("abc") * 3)
    u_ref = torch.randn(4, generator=g, dtype=torch.float64)
    beta, lr, steps, subset = 0.5, 0.3, 6, ["a", "c"]
    out = ch03.last_layer_run((G_tr, s_tr, own_tr), (G_te, s_te, own_te), subset, u_ref=u_ref, beta=beta, lr=lr, steps=steps)
    m_tr, m_te = np.isin(own_tr, subset), np.isin(own_te, subset)
    tokens = lambda s: (torch.where(s == 1, 0, 1), torch.where(s == 1, 1, 0))   # Yes = 0, No = 1
    margins, _ = head_gradient_descent(G_tr[m_tr], *tokens(s_tr[m_tr]), 2, beta, lr, steps)
    assert out.K == 2 and out.subset == subset
    assert np.array_equal(out.train_mask, m_tr) and np.array_equal(out.test_mask, m_te)
    assert torch.allclose(out.train_margins, margins, atol=1e-12, rtol=0)
    # held-out: replay the same steps on W and read the unseen margins and the policy's own log-odds
    W = torch.zeros(2, 4, dtype=torch.float64)
    chosen, rejected = tokens(s_tr[m_tr])
    te_chosen, te_rejected = tokens(s_te[m_te])
    for t in range(steps + 1):
        r_te = beta * ((W[te_chosen] - W[te_rejected]) * G_te[m_te]).sum(1)
        assert torch.allclose(out.test_margins[t], r_te, atol=1e-12, rtol=0)
        logodds = G_te[m_te] @ u_ref + G_te[m_te] @ (W[0] - W[1])
        assert torch.equal(out.policy_correct[t], s_te[m_te].double() * logodds > 0)
        r = beta * ((W[chosen] - W[rejected]) * G_tr[m_tr]).sum(1)
        weight = torch.sigmoid(-r)[:, None] * G_tr[m_tr] * (lr * beta / len(r))
        W = W.index_add(0, chosen, weight).index_add(0, rejected, -weight)


def test_last_layer_run_with_adam_against_torch_adam_on_the_yes_no_rows():
    g = torch.Generator().manual_seed(6)
    G_tr, G_te = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    s_tr, s_te = torch.tensor([1, -1, -1] * 4), torch.tensor([1, -1] * 3)
    own_tr, own_te = np.array(list("ab") * 6), np.array(list("ab") * 3)
    u_ref = torch.randn(4, generator=g, dtype=torch.float64)
    beta, lr, steps = 0.01, 1e-2, 7
    out = ch03.last_layer_run((G_tr, s_tr, own_tr), (G_te, s_te, own_te), ["b"], u_ref=u_ref, beta=beta, lr=lr,
                              steps=steps, optimizer="adam")
    m_tr, m_te = own_tr == "b", own_te == "b"
    W = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)       # rows: Yes = 0, No = 1
    opt = torch.optim.Adam([W], lr=lr)
    sign_tr, sign_te = s_tr[m_tr].double(), s_te[m_te].double()
    for t in range(steps + 1):
        r = beta * sign_tr * (G_tr[m_tr] @ (W[0] - W[1]))
        assert torch.allclose(out.train_margins[t], r.detach(), atol=1e-12, rtol=0)
        r_te = beta * sign_te * (G_te[m_te] @ (W[0] - W[1]))
        assert torch.allclose(out.test_margins[t], r_te.detach(), atol=1e-12, rtol=0)
        opt.zero_grad()
        (-torch.nn.functional.logsigmoid(r).mean()).backward()
        opt.step()
    assert ch03.final_train_margin(out) == pytest.approx(out.train_margins[-1].mean().item())
    assert ch03.held_out_error(out) == pytest.approx(float(np.mean(out.test_margins[-1].numpy() <= 0)))
    with pytest.raises(ValueError, match="optimizer"):
        ch03.last_layer_run((G_tr, s_tr, own_tr), (G_te, s_te, own_te), ["b"], u_ref=u_ref, beta=beta, lr=lr,
                            steps=1, optimizer="sgd")


def test_split_features_regroups_rows_by_example():
    examples = [SimpleNamespace(q=i) for i in range(5)]
    G = torch.arange(10.0).reshape(5, 2)
    s = torch.tensor([1, -1, 1, -1, 1])
    own = np.array(list("aabbc"))
    (G1, s1, o1), (G2, s2, o2) = ch03.split_features(examples, (G, s, own), ([examples[3], examples[0]], [examples[4]]))
    assert torch.equal(G1, G[[3, 0]]) and torch.equal(s1, s[[3, 0]]) and o1.tolist() == ["b", "a"]
    assert torch.equal(G2, G[[4]]) and o2.tolist() == ["c"]
    with pytest.raises(ValueError, match="not among"):
        ch03.split_features(examples, (G, s, own), ([SimpleNamespace(q=0)],))


def test_subset_sweep_by_K_and_error_trend_against_scipy():
    from scipy.stats import linregress

    names = list("abcdef")
    fake = lambda subset: SimpleNamespace(K=len(subset), subset=subset,
                                          train_margins=torch.full((2, 3), float(len(subset))),
                                          test_margins=torch.tensor([[0.0] * 6, [1.0] * (6 - len(subset)) + [-1.0] * len(subset)]))
    runs = ch03.subset_sweep(fake, names, [1, 3, 6], 4, seed=5)
    assert [r.K for r in runs] == [1] * 4 + [3] * 4 + [6]
    assert all(len(set(r.subset)) == r.K and r.subset == sorted(r.subset) for r in runs)
    assert [r.subset for r in runs] == [r.subset for r in ch03.subset_sweep(fake, names, [1, 3, 6], 4, seed=5)]
    assert np.allclose(ch03.by_K(runs, [1, 3, 6], ch03.final_train_margin), [1, 3, 6])
    err = ch03.by_K(runs, [1, 3, 6], ch03.held_out_error)
    assert np.allclose(err, [1 / 6, 3 / 6, 1.0])
    trend = ch03.error_trend(runs, [1, 3, 6], n_boot=20, seed=0)
    fit = linregress([1, 3, 6], err)
    assert trend["slope"] == pytest.approx(fit.slope) and trend["intercept"] == pytest.approx(fit.intercept)
    assert trend["r2"] == pytest.approx(fit.rvalue**2) and np.allclose(trend["error"], err)
    lo, hi = trend["slope_interval"]
    assert lo < hi and lo <= trend["slope"] <= hi      # seeded resamples of the held-out statements


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
    idx = np.arange(len(train))
    try:
        # no step: the reference from the features is the model's own score, so every margin is ~ 0
        still, _ = ch03.alone_versus_joint(smol, train, G_train, {"a": idx}, held, G_held, steps=0, **common)
        assert np.abs(still["a"]).max() < 1e-4
        moved, n_trained = ch03.alone_versus_joint(smol, train, G_train, {"a": idx, "b": idx}, held, G_held, steps=1,
                                                   **common)
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
