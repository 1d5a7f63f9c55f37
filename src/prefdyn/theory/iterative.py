r"""Iterative on-policy IPO and DPO: the sampler and the reference fed back from the policy.

The setting of Chen, He, Jordan & Yao (2026), "How Sampling Shapes LLM Alignment: From One-Shot
Optima to Iterative Dynamics", arXiv:2602.12180, as this book reconstructs it (the chapter
``ch04-ipo-sampling-iterative`` derives every formula and says which parts are reconstructions).
One prompt, ``K`` candidate responses, a tabular policy, a preference matrix ``P`` with
``P + P^T = 1`` (not necessarily Bradley–Terry), and the paper's notation ``beta = 1/tau`` for IPO.

* One-shot IPO optimum (Azar et al. 2023): ``pi* = softmax(log pi_ref + beta P mu)``, i.e.
  :func:`prefdyn.tabular.ipo_optimum` at ``beta``; the ranking desiderata: the Smith set
  (:func:`smith_set`) and the sampler that puts it on top (:func:`smith_sampler`, the chapter's
  prop-ch4-smith), the counterexample that defeats any fixed sampler
  (:func:`condorcet_counterexample`, prop-ch4-every-sampler), and the best order-keeping gap over
  all samplers (:func:`best_order_gap`) with a transitive ``P`` no sampler orders
  (:data:`TRANSITIVE_NO_SAMPLER`, prop-ch4-no-sampler).
* The iterated map (the paper's MRS-IPO): the reference is the geometric mixture
  ``pi_ref_t ∝ pi_t^alpha pi_ref^(1-alpha)`` and the sampler the linear mixture
  ``mu_t = lam pi_t + (1 - lam) mu0``; then ``pi_{t+1}`` is the IPO optimum for that pair,

      log pi_{t+1} = log_softmax(alpha log pi_t + (1-alpha) log pi_ref + beta P mu_t).   (eq. MAP)

* Cyclic preferences ``P = 1/2 11^T + a C`` (``C`` the 3-cycle): the uniform policy is a fixed
  point whose linearisation has eigenvalues ``alpha ± i a beta lam / sqrt 3``
  (:func:`ipo_oscillation_index`); DPO's has ``alpha ± i 4 a lam / (sqrt 3 beta)``
  (:func:`dpo_oscillation_index`).
* Contraction (any ``P``): ``alpha + beta lam ||P - 11^T/2||_2 / 2 < 1`` (:func:`contraction_factor`).
* At ``alpha = 1`` on the 3-cycle, ``KL(u || pi_t)`` grows at every round (:func:`kl_from_uniform`,
  prop-ch4-spiral).
* Collapse (strictly strongly transitive ``P``): log-odds of the top response grow by at least
  ``beta * delta_j`` per round at ``alpha = 1`` (:func:`transitivity_margins`), the entropy is
  bounded by :func:`entropy_upper_bound`, and it falls at every round after the burn-in of
  :func:`collapse_burn_in` (prop-ch4-monotone).
* The paper's experiment: preference matrices from multi-attribute scores
  (:func:`preference_matrices`), classified as cyclic (:func:`is_cyclic`) or strongly transitive
  (:func:`strongly_transitive`); the cycle strength (:func:`cycle_strength`) and the leader's turns
  through a cycle (:func:`cyclic_advances`).

The last sections hold what finite samples do: the paper's plug-in map, whose every round is the
IPO optimum for the empirical sampler (:func:`plugin_round`, :func:`plugin_rounds`); the minimiser
of the sampled IPO loss in closed form (:func:`sampled_ipo_round`), which leaves unsampled candidates
where they are, and its map (:func:`sampled_rounds`), which can stop for good at a vertex
(:func:`frozen`); and what the real-model
rounds need of the mathematics: oracle-labelled pair counts among sampled candidates and the
sampled pair loss (the drivers that train the model are in :mod:`prefdyn.experiments.ch04`).
"""
from __future__ import annotations

import itertools
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
    "pair_margins", "smith_set", "smith_sampler", "condorcet_counterexample", "TRANSITIVE_NO_SAMPLER", "best_order_gap",
    "monotone_entropy_threshold", "collapse_burn_in", "kl_from_uniform", "cycle_strength", "cyclic_advances",
    "preference_matrices", "is_cyclic", "strongly_transitive", "sampled_ipo_round", "sampled_rounds",
    "plugin_round", "plugin_rounds", "frozen",
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


def pair_margins(P: Tensor) -> Tensor:
    """``delta[i, j] = min_k (P[i, k] - P[j, k])``, the smallest advantage of row ``i`` over row ``j``
    (``(..., K, K)``): at ``alpha = 1`` every round raises ``log pi(i)/pi(j)`` by at least
    ``beta delta[i, j]``, since the sampler is a probability vector (thm-ch4-collapse, part 1, for any
    pair); positive for every ``i`` above ``j`` iff ``P`` is strictly strongly transitive."""
    return (P[..., :, None, :] - P[..., None, :, :]).min(-1).values


def logit_gaps(log_pi_ref: Tensor, P: Tensor, mu: Tensor, beta: float) -> Tensor:
    """``G[i, j] = log pi*(i)/pi*(j) = log pi_ref(i)/pi_ref(j) + beta <mu, P[i] - P[j]>`` for the
    one-shot IPO optimum: the sampler enters every gap linearly, through ``<mu, d^{ij}>``."""
    s = P @ mu
    return (log_pi_ref[:, None] - log_pi_ref[None, :]) + beta * (s[:, None] - s[None, :])


# --------------------------------------------------------------------------------------------------
# Ranking desiderata: which samplers put the Smith set on top, and which P no sampler orders
# --------------------------------------------------------------------------------------------------

def _strict_wins(P: Tensor) -> Tensor:
    """``W[i, j] = P[i, j] > 1/2`` off the diagonal; a tie off the diagonal raises (the Smith set and
    the majority order are defined for strict majorities)."""
    K = P.shape[-1]
    off = ~torch.eye(K, dtype=torch.bool)
    if bool((P[off] == 0.5).any()):
        raise ValueError("P has a tie P[i, j] = 1/2 off the diagonal: the majority relation is not strict")
    return (P > 0.5) & off


def smith_set(P: Tensor) -> list[int]:
    """The Smith set of ``P`` (``K x K``): the smallest non-empty set ``S`` whose every member beats
    every non-member (``P[i, j] > 1/2`` for ``i`` in ``S``, ``j`` outside). Such dominant sets are
    nested, so the smallest is unique; it is found by trying the sets in order of size. A Condorcet
    winner ``c`` gives ``S = [c]``."""
    wins = _strict_wins(P)
    K = P.shape[-1]
    for size in range(1, K + 1):
        for S in itertools.combinations(range(K), size):
            rest = [j for j in range(K) if j not in S]
            if all(bool(wins[i, j]) for i in S for j in rest):
                return list(S)
    raise AssertionError("the whole set is always dominant")


def smith_sampler(P: Tensor, eta: float | None = None) -> tuple[Tensor, list[int], float]:
    r"""The instance-dependent sampler of the chapter's prop-ch4-smith: ``(mu, S, g)``.

    ``q`` is supported on the Smith set ``S`` with every member's win rate against it at least 1/2,
    ``(P q)_i >= 1/2`` for ``i`` in ``S`` (it exists by the minimax theorem: the zero-sum game with the
    antisymmetric payoff ``1/2 - P`` on ``S`` has value 0; found by linear programming). With
    ``g = min_{j not in S, k in S} (1/2 - P[j, k]) > 0`` the sampler is
    ``mu = (1 - eta) q + eta u`` (``u`` uniform, full support), ``eta = 0.9 g/(1 + g)`` by default:
    any ``eta < g/(1 + g)`` puts every member of ``S`` above every non-member in the IPO optimum
    with a uniform reference. With ``S`` the whole set, ``g = inf`` and Smith-top holds for any ``eta``."""
    from scipy.optimize import linprog

    K = P.shape[-1]
    S = smith_set(P)
    rest = [j for j in range(K) if j not in S]
    Pn = P.detach().to(torch.float64).numpy()
    sub = Pn[np.ix_(S, S)]
    res = linprog(np.zeros(len(S)), A_ub=-sub, b_ub=-0.5 * np.ones(len(S)), A_eq=np.ones((1, len(S))), b_eq=[1.0],
                  bounds=[(0, None)] * len(S), method="highs")
    if not res.success:
        raise AssertionError(f"the minimax strategy on the Smith set was not found: {res.message}")
    q = torch.zeros(K, dtype=torch.float64)
    q[S] = torch.as_tensor(res.x, dtype=torch.float64).clamp_min(0)     # the solver's round-off below 0
    q /= q.sum()
    g = float((0.5 - Pn[np.ix_(rest, S)]).min()) if rest else math.inf
    if eta is None:
        eta = 0.9 * (g / (1 + g) if rest else 1.0)
    return (1 - eta) * q + eta / K, S, g


def condorcet_counterexample(mu: Tensor, delta: float = 0.1) -> tuple[Tensor, int, int]:
    r"""For any sampler ``mu`` over ``K >= 3`` responses, a ``P`` with a Condorcet winner ``c`` that the
    IPO optimum with a uniform reference ranks below another response ``b`` (the chapter's
    prop-ch4-every-sampler): ``(P, c, b)``.

    ``a = argmax mu`` and ``c, b`` two other responses; ``P[c, a] = P[c, b] = 1/2 + eps``,
    ``P[b, a] = 1 - delta``; every other response ``k`` loses to ``a, b, c`` with probability
    ``1 - delta`` each and ties the rest. Then
    ``(P mu)_b - (P mu)_c = mu_a (1/2 - delta) - eps (mu_a + mu_b + mu_c)``, which with
    ``eps = mu_a (1/2 - delta) / 2`` is at least ``mu_a (1/2 - delta) / 2 > 0``."""
    K = mu.shape[-1]
    if K < 3 or not 0 < delta < 0.5:
        raise ValueError(f"need K >= 3 responses and 0 < delta < 1/2 (got K={K}, delta={delta})")
    order = torch.argsort(mu, descending=True).tolist()
    a, c, b = order[0], order[1], order[2]
    eps = float(mu[a]) * (0.5 - delta) / 2
    P = torch.full((K, K), 0.5, dtype=torch.float64)

    def set_(i, j, p):
        P[i, j], P[j, i] = p, 1 - p

    set_(c, a, 0.5 + eps)
    set_(c, b, 0.5 + eps)
    set_(b, a, 1 - delta)
    for k in order[3:]:
        for top in (a, b, c):
            set_(top, k, 1 - delta)
    return P, c, b


# A transitive P (1 > 2 > 3 > 4 in every pairwise majority) that is not strongly transitive
# (P[0, 2] = 0.7 < P[1, 2] = 0.8): for every sampler the score gaps of the pairs (1, 2) and (3, 4)
# sum to a negative number, so no sampler keeps the order (the chapter's prop-ch4-no-sampler).
TRANSITIVE_NO_SAMPLER = 0.5 + torch.tensor([[0.0, 0.05, 0.2, 0.05],
                                            [-0.05, 0.0, 0.3, 0.2],
                                            [-0.2, -0.3, 0.0, 0.05],
                                            [-0.05, -0.2, -0.05, 0.0]], dtype=torch.float64)


def best_order_gap(P: Tensor, order: Sequence[int]) -> tuple[float, Tensor]:
    """``max over samplers mu`` of ``min_i ((P mu)_{o_i} - (P mu)_{o_{i+1}})`` along ``order`` (best
    first), by linear programming over the simplex, with the maximising ``mu``. Positive iff some
    sampler makes the IPO optimum with a uniform reference keep the whole order strictly
    (:func:`logit_gaps`); a sampler with full support then exists too (the set is open)."""
    from scipy.optimize import linprog

    o = list(order)
    K = P.shape[-1]
    Pn = P.detach().to(torch.float64).numpy()
    D = Pn[o[:-1]] - Pn[o[1:]]                          # rows: the gaps' linear forms in mu
    # variables (mu_1..mu_K, t): maximise t subject to D mu >= t, mu in the simplex
    res = linprog(np.r_[np.zeros(K), -1.0], A_ub=np.c_[-D, np.ones(len(D))], b_ub=np.zeros(len(D)),
                  A_eq=np.r_[np.ones(K), 0.0][None], b_eq=[1.0], bounds=[(0, None)] * K + [(None, None)],
                  method="highs")
    if not res.success:
        raise AssertionError(f"the order LP failed: {res.message}")
    return float(res.x[-1]), torch.as_tensor(res.x[:K], dtype=torch.float64)


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
    (:func:`prefdyn.tabular.ipo_optimum` at ``beta``) for the reference
    ``∝ pi_t^alpha pi_ref^(1-alpha)`` and the sampler ``lam pi_t + (1-lam) mu0``. ``alpha`` and
    ``beta`` are numbers or tensors of shape ``(..., 1)``, one per policy of a batch ``(..., K)``."""
    ref, mu = _mixtures(log_pi, log_pi_ref, mu0, alpha, lam)
    return tabular.ipo_optimum(ref, P, mu, beta=beta)


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
    objectives.require_positive("beta", beta)
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


def monotone_entropy_threshold(K: int) -> float:
    """``eps*``, the root of ``eps = exp(-(h(eps) + eps log(K-1)))`` on ``(0, 1/2]`` (``h`` the binary
    entropy; bisection): while the mass off the top response is below it, every non-top response has
    ``pi(j) < exp(-H(pi))``, so raising every log-odds of the top lowers the entropy (the chapter's
    prop-ch4-monotone). The left side minus the right increases in ``eps``, so the root is unique."""
    if K < 2:
        raise ValueError(f"K={K}: need at least two responses")

    def excess(e):
        h = -(e * math.log(e) + (1 - e) * math.log1p(-e))
        return e - math.exp(-(h + e * math.log(K - 1)))

    lo, hi = 1e-12, 0.5
    if excess(hi) <= 0:
        return hi
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
    return lo


def collapse_burn_in(log_odds0: Tensor, beta: float, delta: Tensor) -> int:
    """The first round ``t`` with ``sum_j exp(-L_j(0) - t beta delta_j) < eps*`` (:func:`monotone_entropy_threshold`,
    ``K = len(delta) + 1``): from then on the entropy of iterated IPO at ``alpha = 1`` falls at every round
    (the chapter's prop-ch4-monotone), since the mass off the top is at most that sum (thm-ch4-collapse)."""
    eps_star = monotone_entropy_threshold(len(delta) + 1)
    rate = float(beta * delta.min())
    if rate <= 0:
        raise ValueError("the top response must strictly row-dominate (every delta_j > 0)")
    t = 0
    while float(torch.exp(-log_odds0 - t * beta * delta).sum()) >= eps_star:
        t += 1
    return t


def kl_from_uniform(log_pi: Tensor) -> Tensor:
    """``KL(u || pi) = -log K - mean_k log pi(k)`` over the last axis (``u`` uniform): the distance that
    iterated IPO at ``alpha = 1`` increases at every round on the 3-cycle (the chapter's prop-ch4-spiral)."""
    return -math.log(log_pi.shape[-1]) - log_pi.mean(-1)


def cycle_strength(log_pi: Tensor, burn_in: int = 0) -> Tensor:
    """The paper's cycle strength: the time-averaged variance of the policy's coordinates, i.e. the
    variance over rounds ``t >= burn_in`` (axis 0) of ``pi_t(k)``, averaged over ``k`` (last axis)."""
    return log_pi[burn_in:].exp().var(0, unbiased=False).mean(-1)


def cyclic_advances(log_pi: Tensor, P: Tensor, clear: float = 0.5) -> Tensor:
    """How far the leading response turns through the cycle of ``P``, per trajectory of ``log_pi``
    (``(rounds+1, ..., K)``): the largest net number of leader changes in cyclic order over any
    stretch of rounds. The leader of a round is the response holding at least ``clear`` of the mass
    (rounds without one are skipped); a change counts ``+1`` when the new leader beats the old one
    (``P[new, old] > 1/2``: on-policy feedback rewards what beats the current favourite) and ``-1``
    otherwise. On the 3-cycle, ``>= 3`` is a full turn."""
    pi = log_pi.exp()
    top, lead = pi.max(-1)
    flat_top, flat_lead = top.reshape(len(pi), -1), lead.reshape(len(pi), -1)
    out = torch.zeros(flat_lead.shape[1], dtype=torch.long)
    for n in range(flat_lead.shape[1]):
        leaders = flat_lead[flat_top[:, n] >= clear, n].tolist()
        net, low, best = 0, 0, 0
        for old, new in zip(leaders[:-1], leaders[1:]):
            if new != old:
                net += 1 if float(P[new, old]) > 0.5 else -1
                low, best = min(low, net), max(best, net - min(low, net))
        out[n] = best
    return out.reshape(lead.shape[1:])


def ranking_accuracy(log_pi: Tensor, P: Tensor) -> Tensor:
    """Fraction of the pairs with ``P[i, j] > 1/2`` that the policy orders the same way,
    ``pi(i) > pi(j)`` (last axis; ties count as wrong)."""
    wins = (P > 0.5)
    agree = (log_pi[..., :, None] > log_pi[..., None, :]) & wins
    return agree.sum((-2, -1)).to(torch.float64) / wins.sum()


# --------------------------------------------------------------------------------------------------
# The paper's experiment: preference matrices from multi-attribute scores
# --------------------------------------------------------------------------------------------------

def preference_matrices(scores: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, np.ndarray]:
    """The paper's construction from multi-attribute scores ``scores`` (``(n, K, A)``, one row of ``A``
    attribute scores per response): for every pair ``i < j`` of a prompt's responses an attribute
    ``a_ij`` is drawn uniformly from ``rng``, and ``P[i, j] = sigma(s_i[a_ij] - s_j[a_ij])``,
    ``P[j, i] = 1 - P[i, j]``, ``P[i, i] = 1/2``. Returns ``P`` (``(n, K, K)``) and the attributes drawn
    (``(n, K(K-1)/2)``, pairs in ``np.triu_indices`` order)."""
    n, K, A = scores.shape
    iu, ju = np.triu_indices(K, 1)
    attr = rng.integers(0, A, size=(n, len(iu)))
    rows = np.arange(n)[:, None]
    diff = scores[rows, iu[None], attr] - scores[rows, ju[None], attr]
    P = torch.full((n, K, K), 0.5, dtype=torch.float64)
    p = torch.sigmoid(torch.as_tensor(diff, dtype=torch.float64))
    P[:, iu, ju] = p
    P[:, ju, iu] = 1 - p
    return P, attr


def is_cyclic(P: Tensor) -> Tensor:
    """Whether the strict majority relation (``i -> j`` when ``P[i, j] > 1/2``) of each matrix
    (``(..., K, K)``) has a directed cycle: some response reaches itself, read from the boolean
    powers of the relation."""
    K = P.shape[-1]
    step = ((P > 0.5) & ~torch.eye(K, dtype=torch.bool)).to(torch.float64)
    reach, power = step.clone(), step.clone()
    for _ in range(K - 1):
        power = ((power @ step) > 0).to(torch.float64)
        reach = torch.maximum(reach, power)
    return reach.diagonal(dim1=-2, dim2=-1).amax(-1) > 0


def strongly_transitive(P: Tensor) -> Tensor:
    """Whether each matrix (``(..., K, K)``) is strongly transitive along some order of its responses:
    rows dominated entrywise down the order, ``P[i, k] >= P[j, k]`` for all ``k`` whenever ``i`` comes
    before ``j`` (:func:`is_strongly_transitive`; ties allowed, as integer scores make them common).
    All ``K!`` orders are tried at once."""
    K = P.shape[-1]
    orders = torch.tensor(list(itertools.permutations(range(K))))            # (K!, K)
    rows = P[..., orders, :]                                                  # (..., K!, K, K)
    return ((rows[..., :-1, :] - rows[..., 1:, :]) >= 0).all(-1).all(-1).any(-1)


# --------------------------------------------------------------------------------------------------
# Finite samples: the IPO round on sampled candidates, and the sampled map
# --------------------------------------------------------------------------------------------------

def sampled_ipo_round(log_pi: Tensor, log_ref: Tensor, counts: Tensor, P: Tensor, beta) -> Tensor:
    """The minimiser of one round's sampled IPO loss, moved to as gradient descent from ``log_pi``
    moves (:func:`minimise_newton` on :func:`pair_table_loss` with the expected labels of
    :func:`pair_counts`), in closed form: with ``counts`` (``(..., K)``) the round's samples per
    candidate, the loss is a least-squares fit of ``g_i - g_j`` (``g = log pi - log_ref``) to
    ``beta (P[i, j] - 1/2)`` weighted by ``counts_i counts_j``, solved by ``g = beta P mu_hat + c`` on
    the candidates that occur (``mu_hat = counts / sum``: the IPO optimum for the empirical
    sampler); ``c`` keeps their mean logit where it was, and a candidate that does not occur keeps
    its own. ``beta`` broadcasts like ``log_pi[..., :1]``. Returns log-probabilities."""
    counts = counts.to(log_pi.dtype)
    present = counts > 0
    mu_hat = counts / counts.sum(-1, keepdim=True)
    target = log_ref + beta * (P @ mu_hat[..., None]).squeeze(-1)
    n_present = present.sum(-1, keepdim=True).to(log_pi.dtype)
    shift = ((log_pi - target) * present).sum(-1, keepdim=True) / n_present
    moved = torch.where(present, target + shift, log_pi)
    new = torch.where(n_present >= 2, moved, log_pi)          # one candidate alone: no pair, no change
    return F.log_softmax(new, -1)


def _sample_counts(log_pi: Tensor, mu0: Tensor, lam: float, n_samples: int, generator: torch.Generator) -> Tensor:
    """A round's draws per candidate (``(..., K)``): ``round(lam n_samples)`` from ``pi = exp(log_pi)``
    and the rest from ``mu0``, multinomial, from ``generator``."""
    K = log_pi.shape[-1]
    n_on = int(round(lam * n_samples))

    def draw(probs, n):
        if n == 0:
            return torch.zeros_like(probs)
        idx = torch.multinomial(probs.reshape(-1, K), n, replacement=True, generator=generator)
        return F.one_hot(idx, K).sum(-2).to(probs.dtype).reshape(probs.shape)

    return draw(log_pi.exp(), n_on) + draw(mu0.expand_as(log_pi), n_samples - n_on)


def _finite_sample_rounds(update: Callable[..., Tensor], log_pi0: Tensor, P: Tensor, alpha, beta, lam: float,
                          n_samples: int, rounds: int, replicates: int, generator: torch.Generator,
                          mu0: Tensor | None) -> Tensor:
    K = log_pi0.shape[-1]
    z0 = log_pi0.expand((replicates,) + log_pi0.shape).clone()
    mu0 = torch.full((K,), 1.0 / K, dtype=log_pi0.dtype) if mu0 is None else mu0
    out = [z0]
    for _ in range(rounds):
        z = out[-1]
        counts = _sample_counts(z, mu0, lam, n_samples, generator)
        ref = F.log_softmax(alpha * z + (1 - alpha) * z0, -1)
        out.append(update(z, ref, counts, P, beta))
    return torch.stack(out)


def plugin_round(log_pi: Tensor, log_ref: Tensor, counts: Tensor, P: Tensor, beta) -> Tensor:
    """The IPO optimum (eq-ch4-ipo) for the reference ``log_ref`` and the *empirical* sampler
    ``mu_hat = counts / sum(counts)``: ``log_softmax(log_ref + beta P mu_hat)``. Every response
    moves, sampled or not (the round's population optimum with ``mu`` replaced by its estimate).
    ``log_pi`` is unused (the signature of :func:`sampled_ipo_round`)."""
    mu_hat = counts.to(log_ref.dtype) / counts.sum(-1, keepdim=True)
    return F.log_softmax(log_ref + beta * (P @ mu_hat[..., None]).squeeze(-1), -1)


def sampled_rounds(log_pi0: Tensor, P: Tensor, alpha, beta, lam: float, n_samples: int, rounds: int,
                   replicates: int, generator: torch.Generator, mu0: Tensor | None = None) -> Tensor:
    """The sampled-loss map: ``replicates`` runs of iterated IPO from ``log_pi0`` (``(..., K)``, also
    the fixed reference) whose every round draws ``round(lam n_samples)`` candidates from ``pi_t`` and
    the rest from ``mu0`` (default uniform) and takes :func:`sampled_ipo_round` for the reference
    ``∝ pi_t^alpha pi_0^(1-alpha)``: what the real-model rounds do when the model follows the
    minimiser of its sampled loss exactly. Shape ``(rounds+1, replicates, ..., K)``."""
    return _finite_sample_rounds(sampled_ipo_round, log_pi0, P, alpha, beta, lam, n_samples, rounds, replicates,
                                 generator, mu0)


def plugin_rounds(log_pi0: Tensor, P: Tensor, alpha, beta, lam: float, n_samples: int, rounds: int,
                  replicates: int, generator: torch.Generator, mu0: Tensor | None = None) -> Tensor:
    """The plug-in map: :func:`sampled_rounds` with :func:`plugin_round`, i.e. (eq. MAP) with the
    sampler ``mu_t`` replaced by the empirical distribution of the round's draws (the paper's
    finite-sample runs). Draws the same random numbers as :func:`sampled_rounds`."""
    return _finite_sample_rounds(plugin_round, log_pi0, P, alpha, beta, lam, n_samples, rounds, replicates,
                                 generator, mu0)


def frozen(traj: Tensor, window: int, tol: float = 1e-12) -> Tensor:
    """Whether each trajectory (``(rounds+1, ..., K)``) stood still over its last ``window`` rounds
    (no log-probability moved by more than ``tol``). Under :func:`sampled_rounds` a round whose
    draws are all one candidate has no pair to compare and changes nothing, so near a vertex ``k``
    a run stops with probability about ``pi(k)^n`` a round, and stays stopped."""
    tail = traj[-window - 1:]
    return (tail[1:] - tail[:-1]).abs().amax(-1).amax(0) <= tol


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
    pairs of every prompt, with ``ell`` from :mod:`prefdyn.objectives` (IPO's target margin ``beta/2``).
    ``log_pi`` and ``log_pi_ref`` are ``(prompts, K)`` candidate log-probabilities; any per-prompt
    normaliser cancels. The same function trains the model and, over free logits, gives the
    tabular prediction of the round."""
    args = (log_pi[..., :, None], log_pi[..., None, :], log_pi_ref[..., :, None], log_pi_ref[..., None, :])
    if loss == "ipo":
        ell = objectives.ipo_loss(*args, beta=beta)
    elif loss == "dpo":
        ell = objectives.dpo_loss(*args, beta=beta)
    else:
        raise ValueError(f"loss={loss!r} must be 'ipo' or 'dpo'")
    return (W.to(ell.dtype) * ell).sum()
