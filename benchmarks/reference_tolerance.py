"""How far a chapter's numbers move between machines: the measurement behind the tolerance of
``prefdyn reproduce`` and of the reference-run test (:mod:`prefdyn.book.reproduce`).

Two machines differ, for the book's numbers, in the order of their floating-point reductions: the
number of threads and the processor's kernels. This script executes every chapter at ``smoke`` twice
on this machine, once on one thread and once on two (``OMP_NUM_THREADS``), each in a book folder of
its own, and reports, per chapter, the largest relative difference of any float in any check or
reported value, and whether any integer, word or verdict differs.

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

from prefdyn.book.reproduce import compare
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


def run(chapter: str, threads: int, folder: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "prefdyn", "run", chapter, "--scale", "smoke", "--force",
                           "--out", str(folder)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{chapter} on {threads} thread(s) failed:\n{proc.stderr[-3000:]}")
    return json.loads((folder / "book" / "_executed" / f"{chapter}.checks.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chapters", nargs="*", default=chapter_ids())
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for chapter in args.chapters:
            one, two = (run(chapter, n, Path(tmp) / f"{chapter}-{n}") for n in (1, 2))
            rel = [(abs(a - b) / max(abs(a), abs(b)) if max(abs(a), abs(b)) > 1e-12 else 0.0, path)
                   for path, a, b in floats(one, two)]
            worst = max(rel, default=(0.0, ""))
            exact = [d for d in compare(one, two, rtol=0.0, atol=math.inf)]   # only non-float differences
            results[chapter] = {"max_relative_difference": worst[0], "where": worst[1], "floats": len(rel),
                                "non_float_differences": [f"{d.row} {d.field}: {d.recorded} -> {d.live}" for d in exact]}
            print(f"{chapter}: largest relative difference {worst[0]:.3g} ({worst[1]}) over {len(rel)} floats; "
                  f"{len(exact)} integer/word/verdict differences", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
