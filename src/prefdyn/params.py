"""Chapter parameters: validation of ``scale``, ``device`` and ``seed``, and seeding.

Every chapter's ``parameters`` cell has at least ``scale``, ``device``, ``seed`` and ``model``; the
first code cell after it calls :func:`prefdyn.experiments.start`, which runs :func:`setup`: it fails
fast, before any expensive work, with a message naming the bad value and the fix.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

SCALES = ("smoke", "ci", "full")
ALL_THREADS = torch.get_num_threads()   # the machine's intra-op threads, read before any chapter narrows them


class ParameterError(ValueError):
    """A chapter parameter has a bad value."""


@dataclass(frozen=True)
class Run:
    scale: str
    device: torch.device
    seed: int
    sizes: dict[str, Any]

    def __str__(self) -> str:
        """The one line a chapter prints about its run (the sizes in full; the dataclass repr stays for repr)."""
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        return f"scale {self.scale} on {self.device}, seed {self.seed}; sizes: {sizes}"


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for an absent accelerator is an error."""
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ParameterError(f"device={device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device={device!r} but this machine has no CUDA GPU; use device='cpu' (or 'auto')")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ParameterError(f"device={device!r} is not supported; use 'cpu', 'cuda' or 'auto'")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices); make GPU kernels deterministic where they can be."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def setup(scale: str, device: str, seed: int, sizes: dict[str, dict[str, Any]],
          validate: tuple[Callable[[], Any], ...] = ()) -> Run:
    """Validate the common parameters, seed everything and return the sizes for ``scale``.

    ``sizes`` maps each of ``smoke``, ``ci`` and ``full`` to that scale's settings: the same code
    runs at every scale, only these numbers change. Each of ``validate`` is called after the common
    parameters have been checked and before seeding (:func:`prefdyn.experiments.start` passes the
    model spec and data checks), so bad input raises here, in the chapter's first cell.
    """
    if scale not in SCALES:
        raise ParameterError(f"scale={scale!r} is not one of {', '.join(SCALES)}; "
                             "smoke takes seconds (tests), ci is the CPU book build, full is paper scale on a GPU")
    missing = [s for s in SCALES if s not in sizes]
    if missing:
        raise ParameterError(f"sizes has no entry for scale(s) {missing}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParameterError(f"seed={seed!r} must be a non-negative integer")
    for name, value in sizes[scale].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ParameterError(f"{name}={value!r} must not be negative")
    dev = resolve_device(device)
    for check in validate:
        check()
    seed_everything(seed)
    return Run(scale=scale, device=dev, seed=seed, sizes=dict(sizes[scale]))


def positive(name: str, value: Any, kind: type = int) -> Any:
    """Check a user-given size parameter (e.g. steps) is a positive number of the right kind."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)) \
            or value <= 0:
        raise ParameterError(f"{name}={value!r} must be a positive {kind.__name__}")
    return value


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block on ``n`` torch threads (``None``: :data:`ALL_THREADS`), then restore the count.

    The book's model-free mathematics is many small operations, fastest on one thread (chapters
    ask for it in :func:`prefdyn.experiments.start`); the drivers that run a transformer or large
    batched matrix products take every thread with ``torch_threads(None)``.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(n or ALL_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
