"""The whole book at ``scale=ci`` from a clean checkout, then again with nothing changed.

    python benchmarks/book_cpu.py [--scale ci] [--device cpu] [--results DIR]

Clones the current commit into a temporary folder (no executed notebooks, no HTML) and runs, with
this environment's packages and model, what ``make book`` runs: ``prefdyn all`` then ``prefdyn
book``. The embedding and sample caches start empty (``PREFDYN_CACHE`` points into the temporary
folder). Then it runs both again, which the content-hash cache should serve in seconds. Prints the
wall-clock time of each, every chapter's execution time, and how they compare with the goals
(under 25 minutes; under 60 seconds). ``--results DIR`` keeps every chapter's checks and run
record (``<id>.checks.json``, ``<id>.run.json``), e.g. to compare two commits' results.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOALS = {"first build": 25 * 60, "rebuild, nothing changed": 60}


def build(clone: Path, env: dict, scale: str, device: str | None) -> float:
    start = time.perf_counter()
    run = [sys.executable, "-m", "prefdyn", "all", "--scale", scale] + (["--device", device] if device else [])
    for cmd in (run, [sys.executable, "-m", "prefdyn", "book"]):
        done = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd[2:])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="ci")
    parser.add_argument("--device", default=None)
    parser.add_argument("--results", type=Path, default=None, help="copy the checks and run JSON of every chapter here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="prefdyn-bench-") as tmp:
        clone = Path(tmp) / "book"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        env = {**os.environ, "PREFDYN_ROOT": str(clone), "PYTHONPATH": str(clone / "src"),
               "PREFDYN_CACHE": str(Path(tmp) / "cache")}
        times = {"first build": build(clone, env, args.scale, args.device),
                 "rebuild, nothing changed": build(clone, env, args.scale, args.device)}
        revision = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True).stdout.strip()
        print(f"book at scale={args.scale}, commit {revision}, {os.cpu_count()} CPU cores, "
              f"{time.strftime('%Y-%m-%d %H:%M %Z')}")
        for meta in sorted((clone / "book" / "_executed").glob("*.run.json")):
            record = json.loads(meta.read_text())
            print(f"  {record['chapter']:<40} {record['seconds']:7.0f} s")
        if args.results is not None:
            args.results.mkdir(parents=True, exist_ok=True)
            for path in (clone / "book" / "_executed").glob("*.json"):
                shutil.copy2(path, args.results / path.name)
        for name, seconds in times.items():
            print(f"{name:<26} {seconds:7.0f} s   goal < {GOALS[name]} s   "
                  f"({seconds / GOALS[name]:.0%} of the goal) {'OK' if seconds < GOALS[name] else 'OVER'}")


if __name__ == "__main__":
    main()
