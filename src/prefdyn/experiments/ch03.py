"""Chapter 3's experiments: the generalization of last-layer DPO after finitely many steps (Im & Li).

On synthetic clusters, :func:`run_config` trains the unembedding to the horizon ``tau_1`` of
Theorem 4.2 and measures everything Theorems 4.2 and 4.3 talk about (the implementations are in
:mod:`prefdyn.theory.generalization`), with distinct or shared tokens. On SmolLM2,
:func:`prefdyn.experiments.persona.persona_features` gives the frozen features ``g(x)`` of persona
statements (:func:`split_features` regroups them for another split), :func:`last_layer_run` trains
the " Yes"/" No" rows of the head on a subset of behaviours by gradient descent (the theorem's
setting) or by Adam (the paper's Appendix F), :func:`subset_sweep` runs it on random subsets for
each ``K`` and :func:`by_K` / :func:`error_trend` summarise the runs as the paper does (held-out
error against ``K``, its slope and ``R^2``); :func:`alone_versus_joint` trains the top blocks of the
whole model on one behaviour alone and among all behaviours, from the same start.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import logsumexp
from torch import Tensor

from ..llm.logps import preference_logps
from ..llm.train import train_only_top_blocks, train_preferences
from ..params import positive, torch_threads
from ..theory import dynamics as dyn
from ..theory import generalization as gen
from .persona import persona_pairs, reference_from_features


def check_parameters(*, beta: float, lr_fraction: float, lr_full: float, held_out: float, adam_beta: float,
                     adam_lr: float, adam_held_out: float) -> None:
    """The chapter's own parameters: ``beta``, ``lr_fraction``, ``lr_full``, ``adam_beta`` and ``adam_lr``
    positive, ``lr_fraction`` below 1 (plain gradient descent needs ``lr < 2/L``), ``held_out`` and
    ``adam_held_out`` strictly between 0 and 1."""
    for name, value in (("beta", beta), ("lr_fraction", lr_fraction), ("lr_full", lr_full),
                        ("adam_beta", adam_beta), ("adam_lr", adam_lr)):
        positive(name, value, float)
    for name, value in (("held_out", held_out), ("adam_held_out", adam_held_out)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"{name}={value!r} must be a number strictly between 0 and 1")
    if lr_fraction >= 1:
        raise ValueError(f"lr_fraction={lr_fraction} must be below 1: plain gradient descent needs lr < 2/L")


# --------------------------------------------------------------------------------------------------
# Synthetic clusters: Theorems 4.2 and 4.3 in the paper's model
# --------------------------------------------------------------------------------------------------

def run_config(K: int, Q: int, d: int, v: float, l_b: float, seed: int, *, beta: float, steps: int, n_test: int,
               shared: bool = False, Z: int = 1, keep_weights: bool = False, rates: bool = True,
               max_rates_N: int = 1300) -> dict:
    """Train the unembedding on ``K`` pairs of Gaussian clusters (``Q`` samples each, dimension ``d``,
    noise ``v``, shared component ``l_b``; tokens reused by up to ``Z`` pairs
    (:func:`prefdyn.theory.generalization.token_pairs`), or one token pair for all when ``shared``) by full-batch
    gradient descent for ``steps`` steps of size ``eta = tau_1/steps``, so that the last step is at the
    horizon ``tau_1`` of Theorem 4.2 (the chapter's thm-ch3-train), and measure what Theorems 4.2
    and 4.3 (thm-ch3-gen) talk about.

    Returns a dict with the configuration (``K, Q, d, v, l_b, seed, N = 2KQ, tau1``, the measured token
    reuse ``Z`` and ``M``), the run and the training data, and:

    * ``in_theorem``: every training margin in ``[beta^2 t/8K, 5 beta^2 t/K]`` at every step;
    * ``hypothesis_holds``: every training margin in ``[0, log 3]`` (Theorem 4.3's assumption);
    * ``r_end`` the training margins at ``tau_1`` and ``ideal_end`` the noiseless ``r*(tau_1)``;
    * ``risk`` and ``log_risk``: the exact population risk (mean over the ``2K`` clusters) and its log;
    * ``test_error`` on ``n_test`` fresh samples per cluster (seed ``seed + 10000``), ``n_test_total``;
    * ``s_star`` (the smallest slack), ``bound``, ``log_bound`` and ``closed`` (the chapter's token-aware
      union bound of thm-ch3-gen, its log, and its closed form over all ``N``, means over clusters; 1
      where the hypothesis fails), ``paper`` (the paper's closed form ``2KQ^2 e^(-Q/45)``) and ``b4``
      (the union bound of the paper's Appendix B.4 at the measured ``Z``, ``l_b``, ``d``, ``v``);
    * when ``rates`` and ``N <= max_rates_N`` (the ``N x N`` products are cheap): the comparison rates
      ``rho_L, rho_U`` of the sandwich lemma (thm-ch3-sandwich) and the deviation ``delta`` of the
      inner products.
    """
    train = gen.cluster_data(K, Q, d, v, l_b, shared_tokens=shared, Z=Z, seed=seed)
    test = gen.cluster_data(K, n_test, d, v, l_b, shared_tokens=shared, Z=Z, seed=seed + 10_000)
    rate_L, rate_U, tau1 = gen.theorem_rates(K, beta)
    eta = tau1 / steps
    out = gen.gd_dpo(train.features, train.chosen, train.rejected, vocab=train.vocab, beta=beta, lr=eta, steps=steps,
                     keep_weights=keep_weights)
    t = eta * np.arange(steps + 1)[:, None]
    r = out.train.numpy()
    dW = out.delta_W[-1]
    s_star, bound_c, log_bound_c, closed_c = gen.bounds_for(train)
    Z_used, M_used = gen.token_reuse(train.chosen_of, train.rejected_of)
    err = (gen.margins(dW, test.features, test.chosen, test.rejected, beta) <= 0).double().numpy()
    row = {"K": K, "Q": Q, "d": d, "v": v, "l_b": l_b, "seed": seed, "N": r.shape[1], "tau1": tau1, "run": out,
           "data": train, "Z": Z_used, "M": M_used,
           "in_theorem": bool(np.all((r >= rate_L * t - 1e-12) & (r <= rate_U * t + 1e-12))),
           "hypothesis_holds": bool(np.all((r >= -1e-12) & (r <= math.log(3)))),
           "r_end": r[-1], "ideal_end": float(gen.idealized_margin(tau1, K, beta)),
           "risk": float(np.mean(gen.exact_risk(dW, train, beta))),
           "log_risk": float(logsumexp(gen.exact_risk(dW, train, beta, log=True)) - math.log(2 * K)),
           "test_error": float(err.mean()), "n_test_total": len(err), "s_star": float(s_star.min()),
           "paper": float(gen.paper_bound(K, Q)), "b4": float(gen.union_bound_b4(K, Q, Z_used, l_b, d, v))}
    row["bound"] = float(np.mean(bound_c)) if row["hypothesis_holds"] else 1.0
    row["log_bound"] = float(logsumexp(log_bound_c) - math.log(2 * K)) if row["hypothesis_holds"] else 0.0
    row["closed"] = float(np.mean(closed_c)) if row["hypothesis_holds"] else 1.0
    if rates and row["N"] <= max_rates_N:
        row["rho_L"], row["rho_U"] = gen.kernel_rates(train.features, train.chosen, train.rejected, beta)
        row["delta"] = gen.inner_product_deviation(train)
    return row


def binomial_se(p: float, n: int) -> float:
    """Standard error ``sqrt(p(1-p)/n)`` of an error rate ``p`` measured on ``n`` samples, with the
    variance floored at ``1/n`` so that a zero count still has a positive standard error."""
    return math.sqrt(max(p * (1 - p), 1 / n) / n)


# --------------------------------------------------------------------------------------------------
# The real model: last-layer DPO on the features of persona statements
# --------------------------------------------------------------------------------------------------

@dataclass
class SubsetRun:
    """Last-layer DPO on the statements of ``subset`` (``K`` behaviours): the head direction ``v[t]``
    at every step, the reward margin of every training and held-out statement of the subset at every
    step (``(steps+1, n)``), whether the policy itself prefers ``y_w`` on each held-out statement
    (``log pi(y_w) > log pi(y_l)``), and the masks that select the subset's statements."""

    K: int
    subset: list
    train_mask: np.ndarray
    test_mask: np.ndarray
    v: Tensor
    train_margins: Tensor
    test_margins: Tensor
    policy_correct: Tensor


def last_layer_run(train: tuple[Tensor, Tensor, np.ndarray], test: tuple[Tensor, Tensor, np.ndarray],
                   subset: Sequence[str], *, u_ref: Tensor, beta: float, lr: float, steps: int,
                   optimizer: str = "gd") -> SubsetRun:
    """Full-batch DPO on the " Yes"/" No" rows of the head, on the training statements of the
    behaviours in ``subset``: plain gradient descent (``optimizer="gd"``, the theorem's setting,
    :func:`prefdyn.theory.dynamics.last_layer_dpo`) or Adam (``"adam"``, the paper's Section 5 and
    Appendix F, :func:`prefdyn.theory.generalization.adam_last_layer`).

    ``train`` and ``test`` are :func:`prefdyn.experiments.persona.persona_features` triples ``(G, s, behaviour)``; ``u_ref`` is the
    reference head's ``W[Yes] - W[No]``. Only ``W - W_0 = u v^T`` with ``u = e_Yes - e_No`` moves, so
    every reward margin is ``r = 2 beta s v^T g`` (the chapter's eq-ch3-margin) and the policy's own
    log-odds are ``s (u_ref^T g + 2 v^T g)``."""
    if optimizer not in ("gd", "adam"):
        raise ValueError(f"optimizer={optimizer!r} must be 'gd' or 'adam'")
    (G_tr, s_tr, own_tr), (G_te, s_te, own_te) = train, test
    m_tr, m_te = np.isin(own_tr, subset), np.isin(own_te, subset)
    if optimizer == "gd":
        v = dyn.last_layer_dpo(G_tr[m_tr], s_tr[m_tr], beta=beta, lr=lr, steps=steps).v
    else:
        v = gen.adam_last_layer(G_tr[m_tr], s_tr[m_tr], beta=beta, lr=lr, steps=steps)
    h_tr = 2 * beta * s_tr[m_tr].double() * (v @ G_tr[m_tr].T)
    h_te = 2 * beta * s_te[m_te].double() * (v @ G_te[m_te].T)
    policy_correct = (s_te[m_te].double() * (G_te[m_te] @ u_ref + 2 * v @ G_te[m_te].T)) > 0
    return SubsetRun(K=len(subset), subset=list(subset), train_mask=m_tr, test_mask=m_te, v=v,
                     train_margins=h_tr, test_margins=h_te, policy_correct=policy_correct)


def split_features(examples: Sequence, features: tuple[Tensor, Tensor, np.ndarray],
                   parts: Sequence[Sequence]) -> list[tuple[Tensor, Tensor, np.ndarray]]:
    """The :func:`prefdyn.experiments.persona.persona_features` triples ``(G, s, behaviour)`` of each
    list in ``parts``, taken from those of ``examples`` (the same example objects, e.g. another
    :func:`prefdyn.datasets.persona.train_test_split` of them) without running the model again."""
    index = {id(ex): i for i, ex in enumerate(examples)}
    G, s, own = features
    out = []
    for part in parts:
        missing = [ex for ex in part if id(ex) not in index]
        if missing:
            raise ValueError(f"{len(missing)} statements of a part are not among the examples with features")
        idx = np.array([index[id(ex)] for ex in part], dtype=int)
        out.append((G[torch.as_tensor(idx)], s[torch.as_tensor(idx)], own[idx]))
    return out


def subset_sweep(run_subset, names: Sequence[str], Ks: Sequence[int], n_subsets: int, seed: int) -> list[SubsetRun]:
    """``run_subset(subset)`` (e.g. :func:`last_layer_run` with everything but the subset fixed) on
    random subsets of ``K`` behaviours for each ``K`` of ``Ks``: ``n_subsets`` subsets drawn without
    replacement by ``np.random.default_rng(seed)`` (one when ``K`` is all of ``names``), in order."""
    rng = np.random.default_rng(seed)
    runs = []
    for K in Ks:
        for _ in range(1 if K == len(names) else n_subsets):
            runs.append(run_subset(sorted(rng.choice(list(names), size=K, replace=False).tolist())))
    return runs


def final_train_margin(run: SubsetRun) -> float:
    """The mean training reward margin of a run after its last step."""
    return run.train_margins[-1].mean().item()


def held_out_error(run: SubsetRun) -> float:
    """The fraction of a run's held-out statements whose reward margin is not positive after its last
    step (the risk of the paper's Definition 3.1 on the held-out statements)."""
    return 1 - (run.test_margins[-1] > 0).double().mean().item()


def by_K(runs: Sequence[SubsetRun], Ks: Sequence[int], statistic) -> np.ndarray:
    """``statistic(run)`` averaged over the runs (subsets) of each ``K`` of ``Ks``."""
    return np.array([np.mean([statistic(r) for r in runs if r.K == K]) for K in Ks])


def error_trend(runs: Sequence[SubsetRun], Ks: Sequence[int], n_boot: int, seed: int) -> dict:
    """The held-out error against ``K`` as the paper fits it (its Section 5): the subset-averaged
    error at each ``K``, the least-squares slope and intercept, ``R^2`` (the squared Pearson
    correlation of ``K`` and the error) and a 95% percentile-bootstrap interval of the slope,
    resampling the held-out statements within each run (``np.random.default_rng(seed)``)."""
    Ks = np.asarray(Ks, dtype=float)
    errors = {K: [1 - (r.test_margins[-1] > 0).double().numpy() for r in runs if r.K == K] for K in Ks}
    mean = np.array([np.mean([e.mean() for e in errors[K]]) for K in Ks])
    slope, intercept = np.polyfit(Ks, mean, 1)
    rng = np.random.default_rng(seed)
    boot = [np.polyfit(Ks, [np.mean([e[rng.integers(0, len(e), len(e))].mean() for e in errors[K]]) for K in Ks], 1)[0]
            for _ in range(n_boot)]
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = float(np.corrcoef(Ks, mean)[0, 1] ** 2) if np.ptp(mean) > 0 else float("nan")
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"error": mean, "slope": float(slope), "intercept": float(intercept), "r2": r2,
            "slope_interval": (float(lo), float(hi))}


# --------------------------------------------------------------------------------------------------
# The real model: DPO on its top blocks, one behaviour alone and among all
# --------------------------------------------------------------------------------------------------

def alone_versus_joint(policy, examples, features: Tensor, pools: dict[str, np.ndarray], held, held_features: Tensor,
                       *, head: Tensor, yes_id: int, no_id: int, beta: float, steps: int, batch_size: int, lr: float,
                       seed: int, top_blocks: int | None) -> tuple[dict[str, np.ndarray], int]:
    """AdamW DPO (:func:`prefdyn.llm.train.train_preferences`) on the top ``top_blocks`` blocks and the
    final norm (``None``: every weight), once per pool of training statements (``pools``: label ->
    indices into ``examples``, whose features are ``features``), each time from the same starting
    weights, and the reward margins ``beta (log pi/pi_ref)(y_w) - beta (log pi/pi_ref)(y_l)`` of the
    held-out statements ``held`` after each run. References come from the cached features
    (:func:`prefdyn.experiments.persona.reference_from_features`). The training runs take every torch thread; the held-out
    reference is computed on the caller's threads. The policy is returned to its starting weights.

    Returns the held-out margins of each pool and the number of trained weights."""
    tok = policy.tokenizer
    held_pairs = persona_pairs(tok, held)
    held_ref = reference_from_features(held_features, held, head, yes_id, no_id)
    n_trained = train_only_top_blocks(policy.model, top_blocks)
    start = {k: p.detach().clone() for k, p in policy.model.named_parameters() if p.requires_grad}

    def reset():
        with torch.no_grad():
            for k, p in policy.model.named_parameters():
                if k in start:
                    p.copy_(start[k])

    margins = {}
    with torch_threads(None):
        for label, idx in pools.items():
            reset()
            pool = [examples[i] for i in idx]
            train_preferences(policy, persona_pairs(tok, pool), loss="dpo", beta=beta, steps=steps,
                              batch_size=batch_size, lr=lr, seed=seed,
                              reference=reference_from_features(features[idx], pool, head, yes_id, no_id),
                              progress=False)
            w, l = preference_logps(policy, held_pairs.prompts, held_pairs.chosen, held_pairs.rejected)
            margins[label] = (beta * ((w - held_ref.chosen) - (l - held_ref.rejected))).double().numpy()
    reset()
    return margins, n_trained
