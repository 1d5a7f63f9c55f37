"""Chapter 4's drivers (prefdyn.experiments.ch04) against independent computations, and every
registered prediction of the chapter run in its null world: the chapter's own statistic, on data
simulated as the paper's claim being false would make it, passes there at about its registered
false-pass rate (and in the world the theory predicts it passes), with the threshold read from the
registry. Slow tests train the real model."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binom

from prefdyn import tabular
from prefdyn.book.registry import load_registry
from prefdyn.book.verify import Check, outcome
from prefdyn.datasets.scores import generate_scores
from prefdyn.experiments import ch04
from prefdyn.params import ParameterError
from prefdyn.stats import bootstrap_mean_ci
from prefdyn.theory import iterative as it
from prefdyn.theory import iterative_simulations as sim

D = torch.float64
REGISTRY = load_registry("ch04-ipo-sampling-iterative")
RPS = it.cyclic_preferences(0.4)
DIGITS = tabular.bradley_terry(torch.arange(1.0, 5.0, dtype=D))


def passes(pid: str, statistic) -> np.ndarray:
    """Whether each value of ``statistic`` passes the registered comparison of ``pid``."""
    return np.array([REGISTRY.prediction(pid).passes(float(x)) for x in np.atleast_1d(statistic)])


def uniform(K):
    return torch.full((K,), -math.log(K), dtype=D)


# --------------------------------------------------------------------------------------------------
# Helpers of the chapter
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [(0.0, 0.5, 1.0, (0.0, 0.9, 3.0)), (0.4, 1.5, 1.0, (0.0, 0.9, 3.0)),
                                  (0.4, 0.5, 0.0, (0.0, 0.9, 3.0)), (0.4, 0.5, 1.0, (0.0, 1.2, 3.0)),
                                  (0.4, 0.5, 1.0, (0.0, 0.9))])
def test_check_parameters_rejects_bad_values(args):
    with pytest.raises(ParameterError):
        ch04.check_parameters(*args)
    ch04.check_parameters(0.4, 0.5, 1.0, (0.0, 0.9, 3.0))


def test_similarity_effect_and_entropy_path_words():
    text = ch04.similarity_effect(200, seed=0, shares=(0.0, 0.5))
    assert text.count("cyclic") == 2 and "shared variance of 0.5" in text
    assert ch04.entropy_path_word(torch.tensor([1.0], dtype=D)) == "falls from the first round on"
    assert ch04.entropy_path_word(torch.tensor([1.0, 1.3, 1.2], dtype=D)).startswith("rises first, from 1.00 to 1.30")


def test_generated_scores_give_the_papers_shares_of_both_kinds_of_matrix():
    P, _ = it.preference_matrices(generate_scores(3000, seed=5).scores, np.random.default_rng(5))
    cyclic, strong = it.is_cyclic(P).double().mean().item(), it.strongly_transitive(P).double().mean().item()
    assert 0.006 < cyclic < 0.025 and 0.50 < strong < 0.62        # the paper: 1.3% and 56%


def test_sample_first_tokens_is_rejection_sampling_from_the_restricted_policy():
    logps = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.05, 0.05, 0.9]], dtype=D))   # mass 0.8 and 1.0
    kept, accepted = ch04.sample_first_tokens(logps, 20000, np.random.default_rng(0))
    for row, p in zip(kept, ([0.625, 0.25, 0.125], [0.05, 0.05, 0.9])):
        assert len(row) == 20000
        assert np.allclose([np.mean([d == k for d in row]) for k in range(3)], p, atol=0.012)
    assert accepted == pytest.approx(2 / (1 / 0.8 + 1), abs=0.005)      # 40000 kept of 45000 draws
    # the same as drawing first tokens one at a time until the prompt has its candidates
    rng = np.random.default_rng(1)
    got, total = [], 0
    row = np.array([0.5, 0.2, 0.1, 0.2])
    while len(got) < 5000:
        k = rng.choice(4, p=row)
        total += 1
        got += [k] if k < 3 else []
    assert np.allclose(np.bincount(got, minlength=3) / 5000, [0.625, 0.25, 0.125], atol=0.02)
    assert 5000 / total == pytest.approx(0.8, abs=0.02)
    assert kept == ch04.sample_first_tokens(logps, 20000, np.random.default_rng(0))[0]


def test_prompt_provenance_counts_the_shipped_prompts_and_says_they_were_written_for_the_book():
    from prefdyn.datasets.prompts import load_prompts

    text = ch04.prompt_provenance(3)
    assert f"the first 3 of the {len(load_prompts('rps'))} rock–paper–scissors prompts" in text
    assert f"the first 3 of the {len(load_prompts('digits'))} digit prompts" in text
    assert "written for this book" in text and "per unit" in text


def test_trained_modules_hold_exactly_the_trainable_weights_and_kept_weights_restores_them():
    from prefdyn.llm.models import kept_weights

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.LayerNorm(1)))
    model[0].requires_grad_(False)
    mods = ch04.trained_modules(model)
    assert {id(p) for m in mods for p in m.parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    saved = model[1][0].weight.detach().clone()
    with kept_weights(ch04.trained_modules(model)):
        with torch.no_grad():
            model[1][0].weight.add_(1.0)
    assert torch.equal(model[1][0].weight, saved) and not model[0].weight.requires_grad


def test_stack_units_and_the_statistics():
    a = {("rps", "ipo", "x"): {"log_pi": torch.zeros(3, 1, 2), "log_pred": torch.zeros(2, 1, 2), "kept": np.ones(2)}}
    b = {("rps", "ipo", "x"): {"log_pi": torch.ones(3, 1, 2), "log_pred": torch.ones(2, 1, 2), "kept": np.zeros(2)}}
    stacked = ch04.stack_units([a, b])[("rps", "ipo", "x")]
    assert stacked["log_pi"].shape == (3, 2, 2) and torch.equal(stacked["log_pi"][:, 1], torch.ones(3, 2))
    assert stacked["kept"].shape == (2, 2)
    assert ch04.exceeds([2, 1, 3, 0], [1, 1, 1, 1]) == 0.5             # ties count against
    runs = {"a": {"log_pi": F.log_softmax(torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]]], dtype=D), -1),
                  "log_pred": F.log_softmax(torch.tensor([[[0.0, 0.0]]], dtype=D), -1)}}
    assert ch04.round_distance(runs, ["a"]) == pytest.approx(float(torch.sigmoid(torch.tensor(1.0))) - 0.5)


def test_rotation_successes_need_a_turn_in_the_unstable_run_and_none_in_the_stable_one():
    leader = lambda seq: torch.log(torch.tensor([[[0.8 if k == c else 0.1 for k in range(3)]] for c in seq], dtype=D))
    turning, still = leader([0, 2, 1, 0]), leader([0, 0, 0, 0])     # 2 beats 0, 1 beats 2, 0 beats 1
    assert ch04.rotation_successes(turning, still, RPS).tolist() == [True]
    assert ch04.rotation_successes(turning, turning, RPS).tolist() == [False]
    assert ch04.rotation_successes(still, still, RPS).tolist() == [False]


def test_findings_put_the_failed_and_inconclusive_first():
    def check(pid, status, setting="real model"):
        return Check("prediction", f"claim {pid}", None, 0.5, ">= 0.8", status.startswith("reproduced"), status,
                     {"id": pid, "version": 2, "n": 12, "units": "units", "setting": setting,
                      "control": {"claim": "the rounds follow the map", "observed": 0.01, "passes_if": "<= 0.1",
                                  "passed": True}})
    checks = [check("a", "reproduced"), check("b", "implied by x"), check("c", "inconclusive (failed; power 0.4 < 0.8)"),
              check("d", "not reproduced", "simulation"), Check("identity", "e", 0, 0, "", True, "pass")]
    lines = ch04.findings(checks).splitlines()
    assert [outcome(line.split("**")[1]) for line in lines] == ["not reproduced", "inconclusive", "implied by",
                                                                  "reproduced"]
    assert "(in simulation)" in lines[0] and "control (the rounds follow the map): 0.01, met" in lines[-1]


# --------------------------------------------------------------------------------------------------
# Every prediction in its null world (and, where cheap, in the world the theory predicts)
# --------------------------------------------------------------------------------------------------

EXPERIMENTS = 400        # simulated runs of the chapter's experiment per world


def sampled_units(P, alpha, beta, lam, n_samples, rounds, units, generator):
    """``EXPERIMENTS`` experiments of ``units`` units each, every unit a run of the sampled map (the
    chapter's protocol with a policy that lands on each round's minimiser) from a uniform pi_0:
    ``(rounds+1, EXPERIMENTS, units, K)``."""
    traj = it.sampled_rounds(uniform(P.shape[-1]), P, alpha, beta, lam, n_samples, rounds, EXPERIMENTS * units, generator)
    return traj.reshape(rounds + 1, EXPERIMENTS, units, P.shape[-1])


def pass_rate(pid, larger, smaller):
    shares = (larger > smaller).double().mean(-1).numpy()            # ch04.exceeds, per experiment
    assert np.allclose(shares[:5], [ch04.exceeds(a, b) for a, b in zip(larger[:5], smaller[:5])])
    return passes(pid, shares).mean()


SIGN_TESTS = {   # pid: (P, stable (alpha, beta), unstable (alpha, beta), lam, samples, rounds, statistic)
    "rps-ipo-cycle": (RPS, (0.3, 2.0), (0.9, 10.0), 0.5, 12, 3, "cycle"),
    "rps-ipo-cycle-equal-beta": (RPS, (0.0, 3.0), (0.9, 3.0), 1.0, 32, 20, "cycle"),
    "digits-entropy": (DIGITS, (0.0, 2.0), (1.0, 5.0), 0.5, 12, 3, "entropy"),
    "digits-entropy-equal-beta": (DIGITS, (0.0, 2.0), (1.0, 2.0), 0.5, 12, 3, "entropy"),
}


def sign_statistic(traj, kind):
    return it.cycle_strength(traj) if kind == "cycle" else it.entropy(traj[-1])


@pytest.mark.parametrize("pid", list(SIGN_TESTS) + ["rps-dpo-cycle"])
def test_paired_sign_tests_fail_in_their_null_world_and_pass_in_the_theorys(pid):
    n = REGISTRY.prediction(pid).n["ci"]
    P, stable, unstable, lam, samples, rounds, kind = SIGN_TESTS.get(pid, SIGN_TESTS["rps-ipo-cycle"])
    g = torch.Generator().manual_seed(len(pid))
    # null world: the two runs of a unit are exchangeable (both at the stable parameters)
    a, b = (sign_statistic(sampled_units(P, *stable, lam, samples, rounds, n, g), kind) for _ in range(2))
    null_rate = pass_rate(pid, a, b)
    exact = binom.sf(math.ceil(0.8 * n) - 1, n, 0.5)                 # P(share >= 0.8) for n fair coins
    assert null_rate == pytest.approx(exact, abs=0.03) and null_rate <= 0.05
    if pid == "rps-dpo-cycle":
        return              # its effect world needs Newton's DPO minimiser: derived in the registry's pilot
    hi, lo = (sign_statistic(sampled_units(P, *params, lam, samples, rounds, n, g), kind) for params in (unstable, stable))
    larger, smaller = (hi, lo) if kind == "cycle" else (lo, hi)     # entropy: the stable run's is larger
    assert pass_rate(pid, larger, smaller) >= 0.9


def test_rotation_fails_when_both_runs_have_the_same_law_and_passes_in_the_theorys_world():
    pid, n = "rps-ipo-rotation", REGISTRY.prediction("rps-ipo-rotation").n["ci"]
    g = torch.Generator().manual_seed(5)
    runs = {al: sampled_units(RPS, al, 3.0, 1.0, 32, 20, n, g) for al in (0.0, 0.9)}
    same = sampled_units(RPS, 0.9, 3.0, 1.0, 32, 20, n, g)
    success = lambda unstable, stable: ch04.rotation_successes(unstable.flatten(1, 2), stable.flatten(1, 2), RPS) \
        .reshape(EXPERIMENTS, n).double().mean(-1).numpy()
    null = success(runs[0.9], same)                                   # p(1 - p) <= 1/4 per unit
    assert null.mean() <= 0.25 + 0.02 and passes(pid, null).mean() <= 0.05
    assert passes(pid, success(runs[0.9], runs[0.0])).mean() >= 0.8


def test_fixed_point_passes_at_about_its_false_pass_rate_when_the_mean_distance_is_the_tolerance():
    pid = "rps-ipo-fixed-point"
    n = REGISTRY.prediction(pid).n["ci"]
    g = torch.Generator().manual_seed(6)
    fixed = sim.prompt_fixed_points(uniform(3)[None], RPS, 0.3, 2.0, 0.5)[0]
    tv = it.total_variation(sampled_units(RPS, 0.3, 2.0, 0.5, 12, 3, n, g)[-1], fixed).numpy()   # (EXPERIMENTS, n)
    null = tv - tv.mean() + 0.1                                       # the null world: mean distance 0.1
    lower = np.array([bootstrap_mean_ci(0.1 - row, seed=k)[1] for k, row in enumerate(null)])
    assert passes(pid, lower).mean() <= 0.1                           # percentile bootstrap at 12 units
    assert np.mean(lower < 0) > 0.8


def test_fixed_point_noise_fails_for_a_run_that_follows_another_map_and_is_implied_when_it_follows_this_one():
    pid = "rps-ipo-fixed-point-noise"
    n = REGISTRY.prediction(pid).n["ci"]
    g = torch.Generator().manual_seed(7)
    fixed = sim.prompt_fixed_points(uniform(3)[None], RPS, 0.3, 2.0, 0.5)[0]
    tolerance = sim.fixed_point_tolerance(uniform(3)[None], RPS, 0.3, 2.0, 0.5, 12, 3, 400, seed=0)[0]
    within = lambda alpha, beta: (it.total_variation(sampled_units(RPS, alpha, beta, 0.5, 12, 3, n, g)[-1], fixed)
                                  <= tolerance).double().mean(-1).numpy()
    assert passes(pid, within(0.9, 10.0)).mean() <= 0.05             # the unstable regime's runs
    assert passes(pid, within(0.3, 2.0)).mean() >= 0.95               # the map itself: implied


def test_digits_ranking_fails_for_an_unrelated_order_and_is_forced_by_the_rounds_of_the_design():
    pid = "digits-ranking"
    g = torch.Generator().manual_seed(8)
    shuffled = F.log_softmax(torch.randn(EXPERIMENTS, 12, 4, generator=g, dtype=D), -1)
    accuracy = it.ranking_accuracy(shuffled, DIGITS).mean(-1).numpy()
    assert passes(pid, accuracy).mean() <= 0.01
    spec = REGISTRY.prediction(pid)
    design = sim.forced_order_margin(F.log_softmax(0.2 * torch.randn(12, 4, generator=g, dtype=D), -1), DIGITS, 5.0, 3)
    assert spec.implied(design)                                       # pi_0 near uniform, 3 rounds at beta = 5
    assert not spec.implied(sim.forced_order_margin(shuffled[0], DIGITS, 5.0, 0))


def _helpsteer(kind, n=12, G=5, iterations=200):
    P, _ = it.preference_matrices(generate_scores(3000, seed=9).scores, np.random.default_rng(9))
    alphas, bls = torch.linspace(0.0, 1.0, G, dtype=D), torch.linspace(0.5, 20.0, G, dtype=D)
    if kind == "cycle":
        P = P[it.is_cyclic(P)][:n]
        strength, _ = sim.paper_regimes(P, alphas, bls, iterations)
        factor = sim.contraction_grid(P, alphas, bls)
        return factor, strength, factor >= 1
    P = P[it.strongly_transitive(P)][:n]
    _, H = sim.paper_regimes(P, alphas, bls, iterations)
    kappa = (bls[None, :] / (1 - alphas[:, None]))[..., None].expand_as(H)
    return kappa, H, sim.unforced_entropy_cells(P, alphas, bls)


@pytest.mark.parametrize("pid,kind,sign", [("helpsteer-cycle-strength-rises", "cycle", 1),
                                           ("helpsteer-entropy-falls", "entropy", -1)])
def test_helpsteer_predictions_fail_when_the_outcome_is_unrelated_to_the_feedback(pid, kind, sign):
    x, y, cells = _helpsteer(kind)
    observed = np.mean(sign * sim.per_matrix_spearman(x, y, cells) > 0)
    g = torch.Generator().manual_seed(10)
    null = []
    for _ in range(60):                       # the null world: the outcome shuffled over the open cells
        shuffled = y.clone()
        for m in range(y.shape[-1]):
            keep = cells[..., m]
            values = shuffled[..., m][keep]
            shuffled[..., m][keep] = values[torch.randperm(len(values), generator=g)]
        null.append(np.mean(sign * sim.per_matrix_spearman(x, shuffled, cells) > 0))
    assert abs(np.mean(null) - 0.5) < 0.1 and passes(pid, null).mean() <= 0.1
    assert observed > np.mean(null)


def test_phase_averaging_statistic_is_zero_for_runs_in_phase():
    pid = "finite-sample-phase-averaging"
    P = it.cyclic_preferences(0.4)[None].expand(4, 3, 3).clone()
    cell_a, cell_b = torch.full((4, 1), 1.0, dtype=D), torch.full((4, 1), 4.0, dtype=D)
    det = torch.full((4,), it.cycle_strength(it.iterate(it.mrs_ipo_step, F.log_softmax(
        uniform(3) + torch.tensor([1e-3, 0, 0], dtype=D), -1), 400, P=P[0], alpha=1.0, beta=4.0, lam=1.0)[200:]).item())

    def statistic(traj):
        tail = traj[200:]
        single, averaged = it.cycle_strength(tail).mean(0), it.cycle_strength(tail.exp().mean(1).log())
        return ((single >= det / 2) & (averaged <= single / 2)).double().mean().item()

    apart, _, _ = sim.phase_averaging(P, cell_a, cell_b, 32, 400, 16, torch.Generator().manual_seed(1))
    in_phase = apart[:, :1].expand_as(apart)                       # every run the first one
    assert not passes(pid, statistic(in_phase)).any()
    assert passes(pid, statistic(apart)).all()


@pytest.mark.parametrize("pid,index,wrong", [
    ("phase-boundary-ipo", lambda A, B: it.ipo_oscillation_index(A, 0.4, B), lambda A, B: A ** 2 + (0.4 * B) ** 2 / 4),
    ("phase-boundary-dpo", lambda A, B: it.dpo_oscillation_index(A, 0.4, 1 / B), lambda A, B: A ** 2 + 4 * (0.4 / B) ** 2)])
def test_phase_boundary_fails_for_a_wrong_boundary(pid, index, wrong):
    T = 300
    step = it.mrs_ipo_step if pid.endswith("ipo") else it.mrs_dpo_step
    alphas = torch.linspace(0, 1, 21, dtype=D)
    betas = torch.linspace(0.1, 8.0, 17, dtype=D) if pid.endswith("ipo") else 1 / torch.linspace(0.025, 2.0, 17, dtype=D)
    start = F.log_softmax(uniform(3) + torch.tensor([1e-3, 0.0, 0.0], dtype=D), -1)
    ratio = sim.oscillation_scan(step, start, RPS, alphas, betas, T).numpy()
    A, B = np.meshgrid(alphas.numpy(), betas.numpy(), indexing="ij")
    band = sim.band_width(T)
    assert passes(pid, sim.phase_agreement(ratio, index(A, B), band)[0]).all()
    assert not passes(pid, sim.phase_agreement(ratio, wrong(A, B), band)[0]).any()


def test_dpo_only_if_statistic_is_zero_on_bradley_terry_matrices_and_implied_on_random_ones():
    pid = "dpo-sampler-only-if"
    g = torch.Generator().manual_seed(12)
    mus = torch.softmax(2 * torch.randn(3, 4, generator=g, dtype=D), -1)
    bt = tabular.bradley_terry(torch.randn(20, 4, generator=g, dtype=D))
    assert (sim.dpo_sampler_spread(bt, mus, 0.7) > 1e-6).double().mean().item() == 0.0
    assert not passes(pid, 0.0).any()
    other = sim.random_preferences(20, 4, g)
    assert passes(pid, (sim.dpo_sampler_spread(other, mus, 0.7) > 1e-6).double().mean().item()).all()
    spec = REGISTRY.prediction(pid)
    assert spec.implied(sim.bradley_terry_departure(other).min().item())
    assert not spec.implied(sim.bradley_terry_departure(bt).max().item())


def test_skewed_sampling_fails_on_unstructured_preferences_and_passes_on_bradley_terry():
    pid = "skewed-sampling-concentrates"
    n = REGISTRY.prediction(pid).n["ci"]
    g = torch.Generator().manual_seed(13)
    null = [(sim.on_policy_entropy_change(sim.random_preferences(n, 4, g), 2.0) < 0).double().mean().item()
            for _ in range(20)]
    assert abs(np.mean(null) - REGISTRY.prediction(pid).no_effect) < 0.03 and not passes(pid, null).any()
    r = torch.sort(1.5 * torch.randn(n, 4, generator=g, dtype=D), -1, descending=True).values
    assert passes(pid, (sim.on_policy_entropy_change(tabular.bradley_terry(r), 2.0) < 0).double().mean().item()).all()


# --------------------------------------------------------------------------------------------------
# The real model (slow)
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_run_unit_starts_every_run_at_the_units_warm_start_and_lands_on_each_rounds_minimiser(smol):
    from prefdyn.llm import logps
    from prefdyn.llm.models import kept_weights, weights_digest

    tasks = {"rps": ch04.Task("rps", ("Rock", "Scissors", "Paper"), RPS, (1 / 3,) * 3)}
    rounds = ch04.Rounds(0.5, 2, 8, 6)
    settings = {("rps", "ipo", "a"): ch04.Setting("rps", "ipo", 0.3, 2.0, rounds),
                ("rps", "dpo", "b"): ch04.Setting("rps", "dpo", 0.9, 0.4, rounds)}
    config = ch04.UnitConfig(1, 10)
    with kept_weights(smol.model):
        before = weights_digest(smol.model)
        runs, prepared = ch04.run_unit(smol, 0, tasks, settings, config, seed=0)
        assert weights_digest(smol.model) == before                    # the model leaves as it came
        again, _ = ch04.run_unit(smol, 0, tasks, settings, config, seed=0)
        other, _ = ch04.run_unit(smol, 1, tasks, settings, config, seed=0)
    task = prepared["rps"]
    assert task.prefix_err < 1e-4 and len(task.prompts) == 1 and 0 < task.mass <= 1
    for key, r in runs.items():
        assert r["log_pi"].shape == (3, 1, 3) and r["log_pred"].shape == (2, 1, 3)
        assert torch.allclose(r["log_pi"][0], runs[("rps", "ipo", "a")]["log_pi"][0], atol=1e-6)   # same pi_0
        assert torch.allclose(r["log_pi"], again[key]["log_pi"], atol=1e-5)                     # seeded
        assert not torch.allclose(r["log_pi"][0], other[key]["log_pi"][0])                      # another unit
        assert it.total_variation(r["log_pi"][1:], r["log_pred"]).max() < 0.05                   # L-BFGS lands
    assert ch04.round_distance(runs, list(runs)) < 0.02
    with torch.no_grad():
        base = logps.candidate_logps(smol.model, smol.tokenizer, task.prompts, task.candidate_ids, smol.device)
    assert not torch.allclose(F.log_softmax(base.double(), -1), runs[("rps", "ipo", "a")]["log_pi"][0], atol=1e-3)
