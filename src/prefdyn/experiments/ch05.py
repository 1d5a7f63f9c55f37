"""Chapter 5's experiments: alignment from demonstrations on the toys and on a real model.

On the toys: :func:`valley_mass` (mass-covering against mode-seeking) and
:func:`toy_extrapolation_instances` (the registered toy prediction: extrapolation beyond an
early-stopped SFT policy, over fresh random instances). On the language model: :func:`chat_prompts`
renders the prompts, :func:`sft` fine-tunes on the summed or the mean per-token NLL, :func:`draw`
samples a policy, :func:`response_features` gives the reward models' input, :func:`flatten` lays
per-prompt samples out one row per response, :func:`balanced_fit` fits the paper's discriminators,
:func:`bradley_terry_rm` its preference baseline on golden-ranked pairs (:func:`preference_pairs`),
:func:`per_prompt_accuracy` scores discriminators on held-out prompts, :func:`golden_scores` and
:func:`component_rates` apply the book's golden criterion and :func:`golden_proxy` the HH-RLHF
stand-in for it. :func:`standardised_lower_bound` and :func:`detectable_effect` are the statistics
of the chapter's non-inferiority prediction and of its wording of a failed one.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..datasets.demonstrations import Demonstration, dialogue_turns, golden_components, golden_score
from ..llm import logps, models, train as training
from ..llm.features import embeddings
from ..llm.sampling import sample_responses
from ..params import ParameterError
from ..stats import Z_95, pass_probability
from ..theory.demonstrations import (
    LogisticModel,
    TokenTree,
    extrapolation_curve,
    fit_bradley_terry,
    fit_logistic,
    toy_sft,
    trajectory_logprobs,
)

GOLDEN_PARTS = ("correct", "complete", "concise")
SFT_LOSSES = {"mean": "mean per-token NLL", "sum": "summed NLL (the forward KL)"}


def check_options(sft_loss: str, temperature: float) -> None:
    """The chapter's own options, checked in its first cell: ``sft_loss`` is one of
    :data:`SFT_LOSSES`; ``temperature`` must be 1, because the closed-form reward
    ``log pi_SFT - log pi_0`` is the optimal discriminator's logit only between the untempered
    policies (at another temperature the samples follow the tempered ones)."""
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
    weights (:func:`prefdyn.llm.sampling.sample_responses`, pure ancestral sampling), with the seed
    ``1000 seed + salt``: each of the chapter's draws (``pi_0`` and ``pi_SFT``, training and held-out
    prompts) has its own stream."""
    return sample_responses(policy, prompts, n, max_new_tokens=max_new_tokens, temperature=temperature,
                            seed=seed * 1000 + salt)


def flatten(prompts: Sequence[str], samples: Sequence[Sequence[str]]) -> tuple[list[str], list[str]]:
    """Per-prompt samples laid out one row per response: each prompt ``x`` repeated once per sample,
    and the samples in the same order, prompt by prompt."""
    return [p for p, ys in zip(prompts, samples) for _ in ys], [y for ys in samples for y in ys]


def response_features(policy, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
    """The reward models' input ``z(x, y)``: the policy's final hidden state at the last token of
    prompt + response (:func:`prefdyn.llm.features.embeddings`), shape ``(len(responses), hidden)``."""
    return embeddings(policy, [p + y for p, y in zip(prompts, responses)])


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


def golden_proxy(policy, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                 l2: float) -> LogisticModel:
    """The golden stand-in for HH-RLHF: a Bradley-Terry reward model on :func:`response_features` of
    the chosen against the rejected final turns of dialogues the chapter holds out (chat-templated
    ``prompts``). A proxy for harmlessness, in the same feature space as the reward models it judges."""
    return fit_bradley_terry(response_features(policy, prompts, chosen), response_features(policy, prompts, rejected),
                             l2)


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


def detectable_effect(prediction, n: int, power: float = 0.8, hi: float = 10.0) -> float:
    """The smallest effect (in the prediction's units) that its test detects with probability
    ``power`` at ``n`` measurements: bisection on :meth:`prefdyn.book.registry.Prediction`'s power
    curve between its no-effect value and ``hi``, with the registered test and threshold."""
    symbol, threshold = prediction.comparison
    lo = prediction.no_effect
    if pass_probability(prediction.test, n, hi, symbol, threshold) < power:
        return math.inf
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pass_probability(prediction.test, n, mid, symbol, threshold) < power else (lo, mid)
    return hi


def failure_reading(status: str, effect: float, power: float, detectable: float, sd: float) -> str:
    """What the outcome of a ``mean_lower_bound`` prediction of a gain says, as a sentence for the
    page: detected; not detected although an effect of the registered size ``effect`` (standard
    deviations) would have been detected with probability ``power``, with ``detectable`` the
    smallest effect detected with probability 0.8 (also in raw units, times ``sd``); or, for an
    inadequate test, evidence neither way."""
    if status == "reproduced":
        return "The gain is detected: the lower end of its interval lies above zero."
    if status == "not reproduced":
        return (f"Not detected. At this size a gain of the registered effect (d = {effect:g}) would have "
                f"been detected with probability {power:.2f}, so a gain that large is unlikely here. A gain "
                f"below d = {detectable:.2f} standard deviations of the per-prompt gain (about {detectable * sd:.3f} "
                "in golden-score units) is detected with probability under 0.8: it may be there and not be "
                "seen, so not detected is not the same as not there.")
    return f"The test is {status} at this size (power {power:.2f} at the registered effect): evidence neither way."
