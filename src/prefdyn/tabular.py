r"""The exact finite world: K responses per prompt and a tabular softmax policy.

Here every expectation is a finite sum, so the population objectives can be
minimised to machine precision and compared with their closed forms.  Tensors
carry optional leading prompt dimensions: ``log_pi_ref``, ``r``, ``mu`` and
``logits`` have shape ``(..., K)``, preference matrices ``P`` shape ``(..., K, K)``
with ``P[..., y, y'] = p(y ≻ y')`` and ``P + P^T = 1`` (so the diagonal is 1/2).

Population losses.  Pairs (y, y') are drawn from mu x mu and the label
"y ≻ y'" with probability P[y, y']; the sampled loss is then applied to
(winner, loser) = (y, y').  Summing over the ordered pairs,

    L(pi) = sum_{y,y'} mu(y) mu(y') P[y,y'] ell(y, y'),

where ell is :func:`prefdyn.objectives.dpo_loss` or
:func:`prefdyn.objectives.ipo_loss` evaluated on log pi = log_softmax(logits),
the very functions used to train the language model.

Write g(y) = log(pi(y)/pi_ref(y)) and c = 1/(2 tau).  Grouping (y, y') with
(y', y) and using P[y', y] = 1 - P[y, y']:

* DPO.  Each unordered pair contributes
  -P log sigma(h) - (1 - P) log sigma(-h), h = beta (g(y) - g(y')),
  a cross-entropy minimised at sigma(h) = P[y, y'].  If P is Bradley–Terry,
  P[y, y'] = sigma(r_y - r_y'), this is h = r_y - r_y', i.e.
  beta g(y) = r_y + const: pi* ∝ pi_ref exp(r/beta) = :func:`rlhf_optimum`
  (Rafailov et al. Eq. 4; the normalisers cancel in the difference).
* IPO.  P (h - c)^2 + (1 - P)(-h - c)^2 = (h - (2P - 1) c)^2 + const with
  h = g(y) - g(y'), so L is the least-squares problem
  sum mu(y) mu(y') (g(y) - g(y') - (P[y,y'] - 1/2)/tau)^2.  Its normal
  equations give g(y) - E_mu[g] = (P(y ≻ mu) - 1/2)/tau with
  P(y ≻ mu) = (P mu)_y, hence pi* ∝ pi_ref exp(tau^{-1} P mu) =
  :func:`ipo_optimum` (Azar et al. 2023, Sec. 5: the IPO population objective has this unique
  minimiser when Supp(mu) is every response).

Both minimisers are unique (given the normalisation) only if mu has full
support: a response never sampled by mu leaves its g unconstrained.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from prefdyn.objectives import dpo_loss, ipo_loss, require_positive

__all__ = [
    "rlhf_optimum",
    "bradley_terry",
    "ipo_optimum",
    "population_dpo_loss",
    "population_ipo_loss",
    "minimise",
]


def rlhf_optimum(log_pi_ref: Tensor, r: Tensor, beta: float) -> Tensor:
    """log pi* of the KL-regularised RLHF optimum pi* ∝ pi_ref exp(r/beta), Rafailov et al. Eq. 4."""
    require_positive("beta", beta)
    return F.log_softmax(log_pi_ref + r / beta, dim=-1)


def bradley_terry(r: Tensor) -> Tensor:
    """Bradley–Terry preference matrix P[..., i, j] = sigma(r_i - r_j) (Rafailov et al. Eq. 1)."""
    return torch.sigmoid(r[..., :, None] - r[..., None, :])


def ipo_optimum(log_pi_ref: Tensor, P: Tensor, mu: Tensor, beta: float) -> Tensor:
    """log pi* of the population IPO solution pi* ∝ pi_ref exp(beta P mu) (Azar et al. 2023, with the
    book's beta = 1/tau: :func:`prefdyn.objectives.ipo_loss`).

    (P mu)_y = sum_{y'} P[y, y'] mu(y') = p(y ≻ mu) is the probability that y
    beats a response drawn from the behaviour distribution mu.
    """
    require_positive("beta", beta)
    win_rate = (P @ mu[..., None]).squeeze(-1)
    return F.log_softmax(log_pi_ref + beta * win_rate, dim=-1)


def _expected_pair_loss(
    pair_loss: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor],
    logits: Tensor,
    log_pi_ref: Tensor,
    P: Tensor,
    mu: Tensor,
) -> Tensor:
    """sum_{y,y'} mu(y) mu(y') P[y,y'] pair_loss(winner=y, loser=y'), one value per prompt.

    Rows of the K x K table index the winner y, columns the loser y'.
    """
    log_pi = F.log_softmax(logits, dim=-1)
    losses = pair_loss(
        log_pi[..., :, None],  # policy_chosen_logps: winner y
        log_pi[..., None, :],  # policy_rejected_logps: loser y'
        log_pi_ref[..., :, None],
        log_pi_ref[..., None, :],
    )
    pair_weights = mu[..., :, None] * mu[..., None, :] * P
    return (pair_weights * losses).sum(dim=(-2, -1))


def population_dpo_loss(logits: Tensor, log_pi_ref: Tensor, P: Tensor, mu: Tensor, beta: float) -> Tensor:
    """Population DPO loss of pi = softmax(logits): Rafailov Eq. 7 under (y, y') ~ mu x mu, y ≻ y' w.p. P.

    Returns one loss per prompt (shape ``logits.shape[:-1]``).  Minimised by
    :func:`rlhf_optimum` when P = :func:`bradley_terry` (r) (see module docstring).
    """
    return _expected_pair_loss(partial(dpo_loss, beta=beta), logits, log_pi_ref, P, mu)


def population_ipo_loss(logits: Tensor, log_pi_ref: Tensor, P: Tensor, mu: Tensor, beta: float) -> Tensor:
    """Population IPO loss of pi = softmax(logits): Azar Eq. 17 under (y, y') ~ mu x mu, y ≻ y' w.p. P.

    Returns one loss per prompt.  Minimised by :func:`ipo_optimum` for any P
    with P + P^T = 1, Bradley–Terry or not.
    """
    return _expected_pair_loss(partial(ipo_loss, beta=beta), logits, log_pi_ref, P, mu)


def minimise(loss_fn: Callable[[Tensor], Tensor], logits0: Tensor, steps: int, lr: float) -> Tensor:
    """Full-batch gradient descent logits <- logits - lr * grad L(logits), in float64.

    ``loss_fn`` maps logits to per-prompt losses; their sum is minimised,
    which minimises every prompt separately since prompts share no parameters.
    Returns the final logits (detached).

    Step sizes that take zero logits to the closed forms within 1e-6 in
    max |log pi_GD - log pi*| (K = 6, beta, tau in [0.5, 2], mu within a factor
    of about 3 of uniform), 2000 steps, a fraction of a second:

    * DPO: ``lr = 8 / beta**2`` -- the curvature of -log sigma(beta h) scales as beta^2;
    * IPO: ``lr = 2`` -- the squared loss in h has curvature independent of tau.

    The slow directions have curvature proportional to the smallest mu(y) and
    the stable step to 1 / max mu(y), so a more concentrated mu needs more steps.
    """
    logits = logits0.detach().to(torch.float64).clone().requires_grad_(True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad(loss_fn(logits).sum(), logits)
        with torch.no_grad():
            logits -= lr * grad
    return logits.detach()
