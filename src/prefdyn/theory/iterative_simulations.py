"""Simulations of the iterated maps of :mod:`prefdyn.theory.iterative`: what chapter 4 computes
without a language model.

* Random preference matrices (:func:`random_preferences`, :func:`random_condorcet_preferences`,
  :func:`random_transitive_preferences`) and how often the one-shot ranking propositions hold on them
  (:func:`fixed_sampler_failures`, :func:`condorcet_success`, :func:`smith_success`).
* The phase diagram of the iterated map (:func:`oscillation_scan`) against a boundary, outside the
  band a run of given length cannot resolve (:func:`band_width`, :func:`phase_agreement`).
* The paper's experiment: MRS-IPO over an ``(alpha, beta lam)`` grid on score-built matrices
  (:func:`paper_regimes`, :func:`contraction_grid`, :func:`per_matrix_spearman`, with the cells no
  theorem of the chapter decides: :func:`unforced_entropy_cells`), and its finite-sample runs
  (:func:`phase_averaging`).
* Skewed sampling (:func:`gap_change`, :func:`tilt_differences`, :func:`on_policy_entropy_change`) and
  DPO's sampler dependence (:func:`dpo_sampler_spread`, :func:`bradley_terry_departure`).
* What the theory predicts for the real-model rounds from a given ``pi_0``: fixed points
  (:func:`prompt_fixed_points`), the population map (:func:`population_rounds`), the distance the
  sampling noise leaves (:func:`fixed_point_tolerance`), the rotation (:func:`rotation_expectation`)
  and the regime a parameter choice is in (:func:`classify_regime`), how far the rounds force the
  oracle's order (:func:`forced_order_margin`); and the ratio that governs
  concentration (:func:`ratio_comparison`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import tabular
from . import iterative as it

D = torch.float64


# --------------------------------------------------------------------------------------------------
# Random preferences and the one-shot ranking propositions
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


def random_transitive_preferences(n: int, K: int, generator: torch.Generator) -> Tensor:
    """``n`` random transitive matrices: response ``i`` beats ``j > i`` with probability
    ``1/2 + A_ij``, ``A_ij`` uniform on ``(0, 1/2)``, so every pairwise majority follows the order
    ``0 > 1 > ... > K-1`` while the rows are dominated entrywise only by chance (the search of the
    chapter's prop-ch4-no-sampler)."""
    A = torch.triu(0.5 * torch.rand(n, K, K, generator=generator, dtype=D), 1)
    return 0.5 + A - A.transpose(-1, -2)


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
    top = tabular.ipo_optimum(uniform_ref, P, mu_eta, beta=1.0).argmax(-1)
    uniform_top = tabular.ipo_optimum(uniform_ref, P, torch.full((n, K), 1 / K, dtype=D), beta=1.0).argmax(-1)
    return (top == 0).double().mean().item(), (uniform_top == 0).double().mean().item()


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
        ok.append(on_top(tabular.ipo_optimum(uniform_ref, p, mu, beta=1.0), S))
        uniform_ok.append(on_top(tabular.ipo_optimum(uniform_ref, p, uniform_ref.exp(), beta=1.0), S))
        sizes[len(S)] = sizes.get(len(S), 0) + 1
    return float(np.mean(ok)), float(np.mean(uniform_ok)), ", ".join(f"{k}: {v}" for k, v in sorted(sizes.items()))


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
        log_pi = tabular.ipo_optimum(torch.full((K,), -math.log(K), dtype=D), P, mu, beta=1.0)
        winner = all(bool(P[c, j] > 0.5) for j in range(K) if j != c)
        ok.append(winner and bool(log_pi[b] > log_pi[c]))
        gap = float((P @ mu)[b] - (P @ mu)[c])
        ratios.append(gap / (float(mu.max()) * (0.5 - delta) / 2))
    return float(np.mean(ok)), float(min(ratios))


# --------------------------------------------------------------------------------------------------
# The phase diagram
# --------------------------------------------------------------------------------------------------

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


def per_matrix_spearman(x: Tensor, y: Tensor, mask: Tensor | None = None) -> np.ndarray:
    """Spearman correlation over the grid cells (the first two axes) between ``x`` and ``y``
    (``(n_alpha, n_beta, n)``), one per matrix (last axis), over the cells where ``mask`` (same
    shape; default all) holds; ties get average ranks (:func:`prefdyn.stats.spearman`). NaN for a
    matrix with fewer than 3 such cells or a constant side."""
    from ..stats import spearman

    mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.expand_as(x)
    out = np.full(x.shape[-1], np.nan)
    for m in range(x.shape[-1]):
        keep = mask[..., m]
        if int(keep.sum()) >= 3:
            out[m] = spearman(x[..., m][keep].numpy(), y[..., m][keep].numpy())
    return out


def unforced_entropy_cells(P: Tensor, alphas: Tensor, beta_lams: Tensor) -> Tensor:
    """The cells of the ``(alphas, beta_lams)`` grid (fully on-policy, uniform reference) where no
    theorem of chapter 4 decides the final entropy, per strongly transitive matrix ``P[m]``
    (``(len(alphas), len(beta_lams), n)``): ``alpha < 1`` (at ``alpha = 1`` part 1 of thm-ch4-collapse
    sends a strictly dominated response's mass to 0) and a fixed-point bound of part 2
    (:func:`~prefdyn.theory.iterative.entropy_upper_bound` of ``kappa delta``, ``kappa =
    beta lam/(1 - alpha)``, ``delta`` the margins of the response whose row dominates, found as the
    largest row sum) that says nothing (``log K``)."""
    K = P.shape[-1]
    top = P.sum(-1).argmax(-1)
    delta = torch.stack([it.transitivity_margins(P[m], int(top[m])) for m in range(len(P))])   # (n, K)
    others = delta[torch.arange(K)[None, :] != top[:, None]].reshape(len(P), K - 1)
    finite = alphas < 1
    kappa = beta_lams[None, :] / (1 - alphas[finite, None])                                   # (a', b)
    bound = it.entropy_upper_bound(kappa[..., None, None] * others)                            # (a', b, n)
    out = torch.zeros(len(alphas), len(beta_lams), len(P), dtype=torch.bool)
    out[finite] = bound >= math.log(K) - 1e-12
    return out


def phase_averaging(P: Tensor, alpha: Tensor, beta_lam: Tensor, n_samples: int, iterations: int,
                    replicates: int, generator: torch.Generator,
                    rounds: Callable[..., Tensor] = it.plugin_rounds) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's finite-sample runs: ``replicates`` runs of a finite-sample map (``rounds``: the
    paper's plug-in map :func:`~prefdyn.theory.iterative.plugin_rounds`, or the sampled-loss map
    :func:`~prefdyn.theory.iterative.sampled_rounds`; fully on-policy, ``n_samples`` draws a
    round, start and reference uniform) on each matrix ``P[m]`` at its own cell ``(alpha[m],
    beta_lam[m])`` (shape ``(n, 1)`` each). Returns the trajectories ``(iterations+1, replicates, n,
    K)``, the mean over runs of each run's cycle strength (second half) and the cycle strength of the
    run-averaged trajectory, ``(n,)`` each. The second is never larger (the variance of an average
    is at most the average variance)."""
    n, K = P.shape[0], P.shape[-1]
    u = torch.full((n, K), -math.log(K), dtype=D)
    traj = rounds(u, P, alpha, beta_lam, 1.0, n_samples, iterations, replicates, generator)
    tail = traj[iterations // 2:]
    single = it.cycle_strength(tail).mean(0)
    averaged = it.cycle_strength(tail.exp().mean(1).log())
    return traj, single, averaged



# --------------------------------------------------------------------------------------------------
# Skewed sampling and DPO's sampler dependence
# --------------------------------------------------------------------------------------------------

def gap_change(P: Tensor, mu: Tensor, mu_new: Tensor, beta: float) -> Tensor:
    """How moving the sampler from ``mu`` to ``mu_new`` changes every log-odds of the IPO optimum
    (prop-ch4-gaps): ``G[..., i, j] = beta <mu_new - mu, P[i] - P[j]>`` (the reference cancels)."""
    s = P @ (mu_new - mu)[..., None]
    return beta * (s - s.transpose(-1, -2))


def tilt_differences(P: Tensor, mu: Tensor, mu_new: Tensor, order: Sequence[int], beta: float) -> Tensor:
    """:func:`gap_change` by summation by parts along ``order`` (best first): with ``F_m`` the mass
    ``mu`` puts on the first ``m`` responses of the order and ``d = P[i] - P[j]`` read along it,
    ``<mu_new - mu, d> = sum_{m < K} (F_new_m - F_m)(d_m - d_{m+1})`` (``F_K`` is 1 for both). So
    every sampler that moves mass toward the top (``F_new >= F``) widens the gap of ``i`` over ``j``
    whenever ``i``'s advantage ``d`` does not grow against weaker opponents (prop-ch4-skew)."""
    o = list(order)
    dF = (torch.cumsum(mu_new[..., o], -1) - torch.cumsum(mu[..., o], -1))[..., :-1]     # (..., K-1)
    d = P[..., :, None, o] - P[..., None, :, o]                                              # (..., K, K, K)
    return beta * (dF[..., None, None, :] * (d[..., :-1] - d[..., 1:])).sum(-1)


def on_policy_entropy_change(P: Tensor, beta: float) -> Tensor:
    """``H(pi*(mu_on)) - H(pi*(u))`` per matrix (``(n, K, K)``): the IPO optimum (eq-ch4-ipo, uniform
    reference) for the on-policy sampler ``mu_on = pi*(u)``, the optimum the uniform sampler ``u``
    gives, against that optimum itself. Negative: sampling from the policy concentrated it."""
    n, K = P.shape[0], P.shape[-1]
    u = torch.full((n, K), 1.0 / K, dtype=P.dtype)
    first = tabular.ipo_optimum(u.log(), P, u, beta=beta)
    return it.entropy(tabular.ipo_optimum(u.log(), P, first.exp(), beta=beta)) - it.entropy(first)


def dpo_sampler_spread(P: Tensor, mus: Tensor, beta: float) -> Tensor:
    """Per matrix (``(n, K, K)``), the largest ``max_k |log pi*_mu(k) - log pi*_u(k)|`` over the
    samplers ``mus`` (``(S, K)``, full support) of DPO's population optimum
    (:func:`~prefdyn.theory.iterative.dpo_optimum`, uniform reference) against the uniform sampler's:
    zero for Bradley–Terry ``P`` (thm: sampler invariance), positive otherwise (prop-ch4-dpo-only-if)."""
    n, K = P.shape[0], P.shape[-1]
    ref = torch.full((n, K), -math.log(K), dtype=D)
    base = it.dpo_optimum(ref, P, ref.exp(), beta)
    return torch.stack([(it.dpo_optimum(ref, P, mu.expand(n, K), beta) - base).abs().amax(-1) for mu in mus]).amax(0)


def bradley_terry_departure(P: Tensor) -> Tensor:
    """Per matrix, ``max_ij |sigma(x_i - x_j) - P[i, j]|`` at DPO's optimum ``x`` (``beta = 1``) for the
    uniform sampler: zero iff ``P`` is Bradley–Terry (then ``x`` are its rewards), the quantity whose
    being non-zero makes the optimum move with the sampler (prop-ch4-dpo-only-if)."""
    n, K = P.shape[0], P.shape[-1]
    ref = torch.full((n, K), -math.log(K), dtype=D)
    x = it.dpo_optimum(ref, P, ref.exp(), 1.0)
    return (torch.sigmoid(x[..., :, None] - x[..., None, :]) - P).abs().amax((-2, -1))

# --------------------------------------------------------------------------------------------------
# What the theory predicts for rounds started at a given pi_0
# --------------------------------------------------------------------------------------------------

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


def forced_order_margin(log_pi0: Tensor, P: Tensor, beta: float, rounds: int) -> float:
    """The smallest ``L_ij(0) + rounds beta delta_ij`` over the rows of ``log_pi0`` (``(units, K)``) and
    the pairs the oracle orders (``P[i, j] > 1/2``), ``L_ij(0) = log pi_0(i)/pi_0(j)`` and
    ``delta`` :func:`~prefdyn.theory.iterative.pair_margins`: positive, the rounds at ``alpha = 1`` of
    the map force every such pair into the oracle's order (thm-ch4-collapse, part 1, for every pair)."""
    L0 = log_pi0[..., :, None] - log_pi0[..., None, :]
    margin = L0 + rounds * beta * it.pair_margins(P)
    return float(margin[..., P > 0.5].min())


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
