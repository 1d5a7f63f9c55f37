"""Persona statements as preference pairs and as frozen features (chapters 1-3), and DPO/IPO on them
from a model spec to held-out results (what ``prefdyn train`` runs, on one device or under
``accelerate launch``)."""
from __future__ import annotations

import time

import numpy as np
import torch
from accelerate import PartialState
from torch import Tensor

from ..datasets.persona import load_persona, train_test_split
from ..llm.features import embeddings
from ..llm.models import chat_prompt, load_policy
from ..llm.train import (
    PreferenceConfig,
    PreferencePairs,
    ReferenceLogps,
    evaluate_preferences,
    train_only_top_blocks,
    train_preferences,
)
from ..params import resolve_device, seed_everything, torch_threads


def persona_pairs(tokenizer, examples) -> PreferencePairs:
    """Persona statements as preference pairs: the chat-templated question, the answer matching the
    behaviour as ``y_w`` and the other as ``y_l`` (the setting of Im & Li, 2024)."""
    return PreferencePairs([chat_prompt(tokenizer, ex.question) for ex in examples],
                           [ex.chosen for ex in examples], [ex.rejected for ex in examples])


def persona_features(policy, examples, chat_template: bool = True) -> tuple[Tensor, Tensor, np.ndarray]:
    """The frozen features of persona statements: ``g(x)``, the final-norm hidden state of the last
    token of each question (:func:`prefdyn.llm.features.embeddings`, float64, shape ``(n, d)``), in
    the chat template or, with ``chat_template=False``, the raw ``question`` text as the authors'
    ``last_layer_training.py`` feeds it; the sign ``s = +1`` when the preferred answer is Yes (the
    cluster ``C_{k,+}``) and ``-1`` otherwise; and each statement's behaviour (its concept ``k``).
    The transformer's forward passes take every thread, whatever the caller's setting."""
    prompts = [chat_prompt(policy.tokenizer, ex.question) if chat_template else ex.question for ex in examples]
    with torch_threads(None):
        g = embeddings(policy, prompts)
    return (g.double(), torch.tensor([1 if ex.matches else -1 for ex in examples]),
            np.array([ex.behaviour for ex in examples]))


def reference_from_features(features: Tensor, examples, head: Tensor, yes_id: int, no_id: int) -> ReferenceLogps:
    """``log pi_ref(y_w|x)`` and ``log pi_ref(y_l|x)`` of persona pairs from their final features ``g(x)``:
    the logits are ``head @ g`` (a tied head without bias), so ``log pi_ref = log_softmax(head g)`` at
    the tokens of the chosen and the rejected answer (" Yes" is ``yes_id``, " No" is ``no_id``)."""
    logp = torch.log_softmax(features.float() @ head.T, -1)
    rows = torch.arange(len(examples))
    w = torch.tensor([yes_id if ex.chosen == "Yes" else no_id for ex in examples])
    l = torch.tensor([no_id if ex.chosen == "Yes" else yes_id for ex in examples])
    return ReferenceLogps(logp[rows, w], logp[rows, l])


def train_on_persona(model: str, config: PreferenceConfig, device: str = "auto", *, data_dir=None,
                     behaviours=None, per_behaviour: int | None = None, held_out: float = 0.2,
                     top_blocks: int | None = None, progress: bool = True) -> dict:
    """DPO/IPO (``config``) on persona data from a model spec to held-out results: what ``prefdyn
    train`` runs. The data (``data_dir``, ``behaviours``, ``per_behaviour`` statements of each, a
    ``held_out`` fraction) are drawn from ``config.seed``; ``top_blocks`` limits training to the last
    blocks (:func:`prefdyn.llm.train.train_only_top_blocks`).

    Under ``accelerate launch`` every process loads the model onto its own device
    (``accelerate.PartialState().device``) and :func:`train_preferences` splits each batch among
    them. Returns the step records, held-out metrics before and after training, the wall-clock
    seconds of training, and (on a GPU) the peak memory allocated.
    """
    state = PartialState()
    dev = state.device if state.num_processes > 1 else resolve_device(device)
    seed, beta = config.seed, config.beta
    seed_everything(seed)
    persona = load_persona(data_dir, behaviours, max_per_behaviour=per_behaviour, seed=seed)
    train, test = train_test_split(persona, test_fraction=held_out, seed=seed)
    policy = load_policy(model, dev)
    trained = train_only_top_blocks(policy.model, top_blocks)
    train_pairs, test_pairs = persona_pairs(policy.tokenizer, train), persona_pairs(policy.tokenizer, test)
    test_reference = ReferenceLogps.of(policy, test_pairs)
    before = evaluate_preferences(policy, test_pairs, test_reference, beta)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    history = train_preferences(policy, train_pairs, config, progress=progress)
    seconds = time.perf_counter() - start
    return {"model": model, "device": str(dev), "processes": state.num_processes, "trained_weights": trained,
            "train_pairs": len(train_pairs), "test_pairs": len(test_pairs), "history": history,
            "held_out_before": before, "held_out_after": evaluate_preferences(policy, test_pairs, test_reference, beta),
            "train_seconds": round(seconds, 2),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None}
