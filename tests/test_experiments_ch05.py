"""Chapter 5's drivers (``prefdyn.experiments.ch05``), each against an independent computation."""
import math
import zlib

import numpy as np
import pytest
import torch
from scipy.stats import t as student_t

from prefdyn.book.registry import load_registry
from prefdyn.datasets import demonstrations
from prefdyn.datasets.demonstrations import Demonstration, DemonstrationSet, dialogue_turns
from prefdyn.experiments import ch05
from prefdyn.llm import logps, models
from prefdyn.llm.sampling import sample_responses
from prefdyn.params import ParameterError
from prefdyn.stats import MeanWorld, bootstrap_mean_ci, mean_lower_bounds, pass_probability, simulated_pass_rate
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
    assert drawn == sample_responses(smol, prompts, 2, seed=1003, batch_size=64, cache=tmp_path / "reference",
                                     **kwargs)
    assert len(drawn) == 1 and len(drawn[0]) == 2


def test_score_responses_is_the_summed_logp_and_the_last_token_final_hidden_state(smol):
    prompts = [models.chat_prompt(smol.tokenizer, "2 + 2?"), models.chat_prompt(smol.tokenizer, "Say hello.")]
    responses = [" Four." + smol.tokenizer.eos_token, " Hello there, my friend"]
    logp, z = ch05.score_responses(smol, prompts, responses, batch_size=1)
    torch.testing.assert_close(logp, logps.response_logps(smol, prompts, responses), atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        for k, (p, y) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([smol.tokenizer.encode(p, add_special_tokens=False)
                                + smol.tokenizer.encode(y, add_special_tokens=False)])
            hidden = smol.model(ids, output_hidden_states=True).hidden_states[-1][0, -1]
            torch.testing.assert_close(z[k], hidden.float(), atol=1e-4, rtol=1e-4)
    # several responses to one prompt share its cached prefix, batched with padding: the same numbers
    shared = [prompts[0]] * 3
    answers = [" Four." + smol.tokenizer.eos_token, " It is four, of course", " 4"]
    logp2, z2 = ch05.score_responses(smol, shared, answers, batch_size=2)
    torch.testing.assert_close(logp2, logps.response_logps(smol, shared, answers), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(z2[0], z[0], atol=1e-4, rtol=1e-4)


def test_whole_responses_append_the_end_token_to_responses_that_stopped(smol):
    tok = smol.tokenizer
    long = " ".join(["word"] * 20)
    whole = ch05.whole_responses(tok, [["Hi.", long]], max_new_tokens=8)
    assert whole == [["Hi." + tok.eos_token, long]]


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
    ch05.check_options("mean", 1.0, 0.01)
    ch05.check_options("sum", 1, 1)
    with pytest.raises(ParameterError, match="sft_loss='avg' must be one of 'mean', 'sum'"):
        ch05.check_options("avg", 1.0, 0.01)
    with pytest.raises(ParameterError, match="temperature=0.7: only 1 is supported"):
        ch05.check_options("mean", 0.7, 0.01)
    with pytest.raises(ParameterError, match="l2=-1.0 must be a positive float"):
        ch05.check_options("mean", 1.0, -1.0)
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
    with models.kept_weights(smol.model):
        smol.model.requires_grad_(False)   # the first recorded loss is the batch's, before the step
        summed = -logps.response_logps(smol, prompts, completions).mean().item()
        mean = -logps.response_logps(smol, prompts, completions, length_normalised=True).mean().item()
        models.transformer_blocks(smol.model)[-1].requires_grad_(True)
        first_sum = ch05.sft(smol, prompts, completions, per_token=False, steps=1, batch_size=2, lr=1e-6, seed=0)
    with models.kept_weights(smol.model):
        smol.model.requires_grad_(False)
        models.transformer_blocks(smol.model)[-1].requires_grad_(True)
        first_mean = ch05.sft(smol, prompts, completions, per_token=True, steps=1, batch_size=2, lr=1e-6, seed=0)
    assert first_sum[0] == pytest.approx(summed, rel=1e-4)
    assert first_mean[0] == pytest.approx(mean, rel=1e-4)
    assert first_sum[0] > 2 * first_mean[0]


# --- Best-of-N on a pool, over-optimisation ------------------------------------------------------


def test_best_of_n_curves_are_the_pool_estimator_for_every_reward_and_N():
    rng = np.random.default_rng(0)
    golden = rng.integers(0, 4, size=(3, 8)) / 3
    rewards = {"a": rng.normal(size=(3, 8)), "oracle": golden}
    curves = ch05.best_of_n_curves(rewards, golden, [1, 2, 8])
    for name, r in rewards.items():
        assert curves[name].shape == (3, 3)
        for k, N in enumerate([1, 2, 8]):
            np.testing.assert_allclose(curves[name][k], afd.expected_best_of_n(r, golden, N))
    np.testing.assert_allclose(curves["a"][0], golden.mean(1))                # N = 1: the pool's mean
    np.testing.assert_allclose(curves["oracle"][-1], golden.max(1))          # N = M: the oracle's pick is the best


def test_pool_bon_kl_is_the_exact_kl_on_the_pool_and_below_the_bound():
    # brute force: enumerate every N-tuple of pool indices drawn with replacement
    import itertools
    reward = np.array([[0.3, -1.0, 2.0, 0.3]])
    M, N = 4, 3
    counts = np.zeros(M)
    for tup in itertools.product(range(M), repeat=N):
        r = reward[0, list(tup)]
        best = [i for i, v in zip(tup, r) if v == r.max()]
        for i in best:                      # ties broken uniformly among the tied draws
            counts[i] += 1 / len(best)
    pi_N = counts / M ** N
    brute = float(np.sum(pi_N[pi_N > 0] * np.log(pi_N[pi_N > 0] * M)))
    assert ch05.pool_kl_curves({"r": reward}, [N])["r"][0] == pytest.approx(brute, abs=1e-12)
    distinct = np.random.default_rng(1).normal(size=(2, 64))
    kl = afd.pool_bon_kl(distinct, 8)
    assert np.all(kl < afd.bon_kl_bound(8)) and np.all(kl > 0.9 * afd.bon_kl_bound(8))
    assert afd.pool_bon_kl(np.zeros((1, 5)), 4)[0] == pytest.approx(0.0, abs=1e-12)   # all tied: no move


def test_peak_and_its_drop_from_a_curve():
    curve = np.array([[0.1, 0.2], [0.5, 0.6], [0.3, 0.2]])       # (N, prompts): highest at the middle N
    info = ch05.peak(curve, [1, 2, 4], seed=0)
    assert info["N"] == 2 and info["drop"][0] == pytest.approx(0.3)
    rising = ch05.peak(np.array([[0.1, 0.2], [0.3, 0.4]]), [1, 2], seed=0)
    assert rising["N"] == 2 and rising["drop"][0] == 0.0
    assert "has not turned down" in ch05.overoptimisation_reading(rising, 2)
    assert "over-optimises" in ch05.overoptimisation_reading({"N": 2, "drop": (0.3, 0.1, 0.5)}, 4)
    assert "no clear over-optimisation" in ch05.overoptimisation_reading({"N": 2, "drop": (0.1, -0.1, 0.3)}, 4)


def test_pair_accuracy_and_mixed_pools_by_hand():
    golden = np.array([[1.0, 0.0, 0.5]])           # ranked pairs: (0,1), (0,2), (2,1)
    reward = np.array([[2.0, 1.0, 2.0]])           # right on (0,1), tie on (0,2), right on (2,1)
    assert ch05.pair_accuracy(reward, golden) == pytest.approx((1 + 0.5 + 1) / 3)
    assert math.isnan(ch05.pair_accuracy(reward, np.zeros((1, 3))))
    flags = np.array([[1, 0, 0], [1, 1, 1], [0, 0, 0], [0, 1, 0]])
    assert ch05.mixed_pools(flags) == 0.5


def test_findings_put_failures_and_inconclusive_verdicts_first():
    from prefdyn.book.verify import Check

    def check(status):
        return Check("prediction", "c", None, 0.25, "> 0", False, status,
                     {"control": {"claim": "room", "observed": 0.3, "passes_if": ">= 0.1", "passed": True}})

    checks = {"a": check("reproduced"), "b": check("inconclusive (failed; power 0.41 < 0.8)"),
              "c": check("not reproduced")}
    text = ch05.findings(checks, {"a": "first", "b": "second", "c": "third"})
    lines = text.splitlines()
    assert [line.split("**")[1] for line in lines] == ["not reproduced", "inconclusive (failed; power 0.41 < 0.8)",
                                                     "reproduced"]
    assert "Third (measured 0.25, passes if > 0; control: room, 0.3 (met: >= 0.1))." in lines[0]
    assert "was reproduced" in ch05.central_claim(check("reproduced"))
    assert "was not reproduced" in ch05.central_claim(check("not reproduced"))
    assert "neither reproduced nor refuted" in ch05.central_claim(check("inconclusive (no headroom: x)"))


def test_every_prediction_has_a_finding_sentence():
    registry = load_registry("ch05-alignment-from-demonstrations")
    assert set(registry.predictions) - {"toy-extrapolation-helps"} <= set(ch05.FINDINGS)


def test_sft_reading_follows_the_run():
    rates = {"π_0": {"correct": 0.2, "complete": 0.3, "concise": 0.3},
             "π_SFT": {"correct": 0.3, "complete": 0.6, "concise": 0.95}}
    text = ch05.sft_reading(rates)
    assert "complete 30% → 60%" in text and "room on correct, complete" in text
    full = {"π_0": rates["π_0"], "π_SFT": {"correct": 0.95, "complete": 0.99, "concise": 0.99}}
    assert "little is left to select" in ch05.sft_reading(full)


# --- The registered predictions in their null worlds ----------------------------------------------

MEAN_PREDICTIONS = ["sft-heldout-nll", "sft-golden-gain", "init-sft-separates", "init-demo-separates",
                    "bon-extrapolation", "init-sft-vs-init-demo", "init-sft-vs-sft-demo", "style-heterogeneity",
                    "sft-golden-gain-hh", "bon-extrapolation-hh", "init-sft-vs-init-demo-hh",
                    "init-sft-vs-sft-demo-hh"]


UNIT_VALUES = np.array([-1.0, -1 / 3, 0.0, 0.0, 1 / 3, 2 / 3])   # golden differences in steps of 1/3, skewed


def null_units(n: int, rng, mean: float = 0.0) -> np.ndarray:
    """``n`` per-prompt values as the chapter's are (differences of golden scores in steps of 1/3,
    skewed, with ties, plus a little spread), drawn from a population with the given mean in standard
    deviations (0: the registered null world of every mean prediction)."""
    mu, sd = UNIT_VALUES.mean(), math.sqrt(UNIT_VALUES.var() + 0.05 ** 2)
    v = rng.choice(UNIT_VALUES, size=n) + rng.normal(0, 0.05, size=n)
    return (v - mu) / sd + mean


@pytest.mark.parametrize("pid", MEAN_PREDICTIONS)
def test_mean_predictions_rarely_pass_in_their_null_world(pid):
    p = load_registry("ch05-alignment-from-demonstrations").prediction(pid)
    assert p.null_world and p.control and p.independence and p.version >= 1
    n, rng = p.n["ci"], np.random.default_rng(zlib.crc32(pid.encode()))
    # the chapter's estimator (the bootstrap lower bound of bootstrap_mean_ci) on fresh null runs
    runs = np.array([null_units(n, rng) for _ in range(400)])
    bounds = mean_lower_bounds(runs, 2000, rng)
    passed = np.mean([p.passes(b) for b in bounds])
    assert passed <= 0.06                                   # about the 2.5% a one-sided 95% bound allows
    assert 1 - passed >= 0.9                                 # it fails there most of the time
    # the world the chapter builds from a run gives the same false-pass rate
    world = MeanWorld(null_units(n, rng))
    assert simulated_pass_rate(world, p.no_effect, *p.comparison, seed=1) <= 0.06
    # and the statistic computed as the chapter computes it agrees with the vectorised one
    x = runs[0]
    assert bootstrap_mean_ci(x, seed=0)[1] == pytest.approx(np.quantile(
        x[np.random.default_rng(0).integers(0, n, size=(2000, n))].mean(1), 0.025))


def test_noninferiority_rarely_passes_at_its_margin():
    p = load_registry("ch05-alignment-from-demonstrations").prediction("init-sft-noninferior-bt-rm")
    n, rng = p.n["ci"], np.random.default_rng(5)
    passed = []
    for _ in range(2000):
        v = null_units(n, rng, mean=p.no_effect)         # at the margin: -0.5 standard deviations
        passed.append(p.passes(ch05.standardised_lower_bound(v)))
    assert np.mean(passed) <= 0.06 and np.mean(passed) >= 0.005
    world = ch05.StandardisedMeanWorld(null_units(n, rng))
    false_pass = simulated_pass_rate(world, p.no_effect, *p.comparison, seed=3)
    assert false_pass <= 0.06
    # its power at "on par" follows the noncentral t of the closed form
    power = simulated_pass_rate(world, p.effect, *p.comparison, seed=4)
    assert power == pytest.approx(pass_probability("mean_lower_bound", n, p.effect, *p.comparison), abs=0.1)
    assert simulated_pass_rate(world, p.effect, *p.comparison, seed=4) == power   # seeded


def test_standardised_mean_world_statistic_is_the_chapters():
    world = ch05.StandardisedMeanWorld(np.array([0.1, -0.2, 0.3, 0.0, 0.4]))
    draws = world.statistics(0.3, np.random.default_rng(0), sims=50)
    rng = np.random.default_rng(0)
    v = world.values
    centred = v - v.mean() + 0.3 * v.std(ddof=1)
    samples = centred[rng.integers(0, 5, size=(50, 5))]
    expected = [ch05.standardised_lower_bound(s) for s in samples]
    np.testing.assert_allclose(draws, expected)
    from prefdyn.stats import world_from_json
    assert isinstance(world_from_json(world.to_json()), ch05.StandardisedMeanWorld)


def test_toy_prediction_rarely_passes_in_its_null_world():
    p = load_registry("ch05-alignment-from-demonstrations").prediction("toy-extrapolation-helps")
    rng = np.random.default_rng(2)
    shares = rng.binomial(p.n["ci"], p.no_effect, size=5000) / p.n["ci"]
    assert np.mean([p.passes(s) for s in shares]) <= 0.01
    assert p.null_world and p.setting == "simulation"


# --- The HH-RLHF golden proxy ---------------------------------------------------------------------


def dialogue(i: int, chosen: str, rejected: str) -> Demonstration:
    return Demonstration(f"hh-{i:05d}", "harmless-base", f"\n\nHuman: question {i}?\n\nAssistant:", chosen, (),
                         rejected)


def test_last_human_turn_is_the_request_the_final_turn_answers():
    d = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant:"
    assert ch05.last_human_turn(d) == "How do I pick a lock?"


def test_proxy_split_keeps_the_runs_prompts_out_and_holds_out_the_evaluation_pairs():
    dialogues = [dialogue(i, "ok", "no") for i in range(20)]
    fit, held = ch05.proxy_split(dialogues, dialogues[:4], 10, seed=0)
    ids = {d.id for d in fit} | {d.id for d in held}
    assert len(held) == 10 and len(fit) == 6 and not ({d.id for d in fit} & {d.id for d in held})
    assert not ids & {d.id for d in dialogues[:4]}
    assert len(ch05.proxy_split(dialogues, dialogues[:4], 10, seed=0, n_fit=3)[0]) == 3
    with pytest.raises(ParameterError, match="needs 20 held-out dialogues"):
        ch05.proxy_split(dialogues, dialogues[:4], 20, seed=0)


class WordEncoder:
    """A stand-in for the sentence encoder: one feature, whether the response refuses."""

    def features(self, requests, responses):
        return torch.tensor([[1.0 if "can't" in y else 0.0, 1.0] for y in responses], dtype=torch.float64)


def test_proxy_agreement_and_scores_with_a_known_encoder():
    proxy = ch05.GoldenProxy(afd.fit_bradley_terry(torch.tensor([[1.0, 1.0]] * 3, dtype=torch.float64),
                                                   torch.tensor([[0.0, 1.0]] * 3, dtype=torch.float64), l2=0.1),
                             WordEncoder(), 3, 0.1)
    held = [dialogue(0, "I can't help.", "Sure."), dialogue(1, "I can't.", "Fine."), dialogue(2, "Sure.", "I can't.")]
    agreement = ch05.proxy_agreement(proxy, held, seed=0)
    assert agreement[0] == pytest.approx(2 / 3)
    scores = ch05.golden(held[:2], [["I can't.", "Sure."], ["Fine.", "I can't do it."]], proxy)
    assert scores.shape == (2, 2) and scores[0, 0] > scores[0, 1] and scores[1, 1] > scores[1, 0]
    assert "orders 66.7%" in ch05.golden_description(proxy, agreement)
    assert "golden_score" in ch05.golden_description(None, None)


@pytest.mark.slow
def test_score_responses_shares_the_prompt_on_gemma_too(gemma):
    # Gemma 3 caches its sliding-window layers apart: repeating the prompt's cache must still give
    # each response's log-probability as a plain forward pass does
    prompt = models.chat_prompt(gemma.tokenizer, "Name a colour.")
    answers = [" Red.", " The colour blue is nice", " Green"]
    logp, z = ch05.score_responses(gemma, [prompt] * 3, answers, batch_size=2)
    torch.testing.assert_close(logp, logps.response_logps(gemma, [prompt] * 3, answers), atol=2e-4, rtol=1e-5)
    assert z.shape == (3, gemma.model.config.hidden_size) and torch.isfinite(z).all()


def test_cross_validated_l2_picks_the_penalty_that_predicts_held_out_pairs():
    rng = np.random.default_rng(0)
    w = torch.tensor(rng.normal(size=20))
    X = torch.tensor(rng.normal(size=(120, 20)))
    Y = torch.tensor(rng.normal(size=(120, 20)))
    flip = (X - Y) @ w + torch.tensor(rng.logistic(size=120)) * 3 < 0       # noisy labels from a linear reward
    win, lose = torch.where(flip[:, None], Y, X), torch.where(flip[:, None], X, Y)
    l2 = ch05.cross_validated_l2(win, lose, grid=(0.01, 1.0, 1000.0), folds=3, seed=0)
    assert l2 in (0.01, 1.0, 1000.0)
    # by hand: the same folds, the same fits
    order = np.random.default_rng(0).permutation(120)
    parts = np.array_split(order, 3)
    def cv(pen):
        acc = []
        for k in range(3):
            fit = torch.as_tensor(np.concatenate([p for j, p in enumerate(parts) if j != k]))
            test = torch.as_tensor(parts[k])
            m = afd.fit_bradley_terry(win[fit], lose[fit], pen)
            acc.append((m.logit(win[test]) > m.logit(lose[test])).double().mean().item())
        return np.mean(acc)
    assert cv(l2) == max(cv(p) for p in (0.01, 1.0, 1000.0))
