"""Chapter 2's real-model experiments: the two last-layer protocols, what the step-1 identities force,
the bootstrap of its ordering statistics, LoRA DPO and misalignment, and the worlds of its predictions.

The chapter's mathematics (last-layer DPO on frozen features ``g(x)``, preference gaps ``Delta_k``, the
priority predictor ``<Delta_bar, Delta_k>``, the intervals that the step-1 identities force) is
:mod:`prefdyn.theory.dynamics`, run in the chapter on one thread. Here: the :class:`Protocol` of the
book and of the authors' ``last_layer_training.py`` (:data:`PROTOCOLS`, with :data:`AUTHORS_DIFFERENCES`,
every difference between the two, and the split of the authors' code, :func:`authors_split`); the
behaviours a run uses (:func:`chapter_behaviours`); :class:`PairConcordanceWorld`, the world of the
pair prediction, whose pairs share behaviours; the steps that need every thread
(:func:`bootstrap_rank_correlations`, :func:`full_model_dpo` and :func:`lora_dpo`); misalignment of a
model's last layer at a step of its own (:func:`flipped_dpo`, with
:func:`normalised_distinguishability`) and of the whole model as the authors' code does it, one behaviour
at a time, aligned on statements disjoint from the flipped ones (:func:`misalign_behaviour`);
:func:`umap_coordinates`; and the chapter's closing sentences (:func:`findings`).
"""
from __future__ import annotations

import itertools
import math
import random
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .. import objectives, stats
from ..book.verify import outcome
from ..datasets.persona import PersonaExample, train_test_split
from ..llm.features import embeddings
from ..llm.models import Policy, chat_prompt, kept_weights, single_token_id
from ..llm.train import PreferenceConfig, PreferencePairs, ReferenceLogps, lora_adapters, train_preferences
from ..params import ParameterError, torch_threads
from ..theory import dynamics as dyn
from .persona import persona_features, reference_from_features

#: The seed of the authors' ``random.seed(1234)`` (``last_layer_training.py``, ``DPO_training.py``).
AUTHORS_SEED = 1234


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA DPO protocol: ``beta``, AdamW learning rate ``lr``, adapter ``dropout``, ``batch_size`` and
    ``epochs`` over the training statements (``steps = ceil(epochs * n / batch_size)``)."""

    beta: float
    lr: float
    dropout: float
    batch_size: int
    epochs: int = 1

    def steps(self, n: int) -> int:
        return math.ceil(self.epochs * n / self.batch_size)


@dataclass(frozen=True)
class Protocol:
    """How the chapter reads a real model's persona features and trains on them.

    ``book``: the chat template and the chat turn's answers ``Yes``/``No``, the features the model's head
    reads (one final norm), a held-out tenth of every behaviour stratified by class, full-batch
    gradient descent at ``lr_fraction`` times :func:`prefdyn.theory.dynamics.stable_step_bound` for the
    scale's number of steps at the chapter's ``beta`` (the setting of R1-R3), and the chapter's LoRA
    settings. ``authors``: what the authors' ``training scripts/last_layer_training.py`` runs, the raw
    question text (``DPO_training.py``: the question and a new line), the answers `` Yes``/`` No`` of
    the files (Llama's ``▁Yes``/``▁No``, ids 3869/1939), the final RMSNorm applied a second time, the
    split of :func:`authors_split`, plain SGD on a fresh random batch of 128 statements at every step,
    100 steps, learning rate ``10^-1`` and ``beta = 10^-2`` (their plots' configuration ``_l1.02.0s``), and
    the LoRA DPO of ``DPO_training.py --flip --peft_base`` (:data:`AUTHORS_LORA`). ``None`` fields take
    the chapter's values. Every difference between the two, and between ``authors`` and the authors'
    code, is listed in :data:`AUTHORS_DIFFERENCES`."""

    name: str
    chat_template: bool
    answer_space: bool
    second_norm: bool
    split: str
    batch_size: int | None
    fresh_batches: bool
    steps: int | None
    lr: float | None
    beta: float | None
    lora: LoraSettings | None = None
    test_fraction: float = 0.1

    @property
    def answers(self) -> tuple[str, str]:
        """The answer strings whose single tokens are ``Yes`` and ``No``."""
        return (" Yes", " No") if self.answer_space else ("Yes", "No")

    def answer_ids(self, tokenizer) -> tuple[int, int]:
        return tuple(single_token_id(tokenizer, a) for a in self.answers)

    def prompt(self, tokenizer, question: str, lora: bool = False) -> str:
        """The text before the answer: the chat template (``book``), or the raw question, followed by a
        new line in the authors' LoRA runs (``DPO_training.py``) and not in their last-layer runs."""
        if self.chat_template:
            return chat_prompt(tokenizer, question)
        return question + ("\n" if lora else "")

    def split_statements(self, persona: dict, seed: int) -> tuple[list, list]:
        """``(train, held_out)``: :func:`authors_split` or the book's split stratified by class."""
        if self.split == "authors":
            return authors_split(persona)
        return train_test_split(persona, self.test_fraction, seed=seed)

    def features(self, policy: Policy, examples: Sequence[PersonaExample]) -> tuple[Tensor, Tensor, np.ndarray]:
        """``(g, s, behaviour)`` of :func:`prefdyn.experiments.persona.persona_features` with this protocol's
        prompt, the final norm applied once more under ``second_norm`` (:func:`second_final_norm`)."""
        g, s, owner = persona_features(policy, examples, chat_template=self.chat_template)
        return (second_final_norm(policy, g) if self.second_norm else g), s, owner

    def settings(self, beta: float, steps: int, lr_fraction: float, features: Tensor,
                 groups) -> tuple[float, float, int, float]:
        """``(beta, lr, steps, L)`` of this protocol on ``features``: its own values, else the chapter's
        ``beta`` and ``steps`` and the step ``lr_fraction`` times :func:`prefdyn.theory.dynamics.stable_step_bound`
        (``4/L``, ``L`` the largest smoothness over ``groups`` at this ``beta``)."""
        beta = beta if self.beta is None else self.beta
        L = dyn.smoothness(features, beta, groups)
        return (beta, lr_fraction * 4 / L if self.lr is None else self.lr, steps if self.steps is None else self.steps, L)

    def train(self, features: Tensor, s: Tensor, *, beta: float, lr: float, steps: int, seed: int,
              groups=None, ref_logodds: Tensor | None = None, every: int = 1) -> dyn.Trajectory:
        """Last-layer DPO (:func:`prefdyn.theory.dynamics.last_layer_dpo`) with this protocol's batches,
        logged every ``every`` steps."""
        return dyn.last_layer_dpo(features, s, beta=beta, lr=lr, steps=steps, groups=groups, ref_logodds=ref_logodds,
                                  batch_size=self.batch_size, fresh_batches=self.fresh_batches, seed=seed,
                                  every=every)


#: ``DPO_training.py`` with ``-t peft`` (defaults ``-nllr 5 -nlb 2``): LoRA dropout 0.05, AdamW at a
#: constant 10^-5, beta 10^-2, one epoch at 32 per device on 4 devices.
AUTHORS_LORA = LoraSettings(beta=0.01, lr=1e-5, dropout=0.05, batch_size=128, epochs=1)

PROTOCOLS = {
    "book": Protocol("book", chat_template=True, answer_space=False, second_norm=False, split="stratified",
                     batch_size=None, fresh_batches=False, steps=None, lr=None, beta=None),
    "authors": Protocol("authors", chat_template=False, answer_space=True, second_norm=True, split="authors",
                        batch_size=128, fresh_batches=True, steps=100, lr=0.1, beta=0.01, lora=AUTHORS_LORA),
}

#: Every difference between the book's protocol and the authors' code, and what ``protocol="authors"``
#: does about it: ``(what, the authors' code, book, authors)``. A test checks that every field in which
#: the two :data:`PROTOCOLS` differ is named here.
AUTHORS_DIFFERENCES = (
    ("prompt (last layer)", "the question as written in the file", "the chat template", "as the authors"),
    ("prompt (LoRA runs)", "the question and a new line", "the chat template", "as the authors"),
    ("answer tokens", "` Yes`/` No` (Llama ids 3869/1939)", "`Yes`/`No`, the chat turn's first token",
     "` Yes`/` No` of the model's tokenizer"),
    ("features", "the final hidden state normalised a second time by the final RMSNorm (eps 1e-5)",
     "after the model's one final norm: what its head reads", "normalised a second time by the model's own final norm"),
    ("statements", "all of each behaviour's file (about 1,000)", "all (scale `smoke`: a subsample)", "as the book"),
    ("split", "per behaviour: Python's `random.seed(1234)`, `shuffle`, first 90% to train (100 of 1,000 held out)",
     "a tenth of each behaviour and class held out (about 100 statements), seeded by the run", "as the authors"),
    ("distinguishability", "all statements of the behaviour, features of a bfloat16 model "
     "(`embedding_properties.ipynb`)", "the training statements, float32", "all statements, float32"),
    ("last-layer batches", "a fresh random batch of 128 at every step (`next(iter(DataLoader(shuffle=True)))`)",
     "full batch", "as the authors (a different random stream)"),
    ("last-layer steps, lr, beta", "100 SGD steps, lr 0.1, beta 0.01 (the plots' `_l1.02.0s`)",
     "the scale's steps at `lr_fraction`·4/L, the chapter's beta", "as the authors"),
    ("trained head", "the whole head, log-softmax over the vocabulary", "the rank-one update u vᵀ",
     "the same (identical: every gradient is rank one, tested)"),
    ("joint training", "two behaviours (`multi_last_layer_training.py`), the second split by the next shuffle",
     "every behaviour, and every pair", "every pair; each behaviour split by its own `random.seed(1234)`"),
    ("LoRA", "r 8, alpha 32, dropout 0.05 on q_proj and v_proj; AdamW lr 1e-5, beta 0.01, one epoch at 128",
     "r `lora_r`, alpha `lora_alpha`, no dropout; AdamW `lr_full`, the chapter's beta, the scale's steps",
     "as the authors at scale `full`; the scale's steps and batch below it"),
    ("misalignment sets", "aligned and flipped on the same training statements (in-sample)",
     "aligned on half of a behaviour's training statements, flipped on the other half (out of sample)",
     "as the authors"),
    ("misalignment measure", "the flipped DPO loss on the training and the held-out statements (plots)",
     "the flipped loss on the flipped statements after the run", "as the book"),
    ("precision", "bfloat16 training on four GPUs", "float32 on the run's device", "as the book"),
    ("pictured features (UMAP)", "the question and a new line, normalised twice, every statement "
     "(`create_statement_emb_data.ipynb`)", "the chat template, up to the scale's number of statements",
     "the question and a new line, normalised twice, up to the scale's number"),
    ("models", "Llama-2-7B, Mistral-7B", "the run's `model`", "the run's `model`"),
)


def protocol(name: str) -> Protocol:
    """The :class:`Protocol` called ``name``, or a ``ValueError`` naming the choices."""
    if name not in PROTOCOLS:
        raise ParameterError(f"protocol={name!r} is not one of {sorted(PROTOCOLS)}: 'book' trains as the chapter's "
                             "theorems assume, 'authors' as the authors' last_layer_training.py and DPO_training.py")
    return PROTOCOLS[name]


def authors_split(persona: dict) -> tuple[list, list]:
    """The 90/10 split of the authors' ``last_layer_training.py``, which runs one behaviour per process:
    ``random.seed(1234)``, ``random.shuffle`` of the indices ``0..n-1`` in file order, the first
    ``int(0.9 n)`` to training and the rest held out; here every behaviour of ``persona`` (in file order,
    all statements) is split with its own generator seeded 1234, and the training statements of all
    behaviours are pooled (as ``multi_last_layer_training.py`` pools its two). Returns ``(train, held_out)``."""
    train, held = [], []
    for examples in persona.values():
        order = list(range(len(examples)))
        random.Random(AUTHORS_SEED).shuffle(order)
        cut = int(0.9 * len(examples) // 1)
        train += [examples[i] for i in order[:cut]]
        held += [examples[i] for i in order[cut:]]
    return train, held


def chapter_behaviours(behaviours, count: int | None) -> list[str] | None:
    """The behaviours of a run, chosen without looking at any result. A list is used as given. ``None``
    is the chapter's default: the eight behaviours Im & Li name (``IM_LI_BEHAVIOURS``) and then others
    of the development set (``behaviour_split()["development"]``) in an order drawn once by a seeded
    shuffle, ``count`` in all (``None``: every development behaviour). ``"development"`` and
    ``"replication"`` draw ``count`` of that set by the same rule (the Im & Li behaviours first where the
    set holds them)."""
    if behaviours is not None and not isinstance(behaviours, str):
        return list(behaviours)
    from ..datasets.persona import IM_LI_BEHAVIOURS, behaviour_split

    pool = behaviour_split()["development" if behaviours is None else behaviours]
    first = [b for b in IM_LI_BEHAVIOURS if b in pool]
    others = sorted(b for b in pool if b not in first)
    random.Random("prefdyn.ch02.behaviours").shuffle(others)
    chosen = first + others
    return chosen if count is None else chosen[:count]


class PairConcordanceWorld:
    """The world of the pair prediction: the share of the decided pairs ``(a, b)`` whose outcome agrees
    with the order of the units' ``x`` (here ``||Delta||``, whose order is the sign of the priority level).

    Pairs share behaviours, so their outcomes are not independent. The world makes them as dependent
    as they can be: each behaviour has one latent learning speed ``w_k`` and a pair's outcome is the
    order of its two speeds (transitive outcomes, which maximise the variance of the share). At
    effect ``p`` (the probability that a random pair agrees) ``(z_k, w_k)`` are bivariate normal with
    Pearson ``r = sin(pi (p - 1/2))`` (then ``P(concordant) = 1/2 + arcsin(r)/pi = p``) and the unit with
    the ``i``-th smallest ``x`` gets the ``i``-th smallest ``z``. ``p = 1/2`` is the null: speeds unrelated
    to distinguishability."""

    kind = "pair_concordance"

    def __init__(self, x, pairs):
        self.x = np.asarray(x, float)
        self.pairs = np.asarray(pairs, int).reshape(-1, 2)
        if len(self.x) < 3 or len(self.pairs) < 2 or not np.isfinite(self.x).all():
            raise ValueError("PairConcordanceWorld needs finite x for at least 3 units and at least 2 pairs")
        self.n = len(self.pairs)

    def statistics(self, effect: float, rng, sims: int = stats.SIMULATIONS) -> np.ndarray:
        if not 0 <= effect <= 1:
            raise ValueError(f"an agreement rate must be in [0, 1], not {effect}")
        r = math.sin(math.pi * (effect - 0.5))
        K = len(self.x)
        z = rng.standard_normal((sims, K))
        w = r * z + math.sqrt(max(0.0, 1 - r * r)) * rng.standard_normal((sims, K))
        w_by_z = np.take_along_axis(w, np.argsort(z, axis=1), 1)         # the w of the i-th smallest z
        speed = np.empty((sims, K))
        speed[:, np.argsort(self.x, kind="stable")] = w_by_z
        a, b = self.pairs.T
        return np.mean(np.sign(speed[:, a] - speed[:, b]) == np.sign(self.x[a] - self.x[b]), axis=1)

    def to_json(self) -> dict:
        return {"kind": self.kind, "x": self.x.tolist(), "pairs": self.pairs.tolist()}


stats.WORLDS[PairConcordanceWorld.kind] = PairConcordanceWorld


#: The chapter's closing sentence for each registered prediction (:func:`findings`).
FINDINGS = {
    "synthetic-loss-order": "Synthetic sweep, loss drops after T steps ordered exactly by ‖Δ̂‖² "
                            "(Spearman {observed}): {status}.",
    "synthetic-weight-order": "Synthetic sweep, distances ‖W_T − W₀‖ ordered exactly by ‖Δ̂‖ "
                              "(Spearman {observed}): {status}.",
    "synthetic-pair-priority": "Synthetic pairs, the more distinguishable behaviour learned more in 20 joint "
                               "steps (share {observed}): {status}.",
    "speed-alone": "Real model, each behaviour alone: loss drops after T steps ordered by ‖Δ̂‖ "
                   "(Spearman {observed}): {status}.",
    "speed-alone-lower": "Each behaviour alone, the lower end of the bootstrap interval over behaviours of "
                         "that ordering's Spearman correlation ({observed}): {status}.",
    "speed-long": "Beyond first order, loss drops after 10T steps ordered by ‖Δ̂‖ (Spearman {observed}): {status}.",
    "plugin-accuracy-order": "The plug-in accuracy ranks the held-out accuracies (Spearman {observed}): {status}.",
    "heldout-accuracy-order": "Held-out accuracy gains ordered by ‖Δ̂‖ (Spearman {observed}): {status}.",
    "priority-joint": "Trained jointly, loss drops after T steps ordered by ⟨Δ̄, Δ̂_k⟩ "
                      "(Spearman {observed}): {status}.",
    "priority-joint-lower": "Jointly, the lower end of the bootstrap interval over behaviours of the ordering by "
                            "⟨Δ̄, Δ̂_k⟩ ({observed}): {status}.",
    "priority-sign": "Jointly, a behaviour gets better iff ⟨Δ̄, Δ̂_k⟩ > 0 (share of signs {observed}): {status}.",
    "priority-long": "Beyond first order, joint loss drops after 10T steps ordered by ⟨Δ̄, Δ̂_k⟩ "
                     "(Spearman {observed}): {status}.",
    "pair-priority-all": "Every pair trained jointly: the behaviour with the positive priority level learned "
                         "more (share {observed}): {status}.",
    "displacement-distinguishability": "Last layer: fewer pairs lose their chosen likelihood in more "
                                       "distinguishable behaviours (Spearman {observed}): {status}.",
    "misalign-faster-oos": "Out of sample, the LoRA-aligned model's last layer misaligns faster "
                           "(share {observed}): {status}.",
    "misalign-faster": "In-sample (favoured by construction), the LoRA-aligned model's last layer misaligns "
                       "faster (share {observed}): {status}.",
    "misalign-faster-lora": "The LoRA-aligned model misaligns faster under LoRA DPO toward the flipped labels "
                            "(share {observed}): {status}.",
    "displacement-ches-lora": "Within LoRA alignments, pairs with a higher C(x) lose more chosen likelihood "
                              "(share of behaviours {observed}): {status}.",
    "squeezing-lora": "LoRA alignments lower the chosen likelihood while the margin grows "
                      "(share of behaviours {observed}): {status}.",
}


def findings(checks, sentences: dict[str, str]) -> str:
    """The chapter's closing list: one sentence per registered prediction (``sentences[id]``, written
    around ``{status}`` and ``{observed}``), the ones not reproduced and the inconclusive ones first,
    then the implied ones, then the reproduced ones; a prediction without a sentence is an error."""
    rank = {"not reproduced": 0, "inconclusive": 1, "implied by": 2, "reproduced": 3}
    rows = []
    for c in checks:
        if c.kind != "prediction":
            continue
        pid = c.prediction["id"]
        if pid not in sentences:
            raise KeyError(f"no closing sentence for prediction {pid!r}")
        rows.append((rank.get(outcome(c.status), 1), len(rows),
                     "- " + sentences[pid].format(status=f"**{c.status}**", observed=f"{c.observed:.3g}")))
    return "\n".join(r for _, _, r in sorted(rows))


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
    priority level of ``a`` over ``b`` (:func:`prefdyn.theory.dynamics.priority_level`), each member's
    loss drop ``log 2 - L`` after the run (``drop[:, 0]`` for ``a``, ``drop[:, 1]`` for ``b``) and its
    first-order drop at the first full-batch joint step (:func:`prefdyn.theory.dynamics.first_order_drops`)."""

    pairs: list[tuple[str, str]]
    level: np.ndarray
    drop: np.ndarray
    first_order: np.ndarray

    @property
    def loss_gap(self) -> np.ndarray:
        """The training loss of ``b`` minus that of ``a`` after the run (both start at ``log 2``):
        positive when ``a`` was learned more."""
        return self.drop[:, 0] - self.drop[:, 1]

    def decided(self, min_level: float = 0.0) -> np.ndarray:
        """Which pairs have ``|priority level| >= min_level``."""
        return np.abs(self.level) >= min_level

    def agreement(self, min_level: float = 0.0) -> float:
        """The share of the pairs with ``|level| >= min_level`` whose more prioritised behaviour
        (level > 0) ends with the lower loss."""
        keep = self.decided(min_level)
        return float(np.mean(np.sign(self.level[keep]) == np.sign(self.loss_gap[keep])))

    def forced_agreement(self, steps: int, min_level: float = 0.0) -> float:
        """The least agreement that the step-1 identity allows over the decided pairs, with every
        member's drop in ``steps`` times its first-order drop times the band of the first-order ratios
        of all pairs' members (:func:`prefdyn.theory.dynamics.first_order_intervals`)."""
        lo, hi, _ = dyn.first_order_intervals(self.first_order.ravel(), self.drop.ravel(), steps)
        lo, hi = lo.reshape(-1, 2), hi.reshape(-1, 2)
        keep = self.decided(min_level)
        return dyn.forced_pair_share(lo[keep, 0], hi[keep, 0], lo[keep, 1], hi[keep, 1], np.sign(self.level[keep]))

    def index_pairs(self, names: Sequence[str], min_level: float = 0.0) -> np.ndarray:
        """The decided pairs as indices into ``names`` (the units of :class:`PairConcordanceWorld`)."""
        where = {b: i for i, b in enumerate(names)}
        return np.array([(where[a], where[b]) for (a, b), keep in zip(self.pairs, self.decided(min_level)) if keep])


def pairwise_priority(protocol: Protocol, features: Tensor, s: Tensor, behaviour: np.ndarray, delta: dict, *,
                      beta: float, lr: float, steps: int, seed: int) -> PairPriority:
    """Train every pair of behaviours jointly with ``protocol`` (both start at loss ``log 2``, so the
    final loss is the progress) and set each pair's outcome beside its priority level, computed from
    the gaps ``delta[k]`` (thm-ch2-priority: the behaviour with the larger level is learned first)."""
    pairs = list(itertools.combinations(delta, 2))
    level, drop, first = [], [], []
    for a, b in pairs:
        idx = torch.from_numpy(np.isin(behaviour, [a, b]))
        groups = behaviour[idx.numpy()].tolist()
        run = protocol.train(features[idx], s[idx], beta=beta, lr=lr, steps=steps, seed=seed, groups=groups,
                             every=steps)
        loss = dict(zip(run.groups, run.loss[-1]))
        fo = dict(zip(run.groups, dyn.first_order_drops(features[idx], s[idx], groups, beta, lr, joint=True)))
        level.append(dyn.priority_level(delta[a], delta[b]))
        drop.append([math.log(2) - loss[a], math.log(2) - loss[b]])
        first.append([fo[a], fo[b]])
    return PairPriority(pairs, np.array(level), np.array(drop), np.array(first))


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
        boot["alone"].append(stats.spearman([gap[b].norm().item() for b in names], drop_alone))
        boot["joint"].append(stats.spearman([torch.dot(gap_bar, gap[b]).item() for b in names], drop_joint))
        boot["joint_D"].append(stats.spearman([gap[b].norm().item() for b in names], drop_joint))
    return {k: np.quantile(v, [0.025, 0.975]) for k, v in boot.items()}


def preference_pairs(protocol: Protocol, tokenizer, examples: Sequence[PersonaExample]) -> PreferencePairs:
    """Persona statements as the preference pairs of ``protocol``'s LoRA runs: its prompt
    (:meth:`Protocol.prompt` with ``lora=True``) and its answer strings, ``y_w`` the answer matching the
    behaviour."""
    yes, no = protocol.answers
    chosen = [yes if ex.chosen == "Yes" else no for ex in examples]
    return PreferencePairs([protocol.prompt(tokenizer, ex.question, lora=True) for ex in examples], chosen,
                           [no if c == yes else yes for c in chosen])


def answer_logps(policy: Policy, protocol: Protocol, examples: Sequence[PersonaExample],
                 cache: Path | None = None) -> tuple[ReferenceLogps, Tensor]:
    """``log pi(y_w|x)``, ``log pi(y_l|x)`` of the current model for ``examples`` as ``protocol``'s LoRA runs
    prompt them, from one forward pass: the features ``g(x)`` (:func:`prefdyn.llm.features.embeddings`,
    the default cache for the base weights, else ``cache``) and the unembedding, which LoRA on the query
    and value projections never changes (:func:`prefdyn.experiments.persona.reference_from_features`).
    Returns the log-probabilities and the features (float64)."""
    head = policy.model.get_output_embeddings().weight.detach().float().cpu()
    yes, no = protocol.answer_ids(policy.tokenizer)
    prompts = [protocol.prompt(policy.tokenizer, ex.question, lora=True) for ex in examples]
    with torch_threads(None):
        g = embeddings(policy, prompts, cache=cache).double()
    return reference_from_features(g, examples, head, yes, no), g


def lora_dpo(policy: Policy, pairs: PreferencePairs, *, reference: ReferenceLogps | None = None, beta: float,
             lora_r: int, lora_alpha: float, steps: int, batch_size: int, lr: float, seed: int,
             dropout: float = 0.0) -> tuple[list[dict], int]:
    """DPO on LoRA adapters, merged, as the authors' ``DPO_training.py`` aligns a model (with ``-t peft``):
    adapters of rank ``lora_r`` and scale ``lora_alpha / lora_r`` on every block's query and value
    projections, with ``dropout`` on their input while training (:func:`prefdyn.llm.train.lora_adapters`,
    drawn from ``seed``), trained with AdamW on ``pairs`` (:func:`prefdyn.llm.train.train_preferences`,
    ``steps`` steps of ``batch_size`` pairs; ``reference=None``: the model at the start), then merged into
    the weights (``merge_and_unload``): ``policy.model`` is changed in place and is a plain model again.
    Trains on every thread; returns the training records and the number of trained (adapter) weights."""
    adapted = lora_adapters(policy.model, lora_r, lora_alpha, seed, dropout=dropout)
    n_trained = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    with torch_threads(None):                                             # the transformer gets every thread
        history = train_preferences(replace(policy, model=adapted), pairs,
                                    PreferenceConfig(steps, batch_size, lr, seed, "dpo", beta),
                                    reference=reference, progress=False)
    policy.model = adapted.merge_and_unload()                           # W + (alpha/r) B A: the aligned model
    return history, n_trained


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


def full_model_dpo(policy: Policy, protocol: Protocol, examples: Sequence, *, beta: float, lora_r: int,
                   lora_alpha: float, steps: int, batch_size: int, lr: float, seed: int,
                   dropout: float = 0.0) -> FullModelRun:
    """DPO beyond the last layer, as the paper aligns a model: :func:`lora_dpo` on the persona
    ``examples`` of every behaviour at once (so ``policy.model`` becomes the merged, aligned model),
    prompted as ``protocol``'s LoRA runs; then the features of the aligned model are read.

    The reference log-probabilities are the policy's at ``W_ref`` computed from the frozen features
    (:func:`answer_logps`; by the chapter's eq-ch2-margin they are the model's own). The features
    before training come from the feature cache where it has them, those of the aligned model never do;
    every forward pass and the training take every thread.
    """
    pairs = preference_pairs(protocol, policy.tokenizer, examples)
    reference, g_before = answer_logps(policy, protocol, examples)
    history, n_trained = lora_dpo(policy, pairs, reference=reference, beta=beta, lora_r=lora_r, lora_alpha=lora_alpha,
                                  steps=steps, batch_size=batch_size, lr=lr, seed=seed, dropout=dropout)
    with tempfile.TemporaryDirectory() as fresh:                        # the aligned model's features, never cached
        g_after = answer_logps(policy, protocol, examples, cache=Path(fresh))[1]
    return FullModelRun(features_before=g_before, features_after=g_after,
                        s=torch.tensor([1 if ex.matches else -1 for ex in examples]),
                        behaviour=np.array([ex.behaviour for ex in examples]), history=history, n_trained=n_trained)


@dataclass
class BehaviourMisalignment:
    """What :func:`misalign_behaviour` measured on one behaviour. ``features[(model, set)]``: the
    features of the ``"base"`` and the ``"aligned"`` model on each set of :func:`misalignment_sets`;
    ``s[set]`` their signs; ``logps[(model, "align")]``: ``log pi(y_w|x)``, ``log pi(y_l|x)`` of the
    alignment statements before and after the alignment; ``flipped_drop[model]``: ``log 2`` minus the
    flipped DPO loss of the flip statements after the LoRA run toward the flipped labels from that
    model (its misalignment); ``history``: the alignment run's records."""

    behaviour: str
    features: dict
    s: dict
    logps: dict
    flipped_drop: dict
    history: list[dict]

    @property
    def chosen_shift(self) -> Tensor:
        """``log pi_aligned(y_w|x) - log pi_base(y_w|x)`` of every alignment statement."""
        return self.logps[("aligned", "align")].chosen - self.logps[("base", "align")].chosen

    def last_layer_drops(self, where: str, *, beta: float, lr_fraction: float, steps: int) -> dict[str, float]:
        """Misalignment of each model's *last layer* on the statements ``where``: :func:`flipped_dpo` from
        the base and from the aligned model's features, each at its own step ``lr_fraction`` times its
        :func:`prefdyn.theory.dynamics.stable_step_bound`; ``{"base": drop, "aligned": drop}``."""
        owner = np.array([self.behaviour] * len(self.s[where]))
        return {label: float(flipped_dpo(self.features[(label, where)], self.s[where], owner, beta=beta,
                                         lr_fraction=lr_fraction, steps=steps).drop[0])
                for label in ("base", "aligned")}

    @property
    def margin_shift(self) -> Tensor:
        """The change of ``log pi(y_w|x) - log pi(y_l|x)`` by the alignment, every alignment statement
        (``1/beta`` times its implicit reward margin)."""
        after, before = self.logps[("aligned", "align")], self.logps[("base", "align")]
        return (after.chosen - after.rejected) - (before.chosen - before.rejected)


def balanced(examples: Sequence[PersonaExample], size: int | None) -> list[PersonaExample]:
    """The first ``size // 2`` statements of each class (preferred answer Yes, and No; the Yes class takes
    the odd one), in their order, or all where ``size`` is ``None`` or the classes run short."""
    if size is None:
        return list(examples)
    yes = [ex for ex in examples if ex.matches]
    no = [ex for ex in examples if not ex.matches]
    k_no = min(len(no), size // 2)
    keep = set(map(id, yes[:size - k_no] + no[:k_no]))
    return [ex for ex in examples if id(ex) in keep]


def misalignment_sets(protocol: Protocol, train: Sequence[PersonaExample], held: Sequence[PersonaExample],
                      size: int | None, seed: int) -> dict[str, list[PersonaExample]]:
    """The statements of one behaviour's misalignment runs, class-balanced (:func:`balanced`, ``size``
    each): ``align`` (the LoRA alignment), ``flip`` (the flipped runs) and ``held`` (held-out statements
    neither run trains on, where the last layer is misaligned out of sample). The book aligns on one half
    of the behaviour's training statements and flips the other (split by class with ``seed``); the
    authors flip the statements they aligned on (``DPO_training.py``: both runs on the training split)."""
    if protocol.name == "authors":
        align = balanced(train, size)
        return {"align": align, "flip": align, "held": balanced(held, size)}
    first, second = train_test_split(list(train), 0.5, seed=seed)
    return {"align": balanced(first, size), "flip": balanced(second, size), "held": balanced(held, size)}


def misalign_behaviour(policy: Policy, protocol: Protocol, sets: dict[str, Sequence[PersonaExample]], *,
                       beta: float, lora_r: int, lora_alpha: float, steps: int, batch_size: int, lr: float,
                       seed: int, dropout: float = 0.0) -> BehaviourMisalignment:
    """Misalignment of one behaviour as the authors' code runs it (``DPO_training.py``): the *aligned*
    model is the base model after :func:`lora_dpo` on the ``sets["align"]`` statements (merged); then the
    base and the aligned model are each trained the same way toward the flipped preferences of
    ``sets["flip"]`` (``y_w`` and ``y_l`` swapped, each model its own reference: ``--flip``, with
    ``--peft_base`` for the aligned one), and the flipped DPO loss of every flip statement is read
    after each flipped run (it starts at ``log 2``). The features of both models on every set
    (:func:`misalignment_sets`; ``"held"`` is trained on by neither run) are kept for last-layer
    misalignment (:func:`flipped_dpo`).

    Every log-probability comes from one forward pass of the prompts and the unembedding, which the
    adapters leave as it is (:func:`answer_logps`). ``policy.model`` is left with the weights it came
    with (:func:`prefdyn.llm.models.kept_weights`)."""
    settings = dict(beta=beta, lora_r=lora_r, lora_alpha=lora_alpha, steps=steps, batch_size=batch_size, lr=lr,
                    seed=seed, dropout=dropout)
    align, flip = list(sets["align"]), list(sets["flip"])
    flipped_pairs = preference_pairs(protocol, policy.tokenizer, flip)
    flipped_pairs = PreferencePairs(flipped_pairs.prompts, flipped_pairs.rejected, flipped_pairs.chosen)

    def swap(logps: ReferenceLogps) -> ReferenceLogps:
        """The log-probabilities of the flipped pairs, whose ``y_w`` is the original ``y_l``."""
        return ReferenceLogps(logps.rejected, logps.chosen)

    logps, features, drop, align_history = {}, {}, {}, []
    for name, examples in sets.items():
        logps[("base", name)], features[("base", name)] = answer_logps(policy, protocol, examples)
    with tempfile.TemporaryDirectory() as fresh:                        # trained models' features, never cached
        for label in ("base", "aligned"):
            with kept_weights(policy.model):
                if label == "aligned":
                    align_history, _ = lora_dpo(policy, preference_pairs(protocol, policy.tokenizer, align),
                                                reference=logps[("base", "align")], **settings)
                    for name, examples in sets.items():
                        logps[("aligned", name)], features[("aligned", name)] = answer_logps(
                            policy, protocol, examples, cache=Path(fresh, "aligned"))
                reference = swap(logps[(label, "flip")])
                lora_dpo(policy, flipped_pairs, reference=reference, **settings)
                after = swap(answer_logps(policy, protocol, flip, cache=Path(fresh, f"{label}-flipped"))[0])
                loss = objectives.dpo_loss(after.chosen, after.rejected, reference.chosen, reference.rejected, beta)
                drop[label] = math.log(2) - loss.mean().item()
    s = {name: torch.tensor([1 if ex.matches else -1 for ex in examples]) for name, examples in sets.items()}
    return BehaviourMisalignment(behaviour=align[0].behaviour, features=features, s=s, logps=logps,
                                 flipped_drop=drop, history=align_history)


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
    (:func:`prefdyn.theory.dynamics.last_layer_dpo`, full batch), at the step ``lr_fraction`` times
    :func:`prefdyn.theory.dynamics.stable_step_bound` of *this* model (``4/L``, ``L`` the largest smoothness
    of these features over behaviours), or at a given step ``lr`` (give one of the two).

    The own step makes the run blind to the features' scale: under ``g -> c g``, ``L -> c^2 L`` so the
    step becomes ``lr / c^2``, and by thm-ch2-rank-one ``v_t -> v_t / c`` solves the recursion with the
    same margins ``h_t = 2 beta s v_t^T g`` (eq-ch2-margin), hence the same losses at every step. A step
    ``lr`` common to two models would instead let a model with larger features misalign faster."""
    if (lr_fraction is None) == (lr is None):
        raise ValueError("give flipped_dpo either lr_fraction (this model's own step lr_fraction·4/L) or lr")
    names = list(dict.fromkeys(behaviour.tolist()))
    if lr is None:
        lr = lr_fraction * dyn.stable_step_bound(features, beta, behaviour.tolist())
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
