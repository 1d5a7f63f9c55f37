"""The language-model machinery: from a spec to a loaded policy (:mod:`~prefdyn.llm.models`),
tokenising (:mod:`~prefdyn.llm.tokens`), hidden-state features and their caches
(:mod:`~prefdyn.llm.features`), the one log-probability scorer (:mod:`~prefdyn.llm.logps`),
sampling (:mod:`~prefdyn.llm.sampling`) and the one training loop (:mod:`~prefdyn.llm.train`)."""
