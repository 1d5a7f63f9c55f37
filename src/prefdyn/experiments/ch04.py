"""Chapter 4's drivers: iterated on-policy IPO and DPO on a real language model restricted to
single-token candidates, run on independent units, and the statistics its predictions read.

The mathematics the chapter computes without a model (random preferences, phase diagrams, the
paper's experiment on score-built matrices, finite samples, what the theory predicts from a given
``pi_0``) is in :mod:`prefdyn.theory.iterative_simulations`.

The real model answers a prompt with one of ``K`` candidate tokens; restricted to them it is a
tabular policy (:func:`prefdyn.llm.logps.candidate_logps`), so every round of on-policy alignment can
be held against the map of :mod:`prefdyn.theory.iterative`. A **unit** is one prompt of each task
with models of its own: for each task the trainable weights start from the base model's, are
warm-started on that prompt alone (:func:`prepare_task`, :func:`warm_start`) to the initial policy
``pi_0``, and every run of rounds (:func:`on_policy_rounds`, sampling with
:func:`sample_first_tokens`, each round's loss minimised with L-BFGS by
:func:`prefdyn.llm.train.fit_candidate_table`) starts from that warm start (:func:`run_unit`; weights
kept and restored with :func:`prefdyn.llm.models.kept_weights`). Units share no trained weight and
no random draw, so their outcomes are independent given the base model. :func:`stack_units` puts
the units' runs side by side; :func:`exceeds`, :func:`rotation_successes` and :func:`round_distance`
are the statistics of the registered predictions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import objectives
from ..datasets.prompts import load_prompts
from ..datasets.scores import generate_scores
from ..llm.features import FrozenPrefix
from ..llm.logps import candidate_logps
from ..llm.models import chat_prompt, kept_weights
from ..llm.train import fit_candidate_table, train_only_top_blocks
from ..params import ParameterError, positive
from ..theory import iterative as it
from ..theory.iterative import minimise_newton, pair_counts, pair_table_loss

D = torch.float64


def check_parameters(a_cyclic: float, lam: float, lam_rotation: float, rotation: Sequence[float]) -> None:
    """The chapter's own parameters, checked in its first cell: the cycle strength ``0 < a_cyclic <= 1/2``,
    the on-policy shares in ``(0, 1]`` and ``rotation = (stable alpha, unstable alpha, beta)`` with both
    alphas in ``[0, 1]`` and ``beta > 0``."""
    positive("a_cyclic", a_cyclic, float)
    if not (a_cyclic <= 0.5 and 0 < lam <= 1 and 0 < lam_rotation <= 1):
        raise ParameterError(f"need 0 < a_cyclic <= 1/2 and 0 < lam, lam_rotation <= 1 (got a_cyclic={a_cyclic}, "
                             f"lam={lam}, lam_rotation={lam_rotation})")
    if len(rotation) != 3 or not all(0 <= x <= 1 for x in rotation[:2]) or not rotation[2] > 0:
        raise ParameterError(f"rotation={rotation!r} must be (stable alpha, unstable alpha, beta) with alphas in "
                             "[0, 1] and beta > 0")


def similarity_effect(n_prompts: int, seed: int, shares: Sequence[float] = (0.0, 0.5, 0.8)) -> str:
    """How the shares of cyclic and strongly transitive matrices move with the generator's
    ``prompt_share`` (how alike the responses to one prompt are), as a phrase for the chapter:
    tables of ``n_prompts`` prompts from :func:`prefdyn.datasets.scores.generate_scores` (``seed``),
    matrices by :func:`~prefdyn.theory.iterative.preference_matrices`."""
    parts = []
    for share in shares:
        table = generate_scores(n_prompts, prompt_share=share, seed=seed)
        P, _ = it.preference_matrices(table.scores, np.random.default_rng(seed))
        parts.append(f"{it.is_cyclic(P).double().mean():.1%} cyclic and "
                     f"{it.strongly_transitive(P).double().mean():.0%} strongly transitive at a shared "
                     f"variance of {share}")
    return "; ".join(parts)


def entropy_path_word(H: Tensor) -> str:
    """How an entropy path moves before it starts to fall at every round (``H``: rounds ``0..t``,
    the last being the first of the falling ones), as a phrase: whether and how far it rose first."""
    peak = int(H.argmax())
    if len(H) == 1:
        return "falls from the first round on"
    if peak > 0:
        return f"rises first, from {H[0]:.2f} to {H[peak]:.2f} nats (round {peak})"
    return f"does not rise, though it does not fall at every round either (from {H[0]:.2f} nats)"


# --------------------------------------------------------------------------------------------------
# The real model restricted to candidates
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rounds:
    """The sizes of one run of rounds: the on-policy share ``lam`` of the ``n_samples`` candidates
    drawn a round, the number of ``rounds``, and the L-BFGS ``iterations`` that minimise each round's
    loss."""
    lam: float
    rounds: int
    n_samples: int
    iterations: int


@dataclass(frozen=True)
class Setting:
    """One run of a unit: the ``task`` (``"rps"`` or ``"digits"``), the ``loss`` (``"ipo"`` or
    ``"dpo"``), the reference weight ``alpha``, ``beta`` (IPO's ``1/tau`` or DPO's beta) and its
    :class:`Rounds`."""
    task: str
    loss: str
    alpha: float
    beta: float
    sizes: Rounds


@dataclass(frozen=True)
class Task:
    """A candidate task: the prompt set, the candidate words (in the order of ``P``), the oracle
    ``P`` and the shares ``target`` the warm start aims at."""
    name: str
    words: tuple[str, ...]
    P: Tensor
    target: tuple[float, ...]


@dataclass
class CandidateTask:
    """A task on one prompt after its warm start: the chat-templated ``prompts`` (one), the
    ``candidate_ids`` (the first token of each candidate word), the oracle ``P``, the ``offline``
    pool of candidate indices (the sampler ``mu_0``, every candidate once: uniform), the top-block
    cache ``prefix``, the largest difference ``prefix_err`` between the cached and the full model's
    candidate log-probabilities and the probability ``mass`` the model puts on the candidates."""
    prompts: list[str]
    candidate_ids: list[int]
    P: Tensor
    offline: list[list[int]]
    prefix: FrozenPrefix | None
    prefix_err: float
    mass: float


def sample_first_tokens(logps: Tensor, n: int, rng: np.random.Generator) -> tuple[list[list[int]], float]:
    """Rejection sampling of ``n`` candidates per prompt from the model's first answer token.
    ``logps`` (``(prompts, K)``) are ``log p(first token = c_k | x)`` over the whole vocabulary
    (:func:`prefdyn.llm.logps.candidate_logps`), so a draw of the first token (of an ancestral sample
    of the response, without generating the rest) is candidate ``k`` with probability
    ``exp(logps[k])`` and another token with the rest. Drawing until ``n`` candidates are kept gives
    ``n`` independent draws from the restricted policy ``softmax(logps)``, after a number of other
    tokens that is negative binomial with success probability the candidate mass; both are drawn
    here directly. Returns the kept candidates' indices per prompt and the share of all draws that
    were candidates (the acceptance rate)."""
    p = logps.detach().double().cpu().exp().numpy()
    mass = np.clip(p.sum(-1), 1e-12, 1.0)
    kept = [rng.choice(p.shape[-1], size=n, p=row / row.sum()).tolist() for row in p]
    rejected = rng.negative_binomial(n, mass)
    return kept, float(n * len(p) / (n * len(p) + rejected.sum()))


def warm_start(policy, prompts: Sequence[str], candidate_ids: Sequence[int], target: Tensor, iterations: int,
               prefix: FrozenPrefix | None = None) -> list[float]:
    """Supervised fine-tuning of the trainable weights so that the model answers with a candidate, in
    proportions ``target`` (shape ``(K,)``): ``iterations`` of L-BFGS
    (:func:`prefdyn.llm.train.fit_candidate_table`) on the negative log-likelihood of the candidates
    weighted by ``target`` (:func:`prefdyn.objectives.sft_nll`), whose minimum puts all the mass on the
    candidates, in those proportions. The result is the initial policy ``pi_0`` of the iterations.
    Returns the losses."""
    target = target.to(torch.float32).to(policy.device)
    return fit_candidate_table(policy, prompts, candidate_ids,
                               lambda logps: (target * objectives.sft_nll(logps)).sum(-1),
                               iterations=iterations, prefix=prefix)


def on_policy_rounds(policy, task: CandidateTask, loss: str, alpha: float, beta: float, sizes: Rounds,
                     seed: Sequence[int] | int) -> dict:
    """Iterated on-policy IPO/DPO on a language model, restricted to single-token candidates.

    Each round ``t``: draw ``round(lam n_samples)`` candidates per prompt from the current model by
    rejection sampling of its first answer token (:func:`sample_first_tokens`, from
    ``np.random.default_rng(seed)``; the acceptance rate is recorded) and the rest from the task's
    offline pool, uniformly; compare all pairs of kept samples with the oracle ``P`` with expected
    labels (:func:`~prefdyn.theory.iterative.pair_counts`); set the reference to
    ``alpha log p_t + (1-alpha) log p_0`` (the geometric mixture: normalisers cancel in the loss);
    minimise the round's mean sampled loss (:func:`~prefdyn.theory.iterative.pair_table_loss`) over
    the trainable weights with ``iterations`` of L-BFGS (:func:`prefdyn.llm.train.fit_candidate_table`,
    on the top-block cache). The tabular prediction of the round is the minimiser of the same loss
    over free logits started at the model's (:func:`~prefdyn.theory.iterative.minimise_newton`).

    Returns arrays over rounds: restricted log-policies ``log_pi`` (``rounds+1, prompts, K``), the
    predicted ``log_pred`` (``rounds, prompts, K``), the acceptance rate ``kept``, and the loss at the
    start and the end of each round."""
    model, tok, dev = policy.model, policy.tokenizer, policy.device
    rng = np.random.default_rng(seed)
    prompts, ids = task.prompts, task.candidate_ids

    def logps():
        with torch.no_grad():
            return candidate_logps(model, tok, prompts, ids, dev, task.prefix).double().cpu()

    ell0 = ell_t = logps()
    log_pi, log_pred, kept, loss_before, loss_after = [F.log_softmax(ell0, -1)], [], [], [], []
    n_on = int(round(sizes.lam * sizes.n_samples))
    for _ in range(sizes.rounds):
        on, accepted = sample_first_tokens(ell_t, n_on, rng) if n_on else ([[] for _ in prompts], float("nan"))
        off = [list(rng.choice(np.asarray(pool), sizes.n_samples - n_on)) for pool in task.offline]
        kept.append(accepted)
        W = pair_counts([a + b for a, b in zip(on, off)], task.P, soft=True)
        ref = alpha * ell_t + (1 - alpha) * ell0
        pred = torch.stack([minimise_newton(lambda z, p=p: pair_table_loss(z[None], ref[p:p + 1], W[p:p + 1], loss, beta),
                                            F.log_softmax(ell_t[p], -1)) for p in range(len(prompts))])
        log_pred.append(F.log_softmax(pred, -1))
        ref_dev, W_dev = ref.float().to(dev), W.float().to(dev)
        losses = fit_candidate_table(policy, prompts, ids,
                                     lambda lp: pair_table_loss(lp, ref_dev, W_dev, loss, beta).reshape(1),
                                     iterations=sizes.iterations, prefix=task.prefix)
        ell_t = logps()
        loss_before.append(losses[0])
        loss_after.append(pair_table_loss(ell_t, ref, W, loss, beta).item())
        log_pi.append(F.log_softmax(ell_t, -1))
    return {"log_pi": torch.stack(log_pi), "log_pred": torch.stack(log_pred), "kept": np.array(kept),
            "loss_before": np.array(loss_before), "loss_after": np.array(loss_after)}


def prepare_task(policy, task: Task, prompt_index: int, *, top_blocks: int, warm_start_iterations: int
                 ) -> CandidateTask:
    """Warm-start (:func:`warm_start`) the model's trainable weights, in place, on the shipped
    prompt ``prompt_index`` of ``task`` (:func:`prefdyn.datasets.prompts.load_prompts`) to answer with
    the first tokens of its words in the shares ``task.target``: the initial policy ``pi_0``, which
    is also the fixed reference. Only the top ``top_blocks`` blocks train (already set by the
    caller), on a :class:`~prefdyn.llm.features.FrozenPrefix` of the prompt."""
    tok = policy.tokenizer
    shipped = load_prompts(task.name)
    if not 0 <= prompt_index < len(shipped):
        raise ParameterError(f"unit {prompt_index} needs prompt {prompt_index + 1} of {task.name!r}, which ships "
                             f"{len(shipped)}: use at most {len(shipped)} units")
    prompts = [chat_prompt(tok, shipped[prompt_index])]
    ids = [tok.encode(w, add_special_tokens=False)[0] for w in task.words]
    prefix = FrozenPrefix(policy.model, tok, prompts, top_blocks, policy.device)
    warm_start(policy, prompts, ids, torch.tensor(task.target), warm_start_iterations, prefix)
    with torch.no_grad():
        cached = candidate_logps(policy.model, tok, prompts, ids, policy.device, prefix)
        direct = candidate_logps(policy.model, tok, prompts, ids, policy.device)
    return CandidateTask(prompts=prompts, candidate_ids=ids, P=task.P, offline=[list(range(len(ids)))],
                         prefix=prefix, prefix_err=(cached - direct).abs().max().item(),
                         mass=direct.exp().sum().item())


def trained_modules(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The modules holding a weight that trains: what :func:`prefdyn.llm.models.kept_weights` must keep
    to restore everything training changes (a few megabytes, not the whole model)."""
    return torch.nn.ModuleList(m for m in model.modules()
                               if any(p.requires_grad for p in m.parameters(recurse=False)))


@dataclass(frozen=True)
class UnitConfig:
    """How a unit's models train: the top ``top_blocks`` blocks, warm-started with
    ``warm_start_iterations`` of L-BFGS."""
    top_blocks: int
    warm_start_iterations: int


def run_unit(policy, unit: int, tasks: dict[str, Task], settings: dict[tuple, Setting], config: UnitConfig,
             seed: int) -> tuple[dict[tuple, dict], dict[str, CandidateTask]]:
    """Every run of ``settings`` on unit ``unit``: for each task, the top blocks of the base model
    warm-started on the task's prompt ``unit`` (:func:`prepare_task`), then each of the task's runs
    (:func:`on_policy_rounds`, seeded by ``(seed, unit, run)``) from that warm start. The weights are
    restored after each run and after each task (:func:`prefdyn.llm.models.kept_weights`), so the model
    leaves as it came and no two units share a trained weight. Returns the runs by key and the
    prepared tasks."""
    model = policy.model
    runs, prepared = {}, {}
    for name, task in tasks.items():
        train_only_top_blocks(model, config.top_blocks)
        with kept_weights(trained_modules(model)):
            prepared[name] = prepare_task(policy, task, unit, top_blocks=config.top_blocks,
                                          warm_start_iterations=config.warm_start_iterations)
            for k, (key, s) in enumerate(settings.items()):
                if s.task != name:
                    continue
                with kept_weights(trained_modules(model)):
                    runs[key] = on_policy_rounds(policy, prepared[name], s.loss, s.alpha, s.beta, s.sizes,
                                                 seed=(seed, unit, k))
    model.requires_grad_(True)
    return runs, prepared


def stack_units(units: Sequence[dict[tuple, dict]]) -> dict[tuple, dict]:
    """The runs of several units side by side: for each key, ``log_pi`` ``(rounds+1, units, K)``,
    ``log_pred`` ``(rounds, units, K)``, ``kept`` ``(rounds, units)``."""
    keys = units[0].keys()
    return {k: {"log_pi": torch.cat([u[k]["log_pi"] for u in units], 1),
                "log_pred": torch.cat([u[k]["log_pred"] for u in units], 1),
                "kept": np.stack([u[k]["kept"] for u in units], 1)} for k in keys}


# --------------------------------------------------------------------------------------------------
# The statistics of the registered predictions
# --------------------------------------------------------------------------------------------------

def exceeds(larger, smaller) -> float:
    """The share of units whose value in ``larger`` is strictly above its value in ``smaller``: the
    statistic of the paired predictions (a sign test; in a world where the two runs of a unit are
    exchangeable each unit passes with probability 1/2)."""
    a, b = np.asarray(larger, float), np.asarray(smaller, float)
    return float(np.mean(a > b))


def rotation_successes(log_pi_unstable: Tensor, log_pi_stable: Tensor, P: Tensor) -> Tensor:
    """Per unit, whether the unstable run's clear leader makes a full cyclic turn
    (:func:`~prefdyn.theory.iterative.cyclic_advances` ``>= 3``) and the stable run's does not."""
    return (it.cyclic_advances(log_pi_unstable, P) >= 3) & (it.cyclic_advances(log_pi_stable, P) < 3)


def round_distance(runs: dict[tuple, dict], keys: Sequence[tuple]) -> float:
    """The mean total variation between the model after each round and the tabular minimiser of
    that round's sampled loss, over the runs ``keys``, their rounds and units: the registered
    positive control ("the rounds follow the map")."""
    return float(torch.cat([it.total_variation(runs[k]["log_pi"][1:], runs[k]["log_pred"]).flatten()
                            for k in keys]).mean())


def prompt_provenance(n_units: int) -> str:
    """Which prompts a run used, as a sentence for the chapter: the first ``n_units`` of the shipped
    rock–paper–scissors and digit prompts (:func:`prefdyn.datasets.prompts.load_prompts`), written
    for this book, one unit each."""
    shipped = {task: len(load_prompts(task)) for task in ("rps", "digits")}
    return (f"the first {n_units} of the {shipped['rps']} rock–paper–scissors prompts and the first {n_units} "
            f"of the {shipped['digits']} digit prompts, all written for this book, one of each per unit")


FINDING_ORDER = ("not reproduced", "inconclusive", "implied by", "reproduced")


def findings(checks) -> str:
    """The chapter's "What we found": one Markdown line per prediction among ``checks``
    (:class:`prefdyn.book.verify.Check`), its verdict first, then the claim, what was measured, the
    units and the positive control; not-reproduced and inconclusive ones first, then implied, then
    reproduced (the order of :data:`FINDING_ORDER`), each group in the chapter's order."""
    from ..book.verify import fmt, outcome

    preds = sorted((c for c in checks if c.kind == "prediction"),
                   key=lambda c: FINDING_ORDER.index(outcome(c.status)))
    lines = []
    for c in preds:
        p = c.prediction
        control = p.get("control")
        where = " (in simulation)" if p.get("setting") == "simulation" else ""
        lines.append(f"- **{c.status}**{where}: {c.claim}. Measured {fmt(c.observed)}, passes if {c.tolerance}, on "
                     f"{p['n']} {p['units']} (`{p['id']}`, version {p['version']})"
                     + (f"; control ({control['claim']}): {fmt(control['observed'])}, "
                        f"{'met' if control['passed'] else 'not met'}" if control else "") + ".")
    return "\n".join(lines) or "No prediction was checked in this run."
