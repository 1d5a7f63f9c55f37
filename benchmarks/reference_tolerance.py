"""How far a chapter's numbers move between machines: the measurement behind the tolerance of
``prefdyn reproduce`` and of the reference-run test (:mod:`prefdyn.book.reproduce`).

Two machines differ, for the book's numbers, in the order of their floating-point reductions: the
number of threads, and the processor's kernels (the vector width ATen's kernels are compiled for,
and MKL's code path, which depends on the processor's maker and generation). This script executes
every chapter at ``smoke`` on this machine in several configurations, each in a book folder of its
own: as the book runs here (every thread, the best kernels), then on one thread, with ATen's AVX2
kernels and MKL's AVX2 path (``ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2``, as on a processor without
AVX-512), and with ATen's generic kernels and MKL's compatible path (``ATEN_CPU_CAPABILITY=default
MKL_CBWR=COMPATIBLE``). For each configuration and chapter it reports how many floats of the checks and
reported values differ at all from the first configuration's, the smallest relative tolerance of a
grid at which :func:`prefdyn.book.reproduce.compare` (the comparison the reference test and ``prefdyn
reproduce`` make, with its absolute tolerance) finds no difference, the row that needs it, and every
integer, word or verdict that differs.

    python benchmarks/reference_tolerance.py [--chapters ch01-rlhf-dpo-ipo ...] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from prefdyn.book.reproduce import ATOL, compare
from prefdyn.book.runs import chapter_ids


def floats(a, b, path=""):
    """Pairs of floats at the same place in two JSON values (lists and dicts walked together)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a.keys() & b.keys():
            yield from floats(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from floats(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isfinite(a) and math.isfinite(b):
        yield path, a, b


GRID = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
CONFIGURATIONS = {
    "one thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "AVX2 kernels": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"},
    "generic kernels": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"},
}


def run(chapter: str, env: dict[str, str], folder: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "prefdyn", "run", chapter, "--scale", "smoke", "--force",
                           "--out", str(folder)], env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{chapter} with {env} failed:\n{proc.stderr[-3000:]}")
    return json.loads((folder / "book" / "_executed" / f"{chapter}.checks.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chapters", nargs="*", default=chapter_ids())
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for chapter in args.chapters:
            base = run(chapter, {}, Path(tmp) / f"{chapter}-base")
            for name, env in CONFIGURATIONS.items():
                other = run(chapter, env, Path(tmp) / f"{chapter}-{name.replace(' ', '-')}")
                differing = sum(a != b for _, a, b in floats(base, other))
                needed = next((r for r in GRID if not compare(base, other, rtol=r)), math.inf)
                below = [r for r in GRID if r < needed]
                worst = compare(base, other, rtol=below[-1]) if below else []
                exact = compare(base, other, rtol=0.0, atol=math.inf)   # only non-float differences
                results.setdefault(chapter, {})[name] = {
                    "floats_differing": differing, "rtol_needed": needed,
                    "rows_needing_it": [f"{d.row} {d.field}: {d.recorded} -> {d.live}" for d in worst],
                    "non_float_differences": [f"{d.row} {d.field}: {d.recorded} -> {d.live}" for d in exact]}
                print(f"{chapter}, {name}: {differing} floats differ; compare() agrees from rtol = {needed:g} "
                      f"(ATOL = {ATOL}); {'; '.join(results[chapter][name]['rows_needing_it'][:3])}; "
                      f"{len(exact)} integer/word/verdict differences", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
