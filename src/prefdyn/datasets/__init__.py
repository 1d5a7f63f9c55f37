"""The data the book ships, with their loaders: the original persona evaluations of Perez et al.
(2022) (:mod:`~prefdyn.datasets.persona`, 75 behaviours of anthropics/evals, CC BY 4.0) and the
HH-RLHF harmless-base test split (:mod:`~prefdyn.datasets.demonstrations`, anthropics/hh-rlhf, MIT),
both packaged unchanged and checked against their manifests (:mod:`~prefdyn.datasets.packaged`);
and data written for the book: the prompts of chapter 4's on-policy runs
(:mod:`~prefdyn.datasets.prompts`), chapter 4's HelpSteer-like score tables and the loader for a
reader's own (:mod:`~prefdyn.datasets.scores`) and chapter 5's demonstration set
(:mod:`~prefdyn.datasets.demonstrations`)."""
