"""The exact (model-free) parts that dominate the ``full`` scale on one CPU thread: each one the
straightforward way and the batched way the chapters use, side by side in one run.

    python benchmarks/batched.py [--only ch02,ch03,ch04] [--threads 1] [--resamples 20]

Sizes are the chapters' ``full`` scale unless an option shrinks them. For every part it prints the
seconds of each way, their ratio, and the largest difference of the results, which must be
round-off (the script exits 1 when one is above its tolerance, fixed here before any run).

* ``ch02`` — the bootstrap of the ordering checks: last-layer DPO retrained (every behaviour alone,
  and jointly; 500 full-batch steps) on ``--resamples`` stratified resamples of 11 x 120 statements
  with SmolLM2's 576-dimensional features (synthetic, same shape). Loop: one training per resample on
  the resampled rows (``dynamics.losses_after(G[idx], ...)``). Batched: every resample at once as a
  row of multiplicities (``dynamics.resampled_losses_after``).
* ``ch03`` — ``generalization.gd_dpo`` on the largest configuration of the synthetic grid
  (K = 32 pairs of clusters, Q = 200 samples each, d = 1000, 200 steps). Per-sample: every margin
  from its own rows of ``W`` (``generalization.margins``, a gather of an N x d array) and every
  sample's step added row by row (``index_add``), as the function did before. Per-pair blocks:
  ``generalization.PairBlocks``.
* ``ch04`` — the phase diagram of the iterated IPO and DPO maps (41 x 33 cells, 2000 rounds).
  Loop: one batch of 41 alphas per beta, the oscillation ratio one trajectory at a time, as the
  chapter did before. Batched: all 1353 cells in one batch.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from prefdyn.theory import dynamics as dyn
from prefdyn.theory import generalization as gen
from prefdyn.theory import iterative as it


def ch02(args):
    G, s, groups = dyn.synthetic_behaviours(np.linspace(0.2, 2.0, 11), n_per_class=60, d=576, common=3.0, seed=0)
    lr = 1.5 / dyn.smoothness(G, 0.1, groups)
    rng = np.random.default_rng(0)
    resamples = [dyn.stratified_resample(s, groups, rng) for _ in range(args.resamples)]
    names = list(dict.fromkeys(groups))

    def loop():
        return np.array([[[out[k] for k in names] for out in
                          (dyn.losses_after(G[idx], s[idx], [groups[i] for i in idx], beta=0.1, lr=lr, steps=500,
                                            separate=separate) for separate in (True, False))] for idx in resamples])

    def batched():
        counts = np.stack([np.bincount(idx, minlength=len(s)) for idx in resamples])
        return np.stack([dyn.resampled_losses_after(G, s, groups, counts, beta=0.1, lr=lr, steps=500, separate=separate)
                         for separate in (True, False)], 1)

    return f"{args.resamples} resamples x 500 steps, n = {len(s)}, d = 576", loop, batched, 1e-9


def ch03(args):
    data = gen.cluster_data(32, 200, 1000, 1 / (32 * math.sqrt(200)), 0.5, seed=0)
    G, ch, rj = data.features, data.chosen, data.rejected
    lr = gen.theorem_rates(32, 1.0)[2] / 200

    def per_sample():
        dW = torch.zeros(data.vocab, G.shape[1], dtype=G.dtype)
        for _ in range(200):
            weight = torch.sigmoid(-gen.margins(dW, G, ch, rj, 1.0))[:, None] * G * (lr / len(G))
            dW = dW.index_add(0, ch, weight).index_add(0, rj, -weight)
        return gen.margins(dW, G, ch, rj, 1.0).numpy()

    def blocks():
        return gen.gd_dpo(G, ch, rj, vocab=data.vocab, beta=1.0, lr=lr, steps=200).train[-1].numpy()

    return f"K = 32, Q = 200, N = {len(G)}, d = 1000, 200 steps", per_sample, blocks, 1e-9


def ch04(args):
    D = torch.float64
    P = it.cyclic_preferences(0.4)
    u = torch.full((3,), -math.log(3), dtype=D)
    alphas = torch.linspace(0.0, 1.0, 41, dtype=D)
    betas = {it.mrs_ipo_step: torch.linspace(0.1, 8.0, 33, dtype=D),
             it.mrs_dpo_step: 1 / torch.linspace(0.025, 2.0, 33, dtype=D)}
    start = F.log_softmax(u + torch.tensor([1e-3, 0.0, 0.0], dtype=D), -1)

    def loop():
        out = []
        for step, bs in betas.items():
            for b in bs:
                tr = it.iterate(step, start.expand(41, 3), 2000, log_pi_ref=u, mu0=u.exp(), P=P, alpha=alphas[:, None],
                                beta=b.item(), lam=1.0)
                out.append([float(it.oscillation_ratio(tr[:, i], u)) for i in range(41)])
        return np.array(out)

    def batched():
        out = []
        for step, bs in betas.items():
            cells = torch.cartesian_prod(alphas, bs)
            tr = it.iterate(step, start.expand(len(cells), 3), 2000, log_pi_ref=u, mu0=u.exp(), P=P,
                            alpha=cells[:, :1], beta=cells[:, 1:], lam=1.0)
            out.append(it.oscillation_ratio(tr, u).reshape(41, 33).T.numpy())
        return np.concatenate(out)

    return "41 x 33 cells x 2000 rounds, IPO and DPO", loop, batched, 1e-6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="ch02,ch03,ch04")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the chapters use 1 for this work)")
    parser.add_argument("--resamples", type=int, default=20, help="ch02: bootstrap resamples (the chapter: 200 at full)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {time.strftime('%Y-%m-%d %H:%M %Z')}")
    failed = False
    for name in args.only.split(","):
        sizes, slow, fast, tol = {"ch02": ch02, "ch03": ch03, "ch04": ch04}[name](args)
        seconds = []
        for fn in (slow, fast):
            start = time.perf_counter()
            seconds.append((fn(), time.perf_counter() - start))
        (a, t_slow), (b, t_fast) = seconds
        err = float(np.abs(a - b).max())
        failed |= not err <= tol
        print(f"{name} ({sizes}): straightforward {t_slow:7.2f} s, batched {t_fast:7.2f} s, ratio {t_slow / t_fast:5.1f}x; "
              f"largest difference {err:.1e} ({'PASS' if err <= tol else 'FAIL'} against {tol:g})")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
