# parity: `make parity` runs the gate on the bundled example, `make test` the whole suite (and builds
# the docs with --strict), `make docs` the documentation site into site/.
# Both create .venv and install the project on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# A CUDA build of torch: the same venv runs on CPU-only machines and GPU machines.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# The bundled examples: timm CLIP + multi-label DNN, transformers CLIPVisionModel + MLP classifier.
SPECS  ?= specs/clip_dnn.toml specs/clip_mlp.toml
PYTEST_ARGS ?=

.PHONY: install parity test docs fixtures bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,fixtures,hf,open-clip,onnx,service,ray,docs,mlflow,oip,gradio,deploy,bench]'
	touch $(STAMP)

install: $(STAMP)

parity: $(STAMP)
	@status=0; for spec in $(SPECS); do $(BIN)/parity check --spec $$spec || status=$$?; done; exit $$status

# The suite must cover the optional libraries: a missing extra is an error here, not a skip.
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	PARITY_REQUIRE_EXTRAS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)
	site=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $$site; \
		status=$$?; rm -rf $$site; exit $$status

# The documentation site (mkdocs.yml, docs/) into site/; the spec reference page is generated from the parser.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Rebuild the frozen reference data from reference/. Refuses to overwrite unless FORCE=1.
fixtures: $(STAMP)
	$(BIN)/python -m reference.build_fixtures $(if $(filter 1 yes true,$(FORCE)),--force)
	$(BIN)/python -m reference.build_clip_mlp $(if $(filter 1 yes true,$(FORCE)),--force)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info site

# Report rendering time for 3,000 samples (budget 5 s), then speed ratios on the full-size
# ViT-L/14@336 (random init); BENCH_IMAGES=2 for a quicker run. The scaling section (wall time
# and peak RSS at 100, 1,000 and 3,000 samples, fixed cost, full-size projection) takes about
# half an hour on 2 cores; BENCH_QUICK=1 runs it at 20, 100 and 300 samples. bench_choose: one
# `parity choose` on the bundled example vs its cells' own measured time plus one model load (<= 1.15x).
BENCH_IMAGES ?= 4
bench: $(STAMP)
	$(BIN)/python bench/bench_reports.py
	$(BIN)/python bench/bench_matrix.py --images $(BENCH_IMAGES)
	$(BIN)/python bench/bench_choose.py
	$(BIN)/python bench/bench_app.py
	$(BIN)/python bench/bench_served.py
	$(BIN)/python bench/bench_diagnose.py
	BENCH_IMAGES=$(BENCH_IMAGES) $(BIN)/python bench/bench_scaling.py
	$(BIN)/python bench/bench_onnx.py
