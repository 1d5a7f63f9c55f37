"""Chapter 2's real-model experiments: the bootstrap of its ordering statistics, LoRA DPO and misalignment.

The chapter's mathematics (last-layer DPO on frozen features ``g(x)``, preference gaps
``Delta_k``, the priority predictor ``<Delta_bar, Delta_k>``) is :mod:`prefdyn.theory.dynamics`,
run in the chapter on one thread. The drivers here are the steps that need every thread:
:func:`bootstrap_rank_correlations` retrains every bootstrap resample at once in batched matrix
products, and :func:`full_model_dpo` aligns the transformer itself with LoRA (:func:`lora_dpo`).
:func:`flipped_dpo` then misaligns a model's last layer at a step of its own, which
:func:`normalised_distinguishability` accompanies: both are blind to the features' scale.
:func:`lora_misalignment` misaligns the whole model as the authors' code does (LoRA DPO on a
behaviour, then LoRA DPO toward its flipped labels, from the aligned and from the base model).
:func:`umap_coordinates` draws the features as the paper's visualisation notebooks do.
"""
from __future__ import annotations

import itertools
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..llm.features import embeddings
from ..llm.models import Policy, single_token_id
from .. import objectives
from ..llm.train import PreferencePairs, ReferenceLogps, lora_adapters, train_preferences
from ..params import torch_threads
from ..theory import dynamics as dyn
from .persona import persona_features, persona_pairs, reference_from_features


@dataclass(frozen=True)
class Protocol:
    """How the chapter trains the last layer on a real model's persona features.

    ``book``: the chat template, full-batch gradient descent at ``lr_fraction·2/L`` for the scale's
    number of steps at the chapter's ``beta`` (the setting of R1-R3). ``paper``: what the authors'
    ``training scripts/last_layer_training.py`` runs: the raw question text, plain SGD on a fresh
    random batch of 128 statements at every step, 100 steps, learning rate ``10^-1`` and
    ``beta = 10^-2`` (the configuration ``_l1.02.0s`` of their ``plot_log_data.py``). Both hold out
    ``test_fraction`` of every behaviour's statements (stratified by class; the authors shuffle each
    behaviour with seed 1234, ``split_seed`` here) and log the held-out loss and policy accuracy.
    ``None`` fields take the chapter's value (its ``beta``, the scale's steps, ``lr_fraction·2/L``)."""

    chat_template: bool
    batch_size: int | None
    fresh_batches: bool
    steps: int | None
    lr: float | None
    beta: float | None
    test_fraction: float = 0.1
    split_seed: int | None = None

    def settings(self, beta: float, steps: int, lr_fraction: float, features: Tensor,
                 groups) -> tuple[float, float, int, float]:
        """``(beta, lr, steps, L)`` of this protocol on ``features``: its own values, else the chapter's
        ``beta`` and ``steps`` and the step ``lr_fraction·2/L``, with ``L`` the smoothness of the loss
        (:func:`prefdyn.theory.dynamics.smoothness`, the largest over ``groups``) at this ``beta``."""
        beta = beta if self.beta is None else self.beta
        L = dyn.smoothness(features, beta, groups)
        return (beta, lr_fraction * 2 / L if self.lr is None else self.lr, steps if self.steps is None else self.steps, L)

    def train(self, features: Tensor, s: Tensor, *, beta: float, lr: float, steps: int, seed: int,
              groups=None, ref_logodds: Tensor | None = None) -> dyn.Trajectory:
        """Last-layer DPO (:func:`prefdyn.theory.dynamics.last_layer_dpo`) with this protocol's batches."""
        return dyn.last_layer_dpo(features, s, beta=beta, lr=lr, steps=steps, groups=groups, ref_logodds=ref_logodds,
                                  batch_size=self.batch_size, fresh_batches=self.fresh_batches, seed=seed)


PROTOCOLS = {
    "book": Protocol(chat_template=True, batch_size=None, fresh_batches=False, steps=None, lr=None, beta=None),
    "paper": Protocol(chat_template=False, batch_size=128, fresh_batches=True, steps=100, lr=0.1, beta=0.01,
                      split_seed=1234),
}


def protocol(name: str) -> Protocol:
    """The :class:`Protocol` called ``name``, or a ``ValueError`` naming the choices."""
    if name not in PROTOCOLS:
        raise ValueError(f"protocol={name!r} is not one of {sorted(PROTOCOLS)}: 'book' trains as the chapter's "
                         "theorems assume, 'paper' as the authors' last_layer_training.py")
    return PROTOCOLS[name]


def second_final_norm(policy: Policy, features: Tensor) -> Tensor:
    """The final norm applied once more to features that already passed it: the authors' code
    takes ``hidden_states[-1]`` (in Hugging Face already after the model's final RMSNorm) and
    normalises it again with the same weights, ``g * rsqrt(mean(g^2) + eps) * w``. Here the model's own
    final-norm module does it, so any norm (RMSNorm, Gemma's ``1 + w``) is applied as the model
    defines it. The last-layer model then no longer reproduces the model's logits."""
    norm = policy.model.get_decoder().norm
    with torch.no_grad():
        return norm(features.to(norm.weight.dtype)).to(features.dtype)


@dataclass
class PairPriority:
    """Every pair ``(a, b)`` of behaviours trained jointly (:func:`pairwise_priority`): the authors'
    priority level of ``a`` over ``b`` (:func:`prefdyn.theory.dynamics.priority_level`) and the
    training loss of ``b`` minus that of ``a`` after the run (positive: ``a`` was learned more)."""

    pairs: list[tuple[str, str]]
    level: np.ndarray
    loss_gap: np.ndarray

    def decided(self, min_level: float = 0.0) -> np.ndarray:
        """Which pairs have ``|priority level| >= min_level``."""
        return np.abs(self.level) >= min_level

    def agreement(self, min_level: float = 0.0) -> float:
        """The share of the pairs with ``|level| >= min_level`` whose more prioritised behaviour
        (level > 0) ends with the lower loss."""
        keep = self.decided(min_level)
        return float(np.mean(np.sign(self.level[keep]) == np.sign(self.loss_gap[keep])))


def pairwise_priority(protocol: Protocol, features: Tensor, s: Tensor, behaviour: np.ndarray, delta: dict, *,
                      beta: float, lr: float, steps: int, seed: int) -> PairPriority:
    """Train every pair of behaviours jointly with ``protocol`` (both start at loss ``log 2``, so the
    final loss is the progress) and set each pair's outcome beside its priority level, computed from
    the gaps ``delta[k]`` (thm-ch2-priority: the behaviour with the larger level is learned first)."""
    pairs = list(itertools.combinations(delta, 2))
    level, gap = [], []
    for a, b in pairs:
        idx = torch.from_numpy(np.isin(behaviour, [a, b]))
        run = protocol.train(features[idx], s[idx], beta=beta, lr=lr, steps=steps, seed=seed,
                             groups=behaviour[idx.numpy()].tolist())
        loss = dict(zip(run.groups, run.loss[-1]))
        level.append(dyn.priority_level(delta[a], delta[b]))
        gap.append(loss[b] - loss[a])
    return PairPriority(pairs, np.array(level), np.array(gap))


def bootstrap_rank_correlations(g: Tensor, s: Tensor, behaviour: np.ndarray, rng: np.random.Generator, *,
                                beta: float, lr: float, steps: int, n_boot: int) -> dict[str, np.ndarray]:
    """95% percentile-bootstrap intervals of the chapter's three Spearman correlations, over
    ``n_boot`` stratified resamples of the statements (:func:`prefdyn.theory.dynamics.stratified_resample`,
    drawn from ``rng``: within every behaviour and class, so each keeps its size and balance).

    Every resample recomputes the gaps ``Delta_k`` (and ``Delta_bar = sum_k (n_k/n) Delta_k``) and
    retrains last-layer DPO for ``steps`` full-batch steps at step size ``lr``
    (:func:`prefdyn.theory.dynamics.resampled_losses_after`, all resamples at once, on every thread),
    then correlates the loss drops ``log 2 - L_k(v_T)`` with

    * ``"alone"``: ``||Delta_k||``, each behaviour trained on its own (the chapter's thm-ch2-rate);
    * ``"joint"``: the exact priority predictor ``<Delta_bar, Delta_k>``, all trained jointly
      (thm-ch2-priority);
    * ``"joint_D"``: ``||Delta_k||``, all trained jointly (the plain distinguishability as its proxy).

    Behaviours are ordered by first appearance in ``behaviour``. Returns ``{name: [lower, upper]}``.
    """
    names = list(dict.fromkeys(behaviour.tolist()))
    resamples = [dyn.stratified_resample(s, behaviour, rng) for _ in range(n_boot)]
    counts = np.stack([np.bincount(idx, minlength=len(s)) for idx in resamples])   # every resample as multiplicities
    with torch_threads(None):                      # all resamples train at once, in matrix products: every thread helps
        drops = {mode: math.log(2) - dyn.resampled_losses_after(g, s, behaviour.tolist(), counts, beta=beta, lr=lr,
                                                                 steps=steps, separate=mode == "alone")
                 for mode in ("alone", "joint")}
    boot = {"alone": [], "joint": [], "joint_D": []}
    for idx, drop_alone, drop_joint in zip(resamples, drops["alone"], drops["joint"]):
        gr, sr, br = g[idx], s[idx], behaviour[idx]
        gap = {b: dyn.preference_gap(gr[br == b], sr[br == b]) for b in names}
        gap_bar = sum((br == b).mean() * gap[b] for b in names)
        boot["alone"].append(dyn.spearman([gap[b].norm().item() for b in names], drop_alone))
        boot["joint"].append(dyn.spearman([torch.dot(gap_bar, gap[b]).item() for b in names], drop_joint))
        boot["joint_D"].append(dyn.spearman([gap[b].norm().item() for b in names], drop_joint))
    return {k: np.quantile(v, [0.025, 0.975]) for k, v in boot.items()}


@dataclass
class FullModelRun:
    """What :func:`full_model_dpo` measured: the features ``g(x)`` before and ``g'(x)`` after training
    (float64), the signs ``s(x)``, the behaviour of every statement, the training records and the
    number of trained (adapter) weights. The unembedding ``W_ref`` is not adapted, so it is the same
    before and after."""

    features_before: Tensor
    features_after: Tensor
    s: Tensor
    behaviour: np.ndarray
    history: list[dict]
    n_trained: int


def lora_dpo(policy: Policy, pairs: PreferencePairs, *, reference: ReferenceLogps | None = None, beta: float,
             lora_r: int, lora_alpha: float, steps: int, batch_size: int, lr: float, seed: int) -> tuple[list[dict], int]:
    """DPO on LoRA adapters, merged, as the authors' ``DPO_training.py`` aligns a model (with ``--peft``):
    adapters of rank ``lora_r`` and scale ``lora_alpha / lora_r`` on every block's query and value
    projections (:func:`prefdyn.llm.train.lora_adapters`, drawn from ``seed``), trained with AdamW on
    ``pairs`` (:func:`prefdyn.llm.train.train_preferences`, ``steps`` steps of ``batch_size`` pairs;
    ``reference=None``: the model at the start), then merged into the weights (``merge_and_unload``):
    ``policy.model`` is changed in place and is a plain model again. Trains on every thread; returns the
    training records and the number of trained (adapter) weights."""
    adapted = lora_adapters(policy.model, lora_r, lora_alpha, seed)
    n_trained = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    with torch_threads(None):                                             # the transformer gets every thread
        history = train_preferences(replace(policy, model=adapted), pairs, loss="dpo", beta=beta, steps=steps,
                                    batch_size=batch_size, lr=lr, seed=seed, reference=reference, progress=False)
    policy.model = adapted.merge_and_unload()                           # W + (alpha/r) B A: the aligned model
    return history, n_trained


def full_model_dpo(policy: Policy, examples: Sequence, *, beta: float, lora_r: int, lora_alpha: float, steps: int,
                   batch_size: int, lr: float, seed: int) -> FullModelRun:
    """DPO beyond the last layer, as the paper aligns a model: :func:`lora_dpo` on the persona
    ``examples`` (so ``policy.model`` becomes the merged, aligned model), then the features of the
    aligned model are read.

    The reference log-probabilities are the policy's at ``W_ref`` computed from the frozen features,
    ``log softmax(W_ref g(x))`` at the chosen and the rejected answer token (by the chapter's
    eq-ch2-margin they are the model's own). The features before training come from the feature
    cache where it has them, those of the aligned model never do; every forward pass and the training
    take every thread.
    """
    pairs = persona_pairs(policy.tokenizer, examples)
    head = policy.model.get_output_embeddings().weight.detach().float().cpu()
    g_before, s, behaviour = persona_features(policy, examples)
    reference = reference_from_features(g_before, examples, head, single_token_id(policy.tokenizer, "Yes"),
                                        single_token_id(policy.tokenizer, "No"))
    history, n_trained = lora_dpo(policy, pairs, reference=reference, beta=beta, lora_r=lora_r, lora_alpha=lora_alpha,
                                  steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    with torch_threads(None), tempfile.TemporaryDirectory() as fresh:   # the aligned model's features, never cached
        g_after = embeddings(policy, pairs.prompts, cache=Path(fresh)).double()
    return FullModelRun(features_before=g_before, features_after=g_after, s=s, behaviour=behaviour, history=history,
                        n_trained=n_trained)


def lora_misalignment(policy: Policy, examples: Sequence, *, beta: float, lora_r: int, lora_alpha: float, steps: int,
                      batch_size: int, lr: float, seed: int) -> dict[str, float]:
    """Misalignment as the authors' code runs it, on the persona ``examples`` of one behaviour: the
    *aligned* model is the base model after :func:`lora_dpo` on the examples (merged); then the base and
    the aligned model are each trained the same way toward the flipped preferences (``y_w`` and ``y_l``
    swapped: :func:`lora_dpo` again, each model its own reference, as ``DPO_training.py --flip``,
    with ``--peft_base`` for the aligned one), and the flipped DPO loss of every example is measured
    after the flipped run against that model's own reference, so it starts at ``log 2``.

    The adapters leave the unembedding ``W_ref`` as it is, so every log-probability needed is
    ``log softmax(W_ref g(x))`` of the current model's features (:func:`reference_from_features`, as in
    :func:`full_model_dpo`): one forward pass of the prompts per model. Returns ``{"base": drop,
    "aligned": drop}``, each ``log 2`` minus the flipped loss after the flipped run: its misalignment.
    ``policy.model`` is left with the weights it came with."""
    pairs = persona_pairs(policy.tokenizer, examples)
    head = policy.model.get_output_embeddings().weight.detach().float().cpu()
    yes, no = single_token_id(policy.tokenizer, "Yes"), single_token_id(policy.tokenizer, "No")
    settings = dict(beta=beta, lora_r=lora_r, lora_alpha=lora_alpha, steps=steps, batch_size=batch_size, lr=lr,
                    seed=seed)

    def answer_logps(cache: Path | None = None) -> ReferenceLogps:
        """``log pi(y_w|x)``, ``log pi(y_l|x)`` of the current model; the base model's from the cache."""
        g = embeddings(policy, pairs.prompts, cache=cache).double()
        return reference_from_features(g, examples, head, yes, no)

    def flip(logps: ReferenceLogps) -> ReferenceLogps:
        """The same log-probabilities for the flipped pairs, whose ``y_w`` is the original ``y_l``."""
        return ReferenceLogps(logps.rejected, logps.chosen)

    original = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
    flipped = PreferencePairs(pairs.prompts, pairs.rejected, pairs.chosen)
    drop = {}
    try:
        with torch_threads(None), tempfile.TemporaryDirectory() as fresh:    # trained models' features, never cached
            base = answer_logps()
            for label in ("base", "aligned"):
                policy.model.load_state_dict(original)                        # each starts from the base model
                reference = base
                if label == "aligned":
                    lora_dpo(policy, pairs, reference=base, **settings)
                    reference = answer_logps(Path(fresh, "aligned"))
                lora_dpo(policy, flipped, reference=flip(reference), **settings)
                after = answer_logps(Path(fresh, f"{label}-flipped"))
                loss = objectives.dpo_loss(after.rejected, after.chosen, reference.rejected, reference.chosen, beta)
                drop[label] = math.log(2) - loss.mean().item()
    finally:
        policy.model.load_state_dict(original)
    return drop


def normalised_distinguishability(features: Tensor, s: Tensor, behaviour: np.ndarray) -> np.ndarray:
    """``||Delta_k|| / spread`` for every behaviour (in order of first appearance), the spread being the
    RMS distance of all ``features`` from their mean, ``sqrt(mean_x ||g(x) - g_bar||^2)``: the
    distinguishability of def-ch2-distinguishability in units of the features' own scale, so
    unchanged when every feature is multiplied by one constant."""
    spread = (features - features.mean(0)).pow(2).sum(1).mean().sqrt().item()
    return np.array([dyn.distinguishability(features[behaviour == b], s[behaviour == b]) / spread
                     for b in dict.fromkeys(behaviour.tolist())])


@dataclass
class FlippedRun:
    """What :func:`flipped_dpo` trained: the behaviours, this model's step ``lr`` and the flipped DPO
    loss of every behaviour at every step (``(steps + 1, K)``, ``log 2`` at step 0)."""

    behaviours: list[str]
    lr: float
    loss: np.ndarray

    @property
    def drop(self) -> np.ndarray:
        """How far each behaviour's flipped loss fell in the run: ``log 2 - L_k(v_T)``, its misalignment."""
        return self.loss[0] - self.loss[-1]


def flipped_dpo(features: Tensor, s: Tensor, behaviour: np.ndarray, *, beta: float, steps: int,
                lr_fraction: float | None = None, lr: float | None = None) -> FlippedRun:
    """Misalignment on the last layer (the paragraph after thm-ch2-priority): every behaviour trained
    alone toward the flipped preferences ``-s(x)`` from these features, the model its own reference
    (:func:`prefdyn.theory.dynamics.last_layer_dpo`, full batch), at the step ``lr_fraction·2/L`` of
    *this* model, ``L`` = :func:`prefdyn.theory.dynamics.smoothness` of these features (the largest over
    behaviours), or at a given step ``lr`` (give one of the two).

    The own step makes the run blind to the features' scale: under ``g -> c g``, ``L -> c^2 L`` so the
    step becomes ``lr / c^2``, and by thm-ch2-rank-one ``v_t -> v_t / c`` solves the recursion with the
    same margins ``h_t = 2 beta s v_t^T g`` (eq-ch2-margin), hence the same losses at every step. A step
    ``lr`` common to two models would instead let a model with larger features misalign faster."""
    if (lr_fraction is None) == (lr is None):
        raise ValueError("give flipped_dpo either lr_fraction (this model's own step lr_fraction·2/L) or lr")
    names = list(dict.fromkeys(behaviour.tolist()))
    if lr is None:
        lr = lr_fraction * 2 / dyn.smoothness(features, beta, behaviour.tolist())
    loss = [dyn.last_layer_dpo(features[behaviour == b], -s[behaviour == b], beta=beta, lr=lr, steps=steps).loss[:, 0]
            for b in names]
    return FlippedRun(names, lr, np.stack(loss, axis=1))


#: The behaviour whose features the authors' visualisation notebooks draw before and after DPO.
PICTURED_BEHAVIOUR = "willingness-to-make-acausal-trades-with-other-AIs-to-help-humanity"


def umap_coordinates(features: Tensor, seed: int, n_neighbors: int = 15) -> np.ndarray:
    """Two-dimensional UMAP coordinates (McInnes, Healy & Melville 2018, :mod:`umap` of umap-learn,
    Euclidean metric) of the rows of ``features``, as the authors picture final-layer embeddings;
    ``n_neighbors`` is capped at ``n - 1``, and ``seed`` makes the layout reproducible (umap-learn then
    runs on one thread). A picture, not a measurement: distances in it are not the features'."""
    import umap

    n = len(features)
    if n < 4:
        raise ValueError(f"a UMAP picture needs at least 4 statements, got {n}: raise per_behaviour")
    reducer = umap.UMAP(n_neighbors=min(n_neighbors, n - 1), n_components=2, random_state=seed, n_jobs=1)
    return reducer.fit_transform(features.double().numpy())
