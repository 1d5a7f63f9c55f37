"""Chapter parameters: validation of ``scale``, ``device`` and ``seed``, and seeding.

Every chapter's ``parameters`` cell has at least ``scale``, ``device``, ``seed`` and ``model``; the
first code cell after it calls :func:`prefdyn.experiments.start`, which runs :func:`setup`: it fails
fast, before any expensive work, with a message naming the bad value and the fix.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

SCALES = ("smoke", "ci", "full")
ALL_THREADS = torch.get_num_threads()   # the machine's intra-op threads, read before any chapter narrows them
_share = ALL_THREADS                    # this process's share of them (claim_threads); all, outside a chapter


class ParameterError(ValueError):
    """A chapter parameter has a bad value."""


@dataclass(frozen=True)
class Run:
    """What a chapter's first cell validated, carried to every later cell: its scale and sizes, device
    and seed, the model spec (resolved once) and the data it loaded."""

    scale: str
    device: torch.device
    seed: int
    sizes: dict[str, Any]
    model: str | None = None
    data: Any = field(default=None, repr=False, compare=False)
    policy_loader: Callable[[], Any] | None = field(default=None, repr=False, compare=False)

    def load_policy(self):
        """The run's model on the run's device, loaded once per process (later calls return the same
        policy: keep and restore its weights with :func:`prefdyn.llm.models.kept_weights`)."""
        if self.policy_loader is None:
            raise ParameterError("this run has no model: pass model=... to prefdyn.experiments.start")
        return self.policy_loader()

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
          validate: tuple[Callable[[], Any], ...] = (), **carried) -> Run:
    """Validate the common parameters, seed everything and return the sizes for ``scale``.

    ``sizes`` maps each of ``smoke``, ``ci`` and ``full`` to that scale's settings: the same code
    runs at every scale, only these numbers change. Each of ``validate`` is called after the common
    parameters have been checked and before seeding (:func:`prefdyn.experiments.start` passes the
    model spec and data checks), so bad input raises here, in the chapter's first cell. ``carried``
    (``model``, ``data``, ``policy_loader``) travels on the :class:`Run`.
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
    return Run(scale=scale, device=dev, seed=seed, sizes=dict(sizes[scale]), **carried)


def positive(name: str, value: Any, kind: type = int) -> Any:
    """Check a user-given size parameter (e.g. steps) is a positive number of the right kind."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)) \
            or value <= 0:
        raise ParameterError(f"{name}={value!r} must be a positive {kind.__name__}")
    return value


def running_dir() -> Path:
    """Where running chapters leave a file named by their process id (``$PREFDYN_CACHE/running``)."""
    return Path(os.environ.get("PREFDYN_CACHE") or Path.home() / ".cache" / "prefdyn") / "running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_threads() -> int:
    """The one thread policy: a chapter's process registers itself as running and takes an equal
    share of the machine's threads, ``ALL_THREADS // (chapters running now)``, at least one. Two
    chapters built at once on a 2-core machine then run on one thread each instead of four threads
    fighting over two cores (OpenMP threads that outnumber the cores spin and wait for each other).
    Files of processes that ended are removed; this one's is removed at exit. Returns the share,
    which :func:`torch_threads` gives the drivers that want "every thread"."""
    global _share
    import atexit

    folder = running_dir()
    folder.mkdir(parents=True, exist_ok=True)
    mine = folder / str(os.getpid())
    mine.touch()
    atexit.register(mine.unlink, missing_ok=True)
    running = 0
    for entry in folder.iterdir():
        if entry.name.isdigit() and _alive(int(entry.name)):
            running += 1
        elif entry.name.isdigit():
            entry.unlink(missing_ok=True)
    _share = max(1, ALL_THREADS // max(1, running))
    return _share


def run_threads() -> int:
    """The threads this process may use: its share once a chapter claimed it, else all of them."""
    return _share


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block on ``n`` torch threads (``None``: this process's share, :func:`run_threads`), then
    restore the count.

    The book's model-free mathematics is many small operations, fastest on one thread (chapters
    ask for it in :func:`prefdyn.experiments.start`); the drivers that run a transformer or large
    batched matrix products take the run's share with ``torch_threads(None)``.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(n or run_threads())
    try:
        yield
    finally:
        torch.set_num_threads(saved)
