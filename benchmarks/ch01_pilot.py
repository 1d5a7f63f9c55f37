"""The pilot that chapter 1's registered effects come from: the chapter's `ci` DPO protocol on
development behaviours that the chapter's defaults do not use (the 9th to 16th of the development
set: Appendix-F personas of Im & Li 2408.03459), with another seed. It writes every per-statement
value, so the registration's standardised effects and the simulated power at each size can be
recomputed from its output.

    python benchmarks/ch01_pilot.py --out pilot.json [--model smollm2-135m]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from prefdyn.datasets.persona import behaviour_split, load_persona
from prefdyn.experiments.ch01 import DPOConfig, dpo_run, held_out_split, training_sample
from prefdyn.llm import models

CI = DPOConfig(train_per_behaviour=30, test_per_behaviour=25, steps=30, batch=8, lr=3e-5, beta=0.1,
               eval_every=30, curve_per_behaviour=1, runs=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()
    names = behaviour_split()["development"][8:16]
    persona = load_persona(None, names)
    test, pool = held_out_split(persona, CI.test_per_behaviour, args.seed)
    policy = models.load_policy(args.model, "cpu")
    start = time.perf_counter()
    run = dpo_run(policy, training_sample(pool, CI.train_per_behaviour, args.seed, 0), CI, args.seed, test=test)
    out = {"model": args.model, "behaviours": names, "seed": args.seed, "config": CI.__dict__,
           "seconds": time.perf_counter() - start, "train_drop": run.train_drop.tolist(),
           "train_margin": run.train_margin.tolist(), "margin": run.margin.tolist(), "gain": run.gain.tolist()}
    for key in ("train_drop", "margin", "gain"):
        v = np.asarray(out[key])
        print(f"{key}: mean {v.mean():.4f}, sd {v.std(ddof=1):.4f}, standardised {v.mean() / v.std(ddof=1):.3f}")
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
