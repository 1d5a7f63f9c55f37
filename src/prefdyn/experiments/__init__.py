"""The experiments the chapters run: one module per chapter (``chNN``) with the drivers its cells
call, unit-tested without papermill, and :func:`start`, the first call of every chapter.

Dependencies run one way: :mod:`prefdyn.theory` ← :mod:`prefdyn.llm` ← these ← the chapters.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import numpy as np
import torch

from ..book.figures import use_book_style
from ..book.verify import Verification
from ..datasets.persona import load_persona
from ..llm.models import load_policy, resolve_spec
from ..params import Run, claim_threads, setup


def start(scale: str, device: str, seed: int, sizes: dict[str, dict[str, Any]], *, model: str | None = None,
          data: Callable[[Run], Any] | None = None, persona: tuple[Any, Any] | None = None, validate: tuple = (),
          threads: int | None = None) -> tuple[Run, Verification]:
    """Open a chapter: validate its parameters, seed everything, and return its :class:`~prefdyn.params.Run`
    (the sizes of ``scale``) and an empty :class:`~prefdyn.book.verify.Verification` for its id, with
    the chapter's registered claims and predictions read (``chapters/claims/<id>.yml``) before any data.

    ``model`` (a model spec) is resolved without loading it (unknown names, missing files or
    packages, files that are not GGUF, a packaged file whose checksum is wrong) and travels on the run:
    ``run.model`` and ``run.load_policy()``. ``data`` is called with the run (its sizes and seed) and
    its result, the chapter's loaded data, travels as ``run.data``; ``persona=(data_dir, behaviours)``
    only checks that the persona data parse. Each of ``validate`` (a callable of no argument; the one
    way a chapter declares its own parameter checks) is called too. All raise here, in the chapter's
    first cell, rather than after minutes of work.
    ``threads`` is the number of torch threads the chapter's mathematics runs on (``None``: the run's
    share of the machine, :func:`prefdyn.params.claim_threads`, which also caps it); drivers that need
    every thread take the share with :func:`prefdyn.params.torch_threads`. NumPy prints
    scalars as plain numbers (``0.5``, not ``np.float64(0.5)``) in the chapter's outputs, and
    matplotlib draws with the book's figure style (:mod:`prefdyn.book.figures`).
    """
    checks = ((lambda: resolve_spec(model),) if model is not None else ()) + \
        ((lambda: load_persona(*persona),) if persona is not None else ()) + tuple(validate)
    run = setup(scale, device, seed, sizes, validate=checks, model=model)
    loader = functools.lru_cache(maxsize=1)(lambda: load_policy(model, run.device)) if model is not None else None
    run = dataclasses.replace(run, policy_loader=loader)
    if data is not None:
        run = dataclasses.replace(run, data=data(run))
    share = claim_threads()
    torch.set_num_threads(min(threads, share) if threads else share)
    np.set_printoptions(legacy="1.25")  # a printed number reads 0.5, not np.float64(0.5)
    use_book_style()
    return run, Verification(scale=run.scale)
