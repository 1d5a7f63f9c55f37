"""Chapter 4's drivers: the exact (tabular) checks of iterated IPO and DPO, and the real-model
experiment, iterated on-policy IPO and DPO on single-token candidates.

The exact part draws random preference matrices (:func:`random_preferences`,
:func:`random_condorcet_preferences`), tests the instance-dependent sampler of the chapter's
prop-ch4-condorcet (:func:`condorcet_success`) and scans the phase diagram of the iterated map
(:func:`oscillation_scan`). In the real-model part the model answers a prompt with one of ``K``
candidate tokens; restricted to them it is a tabular policy
(:func:`prefdyn.llm.logps.candidate_logps`), so every round of on-policy alignment can be held
against the map of :mod:`prefdyn.theory.iterative`. :func:`prepare_task` warm-starts the model
(:func:`warm_start`) to the initial policy ``pi_0``, :func:`run_rounds` runs the rounds
(:func:`on_policy_rounds`) from it, and :func:`classify_regime`, :func:`prompt_fixed_points`,
:func:`population_rounds` and :func:`cycle_strength` say what the theory predicts and measure it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import objectives, tabular
from ..datasets.prompts import load_prompts
from ..llm.features import FrozenPrefix
from ..llm.logps import candidate_logps
from ..llm.models import chat_prompt
from ..llm.sampling import sample_responses
from ..llm.train import train_candidate_table
from ..theory import iterative as it
from ..theory.iterative import minimise_newton, pair_counts, pair_table_loss

D = torch.float64


# --------------------------------------------------------------------------------------------------
# The exact world: random preferences, the one-shot sampler, the phase diagram
# --------------------------------------------------------------------------------------------------

def random_preferences(n: int, K: int, generator: torch.Generator) -> Tensor:
    """``n`` random preference matrices ``P = 1/2 + (A - A^T)/2`` with ``A`` uniform on
    ``[-1/2, 1/2]^(K x K)`` (shape ``(n, K, K)``): ``P + P^T = 11^T`` as the chapter requires, and
    in general not Bradley–Terry. Draws ``n K K`` uniforms from ``generator``."""
    A = torch.rand(n, K, K, generator=generator, dtype=D) - 0.5
    return 0.5 + (A - A.transpose(-1, -2)) / 2


def random_condorcet_preferences(n: int, K: int, generator: torch.Generator) -> Tensor:
    """:func:`random_preferences` with response 0 made a Condorcet winner: ``P[0, j]`` uniform on
    ``[1/2, 1)`` for every ``j != 0`` (and ``P[j, 0] = 1 - P[0, j]``), the setting of the chapter's
    prop-ch4-condorcet."""
    P = random_preferences(n, K, generator)
    P[:, 0, 1:] = 0.5 + 0.5 * torch.rand(n, K - 1, generator=generator, dtype=D)
    P[:, 1:, 0] = 1 - P[:, 0, 1:]
    return P


def condorcet_success(P: Tensor) -> tuple[float, float]:
    """The chapter's prop-ch4-condorcet on a batch ``P`` (``(n, K, K)``) whose response 0 is a
    Condorcet winner with margin ``g = min_j (1/2 - P[j, 0])``: the share of matrices whose IPO
    optimum (eq-ch4-ipo, uniform reference, ``beta = 1``) puts response 0 on top under the
    instance-dependent sampler ``mu_eta = (1 - eta) delta_0 + eta u`` with ``eta = 0.9 g/(1+g)``
    (below the proposition's bound), and the same share under the uniform sampler ``u``."""
    n, K = P.shape[0], P.shape[-1]
    margin = (0.5 - P[:, 1:, 0]).min(-1).values
    eta = 0.9 * margin / (1 + margin)
    mu_eta = (1 - eta)[:, None] * F.one_hot(torch.zeros(n, dtype=torch.long), K).to(D) + eta[:, None] / K
    uniform_ref = torch.full((n, K), -math.log(K), dtype=D)
    top = tabular.ipo_optimum(uniform_ref, P, mu_eta, tau=1.0).argmax(-1)
    uniform_top = tabular.ipo_optimum(uniform_ref, P, torch.full((n, K), 1 / K, dtype=D), tau=1.0).argmax(-1)
    return (top == 0).double().mean().item(), (uniform_top == 0).double().mean().item()


def oscillation_scan(step: Callable[..., Tensor], log_pi0: Tensor, P: Tensor, alphas: Tensor, betas: Tensor,
                     rounds: int) -> Tensor:
    """The phase diagram of the chapter's thm-ch4-oscillation (IPO, ``step`` =
    :func:`~prefdyn.theory.iterative.mrs_ipo_step`) or thm-ch4-dpo-osc (``step`` =
    :func:`~prefdyn.theory.iterative.mrs_dpo_step`): for every cell ``(alphas[i], betas[j])`` the map
    eq-ch4-map, fully on-policy (``lam = 1``) with a uniform reference and offline sampler, is
    iterated ``rounds`` times from ``log_pi0``, all cells in one batch, and the oscillation ratio
    (:func:`~prefdyn.theory.iterative.oscillation_ratio`) around the uniform policy is returned,
    shape ``(len(alphas), len(betas))``."""
    K = P.shape[-1]
    u = torch.full((K,), -math.log(K), dtype=D)
    cells = torch.cartesian_prod(alphas, betas)                     # row i * len(betas) + j is (alphas[i], betas[j])
    traj = it.iterate(step, log_pi0.expand(len(cells), K), rounds, log_pi_ref=u, mu0=u.exp(), P=P,
                      alpha=cells[:, :1], beta=cells[:, 1:], lam=1.0)
    return it.oscillation_ratio(traj, u).reshape(len(alphas), len(betas))


# --------------------------------------------------------------------------------------------------
# The real model restricted to candidates
# --------------------------------------------------------------------------------------------------

def trainable_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """Copies of the weights that train (``requires_grad``), by name: what
    ``model.load_state_dict(state, strict=False)`` restores."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def assign_candidates(tokenizer, texts: Sequence[str], candidate_ids: Sequence[int]) -> list[int]:
    """Index of the candidate whose token a sampled text starts with (re-tokenised), else ``-1``.

    Sampling a response and keeping those whose first token is a candidate is rejection sampling
    from the restricted policy ``softmax(candidate_logps)``: the kept samples follow it exactly."""
    index = {int(c): k for k, c in enumerate(candidate_ids)}
    out = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        out.append(index.get(ids[0], -1) if ids else -1)
    return out


def warm_start(policy, prompts: Sequence[str], candidate_ids: Sequence[int], target: Tensor, steps: int,
               lr: float, prefix: FrozenPrefix | None = None) -> list[float]:
    """Supervised fine-tuning (:func:`prefdyn.objectives.sft_nll`, weighted by ``target``) of the
    trainable weights so that the model answers with a candidate, in proportions ``target``
    (shape ``(K,)``): the initial policy ``pi_0`` of the iterations. Returns the losses."""
    target = target.to(torch.float32).to(policy.device)
    return train_candidate_table(policy, prompts, candidate_ids,
                                 lambda logps: (target * objectives.sft_nll(logps)).sum(-1),
                                 steps=steps, lr=lr, prefix=prefix)


def on_policy_rounds(policy, prompts: Sequence[str], candidate_ids: Sequence[int], P: Tensor, offline: Sequence[Sequence[int]],
                     *, loss: str, alpha: float, beta: float, lam: float, rounds: int, n_samples: int,
                     steps: int, lr: float, seed: int, max_new_tokens: int, prefix: FrozenPrefix | None = None,
                     soft_labels: bool = True) -> dict:
    """Iterated on-policy IPO/DPO on a language model, restricted to single-token candidates.

    Each round ``t``: sample ``round(lam n_samples)`` responses per prompt from the current model
    (:func:`prefdyn.llm.sampling.sample_responses`, seeded, cached by weights) and ``n_samples`` minus
    that many from the fixed ``offline`` pool (candidate indices drawn from ``pi_0``); compare all
    pairs of kept samples with the oracle ``P`` (:func:`~prefdyn.theory.iterative.pair_counts`, expected labels when
    ``soft_labels``); set the reference to
    ``alpha log p_t + (1-alpha) log p_0`` (the geometric mixture: normalisers cancel in the loss);
    train the trainable weights for ``steps`` full-batch steps of the one training loop
    (:func:`prefdyn.llm.train.train_candidate_table`) on :func:`~prefdyn.theory.iterative.pair_table_loss`
    (on the ``prefix`` cache when given: only the top blocks train). The tabular prediction of the
    round is the minimiser of the same loss over free logits started at the model's
    (:func:`~prefdyn.theory.iterative.minimise_newton`).

    Returns arrays over rounds: restricted log-policies ``log_pi`` (``rounds+1, prompts, K``), the
    predicted ``log_pred`` (``rounds, prompts, K``), the kept-sample rate, the losses."""
    model, tok, dev = policy.model, policy.tokenizer, policy.device
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        ell0 = candidate_logps(model, tok, prompts, candidate_ids, dev, prefix).double().cpu()
    log_pi = [F.log_softmax(ell0, -1)]
    log_pred, kept, loss_before, loss_after = [], [], [], []
    n_on = int(round(lam * n_samples))
    for t in range(rounds):
        with torch.no_grad():
            ell_t = candidate_logps(model, tok, prompts, candidate_ids, dev, prefix).double().cpu()
        on = [assign_candidates(tok, s, candidate_ids) for s in
              sample_responses(policy, prompts, n_on, max_new_tokens=max_new_tokens, seed=seed * 1000 + t)] \
            if n_on else [[] for _ in prompts]
        off = [list(rng.choice(np.asarray(pool), n_samples - n_on)) if n_samples > n_on else [] for pool in offline]
        kept.append(float(np.mean([x >= 0 for row in on for x in row])) if n_on else float("nan"))
        W = pair_counts([a + b for a, b in zip(on, off)], P, rng, soft=soft_labels)
        ref = alpha * ell_t + (1 - alpha) * ell0
        pred = torch.stack([minimise_newton(lambda z, p=p: pair_table_loss(z[None], ref[p:p + 1], W[p:p + 1], loss, beta),
                                            F.log_softmax(ell_t[p], -1)) for p in range(len(prompts))])
        log_pred.append(F.log_softmax(pred, -1))
        ref_dev, W_dev = ref.float().to(dev), W.float().to(dev)
        losses = train_candidate_table(policy, prompts, candidate_ids,
                                       lambda logps: pair_table_loss(logps, ref_dev, W_dev, loss, beta).reshape(1),
                                       steps=steps, lr=lr, prefix=prefix)
        loss_before.append(losses[0])
        with torch.no_grad():
            ell_next = candidate_logps(model, tok, prompts, candidate_ids, dev, prefix)
            loss_after.append(pair_table_loss(ell_next, ref_dev, W_dev, loss, beta).item())
        log_pi.append(F.log_softmax(ell_next.double().cpu(), -1))
    return {"log_pi": torch.stack(log_pi), "log_pred": torch.stack(log_pred), "kept": np.array(kept),
            "loss_before": np.array(loss_before), "loss_after": np.array(loss_after)}


@dataclass
class CandidateTask:
    """One task of the real-model experiment after its warm start: the chat-templated ``prompts``,
    the ``candidate_ids`` (the first token of each candidate word), the oracle ``P``, the ``offline``
    pool of candidate indices per prompt (the sampler ``mu_0``), the top-block cache ``prefix``, the
    trainable weights ``state`` of ``pi_0``, the largest difference ``prefix_err`` between the
    cached and the full model's candidate log-probabilities, and the probability ``mass`` the model
    puts on the candidates, per prompt."""
    prompts: list[str]
    candidate_ids: list[int]
    P: Tensor
    offline: list[list[int]]
    prefix: FrozenPrefix | None
    state: dict[str, Tensor]
    prefix_err: float
    mass: Tensor


def prepare_task(policy, base_state: dict[str, Tensor], task: str, words: Sequence[str], P: Tensor,
                 target: Sequence[float], *, n_prompts: int, top_blocks: int, warm_start_steps: int,
                 lr: float) -> CandidateTask:
    """Reset the trainable weights to ``base_state`` and warm-start (:func:`warm_start`) the model on
    the first ``n_prompts`` shipped prompts of ``task`` (:func:`prefdyn.datasets.prompts.load_prompts`)
    to answer with the first tokens of ``words`` in the shares ``target``: the initial policy
    ``pi_0``, which is also the fixed reference. The offline pool holds every candidate once, so
    ``mu_0`` is uniform. Only the top ``top_blocks`` blocks train, on a
    :class:`~prefdyn.llm.features.FrozenPrefix` of the prompts (``0``: the full model)."""
    policy.model.load_state_dict(base_state, strict=False)
    tok = policy.tokenizer
    prompts = [chat_prompt(tok, q) for q in load_prompts(task)[:n_prompts]]
    ids = [tok.encode(w, add_special_tokens=False)[0] for w in words]
    prefix = FrozenPrefix(policy.model, tok, prompts, top_blocks, policy.device) if top_blocks else None
    warm_start(policy, prompts, ids, torch.tensor(target), warm_start_steps, lr, prefix)
    with torch.no_grad():
        cached = candidate_logps(policy.model, tok, prompts, ids, policy.device, prefix)
        direct = candidate_logps(policy.model, tok, prompts, ids, policy.device)
    return CandidateTask(prompts=prompts, candidate_ids=ids, P=P, offline=[list(range(len(ids)))] * len(prompts),
                         prefix=prefix, state=trainable_state(policy.model),
                         prefix_err=(cached - direct).abs().max().item(), mass=direct.exp().sum(-1))


def run_rounds(policy, task: CandidateTask, loss: str, alpha: float, beta: float, **rounds_kw) -> dict:
    """:func:`on_policy_rounds` of ``loss`` (``"ipo"`` or ``"dpo"``) with reference mixture ``alpha``
    and ``beta`` (IPO's ``1/tau``, or DPO's beta) on ``task``, started from its warm-start weights
    (restored first, so every run starts at the same ``pi_0``); ``rounds_kw`` are the remaining
    keywords of :func:`on_policy_rounds` (``lam``, ``rounds``, ``n_samples``, ...)."""
    policy.model.load_state_dict(task.state, strict=False)
    return on_policy_rounds(policy, task.prompts, task.candidate_ids, task.P, task.offline, loss=loss,
                            alpha=alpha, beta=beta, prefix=task.prefix, **rounds_kw)


def prompt_provenance(n_rps: int, n_digits: int) -> str:
    """Which prompts a run used, as a sentence for the chapter: the first ``n_rps`` and ``n_digits``
    of the shipped rock–paper–scissors and digit prompts (:func:`prefdyn.datasets.prompts.load_prompts`),
    written for this book."""
    shipped = {task: len(load_prompts(task)) for task in ("rps", "digits")}
    return (f"the first {n_rps} of the {shipped['rps']} rock–paper–scissors prompts and the first {n_digits} "
            f"of the {shipped['digits']} digit prompts, all written for this book")


def uniform_sampler(P: Tensor) -> Tensor:
    """The offline sampler ``mu_0`` of the real-model experiment: uniform over the candidates of ``P``."""
    return torch.full((P.shape[-1],), 1.0 / P.shape[-1], dtype=D)


def prompt_fixed_points(log_pi0: Tensor, P: Tensor, alpha: float, beta: float, lam: float) -> Tensor:
    """Per prompt (rows of ``log_pi0``, shape ``(prompts, K)``), the fixed point of the chapter's
    prop-ch4-fixed (:func:`~prefdyn.theory.iterative.fixed_point`) for reference ``pi_0`` of that
    prompt and the uniform offline sampler (:func:`uniform_sampler`); ``alpha < 1``."""
    return torch.stack([it.fixed_point(log_pi0[p], uniform_sampler(P), P, alpha, beta, lam)
                        for p in range(len(log_pi0))])


def population_rounds(loss: str, log_pi0: Tensor, P: Tensor, alpha: float, beta: float, lam: float,
                      rounds: int) -> Tensor:
    """The noise-free population map from the model's own ``pi_0``: eq-ch4-map
    (:func:`~prefdyn.theory.iterative.mrs_ipo_step`) for ``loss="ipo"``, its DPO analogue
    (:func:`~prefdyn.theory.iterative.mrs_dpo_step`) otherwise, iterated ``rounds`` times per prompt
    with reference ``pi_0`` and the uniform offline sampler. Shape ``(rounds+1, prompts, K)``."""
    step = it.mrs_ipo_step if loss == "ipo" else it.mrs_dpo_step
    return torch.stack([it.iterate(step, log_pi0[p], rounds, mu0=uniform_sampler(P), P=P, alpha=alpha, beta=beta,
                                   lam=lam) for p in range(len(log_pi0))], 1)


def classify_regime(loss: str, log_pi0: Tensor, P: Tensor, alpha: float, beta: float, lam: float,
                    a: float) -> tuple[float, float]:
    """What the theory says about a run: ``(contraction factor, spectral radius)``.

    IPO: the factor of the chapter's thm-ch4-contraction
    (:func:`~prefdyn.theory.iterative.contraction_factor`, below 1: a contraction) and, for
    ``alpha < 1``, the largest spectral radius over prompts of the map's Jacobian
    (:func:`~prefdyn.theory.iterative.quotient_jacobian`) at the fixed point of each prompt's own
    ``pi_0`` (:func:`prompt_fixed_points`; above 1: oscillation), ``nan`` at ``alpha = 1``.
    DPO (cyclic preferences of strength ``a``): no contraction bound (``nan``), and the modulus
    ``sqrt(alpha^2 + 16 a^2 lam^2 / (3 beta^2))`` of eq-ch4-dpo-ellipse at the uniform policy."""
    if loss == "dpo":
        return float("nan"), math.sqrt(float(it.dpo_oscillation_index(alpha, a, lam / beta)))
    c = it.contraction_factor(alpha, beta, lam, P)
    if alpha == 1:
        return c, float("nan")
    fixed = prompt_fixed_points(log_pi0, P, alpha, beta, lam)
    return c, max(it.spectral_radius(it.quotient_jacobian(z, P, alpha, beta, lam)) for z in fixed)


def cycle_strength(log_pi: Tensor) -> np.ndarray:
    """Per prompt, how much the restricted policy moves across rounds: the variance over rounds of
    ``pi_t(k)``, averaged over candidates ``k`` (``log_pi`` of shape ``(rounds+1, prompts, K)``)."""
    return log_pi.exp().var(0, unbiased=False).mean(-1).numpy()
