r"""Alignment from demonstrations (AfD): Sun & van der Schaar, "Inverse-RLignment", arXiv:2405.15624.

Section numbers are the paper's (its method sections, readable as LaTeX: Sec. 2 frames alignment as
an MDP, Sec. 3 derives the algorithms; its experiments are Sec. 4). The chapter
``ch05-alignment-from-demonstrations`` derives, and this module computes:

* **the toy MDP** (Sec. 2.1): generation as a deterministic-transition MDP whose state is the prefix
  and whose action is the next token. :class:`TokenTree` enumerates every response of at most ``T``
  tokens over a small vocabulary, so trajectory distributions ``d^pi(y)``, state occupancies
  ``rho^pi(s)`` and every KL are exact finite sums; :func:`tabular_policy` realises any distribution
  over the responses as a tabular policy;
* **forward KL = SFT, and mass-covering** (Sec. 3.1, the forward-KL part and its take-away box, where
  mass-covering versus mode-seeking is a cited fact): :func:`forward_kl_three_ways` returns the
  trajectory KL ``KL(d^beta || d^pi)``, the occupancy-weighted per-state KL and the SFT form
  ``E_{d^beta}[-log d^pi] - H(d^beta)``, equal by the chain rule; :func:`population_sft_loss` is the
  summed or the mean per-token SFT loss, whose minimiser :func:`per_token_sft_optimum` is
  ``d^beta(y)/|y|`` renormalised; :func:`fit_gaussian` fits one Gaussian by forward or reverse KL;
* **the discriminator** (Sec. 3.1, reverse KL: ``D* = d^beta/(d^beta + d^pi)``; Sec. 3.2, the IRL
  reward model "the reward is the discriminator's logit"): :func:`fit_logistic` is (weighted,
  L2-regularised) logistic regression; at the population optimum its logit is ``log d^+ - log d^-``
  plus the log prior odds; :func:`fit_bradley_terry` is the preference baseline (BT-RM) of Table 1;
* **extrapolation** (Sec. 3.2, "extrapolating over reward models"): :func:`extrapolate` gives
  ``pi_SFT^{1+lambda} pi_0^{-lambda}``, the KL-regularised optimum from ``pi_SFT`` with the Init-SFT
  log-ratio reward; :func:`toy_sft` is the toy's early-stopped SFT and :func:`extrapolation_curve`
  the forward KL to the demonstrator along the extrapolation;
* **Best-of-N** (the paper's evaluation, Sec. 4): :func:`best_of_n_distribution` (exact pmf
  ``F(y)^N - F^-(y)^N``, shared within reward ties in proportion to ``pi``), :func:`bon_kl` (its KL
  from ``pi``), :func:`bon_kl_bound` (``log N - (N-1)/N``, Beirami et al. 2024, Thm. 3.1; strict on a
  finite set for ``N >= 2``), :func:`pool_bon_kl` (the exact KL on a pool's empirical distribution)
  and :func:`expected_best_of_n` (the unbiased order-statistics estimator from a pool of ``M >= N``
  samples).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import objectives, tabular

# --------------------------------------------------------------------------------------------
# 1. The enumerable autoregressive toy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenTree:
    """Every response of at most ``T`` tokens over ``n_words`` ordinary tokens plus ``EOS``.

    Token ids ``0 .. n_words-1`` are words and ``n_words`` is EOS. A *state* is a prefix of words
    (EOS ends a response, so it never occurs inside a state); states are the prefixes of length
    ``0 .. T-1``, indexed in :attr:`states`. A response ends at EOS or is cut off after ``T``
    tokens, as ``max_new_tokens`` does. The transition ``s' = s + (a,)`` is deterministic: the
    MDP of the paper's Sec. 2.1 with the prompt fixed.
    """

    n_words: int
    T: int

    @property
    def eos(self) -> int:
        return self.n_words

    @property
    def n_actions(self) -> int:
        return self.n_words + 1

    @property
    def states(self) -> list[tuple[int, ...]]:
        return [s for t in range(self.T) for s in itertools.product(range(self.n_words), repeat=t)]

    @property
    def responses(self) -> list[tuple[int, ...]]:
        ended = [s + (self.eos,) for s in self.states]
        cut = list(itertools.product(range(self.n_words), repeat=self.T))
        return ended + cut

    @property
    def lengths(self) -> Tensor:
        """``|y|``, the number of tokens of every response (its EOS included), float64."""
        return torch.tensor([len(y) for y in self.responses], dtype=torch.float64)

    def steps(self) -> list[list[tuple[int, int]]]:
        """For each response, its (state index, action) pairs in order."""
        index = {s: i for i, s in enumerate(self.states)}
        return [[(index[y[:t]], y[t]) for t in range(len(y))] for y in self.responses]

    def random_logits(self, generator: torch.Generator, scale: float = 1.0) -> Tensor:
        """A random tabular policy: logits of shape ``(n_states, n_actions)``, float64."""
        return scale * torch.randn(len(self.states), self.n_actions, generator=generator, dtype=torch.float64)


def trajectory_logprobs(tree: TokenTree, logits: Tensor) -> Tensor:
    """``log d^pi(y) = sum_t log pi(y_t | s_t)`` for every response of ``tree`` (paper's d^pi(y|x))."""
    log_pi = F.log_softmax(logits, -1)
    return torch.stack([sum(log_pi[s, a] for s, a in path) for path in tree.steps()])


def tabular_policy(tree: TokenTree, log_d: Tensor) -> Tensor:
    """Logits of the tabular policy whose trajectory distribution is ``exp(log_d)`` (any distribution
    over ``tree.responses`` with full support): by the chain rule ``pi(a | s) = m(s + (a,)) / m(s)``,
    with ``m(s)`` the mass of the responses that pass through the prefix ``s`` (for ``a`` = EOS, the
    mass of the response ``s + (EOS,)``). So ``trajectory_logprobs(tree, tabular_policy(tree, log_d))
    == log_d``: every distribution over responses is a policy of the token MDP."""
    d = log_d.exp()
    index = {s: i for i, s in enumerate(tree.states)}
    mass = torch.zeros(len(tree.states), tree.n_actions, dtype=d.dtype)
    for j, y in enumerate(tree.responses):
        for t in range(len(y)):
            mass[index[y[:t]], y[t]] += d[j]
    return mass.log()


def state_occupancy(tree: TokenTree, logits: Tensor) -> Tensor:
    """``rho^pi(s) = Pr(the response passes through prefix s)`` (undiscounted, gamma = 1).

    Computed forward, independently of :func:`trajectory_logprobs`: rho(root) = 1 and
    rho(s + (w,)) = rho(s) pi(w | s) for a word ``w``.
    """
    pi = torch.softmax(logits, -1)
    index = {s: i for i, s in enumerate(tree.states)}
    rho = torch.zeros(len(tree.states), dtype=logits.dtype)
    for s, i in index.items():
        rho[i] = 1.0 if not s else rho[index[s[:-1]]] * pi[index[s[:-1]], s[-1]]
    return rho


def forward_kl_three_ways(tree: TokenTree, logits_beta: Tensor, logits_pi: Tensor) -> dict[str, Tensor]:
    """The forward KL between demonstrator ``beta`` and policy ``pi``, three ways (chapter,
    thm-forward-kl-sft; the paper's forward-KL equation of Sec. 3.1).

    * ``trajectory``: ``sum_y d^beta(y) log(d^beta(y) / d^pi(y))``;
    * ``occupancy``: ``sum_s rho^beta(s) KL(pi_beta(.|s) || pi(.|s))``;
    * ``sft``: ``E_{d^beta}[-log d^pi(y)] - H(d^beta)``, the SFT loss (:func:`objectives.sft_nll`)
      minus a constant that does not depend on ``pi``.
    """
    lb, lp = trajectory_logprobs(tree, logits_beta), trajectory_logprobs(tree, logits_pi)
    d_beta = lb.exp()
    trajectory = (d_beta * (lb - lp)).sum()
    log_beta_a, log_pi_a = F.log_softmax(logits_beta, -1), F.log_softmax(logits_pi, -1)
    per_state = (log_beta_a.exp() * (log_beta_a - log_pi_a)).sum(-1)
    occupancy = (state_occupancy(tree, logits_beta) * per_state).sum()
    nll = population_sft_loss(tree, lb, logits_pi, per_token=False)
    entropy = -(d_beta * lb).sum()
    return {"trajectory": trajectory, "occupancy": occupancy, "sft": nll - entropy, "sft_nll": nll,
            "entropy": entropy}


def population_sft_loss(tree: TokenTree, log_d_beta: Tensor, logits_pi: Tensor, per_token: bool) -> Tensor:
    """The SFT loss on the demonstrator's whole distribution: ``E_{d^beta}[-log d^pi(y)]`` (the summed
    NLL, the forward KL of thm-forward-kl-sft up to ``H(d^beta)``) or, with ``per_token``,
    ``E_{d^beta}[-log d^pi(y) / |y|]`` (the mean per-token NLL that :func:`prefdyn.objectives.sft_nll`
    gives with the lengths; chapter, prop-per-token-sft)."""
    nll = objectives.sft_nll(trajectory_logprobs(tree, logits_pi), tree.lengths if per_token else None)
    return (log_d_beta.exp() * nll).sum()


def per_token_sft_optimum(tree: TokenTree, log_d_beta: Tensor) -> Tensor:
    """``log q`` with ``q(y) = d^beta(y) / |y| / Z``: the minimiser of the mean per-token SFT loss over all
    distributions on the responses (chapter, prop-per-token-sft). It is ``d^beta`` only if every
    response has the same length: the per-token mean weights each demonstration by ``1/|y|``."""
    return torch.log_softmax(log_d_beta - tree.lengths.log(), -1)


# --------------------------------------------------------------------------------------------
# 2. Forward versus reverse KL on a bimodal density (grid quadrature)
# --------------------------------------------------------------------------------------------


def normal_logpdf(x: Tensor, mu, sigma) -> Tensor:
    return -0.5 * ((x - mu) / sigma) ** 2 - torch.log(torch.as_tensor(sigma, dtype=x.dtype)) - 0.5 * math.log(2 * math.pi)


def mixture_logpdf(x: Tensor, means: Sequence[float], sigma: float, weights: Sequence[float] | None = None) -> Tensor:
    """Log density of ``sum_k w_k N(means_k, sigma^2)`` (equal weights by default)."""
    w = torch.full((len(means),), 1 / len(means), dtype=x.dtype) if weights is None else torch.as_tensor(weights, dtype=x.dtype)
    comps = torch.stack([normal_logpdf(x, m, sigma) for m in means]) + w.log()[:, None]
    return torch.logsumexp(comps, 0)


def kl_on_grid(log_p: Tensor, log_q: Tensor, x: Tensor) -> Tensor:
    """``KL(p || q) = int p log(p/q) dx`` by the trapezoid rule on the grid ``x``."""
    return torch.trapezoid(log_p.exp() * (log_p - log_q), x)


def fit_gaussian(log_p: Tensor, x: Tensor, direction: str, mu0: float, sigma0: float,
                 steps: int = 200) -> tuple[float, float, float]:
    """Fit ``q = N(mu, sigma^2)`` to the density ``exp(log_p)`` on grid ``x`` by L-BFGS.

    ``direction="forward"`` minimises ``KL(p || q)`` (what SFT minimises: mass-covering; its
    minimiser matches the mean and variance of ``p``); ``"reverse"`` minimises ``KL(q || p)``
    (the adversarial objective: mode-seeking). Returns ``(mu, sigma, KL at the optimum)``.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction={direction!r} must be 'forward' or 'reverse'")
    theta = torch.tensor([mu0, math.log(sigma0)], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def objective():
        log_q = normal_logpdf(x, theta[0], theta[1].exp())
        return kl_on_grid(log_p, log_q, x) if direction == "forward" else kl_on_grid(log_q, log_p, x)

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(theta[0]), float(theta[1].exp()), float(objective())


# --------------------------------------------------------------------------------------------
# 3. The discriminator, the IRL reward and extrapolation
# --------------------------------------------------------------------------------------------


@dataclass
class LogisticModel:
    """A linear discriminator ``D(z) = sigma(w . (z - mean)/scale + b)``; its logit is the reward."""

    weight: Tensor
    bias: Tensor
    mean: Tensor
    scale: Tensor

    def logit(self, features: Tensor) -> Tensor:
        z = (features.to(self.weight.dtype) - self.mean) / self.scale
        return z @ self.weight + self.bias


def fit_logistic(positive: Tensor, negative: Tensor, l2: float = 0.0, pos_weight: Tensor | None = None,
                 neg_weight: Tensor | None = None, standardize: bool = True, max_iter: int = 100) -> LogisticModel:
    r"""Logistic regression of "positive" (label 1) against "negative" (label 0) by Newton's method, float64.

    Minimises ``L = [sum_i w_i softplus(-f(z_i)) + sum_j w_j softplus(f(z_j))] / sum w + l2/2 |w|^2``
    over ``f(z) = w.z + b``, with per-example weights (default 1; a *population* loss when the
    weights are probabilities). Without ``l2`` and with enough capacity (e.g. one-hot features), the
    minimiser satisfies ``sigma(f(z)) = D*(z) = w_+ d^+(z) / (w_+ d^+(z) + w_- d^-(z))``, so the logit
    is ``log d^+(z) - log d^-(z)`` plus the log prior odds — the paper's ``D*`` (Sec. 3.1) and its
    IRL reward ``log D - log(1 - D)`` (Sec. 3.2); chapter, thm-discriminator.
    ``L`` is convex, so damped Newton steps (minimum-norm solutions where the Hessian is singular,
    halved until ``L`` does not rise) converge to machine precision in a few dozen iterations.
    Features are standardised with the pooled mean and standard deviation (``standardize``).
    """
    pos, neg = positive.to(torch.float64), negative.to(torch.float64)
    wp = torch.ones(len(pos), dtype=torch.float64) if pos_weight is None else pos_weight.to(torch.float64)
    wn = torch.ones(len(neg), dtype=torch.float64) if neg_weight is None else neg_weight.to(torch.float64)
    both = torch.cat([pos, neg])
    mean = both.mean(0) if standardize else torch.zeros(both.shape[1], dtype=torch.float64)
    scale = both.std(0).clamp_min(1e-8) if standardize else torch.ones(both.shape[1], dtype=torch.float64)
    Z = torch.cat([(both - mean) / scale, torch.ones(len(both), 1, dtype=torch.float64)], 1)
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).to(torch.float64)
    w = torch.cat([wp, wn]) / (wp.sum() + wn.sum())
    ridge = torch.full((Z.shape[1],), float(l2), dtype=torch.float64)
    ridge[-1] = 0.0                                           # the bias is not penalised

    def loss(theta):
        f = Z @ theta
        return (w * (F.softplus(f) - y * f)).sum() + 0.5 * (ridge * theta ** 2).sum()

    theta = torch.zeros(Z.shape[1], dtype=torch.float64)
    current = loss(theta)
    for _ in range(max_iter):
        p = torch.sigmoid(Z @ theta)
        grad = Z.T @ (w * (p - y)) + ridge * theta
        hess = (Z * (w * p * (1 - p))[:, None]).T @ Z + torch.diag(ridge)
        if l2 > 0:                                              # positive definite: a Cholesky solve
            step = torch.cholesky_solve(grad[:, None], torch.linalg.cholesky(hess))[:, 0]
        else:                                                   # possibly singular: minimum-norm step
            step = torch.linalg.lstsq(hess, grad[:, None], driver="gelsd").solution[:, 0]
        t = 1.0
        while t > 1e-10:
            candidate = loss(theta - t * step)
            if candidate <= current:
                break
            t /= 2
        else:
            break
        theta, current = theta - t * step, candidate
        if float(grad @ step) < 1e-24:                          # Newton decrement: converged
            break
    return LogisticModel(theta[:-1], theta[-1], mean, scale)


def classification_accuracy(model: LogisticModel, positive: Tensor, negative: Tensor) -> float:
    """Balanced accuracy: mean of the hit rates on the two classes (threshold logit 0)."""
    return 0.5 * ((model.logit(positive) > 0).double().mean().item() + (model.logit(negative) <= 0).double().mean().item())


def fit_bradley_terry(preferred: Tensor, dispreferred: Tensor, l2: float = 0.0) -> LogisticModel:
    r"""The preference baseline of the paper's Table 1 (BT-RM): a linear reward ``r(z) = w . z / scale``
    fitted by maximum likelihood under Bradley-Terry, ``P(y_w > y_l) = sigma(r(z_w) - r(z_l))``, with
    the L2 penalty ``l2`` on the standardised weights.

    It is :func:`fit_logistic` on the differences ``z_w - z_l`` (label 1) and ``z_l - z_w`` (label 0):
    the logistic loss of the two is ``softplus(-f(z_w - z_l)) + softplus(f(z_l - z_w))``, twice the
    Bradley-Terry loss once the bias vanishes, and it does (the loss is even in the bias, so its
    minimiser is 0). The pooled differences have mean 0, so the returned model's ``logit(z)`` is the
    reward ``r(z)`` itself, defined up to the constant that BT cannot identify."""
    diff = preferred.to(torch.float64) - dispreferred.to(torch.float64)
    return fit_logistic(diff, -diff, l2=l2)


def kl_divergence(log_q: Tensor, log_p: Tensor) -> float:
    """``KL(q || p) = sum_y q(y) (log q(y) - log p(y))`` of two distributions on one finite set, given
    by their log-probabilities."""
    q = log_q.exp()
    return (torch.special.xlogy(q, q) - q * log_p).sum().item()


def expected_reward(log_q: Tensor, reward: Tensor) -> float:
    """``J(q) = E_{y ~ q}[r(y)]``, the frozen-discriminator objective of the chapter's
    prop-frozen-discriminator, for a distribution given by its log-probabilities."""
    return (log_q.exp() * reward).sum().item()


def leashed_optimum(log_pi: Tensor, reward: Tensor, lam: float) -> Tensor:
    """``log q_lambda``, ``q_lambda ∝ pi exp(lambda r)``: the maximiser of ``J(q) - KL(q || pi)/lambda``
    (chapter, prop-frozen-discriminator item 3), the RLHF optimum with reference ``pi`` and
    ``beta = 1/lambda`` (:func:`prefdyn.tabular.rlhf_optimum`)."""
    return tabular.rlhf_optimum(log_pi, reward, beta=1 / lam)


def extrapolate(log_pi_sft: Tensor, log_pi_init: Tensor, lam: float) -> Tensor:
    """``log`` of ``pi_SFT^{1+lam} pi_0^{-lam} / Z``: the optimum of KL-regularised optimisation from
    ``pi_SFT`` with strength ``1/lam`` and reward ``log pi_SFT - log pi_0`` (chapter, thm-extrapolation)."""
    return torch.log_softmax((1 + lam) * log_pi_sft - lam * log_pi_init, -1)


def toy_sft(tree: TokenTree, logits_beta: Tensor, logits_0: Tensor, steps: int, lr: float) -> Tensor:
    """Early-stopped SFT in the toy: ``steps`` steps of gradient descent (learning rate ``lr``) on the
    exact summed SFT loss toward ``pi_beta``, from ``pi_0``'s logits. Returns the SFT policy's logits."""
    theta = logits_0.clone().requires_grad_(True)
    opt = torch.optim.SGD([theta], lr=lr)
    log_d_beta = trajectory_logprobs(tree, logits_beta)
    for _ in range(steps):
        opt.zero_grad()
        population_sft_loss(tree, log_d_beta, theta, per_token=False).backward()
        opt.step()
    return theta.detach()


def extrapolation_curve(log_pi_sft: Tensor, log_pi_init: Tensor, log_d_beta: Tensor,
                        lambdas: Sequence[float]) -> np.ndarray:
    """``KL(d^beta || pi_lambda)`` for each ``lambda``, with ``pi_lambda`` the extrapolation
    :func:`extrapolate` (``lambda = 0``: ``pi_SFT``); chapter, thm-extrapolation."""
    d_beta = log_d_beta.exp()
    return np.array([(d_beta * (log_d_beta - extrapolate(log_pi_sft, log_pi_init, lam))).sum().item()
                     for lam in lambdas])


# --------------------------------------------------------------------------------------------
# 4. Best-of-N
# --------------------------------------------------------------------------------------------


def best_of_n_distribution(log_p: Tensor, reward: Tensor, N: int) -> Tensor:
    r"""Exact pmf of Best-of-N: draw ``N`` i.i.d. ``y ~ p``, keep the one of highest reward.

    With ``F(y) = P(r(Y) <= r(y))`` and ``F^-(y) = P(r(Y) < r(y))``, the reward class of ``y`` wins
    with probability ``F^N - F^{-N}`` (Beirami et al. 2024, Lemma 1); ties are broken uniformly at
    random, so within a class of equal reward ``y`` gets a share proportional to ``p(y)``.
    """
    if N < 1:
        raise ValueError(f"N={N} must be >= 1")
    p = log_p.exp()
    r = reward.to(torch.float64)
    values, cls = torch.unique(r, sorted=True, return_inverse=True)     # reward classes, ascending
    mass = torch.zeros(len(values), dtype=p.dtype).scatter_add_(0, cls, p)
    le = torch.cumsum(mass, 0)                                           # F at each class
    lt = le - mass                                                       # F^- at each class
    return p / mass[cls] * (le[cls] ** N - lt[cls] ** N)


def bon_kl(log_p: Tensor, reward: Tensor, N: int) -> float:
    """``KL(pi_N || p)`` of the Best-of-N distribution (:func:`best_of_n_distribution`) from ``p``."""
    bon = best_of_n_distribution(log_p, reward, N)
    return (torch.special.xlogy(bon, bon) - bon * log_p).sum().item()


def pool_bon_kl(reward: np.ndarray, N: int) -> np.ndarray:
    """``KL(pi_N || p)`` for each row of a pool (shape ``(prompts, M)``), ``p`` the pool's empirical
    distribution (each of its ``M`` samples an atom of mass ``1/M``) and ``pi_N`` Best-of-N drawn from
    it (:func:`bon_kl`; equal rewards, such as a response sampled twice, form one reward class).
    It is exact for that distribution and at most :func:`bon_kl_bound`; as an estimate of the KL
    of Best-of-N from the policy that produced the pool it errs low, the more so as ``N`` nears
    ``M`` (the pool has no tail beyond its ``M`` samples)."""
    reward = np.atleast_2d(np.asarray(reward, float))
    P, M = reward.shape
    uniform = torch.full((M,), -math.log(M), dtype=torch.float64)
    return np.array([bon_kl(uniform, torch.as_tensor(row, dtype=torch.float64), N) for row in reward])


def bon_kl_bound(N: int | np.ndarray) -> np.ndarray | float:
    """``log N - (N-1)/N``: an upper bound on ``KL(pi_N || p)`` (Beirami et al. 2024, Thm. 3.1; chapter,
    thm-bon). On a finite set it is strict for every ``N >= 2``, with or without reward ties: the
    density ``N u^(N-1)`` it integrates is not constant on any reward class of positive mass. It is
    attained only in the atomless limit (and at ``N = 1``, where both sides are 0)."""
    N = np.asarray(N, dtype=float)
    return np.log(N) - (N - 1) / N


def expected_best_of_n(reward: np.ndarray, score: np.ndarray, N: int) -> np.ndarray:
    r"""Unbiased estimate of ``E[score of the Best-of-N pick]`` from a pool of ``M >= N`` samples.

    ``reward`` and ``score`` have shape ``(prompts, M)``. The value is the average, over all
    ``C(M, N)`` subsets of the pool, of the score of the subset's highest-reward member (ties
    broken uniformly at random). Sorting the pool by reward, the ``i``-th smallest (1-based) is
    the maximum of ``C(i-1, N-1)`` subsets, so it gets weight ``C(i-1, N-1) / C(M, N)``; members of
    a reward tie first share their mean score, which is what random tie-breaking averages to.
    Each subset is an i.i.d. draw of ``N`` samples, so the estimate is unbiased for every ``N <= M``.
    """
    reward, score = np.atleast_2d(np.asarray(reward, float)), np.atleast_2d(np.asarray(score, float))
    P, M = reward.shape
    if score.shape != reward.shape or not 1 <= N <= M:
        raise ValueError(f"need reward and score of the same shape (prompts, M) and 1 <= N <= M (N={N}, M={M})")
    weights = np.array([math.comb(i - 1, N - 1) for i in range(1, M + 1)], float) / math.comb(M, N)
    out = np.empty(P)
    for k in range(P):
        order = np.argsort(reward[k], kind="stable")
        r, s = reward[k][order], score[k][order].copy()
        for value in np.unique(r):
            tied = r == value
            s[tied] = s[tied].mean()
        out[k] = weights @ s
    return out
