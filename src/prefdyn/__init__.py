"""prefdyn: the library behind an executable book on the theory of preference alignment.

One module per concern: :mod:`~prefdyn.models` (load a policy, score responses, embeddings),
:mod:`~prefdyn.data` (persona preference data), :mod:`~prefdyn.objectives` (DPO, IPO, SFT),
:mod:`~prefdyn.tabular` (exact finite-response-set solutions), :mod:`~prefdyn.training`,
:mod:`~prefdyn.checks` (verification tables), :mod:`~prefdyn.params` (scale/device/seed),
:mod:`~prefdyn.pipeline` and :mod:`~prefdyn.cli` (papermill execution and the book build).
"""
__version__ = "0.1.0"
