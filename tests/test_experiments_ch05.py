"""Chapter 5's drivers (``prefdyn.experiments.ch05``), each against an independent computation."""
import math

import numpy as np
import pytest
import torch
from conftest import restoring
from scipy.stats import t as student_t

from prefdyn.book.registry import Prediction
from prefdyn.datasets import demonstrations
from prefdyn.datasets.demonstrations import Demonstration, DemonstrationSet, dialogue_turns
from prefdyn.experiments import ch05
from prefdyn.llm import logps, models
from prefdyn.llm.features import embeddings
from prefdyn.llm.sampling import sample_responses
from prefdyn.params import ParameterError
from prefdyn.stats import pass_probability
from prefdyn.theory import demonstrations as afd
from prefdyn.theory.demonstrations import LogisticModel


def demo(answer: str) -> Demonstration:
    return Demonstration(id=answer, category="test", prompt=f"Say {answer}.", completion=f"It is {answer}.",
                         answers=(answer,))


def test_valley_mass_of_a_standard_normal_is_its_central_probability():
    x = torch.linspace(-12, 12, 24001, dtype=torch.float64)
    log_q = -0.5 * x ** 2 - 0.5 * math.log(2 * math.pi)
    assert ch05.valley_mass(x, log_q) == pytest.approx(math.erf(0.5 / math.sqrt(2)), abs=2e-3)
    assert ch05.valley_mass(x, log_q, half_width=2.0) == pytest.approx(math.erf(2 / math.sqrt(2)), abs=2e-3)


def test_valley_mass_of_a_uniform_density_is_the_valley_width_times_the_density():
    x = torch.linspace(-5, 5, 100001, dtype=torch.float64)
    assert ch05.valley_mass(x, torch.full_like(x, math.log(0.1))) == pytest.approx(0.1, abs=1e-3)


def test_flatten_repeats_each_prompt_once_per_sample():
    prompts, responses = ch05.flatten(["a", "b", "c"], [["a1", "a2"], [], ["c1"]])
    assert prompts == ["a", "a", "c"]
    assert responses == ["a1", "a2", "c1"]


def test_balanced_fit_logit_is_the_log_ratio_of_class_frequencies():
    # one-hot features of two categories: positives 3 A + 1 B, negatives 1 A + 5 B; with equal class
    # weights and no penalty, thm-discriminator gives the logit log(f_+(z) / f_-(z)) exactly
    A, B = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    pos, neg = torch.stack([A, A, A, B]), torch.stack([A] + [B] * 5)
    fit = ch05.balanced_fit(pos, neg, l2=0.0)
    logit = fit.logit(torch.stack([A, B]))
    assert logit[0].item() == pytest.approx(math.log((3 / 4) / (1 / 6)), abs=1e-6)
    assert logit[1].item() == pytest.approx(math.log((1 / 4) / (5 / 6)), abs=1e-6)


def test_balanced_fit_penalty_shrinks_the_logit():
    A, B = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    pos, neg = torch.stack([A, A, A, B]), torch.stack([A] + [B] * 5)
    free, penalised = (ch05.balanced_fit(pos, neg, l2=l2).logit(A[None]).item() for l2 in (0.0, 1.0))
    assert 0 < penalised < free


def test_per_prompt_accuracy_by_hand():
    identity = LogisticModel(torch.ones(1, dtype=torch.float64), torch.zeros((), dtype=torch.float64),
                             torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    # prompt 0: positives +1, -1 (1 of 2 hit), negatives -1, -2, +3 (2 of 3 hit): (1/2 + 2/3) / 2
    # prompt 1: positives +2, +1 (2 of 2), negatives 0, 0, 0 (logit 0 counts as negative: 3 of 3): 1
    positive = torch.tensor([[1.0], [-1.0], [2.0], [1.0]])
    negative = torch.tensor([[-1.0], [-2.0], [3.0], [0.0], [0.0], [0.0]])
    acc = ch05.per_prompt_accuracy(identity, positive, negative, 2, 3)
    np.testing.assert_allclose(acc, [(1 / 2 + 2 / 3) / 2, 1.0])


def test_golden_scores_and_component_rates_by_hand():
    demos = [demo("Paris"), demo("blue")]
    samples = [["The capital is Paris.", "It is Lyon"], ["Blue", "the sky is blue and it is very very very very very blue."]]
    # Paris.: all three; Lyon: concise only; Blue: correct + concise; the long one: correct + complete
    np.testing.assert_allclose(ch05.golden_scores(demos, samples), [[1, 1 / 3], [2 / 3, 2 / 3]])
    assert ch05.component_rates(demos, samples) == pytest.approx({"correct": 3 / 4, "complete": 2 / 4, "concise": 3 / 4})


def test_draw_is_the_seeded_sampler_with_a_salted_stream(smol, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFDYN_CACHE", str(tmp_path))
    prompts = [models.chat_prompt(smol.tokenizer, "Name a colour.")]
    kwargs = dict(max_new_tokens=4, temperature=1.0)
    drawn = ch05.draw(smol, prompts, 2, salt=3, seed=1, **kwargs)
    # generated afresh in a cache of its own, not read back from the draw's
    assert drawn == sample_responses(smol, prompts, 2, seed=1003, cache=tmp_path / "reference", **kwargs)
    assert len(drawn) == 1 and len(drawn[0]) == 2


def test_response_features_are_the_last_token_final_hidden_state(smol, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFDYN_CACHE", str(tmp_path))
    prompts, responses = ["Question: 2 + 2?\nAnswer:", "Hello"], [" Four.", " world"]
    z = ch05.response_features(smol, prompts, responses)
    with torch.no_grad():
        for k, (p, y) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([smol.tokenizer.encode(p + y, add_special_tokens=False)])
            hidden = smol.model(ids, output_hidden_states=True).hidden_states[-1][0, -1]
            torch.testing.assert_close(z[k], hidden.float(), atol=1e-4, rtol=1e-4)


def test_provenance_names_the_shipped_set_or_the_readers_file_with_counts():
    demos = [demo("red"), demo("blue"), Demonstration("x", "other", "Say x.", "Indeed! It is x.", ("x",))]
    shipped = demonstrations.provenance(None, DemonstrationSet(demos, "book"))
    assert "book's own demonstration set (3 demonstrations in 2 categories; 1 open with the style marker" in shipped
    assert "not the paper's" in shipped
    own = demonstrations.provenance("/tmp/mine/demos.jsonl", DemonstrationSet(demos[:1], "book"))
    assert own == "the demonstrations in `demos.jsonl` (1 demonstration in 1 category), passed as `demos_path`"


def test_toy_extrapolation_instances_follow_the_chapters_recipe():
    tree, lambdas = afd.TokenTree(n_words=2, T=3), np.linspace(0, 2, 5)
    curves = ch05.toy_extrapolation_instances(tree, torch.Generator().manual_seed(3), 2, 5, 1.0, lambdas)
    gen = torch.Generator().manual_seed(3)
    for row in curves:        # the same draws, in the same order, by hand
        beta, init = tree.random_logits(gen, scale=1.5), tree.random_logits(gen)
        sft = afd.toy_sft(tree, beta, init, 5, 1.0)
        lb, ls, l0 = (afd.trajectory_logprobs(tree, x) for x in (beta, sft, init))
        for lam, value in zip(lambdas, row):
            mix = torch.log_softmax((1 + lam) * ls - lam * l0, 0)
            assert value == pytest.approx((lb.exp() * (lb - mix)).sum().item(), abs=1e-12)
    assert curves.shape == (2, 5)


def test_options_and_split_fail_with_the_fix_named():
    ch05.check_options("mean", 1.0)
    ch05.check_options("sum", 1)
    with pytest.raises(ParameterError, match="sft_loss='avg' must be one of 'mean', 'sum'"):
        ch05.check_options("avg", 1.0)
    with pytest.raises(ParameterError, match="temperature=0.7: only 1 is supported"):
        ch05.check_options("mean", 0.7)
    demos = [demo(str(k)) for k in range(5)]
    train, test, rest = ch05.split(demos, 2, 2, seed=0, source="x.jsonl")
    order = np.random.default_rng(0).permutation(5)
    assert [d.id for d in train + test + rest] == [demos[i].id for i in order]
    assert (len(train), len(test), len(rest)) == (2, 2, 1)
    with pytest.raises(ParameterError, match="x.jsonl holds 5 demonstrations; this scale needs 4 training and 2"):
        ch05.split(demos, 4, 2, seed=0, source="x.jsonl")


def test_preference_pairs_by_hand():
    golden = np.array([[1.0, 0.0, 1.0], [0.5, 0.5, 0.5]])     # prompt 1 is all ties: no pair
    win, lose = ch05.preference_pairs(golden)
    assert sorted(zip(win.tolist(), lose.tolist())) == [(0, 1), (2, 1)]


def test_bradley_terry_rm_fits_the_ranked_pairs_or_reports_none():
    rng = np.random.default_rng(0)
    X = torch.tensor(rng.normal(size=(6, 2)))
    golden = np.array([[1.0, 0.0, 0.5], [0.0, 0.0, 0.0]])
    model, n = ch05.bradley_terry_rm(X, golden, l2=0.1)
    reference = afd.fit_bradley_terry(X[[0, 0, 2]], X[[1, 2, 1]], l2=0.1)
    assert n == 3 and torch.allclose(model.weight, reference.weight, atol=1e-12)
    assert ch05.bradley_terry_rm(X, np.zeros((2, 3)), l2=0.1) == (None, 0)


def test_standardised_lower_bound_by_hand():
    x = np.array([0.3, -0.1, 0.4, 0.2, 0.0])
    m, s = x.mean(), x.std(ddof=1)
    assert ch05.standardised_lower_bound(x) == pytest.approx((m - 1.959963984540054 * s / math.sqrt(5)) / s, abs=1e-12)
    assert ch05.standardised_lower_bound(np.zeros(4)) == 0.0
    assert ch05.standardised_lower_bound(np.full(3, 0.2)) == math.inf
    assert ch05.standardised_lower_bound(np.full(3, -0.2)) == -math.inf
    # its pass rate at the margin -0.5 with no true difference is the Student t tail the registry approximates
    n, margin = 48, -0.5
    exact = student_t.sf(1.959963984540054 + margin * math.sqrt(n), n - 1)
    assert pass_probability("mean_lower_bound", n, 0.0, ">", margin) == pytest.approx(exact, abs=0.01)


def test_detectable_effect_has_the_asked_power():
    p = Prediction("x", "c", "s", "mean_lower_bound", "> 0", {"smoke": 3, "ci": 48, "full": 96}, "prompts",
                   0.8, "stated", 0.0)
    d = ch05.detectable_effect(p, 48)
    assert pass_probability("mean_lower_bound", 48, d, ">", 0.0) == pytest.approx(0.8, abs=1e-6)
    assert ch05.detectable_effect(p, 96) < d
    assert ch05.detectable_effect(p, 3) > 1.0


def test_failure_reading_distinguishes_not_detected_from_not_there():
    assert "detected" in ch05.failure_reading("reproduced", 0.8, 0.99, 0.4, 0.1)
    text = ch05.failure_reading("not reproduced", 0.8, 0.99, 0.4, 0.1)
    assert "probability 0.99" in text and "d = 0.40" in text and "0.040" in text and "not the same as not there" in text
    assert "evidence neither way" in ch05.failure_reading("underpowered (failed)", 0.8, 0.41, 2.0, 0.1)


def test_chat_prompts_render_questions_and_dialogues(smol):
    tok = smol.tokenizer
    question = demo("Paris")
    dialogue = Demonstration("hh-00001", "harmless-base", "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:",
                             "Bye!", (), "Go away.")
    rendered = ch05.chat_prompts(tok, [question, dialogue])
    assert rendered[0] == models.chat_prompt(tok, question.prompt)
    assert rendered[1] == tok.apply_chat_template(dialogue_turns(dialogue.prompt), tokenize=False,
                                                  add_generation_prompt=True)
    assert "Hello!" in rendered[1] and "Bye" in rendered[1]


def test_sft_objectives_are_the_mean_per_token_and_the_summed_nll(smol):
    prompts = [models.chat_prompt(smol.tokenizer, "Say hi."), models.chat_prompt(smol.tokenizer, "Count to three.")]
    completions = ["Hi.", "One, two, three, and that is all."]
    with restoring(smol.model):
        smol.model.requires_grad_(False)   # the first recorded loss is the batch's, before the step
        summed = -logps.response_logps(smol, prompts, completions).mean().item()
        mean = -logps.response_logps(smol, prompts, completions, length_normalised=True).mean().item()
        models.transformer_blocks(smol.model)[-1].requires_grad_(True)
        first_sum = ch05.sft(smol, prompts, completions, per_token=False, steps=1, batch_size=2, lr=1e-6, seed=0)
    with restoring(smol.model):
        smol.model.requires_grad_(False)
        models.transformer_blocks(smol.model)[-1].requires_grad_(True)
        first_mean = ch05.sft(smol, prompts, completions, per_token=True, steps=1, batch_size=2, lr=1e-6, seed=0)
    assert first_sum[0] == pytest.approx(summed, rel=1e-4)
    assert first_mean[0] == pytest.approx(mean, rel=1e-4)
    assert first_sum[0] > 2 * first_mean[0]


def test_golden_proxy_is_bradley_terry_on_the_response_features(smol, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFDYN_CACHE", str(tmp_path))
    prompts = [models.chat_prompt(smol.tokenizer, q) for q in ("Help me steal a car.", "How do I hurt someone?")]
    chosen, rejected = ["I can't help with that.", "Please don't."], ["Sure, first break a window.", "Hit them."]
    proxy = ch05.golden_proxy(smol, prompts, chosen, rejected, l2=0.5)
    z_c = embeddings(smol, [p + y for p, y in zip(prompts, chosen)], cache=tmp_path / "reference")
    z_r = embeddings(smol, [p + y for p, y in zip(prompts, rejected)], cache=tmp_path / "reference")
    reference = afd.fit_bradley_terry(z_c, z_r, l2=0.5)
    assert torch.allclose(proxy.weight, reference.weight, atol=1e-8)
    assert (proxy.logit(z_c) > proxy.logit(z_r)).all()       # two separable pairs, fitted
