"""Generalization of last-layer DPO after finitely many steps: reward-margin trajectories and a
generalization bound.

The setting of Im & Li, "On the Generalization of Preference Learning with DPO" (arXiv:2408.03459;
published as "Can DPO Learn Diverse Human Values? A Theoretical Scaling Law", NeurIPS 2025):

* frozen features ``g(x)`` in R^d and a trainable unembedding ``W`` (V x d), reference ``W_0``;
* single-token responses, one-hot ``y_w, y_l``; the DPO reward margin of a sample is
  ``r = beta (y_w - y_l)^T (W - W_0) g(x)`` because the softmax normaliser cancels;
* ``K`` pairs of Gaussian clusters ``C_{k,+-}: g ~ N(l_b e_0 +- e_{1+k}, v^2 I)`` whose two clusters
  prefer swapped tokens, no two pairs with the same two tokens, a token in at most ``Z`` pairs;
  ``Q`` samples per cluster, ``N = 2KQ``;
* full-batch gradient descent (or gradient flow ``tau dW/dt = -grad L``) from ``W_0``.

The paper's Lemma 4.1 (the margins obey a closed system driven by the kernel
``C_ij = (y_wi - y_li)^T (y_wj - y_lj) g_i^T g_j``), the comparison argument behind its Theorem 4.2
(linear lower and upper bounds on every training margin up to ``tau_1``) and the Gaussian-tail plus
union-bound argument behind its Theorem 4.3 are implemented here in the form the chapter
``ch03-dpo-generalization`` derives them. The deterministic parts are exact for gradient descent
too (``t = step * lr`` with ``tau = 1``). The paper's own statements, as its text gives them, are
here too: the conditions of its Theorems 4.2 and 4.3 (:func:`paper_conditions`), their failure
probability (:func:`paper_failure_floor`, :func:`vacuity_Q`), the union bound of its Appendix B.4
(:func:`union_bound_b4`) and the closed form of Theorem 4.3 derived from it (:func:`paper_bound`,
whose display is not readable in the paper; :func:`required_Q` solves it for its Figure 4). Shared
tokens (the paper's ``Z``) come from :func:`token_pairs`; the paper's Section 5 diagnostics of real
features from :func:`gaussian_fit` and :func:`group_cosines`, and its last-layer Adam training from
:func:`adam_last_layer`.

Time convention: ``tau = 1`` and gradient descent with step ``lr`` is the Euler discretisation of the
gradient flow, step ``k`` at time ``t = k * lr``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

LOG3 = math.log(3.0)

#: The losses of the paper's Section 7 on the reward margin ``r``: a loss ``(1/N) sum_i f(r_i)`` drives the
#: margins through the weight ``-f'(r_i)`` in place of DPO's ``sigma(-r_i)``. DPO ``f = -log sigma(r)``,
#: IPO ``f = (r - 1)^2`` and SLiC ``f = max(0, 1 - r)`` (its subgradient ``-1[r < 1]``).
LOSSES = ("dpo", "ipo", "slic")

#: For each loss, the margin range ``[0, r_max]`` of the book's training guarantee and the bounds
#: ``[q_lo, q_hi]`` of the weight ``-f'(r)`` on it: DPO's ``sigma(-r)`` on ``[0, log 3]`` (the paper's),
#: IPO's ``2(1 - r)`` on ``[0, 1/2]``, SLiC's ``1`` below the hinge ``r = 1``. In each ``q_hi <= 2 q_lo``,
#: which the guarantee needs (:func:`theorem_rates`).
WEIGHT_RANGES = {"dpo": (LOG3, 0.25, 0.5), "ipo": (0.5, 1.0, 2.0), "slic": (1.0, 1.0, 1.0)}


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} must be one of {', '.join(LOSSES)}")


def loss_value(loss: str, r: Tensor) -> Tensor:
    """``f(r)``: ``-log sigma(r)`` (DPO), ``(r - 1)^2`` (IPO), ``max(0, 1 - r)`` (SLiC), elementwise."""
    _check_loss(loss)
    if loss == "dpo":
        return -torch.nn.functional.logsigmoid(r)
    return (r - 1) ** 2 if loss == "ipo" else (1 - r).clamp(min=0)


def loss_weight(loss: str, r: Tensor) -> Tensor:
    """``-f'(r)``, the weight of a sample in the margin dynamics (the paper's Section 7): ``sigma(-r)``
    (DPO), ``2(1 - r)`` (IPO), ``1[r < 1]`` (SLiC; the subgradient 0 at the hinge)."""
    _check_loss(loss)
    if loss == "dpo":
        return torch.sigmoid(-r)
    return 2 * (1 - r) if loss == "ipo" else (r < 1).to(r.dtype)


# --------------------------------------------------------------------------------------------------
# Data: the paper's pairs of Gaussian clusters
# --------------------------------------------------------------------------------------------------

@dataclass
class ClusterData:
    """Samples of :func:`cluster_data`. ``cluster[i] = 2k`` for ``C_{k,+}`` and ``2k+1`` for ``C_{k,-}``;
    ``means[c]`` is cluster ``c``'s mean and ``chosen_of[c], rejected_of[c]`` its tokens."""

    features: Tensor
    chosen: Tensor
    rejected: Tensor
    cluster: Tensor
    means: Tensor
    chosen_of: Tensor
    rejected_of: Tensor
    v: float
    vocab: int


def token_pairs(K: int, Z: int) -> list[tuple[int, int]]:
    """``K`` distinct token pairs in which no token is used by more than ``Z`` pairs: the pairs
    ``(a, b)``, ``a < b``, in lexicographic order, each kept while both its tokens are used fewer than
    ``Z`` times. ``Z = 1`` gives ``(0, 1), (2, 3), ...``; ``Z >= 2`` reuses the lowest tokens first,
    so the largest reuse is ``min(Z, K)``: token 0 is shared by the first ``min(Z, K)`` pairs."""
    if Z < 1 or K < 1:
        raise ValueError(f"need K >= 1 and Z >= 1 (K={K}, Z={Z})")
    uses: dict[int, int] = {}
    pairs: list[tuple[int, int]] = []
    a = 0
    while len(pairs) < K:
        b = a + 1
        while uses.get(a, 0) < Z and len(pairs) < K:
            if uses.get(b, 0) < Z:
                pairs.append((a, b))
                uses[a], uses[b] = uses.get(a, 0) + 1, uses.get(b, 0) + 1
            b += 1
        a += 1
    return pairs


def cluster_tokens(K: int, shared_tokens: bool = False, Z: int = 1) -> tuple[Tensor, Tensor, int]:
    """Preferred and rejected token of each of the ``2K`` clusters, and the vocabulary size.

    Pair ``k`` uses the ``k``-th pair ``(a, b)`` of :func:`token_pairs` (``Z = 1``: its own tokens
    ``(2k, 2k+1)``; ``Z >= 2``: tokens reused by up to ``Z`` pairs, never the same set twice, the
    paper's setting); ``C_{k,+}`` prefers ``a`` over ``b`` and ``C_{k,-}`` the reverse.
    ``shared_tokens=True``: every pair uses tokens ``(0, 1)``, the same response set, which the paper
    excludes (the persona Yes/No setting)."""
    pairs = [(0, 1)] * K if shared_tokens else token_pairs(K, Z)
    a, b = (torch.tensor([p[i] for p in pairs], dtype=torch.long) for i in (0, 1))
    chosen = torch.stack([a, b], 1).reshape(-1)
    rejected = torch.stack([b, a], 1).reshape(-1)
    return chosen, rejected, int(max(max(p) for p in pairs)) + 1


def token_reuse(chosen_of: Tensor, rejected_of: Tensor) -> tuple[int, int]:
    """``(Z, M)`` of a token assignment (clusters ``2k``, ``2k+1`` form pair ``k``): ``Z``, the largest
    number of pairs that use one token (the paper's Z), and ``M``, the largest number of clusters
    of *other* pairs with which one cluster shares a token (the M of the chapter's thm-ch3-train;
    ``M <= 4(Z-1)``)."""
    sets = [frozenset((int(chosen_of[2 * k]), int(rejected_of[2 * k]))) for k in range(len(chosen_of) // 2)]
    Z = max(sum(t in s for s in sets) for t in set().union(*sets))
    M = max(2 * sum(bool(s & other) for m, other in enumerate(sets) if m != k) for k, s in enumerate(sets))
    return Z, M


def cluster_means(K: int, d: int, l_b: float, dtype=torch.float64, delta_c: float = 0.0, seed: int = 0) -> Tensor:
    """``mu_{k,+-} = l_b e_0 +- c_k`` (rows ``2k``, ``2k+1``), orthogonal to each other's concepts when
    ``delta_c = 0``: ``c_k = e_{1+k}``, orthogonal to the shared component ``b = l_b e_0``. Needs ``d >= K + 1``.

    ``delta_c > 0``: the paper's ``delta``-approximately orthogonal clusters (its Appendix C), unit
    concepts with ``<c_k, e_{1+k}> = 1 - delta_c^2/8`` exactly, tilted towards a random unit direction
    ``w_k`` orthogonal to ``e_{1+k}`` (drawn from ``seed``; it may have components along ``e_0`` and
    along the other concepts), so ``||c_k - e_{1+k}|| = delta_c/2``."""
    if d < K + 1:
        raise ValueError(f"need d >= K + 1 for orthogonal concepts and shared component (K={K}, d={d})")
    if not 0 <= delta_c <= 2 * math.sqrt(2):
        raise ValueError(f"delta_c={delta_c} must be in [0, 2 sqrt 2] (then 1 - delta_c^2/8 is a cosine)")
    eye = torch.eye(d, dtype=dtype)
    c = eye[1:K + 1].clone()
    if delta_c > 0:
        w = torch.randn(K, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        w[torch.arange(K), torch.arange(1, K + 1)] = 0
        w = w / w.norm(dim=1, keepdim=True)
        cos = 1 - delta_c**2 / 8
        c = cos * c + math.sqrt(1 - cos**2) * w
    return torch.stack([l_b * eye[0] + c, l_b * eye[0] - c], 1).reshape(2 * K, d)


def cluster_data(K: int, Q: int, d: int, v: float, l_b: float, *, shared_tokens: bool = False, Z: int = 1,
                 seed: int = 0, dtype=torch.float64, delta_c: float = 0.0) -> ClusterData:
    """``Q`` i.i.d. samples from each of the ``2K`` clusters ``N(mu_c, v^2 I)`` (:func:`cluster_means`,
    approximately orthogonal when ``delta_c > 0``, tilted from ``seed``), with the tokens of
    :func:`cluster_tokens` (``shared_tokens``, ``Z``).

    The noise is ``v * z`` with ``z`` drawn from ``seed`` alone, so runs that differ only in ``v`` use
    the same ``z`` (common random numbers)."""
    means = cluster_means(K, d, l_b, dtype, delta_c=delta_c, seed=seed + 1)
    chosen_of, rejected_of, vocab = cluster_tokens(K, shared_tokens, Z)
    cluster = torch.arange(2 * K).repeat_interleave(Q)
    z = torch.randn(2 * K * Q, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return ClusterData(means[cluster] + v * z, chosen_of[cluster], rejected_of[cluster], cluster, means,
                       chosen_of, rejected_of, float(v), vocab)


# --------------------------------------------------------------------------------------------------
# Margins and their dynamics (Lemma 4.1)
# --------------------------------------------------------------------------------------------------

def preference_overlap(chosen_a: Tensor, rejected_a: Tensor, chosen_b: Tensor, rejected_b: Tensor) -> Tensor:
    """``(y_wa - y_la)^T (y_wb - y_lb)`` for one-hot tokens, shape ``(len(a), len(b))``:
    2 for the same preference, -2 for the swapped one, +-1 when one token is shared, 0 when disjoint."""
    ca, ra, cb, rb = (x[:, None] if i < 2 else x[None, :] for i, x in enumerate((chosen_a, rejected_a, chosen_b, rejected_b)))
    return ((ca == cb).double() - (ca == rb).double() - (ra == cb).double() + (ra == rb).double())


def margin_kernel(G_a: Tensor, chosen_a: Tensor, rejected_a: Tensor, G_b: Tensor, chosen_b: Tensor,
                  rejected_b: Tensor) -> Tensor:
    """Lemma 4.1's kernel ``C_ab = (y_wa - y_la)^T (y_wb - y_lb) g_a^T g_b`` (preference sharing times
    embedding correlation)."""
    return preference_overlap(chosen_a, rejected_a, chosen_b, rejected_b).to(G_a.dtype) * (G_a @ G_b.T)


def margins(delta_W: Tensor, G: Tensor, chosen: Tensor, rejected: Tensor, beta: float) -> Tensor:
    """Reward margins ``r = beta (y_w - y_l)^T (W - W_0) g``."""
    return beta * ((delta_W[chosen] - delta_W[rejected]) * G).sum(1)


@dataclass
class MarginRun:
    """Margins of :func:`gd_last_layer` at every step: ``train[t, i]`` and ``tests[j][t, i]``; ``delta_W[t]``
    is ``W_t - W_0`` when ``keep_weights``, else only the last one is kept (``delta_W[-1]``)."""

    train: Tensor
    tests: list
    delta_W: list


@dataclass
class PairBlocks:
    """Samples grouped by their preference pair ``(y_w, y_l)``, for fast margins and steps.

    A sample's margin needs only its pair's row difference, ``r_i = beta g_i^T u_p`` with
    ``u_p = (W - W_0)[y_w] - (W - W_0)[y_l]``, and a gradient step only the per-pair sums
    ``sum_{i in p} sigma(-r_i) g_i``. With the features of each pair laid out as one block
    (``blocks``: ``(P, n_max, d)``, zero rows where a pair has fewer samples), both are one batched
    matrix product over the ``P`` pairs, instead of gathering an ``(N, d)`` array of rows of ``W``.
    ``slot`` gives each sample's ``(pair, position)`` in the blocks, in the original order."""

    pairs: Tensor
    blocks: Tensor
    slot: tuple[Tensor, Tensor]

    @classmethod
    def of(cls, G: Tensor, chosen: Tensor, rejected: Tensor) -> "PairBlocks":
        pairs, pair_of = torch.unique(torch.stack([chosen, rejected], 1), dim=0, return_inverse=True)
        order = torch.argsort(pair_of, stable=True)
        counts = torch.bincount(pair_of, minlength=len(pairs))
        first = torch.cumsum(counts, 0) - counts
        position = torch.empty_like(pair_of)
        position[order] = torch.arange(len(G)) - first[pair_of[order]]
        blocks = torch.zeros(len(pairs), int(counts.max()), G.shape[1], dtype=G.dtype)
        blocks[pair_of, position] = G
        return cls(pairs, blocks, (pair_of, position))

    def margins(self, delta_W: Tensor, beta: float) -> Tensor:
        """:func:`margins` of every sample, in the original order."""
        u = delta_W[self.pairs[:, 0]] - delta_W[self.pairs[:, 1]]
        return beta * torch.bmm(self.blocks, u[:, :, None])[..., 0][self.slot]

    def pair_sums(self, weight: Tensor) -> Tensor:
        """``sum_{i in p} weight_i g_i`` for every pair ``p`` (shape ``(P, d)``)."""
        w = torch.zeros(self.blocks.shape[:2], dtype=self.blocks.dtype)
        w[self.slot] = weight
        return torch.bmm(w[:, None, :], self.blocks)[:, 0]


def gd_last_layer(G: Tensor, chosen: Tensor, rejected: Tensor, *, vocab: int, beta: float, lr: float, steps: int,
                  loss: str = "dpo", tests=(), keep_weights: bool = False) -> MarginRun:
    """Full-batch gradient descent on the mean loss ``(1/N) sum_i f(r_i)`` over ``W`` (only ``W - W_0``
    matters), ``f`` the DPO, IPO or SLiC loss of :func:`loss_value`.

    ``grad_W L = -(beta/N) sum_i w_i (y_wi - y_li) g_i^T`` with ``w_i = -f'(r_i)`` (:func:`loss_weight`), so
    a step adds ``lr beta/N sum_i w_i (e_{w_i} - e_{l_i}) g_i^T``: for each pair ``p``, its summed
    ``w_i g_i`` to row ``y_w`` and minus it to row ``y_l`` (:class:`PairBlocks`). ``tests``:
    ``(G, chosen, rejected)`` triples whose margins are recorded too (never trained on)."""
    _check_loss(loss)
    N, d = G.shape
    train_blocks, test_blocks = PairBlocks.of(G, chosen, rejected), [PairBlocks.of(*x) for x in tests]
    dW = torch.zeros(vocab, d, dtype=G.dtype)
    train, outs, Ws = [], [[] for _ in tests], [dW.clone()]
    for t in range(steps + 1):
        r = train_blocks.margins(dW, beta)
        train.append(r)
        for out, blocks in zip(outs, test_blocks):
            out.append(blocks.margins(dW, beta))
        if t == steps:
            break
        push = train_blocks.pair_sums(loss_weight(loss, r)) * (lr * beta / N)
        dW = dW.index_add(0, train_blocks.pairs[:, 0], push).index_add(0, train_blocks.pairs[:, 1], -push)
        if keep_weights:
            Ws.append(dW.clone())
    if not keep_weights:
        Ws = [dW]
    return MarginRun(torch.stack(train), [torch.stack(o) for o in outs], Ws)


def kernel_recursion(C: Tensor, beta: float, lr: float, steps: int, cross=(), loss: str = "dpo") -> tuple[Tensor, list]:
    """Lemma 4.1 for gradient descent on the loss ``f`` (the paper's Section 7: ``-f'`` in place of
    ``sigma(-r)``): ``r_{t+1} = r_t + lr (beta^2/N) C w(r_t)`` from ``r_0 = 0`` with ``w = -f'``
    (:func:`loss_weight`), and for unseen samples ``r~_{t+1} = r~_t + lr (beta^2/N) C~ w(r_t)`` with
    ``C~[a, i] = (y_wa - y_la)^T (y_wi - y_li) g~_a^T g_i``. Returns ``(train (steps+1, N), [test ...])``."""
    N = C.shape[0]
    r = torch.zeros(N, dtype=C.dtype)
    rs, tests = [r], [[torch.zeros(X.shape[0], dtype=C.dtype)] for X in cross]
    for _ in range(steps):
        w = loss_weight(loss, r)
        for out, X in zip(tests, cross):
            out.append(out[-1] + lr * beta**2 / N * (X @ w))
        r = r + lr * beta**2 / N * (C @ w)
        rs.append(r)
    return torch.stack(rs), [torch.stack(o) for o in tests]


def ipo_margins(C: Tensor, beta: float, lr: float, steps: int, cross=()) -> tuple[Tensor, list]:
    """IPO's margins in closed form: its weight ``2(1 - r)`` is linear, so gradient descent is
    ``1 - r_{t+1} = (I - lr A)(1 - r_t)`` with ``A = 2 beta^2 C / N``, hence ``r_t = (I - (I - lr A)^t) 1``,
    and an unseen sample's ``r~_t = lr (2 beta^2/N) C~ sum_{j<t} (I - lr A)^j 1``; computed from the
    eigendecomposition ``C = U diag(lambda) U^T`` (``C`` is positive semi-definite), independently of
    :func:`kernel_recursion`. Returns ``(train (steps+1, N), [test ...])`` like it."""
    N = C.shape[0]
    lam, U = torch.linalg.eigh(C)
    eps = lr * 2 * beta**2 * lam / N                          # I - lr A has eigenvalues 1 - eps
    t = torch.arange(steps + 1, dtype=C.dtype)[:, None]
    small = eps.abs() < 0.5                                   # stable forms where 1 - eps is near 1
    log_x = torch.log1p(-torch.where(small, eps, torch.zeros_like(eps)))
    decay = torch.where(small, -torch.expm1(t * log_x), 1 - (1 - eps) ** t)          # 1 - (1 - eps)^t
    geometric = torch.where(eps == 0, t, decay / torch.where(eps == 0, torch.ones_like(eps), eps))
    one = U.T @ torch.ones(N, dtype=C.dtype)
    train = (decay * one) @ U.T
    partial_sums = (geometric * one) @ U.T                    # sum_{j<t} (I - lr A)^j 1, one row per t
    return train, [lr * 2 * beta**2 / N * partial_sums @ X.T for X in cross]


def gradient_flow_margins(C: Tensor, beta: float, times, tau: float = 1.0, rtol: float = 1e-10,
                          atol: float = 1e-12, loss: str = "dpo") -> np.ndarray:
    """Gradient flow of Lemma 4.1, ``tau dr/dt = (beta^2/N) C w(r)``, ``r(0) = 0``, integrated by
    scipy's adaptive RK45 (independent of the gradient-descent code); ``w = sigma(-r)`` (DPO) or
    ``2(1 - r)`` (IPO; SLiC's indicator has no classical flow). Returns ``(len(times), N)``."""
    from scipy.integrate import solve_ivp

    if loss not in ("dpo", "ipo"):
        raise ValueError(f"loss={loss!r}: the flow is integrated for 'dpo' and 'ipo'")
    Cn = C.detach().cpu().numpy().astype(float)
    N = Cn.shape[0]
    times = np.asarray(times, dtype=float)
    weight = (lambda r: 1 / (1 + np.exp(r))) if loss == "dpo" else (lambda r: 2 * (1 - r))
    sol = solve_ivp(lambda t, r: beta**2 / (N * tau) * (Cn @ weight(r)), (0.0, float(times[-1])),
                    np.zeros(N), t_eval=times, rtol=rtol, atol=atol)
    return sol.y.T


def idealized_margin(t, K: int, beta: float, tau: float = 1.0, loss: str = "dpo"):
    """The noiseless (``v = 0``), distinct-token (``Z = 1``) margin, the same for every sample:
    ``tau dr/dt = (2 beta^2 / K) w(r)``. DPO (``w = sigma(-r)``): ``r = a t + 1 - W(exp(a t + 1))`` with
    ``a = 2 beta^2/(K tau)`` and ``W`` the Lambert W function (from ``r + e^r = a t + 1``); IPO
    (``w = 2(1 - r)``): ``r = 1 - exp(-2 a t)``; SLiC (``w = 1[r < 1]``): ``r = min(1, a t)``.
    Independent of ``l_b``."""
    from scipy.special import lambertw

    _check_loss(loss)
    at = 2 * beta**2 / (K * tau) * np.asarray(t, dtype=float)
    if loss == "ipo":
        return 1 - np.exp(-2 * at)
    if loss == "slic":
        return np.minimum(1.0, at)
    return at + 1.0 - np.real(lambertw(np.exp(at + 1.0)))


def theorem_rates(K: int, beta: float, tau: float = 1.0, loss: str = "dpo") -> tuple[float, float, float]:
    """``(rate_L, rate_U, horizon)`` of the training guarantee for ``loss``. DPO: the paper's Theorem 4.2,
    ``beta^2 t/(8 K tau) <= r_i(t) <= 5 beta^2 t/(K tau)`` for ``t <= tau_1 = K tau log 3 / (5 beta^2)`` (so
    ``r_U(tau_1) = log 3``). For a loss whose weight ``-f'`` lies in ``[q_lo, q_hi]`` on ``[0, r_max]``
    (:data:`WEIGHT_RANGES`) the book's extension (the chapter's thm-ch3-losses) gives
    ``q_lo beta^2 t/(2 K tau)`` and ``10 q_hi beta^2 t/(K tau)`` up to ``r_max K tau/(10 q_hi beta^2)``, which are
    the DPO constants for DPO's ``[1/4, 1/2]`` on ``[0, log 3]``."""
    _check_loss(loss)
    r_max, q_lo, q_hi = WEIGHT_RANGES[loss]
    rate_U = 10 * q_hi * beta**2 / (K * tau)
    return q_lo * beta**2 / (2 * K * tau), rate_U, r_max / rate_U


def book_train_conditions(delta: float, M: int, l_b: float, d: int, v: float, Q: int) -> bool:
    """The conditions of the chapter's own training guarantee (thm-ch3-train) on the event
    ``E_delta``: ``delta (1 + M/2) + M l_b^2/2 <= 3/4``, ``delta < 1 - l_b^2`` and ``d v^2 <= 2Q``, with ``M``
    the largest number of other clusters a cluster shares a token with (:func:`token_reuse`)."""
    return bool(delta * (1 + M / 2) + M * l_b**2 / 2 <= 0.75 and delta < 1 - l_b**2 and d * v**2 <= 2 * Q)


def empirical_rates(C: Tensor, beta: float, tau: float = 1.0, weights: tuple[float, float] = (0.25, 0.5)) -> tuple[float, float]:
    """The deterministic comparison rates of the chapter's sandwich lemma.

    Row ``j`` of ``C`` splits into ``A_j`` (sum of positive entries) and ``B_j`` (sum of the absolute
    negative ones). While every weight ``-f'(r_i)`` lies in ``weights = [q_lo, q_hi]`` (DPO: ``sigma(-r_i)``
    in ``[1/4, 1/2]`` while all margins are in ``[0, log 3]``), ``tau dr_j/dt`` lies in
    ``[(beta^2/N)(q_lo A_j - q_hi B_j), (beta^2/N)(q_hi A_j - q_lo B_j)]``. Returns ``(rho_L, rho_U)``: the
    smallest lower and the largest upper rate over ``j``."""
    return kernel_rates_of_rows(C, beta, C.shape[0], tau, weights)


def kernel_rates_of_rows(rows: Tensor, beta: float, N: int, tau: float, weights: tuple[float, float]) -> tuple[float, float]:
    """:func:`empirical_rates` of some rows of a kernel of ``N`` samples."""
    q_lo, q_hi = weights
    A, B = rows.clamp(min=0).sum(1), (-rows).clamp(min=0).sum(1)
    k = beta**2 / (N * tau)
    return float((k * (q_lo * A - q_hi * B)).min()), float((k * (q_hi * A - q_lo * B)).max())


def kernel_rates(G: Tensor, chosen: Tensor, rejected: Tensor, beta: float, tau: float = 1.0, chunk: int = 1024,
                 weights: tuple[float, float] = (0.25, 0.5)) -> tuple[float, float]:
    """:func:`empirical_rates` of the kernel of ``(G, chosen, rejected)`` without holding the ``N x N``
    kernel: rows are formed ``chunk`` at a time."""
    N = G.shape[0]
    lo, hi = math.inf, -math.inf
    for start in range(0, N, chunk):
        sl = slice(start, start + chunk)
        l, h = kernel_rates_of_rows(margin_kernel(G[sl], chosen[sl], rejected[sl], G, chosen, rejected), beta, N, tau,
                                    weights)
        lo, hi = min(lo, l), max(hi, h)
    return lo, hi


def inner_product_deviation(data: ClusterData, chunk: int = 1024, means: Tensor | None = None) -> float:
    """The ``delta`` of the event ``E_delta``: the largest ``|g_i^T g_j - mu_i^T mu_j|`` over ``i != j`` and
    ``|‖g_i‖^2 - ‖mu_i‖^2 - d v^2|`` over ``i``, for the clusters' means ``mu`` (``means``, one row per
    cluster; default the data's own, ``data.means``; the orthogonal model's for Appendix C)."""
    G, mu = data.features, (data.means if means is None else means)[data.cluster]
    N, d = G.shape
    out = 0.0
    for start in range(0, N, chunk):
        sl = slice(start, start + chunk)
        D = G[sl] @ G.T - mu[sl] @ mu.T
        rows = torch.arange(start, min(start + chunk, N))
        D[rows - start, rows] -= d * data.v**2
        out = max(out, float(D.abs().max()))
    return out


# --------------------------------------------------------------------------------------------------
# Generalization (Theorem 4.3)
# --------------------------------------------------------------------------------------------------

def test_slack(G: Tensor, chosen: Tensor, rejected: Tensor, mean: Tensor, chosen_t: int, rejected_t: int,
               weights: tuple[float, float] = (0.25, 0.5)) -> float:
    """The slack ``s*`` of an unseen sample from a cluster with mean ``mean`` and tokens
    ``(chosen_t, rejected_t)``.

    Its margin obeys ``tau dr~/dt = (beta^2/N) sum_i w_i c_i g_i^T (mu + xi)`` with
    ``c_i = (y_w - y_l)^T (y_wi - y_li)``. With ``a_i = c_i g_i^T mu``, weights ``w_i`` anywhere in
    ``weights = [q_lo, q_hi]`` (DPO: ``sigma(-r_i)`` in ``[1/4, 1/2]``) and perturbations ``|g_i^T xi| <= s``,
    the smallest possible drive is ``f(s) = sum_i phi(a_i - |c_i| s)`` with ``phi(x) = q_lo x`` for ``x >= 0``
    and ``q_hi x`` for ``x < 0``. ``f`` is continuous and decreasing; ``s*`` is its root (found by
    bisection), 0 when ``f(0) <= 0``. So the drive is positive whenever ``max_i |g_i^T xi| < s*`` (over
    ``c_i != 0``)."""
    c = preference_overlap(torch.tensor([chosen_t]), torch.tensor([rejected_t]), chosen, rejected)[0].to(G.dtype)
    a, w = (c * (G @ mean)).cpu().numpy(), c.abs().cpu().numpy()
    keep = w > 0
    return _worst_case_root(a[keep], w[keep], weights)


def worst_case_drive(a: np.ndarray, w: np.ndarray, s: float, weights: tuple[float, float] = (0.25, 0.5)) -> float:
    """``f(s) = sum_i phi(a_i - w_i s)``, ``phi(x) = q_lo x`` (x >= 0) or ``q_hi x`` (x < 0): the smallest value
    of ``sum_i q_i (a_i + w_i e_i)`` over weights ``q_i`` in ``weights = [q_lo, q_hi]`` and ``|e_i| <= s``."""
    q_lo, q_hi = weights
    x = np.asarray(a, float) - np.asarray(w, float) * s
    return float(np.sum(np.where(x >= 0, q_lo * x, q_hi * x)))


def _worst_case_root(a: np.ndarray, w: np.ndarray, weights: tuple[float, float]) -> float:
    if len(a) == 0 or worst_case_drive(a, w, 0.0, weights) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while worst_case_drive(a, w, hi, weights) > 0:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if worst_case_drive(a, w, mid, weights) > 0 else (lo, mid)
    return lo


def cluster_bound(s_star: float, v: float, norms: Tensor, log: bool = False) -> float:
    """Theorem 4.3's bound on one cluster's risk: the union over the training samples that share a
    token (``norms``: their ``||g_i||``) of ``P(|g_i^T xi| >= s*)`` with ``g_i^T xi ~ N(0, v^2 ||g_i||^2)``:
    ``min(1, sum_i 2 Phi(-s*/(v ||g_i||)))``; 1 when ``s* <= 0`` (no guarantee). ``log=True`` returns
    its natural logarithm, finite far below floating point's range."""
    from scipy.special import logsumexp
    from scipy.stats import norm

    if s_star <= 0:
        return 0.0 if log else 1.0
    if v == 0:
        return -math.inf if log else 0.0
    terms = math.log(2) + norm.logsf(s_star / (v * norms.detach().cpu().numpy()))
    out = min(0.0, float(logsumexp(terms)))
    return out if log else math.exp(out)


def union_bound_closed(s_star: float, v: float, max_norm: float, n: int) -> float:
    """The closed form of the same union bound over ``n`` samples (the paper's form, ``n = N``):
    ``min(1, 2 n exp(-s*^2 / (2 v^2 max||g_i||^2)))`` (``2 Phi(-x) <= 2 exp(-x^2/2)``)."""
    if s_star <= 0:
        return 1.0
    return float(min(1.0, 2 * n * math.exp(-s_star**2 / (2 * v**2 * max_norm**2))))


def paper_conditions(Z: int, l_b: float, d: int, v: float, Q: int) -> dict[str, bool]:
    """The conditions of the paper's Theorems 4.2 and 4.3, each with whether it holds:
    ``Z <= 1/(4 l_b^2)``, ``d <= 5Q``, ``v <= 1/(32 sqrt Q)``, ``1/4 <= l_b <= 1/2`` and (Theorem 4.3 only)
    ``Q >= 40``."""
    return {"Z ≤ 1/(4 l_b²)": Z * 4 * l_b**2 <= 1, "d ≤ 5Q": d <= 5 * Q, "v ≤ 1/(32√Q)": v * 32 * math.sqrt(Q) <= 1,
            "1/4 ≤ l_b ≤ 1/2": 0.25 <= l_b <= 0.5, "Q ≥ 40": Q >= 40}


def paper_failure_floor(K, Q):
    """``8 K Q^(9/4) exp(-Q^(3/4)/256)``: a lower bound, whatever the constant ``c > 0``, on the failure
    probability ``8 K Q^(9/4) exp(-min(c sqrt(Q)/5, Q^(3/4)/256))`` of the paper's Theorems 4.2 and 4.3
    (the chapter's thm-ch3-paper-train and thm-ch3-paper-gen; section ch3-probability)
    (the minimum is at most ``Q^(3/4)/256``). Where it is at least 1, "with probability at least
    1 - (failure)" holds for every event and says nothing."""
    Q = np.asarray(Q, dtype=float)
    return 8 * np.asarray(K, dtype=float) * Q**2.25 * np.exp(-Q**0.75 / 256)


def main_text_epsilon(Z: int, v: float) -> float:
    """``epsilon = 1/(16 v (Z + 2))``, the paper's choice (remarks after its Theorems B.3 and B.4) that
    turns the appendix forms into the main-text theorems."""
    return 1 / (16 * v * (Z + 2))


def union_bound_b4(K, Q, Z: int, l_b: float, d: int, v: float, eps: float | None = None):
    """The union bound of the paper's Appendix B.4 (proof of Theorem B.4), as its text gives it: a
    fresh sample is misclassified at ``tau_1`` with probability at most
    ``2 K Q^2 exp(-eps^2 / (2 (1 + l_b^2 + d v^2 + 2 eps v)))``, with ``eps`` the main-text
    :func:`main_text_epsilon` unless given (the chapter's eq-ch3-b4). Not clipped."""
    eps = main_text_epsilon(Z, v) if eps is None else eps
    Q = np.asarray(Q, dtype=float)
    return 2 * np.asarray(K, dtype=float) * Q**2 * np.exp(-eps**2 / (2 * (1 + l_b**2 + d * v**2 + 2 * eps * v)))


def paper_bound(K, Q, rate: float = 45.0):
    """``2 K Q^2 exp(-Q/rate)``; ``rate = 45`` is the bound of the paper's Theorem 4.3 at ``tau_1`` (under
    ``d <= 5Q``, ``v <= 1/(32 sqrt Q)``, ``1/4 <= l_b <= 1/2``, ``Z l_b^2 <= 1/4``, ``Q >= 40``). Its display
    is not readable in the copy of the paper: the form comes from secondary summaries. It follows from
    :func:`union_bound_b4`: under the conditions ``Z <= 4``, so ``eps = 2 sqrt(Q)/(Z + 2) >= sqrt(Q)/3``,
    and any bound of the bracket ``1 + l_b^2 + d v^2 + 2 eps v`` by ``5/2`` gives the exponent ``Q/45``
    (:func:`bracket_max`: the bracket is at most ``1.297``, which gives the book's sharper ``rate``;
    the chapter's thm-ch3-closed-form). Not clipped."""
    Q = np.asarray(Q, dtype=float)
    return 2 * np.asarray(K, dtype=float) * Q**2 * np.exp(-Q / rate)


def bracket_max() -> float:
    """The largest value of ``1 + l_b^2 + d v^2 + 2 eps v`` under the main-text conditions
    (``l_b <= 1/2``, ``d <= 5Q``, ``v <= 1/(32 sqrt Q)``, ``eps v = 1/(16 (Z+2))`` with ``Z >= 1``):
    ``1 + 1/4 + 5/1024 + 1/24``. With ``eps^2 >= Q/9`` the exponent of :func:`union_bound_b4` is then at
    least ``Q / (18 * bracket_max())`` = ``Q/23.3`` (the book's reading of the same bound)."""
    return 1 + 1 / 4 + 5 / 1024 + 2 / (16 * 3)


def required_Q(K: float, target: float = 0.05, rate: float = 45.0) -> float:
    """The sample size per cluster at which :func:`paper_bound` falls to ``target`` on its decreasing
    branch (``Q > 2 rate``, where it peaks): the paper's Figure 4 for ``target = 0.05``, solved by
    bisection (brentq) of ``log(2 K Q^2) - Q/rate = log(target)``."""
    from scipy.optimize import brentq

    f = lambda Q: math.log(2 * K * Q * Q) - Q / rate - math.log(target)
    if f(2 * rate) <= 0:
        return 2 * rate
    hi = 4 * rate
    while f(hi) > 0:
        hi *= 2
    return brentq(f, 2 * rate, hi, xtol=1e-10)


def vacuity_Q(K: float) -> float:
    """The sample size per cluster up to which :func:`paper_failure_floor` is at least 1: its logarithm
    rises from ``Q = 1`` (where it is ``log 8K > 0``) to ``Q = 768^(4/3) ~ 7000`` and then falls;
    the root on the falling branch, by brentq."""
    from scipy.optimize import brentq

    f = lambda Q: math.log(8 * K) + 2.25 * math.log(Q) - Q**0.75 / 256
    lo, hi = 2.0e4, 4.0e4
    while f(hi) > 0:
        hi *= 2
    return brentq(f, lo, hi, xtol=1e-6)


def risk_floor(v: float) -> float:
    """``Phi(-1/v)``: no head does better on a pair of clusters ``N(l_b e_0 +- c_k, v^2 I)`` with
    swapped preferences. Its risk is ``(Phi(-a/v) + Phi(-b/v))/2`` with ``a + b = 2 u^T c_k/||u|| <= 2``
    (Cauchy-Schwarz), at least ``Phi(-(a+b)/(2v)) >= Phi(-1/v)`` by convexity of ``Phi(-x)`` for
    ``x >= 0`` (Jensen), and at least ``1/4 >= Phi(-1/v)`` if ``a`` or ``b`` is negative (for ``v <= 1.48``;
    the chapter's section ch3-fixed-v)."""
    from scipy.stats import norm

    return float(norm.cdf(-1 / v))


def exact_risk(delta_W: Tensor, data: ClusterData, beta: float, log: bool = False) -> np.ndarray:
    """Exact population risk ``P(r~ <= 0)`` of each cluster given the trained head: with
    ``u = beta (W - W_0)^T (y_w - y_l)``, ``r~ = u^T g~ ~ N(u^T mu, v^2 ||u||^2)``, so the risk is
    ``Phi(-u^T mu / (v ||u||))``. ``log=True`` returns ``log`` of it (finite far in the tail)."""
    from scipy.stats import norm

    u = beta * (delta_W[data.chosen_of] - delta_W[data.rejected_of])
    z = -((u * data.means).sum(1) / (data.v * u.norm(dim=1))).cpu().numpy()
    return norm.logcdf(z) if log else norm.cdf(z)


def bounds_for(data: ClusterData, loss: str = "dpo") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per cluster: ``(s*, cluster_bound, its log, union_bound_closed over all N)`` of Theorem 4.3 (the
    book's thm-ch3-gen), with the weight range of ``loss`` (:data:`WEIGHT_RANGES`; the horizon of
    :func:`theorem_rates`)."""
    _check_loss(loss)
    weights = WEIGHT_RANGES[loss][1:]
    G, ch, rj = data.features, data.chosen, data.rejected
    norms = G.norm(dim=1)
    S, B, U = [], [], []
    for c in range(len(data.means)):
        cw, cl = int(data.chosen_of[c]), int(data.rejected_of[c])
        sharing = preference_overlap(torch.tensor([cw]), torch.tensor([cl]), ch, rj)[0] != 0
        s = test_slack(G, ch, rj, data.means[c], cw, cl, weights)
        S.append(s)
        B.append(cluster_bound(s, data.v, norms[sharing], log=True))
        U.append(union_bound_closed(s, data.v, norms.max().item(), len(G)))
    return np.array(S), np.exp(B), np.array(B), np.array(U)


def gaussian_plugin_risk(u: Tensor, mean: Tensor, cov: Tensor) -> float:
    """``P(u^T g <= 0)`` for ``g ~ N(mean, cov)``: ``Phi(-u^T mean / sqrt(u^T cov u))`` (the Gaussian
    cluster model fitted to data, with its measured, anisotropic covariance)."""
    from scipy.stats import norm

    return float(norm.cdf(-(u @ mean).item() / math.sqrt(max((u @ cov @ u).item(), 1e-300))))


# --------------------------------------------------------------------------------------------------
# The theory's quantities measured on real features
# --------------------------------------------------------------------------------------------------

def cluster_geometry(features: Tensor, s, groups) -> dict:
    """Fit the paper's cluster model to labelled features.

    Behaviour ``k``'s two clusters are its statements with ``s = +1`` and ``s = -1``; the model has
    ``mu_{k,+-} = b +- c_k``, so ``c_k = (mu_k^+ - mu_k^-)/2`` and ``b_k = (mu_k^+ + mu_k^-)/2``. Features are
    rescaled so that the concepts have unit mean norm (the model's ``||c_k|| = 1``). Returns the scale,
    ``l_b = ||mean_k b_k||``, the spread of the ``b_k`` around it, ``v`` (root mean within-cluster variance
    per coordinate), the concept norms, the largest ``|cos|`` between two concepts and between a concept
    and ``b``, and ``v sqrt(d)``."""
    s = torch.as_tensor(s)
    labels = list(groups)
    names = list(dict.fromkeys(labels))
    idx = {k: torch.tensor([i for i, g in enumerate(labels) if g == k]) for k in names}
    c, b, resid = [], [], []
    for k in names:
        x, sk = features[idx[k]], s[idx[k]]
        mp, mm = x[sk == 1].mean(0), x[sk == -1].mean(0)
        c.append((mp - mm) / 2)
        b.append((mp + mm) / 2)
        resid += [x[sk == 1] - mp, x[sk == -1] - mm]
    c, b, resid = torch.stack(c), torch.stack(b), torch.cat(resid)
    scale = c.norm(dim=1).mean().item()
    c, b, resid = c / scale, b / scale, resid / scale
    bbar = b.mean(0)
    cn = c / c.norm(dim=1, keepdim=True)
    cos = cn @ cn.T
    off = cos[~torch.eye(len(names), dtype=torch.bool)].abs()
    v = resid.pow(2).mean().sqrt().item()
    return dict(scale=scale, l_b=bbar.norm().item(), b_spread=(b - bbar).norm(dim=1).max().item(),
                v=v, v_sqrt_d=v * math.sqrt(features.shape[1]), concept_norms=c.norm(dim=1).numpy(),
                max_cos_concepts=off.max().item() if len(off) else 0.0,
                max_cos_concept_b=(cn @ (bbar / bbar.norm())).abs().max().item(), cos=cos.numpy(), names=names)


def adam_last_layer(features: Tensor, s, *, beta: float, lr: float, steps: int, betas=(0.9, 0.999),
                    eps: float = 1e-8, frozen_weights: bool = False) -> Tensor:
    """Full-batch Adam (the paper's last-layer training, its Appendix F: Adam, learning rate ``lr``) on
    the mean DPO loss of the head ``W``, for one token pair (" Yes" preferred when ``s = +1``).

    Only the two rows move and ``W - W_0 = u v^T`` with ``u = e_Yes - e_No``: the loss depends on ``W``
    through ``r = 2 beta s v^T g`` alone, so every other row has zero gradient and Adam leaves it at
    ``W_0``; the gradient of the " No" row is minus that of the " Yes" row, ``G = -(beta/N) sum_i
    sigma(-r_i) s_i g_i``, and Adam's update of the " No" row is minus that of the " Yes" row. So ``v``
    follows Adam on ``G`` (bias-corrected moments, PyTorch's order of operations). ``frozen_weights``:
    every ``sigma(-r_i)`` held at its initial ``1/2``, so ``G`` is constant and each step moves ``v`` by
    exactly ``-lr G/(|G| + eps)`` (the chapter's constant-weight regime). Returns ``v`` at every step,
    shape ``(steps + 1, d)``."""
    sign = torch.as_tensor(s).to(features.dtype)
    v = torch.zeros(features.shape[1], dtype=features.dtype)
    m, w = torch.zeros_like(v), torch.zeros_like(v)
    out = [v.clone()]
    b1, b2 = betas
    for t in range(1, steps + 1):
        r = 2 * beta * sign * (features @ v)
        weight = torch.full_like(r, 0.5) if frozen_weights else torch.sigmoid(-r)
        G = -(beta / len(features)) * ((weight * sign)[:, None] * features).sum(0)
        m = b1 * m + (1 - b1) * G
        w = b2 * w + (1 - b2) * G * G
        v = v - lr / (1 - b1**t) * m / ((w / (1 - b2**t)).sqrt() + eps)
        out.append(v.clone())
    return torch.stack(out)


def gaussian_fit(features: Tensor, groups) -> tuple[float, float]:
    """The paper's Gaussian-cluster diagnostics (its Appendix E) on the features of each group (e.g.
    the behaviour-matching statements of each persona), as the authors normalise them: all features
    scaled together so that their mean squared norm is 1 (``persona_structure.ipynb``: the trace of
    ``X X^T`` over the number of rows), then per group the Frobenius norm of the covariance matrix (``1/n``
    normalisation) and the mean squared distance to the group's mean (its trace), each averaged over
    groups."""
    labels = list(groups)
    x_all = features / features.pow(2).sum(1).mean().sqrt()
    fro, dist = [], []
    for g in dict.fromkeys(labels):
        x = x_all[torch.tensor([i for i, k in enumerate(labels) if k == g])]
        centred = x - x.mean(0)
        fro.append(torch.linalg.matrix_norm(centred.T @ centred / len(x)).item())
        dist.append(centred.pow(2).sum(1).mean().item())
    return float(np.mean(fro)), float(np.mean(dist))


def subset_mean_average(means: Tensor, K: int, F, counts=None, chunk: int = 4096) -> float:
    """The average of ``F(m_S)`` over every subset ``S`` of ``K`` of the groups whose means are the rows of
    ``means``, ``m_S`` the pooled mean ``sum_{k in S} n_k m_k / sum_{k in S} n_k`` (``counts`` ``n_k``; equal when
    ``None``), by enumeration (``F`` maps a ``(n, d)`` batch of means to ``n`` values). The chapter's
    K-dilution proposition (thm-ch3-dilution): for equal counts and convex ``F`` it never rises with ``K``."""
    from itertools import combinations, islice

    B = means.shape[0]
    n = torch.ones(B, dtype=means.dtype) if counts is None else torch.as_tensor(counts, dtype=means.dtype)
    subsets = combinations(range(B), K)
    total, count = 0.0, 0
    while block := list(islice(subsets, chunk)):
        idx = torch.tensor(block)
        wts = n[idx] / n[idx].sum(1, keepdim=True)
        total += float(F((wts[:, :, None] * means[idx]).sum(1)).sum())
        count += len(block)
    return total / count


def adam_frozen_margin(m: Tensor, beta: float, lr: float, steps: int, eps: float = 1e-8) -> Tensor:
    """The mean training margin after ``steps`` full-batch Adam steps with every weight frozen at
    ``sigma(0) = 1/2`` (:func:`adam_last_layer` with ``frozen_weights``), for the signed means ``m`` (rows)
    of the statements of a run: ``G = -(beta/2) m``, each step moves ``v`` by ``lr (beta/2) m/((beta/2)|m| + eps)``,
    so the mean margin ``2 beta v^T m`` is ``2 beta steps lr sum_d (beta/2) m_d^2/((beta/2)|m_d| + eps)``, a
    convex function of ``m`` (``x^2/(|x| + c)`` is convex)."""
    half = beta / 2 * m
    return 2 * beta * steps * lr * (half * m / (half.abs() + eps)).sum(-1)


def no_flip_odds(beta: float, r_max: float = LOG3) -> float:
    """The reference odds against the preferred response beyond which a pair cannot be flipped while
    its margin is at most ``r_max``: ``exp(r_max/beta)``, ``3^(1/beta)`` for the paper's ``r_max = log 3``
    (its Section 7). The policy prefers ``y_w`` iff ``log pi_ref(y_w)/pi_ref(y_l) + r/beta > 0`` (single
    tokens: ``r/beta`` is the change of the log-odds), which fails when the reference log-odds are below
    ``-r_max/beta`` and ``r <= r_max``."""
    return math.exp(r_max / beta)


def group_cosines(features: Tensor, groups, centre: bool = False) -> tuple[np.ndarray, list]:
    """The paper's Figure 3: the average cosine similarity between the features of two groups (over
    all pairs of one feature from each, the same feature included on the diagonal), for every pair of
    groups; ``centre=True`` first subtracts the shared component, the mean of all the features.
    Returns the matrix and the group names (in order of first appearance)."""
    labels = list(groups)
    names = list(dict.fromkeys(labels))
    x = features - features.mean(0) if centre else features
    unit = x / x.norm(dim=1, keepdim=True)
    means = torch.stack([unit[torch.tensor([i for i, k in enumerate(labels) if k == g])].mean(0) for g in names])
    return (means @ means.T).numpy(), names
