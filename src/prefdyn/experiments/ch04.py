"""Chapter 4's drivers: the exact (tabular) checks of iterated IPO and DPO, the paper's experiment on
score-built matrices, and the real-model experiment, iterated on-policy IPO and DPO on single-token
candidates.

The exact part draws random preference matrices (:func:`random_preferences`,
:func:`random_condorcet_preferences`, :func:`random_transitive_preferences`), tests the ranking
propositions (:func:`fixed_sampler_failures`, :func:`condorcet_success`, :func:`smith_success`) and
scans the phase diagram of the iterated map (:func:`oscillation_scan`) against a boundary outside
the band the run cannot resolve (:func:`band_width`, :func:`phase_agreement`). The paper's
experiment runs MRS-IPO over an ``(alpha, beta lam)`` grid on matrices built from score tables
(:func:`paper_regimes`, :func:`contraction_grid`, :func:`per_matrix_spearman`) and its finite-sample
runs (:func:`phase_averaging`). In the real-model part the model answers a prompt with one of ``K``
candidate tokens; restricted to them it is a tabular policy
(:func:`prefdyn.llm.logps.candidate_logps`), so every round of on-policy alignment can be held
against the map of :mod:`prefdyn.theory.iterative`. :func:`prepare_task` warm-starts the model
(:func:`warm_start`) to the initial policy ``pi_0``, :func:`run_rounds` runs the rounds
(:func:`on_policy_rounds`, sampling with :func:`sample_first_tokens`) from it, and
:func:`classify_regime`, :func:`prompt_fixed_points`, :func:`population_rounds`,
:func:`fixed_point_tolerance` and :func:`rotation_expectation` say what the theory predicts.
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
from ..stats import rank_correlation
from ..datasets.prompts import load_prompts
from ..datasets.scores import generate_scores
from ..llm.features import FrozenPrefix
from ..llm.logps import candidate_logps
from ..llm.models import chat_prompt
from ..llm.train import train_candidate_table
from ..params import ParameterError, positive
from ..theory import iterative as it
from ..theory.iterative import minimise_newton, pair_counts, pair_table_loss

D = torch.float64


# --------------------------------------------------------------------------------------------------
# The exact world: random preferences, the one-shot sampler, the phase diagram
# --------------------------------------------------------------------------------------------------

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


def smith_success(P: Tensor) -> tuple[float, float, str]:
    """The chapter's prop-ch4-smith on a batch ``P`` (``(n, K, K)``, no ties): the share of matrices
    whose IPO optimum (uniform reference, ``beta = 1``) ranks every member of the Smith set above
    every non-member under the sampler of :func:`~prefdyn.theory.iterative.smith_sampler`, the same
    share under the uniform sampler, and the Smith set sizes met (``"size: count"``)."""
    K = P.shape[-1]
    uniform_ref = torch.full((K,), -math.log(K), dtype=D)

    def on_top(log_pi, S):
        rest = [j for j in range(K) if j not in S]
        return not rest or bool(log_pi[S].min() > log_pi[rest].max())

    ok, uniform_ok, sizes = [], [], {}
    for p in P:
        mu, S, _ = it.smith_sampler(p)
        ok.append(on_top(tabular.ipo_optimum(uniform_ref, p, mu, tau=1.0), S))
        uniform_ok.append(on_top(tabular.ipo_optimum(uniform_ref, p, uniform_ref.exp(), tau=1.0), S))
        sizes[len(S)] = sizes.get(len(S), 0) + 1
    return float(np.mean(ok)), float(np.mean(uniform_ok)), ", ".join(f"{k}: {v}" for k, v in sorted(sizes.items()))


def random_transitive_preferences(n: int, K: int, generator: torch.Generator) -> Tensor:
    """``n`` random transitive matrices: response ``i`` beats ``j > i`` with probability
    ``1/2 + A_ij``, ``A_ij`` uniform on ``(0, 1/2)``, so every pairwise majority follows the order
    ``0 > 1 > ... > K-1`` while the rows are dominated entrywise only by chance (the search of the
    chapter's prop-ch4-no-sampler)."""
    A = torch.triu(0.5 * torch.rand(n, K, K, generator=generator, dtype=D), 1)
    return 0.5 + A - A.transpose(-1, -2)


def fixed_sampler_failures(mus: Tensor, delta: float = 0.1) -> tuple[float, float]:
    """The chapter's prop-ch4-every-sampler for each sampler (rows of ``mus``): the counterexample
    :func:`~prefdyn.theory.iterative.condorcet_counterexample`, then ``(share of samplers whose
    counterexample has its Condorcet winner c beating every other response while the IPO optimum
    with a uniform reference ranks b above c, smallest ratio of the score gap (P mu)_b - (P mu)_c to
    its proved lower bound mu_a (1/2 - delta) / 2)`` (the proposition: 1 and at least 1)."""
    ok, ratios = [], []
    for mu in mus:
        P, c, b = it.condorcet_counterexample(mu, delta)
        K = len(mu)
        log_pi = tabular.ipo_optimum(torch.full((K,), -math.log(K), dtype=D), P, mu, tau=1.0)
        winner = all(bool(P[c, j] > 0.5) for j in range(K) if j != c)
        ok.append(winner and bool(log_pi[b] > log_pi[c]))
        gap = float((P @ mu)[b] - (P @ mu)[c])
        ratios.append(gap / (float(mu.max()) * (0.5 - delta) / 2))
    return float(np.mean(ok)), float(min(ratios))


def band_width(rounds: int) -> float:
    """Half-width ``w`` of the band ``|index - 1| <= w`` around a phase boundary that
    :func:`oscillation_scan` cannot resolve in ``rounds`` rounds. Near the uniform fixed point the
    linearised orbit is a scaled rotation, ``|pi_t - u| = rho^t |pi_0 - u|`` with ``rho^2`` the
    index, so the oscillation ratio is ``rho^(T/2) = index^(T/4)``; a cell with
    ``index <= 1 - w`` has ratio at most ``1/2``, well below the cut ``0.9``: ``w = 1 - 2^(-4/T)``."""
    return 1 - 0.5 ** (4 / rounds)


def phase_agreement(ratio: np.ndarray, index: np.ndarray, band: float) -> tuple[float, int]:
    """Cells outside the band ``|index - 1| <= band``: the share whose simulated oscillation
    (``ratio >= 0.9``, :func:`oscillation_scan`) agrees with the theory's ``index > 1``, and how many
    disagree. A wrong boundary (another ``index``) shows as disagreeing cells."""
    outside = np.abs(index - 1) > band
    agree = (np.asarray(ratio) >= 0.9) == (index > 1)
    return float(agree[outside].mean()), int((~agree & outside).sum())


# --------------------------------------------------------------------------------------------------
# The paper's experiment: regimes over (alpha, beta lam) on score-built matrices, finite samples
# --------------------------------------------------------------------------------------------------

def tie_share(P: Tensor) -> float:
    """The share of matrices (``(n, K, K)``) with at least one tie ``P[i, j] = 1/2`` off the diagonal."""
    off = ~torch.eye(P.shape[-1], dtype=torch.bool)
    return float((P[:, off] == 0.5).any(-1).double().mean())


def similarity_effect(n_prompts: int, seed: int, shares: Sequence[float] = (0.0, 0.3, 0.6)) -> str:
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


def contraction_grid(P: Tensor, alphas: Tensor, beta_lams: Tensor) -> Tensor:
    """The contraction factor ``alpha + (beta lam / 2) ||P - 11^T/2||_2`` of the chapter's
    thm-ch4-contraction for every cell and matrix, shape ``(len(alphas), len(beta_lams), n)``."""
    norm = torch.linalg.matrix_norm(P - 0.5, ord=2)
    return alphas[:, None, None] + beta_lams[None, :, None] * norm[None, None, :] / 2


def paper_regimes(P: Tensor, alphas: Tensor, beta_lams: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """The paper's protocol on matrices ``P`` (``(n, K, K)``): MRS-IPO (eq-ch4-map) fully on-policy
    (``lam = 1``, so ``beta lam = beta``), reference and start uniform, for every cell
    ``(alphas[i], beta_lams[j])`` and ``iterations`` rounds, all cells and matrices in one batch.
    Returns the cycle strength (:func:`~prefdyn.theory.iterative.cycle_strength` over the second half
    of the rounds, accumulated as they run) and the final entropy, each ``(len(alphas), len(beta_lams), n)``."""
    n, K = P.shape[0], P.shape[-1]
    cells = torch.cartesian_prod(alphas, beta_lams).repeat_interleave(n, 0)   # cell-major, then matrix
    Pb = P.repeat(len(cells) // n, 1, 1)
    u = torch.full((len(cells), K), -math.log(K), dtype=D)
    z, s1, s2 = u, torch.zeros_like(u), torch.zeros_like(u)
    kept = iterations - iterations // 2
    for t in range(1, iterations + 1):
        z = it.mrs_ipo_step(z, u, u.exp(), Pb, cells[:, :1], cells[:, 1:], 1.0)
        if t > iterations // 2:
            s1, s2 = s1 + z.exp(), s2 + z.exp() ** 2
    strength = (s2 / kept - (s1 / kept) ** 2).clamp_min(0).mean(-1)
    shape = (len(alphas), len(beta_lams), n)
    return strength.reshape(shape), it.entropy(z).reshape(shape)


def per_matrix_spearman(x: Tensor, y: Tensor) -> np.ndarray:
    """Spearman correlation over the grid cells (the first two axes) between ``x`` and ``y``
    (``(n_alpha, n_beta, n)``), one per matrix (last axis); ties get average ranks
    (:func:`prefdyn.stats.rank_correlation`)."""
    from scipy.stats import rankdata

    flat = [v.reshape(-1, v.shape[-1]).T.numpy() for v in (x, y)]
    return rank_correlation(rankdata(flat[0], axis=1), rankdata(flat[1], axis=1))


def phase_averaging(P: Tensor, alpha: Tensor, beta_lam: Tensor, n_samples: int, iterations: int,
                    replicates: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's finite-sample runs: ``replicates`` runs of the sampled map
    (:func:`~prefdyn.theory.iterative.sampled_rounds`, fully on-policy, ``n_samples`` draws a round,
    start and reference uniform) on each matrix ``P[m]`` at its own cell ``(alpha[m], beta_lam[m])``
    (shape ``(n, 1)`` each). Returns the trajectories ``(iterations+1, replicates, n, K)``, the mean
    over runs of each run's cycle strength (second half) and the cycle strength of the run-averaged
    trajectory, ``(n,)`` each. The second is never larger (the variance of an average is at most the
    average variance)."""
    n, K = P.shape[0], P.shape[-1]
    u = torch.full((n, K), -math.log(K), dtype=D)
    traj = it.sampled_rounds(u, P, alpha, beta_lam, 1.0, n_samples, iterations, replicates, generator)
    tail = traj[iterations // 2:]
    single = it.cycle_strength(tail).mean(0)
    averaged = it.cycle_strength(tail.exp().mean(1).log())
    return traj, single, averaged


# --------------------------------------------------------------------------------------------------
# The real model restricted to candidates
# --------------------------------------------------------------------------------------------------

def trainable_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """Copies of the weights that train (``requires_grad``), by name: what
    ``model.load_state_dict(state, strict=False)`` restores."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


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
                     steps: int, lr: float, seed: int, prefix: FrozenPrefix | None = None,
                     soft_labels: bool = True) -> dict:
    """Iterated on-policy IPO/DPO on a language model, restricted to single-token candidates.

    Each round ``t``: draw ``round(lam n_samples)`` candidates per prompt from the current model by
    rejection sampling of its first answer token (:func:`sample_first_tokens`, from
    ``np.random.default_rng(seed)``; the acceptance rate is recorded) and ``n_samples`` minus that
    many from the fixed ``offline`` pool, uniformly; compare all
    pairs of kept samples with the oracle ``P`` (:func:`~prefdyn.theory.iterative.pair_counts`, expected labels when
    ``soft_labels``); set the reference to
    ``alpha log p_t + (1-alpha) log p_0`` (the geometric mixture: normalisers cancel in the loss);
    train the trainable weights for ``steps`` full-batch steps of the one training loop
    (:func:`prefdyn.llm.train.train_candidate_table`) on :func:`~prefdyn.theory.iterative.pair_table_loss`
    (on the ``prefix`` cache when given: only the top blocks train). The tabular prediction of the
    round is the minimiser of the same loss over free logits started at the model's
    (:func:`~prefdyn.theory.iterative.minimise_newton`).

    Returns arrays over rounds: restricted log-policies ``log_pi`` (``rounds+1, prompts, K``), the
    predicted ``log_pred`` (``rounds, prompts, K``), the acceptance rate, the losses."""
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
        on, accepted = sample_first_tokens(ell_t, n_on, rng) if n_on else ([[] for _ in prompts], float("nan"))
        off = [list(rng.choice(np.asarray(pool), n_samples - n_on)) if n_samples > n_on else [] for pool in offline]
        kept.append(accepted)
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


def fixed_point_tolerance(log_pi0: Tensor, P: Tensor, alpha: float, beta: float, lam: float, n_samples: int,
                          rounds: int, replicates: int, seed: int, level: float = 0.95) -> Tensor:
    """Per prompt, how far from its fixed point (:func:`prompt_fixed_points`) the sampling noise alone
    leaves a run of ``rounds`` rounds from that prompt's ``pi_0``: the ``level`` quantile over
    ``replicates`` runs of the sampled map (:func:`~prefdyn.theory.iterative.sampled_rounds`, the
    run's ``lam`` and ``n_samples``, uniform offline pool) of the final total variation to the fixed
    point. A model that follows the tabular minimiser exactly ends within it with probability ``level``."""
    fixed = prompt_fixed_points(log_pi0, P, alpha, beta, lam)
    traj = it.sampled_rounds(log_pi0, P, alpha, beta, lam, n_samples, rounds, replicates,
                             torch.Generator().manual_seed(seed))
    return torch.quantile(it.total_variation(traj[-1], fixed), level, dim=0)


def rotation_expectation(log_pi0: Tensor, P: Tensor, rotation: Sequence[float], lam: float, n_samples: int,
                         rounds: int, replicates: int, seed: int) -> Tensor:
    """Per prompt, the probability under the sampled map (:func:`~prefdyn.theory.iterative.sampled_rounds`
    from that prompt's ``pi_0``, ``replicates`` runs of each) that the run with the unstable alpha of
    ``rotation = (stable alpha, unstable alpha, beta)`` makes a full cyclic turn of its clear leader
    (:func:`~prefdyn.theory.iterative.cyclic_advances` ``>= 3``) and an independent run with the stable
    alpha does not: what the theory with sampling noise expects of the real-model rotation pair."""
    g = torch.Generator().manual_seed(seed)
    turned = [it.cyclic_advances(it.sampled_rounds(log_pi0, P, al, rotation[2], lam, n_samples, rounds,
                                                   replicates, g), P) >= 3 for al in rotation[:2]]
    return (turned[1] & ~turned[0]).double().mean(0)


def ratio_comparison(P: Tensor, alpha: float, lams: Tensor, ratios: Tensor) -> tuple[Tensor, Tensor]:
    """Entropies of fixed points (:func:`~prefdyn.theory.iterative.fixed_point`, uniform reference and
    offline sampler) for every on-policy share in ``lams`` and value in ``ratios``: once with the
    paper's ratio ``kappa = beta lam / (1 - alpha)`` equal to the value (``beta = value (1 - alpha) / lam``),
    once with ``beta / (1 - alpha)`` equal to it. Two tensors ``(len(lams), len(ratios))``."""
    K = P.shape[-1]
    lam_ = lams[:, None].expand(len(lams), len(ratios)).reshape(-1, 1)
    val = ratios[None, :].expand(len(lams), len(ratios)).reshape(-1, 1)
    u = torch.full((len(val), K), -math.log(K), dtype=D)
    out = []
    for beta in (val * (1 - alpha) / lam_, val * (1 - alpha)):
        z = it.fixed_point(u, u[0].exp(), P, alpha, beta, lam_, iters=20000, tol=1e-11)
        out.append(it.entropy(z).reshape(len(lams), len(ratios)))
    return out[0], out[1]


def entropy_path_word(H: Tensor) -> str:
    """How an entropy path moves before it starts to fall at every round (``H``: rounds ``0..t``,
    the last being the first of the falling ones), as a phrase: whether and how far it rose first."""
    peak = int(H.argmax())
    if len(H) == 1:
        return "falls from the first round on"
    if peak > 0:
        return f"rises first, from {H[0]:.2f} to {H[peak]:.2f} nats (round {peak})"
    return f"does not rise, though it does not fall at every round either (from {H[0]:.2f} nats)"


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
