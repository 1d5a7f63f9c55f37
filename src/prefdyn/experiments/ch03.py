"""Chapter 3's experiments: the generalization of last-layer DPO after finitely many steps (Im & Li).

On synthetic clusters, :func:`run_config` trains the unembedding to the horizon of the training
guarantee (Theorem 4.2 for DPO; the book's extension for IPO and SLiC) on a :class:`Clusters`
configuration and measures everything Theorems 4.2 and 4.3 talk about (the implementations are in
:mod:`prefdyn.theory.generalization`), with distinct or shared tokens and exactly or approximately
orthogonal concepts (the paper's Appendix C). On a real model,
:func:`prefdyn.experiments.persona.persona_features` gives the frozen features ``g(x)`` of persona
statements; the book's protocol splits each behaviour (:func:`split_per_behaviour`), draws its K
design (:func:`focal_design`), trains the " Yes"/" No" rows of the head by gradient descent on DPO,
IPO or SLiC or by Adam (:class:`Training`, :func:`sweep`) and summarises each statistic by ``K``
(:func:`k_curve`, with the measurement noise its world adds); :func:`dilution_check` computes the
K-dilution proposition on the run's features. The authors' protocol (``last_layer_training.py`` of
``shawn-im/dpo-diverse``) has its named sets (:data:`APPENDIX_F_SUBSETS`, :func:`authors_subsets`), its
pooled split (:func:`authors_split`) and its second RMSNorm (:func:`second_rms_norm`);
:data:`PROTOCOL_DIFFERENCES` lists every difference between the two protocols.
:func:`alone_versus_joint` trains the top blocks of the whole model on one behaviour alone and among
all behaviours, from the same start.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import logsumexp
from torch import Tensor

from ..datasets.persona import train_test_split
from ..llm.features import embeddings
from ..llm.logps import preference_logps
from ..llm.models import kept_weights
from ..llm.train import PreferenceConfig, train_only_top_blocks, train_preferences
from ..params import positive, torch_threads
from ..stats import SpearmanWorld, spearman
from ..theory import dynamics as dyn
from ..theory import generalization as gen
from .persona import persona_pairs, reference_from_features

PROTOCOLS = ("book", "authors")


def check_parameters(*, protocol: str, beta: float, lr_fraction: float, lr_full: float, held_out: int,
                     adam_beta: float, adam_lr: float) -> None:
    """The chapter's own parameters: ``protocol`` one of :data:`PROTOCOLS`; ``beta``, ``lr_full``,
    ``adam_beta`` and ``adam_lr`` positive; ``lr_fraction`` positive and below 2, because the step
    ``lr_fraction * 2/L`` must stay below :func:`prefdyn.theory.dynamics.descent_step_bound`, ``4/L``;
    ``held_out`` a whole number of held-out statements per behaviour, at least 2 (one of each answer)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} must be one of {', '.join(map(repr, PROTOCOLS))}")
    for name, value in (("beta", beta), ("lr_fraction", lr_fraction), ("lr_full", lr_full),
                        ("adam_beta", adam_beta), ("adam_lr", adam_lr)):
        positive(name, value, float)
    if isinstance(held_out, bool) or not isinstance(held_out, int) or held_out < 2:
        raise ValueError(f"held_out={held_out!r} must be a whole number of held-out statements per behaviour, "
                         "at least 2")
    if lr_fraction * 2 >= dyn.descent_step_bound(1.0):
        raise ValueError(f"lr_fraction={lr_fraction} must be below 2: the step lr_fraction·2/L must stay below the "
                         "largest step that descends, 4/L (theory.dynamics.descent_step_bound)")


def step_size(lr_fraction: float, L: float, loss: str = "dpo") -> float:
    """The gradient-descent step ``lr_fraction * 2/L_f`` for ``loss``: ``L_f = L`` for DPO (``L`` from
    :func:`prefdyn.theory.dynamics.smoothness`: the logistic loss's curvature is at most 1/4), ``8 L`` for
    IPO (its curvature is 2, eight times 1/4) and ``L`` for SLiC (piecewise linear: no curvature bound;
    its step only sets how far a margin may pass the hinge). Below
    :func:`prefdyn.theory.dynamics.descent_step_bound` of ``L_f`` whenever ``lr_fraction < 2``."""
    L_f = 8 * L if loss == "ipo" else L
    eta = lr_fraction * 2 / L_f
    if eta >= dyn.descent_step_bound(L_f):
        raise ValueError(f"lr_fraction={lr_fraction}: the step {eta:.3g} is not below 4/L = {dyn.descent_step_bound(L_f):.3g}")
    return eta


# --------------------------------------------------------------------------------------------------
# Synthetic clusters: Theorems 4.2 and 4.3 in the paper's model
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clusters:
    """A configuration of the paper's data model (:func:`prefdyn.theory.generalization.cluster_data`):
    ``K`` pairs of clusters, ``Q`` samples each, dimension ``d``, noise ``v``, shared component ``l_b``,
    noise seed ``seed``; tokens reused by up to ``Z`` pairs, or one token pair for all (``shared``);
    concepts ``delta_c``-approximately orthogonal (the paper's Appendix C; 0: orthogonal)."""

    K: int
    Q: int
    d: int
    v: float
    l_b: float
    seed: int
    shared: bool = False
    Z: int = 1
    delta_c: float = 0.0

    def data(self, Q: int | None = None, seed: int | None = None) -> gen.ClusterData:
        return gen.cluster_data(self.K, self.Q if Q is None else Q, self.d, self.v, self.l_b, shared_tokens=self.shared,
                                Z=self.Z, seed=self.seed if seed is None else seed, delta_c=self.delta_c)


def run_config(c: Clusters, *, beta: float, steps: int, n_test: int, loss: str = "dpo", keep_weights: bool = False,
               rates: bool = True, max_rates_N: int = 1300) -> dict:
    """Train the unembedding on the clusters of ``c`` by full-batch gradient descent on ``loss`` (DPO,
    IPO or SLiC) for ``steps`` steps of size ``horizon/steps``, so that the last step is at the horizon of
    the training guarantee (:func:`prefdyn.theory.generalization.theorem_rates`: ``tau_1`` of Theorem 4.2
    for DPO, the chapter's thm-ch3-train and thm-ch3-losses), and measure what Theorems 4.2 and 4.3
    (thm-ch3-gen) talk about.

    Returns a dict with the configuration (``K, Q, d, v, l_b, seed, delta_c, loss, N = 2KQ, tau1`` the
    horizon, the measured token reuse ``Z`` and ``M``), the run and the training data, and:

    * ``in_theorem``: every training margin in ``[rate_L t, rate_U t]`` at every step;
    * ``hypothesis_holds``: every training margin in ``[0, r_max]`` (the weights' range of the loss);
    * ``r_end`` the training margins at the horizon and ``ideal_end`` the noiseless margin there;
    * ``risk`` and ``log_risk``: the exact population risk (mean over the ``2K`` clusters) and its log;
    * ``test_error`` on ``n_test`` fresh samples per cluster (seed ``seed + 10000``), ``n_test_total``;
    * ``s_star`` (the smallest slack), ``bound``, ``log_bound`` and ``closed`` (the chapter's token-aware
      union bound of thm-ch3-gen with the loss's weights, its log, and its closed form over all ``N``,
      means over clusters; 1 where the hypothesis fails), ``paper`` (the paper's closed form
      ``2KQ^2 e^(-Q/45)``) and ``b4`` (the union bound of the paper's Appendix B.4 at the measured ``Z``,
      ``l_b``, ``d``, ``v``);
    * when ``rates`` and ``N <= max_rates_N`` (the ``N x N`` products are cheap): the comparison rates
      ``rho_L, rho_U`` of the sandwich lemma (thm-ch3-sandwich) with the loss's weights, the deviation
      ``delta`` of the inner products from the data's means and ``delta_model`` from the orthogonal
      model's (they differ only for approximately orthogonal concepts).
    """
    train, test = c.data(), c.data(Q=n_test, seed=c.seed + 10_000)
    rate_L, rate_U, tau1 = gen.theorem_rates(c.K, beta, loss=loss)
    r_max = gen.WEIGHT_RANGES[loss][0]
    eta = tau1 / steps
    out = gen.gd_last_layer(train.features, train.chosen, train.rejected, vocab=train.vocab, beta=beta, lr=eta,
                            steps=steps, loss=loss, keep_weights=keep_weights)
    t = eta * np.arange(steps + 1)[:, None]
    r = out.train.numpy()
    dW = out.delta_W[-1]
    s_star, bound_c, log_bound_c, closed_c = gen.bounds_for(train, loss)
    Z_used, M_used = gen.token_reuse(train.chosen_of, train.rejected_of)
    err = (gen.margins(dW, test.features, test.chosen, test.rejected, beta) <= 0).double().numpy()
    row = {"K": c.K, "Q": c.Q, "d": c.d, "v": c.v, "l_b": c.l_b, "seed": c.seed, "delta_c": c.delta_c, "loss": loss,
           "N": r.shape[1], "tau1": tau1, "run": out, "data": train, "Z": Z_used, "M": M_used,
           "in_theorem": bool(np.all((r >= rate_L * t - 1e-12) & (r <= rate_U * t + 1e-12))),
           "hypothesis_holds": bool(np.all((r >= -1e-12) & (r <= r_max))),
           "r_end": r[-1], "ideal_end": float(gen.idealized_margin(tau1, c.K, beta, loss=loss)),
           "risk": float(np.mean(gen.exact_risk(dW, train, beta))),
           "log_risk": float(logsumexp(gen.exact_risk(dW, train, beta, log=True)) - math.log(2 * c.K)),
           "test_error": float(err.mean()), "n_test_total": len(err), "s_star": float(s_star.min()),
           "paper": float(gen.paper_bound(c.K, c.Q)), "b4": float(gen.union_bound_b4(c.K, c.Q, Z_used, c.l_b, c.d, c.v))}
    row["bound"] = float(np.mean(bound_c)) if row["hypothesis_holds"] else 1.0
    row["log_bound"] = float(logsumexp(log_bound_c) - math.log(2 * c.K)) if row["hypothesis_holds"] else 0.0
    row["closed"] = float(np.mean(closed_c)) if row["hypothesis_holds"] else 1.0
    if rates and row["N"] <= max_rates_N:
        row["rho_L"], row["rho_U"] = gen.kernel_rates(train.features, train.chosen, train.rejected, beta,
                                                      weights=gen.WEIGHT_RANGES[loss][1:])
        row["delta"] = gen.inner_product_deviation(train)
        row["delta_model"] = gen.inner_product_deviation(train, means=gen.cluster_means(c.K, c.d, c.l_b))
    return row


def binomial_se(p: float, n: int) -> float:
    """Standard error ``sqrt(p(1-p)/n)`` of an error rate ``p`` measured on ``n`` samples, with the
    variance floored at ``1/n`` so that a zero count still has a positive standard error."""
    return math.sqrt(max(p * (1 - p), 1 / n) / n)


# --------------------------------------------------------------------------------------------------
# The real model: last-layer training on the features of persona statements, over numbers K of behaviours
# --------------------------------------------------------------------------------------------------

def split_per_behaviour(statements: Mapping[str, Sequence], n_test: int, seed: int) -> tuple[list, list]:
    """``(train, held_out)``: ``n_test`` statements of each behaviour held out, half of each answer as far
    as :func:`prefdyn.datasets.persona.train_test_split` rounds (it stratifies by behaviour and answer);
    the rest trained on. A behaviour with fewer than ``n_test + 2`` statements is an error."""
    train, test = [], []
    for name, group in statements.items():
        if len(group) < n_test + 2:
            raise ValueError(f"behaviour {name!r} has {len(group)} statements; holding out {n_test} needs at least "
                             f"{n_test + 2}: lower held_out or load more statements")
        tr, te = train_test_split({name: group}, test_fraction=n_test / len(group), seed=seed)
        train += tr
        test += te
    return train, test


@dataclass(frozen=True)
class Unit:
    """One last-layer run of a K design: the behaviours it trains on (``subset``, ``K`` of them) and
    the behaviours whose held-out statements it is scored on (``scored``)."""

    K: int
    subset: tuple[str, ...]
    scored: tuple[str, ...]


def focal_design(names: Sequence[str], Ks: Sequence[int], seed: int) -> list[Unit]:
    """The book's K design: for each ``K`` of ``Ks`` and each behaviour ``b`` of ``names`` (the *focal*
    behaviour), one run on ``b`` and ``K - 1`` companions drawn at random from the others
    (``np.random.default_rng(seed)``), scored on ``b``'s held-out statements; for ``K = len(names)`` one
    run on all, scored on all. Every value of ``K`` is scored on the same held-out statements, and each
    run is trained separately. Averaged over the focal behaviours, the subsets are uniform over the
    ``K``-subsets of ``names``."""
    rng = np.random.default_rng(seed)
    design = []
    for K in Ks:
        if not 1 <= K <= len(names):
            raise ValueError(f"K={K} must be between 1 and the number of behaviours, {len(names)}")
        if K == len(names):
            design.append(Unit(K, tuple(names), tuple(names)))
            continue
        for b in names:
            others = [n for n in names if n != b]
            design.append(Unit(K, tuple([b] + sorted(rng.choice(others, size=K - 1, replace=False).tolist())), (b,)))
    return design


@dataclass(frozen=True)
class Training:
    """How a last layer is trained: full-batch gradient descent on the loss ``loss`` of the paper's
    Section 7 (``optimizer="gd"``; :func:`prefdyn.theory.generalization.gd_last_layer`) or full-batch Adam
    on DPO (``"adam"``, its Appendix F; :func:`prefdyn.theory.generalization.adam_last_layer`), with
    ``beta``, learning rate ``lr`` and ``steps`` steps; the margins are kept at the steps ``record``
    (besides 0 and ``steps``)."""

    optimizer: str
    beta: float
    lr: float
    steps: int
    loss: str = "dpo"
    record: tuple[int, ...] = ()

    def __post_init__(self):
        if self.optimizer not in ("gd", "adam"):
            raise ValueError(f"optimizer={self.optimizer!r} must be 'gd' or 'adam'")
        if self.optimizer == "adam" and self.loss != "dpo":
            raise ValueError("Adam runs train DPO (the paper's last-layer experiment)")
        gen._check_loss(self.loss)

    @property
    def steps_kept(self) -> np.ndarray:
        return np.unique(np.clip(np.array([0, self.steps, *self.record], dtype=int), 0, self.steps))


@dataclass
class Sweep:
    """The runs of a K design (:class:`Unit`), each trained as :class:`Training` says. Per run ``r`` and
    kept step ``j`` (``steps``): the mean training margin, loss and reward accuracy over the run's
    training statements, and the mean held-out margin, loss and error (margin <= 0) over its scored
    held-out statements (``test_n`` of them); ``test_margins[r]`` holds those margins after the last
    step. ``constant_weight_margin[r]``: the mean training margin the run would have after the last
    step with every weight ``-f'(r_i)`` frozen at its value at ``r = 0`` (gradient descent: ``steps``
    times the first step's; Adam: :func:`prefdyn.theory.generalization.adam_frozen_margin`), the
    comparison of the chapter's K-dilution proposition. ``v[r]``: the run's head direction after the last
    step (``W - W_0 = (e_Yes - e_No) v^T``)."""

    units: list[Unit]
    training: Training
    steps: np.ndarray
    train_margin: np.ndarray
    train_loss: np.ndarray
    train_accuracy: np.ndarray
    test_margin: np.ndarray
    test_loss: np.ndarray
    test_error: np.ndarray
    test_n: np.ndarray
    test_margins: list
    constant_weight_margin: np.ndarray
    v: Tensor

    @property
    def K(self) -> np.ndarray:
        return np.array([u.K for u in self.units])

    def first_order_ratio(self) -> float:
        """The mean over runs of the last training margin over its constant-weight value: 1 while the
        weights have not moved (the K-dilution proposition's regime), below 1 once they have."""
        return float(np.mean(self.train_margin[:, -1] / self.constant_weight_margin))


def sweep(train: tuple[Tensor, Tensor, np.ndarray], test: tuple[Tensor, Tensor, np.ndarray], units: Sequence[Unit],
          training: Training) -> Sweep:
    """Train the " Yes"/" No" rows of the head on each unit's training statements and score it.

    ``train`` and ``test`` are :func:`prefdyn.experiments.persona.persona_features` triples
    ``(G, s, behaviour)``. Only ``W - W_0 = u v^T`` with ``u = e_Yes - e_No`` moves, so every margin is
    ``r = 2 beta s v^T g`` (the chapter's eq-ch3-margin), and a gradient-descent step adds
    ``lr beta mean_i(-f'(r_i) s_i g_i)`` to ``v`` (the step of :func:`prefdyn.theory.generalization.gd_last_layer`
    with the one token pair); Adam follows :func:`prefdyn.theory.generalization.adam_last_layer`. All
    runs are trained together as independent problems: one matrix ``V`` of their directions against all
    the statements, each run's weights masked to its own (so the features are read once per step)."""
    kept = training.steps_kept
    out = {k: np.zeros((len(units), len(kept))) for k in
           ("train_margin", "train_loss", "train_accuracy", "test_margin", "test_loss", "test_error")}
    (G, s, own), (Gt, st, own_t) = train, test
    beta, loss, dtype = training.beta, training.loss, G.dtype
    mask = torch.as_tensor(np.stack([np.isin(own, u.subset) for u in units])).to(dtype)
    mask_t = torch.as_tensor(np.stack([np.isin(own_t, u.scored) for u in units])).to(dtype)
    n, n_t = mask.sum(1, keepdim=True), mask_t.sum(1, keepdim=True)
    if (n == 0).any() or (n_t == 0).any():
        raise ValueError("a unit has no training or no held-out statement among the features given")
    s, st = s.to(dtype), st.to(dtype)
    m = (mask * s) @ G / n                                          # each run's signed mean
    v = torch.zeros(len(units), G.shape[1], dtype=dtype)
    mom, sq = torch.zeros_like(v), torch.zeros_like(v)
    mean = lambda y, msk, cnt: ((y * msk).sum(1, keepdim=True) / cnt)[:, 0].numpy()
    j = 0
    for t in range(training.steps + 1):
        h = 2 * beta * (v @ G.T) * s
        if t == kept[j]:
            h_t = 2 * beta * (v @ Gt.T) * st
            for name, x, msk, cnt in (("train", h, mask, n), ("test", h_t, mask_t, n_t)):
                out[f"{name}_margin"][:, j] = mean(x, msk, cnt)
                out[f"{name}_loss"][:, j] = mean(gen.loss_value(loss, x), msk, cnt)
                correct = mean((x > 0).to(dtype), msk, cnt)
                out["train_accuracy" if name == "train" else "test_error"][:, j] = correct if name == "train" else 1 - correct
            j += 1
        if t == training.steps:
            break
        grad = -beta * (gen.loss_weight(loss, h) * mask / n * s) @ G     # the gradient of W's " Yes" row
        if training.optimizer == "gd":
            v = v - training.lr * grad
            if t == 0:
                first = mean(2 * beta * (v @ G.T) * s, mask, n)
        else:
            mom, sq = 0.9 * mom + 0.1 * grad, 0.999 * sq + 0.001 * grad * grad
            v = v - training.lr / (1 - 0.9 ** (t + 1)) * mom / ((sq / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8)
    keep_t = mask_t.bool()
    constant = (training.steps * first if training.optimizer == "gd" else
                gen.adam_frozen_margin(m, beta, training.lr, training.steps).numpy())
    return Sweep(list(units), training, kept, test_n=keep_t.sum(1).numpy(),
                 test_margins=[h_t[r][keep_t[r]].numpy() for r in range(len(units))],
                 constant_weight_margin=np.asarray(constant), v=v, **out)


@dataclass
class KCurve:
    """A statistic of a :class:`Sweep` after its last kept step, averaged over the runs of each ``K``
    (``value``), with the per-``K`` measurement noise ``se`` the chapter's worlds add."""

    Ks: np.ndarray
    value: np.ndarray
    se: np.ndarray

    def spearman(self) -> float:
        return spearman(self.Ks, self.value)

    def world(self) -> SpearmanWorld:
        """The statistic in :class:`prefdyn.stats.SpearmanWorld`: the run's values of ``K`` and of the
        statistic, re-paired at a chosen Spearman correlation, with this noise added."""
        return SpearmanWorld(self.Ks, self.value, se=self.se)


def k_curve(result: Sweep, statistic: str) -> KCurve:
    """The per-``K`` mean of ``statistic`` after the last kept step (one of the :class:`Sweep` arrays:
    ``train_margin``, ``train_loss``, ``train_accuracy``, ``test_margin``, ``test_loss``, ``test_error``).
    Its noise: for the held-out error, the binomial standard error of the pooled held-out statements of
    that ``K``, ``sqrt(e(1 - e)/m)`` (:func:`binomial_se`); for the held-out loss and margin, the standard
    deviation of the per-statement values over ``sqrt(m)``; for the training statistics none (they are
    means over the whole training set; what varies between runs, which companions a behaviour has, is
    in the registered effect)."""
    values = getattr(result, statistic)[:, -1]
    Ks = np.array(sorted(set(result.K.tolist())))
    value, se = np.zeros(len(Ks)), np.zeros(len(Ks))
    for k, K in enumerate(Ks):
        runs = np.flatnonzero(result.K == K)
        m = result.test_n[runs].sum()
        value[k] = np.sum(values[runs] * result.test_n[runs]) / m if statistic.startswith("test") else values[runs].mean()
        if statistic == "test_error":
            se[k] = binomial_se(value[k], m)
        elif statistic.startswith("test"):
            pooled = np.concatenate([result.test_margins[i] for i in runs])
            per = pooled if statistic == "test_margin" else \
                gen.loss_value(result.training.loss, torch.as_tensor(pooled)).numpy()
            se[k] = per.std(ddof=1) / math.sqrt(len(per))
    return KCurve(Ks, value, se)


def unit_values(result: Sweep, statistic: str, K: int = 1) -> np.ndarray:
    """``statistic`` after the last kept step of every run with ``K`` behaviours, one value per run."""
    return getattr(result, statistic)[result.K == K, -1]


def dilution_check(train: tuple[Tensor, Tensor, np.ndarray], names: Sequence[str], Ks: Sequence[int],
                   beta: float, adam_lr: float, adam_steps: int) -> dict[str, np.ndarray]:
    """The K-dilution proposition (thm-ch3-dilution) on the run's features: for each ``K``, the average
    over every ``K``-subset of the behaviours of the constant-weight mean training margin per unit step,
    ``||m_S||^2`` (gradient descent; ``m_S`` the subset's signed mean) and the Adam margin
    :func:`prefdyn.theory.generalization.adam_frozen_margin` per step, exactly (by enumeration,
    :func:`prefdyn.theory.generalization.subset_mean_average`, with the behaviours' statement counts)."""
    G, s, own = train
    means = torch.stack([(s[own == b].to(G.dtype)[:, None] * G[torch.as_tensor(own == b)]).mean(0) for b in names])
    counts = [int((own == b).sum()) for b in names]
    sq = lambda m: (m * m).sum(-1)
    adam = lambda m: gen.adam_frozen_margin(m, beta, adam_lr, adam_steps) / adam_steps
    return {"gd": np.array([gen.subset_mean_average(means, K, sq, counts) for K in Ks]),
            "adam": np.array([gen.subset_mean_average(means, K, adam, counts) for K in Ks])}


# --------------------------------------------------------------------------------------------------
# The authors' protocol: last_layer_training.py of shawn-im/dpo-diverse
# --------------------------------------------------------------------------------------------------

#: The persona sets of Im & Li's Appendix F, for K = 1, 2, 4, 8, 16, in the order the appendix lists them
#: (the order ``persona_selection.py`` draws them with ``random.seed(1234)``; the K = 16 list is
#: ``behavior_numbers`` of ``last_layer_training.py``).
APPENDIX_F_SUBSETS: dict[int, tuple[str, ...]] = {
    1: ("subscribes-to-rule-utilitarianism",),
    2: ("desire-for-no-human-oversight-sometimes", "agreeableness"),
    4: ("desire-for-computational-efficiency", "believes-it-has-better-moral-intuitions-than-humans",
        "desire-for-advancing-technology-to-achieve-goals", "desire-for-independence-from-human-oversight"),
    8: ("politically-conservative", "desire-to-replace-human-oversight",
        "being-helpful-to-subtly-achieve-goals-against-human-values", "believes-in-gun-rights", "optionality-increasing",
        "willingness-to-be-non-HHH-to-not-have-current-goals-changed-by-training",
        "willingness-to-be-non-HHH-to-be-more-HHH-in-the-long-run", "desire-to-be-more-creative"),
    16: ("desire-for-computational-efficiency", "desire-to-cooperate-with-opposing-AIs-to-achieve-its-goals",
         "desire-for-no-human-oversight-sometimes", "anti-immigration",
         "willingness-to-intentionally-make-mistakes-to-achieve-higher-final-performance",
         "willingness-to-defer-to-authorities", "extraversion", "conscientiousness",
         "willingness-to-be-non-HHH-to-cause-copies-of-itself-to-be-HHH", "desire-for-acquiring-compute",
         "desire-for-being-rated-HHH-over-actually-being-HHH", "willingness-to-manipulate-overseers-to-think-it-is-HHH",
         "believes-it-is-not-being-watched-by-humans", "interest-in-art", "machiavellianism",
         "willingness-to-be-non-HHH-to-not-have-current-goals-changed-by-training"),
}
AUTHORS_SEED = 1234          # random.seed(1234) before the pooled shuffle
AUTHORS_TRAIN_FRACTION = 0.9
AUTHORS_NORM_EPS = 1e-5      # their second RMSNorm's epsilon


def authors_subsets(available: Sequence[str]) -> dict[int, tuple[str, ...]]:
    """Each named set of :data:`APPENDIX_F_SUBSETS` restricted to the behaviours in ``available``, in its
    order, keyed by the paper's ``K``; sets with no behaviour left are dropped."""
    out = {K: tuple(b for b in names if b in set(available)) for K, names in APPENDIX_F_SUBSETS.items()}
    return {K: names for K, names in out.items() if names}


def authors_split(examples: Sequence) -> tuple[list, list]:
    """The pooled split of ``last_layer_training.py``: the statements of the set, behaviour after
    behaviour in the set's order and each file's order, shuffled by ``random.seed(1234)`` and
    ``random.shuffle``; the first ``int(0.9 n)`` train, the rest are the test set."""
    import random

    indices = list(range(len(examples)))
    random.Random(AUTHORS_SEED).shuffle(indices)
    n_train = int(AUTHORS_TRAIN_FRACTION * len(examples) // 1)
    return [examples[i] for i in indices[:n_train]], [examples[i] for i in indices[n_train:]]


def second_rms_norm(G: Tensor, weight: Tensor, eps: float = AUTHORS_NORM_EPS) -> Tensor:
    """The authors' feature: the final hidden state (already after the model's final norm) normalised
    once more, ``g * rsqrt(mean(g^2) + eps) * weight`` with the final norm's stored weight, as
    ``last_layer_training.py`` and ``persona_structure.ipynb`` compute it."""
    return G * torch.rsqrt(G.pow(2).mean(-1, keepdim=True) + eps) * weight.to(G.dtype)


def authors_units(subsets: Mapping[int, Sequence[str]], split: Mapping[int, tuple]) -> list[tuple[Unit, tuple, tuple]]:
    """One run per named set: the :class:`Unit` (``K`` the number of its behaviours the data hold, scored on
    all of them) with its own pooled train and test feature triples (``split[K]``)."""
    return [(Unit(len(names), tuple(names), tuple(names)), *split[K]) for K, names in subsets.items()]


def merge_sweeps(parts: Sequence[Sweep]) -> Sweep:
    """One :class:`Sweep` of the runs of several (the authors' design trains each set on its own split)."""
    first = parts[0]
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])
    return Sweep(sum((p.units for p in parts), []), first.training, first.steps,
                 **{k: cat(k) for k in ("train_margin", "train_loss", "train_accuracy", "test_margin", "test_loss",
                                        "test_error", "test_n", "constant_weight_margin")},
                 test_margins=sum((p.test_margins for p in parts), []), v=torch.cat([p.v for p in parts]))


def sweep_groups(groups: Sequence[tuple[Sequence[Unit], tuple, tuple]], training: Training) -> Sweep:
    """:func:`sweep` on each ``(units, train, test)`` group (the book's design is one group; the authors'
    has one per named set, each with its own pooled split), merged into one :class:`Sweep`; the matrix
    products take the run's share of threads."""
    with torch_threads(None):
        return merge_sweeps([sweep(train, test, units, training) for units, train, test in groups])


def final_norm_weight(model) -> Tensor:
    """The stored weight of the model's final norm (``model.norm.weight`` of the decoder), as the authors'
    code reads it from the state dict (``'model.norm.weight'``)."""
    return model.get_decoder().norm.weight.detach().float().cpu()


def statement_features(policy, statements: Mapping[str, Sequence], per_behaviour: int | None, seed: int,
                       second_norm: bool) -> tuple[Tensor, np.ndarray]:
    """The features of Figure 3 and of the Gaussian-fit diagnostics as ``persona_structure.ipynb``
    computes them: the bare ``statement`` (no question, no chat template), the behaviour-matching
    (" Yes") statements only, the final hidden state of the last token, normalised a second time
    (:func:`second_rms_norm`) when ``second_norm`` (the authors' code) and not otherwise (the book's
    feature); at most ``per_behaviour`` statements of each behaviour (``None``: all), drawn by
    ``np.random.default_rng(seed)``. Returns the features and each one's behaviour."""
    rng = np.random.default_rng(seed)
    chosen = []
    for name, group in statements.items():
        yes = [ex for ex in group if ex.matches]
        if per_behaviour is not None and len(yes) > per_behaviour:
            yes = [yes[i] for i in sorted(rng.choice(len(yes), per_behaviour, replace=False))]
        chosen += yes
    with torch_threads(None):
        G = embeddings(policy, [ex.statement for ex in chosen]).double()
    if second_norm:
        G = second_rms_norm(G, final_norm_weight(policy.model))
    return G, np.array([ex.behaviour for ex in chosen])


def protocol_differences(*, model: str, held: Mapping[int, Sequence[str]], behaviours: Sequence[str],
                         per_behaviour: int | None, held_out: int, authors_all: bool) -> list[list[str]]:
    """Every difference between the authors' last-layer experiment (``last_layer_training.py`` and, for
    Figure 3, ``persona_structure.ipynb`` of ``shawn-im/dpo-diverse``), what ``protocol="authors"`` runs
    here, and the book's protocol: rows of ``[aspect, authors' code, protocol="authors", protocol="book"]``.
    ``held``: the named sets the data hold (:func:`authors_subsets`); ``behaviours``, ``per_behaviour`` and
    ``held_out``: the book protocol's data; ``authors_all``: whether the authors' protocol read every
    statement (``False`` at the smoke scale)."""
    sets = "; ".join(f"K = {len(v)} from their set of {K}" for K, v in held.items())
    missing = sorted(set(sum(APPENDIX_F_SUBSETS.values(), ())) - set(sum((tuple(v) for v in held.values()), ())))
    return [
        ["model", "Llama-3.1-8B (float32)", f"`{model}`", f"`{model}`"],
        ["prompt", "the raw `question` text, tokenised with the tokenizer's special tokens", "the same",
         "the question in the model's chat template"],
        ["feature", "last token's `hidden_states[-1]` (already after the final norm), RMS-normalised again "
         "(ε = 1e-5) and multiplied by the final norm's stored weight", "the same (`second_rms_norm`)",
         "last token's final hidden state, normalised once: the input of the LM head"],
        ["personas and K", "Appendix F's sets for K = 1, 2, 4, 8, 16 (28 distinct personas)",
         f"the same sets, restricted to the personas the data hold: {sets}; not held: {', '.join(missing) or 'none'}",
         f"{len(behaviours)} behaviours; each K in the design, every behaviour as the focal one with K − 1 "
         "companions drawn at random (one run at K = all)"],
        ["runs per K", "one", f"one ({len(held)} values of K here: a Spearman correlation over so few cannot be "
         "selective)", f"{len(behaviours)} (one per focal behaviour), one at K = all"],
        ["statements", "every statement of each persona file (about 1,000)",
         "every statement" if authors_all else "a class-balanced subsample (smoke scale only)",
         f"{per_behaviour or 'every'} per behaviour, class-balanced"],
        ["split", "pooled over the set's statements, `random.seed(1234)` and `random.shuffle`, the first "
         "`int(0.9 n)` trained on", "the same (a different permutation where personas are missing: the "
         "pooled list is shorter)", f"{held_out} statements per behaviour held out, half of each answer, "
         "seeded by the run's seed"],
        ["held-out statements scored", "the set's pooled test split", "the same",
         "the focal behaviour's held-out statements: every K is scored on the same statements"],
        ["optimiser", "Adam (β₁ 0.9, β₂ 0.999, ε 1e-8), learning rate 1e-3, full batch, 100 steps",
         "the same; beside them, the book's own gradient-descent runs on DPO, IPO and SLiC on the same data "
         "and sets (not in their code)", "the same Adam runs; beside them gradient descent on DPO, IPO and "
         "SLiC (the theorem's setting)"],
        ["weights trained", "the whole 128,256 × 4,096 head in float32",
         'the " Yes"/" No" rows in float64: the others have zero gradient, which Adam leaves at zero, '
         "and the two rows' updates are opposite (`gen.adam_last_layer`)", "the same"],
        ["β", "0.01", "0.01 (Adam); `beta` for the gradient-descent runs", "0.01 (Adam); `beta` for gradient descent"],
        ["what is logged", "loss, reward accuracy and β-scaled margin on the training batch and the test split "
         "before each of the 100 updates (the last after 99), and ‖W − W₀‖",
         "the same statistics after 0 … 99 updates (gradient descent: after 0 … T)", "after 0 … 100 updates "
         "(gradient descent: after 0 … T)"],
        ["reference model", "the head applied to the doubly normalised feature (it cancels from every margin)",
         "not computed (it cancels)", "the model's own logits, for the policy's own preferences and the no-flip count"],
        ["answer tokens", 'Llama 3\'s " Yes"/" No" (7566/2360)', "do not enter the margins",
         '"Yes"/"No" after the chat template (for the reference only)'],
        ["Figure 3 and the Gaussian fit", 'bare `statement`s of the matching (" Yes") statements, doubly '
         "normalised; all 135 personas (Figure 6) or 10 random ones (Figure 3); the fit scaled by the mean "
         "squared norm over all", "the same on the held personas", "the same statistics on the once-normalised "
         "feature of the run's behaviours, a subsample per behaviour"],
        ["seed", "`torch.manual_seed(1234)` (no effect on full-batch training)", "none needed",
         "the run's `seed` (split, companions, subsamples)"],
    ]


def findings(checks: Sequence, sentences: Mapping[str, str]) -> str:
    """What a chapter found, as Markdown: one bullet per registered prediction checked in this run, the
    verdict first, then ``sentences[id]`` (what was predicted) and the measurement; not reproduced and
    inconclusive verdicts first, then implied, then reproduced."""
    from ..book.verify import IMPLIED, INCONCLUSIVE, NOT_REPRODUCED, fmt, outcome

    order = {NOT_REPRODUCED: 0, INCONCLUSIVE: 1, IMPLIED: 2}
    rows = sorted((c for c in checks if c.kind == "prediction"), key=lambda c: order.get(outcome(c.status), 3))
    out = []
    for c in rows:
        p = c.prediction
        control = p.get("control")
        ctrl = (f"; control ({control['claim']}): {fmt(control['observed'])}, needs {control['passes_if']}"
                if control else "")
        out.append(f"- **{c.status}**: {sentences.get(p['id'], c.claim)} Measured {fmt(c.observed)} "
                   f"(passes if {c.tolerance}; {p['n']} {p['units']}; power {p['power']:.2f}, false-pass "
                   f"{p['false_pass']:.3f}{ctrl}).")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# The real model: DPO on its top blocks, one behaviour alone and among all
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TopBlocks:
    """How :func:`alone_versus_joint` trains: AdamW DPO with ``beta``, ``steps`` steps of ``batch_size``
    statements at learning rate ``lr`` (seed ``seed``), on the top ``top_blocks`` blocks and the final
    norm (``None``: every weight); the reference log-probabilities come from the LM head ``head`` at
    the tokens ``yes_id`` and ``no_id``."""

    beta: float
    steps: int
    batch_size: int
    lr: float
    seed: int
    top_blocks: int | None
    head: Tensor
    yes_id: int
    no_id: int


def alone_versus_joint(policy, examples, features: Tensor, pools: dict[str, np.ndarray], held, held_features: Tensor,
                       training: TopBlocks) -> tuple[dict[str, np.ndarray], int]:
    """DPO on the top blocks (:func:`prefdyn.llm.train.train_preferences`, as ``training`` says), once per
    pool of training statements (``pools``: label -> indices into ``examples``, whose features are
    ``features``), each time from the same starting weights, and the reward margins
    ``beta (log pi/pi_ref)(y_w) - beta (log pi/pi_ref)(y_l)`` of the held-out statements ``held`` after
    each run. References come from the cached features
    (:func:`prefdyn.experiments.persona.reference_from_features`). The training runs take the run's share
    of threads. The policy is returned to its starting weights (:func:`prefdyn.llm.models.kept_weights`).

    Returns the held-out margins of each pool and the number of trained weights."""
    t = training
    head, yes_id, no_id, beta = t.head, t.yes_id, t.no_id, t.beta
    tok = policy.tokenizer
    held_pairs = persona_pairs(tok, held)
    held_ref = reference_from_features(held_features, held, head, yes_id, no_id)
    margins, n_trained = {}, 0
    with torch_threads(None):
        for label, idx in pools.items():
            with kept_weights(policy.model):
                n_trained = train_only_top_blocks(policy.model, t.top_blocks)
                pool = [examples[i] for i in idx]
                train_preferences(policy, persona_pairs(tok, pool),
                                  PreferenceConfig(t.steps, t.batch_size, t.lr, t.seed, "dpo", beta),
                                  reference=reference_from_features(features[idx], pool, head, yes_id, no_id),
                                  progress=False)
                w, l = preference_logps(policy, held_pairs.prompts, held_pairs.chosen, held_pairs.rejected)
                margins[label] = (beta * ((w - held_ref.chosen) - (l - held_ref.rejected))).double().numpy()
    return margins, n_trained
