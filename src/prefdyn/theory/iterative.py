r"""Iterative on-policy IPO and DPO: the sampler and the reference fed back from the policy.

The setting of Chen, He, Jordan & Yao (2026), "How Sampling Shapes LLM Alignment: From One-Shot
Optima to Iterative Dynamics", arXiv:2602.12180, as this book reconstructs it (the chapter
``ch04-ipo-sampling-iterative`` derives every formula and says which parts are reconstructions).
One prompt, ``K`` candidate responses, a tabular policy, a preference matrix ``P`` with
``P + P^T = 1`` (not necessarily Bradley–Terry), and the paper's notation ``beta = 1/tau`` for IPO.

* One-shot IPO optimum (Azar et al. 2023): ``pi* = softmax(log pi_ref + beta P mu)``, i.e.
  :func:`prefdyn.tabular.ipo_optimum` with ``tau = 1/beta``.
* The iterated map (the paper's MRS-IPO): the reference is the geometric mixture
  ``pi_ref_t ∝ pi_t^alpha pi_ref^(1-alpha)`` and the sampler the linear mixture
  ``mu_t = lam pi_t + (1 - lam) mu0``; then ``pi_{t+1}`` is the IPO optimum for that pair,

      log pi_{t+1} = log_softmax(alpha log pi_t + (1-alpha) log pi_ref + beta P mu_t).   (eq. MAP)

* Cyclic preferences ``P = 1/2 11^T + a C`` (``C`` the 3-cycle): the uniform policy is a fixed
  point whose linearisation has eigenvalues ``alpha ± i a beta lam / sqrt 3``
  (:func:`ipo_oscillation_index`); DPO's has ``alpha ± i 4 a lam / (sqrt 3 beta)``
  (:func:`dpo_oscillation_index`).
* Contraction (any ``P``): ``alpha + beta lam ||P - 11^T/2||_2 / 2 < 1`` (:func:`contraction_factor`).
* Collapse (strictly strongly transitive ``P``): log-odds of the top response grow by at least
  ``beta * delta_j`` per round at ``alpha = 1`` (:func:`transitivity_margins`), and the entropy is
  bounded by :func:`entropy_upper_bound`.

The last section holds what the real-model rounds need of the mathematics: oracle-labelled pair
counts among sampled candidates and the sampled pair loss (the drivers that train the model are in
:mod:`prefdyn.experiments.ch04`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import objectives, tabular

__all__ = [
    "cyclic_preferences", "mrs_ipo_step", "mrs_dpo_step", "dpo_optimum", "minimise_newton", "iterate",
    "fixed_point", "quotient_jacobian", "spectral_radius", "ipo_oscillation_index", "dpo_oscillation_index",
    "contraction_factor", "entropy", "oscillation_ratio", "transitivity_margins", "is_strongly_transitive",
    "entropy_upper_bound", "logit_gaps", "pair_counts", "pair_table_loss", "ranking_accuracy", "total_variation",
]


# --------------------------------------------------------------------------------------------------
# Preferences
# --------------------------------------------------------------------------------------------------

def cyclic_preferences(a: float, K: int = 3, dtype=torch.float64) -> Tensor:
    """``P = 11^T/2 + a C`` with ``C[i, i+1 mod K] = 1``, ``C[i+1 mod K, i] = -1`` (response ``i``
    beats ``i+1`` with probability ``1/2 + a``): rock–paper–scissors for ``K = 3``."""
    if not 0 <= a <= 0.5:
        raise ValueError(f"a={a} must lie in [0, 1/2] so that P is a probability")
    C = torch.zeros(K, K, dtype=dtype)
    for i in range(K):
        C[i, (i + 1) % K] += 1.0
        C[(i + 1) % K, i] -= 1.0
    return 0.5 + a * C


def is_strongly_transitive(P: Tensor, order: Sequence[int], strict: bool = False) -> bool:
    """Row dominance along ``order`` (best first): ``P[i, k] >= P[j, k]`` for all ``k`` whenever ``i``
    precedes ``j`` (``>`` when ``strict``)."""
    order = list(order)
    diff = P[order[:-1]] - P[order[1:]]      # adjacent rows suffice: dominance is transitive
    return bool((diff > 0).all()) if strict else bool((diff >= 0).all())


def transitivity_margins(P: Tensor, top: int) -> Tensor:
    """``delta_j = min_k (P[top, k] - P[j, k])`` for every ``j`` (``delta_top = 0``): the smallest
    advantage of the top response's row over row ``j``; all positive iff ``top`` strictly
    row-dominates every other response."""
    return (P[top][None, :] - P).min(dim=-1).values


def logit_gaps(log_pi_ref: Tensor, P: Tensor, mu: Tensor, beta: float) -> Tensor:
    """``G[i, j] = log pi*(i)/pi*(j) = log pi_ref(i)/pi_ref(j) + beta <mu, P[i] - P[j]>`` for the
    one-shot IPO optimum: the sampler enters every gap linearly, through ``<mu, d^{ij}>``."""
    s = P @ mu
    return (log_pi_ref[:, None] - log_pi_ref[None, :]) + beta * (s[:, None] - s[None, :])


# --------------------------------------------------------------------------------------------------
# One-shot optima and the iterated maps
# --------------------------------------------------------------------------------------------------

def _mixtures(log_pi: Tensor, log_pi_ref: Tensor, mu0: Tensor, alpha: float, lam: float) -> tuple[Tensor, Tensor]:
    a, l = torch.as_tensor(alpha), torch.as_tensor(lam)
    if not (0 <= a.min() and a.max() <= 1 and 0 <= l.min() and l.max() <= 1):
        raise ValueError(f"alpha={alpha} and lam={lam} must lie in [0, 1]")
    ref = F.log_softmax(alpha * log_pi + (1 - alpha) * log_pi_ref, dim=-1)   # pi_t^alpha pi_ref^(1-alpha), normalised
    mu = lam * log_pi.exp() + (1 - lam) * mu0
    return ref, mu


def mrs_ipo_step(log_pi: Tensor, log_pi_ref: Tensor, mu0: Tensor, P: Tensor, alpha, beta,
                 lam: float) -> Tensor:
    """One round of iterated IPO, (eq. MAP): the population IPO optimum
    (:func:`prefdyn.tabular.ipo_optimum`, ``tau = 1/beta``) for the reference
    ``∝ pi_t^alpha pi_ref^(1-alpha)`` and the sampler ``lam pi_t + (1-lam) mu0``. ``alpha`` and
    ``beta`` are numbers or tensors of shape ``(..., 1)``, one per policy of a batch ``(..., K)``."""
    ref, mu = _mixtures(log_pi, log_pi_ref, mu0, alpha, lam)
    return tabular.ipo_optimum(ref, P, mu, tau=1.0 / beta)


def minimise_newton(loss_fn: Callable[[Tensor], Tensor], logits0: Tensor, iters: int = 50,
                    tol: float = 1e-13) -> Tensor:
    """Minimise a convex loss of one prompt's logits ``(K,)`` by damped Newton steps with the
    pseudo-inverse of the Hessian, in float64.

    The losses here depend on logits only through differences, so the Hessian is singular (the
    shift ``1`` and any response no pair touches). With the pseudo-inverse, a step never moves
    along that null space: the iterates converge to the point gradient descent started at
    ``logits0`` converges to (for a quadratic, in one step), which is what a model trained from
    its current state does to responses it never sees. Backtracking halves the step until the
    loss does not increase.
    """
    x = logits0.detach().to(torch.float64).clone()
    f = loss_fn(x)
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(loss_fn, x)
        if g.abs().max() < tol:
            break
        H = torch.autograd.functional.hessian(loss_fn, x)
        step = -torch.linalg.pinv(H, hermitian=True, rtol=1e-10) @ g
        t = 1.0
        while t > 1e-8:
            x_new = x + t * step
            f_new = loss_fn(x_new)
            if f_new <= f + 1e-15:
                break
            t /= 2
        x, f = x_new, f_new
    return x


def dpo_optimum(log_pi_ref: Tensor, P: Tensor, mu: Tensor, beta, iters: int = 100,
                tol: float = 1e-13) -> Tensor:
    """``log pi*`` minimising the population DPO loss (:func:`prefdyn.tabular.population_dpo_loss`)
    for any ``P`` and full-support ``mu``; leading batch dimensions allowed (``(..., K)``), and
    ``beta`` may be a tensor broadcasting against them (shape ``(..., 1)``).

    With ``g = log pi/pi_ref`` the loss ``-sum mu_i mu_j P_ij log sigma(beta (g_i - g_j))`` depends on
    ``g`` only through ``x = beta g``, so its minimiser is ``g* = x*/beta`` with ``x*`` the minimiser of
    the ``beta = 1`` loss. With ``s_ij = sigma(x_i - x_j)`` that loss has gradient
    ``mu_i sum_j mu_j (s_ij - P_ij)`` and Hessian ``diag(mu * (S mu)) - diag(mu) S diag(mu)``,
    ``S_ij = s_ij (1 - s_ij)``: a weighted graph Laplacian, singular along ``1`` (and along responses
    with ``mu_i = 0``). Damped Newton steps (halved until the loss does not increase) from ``x = 0``
    solve the first-order condition ``sum_j mu_j sigma(x_i - x_j) = (P mu)_i``; for Bradley–Terry
    ``P`` it is ``x = r + c`` whatever ``mu`` is. (Newton's method is invariant under the rescaling,
    so these are the iterates of Newton on the ``beta`` loss, times ``beta``.)
    """
    objectives._require_positive("beta", beta)
    _check = torch.broadcast_shapes(log_pi_ref.shape, mu.shape)
    x = torch.zeros(_check, dtype=torch.float64)
    mu = mu.to(torch.float64).expand(_check)
    P = P.to(torch.float64)

    def loss(x):
        return -(mu[..., :, None] * mu[..., None, :] * P * F.logsigmoid(x[..., :, None] - x[..., None, :])).sum((-2, -1))

    f = loss(x)
    for _ in range(iters):
        s = torch.sigmoid(x[..., :, None] - x[..., None, :])
        grad = mu * ((s - P) * mu[..., None, :]).sum(-1)
        if grad.abs().max() < tol:
            break
        S = s * (1 - s)
        H = torch.diag_embed(mu * (S * mu[..., None, :]).sum(-1)) - mu[..., :, None] * S * mu[..., None, :]
        # pseudo-inverse: the shift 1 and responses mu never samples (mu_i -> 0) stay where they are
        step = (torch.linalg.pinv(H, hermitian=True, rtol=1e-12) @ -grad.unsqueeze(-1)).squeeze(-1)
        t = torch.ones(x.shape[:-1] + (1,), dtype=torch.float64)
        for _ in range(40):                       # per-element backtracking
            f_new = loss(x + t * step)
            bad = (f_new > f + 1e-15).unsqueeze(-1)
            if not bad.any():
                break
            t = torch.where(bad, t / 2, t)
        x = x + t * step
        f = loss(x)
    return F.log_softmax(log_pi_ref + x / beta, dim=-1)


def mrs_dpo_step(log_pi: Tensor, log_pi_ref: Tensor, mu0: Tensor, P: Tensor, alpha, beta,
                 lam: float) -> Tensor:
    """One round of iterated DPO: :func:`dpo_optimum` for the mixed reference and sampler of
    :func:`mrs_ipo_step` (``beta`` is DPO's beta here)."""
    ref, mu = _mixtures(log_pi, log_pi_ref, mu0, alpha, lam)
    return dpo_optimum(ref, P, mu, beta)


def iterate(step: Callable[..., Tensor], log_pi0: Tensor, rounds: int, *, log_pi_ref: Tensor | None = None,
            mu0: Tensor | None = None, **params) -> Tensor:
    """The trajectory ``log pi_0, ..., log pi_rounds`` (shape ``(rounds+1, K)``) of ``step``
    (:func:`mrs_ipo_step` or :func:`mrs_dpo_step`) started at ``log_pi0``; the fixed reference and
    the offline sampler default to the initial policy, ``pi_ref = mu0 = pi_0``."""
    log_pi_ref = log_pi0 if log_pi_ref is None else log_pi_ref
    mu0 = log_pi0.exp() if mu0 is None else mu0
    out = [log_pi0]
    for _ in range(rounds):
        out.append(step(out[-1], log_pi_ref, mu0, **params))
    return torch.stack(out)


def fixed_point(log_pi_ref: Tensor, mu0: Tensor, P: Tensor, alpha, beta: float, lam: float,
                damping: float | None = None, iters: int = 20000, tol: float = 1e-12) -> Tensor:
    r"""The fixed point of (eq. MAP) for ``alpha < 1``, i.e. the solution of

        pi = softmax(log pi_ref + beta/(1-alpha) P (lam pi + (1-lam) mu0)),

    found by damped iteration of the map in logit space (``z <- (1-eta) z + eta F(z)``), which has
    the same fixed points. ``alpha`` may be a tensor of shape ``(..., 1)`` (one fixed point per
    entry). The Jacobian of the map at any point has eigenvalues ``alpha + i y`` on the zero-sum
    plane with ``|y| <= beta lam ||P - 11^T/2||_2 / 2`` (``P - 11^T/2`` is antisymmetric, so
    ``(P - 11^T/2)(diag pi - pi pi^T)`` has an imaginary spectrum), and the damped eigenvalue
    ``1 - eta (1 - alpha - i y)`` has modulus below 1 when ``eta < 2(1-alpha)/((1-alpha)^2 + y^2)``;
    the default ``eta`` is half that bound (at most 1), so the fixed point is attracting."""
    al = torch.as_tensor(alpha, dtype=log_pi_ref.dtype)
    if not bool((al < 1).all()):
        raise ValueError("alpha must be below 1: at alpha = 1 the map has no interior fixed point in general")
    if damping is None:
        y = beta * lam * torch.linalg.matrix_norm(P - 0.5, ord=2) / 2
        damping = (1 - al) / ((1 - al) ** 2 + y ** 2)
        damping = torch.clamp(damping, max=1.0)
    z = log_pi_ref.clone()
    for _ in range(iters):
        z_new = F.log_softmax((1 - damping) * z + damping * mrs_ipo_step(z, log_pi_ref, mu0, P, al, beta, lam), -1)
        if (z_new - z).abs().max() < tol:
            return z_new
        z = z_new
    return z


def _centring_basis(K: int, dtype=torch.float64) -> Tensor:
    """Orthonormal basis ``B`` (``K x (K-1)``) of the vectors summing to zero."""
    Q = torch.eye(K, dtype=dtype) - 1.0 / K
    U, _, _ = torch.linalg.svd(Q)
    return U[:, :K - 1]


def quotient_jacobian(log_pi: Tensor, P: Tensor, alpha: float, beta: float, lam: float) -> Tensor:
    r"""Jacobian of (eq. MAP) at ``pi`` on logits modulo constants, ``(K-1) x (K-1)``.

    In logits ``z`` (``pi = softmax z``) the map is ``z' = alpha z + beta lam P softmax(z) + const``,
    so ``dz'/dz = alpha I + beta lam P (diag pi - pi pi^T)``; it sends ``1`` to ``alpha 1`` (a shift
    of the logits is no change of policy), and the induced map on ``R^K / 1`` is ``B^T J B``."""
    pi = log_pi.exp()
    K = pi.shape[-1]
    J = alpha * torch.eye(K, dtype=pi.dtype) + beta * lam * P @ (torch.diag(pi) - torch.outer(pi, pi))
    B = _centring_basis(K, pi.dtype)
    return B.T @ J @ B


def spectral_radius(M: Tensor) -> float:
    """Largest eigenvalue modulus of a square matrix."""
    return torch.linalg.eigvals(M).abs().max().item()


def ipo_oscillation_index(alpha, a, beta_lam):
    """``alpha^2 + a^2 (beta lam)^2 / 3``: the squared modulus of the eigenvalues
    ``alpha ± i a beta lam / sqrt 3`` of iterated IPO at the uniform policy for 3-cycle preferences
    (:func:`cyclic_preferences`) and a uniform reference; above 1 the uniform policy is unstable and
    the policy oscillates. Works elementwise on NumPy arrays."""
    return np.asarray(alpha) ** 2 + np.asarray(a) ** 2 * np.asarray(beta_lam) ** 2 / 3.0


def dpo_oscillation_index(alpha, a, lam_over_beta):
    """``alpha^2 + 16 a^2 (lam/beta)^2 / 3``: the same for iterated DPO (``beta`` DPO's), whose
    linearisation at the uniform policy is IPO's with ``beta_IPO = 4 / beta_DPO``."""
    return np.asarray(alpha) ** 2 + 16.0 * np.asarray(a) ** 2 * np.asarray(lam_over_beta) ** 2 / 3.0


def contraction_factor(alpha: float, beta: float, lam: float, P: Tensor) -> float:
    """``alpha + beta lam ||P - 11^T/2||_2 / 2``: a Lipschitz constant of (eq. MAP) on logits modulo
    constants; below 1 the map is a contraction (unique fixed point, global convergence)."""
    A = P - 0.5
    return alpha + beta * lam * torch.linalg.matrix_norm(A, ord=2).item() / 2


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------

def entropy(log_pi: Tensor) -> Tensor:
    """Shannon entropy ``-sum pi log pi`` in nats over the last axis (``0 log 0 = 0``)."""
    pi = log_pi.exp()
    return -(torch.where(pi > 0, pi * log_pi, torch.zeros_like(pi))).sum(-1)


def total_variation(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``TV(p, q) = sum |p - q| / 2`` over the last axis."""
    return (log_p.exp() - log_q.exp()).abs().sum(-1) / 2


def oscillation_ratio(traj: Tensor, centre: Tensor, floor: float = 1e-10) -> Tensor:
    """``max_{t in last quarter} ||pi_t - c|| / max_{t in second quarter} ||pi_t - c||`` for
    trajectories of log-policies ``(T+1, ..., K)``, one ratio per trajectory (shape ``(...)``):
    below 1 when the orbit contracts to ``c``, about 1 or more when it grows or keeps oscillating. ``c`` is the fixed point under test. An orbit whose last quarter
    stays within ``floor`` of ``c`` has converged (to round-off, where the ratio of two round-off
    errors means nothing) and gets ratio 0."""
    dev = (traj.exp() - centre.exp()).norm(dim=-1)
    T = len(traj)
    mid, tail = dev[T // 4: T // 2].amax(0), dev[3 * T // 4:].amax(0)
    return torch.where(tail < floor, 0.0, tail / mid.clamp_min(1e-300))


def entropy_upper_bound(log_odds: Tensor) -> Tensor:
    """Upper bound on ``H(pi)`` from lower bounds ``L_j <= log pi(top)/pi(j)`` on the log-odds of the
    top response against the ``K-1`` others (last axis, without the top itself).

    ``eps = 1 - pi(top) = sum_j pi(j) <= sum_j pi(j)/pi(top) <= sum_j e^{-L_j}``, and grouping the
    non-top responses gives ``H <= h(eps) + eps log(K-1)`` (``h`` the binary entropy), which
    increases in ``eps`` for ``eps <= 1/2``; above that the bound is ``log K``."""
    K = log_odds.shape[-1] + 1
    eps = torch.exp(-log_odds).sum(-1)
    e = eps.clamp(max=0.5)
    h = -(e * torch.log(e.clamp_min(1e-300)) + (1 - e) * torch.log1p(-e))
    bound = h + e * math.log(K - 1) if K > 2 else h
    return torch.where(eps <= 0.5, bound, torch.full_like(bound, math.log(K)))


def ranking_accuracy(log_pi: Tensor, P: Tensor) -> Tensor:
    """Fraction of the pairs with ``P[i, j] > 1/2`` that the policy orders the same way,
    ``pi(i) > pi(j)`` (last axis; ties count as wrong)."""
    wins = (P > 0.5)
    agree = (log_pi[..., :, None] > log_pi[..., None, :]) & wins
    return agree.sum((-2, -1)).to(torch.float64) / wins.sum()


# --------------------------------------------------------------------------------------------------
# Sampled pairs and oracle labels (what the real-model rounds train on)
# --------------------------------------------------------------------------------------------------

def pair_counts(samples: Sequence[Sequence[int]], P: Tensor, rng: np.random.Generator | None = None,
                soft: bool = False) -> Tensor:
    """Oracle-labelled comparisons among sampled candidates, as weights ``W[p, w, l]``.

    For prompt ``p`` every unordered pair of kept samples ``(s, t)`` (indices ``>= 0``) is compared
    once. With ``soft=False`` the oracle prefers ``s`` with probability ``P[c_s, c_t]`` (a draw from
    ``rng``); with ``soft=True`` the pair counts ``P[c_s, c_t]`` as (s wins) and ``1 - P[c_s, c_t]``
    as (t wins), the expected label (the limit of many annotators), which keeps the sampled loss's
    minimiser finite for DPO. ``W`` sums these over pairs and divides by the number of pairs, so
    that ``sum W * loss`` is the mean sampled loss; pairs of equal candidates carry no gradient and
    only enter the denominator."""
    K = P.shape[-1]
    W = torch.zeros(len(samples), K, K, dtype=torch.float64)
    Pn = P.detach().to(torch.float64).numpy()
    for p, cands in enumerate(samples):
        c = np.array([x for x in cands if x >= 0], dtype=int)
        if len(c) < 2:
            continue
        s, t = np.triu_indices(len(c), k=1)
        n_pairs = len(s)                     # equal pairs count in the denominator only
        differ = c[s] != c[t]
        s, t = s[differ], t[differ]
        prob = Pn[c[s], c[t]]
        if soft:
            weight_first = prob
        else:
            if rng is None:
                raise ValueError("hard labels need a random generator rng")
            weight_first = (rng.random(len(s)) < prob).astype(float)
        Wp = np.zeros((K, K))
        np.add.at(Wp, (c[s], c[t]), weight_first)
        np.add.at(Wp, (c[t], c[s]), 1.0 - weight_first)
        W[p] = torch.from_numpy(Wp) / n_pairs
    return W


def pair_table_loss(log_pi: Tensor, log_pi_ref: Tensor, W: Tensor, loss: str, beta: float) -> Tensor:
    """``sum_p sum_{w,l} W[p, w, l] * ell(w, l)``: the mean sampled IPO or DPO loss over the compared
    pairs of every prompt, with ``ell`` from :mod:`prefdyn.objectives` (IPO with ``tau = 1/beta``).
    ``log_pi`` and ``log_pi_ref`` are ``(prompts, K)`` candidate log-probabilities; any per-prompt
    normaliser cancels. The same function trains the model and, over free logits, gives the
    tabular prediction of the round."""
    args = (log_pi[..., :, None], log_pi[..., None, :], log_pi_ref[..., :, None], log_pi_ref[..., None, :])
    if loss == "ipo":
        ell = objectives.ipo_loss(*args, tau=1.0 / beta)
    elif loss == "dpo":
        ell = objectives.dpo_loss(*args, beta=beta)
    else:
        raise ValueError(f"loss={loss!r} must be 'ipo' or 'dpo'")
    return (W.to(ell.dtype) * ell).sum()
