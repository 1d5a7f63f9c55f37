"""Log-probabilities of responses under a policy: the one scorer every objective is built on.

:func:`sequence_logps` scores a :class:`~prefdyn.llm.tokens.TokenBatch` (the sum of the response
tokens' log-probabilities, or their mean with ``length_normalised``). Data are tokenised once and
sliced into batches by index: :class:`EncodedPairs` for preference pairs ``(x, y_w, y_l)``,
:class:`EncodedResponses` for prompt-response pairs (SFT, likelihoods). :func:`score` runs either
over all its rows without gradients. Single-token answers take the next-token distribution after
the prompt (:func:`next_token_logps`), as do :func:`candidate_logps` for a set of candidate tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .features import last_states, last_token_states
from .models import Policy
from .tokens import (
    IGNORE_INDEX,
    TokenBatch,
    encode,
    encode_prompt,
    pad_batch,
    single_token_responses,
    trim_padding,
)


def sequence_logps(model, batch: TokenBatch, length_normalised: bool = False) -> torch.Tensor:
    """``log pi(y|x) = sum_t log pi(y_t | x, y_<t)`` over the response tokens, one value per row
    (differentiable); with ``length_normalised``, divided by the response's number of tokens
    (the mean token log-probability, which TRL's ``ipo`` loss uses; the book's default is the sum,
    the log-probability of the whole response, as in Rafailov et al. and Azar et al.).

    Only the positions that predict a response token of some row get logits (``logits_to_keep``:
    the columns from the earliest response start on), and the log-probabilities come from a fused
    cross-entropy, so the prompt's positions never pay for the vocabulary-sized LM head.
    """
    response = batch.labels != IGNORE_INDEX
    first = int(response.int().argmax(1).min())            # earliest column holding a response token
    keep = batch.input_ids.shape[1] - first + 1              # logits at positions first-1 .. end
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep).logits
    labels = batch.labels[:, first:]
    token_logps = -torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                     ignore_index=IGNORE_INDEX, reduction="none")
    total = token_logps.view(labels.shape).sum(-1)
    return total / (labels != IGNORE_INDEX).sum(-1) if length_normalised else total


def next_token_logps(model, states: Tensor) -> Tensor:
    """``log pi(. | x)`` over the vocabulary from the final hidden states of the prompts' last tokens."""
    return model.get_output_embeddings()(states).float().log_softmax(-1)


@dataclass
class EncodedPairs:
    """Preference pairs ``(x, y_w, y_l)`` tokenised once and right-padded, sliced into batches by index.

    When every response is a single token (yes/no answers) only the prompts are kept
    (``prompt_ids``/``prompt_mask``) with the two answer ids per pair (``answers``): both
    log-probabilities are entries of the next-token distribution after the prompt, the LM head
    applied to the last prompt token's state, so one forward pass serves both. Otherwise
    ``sequences`` holds ``prompt + y_w`` in rows ``0..n-1`` and ``prompt + y_l`` in rows ``n..2n-1``,
    run as one concatenated batch as the DPO reference implementation does. ``lengths`` is the
    number of tokens a pair puts through the model (for length-bucketed batches). Batches are
    tensor slices trimmed to their longest row: no tokenising or padding in the training loop.
    """

    lengths: torch.Tensor
    prompt_ids: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    answers: torch.Tensor | None = None
    sequences: TokenBatch | None = None

    @classmethod
    def of(cls, tokenizer, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]) -> "EncodedPairs":
        if not (len(prompts) == len(chosen) == len(rejected)):
            raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected responses")
        tokens = single_token_responses(tokenizer, list(chosen) + list(rejected))
        if tokens is not None:
            ids, mask = pad_batch(tokenizer, [encode_prompt(tokenizer, p) for p in prompts])
            return cls(lengths=mask.sum(1), prompt_ids=ids, prompt_mask=mask,
                       answers=torch.tensor(tokens).view(2, len(prompts)).T.contiguous())
        sequences = encode(tokenizer, list(prompts) * 2, list(chosen) + list(rejected))
        per_row = sequences.attention_mask.sum(1)
        return cls(lengths=torch.maximum(per_row[:len(prompts)], per_row[len(prompts):]), sequences=sequences)

    def __len__(self) -> int:
        return len(self.lengths)

    def logps(self, model, index: torch.Tensor, device, length_normalised: bool = False) -> tuple[Tensor, Tensor]:
        """``log pi(y_w|x)`` and ``log pi(y_l|x)`` of the pairs in ``index`` (differentiable; see
        :func:`sequence_logps` for ``length_normalised``)."""
        index = torch.as_tensor(index, dtype=torch.long)
        if self.sequences is None:
            ids, mask = (t.to(device) for t in trim_padding(self.prompt_ids[index], self.prompt_mask[index],
                                                     mask=self.prompt_mask[index]))
            picked = torch.gather(next_token_logps(model, last_states(model, ids, mask)), 1, self.answers[index].to(device))
            return picked[:, 0], picked[:, 1]
        rows = torch.cat([index, index + len(self)])
        s = self.sequences
        batch = TokenBatch(*trim_padding(s.input_ids[rows], s.attention_mask[rows], s.labels[rows],
                                  mask=s.attention_mask[rows]))
        logps = sequence_logps(model, batch.to(device), length_normalised)
        return logps[:len(index)], logps[len(index):]


@dataclass
class EncodedResponses:
    """``prompt + response`` rows tokenised once and right-padded (:func:`~prefdyn.llm.tokens.encode`),
    sliced into batches by index and trimmed to their longest row."""

    sequences: TokenBatch

    @classmethod
    def of(cls, tokenizer, prompts: Sequence[str], responses: Sequence[str]) -> "EncodedResponses":
        return cls(encode(tokenizer, prompts, responses))

    def __len__(self) -> int:
        return len(self.sequences.input_ids)

    def logps(self, model, index: torch.Tensor, device, length_normalised: bool = False) -> Tensor:
        """``log pi(y|x)`` of the rows in ``index`` (differentiable; see :func:`sequence_logps`)."""
        s, index = self.sequences, torch.as_tensor(index, dtype=torch.long)
        batch = TokenBatch(*trim_padding(s.input_ids[index], s.attention_mask[index], s.labels[index],
                                  mask=s.attention_mask[index]))
        return sequence_logps(model, batch.to(device), length_normalised)


@torch.no_grad()
def score(policy: Policy, encoded: EncodedPairs | EncodedResponses, batch_size: int = 32, progress: bool = False,
          length_normalised: bool = False):
    """Every row of ``encoded`` scored by ``encoded.logps`` in batches, without gradients, on CPU:
    a tensor for :class:`EncodedResponses`, ``(log pi(y_w|x), log pi(y_l|x))`` for :class:`EncodedPairs`."""
    out = []
    for i in tqdm(range(0, len(encoded), batch_size), disable=not progress, desc="log-probs"):
        index = torch.arange(i, min(i + batch_size, len(encoded)))
        logps = encoded.logps(policy.model, index, policy.device, length_normalised)
        out.append(tuple(t.cpu() for t in logps) if isinstance(logps, tuple) else logps.cpu())
    if isinstance(encoded, EncodedResponses):
        return torch.cat(out) if out else torch.empty(0)
    return (torch.cat([w for w, _ in out]), torch.cat([l for _, l in out])) if out else (torch.empty(0), torch.empty(0))


def response_logps(policy: Policy, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32,
                   progress: bool = False, length_normalised: bool = False) -> Tensor:
    """``log pi(response | prompt)`` for every pair (the mean token log-probability with
    ``length_normalised``: minus the SFT loss of each example), without gradients, on CPU."""
    return score(policy, EncodedResponses.of(policy.tokenizer, prompts, responses), batch_size, progress,
                 length_normalised)


def preference_logps(policy: Policy, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                     batch_size: int = 32, progress: bool = False,
                     length_normalised: bool = False) -> tuple[Tensor, Tensor]:
    """``log pi(y_w|x)`` and ``log pi(y_l|x)`` for every pair, without gradients, on CPU."""
    if not prompts:
        return torch.empty(0), torch.empty(0)
    return score(policy, EncodedPairs.of(policy.tokenizer, prompts, chosen, rejected), batch_size, progress,
                 length_normalised)


def candidate_logps(model, tokenizer, prompts: Sequence[str], candidate_ids: Sequence[int], device,
                    prefix=None) -> Tensor:
    """``log p_theta(first answer token = c_k | x)`` for every prompt and candidate token, shape
    ``(len(prompts), K)``, from one forward pass over the prompts (differentiable): the LM head applied
    to the last prompt token's state (with ``prefix``, a :class:`~prefdyn.llm.features.FrozenPrefix`,
    only the top blocks run). ``log_softmax`` over the last axis gives the policy restricted to the
    candidate set."""
    states = prefix.last_states(model) if prefix is not None else last_token_states(model, tokenizer, prompts, device)
    logps = next_token_logps(model, states)
    return logps[:, torch.as_tensor(list(candidate_ids), device=logps.device)]
