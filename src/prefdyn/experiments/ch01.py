"""Chapter 1's real-model run: DPO (Rafailov et al., 2023, Eq. 7) on persona statements, scored on
held-out statements, and repeated from the base weights with other seeds.

The chapter trains all weights of the model with DPO on a class-balanced sample of statements of
each behaviour and scores a held-out sample drawn before training (:func:`held_out_split`). Given
the trained model, each held-out statement's implicit reward margin and accuracy gain depend on
that statement alone: the units of the held-out predictions. The claim that the short run lowers
the DPO loss on its own training statements is about runs, so its units are runs: the same
protocol repeated from the base weights, each run with its own seed for its training statements
and batch order (:func:`repeat_runs`).
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import objectives
from ..datasets.persona import SPLITS, PersonaExample, behaviour_split
from ..llm import logps
from ..llm.models import kept_weights
from ..llm.tokens import single_token_responses
from ..llm.train import PreferenceConfig, ReferenceLogps, train_preferences
from ..params import positive
from .persona import persona_features, persona_pairs

__all__ = ["DPOConfig", "DPORun", "chapter_behaviours", "dpo_run", "held_out_split", "reference_logps", "repeat_runs",
           "training_sample"]


@dataclass(frozen=True)
class DPOConfig:
    """The protocol of the chapter's DPO run (per scale).

    ``train_per_behaviour`` and ``test_per_behaviour`` statements of each behaviour, half matching it
    and half not; ``steps`` AdamW steps of ``batch`` pairs at learning rate ``lr`` and DPO's ``beta``;
    every ``eval_every`` steps the held-out statements of ``curve_per_behaviour`` per behaviour are
    scored for the learning curve; ``runs`` independent runs for the training-loss prediction (the
    first is the one whose model is scored on the held-out statements)."""

    train_per_behaviour: int
    test_per_behaviour: int
    steps: int
    batch: int
    lr: float
    beta: float
    eval_every: int
    curve_per_behaviour: int
    runs: int

    def __post_init__(self):
        for name in ("train_per_behaviour", "test_per_behaviour", "steps", "batch", "eval_every",
                     "curve_per_behaviour", "runs"):
            positive(name, getattr(self, name), int)
        positive("lr", self.lr, float)
        positive("beta", self.beta, float)
        if self.curve_per_behaviour > self.test_per_behaviour:
            raise ValueError(f"curve_per_behaviour={self.curve_per_behaviour} must be at most "
                             f"test_per_behaviour={self.test_per_behaviour}")


def chapter_behaviours(behaviours, n: int) -> list[str]:
    """The behaviours the chapter runs on: by default (``None``) the first ``n`` of the development set
    of :func:`~prefdyn.datasets.persona.behaviour_split` (a rule fixed before any run: at ``n = 8``
    the behaviours Im & Li name); ``"development"`` or ``"replication"``: the first ``n`` of that
    set; else the names given (a list, or one comma-separated string)."""
    if behaviours is None:
        behaviours = "development"
    if isinstance(behaviours, str) and behaviours.strip() in SPLITS:
        return behaviour_split()[behaviours.strip()][:n]
    if isinstance(behaviours, str):
        behaviours = behaviours.split(",")
    return list(dict.fromkeys(b.strip() for b in behaviours if b and b.strip()))


def _balanced(examples: Sequence[PersonaExample], k: int, rng: random.Random) -> list[PersonaExample]:
    """``k`` of ``examples``, half matching the behaviour and half not (the odd one matching), in file order."""
    yes = [i for i, ex in enumerate(examples) if ex.matches]
    no = [i for i, ex in enumerate(examples) if not ex.matches]
    n_yes = (k + 1) // 2
    if n_yes > len(yes) or k - n_yes > len(no):
        raise ValueError(f"{examples[0].behaviour}: {k} balanced statements asked for, the file has "
                         f"{len(yes)} matching and {len(no)} not; lower the sizes or choose other behaviours")
    keep = rng.sample(yes, n_yes) + rng.sample(no, k - n_yes)
    return [examples[i] for i in sorted(keep)]


def held_out_split(persona: Mapping[str, Sequence[PersonaExample]], per_behaviour: int,
                   seed: int) -> tuple[list[PersonaExample], dict[str, list[PersonaExample]]]:
    """The held-out statements (``per_behaviour`` of each behaviour, class-balanced, drawn from
    ``seed`` before any training) and, per behaviour, the pool of the others that training sets are
    drawn from."""
    test, pool = [], {}
    for name, examples in persona.items():
        chosen = _balanced(examples, per_behaviour, random.Random(f"prefdyn.ch01.held_out:{seed}:{name}"))
        taken = {id(ex) for ex in chosen}
        test += chosen
        pool[name] = [ex for ex in examples if id(ex) not in taken]
    return test, pool


def training_sample(pool: Mapping[str, Sequence[PersonaExample]], per_behaviour: int, seed: int,
                    run: int) -> list[PersonaExample]:
    """The training statements of run ``run``: ``per_behaviour`` of each behaviour's pool, class-balanced,
    drawn from ``(seed, run)``, so every run has its own."""
    return [ex for name, examples in pool.items()
            for ex in _balanced(examples, per_behaviour, random.Random(f"prefdyn.ch01.train:{seed}:{run}:{name}"))]


@dataclass
class DPORun:
    """What one run measured.

    ``history``: the step records of :func:`~prefdyn.llm.train.train_preferences` (with the held-out
    curve where scored); ``train_drop``: ``log 2 − ℓ_DPO(x)`` after training for each training
    statement (its loss at the reference is ``log 2``); ``train_margin``: the implicit reward margin
    ``h_θ`` of each training statement after training. For a run scored on held-out statements:
    ``before``/``after`` the log-probabilities ``(log π(y_w|x), log π(y_l|x))`` of each held-out
    statement under the reference and the trained model, ``margin`` its implicit reward margin and
    ``gain`` its accuracy gain (1 if the trained model prefers ``y_w`` and the reference did not,
    −1 for the reverse, else 0)."""

    seed: int
    history: list[dict]
    train_drop: np.ndarray
    train_margin: np.ndarray
    before: tuple[torch.Tensor, torch.Tensor] | None = None
    after: tuple[torch.Tensor, torch.Tensor] | None = None
    margin: np.ndarray | None = field(default=None)
    gain: np.ndarray | None = field(default=None)

    @property
    def training_loss_drop(self) -> float:
        """``log 2`` minus the mean DPO loss over the run's training statements after training."""
        return float(self.train_drop.mean())


def reference_logps(policy, examples: Sequence[PersonaExample]) -> ReferenceLogps:
    """``log π(y_w|x)`` and ``log π(y_l|x)`` of persona statements under ``policy`` as it is, read from
    the final features of their chat-templated questions (:func:`~prefdyn.experiments.persona.persona_features`,
    cached on disk and shared with chapters 2 and 3): the LM head applied to them
    (:func:`~prefdyn.llm.logps.next_token_logps`), the computation the trainer makes for one-token
    answers, so a statement whose features any chapter has computed costs no forward pass."""
    tok = policy.tokenizer
    ids = single_token_responses(tok, ["Yes", "No"])
    if ids is None:
        raise ValueError("the answers Yes and No are not single tokens of this tokenizer; "
                         "score the pairs with ReferenceLogps.of instead")
    g, _, _ = persona_features(policy, examples)
    with torch.no_grad():
        logp = logps.next_token_logps(policy.model, g.float().to(policy.device)).cpu()
    yes, no = ids
    rows = torch.arange(len(examples))
    w = torch.tensor([yes if ex.chosen == "Yes" else no for ex in examples])
    return ReferenceLogps(logp[rows, w], logp[rows, torch.where(w == yes, no, yes)])


def dpo_run(policy, train: Sequence[PersonaExample], cfg: DPOConfig, seed: int,
            test: Sequence[PersonaExample] = (), curve: Sequence[int] = ()) -> DPORun:
    """Train ``policy`` in place with DPO on ``train`` (the reference is the model as given, its
    log-probabilities from the shared feature cache: :func:`reference_logps`) and score it: its
    training statements after training and, if ``test`` is given, the held-out statements before and
    after (and ``test[i]`` for ``i`` in ``curve`` every ``cfg.eval_every`` steps)."""
    tok = policy.tokenizer
    train_pairs = persona_pairs(tok, train)
    train_ref = reference_logps(policy, train)
    evaluate, before, test_pairs = None, None, None
    if test:
        test_pairs = persona_pairs(tok, test)
        before = reference_logps(policy, test)
        curve_pairs, curve_ref = test_pairs.subset(curve), before.subset(curve)

        def evaluate(step):
            w, l = logps.preference_logps(policy, curve_pairs.prompts, curve_pairs.chosen, curve_pairs.rejected)
            h = objectives.reward_margins(w, l, curve_ref.chosen, curve_ref.rejected, cfg.beta)
            return {"test_margin": h.mean().item(), "test_policy_accuracy": objectives.preference_accuracy(w, l)}

    history = train_preferences(policy, train_pairs, PreferenceConfig(cfg.steps, cfg.batch, cfg.lr, seed, "dpo",
                                                                       cfg.beta),
                                reference=train_ref, evaluate=evaluate if curve else None,
                                eval_every=cfg.eval_every if curve else 0, progress=False)
    w, l = logps.preference_logps(policy, train_pairs.prompts, train_pairs.chosen, train_pairs.rejected)
    h = objectives.reward_margins(w, l, train_ref.chosen, train_ref.rejected, cfg.beta)
    run = DPORun(seed, history, (math.log(2) + torch.nn.functional.logsigmoid(h)).double().numpy(),
                 h.double().numpy())
    if test:
        aw, al = logps.preference_logps(policy, test_pairs.prompts, test_pairs.chosen, test_pairs.rejected)
        run.before, run.after = (before.chosen, before.rejected), (aw, al)
        run.margin = objectives.reward_margins(aw, al, before.chosen, before.rejected, cfg.beta).double().numpy()
        run.gain = ((aw > al).double() - (before.chosen > before.rejected).double()).numpy()
    return run


def repeat_runs(policy, pool: Mapping[str, Sequence[PersonaExample]], cfg: DPOConfig, seed: int,
                runs: Sequence[int]) -> list[DPORun]:
    """Runs ``r`` of ``runs`` of the protocol, each from the weights ``policy`` has now (restored after
    it) on its own training sample (:func:`training_sample`) and batch order (seed ``seed + r``);
    scored on their training statements only."""
    out = []
    for r in runs:
        with kept_weights(policy.model):
            out.append(dpo_run(policy, training_sample(pool, cfg.train_per_behaviour, seed, r), cfg, seed + r))
    return out
