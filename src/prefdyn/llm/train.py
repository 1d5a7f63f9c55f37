"""The one training loop, and the objectives it trains: DPO, IPO, SFT and candidate tables.

:func:`optimise` is the loop every chapter trains with: AdamW (no weight decay) on the mean (or
sum) of per-example losses ``loss_fn(model, index)`` over batches of indices, forward passes in
:func:`forward_precision` (bf16 autocast on a GPU, weights and optimizer state fp32). It runs
unchanged under ``accelerate launch``: each process takes its share of every batch and
:mod:`accelerate` averages the gradients (DDP), so the update is the one a single process would
make on the whole batch. The objectives are thin wrappers that build ``loss_fn``:

* :func:`train_preferences`: DPO or IPO on preference pairs tokenised once
  (:class:`~prefdyn.llm.logps.EncodedPairs`); the reference is the model at the start, so its
  log-probabilities are computed once. For both losses ``beta`` is the inverse temperature of the
  implicit reward: DPO's β, and for IPO β = 1/τ (Azar et al.'s τ, which TRL calls ``beta`` for
  ``ipo``), the notation of Chen et al. that chapter 4 uses;
* :func:`train_sft`: the mean per-token negative log-likelihood of demonstrations;
* :func:`fit_candidate_table`: a loss of the candidate log-probabilities of single-token answers
  (the tabular world of chapter 4 on a real model), minimised with L-BFGS rather than the loop's
  Adam steps, to the round's minimum.

Which weights train is set beforehand: :func:`train_only_top_blocks` freezes all but the top
blocks; :func:`lora_adapters` gives the model low-rank adapters (:mod:`peft`) to train instead and
to merge back into its weights afterwards.
"""
from __future__ import annotations

import contextlib
import itertools
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import objectives
from .logps import (
    EncodedPairs,
    EncodedResponses,
    candidate_logps,
    preference_logps,
    score,
)
from .models import Policy, transformer_blocks

PREFERENCE_LOSSES = ("dpo", "ipo")


def forward_precision(device: torch.device):
    """The context every training forward pass runs in: bf16 autocast on a GPU (weights, gradients
    and optimizer state stay fp32), plain fp32 elsewhere. Reusable across steps."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def optimise(model: torch.nn.Module, loss_fn: Callable, batches: Iterator[Tensor], *, steps: int, lr: float,
             reduction: str = "mean", evaluate: Callable[[int], dict] | None = None, eval_every: int = 0,
             progress: bool = False, desc: str = "training") -> list[dict]:
    """Train the model's trainable weights in place with AdamW (``weight_decay=0``); one record per step.

    ``loss_fn(model, index)`` returns the per-example losses of the batch ``index``, or a pair
    ``(losses, metrics)`` whose ``metrics`` are per-example tensors to average into the record
    (gathered over processes). The step minimises their mean (``reduction="mean"``) or sum
    (``"sum"``, for losses that are already weighted shares of one total). ``evaluate(step)`` is
    called before the first step, every ``eval_every`` steps and after the last; its dict is merged
    into that step's record. The record of a step holds ``loss``, the batch loss before the step.
    """
    from accelerate import Accelerator

    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} must be 'mean' or 'sum'")
    if steps < 0 or lr <= 0:
        raise ValueError(f"need steps >= 0 and lr > 0 (got {steps}, {lr})")
    accelerator = Accelerator(device_placement=False)  # the model is already on its device
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    precision = forward_precision(device)
    reduce = torch.mean if reduction == "mean" else torch.sum
    history: list[dict] = []
    for step in tqdm(range(steps + 1), disable=not progress or not accelerator.is_main_process, desc=desc):
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
            out = loss_fn(model, index)
        losses, metrics = out if isinstance(out, tuple) else (out, {})
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(reduce(losses))
        optimizer.step()
        record["loss"] = reduce(accelerator.gather(losses.detach())).item()
        record.update({name: accelerator.gather(value.detach()).mean().item() for name, value in metrics.items()})
        history.append(record)
    model.eval()
    return history


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
    def of(cls, policy: Policy, pairs: PreferencePairs, batch_size: int = 32,
           length_normalised: bool = False) -> "ReferenceLogps":
        return cls(*preference_logps(policy, pairs.prompts, pairs.chosen, pairs.rejected, batch_size,
                                     length_normalised=length_normalised))

    def subset(self, index: Sequence[int]) -> "ReferenceLogps":
        index = torch.as_tensor(list(index), dtype=torch.long)
        return ReferenceLogps(self.chosen[index], self.rejected[index])


def preference_loss(loss: str, beta: float) -> Callable[..., Tensor]:
    """``ell(policy_chosen, policy_rejected, reference_chosen, reference_rejected)`` of ``loss``:
    :func:`prefdyn.objectives.dpo_loss` or :func:`prefdyn.objectives.ipo_loss` (target margin ``beta/2``)
    at ``beta``, checked here, once, where it enters training."""
    objectives.require_positive("beta", beta)
    if loss == "dpo":
        return lambda *logps: objectives.dpo_loss(*logps, beta=beta)
    if loss == "ipo":
        return lambda *logps: objectives.ipo_loss(*logps, beta=beta)
    raise ValueError(f"loss={loss!r} is not one of {PREFERENCE_LOSSES}")


def implicit_margin_scale(loss: str, beta: float) -> float:
    """The factor turning the log-ratio difference into the implicit reward margin: ``beta`` for DPO
    (optimum ``pi_ref exp(r / beta)``), ``1/beta`` for IPO (optimum ``pi_ref exp(beta P mu)``, so the
    reward it implies is the log-ratio over ``beta``)."""
    return beta if loss == "dpo" else 1.0 / beta


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


@dataclass(frozen=True)
class PreferenceConfig:
    """The protocol of one preference-optimisation run (:func:`train_preferences`), shared by the
    chapters and ``prefdyn train``: ``steps`` AdamW steps of ``batch_size`` pairs at learning rate
    ``lr``, batches drawn from ``seed`` (:func:`batch_indices`; ``bucket > 1`` groups pairs of similar
    length). ``beta`` is DPO's β, or for ``loss="ipo"`` the inverse of IPO's τ (see
    :func:`preference_loss`). ``length_normalised`` scores each response by its mean token
    log-probability instead of its sum (:func:`prefdyn.llm.logps.sequence_logps`): with
    ``loss="ipo"`` this is TRL's ``ipo`` loss with TRL's ``beta = 1/beta``. Checked when made."""

    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    loss: str = "dpo"
    beta: float = 0.1
    bucket: int = 1
    length_normalised: bool = False

    def __post_init__(self):
        preference_loss(self.loss, self.beta)
        if self.steps < 0 or self.batch_size <= 0 or self.lr <= 0 or self.bucket < 1:
            raise ValueError(f"need steps >= 0, batch_size > 0, lr > 0, bucket >= 1 (got {self.steps}, "
                             f"{self.batch_size}, {self.lr}, {self.bucket})")


def train_preferences(policy: Policy, pairs: PreferencePairs, config: PreferenceConfig, *,
                      reference: ReferenceLogps | None = None, evaluate: Callable[[int], dict] | None = None,
                      eval_every: int = 0, progress: bool = True) -> list[dict]:
    """DPO or IPO (``config``) on ``pairs`` with :func:`optimise`; one record per step (``loss``,
    ``train_margin``, ``train_reward_accuracy``, ``train_chosen_shift`` — the batch's mean
    ``log pi(y_w|x) - log pi_ref(y_w|x)`` before the step — and what ``evaluate`` returns every
    ``eval_every`` steps). ``reference``: the reference log-probabilities of ``pairs`` (default: the
    policy as it starts). Under ``accelerate launch`` the records hold the whole batch's loss and margin.
    """
    from accelerate import PartialState

    c = config
    processes = PartialState().num_processes
    if processes > 1 and c.batch_size % processes:
        raise ValueError(f"batch_size={c.batch_size} must be a multiple of the {processes} processes")
    ell, scale = preference_loss(c.loss, c.beta), implicit_margin_scale(c.loss, c.beta)
    encoded = EncodedPairs.of(policy.tokenizer, pairs.prompts, pairs.chosen, pairs.rejected)
    reference = reference or ReferenceLogps(*score(policy, encoded, length_normalised=c.length_normalised))
    device = policy.device

    def loss_fn(model, index):
        chosen, rejected = encoded.logps(model, index, device, c.length_normalised)
        ref = reference.chosen[index].to(device), reference.rejected[index].to(device)
        margins = objectives.reward_margins(chosen.detach(), rejected.detach(), *ref, scale)
        return ell(chosen, rejected, *ref), {"train_margin": margins,
                                             "train_reward_accuracy": (margins > 0).to(torch.float64),
                                             "train_chosen_shift": chosen.detach() - ref[0]}

    return optimise(policy.model, loss_fn, batch_indices(encoded.lengths, c.batch_size, c.seed, c.bucket),
                    steps=c.steps, lr=c.lr, evaluate=evaluate, eval_every=eval_every, progress=progress,
                    desc=f"{c.loss} training")


def train_sft(policy: Policy, prompts: Sequence[str], completions: Sequence[str], *, steps: int, batch_size: int,
              lr: float, seed: int) -> list[float]:
    """Supervised fine-tuning with :func:`optimise` on the mean per-token NLL of the completions
    (:func:`prefdyn.objectives.sft_nll` with the completion lengths), in place, over the trainable
    weights (see :func:`train_only_top_blocks`). ``prompts`` are chat-templated; ``completions``
    should end with the end-of-turn token so the policy learns to stop. Batches follow seeded
    permutations, epoch after epoch (:func:`batch_indices`). Returns the batch loss of every step.
    """
    if steps < 0 or batch_size <= 0 or lr <= 0:
        raise ValueError(f"need steps >= 0, batch_size > 0, lr > 0 (got {steps}, {batch_size}, {lr})")
    encoded = EncodedResponses.of(policy.tokenizer, prompts, completions)
    device, lengths = policy.device, encoded.sequences.attention_mask.sum(1)
    history = optimise(policy.model, lambda model, index: -encoded.logps(model, index, device, length_normalised=True),
                       batch_indices(lengths, batch_size, seed), steps=steps, lr=lr)
    return [r["loss"] for r in history[:-1]]


def fit_candidate_table(policy: Policy, prompts: Sequence[str], candidate_ids: Sequence[int],
                        loss: Callable[[Tensor], Tensor], *, iterations: int, history: int = 10,
                        prefix=None) -> list[float]:
    """Minimise ``loss(candidate_logps).sum()`` (the per-prompt losses of the ``(prompts, K)``
    candidate log-probabilities, :func:`prefdyn.llm.logps.candidate_logps`; on the
    :class:`~prefdyn.llm.features.FrozenPrefix` ``prefix`` when given) over the trainable weights by
    ``iterations`` iterations of L-BFGS with a strong-Wolfe line search (:class:`torch.optim.LBFGS`),
    full batch, in one process. The loss is a function of ``K`` numbers per prompt, so near the
    weights it is close to a quadratic of low rank, which L-BFGS minimises in a few iterations where
    Adam's steps of fixed size would circle the minimum. Returns the loss at every evaluation."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=iterations, history_size=history,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-14)
    losses: list[float] = []

    def closure():
        optimizer.zero_grad(set_to_none=True)
        with forward_precision(policy.device):
            value = loss(candidate_logps(policy.model, policy.tokenizer, prompts, candidate_ids, policy.device,
                                         prefix)).sum()
        value.backward()
        losses.append(value.item())
        return value

    policy.model.train()
    optimizer.step(closure)
    policy.model.eval()
    return losses


def train_only_top_blocks(model: torch.nn.Module, n_blocks: int | None) -> int:
    """Freeze all weights but the last ``n_blocks`` transformer blocks and the final norm.

    ``None`` trains every weight; the blocks are :func:`prefdyn.llm.models.transformer_blocks`. Gradients then stop at
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


def lora_adapters(model: torch.nn.Module, r: int, alpha: float, seed: int, dropout: float = 0.0):
    """Freeze ``model`` and give its query and value projections LoRA adapters (Hu et al. 2021):
    each adapted weight becomes ``W + (alpha / r) B A`` with ``A`` (``r x d_in``) drawn from
    ``seed`` and ``B`` (``d_out x r``) zero, so the adapted model starts as the model itself, and only
    ``A`` and ``B`` train. The configuration is :class:`peft.LoraConfig` (``dropout`` on the adapters'
    input while training, 0 by default; the authors' ``DPO_training.py`` uses 0.05) with peft's
    default targets for the model's architecture, its query and value projections (``q_proj`` and
    ``v_proj`` in Llama, Mistral and Gemma 3, as :meth:`~torch.nn.Module.named_modules` lists them).

    Returns the :class:`peft.PeftModel`, which wraps ``model`` in place: train it (e.g. with
    :func:`train_preferences` on a policy holding it), then ``merge_and_unload()`` adds every
    ``(alpha / r) B A`` to its weight and returns ``model``, a plain model again. Raises ``ValueError``
    for a non-positive ``r`` or ``alpha``, or (from peft) for an architecture it has no default for.
    """
    from peft import LoraConfig, get_peft_model

    if any(isinstance(x, bool) or not isinstance(x, kind) or x <= 0 for x, kind in ((r, int), (alpha, (int, float)))):
        raise ValueError(f"LoRA needs a positive integer rank r and a positive alpha (got r={r!r}, alpha={alpha!r})")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
        torch.manual_seed(seed)                                       # the caller's generators stay as they were
        # peft asks transformers 5 for a renamed attribute; the deprecation note is not the reader's business
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout))
