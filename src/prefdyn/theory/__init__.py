"""The mathematics of the papers, one module per chapter after the first: numpy and torch only,
never transformers or :mod:`prefdyn.llm` (a test enforces it). :mod:`~prefdyn.theory.dynamics`
(Im & Li 2024), :mod:`~prefdyn.theory.generalization` (Im & Li 2408.03459),
:mod:`~prefdyn.theory.iterative` (Chen, He, Jordan & Yao 2602.12180) and
:mod:`~prefdyn.theory.demonstrations` (Sun & van der Schaar 2405.15624)."""
