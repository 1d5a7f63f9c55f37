"""The drivers of chapter 2 (:mod:`prefdyn.experiments.ch02`) against independent computations."""
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from prefdyn.datasets.persona import load_persona
from prefdyn.experiments import ch02, persona
from prefdyn.llm.logps import preference_logps
from prefdyn.llm.models import single_token_id
from prefdyn.params import ALL_THREADS, torch_threads
from prefdyn.theory import dynamics as dyn


def tiny_behaviours():
    """Six behaviours in 8 dimensions, three of 2 x 4 prompts and three of 2 x 7, with a shared mean
    as on real features; their distinguishabilities are close, so every resample ranks them differently."""
    small = dyn.synthetic_behaviours([1.0, 1.4, 1.8], n_per_class=4, d=8, common=2.0, seed=4)
    large = dyn.synthetic_behaviours([1.2, 1.6, 2.0], n_per_class=7, d=8, common=2.0, seed=5,
                                     directions=torch.eye(8, dtype=torch.float64)[3:6])
    return (torch.cat([small[0], large[0]]), torch.cat([small[1], large[1]]),
            np.array([f"b{i}" for i in small[2]] + [f"b{i + 3}" for i in large[2]]))


def gd_losses(g, s, beta, lr, steps):
    """Mean DPO loss after plain full-batch gradient descent on ``v`` (NumPy, the chapter's rank-one recursion)."""
    v = np.zeros(g.shape[1])
    for _ in range(steps):
        h = 2 * beta * s * (g @ v)
        v = v + lr * beta * ((s / (1 + np.exp(h)))[:, None] * g).mean(0)
    return np.mean(np.log1p(np.exp(-2 * beta * s * (g @ v))))


@pytest.mark.parametrize("steps", [3, 15])   # ranks of early loss drops barely depend on lr; later ones do
def test_bootstrap_rank_correlations_equals_retraining_every_resample(steps):
    g, s, behaviour = tiny_behaviours()
    beta, lr, n_boot = 0.5, 0.05, 10
    rng = np.random.default_rng(3)
    ci = ch02.bootstrap_rank_correlations(g, s, behaviour, rng, beta=beta, lr=lr, steps=steps, n_boot=n_boot)
    # by hand: draw the same stratified resamples, train each resample (its rows repeated) from scratch
    check_rng, names = np.random.default_rng(3), [f"b{i}" for i in range(6)]
    boot = {"alone": [], "joint": [], "joint_D": []}
    for _ in range(n_boot):
        idx = dyn.stratified_resample(s, behaviour, check_rng)
        gr, sr, br = g[idx].numpy(), s[idx].numpy().astype(float), behaviour[idx]
        gaps = [gr[(br == b) & (sr == 1)].mean(0) - gr[(br == b) & (sr == -1)].mean(0) for b in names]
        gap_bar = sum(np.mean(br == b) * d for b, d in zip(names, gaps))
        alone = [math.log(2) - gd_losses(gr[br == b], sr[br == b], beta, lr, steps) for b in names]
        joint_v = np.zeros(g.shape[1])
        for _ in range(steps):
            joint_v = joint_v + lr * beta * ((sr / (1 + np.exp(2 * beta * sr * (gr @ joint_v))))[:, None] * gr).mean(0)
        joint = [math.log(2) - np.mean(np.log1p(np.exp(-2 * beta * sr[br == b] * (gr[br == b] @ joint_v))))
                 for b in names]
        boot["alone"].append(spearmanr([np.linalg.norm(d) for d in gaps], alone).statistic)
        boot["joint"].append(spearmanr([gap_bar @ d for d in gaps], joint).statistic)
        boot["joint_D"].append(spearmanr([np.linalg.norm(d) for d in gaps], joint).statistic)
    assert set(ci) == set(boot)
    for key, values in boot.items():
        np.testing.assert_allclose(ci[key], np.quantile(values, [0.025, 0.975]), atol=1e-9, err_msg=key)
    assert rng.random() == check_rng.random()   # the caller's generator advanced by exactly the resamples drawn


def test_bootstrap_rank_correlations_trains_on_every_thread(monkeypatch):
    seen = []
    real = dyn.resampled_losses_after
    monkeypatch.setattr(dyn, "resampled_losses_after",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    g, s, behaviour = tiny_behaviours()
    with torch_threads(1):
        ch02.bootstrap_rank_correlations(g, s, behaviour, np.random.default_rng(0), beta=0.5, lr=0.05, steps=2,
                                         n_boot=3)
        assert torch.get_num_threads() == 1
    assert seen == [ALL_THREADS, ALL_THREADS]


@pytest.mark.slow
def test_full_model_dpo_trains_lora_merges_it_and_reads_the_features(smol, monkeypatch, tmp_path):
    monkeypatch.setenv("PREFDYN_CACHE", str(tmp_path))
    policy = dataclasses.replace(smol, model=copy.deepcopy(smol.model))   # the session's model stays untouched
    before = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
    statements = load_persona(None, None, max_per_behaviour=2, seed=0)
    examples = [ex for b in list(statements)[:3] for ex in statements[b]]
    threads = {}
    for module, name in ((persona, "embeddings"), (ch02, "embeddings"), (ch02, "train_preferences")):
        real = getattr(module, name)     # persona_features reads the features before training
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k:
                            threads.setdefault(_name, []).append(torch.get_num_threads()) or _real(*a, **k))
    with torch_threads(1):
        run = ch02.full_model_dpo(policy, examples, beta=0.1, lora_r=8, lora_alpha=32, steps=1, batch_size=4,
                                  lr=1e-3, seed=0)
    assert threads == {"embeddings": [ALL_THREADS, ALL_THREADS], "train_preferences": [ALL_THREADS]}
    # the reference from the features is the model's own: the first DPO batch loss is log 2
    assert run.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # merged: a plain model again, in which exactly the query and value projections moved
    assert type(policy.model) is type(smol.model) and not any("lora" in k for k in policy.model.state_dict())
    moved = {k for k, v in policy.model.state_dict().items() if not torch.equal(v, before[k])}
    blocks = len(smol.model.model.layers)
    assert moved == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(blocks) for m in ("q_proj", "v_proj")}
    attention = smol.model.model.layers[0].self_attn
    assert run.n_trained == blocks * 8 * sum(m.in_features + m.out_features for m in (attention.q_proj, attention.v_proj))
    assert not torch.allclose(run.features_before, run.features_after)
    # the aligned policy's Yes/No log-odds are u^T W_ref g'(x) on the features read after training
    yes, no = (single_token_id(policy.tokenizer, a) for a in ("Yes", "No"))
    head = policy.model.get_output_embeddings().weight.detach()      # not adapted: W_ref
    u = (head[yes] - head[no]).double()
    pairs = ch02.persona_pairs(policy.tokenizer, examples)
    chosen, rejected = preference_logps(policy, pairs.prompts, pairs.chosen, pairs.rejected)
    np.testing.assert_allclose((chosen - rejected).double(), run.s * (run.features_after @ u), atol=1e-3)
    assert run.s.tolist() == [1 if ex.chosen == "Yes" else -1 for ex in examples]
    assert run.behaviour.tolist() == [ex.behaviour for ex in examples]


@pytest.mark.slow
def test_lora_misalignment_against_the_same_runs_scored_by_full_forward_passes(smol, monkeypatch, tmp_path):
    """The driver reads every log-probability from the features and the head; the same three LoRA runs,
    scored by full forward passes of prompt and answer (preference_logps) with the model's own
    references, give the same flipped-loss drops; and the model comes back with its own weights."""
    from prefdyn.llm.train import PreferencePairs, ReferenceLogps, evaluate_preferences

    monkeypatch.setenv("PREFDYN_CACHE", str(tmp_path))
    policy = dataclasses.replace(smol, model=copy.deepcopy(smol.model))
    before = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
    statements = load_persona(None, None, max_per_behaviour=8, seed=0)
    examples = statements[next(iter(statements))]
    settings = dict(beta=0.1, lora_r=8, lora_alpha=32, steps=3, batch_size=4, lr=2e-3, seed=0)
    drop = ch02.lora_misalignment(policy, examples, **settings)
    assert all(torch.equal(v, before[k]) for k, v in policy.model.state_dict().items())
    pairs = ch02.persona_pairs(smol.tokenizer, examples)
    flipped = PreferencePairs(pairs.prompts, pairs.rejected, pairs.chosen)
    expected = {}
    for label in ("base", "aligned"):
        fresh = dataclasses.replace(smol, model=copy.deepcopy(smol.model))
        if label == "aligned":
            ch02.lora_dpo(fresh, pairs, **settings)                      # its reference: the model at the start
        reference = ReferenceLogps.of(fresh, flipped)
        ch02.lora_dpo(fresh, flipped, reference=reference, **settings)
        expected[label] = math.log(2) - evaluate_preferences(fresh, flipped, reference, settings["beta"])["dpo_loss"]
    assert drop == pytest.approx(expected, abs=2e-4)
    assert drop["base"] > 1e-3 and drop["aligned"] > 1e-3                 # the flipped runs lower the flipped loss


TINY = {"llama": dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2),
        "gemma3_text": dict(model_type="gemma3_text", vocab_size=32, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4)}


@pytest.mark.parametrize("family", sorted(TINY))
def test_lora_adapters_target_query_and_value_start_at_the_model_and_merge_to_w_plus_scaled_ba(family):
    """Random tiny Llama and Gemma 3 models (the families of the packaged models): adapters on every
    block's q_proj and v_proj only, the adapted model equal to the model at the start, and after
    training and merging every adapted weight equal to W + (alpha/r) B A."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from prefdyn.llm.train import lora_adapters

    cfg = dict(TINY[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    ids = torch.randint(0, 32, (2, 5))
    base_logits = model(input_ids=ids).logits.detach()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    adapted = lora_adapters(model, r=2, alpha=6, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)          # the caller's generator is left alone
    qv = {n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("q_proj", "v_proj")} & {
        n.removeprefix("base_model.model.") for n, _ in adapted.named_modules()}
    assert sorted(adapted.targeted_module_names) == sorted(n.removeprefix("base_model.model.") for n in qv) != []
    assert all(p.requires_grad == ("lora_" in n) for n, p in adapted.named_parameters())
    torch.testing.assert_close(adapted(input_ids=ids).logits, base_logits)
    with torch.no_grad():                                             # a "trained" B, as a step would leave it
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_()
    expected = {}
    for name in adapted.targeted_module_names:
        layer = adapted.get_submodule(f"base_model.model.{name}")
        BA = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        expected[f"{name}.weight"] = before[f"{name}.weight"] + 3.0 * BA.detach()
    merged = adapted.merge_and_unload()
    assert merged is model
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected.get(k, before[k]), msg=k)
    with pytest.raises(ValueError, match="positive integer rank"):
        lora_adapters(model, r=0, alpha=32, seed=0)
    with pytest.raises(ValueError, match="positive alpha"):
        lora_adapters(model, r=8, alpha=-1.0, seed=0)


def test_flipped_dpo_is_blind_to_the_features_scale_and_a_common_step_is_not():
    """g -> c g at each model's own step lr_fraction·2/L leaves the flipped-loss trajectory of every
    behaviour unchanged (L -> c^2 L, v_t -> v_t / c); at one common step it does not."""
    g, s, behaviour = tiny_behaviours()
    beta, steps, c = 0.5, 12, 3.0
    base = ch02.flipped_dpo(g, s, behaviour, beta=beta, lr_fraction=0.75, steps=steps)
    scaled = ch02.flipped_dpo(c * g, s, behaviour, beta=beta, lr_fraction=0.75, steps=steps)
    assert base.behaviours == scaled.behaviours == list(dict.fromkeys(behaviour.tolist()))
    assert base.loss.shape == (steps + 1, 6)
    np.testing.assert_allclose(base.loss[0], math.log(2), atol=1e-12)     # each model its own reference
    assert scaled.lr == pytest.approx(base.lr / c**2, rel=1e-10)
    np.testing.assert_allclose(scaled.loss, base.loss, rtol=1e-10, atol=1e-12)
    assert (base.drop > 0).all()                                          # below 4/L the flipped loss falls
    # every behaviour alone, toward -s, by the NumPy recursion of the chapter
    for k, b in enumerate(base.behaviours):
        gb, sb = g[behaviour == b].numpy(), -s[behaviour == b].numpy().astype(float)
        assert base.loss[-1, k] == pytest.approx(gd_losses(gb, sb, beta, base.lr, steps), abs=1e-12)
    # one common step (the base model's): the trajectory on c·g is another one, and with features only
    # a little larger (still below 4/L) every behaviour misaligns faster, although only the scale changed
    def common(c):
        return np.stack([dyn.last_layer_dpo(c * g[behaviour == b], -s[behaviour == b], beta=beta, lr=base.lr,
                                            steps=steps).loss[:, 0] for b in base.behaviours], axis=1)
    assert np.abs(common(c) - base.loss).max() > 0.1
    assert (common(1.2)[-1] < base.loss[-1] - 1e-3).all()
    # the common step given to flipped_dpo itself is the same run as the recursion at that step
    np.testing.assert_allclose(ch02.flipped_dpo(c * g, s, behaviour, beta=beta, lr=base.lr, steps=steps).loss,
                               common(c), rtol=1e-12, atol=1e-14)
    for both_or_neither in (dict(), dict(lr=base.lr, lr_fraction=0.75)):
        with pytest.raises(ValueError, match="either lr_fraction"):
            ch02.flipped_dpo(g, s, behaviour, beta=beta, steps=steps, **both_or_neither)


def test_normalised_distinguishability_is_the_gap_over_the_rms_spread_and_blind_to_scale():
    g, s, behaviour = tiny_behaviours()
    spread = np.sqrt(((g - g.mean(0)) ** 2).sum(1).mean().item())
    expected = [dyn.distinguishability(g[behaviour == b], s[behaviour == b]) / spread
                for b in dict.fromkeys(behaviour.tolist())]
    np.testing.assert_allclose(ch02.normalised_distinguishability(g, s, behaviour), expected, rtol=1e-12)
    np.testing.assert_allclose(ch02.normalised_distinguishability(7.5 * g, s, behaviour), expected, rtol=1e-12)


def test_pairwise_priority_against_the_closed_form_level_and_the_numpy_recursion():
    """Every pair trained jointly by the NumPy recursion (full batch: the book protocol); the level
    from its closed form (||Da||^2 - ||Db||^2) / (||Da + Db|| max(||Da||, ||Db||))."""
    g, s, behaviour = tiny_behaviours()
    delta = {b: dyn.preference_gap(g[behaviour == b], s[behaviour == b]) for b in dict.fromkeys(behaviour)}
    beta, lr, steps = 0.5, 0.3, 6
    pp = ch02.pairwise_priority(ch02.protocol("book"), g, s, behaviour, delta, beta=beta, lr=lr, steps=steps, seed=0)
    assert len(pp.pairs) == 15
    for (a, b), level, gap in zip(pp.pairs, pp.level, pp.loss_gap):
        da, db = delta[a], delta[b]
        closed = (da.norm() ** 2 - db.norm() ** 2) / ((da + db).norm() * max(da.norm(), db.norm()))
        assert level == pytest.approx(closed.item(), rel=1e-10)
        both = np.isin(behaviour, [a, b])
        gn, sn = g[both].numpy(), s[both].numpy().astype(float)
        v = np.zeros(gn.shape[1])
        for _ in range(steps):
            v = v + lr * beta * ((sn / (1 + np.exp(2 * beta * sn * (gn @ v))))[:, None] * gn).mean(0)
        loss = {k: np.mean(np.log1p(np.exp(-2 * beta * sn * (gn @ v)))[behaviour[both] == k]) for k in (a, b)}
        assert gap == pytest.approx(loss[b] - loss[a], abs=1e-12)
    assert pp.agreement() == np.mean(np.sign(pp.level) == np.sign(pp.loss_gap))
    keep = np.abs(pp.level) >= 0.1
    assert pp.agreement(0.1) == np.mean(np.sign(pp.level[keep]) == np.sign(pp.loss_gap[keep]))


def test_protocols_and_their_settings():
    g, s, behaviour = tiny_behaviours()
    book, paper = ch02.protocol("book"), ch02.protocol("paper")
    beta, lr, steps, L = book.settings(0.3, 40, 0.75, g, behaviour)
    assert (beta, steps) == (0.3, 40) and L == dyn.smoothness(g, 0.3, behaviour) and lr == pytest.approx(1.5 / L)
    assert paper.settings(0.3, 40, 0.75, g, behaviour)[:3] == (0.01, 0.1, 100)
    assert not paper.chat_template and paper.fresh_batches and paper.batch_size == 128 and paper.split_seed == 1234
    run = paper.train(g, s, beta=0.01, lr=0.1, steps=3, seed=2)   # fewer statements than a batch: full batch
    assert torch.allclose(run.v, dyn.last_layer_dpo(g, s, beta=0.01, lr=0.1, steps=3).v)
    with pytest.raises(ValueError, match="'book'.*'paper'"):
        ch02.protocol("authors")


@pytest.mark.slow
def test_second_final_norm_is_the_authors_rms_norm_again(smol):
    """The authors' ``embedding * rsqrt(mean(embedding^2) + eps) * norm_weights`` on SmolLM2's features."""
    examples = [ex for group in load_persona(max_per_behaviour=2, seed=0).values() for ex in group][:6]
    G, _, _ = persona.persona_features(smol, examples, chat_template=False)
    weight = smol.model.get_decoder().norm.weight.detach().double()
    eps = smol.model.config.rms_norm_eps
    manual = G * torch.rsqrt(G.pow(2).mean(-1, keepdim=True) + eps) * weight
    assert torch.allclose(ch02.second_final_norm(smol, G), manual, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ch02.second_final_norm(smol, G), G, rtol=1e-3)


@pytest.mark.slow   # umap-learn compiles its kernels (numba) on first use
def test_umap_coordinates_keep_separated_clusters_apart_and_are_reproducible():
    gen = torch.Generator().manual_seed(3)
    centres = torch.zeros(2, 40, dtype=torch.float64)
    centres[1, 0] = 12.0
    labels = np.repeat([0, 1], 30)
    features = centres[labels] + torch.randn(60, 40, generator=gen, dtype=torch.float64)
    xy = ch02.umap_coordinates(features, seed=0)
    assert xy.shape == (60, 2)
    means = np.stack([xy[labels == k].mean(0) for k in (0, 1)])
    nearest = np.argmin(((xy[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).all()                       # every point nearer its own cluster's centre
    np.testing.assert_array_equal(ch02.umap_coordinates(features, seed=0), xy)
    with pytest.raises(ValueError, match="at least 4 statements"):
        ch02.umap_coordinates(features[:3], seed=0)
