# `make demo` and `make test` create .venv and install the project by themselves; the install
# reruns only when pyproject.toml changes.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo-output

.PHONY: demo test lint bench clean

# pip's chatter is dropped and the packages it finds are counted, so that a first install (a few
# minutes) shows progress without a line per package; anything else pip says (errors) is shown.
# Unbuffered: through a pipe pip's lines would otherwise arrive in a few late bursts.
PIP_LINES := awk '/^(Collecting|Processing) /{n++; if (n % 20 == 0) print "  " n " packages found"; fflush(); next} \
	/^ *Downloading /{d++; if (d % 10 == 0) print "  " d " packages downloaded"; fflush(); next} \
	/^Installing collected packages/{print "  installing them (pip is silent for a minute or two)"; fflush(); next} \
	/^Successfully installed/{print "  installed"; next} \
	/is ignored: it is neither|^ *(Requirement already satisfied|Using cached|Obtaining|Looking in|Stored in directory|Created wheel|Successfully built|Building|Installing build dependencies|Checking if build backend|Getting requirements|Preparing|Downloading|Attempting uninstall|Found existing installation|Uninstalling|Successfully uninstalled)/{next} {print; fflush()}'

$(STAMP): pyproject.toml
	@echo "installing the project and its pinned dependencies into $(VENV) (once)"
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@echo '$(VENV)/bin/pip install -e ".[dev]"'
	@PYTHONUNBUFFERED=1 $(VENV)/bin/pip install --progress-bar off -e ".[dev]" 2>&1 | $(PIP_LINES)
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
