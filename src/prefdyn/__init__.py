"""prefdyn: the library behind an executable book on the theory of preference alignment.

Three layers, dependencies flowing one way (``tests/test_layers.py`` enforces it):

* **mathematics**, pure functions of tensors: :mod:`~prefdyn.objectives` (DPO, IPO, SFT losses),
  :mod:`~prefdyn.tabular` (exact finite-response-set solutions), :mod:`~prefdyn.stats`, and
  :mod:`prefdyn.theory`, one module per paper (:mod:`~prefdyn.theory.dynamics`,
  :mod:`~prefdyn.theory.generalization`, :mod:`~prefdyn.theory.iterative`,
  :mod:`~prefdyn.theory.demonstrations`): numpy and torch only, never transformers;
* **language models**, :mod:`prefdyn.llm`: a spec to a loaded policy (:mod:`~prefdyn.llm.models`),
  tokenising (:mod:`~prefdyn.llm.tokens`), hidden-state features (:mod:`~prefdyn.llm.features`), the
  one log-probability scorer (:mod:`~prefdyn.llm.logps`), sampling (:mod:`~prefdyn.llm.sampling`)
  and the one training loop (:mod:`~prefdyn.llm.train`); with the shipped data and its loaders,
  :mod:`prefdyn.datasets`;
* **experiments and the book**: :mod:`prefdyn.experiments` (the drivers each chapter calls, one
  module per chapter), :mod:`prefdyn.book` (run records, verification tables, glue, papermill
  execution, the report and the HTML build), :mod:`~prefdyn.params` (scale, device, seed),
  :mod:`~prefdyn.store` (atomic writes, caches) and :mod:`~prefdyn.cli`.

theory ← llm ← experiments ← chapters; :mod:`prefdyn.book.runs` ← verify, execute, report, build.
"""
__version__ = "0.1.0"
