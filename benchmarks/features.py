"""Feature extraction (the last-token final-norm hidden states of chapters 1-3, through
``prefdyn.llm.features.embeddings``) before and after it was batched by length, in one run,
interleaved, on the same statements with fresh caches.

    python benchmarks/features.py [--statements 256] [--repeats 3] [--model smollm2-135m]

*before* is the code as it was at commit 2dab713 (kept below, verbatim but for names): batches of 32
in the order the texts come, every layer's hidden states requested of the full model, the whole
model hashed on every call, the cache's keys converted one by one. *after* is the library's
``embeddings``. For each repeat, each way computes the features of the persona questions (chat
template; the first ``--statements`` statements of the development set, interleaved across its
behaviours) into an empty cache ("cold"), then reads them back from that cache ("warm"), and the
warm read is also timed on a cache of ``--big-cache`` other entries (what a chapter meets once
chapters 1-3 have filled it). The two ways take turns, so a machine shared with other work slows
both alike. It prints statements per second of each, their ratio, and the largest difference of
the features (which must be float round-off: the script exits 1 above 1e-3).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from prefdyn.datasets.persona import behaviour_split, load_persona
from prefdyn.llm import features, models
from prefdyn.llm.models import chat_prompt, weights_digest
from prefdyn.llm.tokens import encode_prompt, pad_batch
from prefdyn.params import ALL_THREADS, torch_threads
from prefdyn.store import atomic_write


# --- before: prefdyn.llm.features.embeddings at 2dab713 ------------------------------------------

def _last_states_before(model, ids, mask, layer=-1):
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[layer][torch.arange(len(ids), device=ids.device), mask.sum(1) - 1]


def _last_token_states_before(model, tokenizer, texts, device, layer=-1):
    rows = [encode_prompt(tokenizer, t) for t in texts]
    ids, mask = (t.to(device) for t in pad_batch(tokenizer, rows))
    return _last_states_before(model, ids, mask, layer)


def embeddings_before(policy, texts, layer=-1, batch_size=32, cache=None):
    from safetensors.torch import load_file, save

    path = cache / f"{policy.fingerprint}-{weights_digest(policy.model)}-layer{layer}.safetensors"
    keys = [hashlib.sha256(t.encode("utf-8")).digest() for t in texts]

    def read_cache():
        if not path.is_file():
            return {}
        try:
            data = load_file(str(path))
            return {bytes(k.tolist()): v for k, v in zip(data["keys"], data["values"])}
        except Exception:
            return {}

    stored = read_cache()
    first_missing = {}
    for i, k in enumerate(keys):
        if k not in stored:
            first_missing.setdefault(k, i)
    order = list(first_missing.values())
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        with torch.no_grad():
            states = _last_token_states_before(policy.model, policy.tokenizer, [texts[j] for j in chunk],
                                               policy.device, layer)
        for j, h in zip(chunk, states.float().cpu()):
            stored[keys[j]] = h
    if order:
        stored = {**read_cache(), **stored}
        all_keys = list(stored)
        atomic_write(path, save({
            "keys": torch.tensor([list(k) for k in all_keys], dtype=torch.uint8),
            "values": torch.stack([stored[k] for k in all_keys]).contiguous()}))
    return torch.stack([stored[k] for k in keys])


# --- the benchmark -------------------------------------------------------------------------------

def statements(n: int) -> list[str]:
    persona = load_persona(behaviours="development")
    rows = [ex for group in zip(*persona.values()) for ex in group]   # interleaved across behaviours
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} statements available, asked for {n}")
    return [ex.question for ex in rows[:n]]


def big_cache(folder: Path, policy, size: int, hidden: int) -> None:
    """A cache file holding ``size`` entries of other texts (random states), in the format both ways read."""
    from safetensors.torch import save

    keys = [hashlib.sha256(f"other text {i}".encode()).digest() for i in range(size)]
    path = folder / f"{policy.fingerprint}-{weights_digest(policy.model)}-layer-1.safetensors"
    atomic_write(path, save({"keys": torch.tensor([list(k) for k in keys], dtype=torch.uint8),
                             "values": torch.randn(size, hidden)}))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--statements", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-cache", type=int, default=20000)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    policy = models.load_policy(args.model, "cpu")
    texts = [chat_prompt(policy.tokenizer, q) for q in statements(args.statements)]
    ways = {"before": embeddings_before, "after": features.embeddings}
    seconds = {(w, kind): [] for w in ways for kind in ("cold", "warm", "warm, big cache")}
    results = {}
    for repeat in range(args.repeats):
        for name, fn in (ways.items() if repeat % 2 == 0 else reversed(ways.items())):
            with tempfile.TemporaryDirectory() as tmp, torch_threads(None):
                cache = Path(tmp)
                results[name], t = timed(lambda: fn(policy, texts, cache=cache))
                seconds[name, "cold"].append(t)
                seconds[name, "warm"].append(timed(lambda: fn(policy, texts, cache=cache))[1])
            with tempfile.TemporaryDirectory() as tmp, torch_threads(None):
                cache = Path(tmp)
                big_cache(cache, policy, args.big_cache, results[name].shape[1])
                fn(policy, texts, cache=cache)
                seconds[name, "warm, big cache"].append(timed(lambda: fn(policy, texts, cache=cache))[1])
        print(f"repeat {repeat + 1} of {args.repeats} done", file=sys.stderr)
    diff = (results["before"] - results["after"]).abs().max().item()
    print(f"{args.statements} persona questions (chat template) on {args.model}, {ALL_THREADS} threads, "
          f"{args.repeats} repeats taking turns; median statements per second:\n")
    print("| extraction | before | after | after / before |\n|---|---|---|---|")
    for kind in ("cold", "warm", "warm, big cache"):
        b, a = (args.statements / np.median(seconds[w, kind]) for w in ways)
        print(f"| {kind} | {b:.1f} | {a:.1f} | {a / b:.2f} |")
    print(f"\nlargest |before − after| of a feature: {diff:.2e}")
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
