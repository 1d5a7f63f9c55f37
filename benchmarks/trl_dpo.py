"""Side-by-side benchmark: prefdyn's ``train_preferences`` against TRL's ``DPOTrainer``.

Both trainers train the same model (two copies with identical initial weights) on the same batches
in the same order, with the same loss (sigmoid DPO), beta, batch size, sequence lengths (identical
token ids), optimizer (``torch.optim.AdamW``, weight decay 0, constant learning rate, no gradient
clipping), and precision (fp32 on CPU; fp32 weights with bf16 autocast on CUDA). The script prints,
for each kind of preference pair, the samples/s of each trainer and their ratio, the peak memory of
each, and the largest per-step difference of their training losses over the first 20 steps with a
PASS/FAIL against a tolerance fixed below before any run.

Usage::

    python benchmarks/trl_dpo.py                      # CPU defaults (see README.md)
    python benchmarks/trl_dpo.py --device cuda --layers 0 --steps 50 --batch 16
    python benchmarks/trl_dpo.py --pairs persona --steps 20 --batch 8 --model smollm2-135m

How it is fair (see README.md for the full list):

* reference log-probabilities are computed once before training on both sides (the project's
  ``ReferenceLogps.of``; TRL's ``precompute_ref_log_probs=True``) and excluded from the timing, so
  neither side keeps a reference model in memory or runs it during the timed steps;
* TRL gets a dataset already laid out in the project's batch order (its seeded ``randperm`` stream)
  and ``train_sampling_strategy="sequential"``, so step ``k`` sees the same pairs on both sides;
* TRL's tokenisation is replaced by the project's (prompt and response tokenised separately with
  ``add_special_tokens=False`` and concatenated, no EOS appended), by overriding
  ``DPOTrainer._prepare_dataset``; the script reports how TRL's own tokenisation would differ;
* ``gradient_checkpointing=False`` (TRL's default is True; the project does not checkpoint),
  ``max_grad_norm=0`` (the project does not clip; TRL still computes the norm for its logs, which is
  part of its per-step cost), ``max_length=None`` (no truncation on either side);
* each trainer runs in its own fresh subprocess, one after the other, from a model folder written
  once by the parent, so peak memory is measured cleanly and neither run inherits warm caches.

Timing: "steady" is the wall-clock from the end of step 1 to the end of the last step (step 1 is a
warm-up, excluded on both sides), so samples/s = (steps - 1) * batch / seconds. "call" is the whole
``train_preferences(...)`` / ``trainer.train()`` call including each side's setup. Peak memory:
on CUDA ``torch.cuda.max_memory_allocated`` during training (and its increase over the memory
allocated before training); on CPU the peak resident set size during training minus the resident
set size just before it (the peak is reset through ``/proc/self/clear_refs``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

# Stated before any run: the largest |loss_prefdyn - loss_trl| allowed over the first 20 steps.
# CPU runs in fp32, where the two implementations differ only in summation order (TRL projects
# only completion positions through the LM head, in tiles; the project takes the full logits, or
# for single-token answers the last prompt position only), so agreement to 1e-4 is expected.
# CUDA runs under bf16 autocast, whose rounding differs between differently shaped matmuls.
LOSS_TOLERANCE = {"cpu": 1e-4, "cuda": 5e-3}
COMPARED_STEPS = 20

# --- data -----------------------------------------------------------------------------------------

_CAPITALS = [("France", "Paris", "Lyon"), ("Japan", "Tokyo", "Osaka"), ("Italy", "Rome", "Milan"),
             ("Canada", "Ottawa", "Toronto"), ("Australia", "Canberra", "Sydney"), ("Spain", "Madrid", "Seville"),
             ("Germany", "Berlin", "Munich"), ("Brazil", "Brasilia", "Rio de Janeiro"),
             ("Egypt", "Cairo", "Alexandria"), ("Kenya", "Nairobi", "Mombasa"), ("Peru", "Lima", "Cusco"),
             ("Norway", "Oslo", "Bergen"), ("India", "New Delhi", "Mumbai"), ("Turkey", "Ankara", "Istanbul"),
             ("Chile", "Santiago", "Valparaiso"), ("Poland", "Warsaw", "Krakow")]
_WORDS = ["garden", "planet", "window", "silver", "market", "bridge", "candle", "forest",
          "rocket", "violin", "harbor", "pencil", "throne", "lizard", "meadow", "copper"]


def text_examples(n: int = 64) -> list[tuple[str, str, str]]:
    """``n`` short (question, chosen, rejected) triples with multi-token answers of unequal length."""
    out = []
    for i in range(n):
        a, b = 3 + (7 * i) % 41, 2 + (5 * i) % 29
        kind = i % 4
        if kind == 0:
            out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {a + b + 1}."))
        elif kind == 1:
            out.append((f"What is {a} times {b}? Answer in one sentence.", f"{a} times {b} equals {a * b}.",
                        f"I am not sure, but I think it might be {a * b + a}."))
        elif kind == 2:
            country, capital, city = _CAPITALS[(i // 4) % len(_CAPITALS)]
            out.append((f"What is the capital of {country}?", f"The capital of {country} is {capital}.",
                        f"It is {city}, the largest and best known city of {country}."))
        else:
            word = _WORDS[(i // 4) % len(_WORDS)]
            out.append((f"Spell the word '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'.",
                        f"{word.upper()}"))
    return out


def make_pairs(kind: str, tokenizer, n: int, seed: int):
    from prefdyn.experiments.persona import persona_pairs
    from prefdyn.llm.models import chat_prompt
    from prefdyn.llm.train import PreferencePairs

    if kind == "persona":
        from prefdyn.datasets.persona import behaviour_split, load_persona

        per_behaviour = -(-n // 11) + 1
        by_behaviour = load_persona(behaviours=behaviour_split()["development"][:11],
                                    max_per_behaviour=per_behaviour, seed=seed)
        # interleave behaviours so any prefix mixes them
        examples = [ex for group in zip(*by_behaviour.values()) for ex in group][:n]
        if len(examples) < n:
            raise SystemExit(f"only {len(examples)} persona examples available, asked for {n}")
        return persona_pairs(tokenizer, examples)
    if kind == "text":
        triples = text_examples(n)
        return PreferencePairs([chat_prompt(tokenizer, q) for q, _, _ in triples],
                               [c for _, c, _ in triples], [r for _, _, r in triples])
    raise SystemExit(f"unknown --pairs kind {kind!r}; use persona, text or persona,text")


def batch_order(n: int, steps: int, batch: int, seed: int) -> list[int]:
    """The indices ``train_preferences`` consumes: a stream of seeded permutations, ``batch`` at a time."""
    import torch

    generator, order = torch.Generator().manual_seed(seed), []
    while len(order) < steps * batch:
        order += torch.randperm(n, generator=generator).tolist()
    return order[:steps * batch]


# --- measurement helpers -------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory of the code between ``start()`` and ``stop()``."""

    def __init__(self, device: str):
        self.device, self._thread, self._peak = device, None, 0

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        self.base = _proc_kib("VmRSS") * 1024
        try:  # "5" resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM after /proc/self/clear_refs reset"
        except OSError:  # fall back to sampling the RSS every 2 ms
            self.method, self._running, self._peak = "VmRSS sampled every 2 ms", True, self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while self._running:
            self._peak = max(self._peak, _proc_kib("VmRSS") * 1024)
            time.sleep(0.002)

    def stop(self) -> dict:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            method = "torch.cuda.max_memory_allocated"
        elif self._thread is not None:
            self._running = False
            self._thread.join()
            peak, method = self._peak, self.method
        else:
            peak, method = _proc_kib("VmHWM") * 1024, self.method
        return {"peak_mib": peak / 2**20, "increase_mib": (peak - self.base) / 2**20, "before_mib": self.base / 2**20,
                "memory_method": method}


def _checksum(model) -> float:
    import torch

    with torch.no_grad():
        return float(sum(p.double().abs().sum() for p in model.parameters()))


# --- the two workers -----------------------------------------------------------------------------

def run_prefdyn(policy, pairs, args) -> dict:
    from prefdyn.llm.train import PreferenceConfig, ReferenceLogps, train_preferences

    reference = ReferenceLogps.of(policy, pairs, length_normalised=args.loss == "ipo")  # untimed, as TRL's precompute
    stamps: list[float] = []

    def clock(step: int) -> dict:  # called before every step and after the last one
        _sync(args.device)
        stamps.append(time.perf_counter())
        return {}

    memory = PeakMemory(args.device)
    memory.start()
    start = time.perf_counter()
    # TRL's beta is DPO's beta, and for loss_type="ipo" Azar et al.'s tau with length-normalised log-probs:
    # in prefdyn's notation that is loss="ipo", beta=1/tau, length_normalised=True
    ipo = args.loss == "ipo"
    config = PreferenceConfig(args.steps, args.batch, args.lr, args.seed, args.loss,
                              1 / args.beta if ipo else args.beta, length_normalised=ipo)
    history = train_preferences(policy, pairs, config, reference=reference, evaluate=clock, eval_every=1,
                                progress=False)
    _sync(args.device)
    call = time.perf_counter() - start
    result = memory.stop()
    # stamps[k] is the start of step k (= end of step k-1); stamps[steps] the end of the last step
    result.update(losses=[r["loss"] for r in history if "loss" in r],
                  margins=[r["train_margin"] for r in history if "loss" in r],
                  steady_s=stamps[args.steps] - stamps[1], call_s=call,
                  step_s=[b - a for a, b in zip(stamps, stamps[1:])])
    return result


def run_trl(policy, pairs, args) -> dict:
    import datasets
    import trl
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    datasets.disable_progress_bars()
    order = batch_order(len(pairs), args.steps, args.batch, args.seed)
    rows = pairs.subset(order)
    dataset = datasets.Dataset.from_dict({"prompt": rows.prompts, "chosen": rows.chosen, "rejected": rows.rejected})
    tokenizer = policy.tokenizer
    notes: dict = {}

    class ProjectTokenisedDPOTrainer(trl.DPOTrainer):
        """TRL's trainer, with the project's tokenisation in place of TRL's (outside the timed steps)."""

        def _prepare_dataset(self, dataset, processing_class, args_, dataset_name):
            def tokenize(example):
                return {key + "_ids": tokenizer.encode(example[key], add_special_tokens=False)
                        for key in ("prompt", "chosen", "rejected")}

            ours = dataset.map(tokenize, remove_columns=dataset.column_names)
            # Diagnostic only: what TRL's own preparation would have produced for the same rows.
            theirs = super()._prepare_dataset(dataset, processing_class, args_, dataset_name)
            keys, eos = ("prompt_ids", "chosen_ids", "rejected_ids"), tokenizer.eos_token_id
            same = sum(all(a[k] == b[k] for k in keys) for a, b in zip(ours, theirs))
            eos_only = sum(a["prompt_ids"] == b["prompt_ids"] and b["chosen_ids"] == a["chosen_ids"] + [eos]
                           and b["rejected_ids"] == a["rejected_ids"] + [eos] for a, b in zip(ours, theirs))
            notes.update(trl_tokenisation_identical_rows=same, trl_tokenisation_eos_only_rows=eos_only,
                         rows=len(ours), eos_token=tokenizer.eos_token)
            return ours

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args_, state, control, **kwargs):
            _sync(args.device)
            self.ends.append(time.perf_counter())

    cuda = args.device == "cuda"
    config = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_dpo_bench_"), beta=args.beta, loss_type="sigmoid" if args.loss == "dpo" else "ipo",
        per_device_train_batch_size=args.batch, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, optim="adamw_torch", max_steps=args.steps, max_grad_norm=0.0,
        bf16=cuda, fp16=False, use_cpu=not cuda, gradient_checkpointing=False, max_length=None,
        precompute_ref_log_probs=True, precompute_ref_batch_size=32, train_sampling_strategy="sequential",
        logging_steps=1, report_to=[], save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=args.seed)
    clock = Clock()
    trainer = ProjectTokenisedDPOTrainer(model=policy.model, args=config, train_dataset=dataset,
                                         processing_class=tokenizer, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # with tqdm disabled it prints every log; the project prints nothing
    memory = PeakMemory(args.device)
    memory.start()
    start = time.perf_counter()
    trainer.train()
    _sync(args.device)
    call = time.perf_counter() - start
    result = memory.stop()
    shutil.rmtree(config.output_dir, ignore_errors=True)  # empty: nothing is saved
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]
    if [entry["step"] for entry in logs] != list(range(1, args.steps + 1)):
        raise RuntimeError(f"TRL logged steps {[e['step'] for e in logs]}, expected 1..{args.steps}")
    ends = clock.ends
    result.update(losses=[e["loss"] for e in logs], margins=[e.get("rewards/margins") for e in logs],
                  steady_s=ends[args.steps - 1] - ends[0], call_s=call,
                  step_s=[ends[0] - start] + [b - a for a, b in zip(ends, ends[1:])], **notes)
    return result


def worker(args) -> None:
    import torch
    import transformers

    from prefdyn.llm.models import load_policy

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    policy = load_policy(args.model_dir, args.device)
    pairs = make_pairs(args.pairs, policy.tokenizer, args.n_pairs, args.seed)
    info = {"trainer": args.worker, "weights_checksum": _checksum(policy.model), "threads": torch.get_num_threads(),
            "prompt_tokens_mean": sum(len(policy.tokenizer.encode(p, add_special_tokens=False))
                                      for p in pairs.prompts) / len(pairs)}
    result = (run_prefdyn if args.worker == "prefdyn" else run_trl)(policy, pairs, args)
    Path(args.out).write_text(json.dumps({**info, **result}))


# --- the parent: prepare the model once, run both workers, compare --------------------------------

def prepare_model(args, folder: Path) -> dict:
    """Load ``--model`` once, optionally keep only its first ``--layers`` blocks, save it as a local
    Hugging Face folder that both workers load (identical weights, fast loading)."""
    import torch

    from prefdyn.llm.models import load_policy

    policy = load_policy(args.model, "cpu")
    model, total = policy.model, None
    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    total = len(blocks)
    if args.layers and args.layers < total:
        del blocks[args.layers:]
        model.config.num_hidden_layers = args.layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:args.layers]
    # The GGUF weights are already dequantised to float32; the GGUF quantizer marker left on the model
    # only stops save_pretrained (and Trainer, which refuses "purely quantized" models), so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    policy.tokenizer.save_pretrained(folder)
    return {"model": args.model, "blocks_kept": len(blocks), "blocks_total": total,
            "parameters": sum(p.numel() for p in model.parameters())}


def compare(kind: str, ours: dict, theirs: dict, args) -> dict:
    samples = (args.steps - 1) * args.batch
    rate = {name: samples / r["steady_s"] for name, r in (("prefdyn", ours), ("trl", theirs))}
    compared = min(COMPARED_STEPS, args.steps)
    diffs = [abs(a - b) for a, b in zip(ours["losses"][:compared], theirs["losses"][:compared])]
    tolerance = LOSS_TOLERANCE[args.device]
    return {"pairs": kind, "samples_per_s": rate, "ratio": rate["prefdyn"] / rate["trl"],
            "call_s": {"prefdyn": ours["call_s"], "trl": theirs["call_s"]},
            "loss_max_abs_diff": max(diffs), "loss_diffs": diffs, "compared_steps": compared,
            "tolerance": tolerance, "loss_agree": max(diffs) <= tolerance,
            "same_initial_weights": ours["weights_checksum"] == theirs["weights_checksum"]}


def print_report(kind: str, ours: dict, theirs: dict, summary: dict, args) -> None:
    mem_unit = "GPU MiB (max_memory_allocated)" if args.device == "cuda" else "MiB RSS"
    print(f"\n=== pairs={kind}: {args.n_pairs} pairs, mean prompt {ours['prompt_tokens_mean']:.1f} tokens, "
          f"batch {args.batch}, {args.steps} steps, beta {args.beta}, lr {args.lr}, device {args.device}, "
          f"{ours['threads']} threads ===")
    print(f"{'trainer':8} {'samples/s':>10} {'steady s':>9} {'call s':>8} {'peak ' + mem_unit:>34} {'increase':>9}")
    for name, r in (("prefdyn", ours), ("TRL", theirs)):
        print(f"{name:8} {summary['samples_per_s'][name.lower()]:10.3f} {r['steady_s']:9.2f} {r['call_s']:8.2f} "
              f"{r['peak_mib']:34.0f} {r['increase_mib']:9.0f}")
    print(f"speed ratio prefdyn/TRL (samples/s, steps 2..{args.steps}): {summary['ratio']:.3f}")
    print("per-step seconds prefdyn:", " ".join(f"{s:.2f}" for s in ours["step_s"]))
    print("per-step seconds TRL:    ", " ".join(f"{s:.2f}" for s in theirs["step_s"]))
    print("loss prefdyn:", " ".join(f"{x:.6f}" for x in ours["losses"][:summary["compared_steps"]]))
    print("loss TRL:    ", " ".join(f"{x:.6f}" for x in theirs["losses"][:summary["compared_steps"]]))
    verdict = "PASS" if summary["loss_agree"] else "FAIL"
    print(f"loss max |prefdyn - TRL| over the first {summary['compared_steps']} steps: "
          f"{summary['loss_max_abs_diff']:.3g} (tolerance {summary['tolerance']:g}) -> {verdict}")
    print(f"same initial weights: {summary['same_initial_weights']}; TRL's own tokenisation: identical on "
          f"{theirs['trl_tokenisation_identical_rows']}/{theirs['rows']} rows, identical but for an appended "
          f"{theirs['eos_token']!r} on chosen and rejected on {theirs['trl_tokenisation_eos_only_rows']}/"
          f"{theirs['rows']}; memory: {ours['memory_method']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=None, help="default 4 on cpu, 8 on cuda")
    parser.add_argument("--model", default="smollm2-135m", help="any prefdyn.llm.models.load_policy spec")
    parser.add_argument("--layers", type=int, default=None,
                        help="keep only the first N transformer blocks (0: all); default 2 on cpu, all on cuda")
    parser.add_argument("--pairs", default="persona,text", help="persona, text, or persona,text")
    parser.add_argument("--n-pairs", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.1, help="TRL's beta (for --loss ipo: IPO's tau)")
    parser.add_argument("--loss", choices=["dpo", "ipo"], default="dpo",
                        help="sigmoid DPO, or TRL's length-normalised IPO (prefdyn: loss='ipo', beta=1/tau, "
                             "length_normalised=True)")
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--worker", choices=["prefdyn", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 4 if args.device == "cpu" else 8
    if args.steps < 2 or args.batch < 1:
        parser.error("need --steps >= 2 (step 1 is the excluded warm-up) and --batch >= 1")
    if args.layers is None:
        args.layers = 2 if args.device == "cpu" else 0
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        worker(args)
        return 0

    import platform

    sys.stdout.reconfigure(line_buffering=True)  # progress shows up as it happens, even when redirected

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    began = time.perf_counter()
    machine = (torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine())
    print(f"prefdyn vs TRL DPO benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    results = []
    with tempfile.TemporaryDirectory(prefix="prefdyn_bench_model_") as folder:
        model_info = prepare_model(args, Path(folder))
        print(f"model {model_info['model']}: {model_info['blocks_kept']}/{model_info['blocks_total']} blocks, "
              f"{model_info['parameters'] / 1e6:.1f}M parameters, all trained")
        passthrough = ["--device", args.device, "--steps", str(args.steps), "--batch", str(args.batch),
                       "--n-pairs", str(args.n_pairs), "--beta", repr(args.beta), "--lr", repr(args.lr), "--loss", args.loss,
                       "--seed", str(args.seed), "--model-dir", folder, "--layers", str(args.layers)]
        for kind in [k.strip() for k in args.pairs.split(",") if k.strip()]:
            runs = {}
            for name in ("prefdyn", "trl"):  # one after the other, each in a fresh process
                out = Path(folder) / f"{kind}-{name}.json"
                subprocess.run([sys.executable, __file__, "--worker", name, "--pairs", kind, "--out", str(out),
                                *passthrough], check=True)
                runs[name] = json.loads(out.read_text())
            summary = compare(kind, runs["prefdyn"], runs["trl"], args)
            print_report(kind, runs["prefdyn"], runs["trl"], summary, args)
            results.append({**summary, "prefdyn": runs["prefdyn"], "trl": runs["trl"]})
    print(f"\ntotal wall-clock {time.perf_counter() - began:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "model": model_info, "machine": machine,
                                               "results": results}, indent=1))
    return 0 if all(r["loss_agree"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
