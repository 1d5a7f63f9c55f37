"""Does ``torch.compile`` speed up the training step? Eager and compiled side by side, in one run.

    python benchmarks/compile.py [--device cpu|cuda] [--layers 2] [--steps 12] [--batch 4]

Trains two copies of SmolLM2-135M (cut to its first ``--layers`` blocks; 0 keeps all) with the
project's DPO step on persona yes/no pairs (:class:`prefdyn.llm.logps.EncodedPairs`, AdamW), one eager
and one with ``torch.compile(model.forward, dynamic=True)``, on the same batches (whose lengths vary,
as in the chapters). Prints the compilation time (the first compiled step) and the mean step time of
each over the steps after the first two, and their ratio.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from prefdyn import objectives
from prefdyn.datasets.persona import behaviour_split, load_persona
from prefdyn.experiments.persona import persona_pairs
from prefdyn.llm import logps, models


def steps(policy: models.Policy, model, encoded: logps.EncodedPairs, n: int, batch: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6)
    times = []
    for s in range(n):
        index = torch.arange(s * batch, (s + 1) * batch) % len(encoded)
        start = time.perf_counter()
        w, l = encoded.logps(model, index, policy.device)
        loss = objectives.dpo_loss(w, l, w.detach(), l.detach(), 0.1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if policy.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    policy = models.load_policy("smollm2-135m", args.device)
    if args.layers:
        del models.transformer_blocks(policy.model)[args.layers:]
        policy.model.config.num_hidden_layers = args.layers
    examples = [e for group in load_persona(behaviours=behaviour_split()["development"][:11],
                                            max_per_behaviour=8).values() for e in group]
    pairs = persona_pairs(policy.tokenizer, examples)
    encoded = logps.EncodedPairs.of(policy.tokenizer, pairs.prompts, pairs.chosen, pairs.rejected)
    eager = steps(policy, copy.deepcopy(policy.model), encoded, args.steps, args.batch)
    compiled_model = copy.deepcopy(policy.model)
    compiled_model.forward = torch.compile(compiled_model.forward, dynamic=True)
    compiled = steps(policy, compiled_model, encoded, args.steps, args.batch)
    e, c = (sum(t[2:]) / len(t[2:]) for t in (eager, compiled))
    print(f"torch {torch.__version__}, device {args.device}, {args.layers or 'all'} blocks, batch {args.batch}, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"eager    step {e:.3f} s")
    print(f"compiled step {c:.3f} s after a first step (compilation) of {compiled[0]:.1f} s")
    print(f"speed-up compiled/eager: {e / c:.2f}x")


if __name__ == "__main__":
    main()
