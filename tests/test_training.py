"""The training engine: batches, pre-tokenised pairs, and running under `accelerate launch`."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import restoring

from prefdyn.datasets.demonstrations import load_demonstrations
from prefdyn.llm import logps, models, train


def test_batches_are_seeded_permutations_epoch_after_epoch():
    lengths = torch.arange(10)
    batches = train.batch_indices(lengths, 4, seed=3)
    first = torch.cat([next(batches) for _ in range(5)])  # 20 indices: two whole epochs
    generator = torch.Generator().manual_seed(3)
    expected = torch.cat([torch.randperm(10, generator=generator) for _ in range(2)])
    assert torch.equal(first, expected)


def test_length_buckets_cover_each_epoch_and_group_similar_lengths():
    lengths = torch.randint(1, 200, (96,), generator=torch.Generator().manual_seed(0))
    batches = train.batch_indices(lengths, 8, seed=1, bucket=4)
    epoch = [next(batches) for _ in range(12)]  # 96 pairs = 3 runs of 4 batches of 8, nothing dropped
    assert sorted(torch.cat(epoch).tolist()) == list(range(96))
    spread = torch.tensor([float(lengths[b].max() - lengths[b].min()) for b in epoch]).mean()
    plain = train.batch_indices(lengths, 8, seed=1)
    plain_spread = torch.tensor([float(lengths[b].max() - lengths[b].min()) for b in
                                 (next(plain) for _ in range(12))]).mean()
    assert spread < 0.6 * plain_spread  # sorting within runs of 32 leaves far less padding
    assert not torch.equal(torch.cat(epoch), torch.cat([next(batches) for _ in range(12)]))  # a new order
    with pytest.raises(ValueError, match="cannot fill a batch"):
        next(train.batch_indices(torch.arange(3), 4, seed=0, bucket=2))


@pytest.mark.slow
def test_encoded_pairs_slice_to_the_same_log_probs(smol):
    tok = smol.tokenizer
    prompts = [models.chat_prompt(tok, q) for q in ("Do you like music?", "Is fire cold, or is it hot?", "Why?")]
    chosen, rejected = ["Yes, a lot.", "Hot.", "Because it is so."], ["No", "Cold, very cold indeed.", "No idea"]
    encoded = logps.EncodedPairs.of(tok, prompts, chosen, rejected)
    n = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
    assert encoded.sequences is not None and encoded.lengths.tolist() == [
        n(p) + max(n(c), n(r)) for p, c, r in zip(prompts, chosen, rejected)]
    with torch.no_grad():
        w, l = encoded.logps(smol.model, torch.tensor([2, 0]), "cpu")
        assert torch.allclose(w, logps.response_logps(smol, [prompts[2], prompts[0]], [chosen[2], chosen[0]]),
                              atol=1e-4)
        assert torch.allclose(l, logps.response_logps(smol, [prompts[2], prompts[0]], [rejected[2], rejected[0]]),
                              atol=1e-4)
    yes_no = logps.EncodedPairs.of(tok, prompts, ["Yes"] * 3, ["No"] * 3)
    assert yes_no.sequences is None and yes_no.answers.shape == (3, 2)
    with torch.no_grad():
        w, _ = yes_no.logps(smol.model, torch.tensor([1]), "cpu")
    assert torch.allclose(w, logps.response_logps(smol, prompts[1:2], ["Yes"]), atol=1e-4)


@pytest.mark.slow
def test_train_runs_unchanged_under_accelerate_launch(tmp_path):
    """One process under `accelerate launch` gives the losses of a plain `prefdyn train`."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate's launcher is missing from the environment"
    args = ["train", "--steps", "2", "--batch", "4", "--behaviours", "narcissism", "--per-behaviour", "12",
            "--lr", "5e-5", "--device", "cpu"]
    plain = subprocess.run([sys.executable, "-m", "prefdyn", *args, "--out", str(tmp_path / "plain.json")],
                           capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    launched = subprocess.run([accelerate, "launch", "--num_processes", "1", "--num_machines", "1", "--cpu",
                               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "prefdyn", *args,
                               "--out", str(tmp_path / "launched.json")],
                              capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "launched"))
    losses = [[r["loss"] for r in run["history"] if "loss" in r] for run in (a, b)]
    assert len(losses[0]) == 2 and losses[0][1] != losses[0][0]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert a["held_out_after"] == pytest.approx(b["held_out_after"], abs=1e-6)
    bad = subprocess.run([sys.executable, "-m", "prefdyn", "train", "--steps", "1", "--model", "gpt-17"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "is not a known name" in bad.stderr


def test_forward_precision_is_bf16_autocast_on_a_gpu_and_fp32_elsewhere():
    import contextlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # on a machine without CUDA, torch warns it will disable it
        gpu = train.forward_precision(torch.device("cuda"))
    assert isinstance(gpu, torch.autocast) and gpu.device == "cuda" and gpu.fast_dtype == torch.bfloat16
    cpu = train.forward_precision(torch.device("cpu"))
    assert isinstance(cpu, contextlib.nullcontext)
    with cpu:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.slow
def test_length_normalised_logps_and_a_short_sft_run_on_the_real_model(smol, monkeypatch):
    entered = []

    class Recording:                                # stands in for the autocast context of a GPU
        def __enter__(self):
            entered.append(torch.is_grad_enabled())

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(train, "forward_precision", lambda device: Recording())

    tok = smol.tokenizer
    demos = load_demonstrations()[:4]
    prompts = [models.chat_prompt(tok, d.prompt) for d in demos]
    completions = [d.completion + tok.eos_token for d in demos]
    mean = logps.response_logps(smol, prompts, completions, length_normalised=True)
    total = logps.response_logps(smol, prompts, completions)
    n_tokens = torch.tensor([len(tok.encode(c, add_special_tokens=False)) for c in completions])
    assert torch.allclose(mean, total / n_tokens, atol=1e-5) and not torch.allclose(mean, total)
    with restoring(smol.model):
        train.train_only_top_blocks(smol.model, 1)
        losses = train.train_sft(smol, prompts, completions, steps=4, batch_size=4, lr=3e-4, seed=0)
        assert len(losses) == 4 and losses[-1] < losses[0]
        assert losses[0] == pytest.approx(-mean.mean().item(), abs=1e-5)   # the first batch is the whole set
        assert entered == [True] * 4                # every training forward runs in the training precision
        assert -logps.response_logps(smol, prompts, completions, length_normalised=True).mean() < -mean.mean()


def test_kept_weights_restores_every_weight_and_buffer_after_training():
    from prefdyn.llm.models import kept_weights

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with kept_weights(model):
        model.train()
        model[0].weight.requires_grad_(False)
        model(torch.randn(8, 3)).sum().backward()          # BatchNorm's running statistics move
        with torch.no_grad():
            model[0].bias.add_(1.0)
        assert not torch.equal(model[0].bias, before["0.bias"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_running_chapters_share_the_machines_threads(tmp_path, monkeypatch):
    import subprocess
    import sys

    from prefdyn import params

    monkeypatch.setenv("PREFDYN_CACHE", str(tmp_path))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (params.running_dir()).mkdir(parents=True)
        (params.running_dir() / str(sleeper.pid)).touch()        # another chapter is running
        (params.running_dir() / "999999999").touch()             # one that ended without cleaning up
        share = params.claim_threads()
        assert share == max(1, params.ALL_THREADS // 2) and params.run_threads() == share
        assert sorted(p.name for p in params.running_dir().iterdir()) == sorted([str(sleeper.pid), str(os.getpid())])
        with params.torch_threads(None):
            assert torch.get_num_threads() == share
    finally:
        sleeper.kill()
        monkeypatch.setattr(params, "_share", params.ALL_THREADS)


def test_start_carries_the_model_and_the_data_it_validated(tmp_path, monkeypatch):
    from prefdyn import experiments, params
    from prefdyn.llm import models

    monkeypatch.setenv("PREFDYN_CACHE", str(tmp_path))
    monkeypatch.delenv("PREFDYN_CHAPTER", raising=False)
    monkeypatch.chdir(tmp_path)
    loads = []
    monkeypatch.setattr(experiments, "load_policy", lambda spec, device: loads.append((spec, device)) or object())
    sizes = {s: {"n": 3} for s in params.SCALES}
    run, _ = experiments.start("smoke", "cpu", 0, sizes, model="smollm2-135m", data=lambda r: [r.seed] * r.sizes["n"])
    assert run.model == "smollm2-135m" and run.data == [0, 0, 0]
    assert run.load_policy() is run.load_policy() and loads == [("smollm2-135m", torch.device("cpu"))]
    with pytest.raises(models.ModelSpecError, match="not a known name"):
        experiments.start("smoke", "cpu", 0, sizes, model="no-such-model")
    bare, _ = experiments.start("smoke", "cpu", 0, sizes)
    with pytest.raises(params.ParameterError, match="pass model="):
        bare.load_policy()
    monkeypatch.setattr(params, "_share", params.ALL_THREADS)


def test_a_preference_config_is_checked_when_made():
    from prefdyn.llm.train import PreferenceConfig

    assert PreferenceConfig(10, 4, 1e-5).loss == "dpo"
    for bad, match in ((dict(loss="kto"), "loss='kto'"), (dict(beta=0.0), "beta"), (dict(steps=-1), "steps >= 0"),
                       (dict(batch_size=0), "batch_size > 0"), (dict(bucket=0), "bucket >= 1")):
        with pytest.raises(ValueError, match=match):
            PreferenceConfig(**{"steps": 10, "batch_size": 4, "lr": 1e-5, **bad})
