"""Full-model preference training (DPO or IPO) and its evaluation.

The reference policy is the model at the start of training, so reference log-probabilities are
computed once, before the first step, and reused. Each step runs chosen and rejected responses
through :func:`prefdyn.models.pair_logps` (one forward pass when both answers are single tokens,
else one concatenated batch) and applies a loss from :mod:`prefdyn.objectives`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from . import objectives
from .models import Policy, chat_prompt, pair_logps, preference_logps

LOSSES = {"dpo": objectives.dpo_loss, "ipo": objectives.ipo_loss}


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


def train_preferences(policy: Policy, pairs: PreferencePairs, *, loss: str = "dpo", beta: float = 0.1,
                      steps: int, batch_size: int, lr: float, seed: int,
                      reference: ReferenceLogps | None = None,
                      evaluate: Callable[[int], dict] | None = None, eval_every: int = 0,
                      progress: bool = True) -> list[dict]:
    """Train ``policy`` in place with AdamW on ``pairs``; return one record per step.

    ``beta`` is DPO's beta, or IPO's tau for ``loss="ipo"`` (TRL's convention). Batches are drawn
    by a seeded permutation, epoch after epoch. ``evaluate(step)`` is called before the first step
    and every ``eval_every`` steps; its dict is merged into that step's record.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {sorted(LOSSES)}")
    if steps < 0 or batch_size <= 0 or lr <= 0:
        raise ValueError(f"need steps >= 0, batch_size > 0, lr > 0 (got {steps}, {batch_size}, {lr})")
    reference = reference or ReferenceLogps.of(policy, pairs)
    model, device = policy.model, policy.device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    history: list[dict] = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    for step in tqdm(range(steps + 1), disable=not progress, desc=f"{loss} training"):
        record: dict = {"step": step}
        if evaluate is not None and (step == steps or (eval_every and step % eval_every == 0)):
            model.eval()
            record.update(evaluate(step))
        if step == steps:
            history.append(record)
            break
        if len(order) < batch_size:
            order += torch.randperm(len(pairs), generator=generator).tolist()
        index, order = order[:batch_size], order[batch_size:]
        batch = pairs.subset(index)
        model.train()
        with autocast:
            chosen, rejected = pair_logps(model, policy.tokenizer, batch.prompts, batch.chosen, batch.rejected, device)
        ref_chosen, ref_rejected = reference.chosen[index].to(device), reference.rejected[index].to(device)
        losses = LOSSES[loss](chosen, rejected, ref_chosen, ref_rejected, beta)
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        optimizer.step()
        margins = objectives.reward_margins(chosen.detach(), rejected.detach(), ref_chosen, ref_rejected, beta)
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


def train_only_top_blocks(model: torch.nn.Module, n_blocks: int | None) -> int:
    """Freeze all weights but the last ``n_blocks`` transformer blocks and the final norm.

    ``None`` trains every weight. The blocks are the model's longest ``ModuleList`` (``model.layers``
    in llama-style models), so no architecture is assumed. Gradients then stop at the first trained
    block, which makes a step several times cheaper on a CPU. Returns the number of trained weights.
    """
    if n_blocks is None:
        model.requires_grad_(True)
        return sum(p.numel() for p in model.parameters())
    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=None)
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
