"""The data the book ships, written for it, with their loaders: persona statements
(:mod:`~prefdyn.datasets.persona`, the format of anthropics/evals), the prompts of chapter 4's
on-policy runs (:mod:`~prefdyn.datasets.prompts`), chapter 4's HelpSteer-like score tables and the
loader for a reader's own (:mod:`~prefdyn.datasets.scores`) and chapter 5's demonstrations
(:mod:`~prefdyn.datasets.demonstrations`)."""
