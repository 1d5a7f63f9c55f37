"""Learning dynamics of DPO on the last layer: preference distinguishability and its consequences.

The setting of Im & Li (ICML 2024), "Understanding the Learning Dynamics of Alignment with Human
Feedback", arXiv:2403.18742, in the form their released code trains (``last_layer_training.py``):

* a frozen feature map ``g(x)`` in R^d (the last prompt token's final hidden state, after the
  final norm) and a trainable unembedding ``W`` in R^{V x d}: ``pi_W(y|x) = softmax(W g(x))_y``;
* single-token answers ``y in {Yes, No}``; ``s(x) = +1`` when the preferred answer is Yes and
  ``-1`` when it is No; the reference is the initial head, ``W_0 = W_ref``.

Because the softmax normaliser cancels in a log-ratio, ``log pi(Yes|x) - log pi(No|x) = u^T W g(x)``
with ``u = e_Yes - e_No`` (``u^T u = 2``), and the DPO margin is

    h_W(x) = beta * s(x) * u^T (W - W_ref) g(x).

The gradient of ``-log sigma(h)`` is rank one, ``-beta sigma(-h) s u g^T``, so every gradient step
moves only the Yes and No rows, in opposite directions, and ``W_t - W_0 = u v_t^T`` with

    v_{t+1} = v_t + lr * beta * mean_{x in batch} sigma(-h_t(x)) s(x) g(x),   h_t = 2 beta s v_t^T g.

Everything below is a pure function of tensors. The equations are the book's own reconstruction, in
that model, of the paper's results on rate, accuracy and priority (the paper's body, its theorem
statements and constants cannot be read here); the chapter ``ch02-dpo-dynamics`` states and derives
each one as thm-ch2-rate, thm-ch2-accuracy and thm-ch2-priority. All functions work in the dtype they are given
(the chapter's exact checks use float64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..stats import spearman  # the book's one Spearman correlation, used here and by chapter 3 as dyn.spearman

#: ``u^T u`` for ``u = e_Yes - e_No``: the factor 2 in ``h = 2 beta s v^T g``.
U_NORM_SQ = 2.0


# --------------------------------------------------------------------------------------------------
# Distributional quantities of a behaviour
# --------------------------------------------------------------------------------------------------

def _signs(s) -> Tensor:
    s = torch.as_tensor(s)
    if not bool(((s == 1) | (s == -1)).all()):
        raise ValueError("s must contain only +1 (preferred answer Yes) and -1 (preferred answer No)")
    return s


def preference_gap(features: Tensor, s) -> Tensor:
    """``Delta = mu^+ - mu^-``: mean feature of the prompts whose preferred answer is Yes minus the
    mean feature of those whose preferred answer is No (the quantity whose norm Im & Li call
    *preference distinguishability*; their ``embedding_properties.ipynb`` computes it this way)."""
    s = _signs(s)
    if not (s == 1).any() or not (s == -1).any():
        raise ValueError("a behaviour needs prompts of both classes (s=+1 and s=-1) to define Delta")
    return features[s == 1].mean(0) - features[s == -1].mean(0)


def distinguishability(features: Tensor, s) -> float:
    """Preference distinguishability ``||mu^+ - mu^-||_2`` (Euclidean, no normalisation)."""
    return preference_gap(features, s).norm().item()


def signed_mean(features: Tensor, s) -> Tensor:
    """``m = mean_x s(x) g(x)``, the direction of the first DPO step.

    With class fraction ``p = P(s=+1)``, ``m = p mu^+ - (1-p) mu^-``; for balanced classes
    ``m = Delta / 2``."""
    s = _signs(s).to(features.dtype)
    return (s[:, None] * features).mean(0)


def concentration(features: Tensor, s) -> tuple[float, float]:
    """``(kappa, tau)``: the larger operator norm and the larger trace of the two class covariances
    (the "Concentration" and "Trace" of the authors' ``embedding_properties.ipynb``)."""
    s = _signs(s)
    kappas, traces = [], []
    for sign in (1, -1):
        x = features[s == sign]
        cov = torch.cov(x.T) if len(x) > 1 else torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
        kappas.append(torch.linalg.matrix_norm(cov, ord=2).item())
        traces.append(torch.trace(cov).item())
    return max(kappas), max(traces)


# --------------------------------------------------------------------------------------------------
# Last-layer DPO: the rank-one dynamics
# --------------------------------------------------------------------------------------------------

def margins(v: Tensor, features: Tensor, s, beta: float) -> Tensor:
    """DPO reward margins ``h(x) = beta s(x) u^T (W - W_ref) g(x) = 2 beta s(x) v^T g(x)``."""
    return U_NORM_SQ * beta * _signs(s).to(features.dtype) * (features @ v)


def dpo_losses(v: Tensor, features: Tensor, s, beta: float) -> Tensor:
    """Per-example DPO loss ``-log sigma(h(x))`` of the head ``W_ref + u v^T``."""
    return -F.logsigmoid(margins(v, features, s, beta))


def dpo_step(v: Tensor, features: Tensor, s, beta: float, lr: float) -> Tensor:
    """One gradient step on the mean DPO loss over ``features``:
    ``v + lr beta mean sigma(-h) s g`` (the rank-one lemma)."""
    h = margins(v, features, s, beta)
    weight = torch.sigmoid(-h) * _signs(s).to(features.dtype)
    return v + lr * beta * (weight[:, None] * features).mean(0)


@dataclass
class Trajectory:
    """The run of :func:`last_layer_dpo`. Arrays are indexed ``[t]`` (``t = 0..steps``) and, for
    per-group quantities, ``[t, k]`` with ``k`` the group (behaviour) index.

    ``weight_change[t] = ||W_t - W_0||_F = ||W_t - W_0||_op = sqrt(2) ||v_t||``;
    ``loss``: mean DPO loss; ``margin``: mean reward margin; ``reward_accuracy``: fraction with
    ``h > 0``; ``policy_accuracy``: fraction with ``log pi_t(y_w) > log pi_t(y_l)``, i.e.
    ``s (ref_logodds + 2 v^T g) > 0`` (needs the reference log-odds ``u^T W_ref g``)."""

    v: Tensor
    weight_change: np.ndarray
    loss: np.ndarray
    margin: np.ndarray
    reward_accuracy: np.ndarray
    policy_accuracy: np.ndarray | None
    groups: list


def last_layer_dpo(features: Tensor, s, *, beta: float, lr: float, steps: int, groups=None,
                   ref_logodds: Tensor | None = None, batch_size: int | None = None,
                   fresh_batches: bool = False, seed: int = 0, every: int = 1) -> Trajectory:
    """Train ``v`` (the head ``W_ref + u v^T``) by SGD on the DPO loss over fixed features.

    ``batch_size=None`` is full-batch gradient descent (the setting of the exact theorems); else a
    seeded permutation is cut into batches, epoch after epoch, or, with ``fresh_batches``, every step
    draws ``batch_size`` distinct examples afresh (what the authors' ``last_layer_training.py`` does,
    ``next(iter(DataLoader(shuffle=True)))`` at every step). ``groups`` (one label per example, e.g.
    the behaviour) makes every logged quantity per group as well; the groups are listed in order of
    first appearance. Training is joint over all examples in every case; the logged quantities are
    :func:`trajectory_metrics` on the training examples, at steps ``0, every, 2 every, ...`` and the last
    (``every=1``: every step; a long run on many statements keeps memory small with a larger one)."""
    s = _signs(s)
    n, d = features.shape
    v = torch.zeros(d, dtype=features.dtype)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    vs = [v]
    for t in range(1, steps + 1):
        if batch_size is None or batch_size >= n:
            batch = slice(None)
        elif fresh_batches:
            batch = torch.randperm(n, generator=gen)[:batch_size].tolist()
        else:
            if len(order) < batch_size:
                order += torch.randperm(n, generator=gen).tolist()
            batch, order = order[:batch_size], order[batch_size:]
        v = dpo_step(v, features[batch], s[batch], beta, lr)
        if t % every == 0 or t == steps:
            vs.append(v)
    return trajectory_metrics(torch.stack(vs), features, s, beta=beta, groups=groups, ref_logodds=ref_logodds)


def trajectory_metrics(V: Tensor, features: Tensor, s, *, beta: float, groups=None,
                       ref_logodds: Tensor | None = None) -> Trajectory:
    """The :class:`Trajectory` of the heads ``W_ref + u v_t^T`` (``V[t] = v_t``) on ``features``: the
    training set, or held-out statements (as the authors' code logs its test loss and accuracy).
    Per step and group: the mean DPO loss ``-log sigma(h)`` and margin ``h`` (eq-ch2-margin), the
    share with ``h > 0`` and, given the reference log-odds ``u^T W_ref g``, the share with
    ``s (ref_logodds + 2 v_t^T g) > 0``."""
    s = _signs(s)
    labels = list(groups) if groups is not None else ["all"] * len(features)
    names = list(dict.fromkeys(labels))
    index = {name: torch.tensor([i for i, g in enumerate(labels) if g == name]) for name in names}
    h = U_NORM_SQ * beta * s.to(features.dtype)[None, :] * (V @ features.T)   # margins(v_t) for every t

    def per_group(x: Tensor) -> np.ndarray:   # [t, k]: the mean over group k at step t
        return np.stack([x[:, index[k]].double().mean(1).numpy() for k in names], axis=1)

    policy = None
    if ref_logodds is not None:
        logodds = ref_logodds.to(features.dtype)[None, :] + U_NORM_SQ * (V @ features.T)
        policy = per_group(s.to(features.dtype)[None, :] * logodds > 0)
    return Trajectory(v=V, weight_change=(math.sqrt(U_NORM_SQ) * V.norm(dim=1)).numpy(),
                      loss=per_group(-F.logsigmoid(h)), margin=per_group(h), reward_accuracy=per_group(h > 0),
                      policy_accuracy=policy, groups=names)


def smoothness(features: Tensor, beta: float, groups=None) -> float:
    """``L = beta^2 lambda_max(E[g g^T])`` (the largest over ``groups`` when given): the mean DPO loss is
    ``L``-smooth in ``v``, because its Hessian ``4 beta^2 E[sigma(h) sigma(-h) g g^T]`` is at most
    ``beta^2 E[g g^T]`` (``sigma(h) sigma(-h) <= 1/4``). A large mean shared by all features makes ``L``
    large (``L >= beta^2 ||E g||^2``), which is why a big step oscillates on real embeddings; the step
    that follows from it is :func:`stable_step_bound`."""
    labels = list(groups) if groups is not None else [0] * len(features)
    out = 0.0
    for name in dict.fromkeys(labels):
        idx = torch.tensor([i for i, g in enumerate(labels) if g == name])
        x = features[idx]
        out = max(out, torch.linalg.eigvalsh(x.T @ x / len(x))[-1].item())
    return beta**2 * out


def descent_step_bound(L: float) -> float:
    """The one stability statement of chapters 2 and 3: for a last layer's loss that is ``L``-smooth in
    ``v`` (``W = W_ref + u v^T``), a step ``lr`` on the head moves ``v`` by ``lr/2`` times ``-grad_v``, so
    the descent lemma gives ``L(v_{t+1}) <= L(v_t) - (lr/2)(1 - L lr/4) ||grad_v L(v_t)||^2``: the loss
    never rises for ``lr <= 4/L`` (chapter 2, thm-ch2-rate part 4). For DPO ``L`` is :func:`smoothness`
    (the logistic loss's curvature is at most 1/4); chapter 3 passes IPO's ``8 L`` (curvature 2)."""
    if not L > 0:
        raise ValueError(f"L={L!r} must be positive (a smoothness constant)")
    return 4.0 / L


def stable_step_bound(features: Tensor, beta: float, groups=None) -> float:
    """The largest step ``lr`` on the head for which full-batch gradient descent on last-layer DPO
    over ``features`` provably never raises the loss: ``4 / L`` with ``L`` = :func:`smoothness` (the
    largest over ``groups``, so the bound holds for every group trained alone and, since the pooled
    second moment is an average of the groups', for all of them trained jointly).

    Chapter 2, thm-ch2-rate part 4: a step ``lr`` on ``W = W_ref + u v^T`` moves ``v`` by ``lr/2`` times
    ``-grad_v L`` (:func:`dpo_step`, because ``grad_v ell = -2 beta sigma(-h) s g``), so the descent lemma
    for an ``L``-smooth loss gives ``L(v_{t+1}) <= L(v_t) - (lr/2)(1 - L lr/4) ||grad_v L(v_t)||^2``,
    which is at most ``L(v_t)`` exactly when ``lr <= 4/L``. (``2/L`` is the bound for a step ``lr`` taken
    on ``v`` itself; the head's step is half that on ``v``.) Below this bound the gradient norm also never
    grows (co-coercivity of the convex loss), so the loss falls by at most the first step's
    first-order drop at every step (:func:`first_order_drops`). Chapters 2 and 3 set their last-layer
    steps as a fraction of it."""
    return descent_step_bound(smoothness(features, beta, groups))


def resampled_losses_after(features: Tensor, s, groups, weights, *, beta: float, lr: float, steps: int,
                           separate: bool = False) -> np.ndarray:
    """Mean DPO loss of every group after ``steps`` full-batch gradient steps, for ``R`` reweightings
    of the data at once: ``weights`` is ``(R, n)``, row ``r`` the multiplicity of every example in
    data set ``r`` (a bootstrap resample ``idx`` is ``np.bincount(idx, minlength=n)``). Training on
    the weighted data is training on the resample itself, because a full-batch step averages over
    examples: ``v <- v + lr beta sum_i w_i sigma(-h_i) s_i g_i / sum_i w_i``.

    ``separate=False`` trains one ``v`` on all examples (*joint*); ``separate=True`` trains every
    group *on its own* (one ``v_k`` each, as :func:`last_layer_dpo` on that group alone). All ``R``
    runs advance together in two matrix products per group and step. Returns an ``(R, K)`` array of
    weighted mean losses, groups in order of first appearance."""
    s = _signs(s).to(features.dtype)
    labels = list(groups)
    names = list(dict.fromkeys(labels))
    w = torch.as_tensor(np.asarray(weights, dtype=float), dtype=features.dtype)
    if w.ndim != 2 or w.shape[1] != len(features) or bool((w < 0).any()):
        raise ValueError(f"weights must be an (R, n={len(features)}) array of non-negative multiplicities, "
                         f"got shape {tuple(w.shape)}")
    rows = {name: torch.tensor([i for i, g in enumerate(labels) if g == name]) for name in names}
    blocks = list(rows.values()) if separate else [torch.arange(len(features))]
    h = torch.empty(len(w), len(features), dtype=features.dtype)
    for idx in blocks:
        g, sb, wb = features[idx], s[idx], w[:, idx]
        if bool((wb.sum(1) == 0).any()):
            raise ValueError("every data set (row of weights) needs a positive weight in every trained group")
        v = torch.zeros(len(w), features.shape[1], dtype=features.dtype)
        for _ in range(steps):
            hb = U_NORM_SQ * beta * sb * (v @ g.T)
            v = v + lr * beta * ((wb * torch.sigmoid(-hb) * sb) @ g) / wb.sum(1, keepdim=True)
        h[:, idx] = U_NORM_SQ * beta * sb * (v @ g.T)
    ell = w * -F.logsigmoid(h)
    return torch.stack([ell[:, idx].sum(1) / w[:, idx].sum(1) for idx in rows.values()], 1).numpy()


def losses_after(features: Tensor, s, groups, *, beta: float, lr: float, steps: int,
                 separate: bool = False) -> dict:
    """``{group: mean DPO loss}`` after ``steps`` full-batch steps, joint or ``separate``
    (:func:`resampled_losses_after` with every example counted once)."""
    groups = list(groups)
    names = list(dict.fromkeys(groups))
    out = resampled_losses_after(features, s, groups, np.ones((1, len(features))), beta=beta, lr=lr,
                                 steps=steps, separate=separate)[0]
    return {name: float(x) for name, x in zip(names, out)}


def explicit_softmax_dpo(W0: Tensor, features: Tensor, chosen: Tensor, rejected: Tensor, *, beta: float,
                         lr: float, steps: int, batches=None) -> list[Tensor]:
    """Gradient descent on the DPO loss of a whole unembedding ``W`` (V x d) with an explicit softmax
    over all ``V`` tokens, by autograd; returns ``[W_0, W_1, ..., W_steps]``. Full batch, or step
    ``t`` on the examples ``batches[t]`` (SGD, as the authors' ``last_layer_training.py`` trains the
    whole head).

    An independent computation of the dynamics: nothing here assumes that the normaliser cancels
    or that the update is rank one."""
    W = W0.clone().requires_grad_(True)
    ref_all = torch.log_softmax(features @ W0.T, -1).detach()
    out = [W0.clone()]
    for t in range(steps):
        rows = torch.arange(len(features)) if batches is None else torch.as_tensor(batches[t])
        logp = torch.log_softmax(features[rows] @ W.T, -1)
        i, w, l = torch.arange(len(rows)), chosen[rows], rejected[rows]
        ref = ref_all[rows]
        h = beta * ((logp[i, w] - ref[i, w]) - (logp[i, l] - ref[i, l]))
        loss = -F.logsigmoid(h).mean()
        (grad,) = torch.autograd.grad(loss, W)
        with torch.no_grad():
            W -= lr * grad
        out.append(W.detach().clone())
    return out


# --------------------------------------------------------------------------------------------------
# What the theorems predict
# --------------------------------------------------------------------------------------------------

def first_step_v(features: Tensor, s, beta: float, lr: float) -> Tensor:
    """thm-ch2-rate (step 1, full batch): ``v_1 = (lr beta / 2) m`` with ``m = mean s g``,
    ``= (lr beta / 4) Delta`` for balanced classes, because ``sigma(h_0) = sigma(0) = 1/2``."""
    return 0.5 * lr * beta * signed_mean(features, s)


def first_step_weight_change(m_norm, beta: float, lr: float):
    """thm-ch2-rate (step 1, full batch): ``||W_1 - W_0||_F = ||W_1 - W_0||_op = sqrt(2) lr beta ||m|| / 2``
    with ``m = mean s g`` the signed mean (:func:`first_step_v`), for any class balance; for balanced
    classes ``m = Delta / 2`` and it is ``sqrt(2) lr beta ||Delta|| / 4``, linear in the distinguishability."""
    return math.sqrt(U_NORM_SQ) * lr * beta * np.asarray(m_norm) / 2


def weight_change_bound(t, beta: float, lr: float, feature_norm: float):
    """thm-ch2-rate: ``||W_t - W_0||_F <= sqrt(2) lr beta t G`` for every ``t``, where ``G`` bounds the
    mean feature norm of every batch (``max ||g||`` for any batch; ``mean ||g||`` for full batch),
    because each step adds ``lr beta mean sigma(-h) s g`` with ``0 < sigma < 1``."""
    return math.sqrt(U_NORM_SQ) * lr * beta * np.asarray(t, dtype=float) * feature_norm


def first_order_loss_drop(m_norm_sq, beta: float, lr: float):
    """thm-ch2-rate: the first full-batch step lowers the mean DPO loss by ``lr beta^2 ||m||^2 / 2`` to
    first order (``= lr beta^2 ||Delta||^2 / 8`` for balanced classes). Exactly, by convexity of
    ``softplus`` (tangent line below, curvature at most 1/4), the true drop ``D`` satisfies
    ``first_order - E[h_1^2]/8 <= D <= first_order``; see :func:`loss_drop_bounds`."""
    return lr * beta**2 * np.asarray(m_norm_sq) / 2


def loss_drop_bounds(features: Tensor, s, beta: float, lr: float) -> tuple[float, float]:
    """``(lower, upper)`` bounds on the exact first-step loss drop ``log 2 - L(v_1)``:
    ``upper = lr beta^2 ||m||^2 / 2`` (tangent line of the convex ``-log sigma`` at 0) and
    ``lower = upper - E[h_1^2] / 8`` (``-log sigma(h) <= log 2 - h/2 + h^2/8``)."""
    v1 = first_step_v(features, s, beta, lr)
    upper = first_order_loss_drop(signed_mean(features, s).pow(2).sum().item(), beta, lr)
    h1 = margins(v1, features, s, beta)
    return float(upper - h1.pow(2).mean().item() / 8), float(upper)


def joint_first_step_gains(features: Tensor, s, groups, beta: float, lr: float) -> dict:
    """thm-ch2-priority (joint training, step 1, full batch): the mean margin of group ``k`` rises by
    exactly ``lr beta^2 <m_bar, m_k>``, with ``m_k`` the group's signed mean and ``m_bar`` the signed
    mean over all examples (``= sum_k (n_k/n) m_k``). Returns ``{group: predicted gain}``."""
    labels = list(groups)
    m_bar = signed_mean(features, s)
    sign = _signs(s)
    out = {}
    for name in dict.fromkeys(labels):
        idx = torch.tensor([i for i, g in enumerate(labels) if g == name])
        out[name] = lr * beta**2 * torch.dot(m_bar, signed_mean(features[idx], sign[idx])).item()
    return out


def first_order_drops(features: Tensor, s, groups, beta: float, lr: float, joint: bool = False) -> np.ndarray:
    """The first-order loss drop of the first full-batch step for every group (in order of first
    appearance): each group trained *alone*, ``lr beta^2 ||m_k||^2 / 2`` (thm-ch2-rate part 3,
    :func:`first_order_loss_drop`), or all trained *jointly*, ``lr beta^2 <m_bar, m_k> / 2``, half the
    step-1 margin gain of :func:`joint_first_step_gains` (thm-ch2-priority), negative for a group the
    first step makes worse. Trained alone at ``lr <= 4/L`` the drop after ``T`` steps is at most ``T``
    times this (:func:`stable_step_bound`): the *first-order ratio* ``drop_T / (T drop_1)`` is at most 1."""
    labels = list(groups)
    sign = _signs(s)
    m_bar = signed_mean(features, sign)
    out = []
    for name in dict.fromkeys(labels):
        idx = torch.tensor([i for i, g in enumerate(labels) if g == name])
        m_k = signed_mean(features[idx], sign[idx])
        out.append(lr * beta**2 * torch.dot(m_bar if joint else m_k, m_k).item() / 2)
    return np.array(out)


def priority_gap(delta_i: Tensor, delta_j: Tensor) -> tuple[float, float]:
    """thm-ch2-priority identity for two equally sized balanced behaviours: with ``b = (Delta_i+Delta_j)/2``,
    ``<b, Delta_i> - <b, Delta_j> = (||Delta_i||^2 - ||Delta_j||^2) / 2``.
    Returns ``(left side, right side)`` computed separately."""
    b = (delta_i + delta_j) / 2
    return (torch.dot(b, delta_i) - torch.dot(b, delta_j)).item(), \
        ((delta_i.pow(2).sum() - delta_j.pow(2).sum()) / 2).item()


def priority_level(delta_i: Tensor, delta_j: Tensor) -> float:
    """The authors' priority level (``priority_levels.ipynb``): ``(p_i - p_j) / max(||Delta_i||, ||Delta_j||)``
    with ``p_k = <b, Delta_k> / ||b||``, ``b = (Delta_i + Delta_j)/2``; by :func:`priority_gap` it equals
    ``(||Delta_i||^2 - ||Delta_j||^2) / (2 ||b|| max(||Delta_i||, ||Delta_j||))``."""
    b = (delta_i + delta_j) / 2
    p_i, p_j = torch.dot(b, delta_i) / b.norm(), torch.dot(b, delta_j) / b.norm()
    return ((p_i - p_j) / torch.maximum(delta_i.norm(), delta_j.norm())).item()


def gaussian_reward_accuracy(delta_norm, sigma: float, offset: float = 0.0):
    """thm-ch2-accuracy, Gaussian case: the classifier ``sign(s <Delta, g>)`` (the reward classifier of the
    first DPO step) on ``g ~ N(c + s Delta/2, sigma^2 I)`` with ``<c, Delta/||Delta||> = offset`` is right
    with probability ``[Phi((||Delta||/2 + offset)/sigma) + Phi((||Delta||/2 - offset)/sigma)] / 2``,
    which is ``Phi(||Delta|| / (2 sigma))`` when the common mean is orthogonal to ``Delta``."""
    from scipy.stats import norm

    d = np.asarray(delta_norm, dtype=float) / 2
    return (norm.cdf((d + offset) / sigma) + norm.cdf((d - offset) / sigma)) / 2


def gaussian_accuracy_of_direction(w: Tensor, mu_plus: Tensor, mu_minus: Tensor, sigma: float) -> float:
    """Exact population accuracy of the classifier ``sign(s <w, g>)`` on balanced classes
    ``g ~ N(mu^±, sigma^2 I)``: ``[Phi(<w, mu^+>/(sigma||w||)) + Phi(-<w, mu^->/(sigma||w||))] / 2``.
    With ``w`` parallel to ``Delta`` and ``mu^± = c ± Delta/2``, ``c`` orthogonal to ``Delta``, it is
    :func:`gaussian_reward_accuracy`."""
    from scipy.stats import norm

    scale = sigma * w.norm().item()
    return float((norm.cdf(torch.dot(w, mu_plus).item() / scale) + norm.cdf(-torch.dot(w, mu_minus).item() / scale)) / 2)


def gaussian_plugin_accuracy(scores: Tensor, s) -> float:
    """Plug-in prediction of the share of correct rankings ``s(x) z(x) > 0`` from a sample of scores
    ``z`` (e.g. the policy's log-odds ``u^T W_ref g + 2 v_t^T g`` of thm-ch2-accuracy): fit a normal
    law ``N(m_c, sd_c^2)`` to ``s z`` within each class ``c`` (preferred answer Yes, No) and return
    ``sum_c p_c Phi(m_c / sd_c)``, with ``p_c`` the class shares of the sample. For scores that are
    normal within each class this is the exact accuracy of the classifier (for ``z = <w, g>``,
    ``g ~ N(mu^c, sigma^2 I)``: :func:`gaussian_accuracy_of_direction`); applied to the training
    statements it predicts the accuracy on held-out ones drawn from the same laws."""
    from scipy.stats import norm

    s = _signs(s)
    signed = (s.to(scores.dtype) * scores).double()
    out = 0.0
    for c in (1, -1):
        x = signed[s == c]
        if len(x) < 2:
            raise ValueError(f"the plug-in accuracy needs at least two statements of each class, got {len(x)}")
        out += len(x) / len(s) * norm.cdf((x.mean() / x.std()).item())
    return float(out)


def subexponential_accuracy_bound(delta_norm, K: float, alpha: float):
    """thm-ch2-accuracy, alpha-subexponential case: if the noise of the projection on ``Delta/||Delta||`` obeys
    ``P(|xi| >= t) <= 2 exp(-(t/K)^alpha)`` and the common mean is orthogonal to ``Delta``, the reward
    classifier is right with probability at least ``1 - 2 exp(-(||Delta|| / (2K))^alpha)`` (clipped at 0)."""
    return np.clip(1 - 2 * np.exp(-(np.asarray(delta_norm, dtype=float) / (2 * K)) ** alpha), 0.0, 1.0)


def population_loss_curve(delta_norm: float, sigma: float, beta: float, lr: float, steps: int,
                          n_quad: int = 80) -> np.ndarray:
    """The population loss curve of full-batch last-layer DPO on ``g ~ N(s Delta/2, sigma^2 I)``.

    By symmetry ``v_t = a_t Delta/||Delta||`` with ``a_{t+1} = a_t + lr beta E[sigma(-2 beta a_t z) z]``,
    ``z ~ N(||Delta||/2, sigma^2)``, and the loss is ``E[softplus(-2 beta a_t z)]``; the expectations
    are Gauss-Hermite quadratures. Returns the loss at ``t = 0..steps``."""
    x, w = np.polynomial.hermite_e.hermegauss(n_quad)
    w = w / w.sum()
    z = delta_norm / 2 + sigma * x
    a, out = 0.0, []
    for t in range(steps + 1):
        h = U_NORM_SQ * beta * a * z
        out.append(float(np.sum(w * np.logaddexp(0.0, -h))))
        a = a + lr * beta * float(np.sum(w * z / (1 + np.exp(h))))
    return np.array(out)


# --------------------------------------------------------------------------------------------------
# Synthetic behaviours
# --------------------------------------------------------------------------------------------------

def synthetic_behaviours(delta_norms, *, n_per_class: int, d: int, sigma: float = 1.0, common: float = 0.0,
                         noise: str = "gaussian", directions: Tensor | None = None, seed: int = 0,
                         dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, list[int]]:
    """Features of ``K = len(delta_norms)`` behaviours with known distinguishability.

    Behaviour ``k`` has ``mu_k^± = c ± ||Delta_k|| e_k / 2`` where ``e_k`` is the ``k``-th coordinate axis
    (or the ``k``-th row of ``directions``, unit vectors) and ``c = common * e_{d-1}`` is a mean shared
    by all prompts, orthogonal to every ``e_k``. The noise is i.i.d. per coordinate with standard
    deviation ``sigma``: ``"gaussian"`` (alpha = 2) or ``"laplace"`` (alpha = 1, heavy-tailed). Returns
    ``(features (2 K n, d), s, behaviour index per row)``, the classes exactly balanced."""
    K = len(delta_norms)
    if directions is None:
        if K >= d:
            raise ValueError(f"need d > K so that each behaviour gets its own axis (K={K}, d={d})")
        directions = torch.eye(d, dtype=dtype)[:K]
    gen = torch.Generator().manual_seed(seed)
    feats, signs, groups = [], [], []
    c = torch.zeros(d, dtype=dtype)
    c[d - 1] = common
    for k, norm in enumerate(delta_norms):
        for sign in (1, -1):
            mean = c + sign * float(norm) / 2 * directions[k].to(dtype)
            if noise == "gaussian":
                eps = torch.randn(n_per_class, d, generator=gen, dtype=dtype) * sigma
            elif noise == "laplace":
                u = torch.rand(n_per_class, d, generator=gen, dtype=dtype).clamp(1e-12, 1 - 1e-12) - 0.5
                eps = -(sigma / math.sqrt(2)) * torch.sign(u) * torch.log1p(-2 * u.abs())
            else:
                raise ValueError(f"noise={noise!r} is not 'gaussian' or 'laplace'")
            feats.append(mean + eps)
            signs += [sign] * n_per_class
            groups += [k] * n_per_class
    return torch.cat(feats), torch.tensor(signs), groups


def tail_constant(noise: str, sigma: float) -> tuple[float, float]:
    """``(K, alpha)`` with ``P(|xi| >= t) <= 2 exp(-(t/K)^alpha)`` for one noise coordinate of
    :func:`synthetic_behaviours`: Gaussian ``(sqrt(2) sigma, 2)`` (Chernoff), Laplace with scale
    ``b = sigma/sqrt(2)``: ``(b, 1)`` (its two-sided tail is exactly ``exp(-t/b)``)."""
    if noise == "gaussian":
        return math.sqrt(2) * sigma, 2.0
    if noise == "laplace":
        return sigma / math.sqrt(2), 1.0
    raise ValueError(f"noise={noise!r} is not 'gaussian' or 'laplace'")


def stratified_resample(s, groups, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap indices that resample statements with replacement within every (group, class)
    stratum, so each behaviour keeps its size and class balance."""
    s = np.asarray(_signs(s))
    labels = np.asarray(list(groups))
    out = []
    for name in dict.fromkeys(labels.tolist()):
        for sign in (1, -1):
            idx = np.where((labels == name) & (s == sign))[0]
            out.append(rng.choice(idx, size=len(idx), replace=True))
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------------
# What the step-1 identities force after T steps
# --------------------------------------------------------------------------------------------------
#
# Each unit k (a behaviour, or a behaviour within a jointly trained pair) has a first-order drop D1_k
# fixed by an identity at step 1 (first_order_drops) and a measured drop after T steps. Its first-order
# ratio is r_k = drop_k / (T D1_k). If every ratio lies in a band [a, b], each drop lies in the interval
# T D1_k [a, b], and an outcome that holds for every choice of drops in those intervals is forced by the
# identity: the run could not have shown anything else once it was that close to first order. The
# functions below compute the least value of a statistic over the intervals; a registered prediction
# whose least value still passes is *implied by* the identity, not evidence about the model.

def first_order_intervals(first_order, drops, steps: int, clear: float = 0.1) -> tuple[np.ndarray, np.ndarray, tuple]:
    """``(lo, hi, (a, b))``: for every unit the interval ``steps * first_order_k * [a, b]`` (ends sorted)
    in which its drop lies, where ``[a, b]`` is the band of the first-order ratios ``drops_k / (steps *
    first_order_k)`` over the *clear* units, those with ``|first_order_k| >= clear * max |first_order|``.
    A unit whose first-order drop is not clear is given ``(-inf, inf)``: its drop is set by the terms
    beyond first order, so the identity forces nothing about it."""
    D1, drops = np.asarray(first_order, float), np.asarray(drops, float)
    if D1.shape != drops.shape or D1.ndim != 1 or steps < 1:
        raise ValueError("first_order and drops must be 1-d arrays of the same length, steps >= 1")
    keep = np.abs(D1) >= clear * np.abs(D1).max()
    ratios = drops[keep] / (steps * D1[keep])
    a, b = float(ratios.min()), float(ratios.max())
    ends = np.stack([steps * D1 * a, steps * D1 * b])
    lo, hi = ends.min(0), ends.max(0)
    lo[~keep], hi[~keep] = -np.inf, np.inf
    return lo, hi, (a, b)


def _least_rank_correlation(rx: np.ndarray, lo: np.ndarray, hi: np.ndarray, counts: np.ndarray,
                            max_states: int) -> float | None:
    """The least Spearman correlation (Pearson of average ranks) between units with x-ranks ``rx`` and
    values ``y_k`` that may lie anywhere in ``[lo_k, hi_k]``, unit ``k`` repeated ``counts[k]`` times
    (tied copies, as in a bootstrap resample); ``None`` if the search needs more than ``max_states``.

    An order of the y-values (lowest first) is possible iff no unit comes before one that must lie
    below it (``hi_f < lo_e``); each possible order is attained by giving every unit the larger of its
    ``lo`` and the value before it. The variance of average ranks depends only on the tie counts, so the
    least correlation is the least ``S = sum_k counts_k rx_k ry_k``, with ``ry_k = (copies placed below k)
    + (counts_k + 1)/2``: a dynamic programme over the sets of units already placed (those that can be
    placed lowest first), few when the intervals overlap little."""
    n = len(rx)
    N = counts.sum()
    memo: dict[int, float] = {}
    full = (1 << n) - 1

    def best(mask: int, below: float) -> float:
        if mask == full:
            return 0.0
        if mask in memo:
            return memo[mask]
        if len(memo) > max_states:
            raise OverflowError
        rest = [k for k in range(n) if not mask >> k & 1]
        his = sorted((hi[k], k) for k in rest)
        value = np.inf
        for e in rest:
            floor = his[1][0] if his[0][1] == e and len(his) > 1 else (his[0][0] if his[0][1] != e else np.inf)
            if lo[e] <= floor:
                value = min(value, counts[e] * rx[e] * (below + (counts[e] + 1) / 2)
                            + best(mask | 1 << e, below + counts[e]))
        memo[mask] = value
        return value

    try:
        S = best(0, 0.0)
    except OverflowError:
        return None
    w = counts / N
    mean_x = w @ rx
    var_x = w @ (rx - mean_x) ** 2
    var_y = (N * N - 1) / 12 - (counts ** 3 - counts).sum() / (12 * N)
    if var_x <= 0 or var_y <= 0:
        return float("nan")
    return float((S / N - mean_x * (N + 1) / 2) / np.sqrt(var_x * var_y))


def _daniels_bound(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """Daniels' inequality ``rho_s >= (3 tau - 1) / 2`` (Daniels 1950) with Kendall's ``tau`` at its least:
    every pair whose intervals overlap (or whose ``x`` tie) counted discordant."""
    n, score = len(x), 0
    for i in range(n):
        for j in range(i + 1, n):
            a, b = (i, j) if x[i] < x[j] else (j, i)
            score += 1 if (x[i] != x[j] and hi[a] < lo[b]) else -1
    tau = score / (n * (n - 1) / 2)
    return max(-1.0, (3 * tau - 1) / 2)


def least_spearman(x, lo, hi, max_states: int = 50000) -> float:
    """The least Spearman correlation of ``x`` with values ``y_k`` that may lie anywhere in
    ``[lo_k, hi_k]``: exact (:func:`_least_rank_correlation`) where its search needs at most
    ``max_states`` states, else Daniels' bound ``(3 tau_min - 1)/2``, which is below it. A statistic
    ``spearman(x, y) >= c`` is forced by the intervals iff this is ``>= c``."""
    from scipy.stats import rankdata

    x, lo, hi = (np.asarray(a, float) for a in (x, lo, hi))
    least = _least_rank_correlation(rankdata(x), lo, hi, np.ones(len(x)), max_states)
    return _daniels_bound(x, lo, hi) if least is None else least


def least_spearman_lower_bound(x, lo, hi, seed: int, n_boot: int = 200, max_states: int = 3000) -> float:
    """The least value of :func:`prefdyn.stats.spearman_lower_bound` (``seed``, ``n_boot``: the same
    resamples of the units) when every ``y_k`` may lie anywhere in ``[lo_k, hi_k]``: the 2.5% quantile,
    over the resamples, of each resample's least Spearman correlation (a resample whose search needs
    more than ``max_states`` states counts as -1). It is below the statistic whatever the ``y_k``, since every
    resample's correlation is at least its least value."""
    from scipy.stats import rankdata

    x, lo, hi = (np.asarray(a, float) for a in (x, lo, hi))
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    least = []
    for row in idx:
        units, counts = np.unique(row, return_counts=True)
        if len(units) < 2 or len(np.unique(x[units])) < 2:
            least.append(np.nan)
            continue
        rx_all = rankdata(x[row])
        rx = np.array([rx_all[row == u][0] for u in units])
        value = _least_rank_correlation(rx, lo[units], hi[units], counts.astype(float), max_states)
        least.append(-1.0 if value is None else value)
    return float(np.nanquantile(least, 0.025))


def forced_sign_share(lo, hi, predicted_sign) -> float:
    """The share of units whose interval lies wholly on the side of 0 that ``predicted_sign`` names:
    the least share of sign agreements the intervals allow."""
    lo, hi, sign = (np.asarray(a, float) for a in (lo, hi, predicted_sign))
    return float(np.mean(np.where(sign > 0, lo > 0, hi < 0)))


def forced_pair_share(lo_a, hi_a, lo_b, hi_b, predicted_sign) -> float:
    """For pairs ``(a, b)`` whose drops lie in ``[lo_a, hi_a]`` and ``[lo_b, hi_b]``: the share of pairs
    in which ``drop_a - drop_b`` must have the sign ``predicted_sign`` (the least share of agreements)."""
    lo_a, hi_a, lo_b, hi_b, sign = (np.asarray(a, float) for a in (lo_a, hi_a, lo_b, hi_b, predicted_sign))
    return float(np.mean(np.where(sign > 0, lo_a > hi_b, hi_a < lo_b)))


# --------------------------------------------------------------------------------------------------
# Later work on the same model: likelihood displacement and squeezing
# --------------------------------------------------------------------------------------------------

def displacement_score(features: Tensor, s) -> Tensor:
    """The last-layer analogue of the CHES score of Razin et al. (2410.08847, Definition 2) for every
    pair of a group: ``C(x) = -s(x) <g(x), m> = (1/n) sum_x' -s(x) s(x') <g(x), g(x')>``, the similarity of
    the prompt's embedding to the prompts whose preferred answer is its dispreferred one, minus the
    similarity to those that share its preferred answer (``m`` = :func:`signed_mean` of the group).

    Razin et al.'s own score ``<sum h(y+), sum h(y-)> - ||sum h(y+)||^2`` sums the hidden embeddings of
    each response's prefixes; for single-token answers both sums are the prompt's embedding ``g(x)``, so
    it is 0 for every persona pair, and what is left of their mechanism is the other prompts' pull
    (their Section 4.2.3: samples whose preferred response is this one's dispreferred). In the last-layer
    model it is exact at step 1: the first step changes the margin by ``-lr beta^2 C(x)``, so the chosen
    log-probability of ``x`` falls iff ``C(x) > 0`` (:func:`answer_logps`)."""
    return -_signs(s).to(features.dtype) * (features @ signed_mean(features, s))


def answer_logps(head: Tensor, features: Tensor, v: Tensor, yes: int, no: int) -> tuple[Tensor, Tensor]:
    """``log pi(Yes|x)`` and ``log pi(No|x)`` of the head ``W_ref + u v^T`` over the whole vocabulary
    (``head`` is ``W_ref``, ``V x d``), an explicit softmax. Only the Yes and No logits move with ``v``
    (``+a`` and ``-a``, ``a = v^T g``), and ``d log pi(Yes)/da = 1 - pi(Yes) + pi(No) > 0``,
    ``d log pi(No)/da = -(1 + pi(Yes) - pi(No)) < 0``: the preferred answer's log-probability moves in the
    direction of the margin ``h = 2 beta s a`` for every pair and any step. In the last-layer model
    there is therefore neither squeezing (Ren & Sutherland, 2407.10490: the chosen likelihood falling
    while the margin grows) nor likelihood displacement of a pair whose margin grows."""
    logits = features @ head.T.to(features.dtype)
    a = features @ v
    logits[:, yes] += a
    logits[:, no] -= a
    logp = torch.log_softmax(logits, -1)
    return logp[:, yes], logp[:, no]

