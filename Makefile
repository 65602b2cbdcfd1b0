# `make demo` and `make test` create .venv and install the project by themselves; the install
# reruns only when pyproject.toml changes.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo-output

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	# pip's notes about absent local mirror folders are noise; real errors still fail the build.
	$(VENV)/bin/pip install --quiet -e ".[dev]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	touch $(STAMP)

# The main job on the generated scene: prepare, train (2 Ray Train workers), evaluate, report,
# then segment the scene's whole raster into a georeferenced map.
# Re-running resumes the finished run instead of retraining; `make clean` starts over.
demo: $(DEMO_DIR)/synthetic/shards/manifest.json
	$(VENV)/bin/iid train --config configs/demo.yaml
	$(VENV)/bin/iid evaluate --model models:/demo/latest --data $(DEMO_DIR)/synthetic/shards
	$(VENV)/bin/iid segment --model models:/demo/latest --src $(DEMO_DIR)/synthetic/raw/2_Ortho_RGB \
		--out $(DEMO_DIR)/segmented

# The generated scene, prepared once (the manifest is written last: its presence means done).
$(DEMO_DIR)/synthetic/shards/manifest.json: | $(STAMP)
	$(VENV)/bin/iid prepare synthetic $(DEMO_DIR)/synthetic --overwrite

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/python -m pytest -q --durations=15

bench: $(STAMP)
	$(VENV)/bin/python bench/loss.py
	$(VENV)/bin/python bench/prepare.py
	$(VENV)/bin/python bench/pairs.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) mlflow.db mlruns .pytest_cache .ruff_cache
