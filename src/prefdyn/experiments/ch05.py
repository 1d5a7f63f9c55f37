"""Chapter 5's experiments: alignment from demonstrations on the Gaussian toy and on a real model.

The toy's one helper is :func:`valley_mass` (mass-covering against mode-seeking). On the language
model, :func:`draw` samples a policy, :func:`response_features` gives the reward models' input,
:func:`flatten` lays per-prompt samples out one row per response, :func:`balanced_fit` fits the
paper's discriminators, :func:`per_prompt_accuracy` scores them on held-out prompts, and
:func:`golden_scores` and :func:`component_rates` apply the book's golden criterion
(:func:`prefdyn.datasets.demonstrations.golden_score`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..datasets.demonstrations import Demonstration, golden_components, golden_score
from ..llm.features import embeddings
from ..llm.sampling import sample_responses
from ..theory.demonstrations import LogisticModel, fit_logistic

GOLDEN_PARTS = ("correct", "complete", "concise")


def valley_mass(x: Tensor, log_density: Tensor, half_width: float = 0.5) -> float:
    """``int_{|x| < half_width} q(x) dx`` for ``q = exp(log_density)`` on the grid ``x`` (trapezoid rule).

    The chapter's test of mass-covering against mode-seeking (prop-moment-matching and the remark
    after it): the forward-KL fit puts much of its mass in the valley between the two modes of
    ``p``, the reverse-KL fit almost none."""
    return torch.trapezoid(log_density.exp() * (x.abs() < half_width), x).item()


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
