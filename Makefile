# parity: `make parity` runs the gate on the bundled example, `make test` the whole suite.
# Both create .venv and install the project on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# A CUDA build of torch: the same venv runs on CPU-only machines and GPU machines.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
SPEC   ?= specs/clip_dnn.toml
PYTEST_ARGS ?=

.PHONY: install parity test fixtures bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,fixtures]'
	touch $(STAMP)

install: $(STAMP)

parity: $(STAMP)
	$(BIN)/parity check --spec $(SPEC)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Rebuild the frozen reference data from reference/. Refuses to overwrite unless FORCE=1.
fixtures: $(STAMP)
	$(BIN)/python -m reference.build_fixtures $(if $(filter 1 yes true,$(FORCE)),--force)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info

# Speed ratios on the full-size ViT-L/14@336 (random init); BENCH_IMAGES=2 for a quicker run.
BENCH_IMAGES ?= 4
bench: $(STAMP)
	$(BIN)/python bench/bench_matrix.py --images $(BENCH_IMAGES)
