"""``prefdyn``: list, run and check the book's chapters, and build the book.

    prefdyn list                                   one chapter id per line
    prefdyn run <id> --scale ci [--device cpu] [-p NAME VALUE ...] [--force] [--out DIR]
    prefdyn all --scale ci [--device cpu] [--force]   every chapter, then a summary
    prefdyn book [--from DIR]                      HTML from the executed notebooks (of DIR)
    prefdyn checks                                 the last checks of every chapter
    prefdyn readme                                 rewrite the README's headline from the ledger
    prefdyn record <id> --label L [--from DIR]     keep a finished run as book/recorded/<id>/<L>.json
                                                   (this checkout's last run, or one brought from DIR)
    prefdyn reproduce <id> <label> [--out DIR]     re-run a recorded run with its exact parameters and
                                                   compare every number with it (exit 0: all agree)
    prefdyn train --model <spec> --steps N ...     DPO/IPO on persona data, outside the book; runs
                                                   unchanged under `accelerate launch -m prefdyn train ...`
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .book import build, execute, ledger, runs, verify
from .params import SCALES


def _run(chapters: list[str], args) -> int:
    parameters = {name: execute.parse_value(value) for name, value in (args.param or [])}
    ok = True
    for chapter in chapters:
        print(f"[prefdyn] {chapter}: running at scale={args.scale} ...", flush=True)
        result = execute.run_chapter(chapter, args.scale, args.device, parameters, force=args.force,
                                     show_output=sys.stderr.isatty())
        print(f"[prefdyn] {chapter}: {result.status} in {result.seconds:.0f} s; "
              f"{verify.summary_line(result.checks)}", flush=True)
        if result.error:
            print(f"[prefdyn] {chapter} failed: {result.error}\n"
                  f"          the failed notebook is {runs.paths(chapter)['failed']}", file=sys.stderr)
        ok &= result.ok
    return 0 if ok else 1


def _reproduce(args) -> int:
    """Re-run a recorded run into a book folder of its own and compare it with the record."""
    import json

    from .book import reproduce

    record = reproduce.find_record(args.chapter, args.label)
    revision = record.get("git")
    if not revision or not reproduce.is_ancestor(revision):
        raise runs.ChapterError(f"the record {args.label!r} was made by code {revision or '(unrecorded)'}, which is "
                                "not an ancestor of this checkout: check out that revision (or a descendant) first")
    parameters = reproduce.reproduce_parameters(record)
    bad = [item for item in (args.data or []) if "=" not in item]
    if bad:
        raise runs.ChapterError(f"--data {bad[0]!r}: write NAME=PATH, e.g. --data data_dir=~/persona")
    notes = reproduce.check_data(record, parameters, dict(item.split("=", 1) for item in (args.data or [])))
    if args.device:
        parameters["device"] = args.device
    out = args.out or Path(f"prefdyn-reproduce-{args.chapter}-{args.label}")
    os.environ["PREFDYN_ROOT"] = str(runs.stage_book(out))
    scale = parameters.pop("scale")
    device = parameters.pop("device", None)
    shown = " ".join(f"-p {k} {json.dumps(v)}" for k, v in parameters.items())
    print(f"[prefdyn] reproducing {args.chapter} / {args.label} (code {revision}) in {os.environ['PREFDYN_ROOT']}:\n"
          f"          prefdyn run {args.chapter} --scale {scale}" + (f" --device {device}" if device else "") + f" {shown}")
    for line in notes:
        print(f"[prefdyn] data: {line}")
    result = execute.run_chapter(args.chapter, scale, device, parameters, force=True, show_output=sys.stderr.isatty())
    if result.status == "failed":
        print(f"[prefdyn] {args.chapter} failed: {result.error}", file=sys.stderr)
        return 1
    for line in reproduce.environment_differences(record, runs.load_meta(args.chapter) or {}):
        print(f"[prefdyn] differs from the record: {line}")
    differences = reproduce.compare(record, runs.load_checks(args.chapter))
    print(reproduce.difference_table(differences))
    return 0 if not differences else 1


def _train(args) -> int:
    import json

    from accelerate import PartialState

    from .experiments.persona import train_on_persona
    from .llm.train import PreferenceConfig
    from .store import atomic_write_json

    try:
        config = PreferenceConfig(args.steps, args.batch, args.lr, args.seed, args.loss, args.beta, args.bucket,
                                  args.length_normalised)
        result = train_on_persona(args.model, config, args.device, data_dir=args.data_dir,
                                  behaviours=args.behaviours, per_behaviour=args.per_behaviour,
                                  held_out=args.held_out, top_blocks=args.top_blocks, progress=sys.stderr.isatty())
    except (FileNotFoundError, ValueError) as exc:   # bad data or settings (ModelSpecError, ParameterError too)
        raise runs.ChapterError(str(exc)) from exc
    if PartialState().is_main_process:
        summary = {k: v for k, v in result.items() if k != "history"}
        summary["losses"] = [round(r["loss"], 6) for r in result["history"] if "loss" in r]
        print(json.dumps(summary, indent=2))
        if args.out is not None:
            atomic_write_json(args.out, result)
    return 0


def _list(args) -> int:
    print("\n".join(runs.chapter_ids()))
    return 0


def _run_one(args) -> int:
    return _run([args.chapter], args)


def _all(args) -> int:
    status = _run(runs.chapter_ids(), args)
    print(verify.summary())
    return status


def _book(args) -> int:
    if args.folder is not None:
        if not (args.folder / "chapters").is_dir():
            raise runs.ChapterError(f"{args.folder} is not a book folder; make one with "
                                    f"prefdyn run <id> --out {args.folder}")
        os.environ["PREFDYN_ROOT"] = str(args.folder.expanduser().resolve())
    index = build.build_book()
    print(f"[prefdyn] the book is at {index}")
    print(verify.summary())
    return 0


def _checks(args) -> int:
    print(verify.summary())
    return 0 if all(runs.load_checks(c)["checks"] and not any(map(verify.is_failure, runs.load_checks(c)["checks"]))
                    for c in runs.chapter_ids()) else 1


def _readme(args) -> int:
    changed = ledger.update_readme(runs.root() / "README.md")
    print(f"[prefdyn] README.md {'updated' if changed else 'already up to date'}")
    return 0


def _record(args) -> int:
    path = runs.record(args.chapter, args.label, args.folder, args.hardware, args.data, args.allow_dirty)
    print(f"[prefdyn] recorded {path}")
    return 0


COMMANDS = {"list": _list, "run": _run_one, "all": _all, "book": _book, "checks": _checks, "readme": _readme,
            "record": _record, "reproduce": _reproduce, "train": _train}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefdyn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print one chapter id per line")
    for name in ("run", "all"):
        p = sub.add_parser(name, help="execute one chapter" if name == "run" else "execute every chapter")
        if name == "run":
            p.add_argument("chapter")
        p.add_argument("--scale", choices=SCALES, default="ci")
        p.add_argument("--device", default=None, help="cpu, cuda, auto (default: the chapter's own)")
        p.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                       help="a papermill parameter; VALUE is parsed as JSON when it can be")
        p.add_argument("--force", action="store_true", help="execute even if the cache says nothing changed")
        p.add_argument("--out", type=Path, default=None,
                       help="a folder of your own: the book is copied there once and your runs go there, "
                            "not into this book (then: prefdyn book --from DIR)")
    p = sub.add_parser("book", help="build the HTML book from the executed chapters")
    p.add_argument("--from", dest="folder", type=Path, default=None,
                   help="build the book in a folder made by `prefdyn run --out DIR` from the runs there")
    sub.add_parser("checks", help="print the last verification results of every chapter")
    sub.add_parser("readme", help="rewrite README.md's headline (what is and is not reproduced) from the ledger")
    p = sub.add_parser("record", help="keep a finished run (its <id>.checks.json and <id>.run.json) by label")
    p.add_argument("chapter")
    p.add_argument("--label", required=True, help="e.g. ci-original-data (letters, digits, - _ .)")
    p.add_argument("--from", dest="folder", type=Path, default=None,
                   help="the folder holding the two files (default: book/_executed of this checkout)")
    p.add_argument("--hardware", default=None, help="override the hardware the run recorded")
    p.add_argument("--data", default=None, help="describe the data set (default: the run's data_dir)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="record a run from uncommitted code, marked as such (otherwise refused)")
    p = sub.add_parser("reproduce", help="re-run a recorded run with its exact parameters and compare it")
    p.add_argument("chapter")
    p.add_argument("label", help="the recorded run's label (book/recorded/<id>/<label>.json)")
    p.add_argument("--out", type=Path, default=None,
                   help="the book folder to run in (default: ./prefdyn-reproduce-<id>-<label>)")
    p.add_argument("--device", default=None, help="run on this device instead of the recorded one")
    p.add_argument("--data", action="append", metavar="NAME=PATH",
                   help="your copy of data the record read from outside the package, e.g. data_dir=~/persona "
                        "(checked against the record's checksum)")
    p = sub.add_parser("train", help="DPO or IPO on persona data (works under `accelerate launch`)")
    p.add_argument("--model", default="smollm2-135m", help="packaged name, .gguf path, HF folder or hub id")
    p.add_argument("--device", default="auto")
    p.add_argument("--loss", choices=("dpo", "ipo"), default="dpo")
    p.add_argument("--beta", type=float, default=0.1,
                   help="DPO's beta; for IPO the inverse of Azar et al.'s tau (target margin beta/2), as in "
                        "chapter 4. TRL's DPOTrainer calls tau 'beta' for loss_type='ipo': pass --beta 1/tau")
    p.add_argument("--length-normalised", action="store_true",
                   help="score responses by their mean token log-probability instead of the sum; with --loss ipo "
                        "this is TRL's length-normalised 'ipo' loss")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=8, help="global batch size (split among processes)")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="folder of persona .jsonl files (default: shipped data)")
    p.add_argument("--behaviours", default=None, help="comma-separated behaviour names (default: all)")
    p.add_argument("--per-behaviour", type=int, default=None)
    p.add_argument("--held-out", type=float, default=0.2)
    p.add_argument("--top-blocks", type=int, default=None, help="train only the last N blocks (default: all)")
    p.add_argument("--bucket", type=int, default=1, help="group batches by length over this many batches")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here (atomically)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and dispatch; a :class:`~prefdyn.book.runs.ChapterError` (bad chapter,
    parameter, folder or record) is printed as one line and exits 2, before any work where it can."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # papermill logs the notebook's output at INFO: shown when a person watches a terminal
    logging.getLogger("papermill").setLevel(logging.INFO if sys.stderr.isatty() else logging.WARNING)
    args = parser().parse_args(argv)
    try:
        if args.command in ("run", "all") and args.out is not None:
            os.environ["PREFDYN_ROOT"] = str(runs.stage_book(args.out))
            print(f"[prefdyn] writing into the book folder {os.environ['PREFDYN_ROOT']}")
        return COMMANDS[args.command](args)
    except runs.ChapterError as exc:
        print(f"[prefdyn] error: {exc}", file=sys.stderr)
        return 2
