"""Batched, seeded sampling of responses from a policy, cached on disk.

Chapters that sample candidates from the current policy (on-policy IPO/DPO, Best-of-N) call
:func:`sample_responses`. The cache key covers everything the samples depend on: the model's
identity *and its current weights* (:func:`prefdyn.llm.models.weights_digest`, so a policy trained
in the notebook gets new samples), the prompts, the number of samples, the decoding settings and the seed.
Samples are stored as JSON (never pickle) and written atomically.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..store import atomic_write_json, cache_dir
from .models import Policy, weights_digest
from .tokens import encode_prompt


@torch.no_grad()
def _generate(policy: Policy, prompts: Sequence[str], n: int, max_new_tokens: int, temperature: float,
              seed: int, batch_size: int, progress: bool) -> list[list[str]]:
    """``n`` samples per prompt; each batch of (prompt, sample) rows is seeded by ``seed`` and its index."""
    tokenizer, model = policy.tokenizer, policy.model
    rows = [p for p in prompts for _ in range(n)]
    texts: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    try:
        for b, i in enumerate(tqdm(range(0, len(rows), batch_size), disable=not progress, desc="sampling")):
            enc = tokenizer.pad({"input_ids": [encode_prompt(tokenizer, r) for r in rows[i:i + batch_size]]},
                                return_tensors="pt")
            torch.manual_seed(seed * 100_003 + b)
            out = model.generate(**enc.to(policy.device), do_sample=temperature > 0,
                                 temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [texts[k * n:(k + 1) * n] for k in range(len(prompts))]


def sample_responses(policy: Policy, prompts: Sequence[str], n: int = 1, *, max_new_tokens: int,
                     temperature: float = 1.0, seed: int, batch_size: int = 32, cache: Path | None = None,
                     progress: bool = False) -> list[list[str]]:
    """``n`` responses to each (chat-templated) prompt, sampled at ``temperature`` (0: greedy).

    Pure ancestral sampling (no top-k/top-p truncation), so the samples follow ``pi(y|x)`` itself,
    up to the ``max_new_tokens`` cut-off. Returns one list of ``n`` strings per prompt. Reruns with
    the same weights, prompts and settings read the samples back from the cache.
    """
    if n < 1 or max_new_tokens < 1 or temperature < 0:
        raise ValueError(f"need n >= 1, max_new_tokens >= 1, temperature >= 0 (got {n}, {max_new_tokens}, "
                         f"{temperature})")
    key = hashlib.sha256(json.dumps({
        "model": policy.fingerprint, "weights": weights_digest(policy.model), "prompts": list(prompts), "n": n,
        "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed, "batch_size": batch_size,
        "device": policy.device.type}).encode()).hexdigest()[:24]
    path = (cache or cache_dir() / "samples") / f"{key}.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if len(stored) == len(prompts) and all(len(s) == n for s in stored):
                return stored
        except (OSError, ValueError):  # an unreadable cache entry is regenerated, never trusted
            pass
    samples = _generate(policy, prompts, n, max_new_tokens, temperature, seed, batch_size, progress)
    atomic_write_json(path, samples)
    return samples
