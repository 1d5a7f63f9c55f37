"""Tokenising prompts and responses into right-padded batches.

Responses are encoded the way the DPO reference implementation does (``_get_batch_logps``):
prompt and response are tokenised separately (so the boundary is exact) and concatenated, and the
prompt positions of ``labels`` hold :data:`IGNORE_INDEX`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE_INDEX = -100   # label of the positions that are not scored (prompt and padding), as in transformers


@dataclass
class TokenBatch:
    """Right-padded ``prompt + response`` ids; ``labels`` holds the response ids, ``-100`` elsewhere.

    Right padding keeps every query row attending to at least one real token, which some fused
    attention kernels need to stay finite (left padding gave NaN gradients under bf16 on a GPU).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> "TokenBatch":
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)))


def _right_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def pad_batch(tokenizer, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and their attention mask."""
    return _right_pad(rows, tokenizer.pad_token_id), _right_pad([[1] * len(r) for r in rows], 0)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The ids of a prompt as the model expects a sequence to start: with the tokenizer's own
    beginning-of-sequence token where its policy adds one (Gemma's ``<bos>``; SmolLM2's tokenizer adds
    none), unless the text already starts with it (a chat template that writes it)."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos] and tokenizer.encode(prompt, add_special_tokens=True)[:1] == [bos]:
        return [bos] + ids
    return ids


def encode(tokenizer, prompts: Sequence[str], responses: Sequence[str]) -> TokenBatch:
    """Tokenise prompt (:func:`encode_prompt`) and response separately (so the boundary is exact)
    and concatenate."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rows, label_rows = [], []
    for prompt, response in zip(prompts, responses):
        p = encode_prompt(tokenizer, prompt)
        r = tokenizer.encode(response, add_special_tokens=False)
        if not r:
            raise ValueError(f"empty response for prompt {prompt[:60]!r}")
        rows.append(p + r)
        label_rows.append([IGNORE_INDEX] * len(p) + r)
    return TokenBatch(*pad_batch(tokenizer, rows), _right_pad(label_rows, IGNORE_INDEX))


def single_token_responses(tokenizer, responses: Sequence[str]) -> list[int] | None:
    """The token id of each response when every response is exactly one token, else ``None``."""
    ids = [tokenizer.encode(r, add_special_tokens=False) for r in responses]
    return [i[0] for i in ids] if all(len(i) == 1 for i in ids) else None


def trim_padding(*padded: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Drop the columns that are padding in every row (right padding: those past the longest row)."""
    width = int(mask.sum(1).max())
    return [t[:, :width] for t in padded]
