"""The drivers of chapter 2 (:mod:`prefdyn.experiments.ch02`) against independent computations."""
import copy
import dataclasses
import math

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import spearmanr

from prefdyn import stats
from prefdyn.book.registry import parse_registry
from prefdyn.book.verify import Check
from prefdyn.datasets.persona import PersonaExample, load_persona
from prefdyn.experiments import ch02, persona
from prefdyn.llm.logps import preference_logps
from prefdyn.llm.models import single_token_id
from prefdyn.params import ALL_THREADS, ParameterError, torch_threads
from prefdyn.theory import dynamics as dyn

REGISTRY = parse_registry("ch02-dpo-dynamics", yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "chapters" / "claims" / "ch02-dpo-dynamics.yml").read_text()), "ch02")


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
    for module, name in ((ch02, "embeddings"), (ch02, "train_preferences")):
        real = getattr(module, name)     # answer_logps reads the features before and after training
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k:
                            threads.setdefault(_name, []).append(torch.get_num_threads()) or _real(*a, **k))
    with torch_threads(1):
        run = ch02.full_model_dpo(policy, ch02.protocol("book"), examples, beta=0.1, lora_r=8, lora_alpha=32,
                                  steps=1, batch_size=4, lr=1e-3, seed=0)
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
    pairs = ch02.preference_pairs(ch02.protocol("book"), policy.tokenizer, examples)
    chosen, rejected = preference_logps(policy, pairs.prompts, pairs.chosen, pairs.rejected)
    np.testing.assert_allclose((chosen - rejected).double(), run.s * (run.features_after @ u), atol=1e-3)
    assert run.s.tolist() == [1 if ex.chosen == "Yes" else -1 for ex in examples]
    assert run.behaviour.tolist() == [ex.behaviour for ex in examples]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["book", "authors"])
def test_misalign_behaviour_against_the_same_runs_scored_by_full_forward_passes(smol, monkeypatch, tmp_path, name):
    """The driver reads every log-probability from the features and the head; the same three LoRA runs,
    scored by full forward passes of prompt and answer (preference_logps) with the model's own
    references, give the same flipped-loss drops and alignment log-probabilities; the model comes back
    with its own weights. Under the book the aligned and flipped statements are disjoint, under the
    authors they are the same."""
    from prefdyn.llm.train import PreferencePairs, ReferenceLogps, evaluate_preferences

    monkeypatch.setenv("PREFDYN_CACHE", str(tmp_path))
    P = ch02.protocol(name)
    policy = dataclasses.replace(smol, model=copy.deepcopy(smol.model))
    before = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
    statements = load_persona(None, None, max_per_behaviour=16, seed=0)
    examples = statements[next(iter(statements))]
    sets = ch02.misalignment_sets(P, examples[:12], examples[12:], 4, seed=0)
    assert (set(map(id, sets["align"])) & set(map(id, sets["flip"]))) == (set() if name == "book" else
                                                                          set(map(id, sets["align"])))
    settings = dict(beta=0.1, lora_r=8, lora_alpha=32, steps=3, batch_size=4, lr=2e-3, seed=0)
    run = ch02.misalign_behaviour(policy, P, sets, **settings)
    assert all(torch.equal(v, before[k]) for k, v in policy.model.state_dict().items())
    pairs = ch02.preference_pairs(P, smol.tokenizer, sets["flip"])
    flipped = PreferencePairs(pairs.prompts, pairs.rejected, pairs.chosen)
    align_pairs = ch02.preference_pairs(P, smol.tokenizer, sets["align"])
    expected = {}
    for label in ("base", "aligned"):
        fresh = dataclasses.replace(smol, model=copy.deepcopy(smol.model))
        if label == "aligned":
            ch02.lora_dpo(fresh, align_pairs, **settings)                 # its reference: the model at the start
            after = ReferenceLogps.of(fresh, align_pairs)
            torch.testing.assert_close(run.logps[("aligned", "align")].chosen, after.chosen.float(), atol=2e-4,
                                       rtol=0)
        reference = ReferenceLogps.of(fresh, flipped)
        ch02.lora_dpo(fresh, flipped, reference=reference, **settings)
        expected[label] = math.log(2) - evaluate_preferences(fresh, flipped, reference, settings["beta"])["dpo_loss"]
    assert run.flipped_drop == pytest.approx(expected, abs=2e-4)
    assert run.flipped_drop["base"] > 1e-3 and run.flipped_drop["aligned"] > 1e-3
    assert set(run.features) == {(m, k) for m in ("base", "aligned") for k in ("align", "flip", "held")}
    assert "train_chosen_shift" in run.history[0]


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
        # the first-order drops of the pair's first joint step: half its step-1 margin gains
        gains = dyn.joint_first_step_gains(g[both], s[both], behaviour[both].tolist(), beta, lr)
        np.testing.assert_allclose(pp.first_order[pp.pairs.index((a, b))], [gains[a] / 2, gains[b] / 2], rtol=1e-10)
    assert pp.agreement() == np.mean(np.sign(pp.level) == np.sign(pp.loss_gap))
    keep = np.abs(pp.level) >= 0.1
    assert pp.agreement(0.1) == np.mean(np.sign(pp.level[keep]) == np.sign(pp.loss_gap[keep]))
    # the least agreement the step-1 gains allow is never above the agreement itself; for equal, balanced
    # behaviours after one small step (first-order ratios all near 1) nothing else was possible
    assert pp.forced_agreement(steps, 0.1) <= pp.agreement(0.1)
    equal = np.isin(behaviour, ["b3", "b4", "b5"])
    tiny = ch02.pairwise_priority(ch02.protocol("book"), g[equal], s[equal], behaviour[equal],
                                  {b: delta[b] for b in ("b3", "b4", "b5")}, beta=beta, lr=1e-3, steps=1, seed=0)
    assert tiny.forced_agreement(1, 0.1) == tiny.agreement(0.1) == 1.0
    names = list(delta)
    assert [(names[i], names[j]) for i, j in pp.index_pairs(names, 0.1)] == [q for q, k in zip(pp.pairs, keep) if k]


def test_protocols_and_their_settings():
    g, s, behaviour = tiny_behaviours()
    book, authors = ch02.protocol("book"), ch02.protocol("authors")
    beta, lr, steps, L = book.settings(0.3, 40, 0.375, g, behaviour)
    assert (beta, steps) == (0.3, 40) and L == dyn.smoothness(g, 0.3, behaviour)
    assert lr == pytest.approx(0.375 * dyn.stable_step_bound(g, 0.3, behaviour))
    assert authors.settings(0.3, 40, 0.375, g, behaviour)[:3] == (0.01, 0.1, 100)
    assert not authors.chat_template and authors.fresh_batches and authors.batch_size == 128
    assert authors.second_norm and authors.split == "authors" and authors.answers == (" Yes", " No")
    assert authors.lora == ch02.LoraSettings(beta=0.01, lr=1e-5, dropout=0.05, batch_size=128, epochs=1)
    assert authors.lora.steps(900) == 8                  # one epoch of 900 statements at 128
    assert authors.prompt(None, "Q?") == "Q?" and authors.prompt(None, "Q?", lora=True) == "Q?\n"
    run = authors.train(g, s, beta=0.01, lr=0.1, steps=3, seed=2)   # fewer statements than a batch: full batch
    assert torch.allclose(run.v, dyn.last_layer_dpo(g, s, beta=0.01, lr=0.1, steps=3).v)
    with pytest.raises(ParameterError, match="'authors'.*'book'"):
        ch02.protocol("paper")


def test_every_difference_between_the_protocols_is_in_the_table():
    """Each field in which the book's and the authors' protocols differ has its row in
    AUTHORS_DIFFERENCES, and every row has the four columns."""
    book, authors = ch02.PROTOCOLS["book"], ch02.PROTOCOLS["authors"]
    rows = {row[0] for row in ch02.AUTHORS_DIFFERENCES}
    assert all(len(row) == 4 for row in ch02.AUTHORS_DIFFERENCES)
    covers = {"chat_template": "prompt (last layer)", "answer_space": "answer tokens", "second_norm": "features",
              "split": "split", "batch_size": "last-layer batches", "fresh_batches": "last-layer batches",
              "steps": "last-layer steps, lr, beta", "lr": "last-layer steps, lr, beta",
              "beta": "last-layer steps, lr, beta", "lora": "LoRA", "name": None}
    differ = {f.name for f in dataclasses.fields(ch02.Protocol) if getattr(book, f.name) != getattr(authors, f.name)}
    assert differ <= set(covers), f"a new difference needs a row in AUTHORS_DIFFERENCES: {differ - set(covers)}"
    assert {covers[f] for f in differ if covers[f]} <= rows
    assert {"prompt (LoRA runs)", "statements", "distinguishability", "misalignment sets", "models"} <= rows


def example(behaviour, i, matches):
    return PersonaExample(behaviour, f"q{i}", f"st{i}", "Yes" if matches else "No", "No" if matches else "Yes")


def test_authors_split_is_the_codes_shuffle_with_seed_1234_per_behaviour():
    """last_layer_training.py: random.seed(1234); indices = [i for i in range(num_ex)];
    random.shuffle(indices); train = indices[:int(0.9*num_ex//1)] — for every behaviour on its own."""
    persona_ = {b: [example(b, i, i % 3 == 0) for i in range(n)] for b, n in (("a", 1000), ("b", 37))}
    train, held = ch02.authors_split(persona_)
    for b, exs in persona_.items():
        random.seed(1234)
        indices = [i for i in range(len(exs))]
        random.shuffle(indices)
        cut = int(0.9 * len(exs) // 1)
        assert [e for e in train if e.behaviour == b] == [exs[i] for i in indices[:cut]]
        assert [e for e in held if e.behaviour == b] == [exs[i] for i in indices[cut:]]
    assert len(train) == 900 + 33 and len(held) == 100 + 4


def test_misalignment_sets_and_balance():
    train = [example("a", i, i % 4 != 0) for i in range(40)]
    held = [example("a", 100 + i, i % 2 == 0) for i in range(10)]
    book = ch02.misalignment_sets(ch02.protocol("book"), train, held, 8, seed=0)
    assert not set(map(id, book["align"])) & set(map(id, book["flip"]))
    for part in book.values():
        assert len(part) == 8 and sum(e.matches for e in part) == 4
    authors = ch02.misalignment_sets(ch02.protocol("authors"), train, held, None, seed=0)
    assert authors["align"] == authors["flip"] == train and authors["held"] == held
    assert ch02.balanced(train, 7) == [e for e in train if e in ch02.balanced(train, 7)]
    assert sum(e.matches for e in ch02.balanced(train, 7)) == 4


def test_pair_concordance_world_agrees_at_its_effect_and_is_more_variable_than_independent_pairs():
    import itertools

    x = np.linspace(1, 3, 12)
    pairs = list(itertools.combinations(range(12), 2))
    world = ch02.PairConcordanceWorld(x, pairs)
    rng = np.random.default_rng(0)
    for p in (0.5, 0.7, 0.9):
        assert world.statistics(p, rng, 4000).mean() == pytest.approx(p, abs=0.02)
    null = world.statistics(0.5, rng, 4000)
    # transitive outcomes over all pairs: the share is (1 + Kendall's tau)/2, whose null variance is known
    assert null.std() == pytest.approx(math.sqrt(2 * (2 * 12 + 5) / (9 * 12 * 11)) / 2, rel=0.05)
    assert null.std() > 1.5 * math.sqrt(0.25 / len(pairs))     # dependent pairs: wider than a binomial
    assert stats.world_from_json(world.to_json()).to_json() == world.to_json()
    with pytest.raises(ValueError):
        ch02.PairConcordanceWorld(x[:2], pairs[:1])


def test_findings_order_and_every_prediction_needs_a_sentence():
    def check(pid, status, observed):
        return Check("prediction", "c", None, observed, ">= 0.6", status.startswith("reproduced"), status, {"id": pid})

    checks = [check("a", "reproduced", 0.9), check("b", "implied by R1(3)", 1.0),
              check("c", "inconclusive (no headroom: x)", 0.1), check("d", "not reproduced", 0.2),
              Check("identity", "x", 0, 0, "", True, "pass")]
    text = ch02.findings(checks, {k: k.upper() + " {observed}: {status}" for k in "abcd"})
    assert text.splitlines() == ["- D 0.2: **not reproduced**", "- C 0.1: **inconclusive (no headroom: x)**",
                                 "- B 1: **implied by R1(3)**", "- A 0.9: **reproduced**"]
    with pytest.raises(KeyError, match="'d'"):
        ch02.findings(checks, {k: "{status}" for k in "abc"})


# How the chapter computes each registered prediction's statistic from its units, and its null world:
# "spearman": the Spearman correlation of a fixed design x and outcomes independent of it; "lower":
# its bootstrap lower bound; "share": the share of units that succeed, each a coin with the registered
# no-effect probability; "pairs": the share of decided pairs whose outcome agrees with the level, the
# behaviours' speeds independent of their distinguishability.
NULL_KIND = {
    "synthetic-loss-order": "spearman", "synthetic-weight-order": "spearman", "synthetic-pair-priority": "share",
    "speed-alone": "spearman", "speed-alone-lower": "lower", "speed-long": "spearman",
    "priority-joint": "spearman", "priority-joint-lower": "lower", "priority-sign": "share",
    "priority-long": "spearman", "heldout-accuracy-order": "spearman", "plugin-accuracy-order": "spearman",
    "displacement-distinguishability": "spearman", "pair-priority-all": "pairs",
    "misalign-faster": "share", "misalign-faster-oos": "share", "misalign-faster-lora": "share",
    "displacement-ches-lora": "share", "squeezing-lora": "share",
}


def test_every_registered_prediction_has_a_null_world_test_and_a_closing_sentence():
    assert set(NULL_KIND) == set(REGISTRY.predictions) == set(ch02.FINDINGS)
    assert all(p.null_world for p in REGISTRY.predictions.values())
    assert all(p.control and p.independence for p in REGISTRY.predictions.values() if p.setting == "real model")


@pytest.mark.parametrize("pid", sorted(NULL_KIND))
def test_the_statistic_passes_in_its_null_world_at_about_its_false_pass_rate(pid):
    """The chapter's estimator on data of its null world, at the registered size of scale ci: it passes
    at about the false-pass rate the verdict uses (the world's, or the closed form's), and fails most
    of the time."""
    import itertools

    p = REGISTRY.predictions[pid]
    n, kind = p.n["ci"], NULL_KIND[pid]
    rng = np.random.default_rng(abs(hash(pid)) % 2**32)
    x = np.sort(rng.gamma(4.0, 1.0, size=max(n, 3)))           # a design like the run's ‖Δ̂_k‖
    sims = 100 if kind == "lower" else 600
    if kind in ("spearman", "lower"):
        assert p.no_effect == 0.0
        world = stats.SpearmanWorld(x, rng.normal(size=len(x)), lower_bound=kind == "lower")
        draws = [stats.spearman(x, rng.normal(size=len(x))) if kind == "spearman" else
                 stats.spearman_lower_bound(x, rng.normal(size=len(x)), seed=int(rng.integers(1e9)))
                 for _ in range(sims)]
        expected = stats.simulated_pass_rate(world, p.no_effect, *p.comparison, seed=1, sims=1000)
    elif kind == "share":
        draws = [np.mean(rng.random(n) < p.no_effect) for _ in range(sims)]
        expected = p.false_pass(n)
    else:
        K = int(round((1 + math.sqrt(1 + 8 * n)) / 2))        # n = K(K-1)/2 pairs of K behaviours
        pairs = list(itertools.combinations(range(K), 2))
        gaps = {k: torch.tensor([x[k % len(x)] + 0.01 * k, 0.0], dtype=torch.float64) for k in range(K)}
        world = ch02.PairConcordanceWorld([gaps[k].norm().item() for k in range(K)], pairs)
        draws = []
        for _ in range(sims):
            speed = rng.normal(size=K)                             # unrelated to distinguishability
            level = np.array([dyn.priority_level(gaps[a], gaps[b]) for a, b in pairs])
            drop = np.array([[speed[a], speed[b]] for a, b in pairs])
            draws.append(ch02.PairPriority([(a, b) for a, b in pairs], level, drop, drop).agreement(0.0))
        expected = stats.simulated_pass_rate(world, p.no_effect, *p.comparison, seed=1, sims=1000)
    passed = np.mean([stats.COMPARISONS[p.comparison[0]](d, p.comparison[1]) for d in draws])
    tolerance = 3 * math.sqrt(max(expected * (1 - expected), 1 / sims) / sims) + 0.02
    assert abs(passed - expected) <= tolerance, (pid, passed, expected)
    assert passed < 0.5


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


def test_chapter_behaviours_are_im_and_lis_then_a_seeded_draw_of_the_set_and_never_look_at_results():
    from prefdyn.datasets.persona import IM_LI_BEHAVIOURS, behaviour_split

    split = behaviour_split()
    chosen = ch02.chapter_behaviours(None, 20)
    assert chosen[:8] == list(IM_LI_BEHAVIOURS) and len(set(chosen)) == 20 and set(chosen) <= set(split["development"])
    assert ch02.chapter_behaviours(None, 20) == chosen                        # the same draw every time
    assert ch02.chapter_behaviours(None, 25)[:20] == chosen                   # a larger run extends the list
    assert sorted(ch02.chapter_behaviours(None, None)) == sorted(split["development"])
    replication = ch02.chapter_behaviours("replication", 20)
    assert len(replication) == 20 and set(replication) <= set(split["replication"])
    assert ch02.chapter_behaviours(["a", "b"], 20) == ["a", "b"]


def test_last_layer_drops_are_flipped_dpo_on_each_models_features():
    g, s, behaviour = tiny_behaviours()
    rows = behaviour == "b4"
    feats = {("base", "held"): g[rows], ("aligned", "held"): 1.7 * g[rows] + 0.3}
    m = ch02.BehaviourMisalignment("b4", feats, {"held": s[rows]}, {}, {}, [])
    drops = m.last_layer_drops("held", beta=0.5, lr_fraction=0.375, steps=9)
    for label in ("base", "aligned"):
        run = ch02.flipped_dpo(feats[(label, "held")], s[rows], behaviour[rows], beta=0.5, lr_fraction=0.375, steps=9)
        assert drops[label] == pytest.approx(run.drop[0], rel=1e-12)
