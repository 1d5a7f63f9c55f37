"""Chapter 5's drivers (``prefdyn.experiments.ch05``), each against an independent computation."""
import math

import numpy as np
import pytest
import torch

from prefdyn.datasets import demonstrations
from prefdyn.datasets.demonstrations import Demonstration
from prefdyn.experiments import ch05
from prefdyn.llm import models
from prefdyn.llm.sampling import sample_responses
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
    demos = [demo("red"), demo("blue"), Demonstration("x", "other", "Say x.", "It is x.", ("x",))]
    shipped = demonstrations.provenance(None, demos)
    assert "book's own demonstration set (3 demonstrations in 2 categories)" in shipped
    assert "not the paper's" in shipped
    own = demonstrations.provenance("/tmp/mine/demos.jsonl", demos[:1])
    assert own == "the demonstrations in `demos.jsonl` (1 demonstration in 1 category), passed as `demonstrations_path`"
