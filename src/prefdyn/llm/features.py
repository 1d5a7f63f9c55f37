"""Hidden states of a policy: last-token features, their on-disk cache, and a frozen-prefix cache.

The last-layer analyses of chapters 2, 3 and 5 work on the final hidden state of a prompt's last
token after the final norm, the input of the LM head (:func:`last_token_states`, cached on disk by
:func:`embeddings`, which chapters 1 to 3 share: a prompt's state under given weights is computed
once). When only the top blocks are trained, :class:`FrozenPrefix` keeps the states entering them,
so a step runs only those blocks.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..store import atomic_write, cache_dir
from .models import Policy, transformer_blocks, weights_digest
from .tokens import encode_prompt, pad_batch

TOKENS_PER_BATCH = 4096   # padded tokens per forward pass of :func:`embeddings` (rows of similar length)


def last_states(model, ids: torch.Tensor, mask: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """Hidden state at ``layer`` of each right-padded row's last real token. ``layer=-1`` runs only the
    decoder (its output is the final-norm state the LM head reads), without the head or the other
    layers' states."""
    if layer == -1:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    else:
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                       logits_to_keep=1).hidden_states[layer]
    return hidden[torch.arange(len(ids), device=ids.device), mask.sum(1) - 1]


def last_token_states(model, tokenizer, texts: Sequence[str], device, layer: int = -1) -> torch.Tensor:
    """Hidden state at ``layer`` of the last token of each text (``-1``: after the final norm, the
    input of the LM head), from one right-padded batch; differentiable."""
    rows = [encode_prompt(tokenizer, t) for t in texts]
    ids, mask = (t.to(device) for t in pad_batch(tokenizer, rows))
    return last_states(model, ids, mask, layer)


_digests: dict[int, tuple[tuple, str]] = {}   # id(model) -> (the weights' identity and versions, digest)


def current_digest(model: torch.nn.Module) -> str:
    """:func:`~prefdyn.llm.models.weights_digest` of ``model``, hashed again only when a weight or
    buffer has been replaced or modified in place since (torch counts in-place changes per tensor)."""
    state = tuple((t.data_ptr(), t._version) for t in model.state_dict().values())
    known = _digests.get(id(model))
    if known is None or known[0] != state:
        known = (state, weights_digest(model))
        _digests[id(model)] = known
    return known[1]


def length_batches(lengths: Sequence[int], batch_size: int, tokens: int = TOKENS_PER_BATCH) -> list[list[int]]:
    """Indices grouped into batches of similar length: sorted by length, cut where a batch would exceed
    ``batch_size`` rows or ``tokens`` padded tokens (a batch holds at least one row)."""
    batches, current = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        if current and (len(current) >= batch_size or (len(current) + 1) * lengths[i] > tokens):
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


def embeddings(policy: Policy, texts: Sequence[str], layer: int = -1, batch_size: int = 64,
               cache: Path | None = None, progress: bool = False) -> torch.Tensor:
    """Last-token hidden states of ``texts`` at ``layer``, shape ``(len(texts), hidden)``.

    Results are cached on disk per (model fingerprint, current weights, layer), keyed by the
    SHA-256 of each text, in a safetensors file (never pickle) replaced atomically; a policy
    trained in the notebook therefore never reads the features of its initial weights. ``layer=-1`` is the final hidden
    state after the model's last norm, so ``lm_head(embeddings)`` gives the next-token logits. The
    texts not in the cache are computed once each, in batches of similar length
    (:func:`length_batches`), on the torch threads the caller set (the drivers take every thread:
    :func:`prefdyn.experiments.persona.persona_features`).
    """
    from safetensors.torch import load_file, save

    path = (cache or cache_dir() / "embeddings") / \
        f"{policy.fingerprint}-{current_digest(policy.model)}-layer{layer}.safetensors"
    keys = [hashlib.sha256(t.encode("utf-8")).digest() for t in texts]

    def read_cache() -> dict[bytes, torch.Tensor]:
        if not path.is_file():
            return {}
        try:
            data = load_file(str(path))
            raw = np.ascontiguousarray(data["keys"].numpy())
            return dict(zip((raw[i].tobytes() for i in range(len(raw))), data["values"]))
        except Exception:  # an unreadable cache is rebuilt, never trusted
            return {}

    stored = read_cache()
    first_missing: dict[bytes, int] = {}
    for i, k in enumerate(keys):
        if k not in stored:
            first_missing.setdefault(k, i)
    order = list(first_missing.values())
    lengths = [len(encode_prompt(policy.tokenizer, texts[j])) for j in order]
    batches = length_batches(lengths, batch_size)
    with torch.no_grad():
        for batch in tqdm(batches, disable=not progress or not order, desc="embeddings"):
            chunk = [order[b] for b in batch]
            states = last_token_states(policy.model, policy.tokenizer, [texts[j] for j in chunk], policy.device, layer)
            for j, h in zip(chunk, states.float().cpu()):
                stored[keys[j]] = h
    if order:   # keep what other processes wrote meanwhile (one file per model; runs may share it)
        stored = {**read_cache(), **stored}
        all_keys = list(stored)
        atomic_write(path, save({
            "keys": torch.frombuffer(bytearray(b"".join(all_keys)), dtype=torch.uint8).reshape(len(all_keys), 32),
            "values": torch.stack([stored[k] for k in all_keys]).contiguous()}))
    return torch.stack([stored[k] for k in keys])


class FrozenPrefix:
    """Hidden states entering the top ``n_blocks`` blocks for fixed prompts, computed once.

    When only the top blocks are trained (:func:`prefdyn.llm.train.train_only_top_blocks`), everything
    below them is a fixed function of the prompt, so each training step need only run the top
    blocks on these cached states: the same numbers (up to float round-off) at a fraction of the
    cost. :meth:`last_states` is the final-norm hidden state of each prompt's last token, as
    :func:`last_token_states` returns it.
    """

    def __init__(self, model, tokenizer, prompts: Sequence[str], n_blocks: int, device):
        rows = [encode_prompt(tokenizer, p) for p in prompts]
        ids, mask = (t.to(device) for t in pad_batch(tokenizer, rows))
        n_layers = len(transformer_blocks(model))
        if not 0 < n_blocks < n_layers:
            raise ValueError(f"n_blocks={n_blocks} must be between 1 and {n_layers - 1}")
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
        self.states = out.hidden_states[n_layers - n_blocks].detach()   # input of block n_layers - n_blocks
        self.mask, self.n_blocks = mask, n_blocks
        self.last = mask.sum(1) - 1

    def last_states(self, model) -> Tensor:
        """The decoder run on the cached states with its layer list cut to the top blocks. A config
        that lists a kind per layer (Gemma 3's ``layer_types``: sliding-window or full attention, each
        with its own rotary base), read by the forward pass by position in the list, is cut the same
        way for the call, so every block keeps its own mask and positions."""
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        saved, types = base.layers, getattr(base.config, "layer_types", None)
        base.layers = torch.nn.ModuleList(list(saved)[-self.n_blocks:])
        if types is not None:
            base.config.layer_types = list(types)[-self.n_blocks:]
        try:
            hidden = base(inputs_embeds=self.states, attention_mask=self.mask, use_cache=False).last_hidden_state
        finally:
            base.layers = saved
            if types is not None:
                base.config.layer_types = types
        return hidden[torch.arange(len(self.last), device=hidden.device), self.last]
