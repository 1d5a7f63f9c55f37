"""Full-model preference training (DPO or IPO) and its evaluation.

The reference policy is the model at the start of training, so reference log-probabilities are
computed once, before the first step, and reused. The pairs are tokenised once
(:class:`prefdyn.models.EncodedPairs`); each step slices a batch out of them, runs chosen and
rejected responses through the model (one forward pass when both answers are single tokens, else
one concatenated batch), and applies a loss from :mod:`prefdyn.objectives`.

The loop runs unchanged under ``accelerate launch``: with several processes each one takes its
share of every batch and :mod:`accelerate` averages the gradients (DDP), so the update is the
one a single process would make on the whole batch. On a GPU the forward pass runs under bf16
autocast.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from . import objectives
from .models import EncodedPairs, Policy, chat_prompt, encoded_logps, preference_logps

LOSSES = {"dpo": objectives.dpo_loss, "ipo": objectives.ipo_loss}


def forward_precision(device: torch.device):
    """The context every training forward pass runs in: bf16 autocast on a GPU (weights, gradients
    and optimizer state stay fp32), plain fp32 elsewhere. Reusable across steps."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class PreferencePairs:
    """Preference data ``(x, y_w, y_l)``: prompts (already chat-templated), chosen and rejected."""

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]

    def __post_init__(self):
        if not (len(self.prompts) == len(self.chosen) == len(self.rejected)):
            raise ValueError("prompts, chosen and rejected must have the same length")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index: Sequence[int]) -> "PreferencePairs":
        return PreferencePairs([self.prompts[i] for i in index], [self.chosen[i] for i in index],
                               [self.rejected[i] for i in index])


@dataclass
class ReferenceLogps:
    """``log pi_ref(y_w|x)`` and ``log pi_ref(y_l|x)`` for every pair, computed once."""

    chosen: torch.Tensor
    rejected: torch.Tensor

    @classmethod
    def of(cls, policy: Policy, pairs: PreferencePairs, batch_size: int = 32) -> "ReferenceLogps":
        return cls(*preference_logps(policy, pairs.prompts, pairs.chosen, pairs.rejected, batch_size))

    def subset(self, index: Sequence[int]) -> "ReferenceLogps":
        index = torch.as_tensor(list(index), dtype=torch.long)
        return ReferenceLogps(self.chosen[index], self.rejected[index])


def evaluate_preferences(policy: Policy, pairs: PreferencePairs, reference: ReferenceLogps, beta: float,
                         batch_size: int = 32) -> dict[str, float]:
    """Implicit-reward margin, DPO loss and accuracies of the current policy on ``pairs``.

    ``reward_accuracy`` is the fraction with a positive implicit reward margin (TRL's
    ``rewards/accuracies``); ``policy_accuracy`` the fraction with ``log pi(y_w) > log pi(y_l)``.
    """
    chosen, rejected = preference_logps(policy, pairs.prompts, pairs.chosen, pairs.rejected, batch_size)
    margins = objectives.reward_margins(chosen, rejected, reference.chosen, reference.rejected, beta)
    return {"margin": margins.mean().item(), "dpo_loss": objectives.dpo_loss(chosen, rejected, reference.chosen,
                                                                              reference.rejected, beta).mean().item(),
            "reward_accuracy": objectives.preference_accuracy(margins, torch.zeros_like(margins)),
            "policy_accuracy": objectives.preference_accuracy(chosen, rejected)}


def batch_indices(lengths: torch.Tensor, batch_size: int, seed: int, bucket: int = 1):
    """Endless batches of pair indices from seeded permutations, epoch after epoch.

    ``bucket=1``: consecutive slices of the permutations (a batch may span two epochs).
    ``bucket=k > 1``: each epoch's permutation is cut into runs of ``k`` batches; each run is
    sorted by length and cut into batches of similar lengths, visited in a seeded random order, so
    little of a batch is padding (the "group by length" of Hugging Face's trainer). An epoch's last
    incomplete batch is dropped, a different one each epoch.
    """
    generator = torch.Generator().manual_seed(seed)
    if bucket == 1:
        order = torch.empty(0, dtype=torch.long)
        while True:
            if len(order) < batch_size:
                order = torch.cat([order, torch.randperm(len(lengths), generator=generator)])
            yield order[:batch_size]
            order = order[batch_size:]
    if len(lengths) < batch_size:
        raise ValueError(f"{len(lengths)} pairs cannot fill a batch of {batch_size} with bucket={bucket}")
    while True:
        for run in torch.randperm(len(lengths), generator=generator).split(batch_size * bucket):
            run = run[torch.argsort(lengths[run], stable=True)]
            batches = [b for b in run.split(batch_size) if len(b) == batch_size]
            for b in torch.randperm(len(batches), generator=generator).tolist():
                yield batches[b]


def train_preferences(policy: Policy, pairs: PreferencePairs, *, loss: str = "dpo", beta: float = 0.1,
                      steps: int, batch_size: int, lr: float, seed: int,
                      reference: ReferenceLogps | None = None,
                      evaluate: Callable[[int], dict] | None = None, eval_every: int = 0,
                      bucket: int = 1, progress: bool = True) -> list[dict]:
    """Train ``policy`` in place with AdamW on ``pairs``; return one record per step.

    ``beta`` is DPO's beta, or IPO's tau for ``loss="ipo"`` (TRL's convention). Batches come from
    :func:`batch_indices` (``bucket > 1`` groups pairs of similar length). ``evaluate(step)`` is
    called before the first step and every ``eval_every`` steps; its dict is merged into that
    step's record. Under ``accelerate launch`` the records hold the whole batch's loss and margin.
    """
    from accelerate import Accelerator

    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {sorted(LOSSES)}")
    if steps < 0 or batch_size <= 0 or lr <= 0 or bucket < 1:
        raise ValueError(f"need steps >= 0, batch_size > 0, lr > 0, bucket >= 1 (got {steps}, {batch_size}, {lr}, "
                         f"{bucket})")
    encoded = EncodedPairs.of(policy.tokenizer, pairs.prompts, pairs.chosen, pairs.rejected)
    reference = reference or ReferenceLogps(*encoded_logps(policy, encoded))
    accelerator = Accelerator(device_placement=False)  # the policy is already on its device
    if accelerator.num_processes > 1 and batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the {accelerator.num_processes} processes")
    device = policy.device
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(policy.model, optimizer)
    batches = batch_indices(encoded.lengths, batch_size, seed, bucket)
    history: list[dict] = []
    precision = forward_precision(device)
    for step in tqdm(range(steps + 1), disable=not progress or not accelerator.is_main_process,
                     desc=f"{loss} training"):
        record: dict = {"step": step}
        if evaluate is not None and (step == steps or (eval_every and step % eval_every == 0)):
            model.eval()
            record.update(evaluate(step))
        if step == steps:
            history.append(record)
            break
        index = next(batches)[accelerator.process_index::accelerator.num_processes]
        model.train()
        with precision:
            chosen, rejected = encoded.logps(model, index, device)
        ref_chosen, ref_rejected = reference.chosen[index].to(device), reference.rejected[index].to(device)
        losses = LOSSES[loss](chosen, rejected, ref_chosen, ref_rejected, beta)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(losses.mean())
        optimizer.step()
        margins = objectives.reward_margins(chosen.detach(), rejected.detach(), ref_chosen, ref_rejected, beta)
        losses, margins = accelerator.gather(losses.detach()), accelerator.gather(margins)
        record.update(loss=losses.mean().item(), train_margin=margins.mean().item(),
                      train_reward_accuracy=objectives.preference_accuracy(margins, torch.zeros_like(margins)))
        history.append(record)
    model.eval()
    return history


def persona_pairs(tokenizer, examples) -> PreferencePairs:
    """Persona statements as preference pairs: the chat-templated question, the answer matching the
    behaviour as ``y_w`` and the other as ``y_l`` (the setting of Im & Li, 2024)."""
    return PreferencePairs([chat_prompt(tokenizer, ex.question) for ex in examples],
                           [ex.chosen for ex in examples], [ex.rejected for ex in examples])


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The transformer blocks: the model's longest ``ModuleList`` (``model.layers`` in llama-style
    models), so no architecture is assumed; ``None`` if it has none."""
    return max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=None)


def train_only_top_blocks(model: torch.nn.Module, n_blocks: int | None) -> int:
    """Freeze all weights but the last ``n_blocks`` transformer blocks and the final norm.

    ``None`` trains every weight; the blocks are :func:`transformer_blocks`. Gradients then stop at
    the first trained block, which makes a step several times cheaper on a CPU. Returns the number of trained weights.
    """
    if n_blocks is None:
        model.requires_grad_(True)
        return sum(p.numel() for p in model.parameters())
    blocks = transformer_blocks(model)
    if blocks is None or not 0 < n_blocks <= len(blocks):
        raise ValueError(f"n_blocks={n_blocks} must be between 1 and the model's {len(blocks or [])} blocks")
    model.requires_grad_(False)
    trained = list(blocks[-n_blocks:])
    norm = getattr(getattr(model, "model", model), "norm", None)
    if isinstance(norm, torch.nn.Module):
        trained.append(norm)
    for module in trained:
        module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_on_persona(model: str, device: str = "auto", *, loss: str = "dpo", beta: float = 0.1, steps: int,
                     batch_size: int, lr: float, seed: int = 0, data_dir=None, behaviours=None,
                     per_behaviour: int | None = None, held_out: float = 0.2, top_blocks: int | None = None,
                     bucket: int = 1, progress: bool = True) -> dict:
    """DPO/IPO on persona data from a model spec to held-out results: what ``prefdyn train`` runs.

    Under ``accelerate launch`` every process loads the model onto its own device
    (``accelerate.PartialState().device``) and :func:`train_preferences` splits each batch among
    them. Returns the step records, held-out metrics before and after training, the wall-clock
    seconds of training, and (on a GPU) the peak memory allocated.
    """
    import time

    from accelerate import PartialState

    from .data import load_persona, train_test_split
    from .models import load_policy
    from .params import resolve_device, seed_everything

    state = PartialState()
    dev = state.device if state.num_processes > 1 else resolve_device(device)
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
    history = train_preferences(policy, train_pairs, loss=loss, beta=beta, steps=steps, batch_size=batch_size, lr=lr,
                                seed=seed, bucket=bucket, progress=progress)
    seconds = time.perf_counter() - start
    return {"model": model, "device": str(dev), "processes": state.num_processes, "trained_weights": trained,
            "train_pairs": len(train_pairs), "test_pairs": len(test_pairs), "history": history,
            "held_out_before": before, "held_out_after": evaluate_preferences(policy, test_pairs, test_reference, beta),
            "train_seconds": round(seconds, 2),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None}
