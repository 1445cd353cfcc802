# Set-up and the commands README names. Everything installs into $(VENV).
VENV ?= .venv
PYTHON ?= python3
# A CPU build is enough for the demo and the tests; on a GPU machine set TORCH_SPEC to
# the CUDA build you want (pip install happens when the venv is made or pyproject.toml
# changes). torch and the project are installed in one pip call, so the resolver keeps this
# torch: a requirement that wants another one fails loudly instead of swapping it.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/caat-sweep
FMNIST_DEB_DIR := /usr/share/datasets/fashion-mnist

# The sweep `make analyze` and `make ui-screenshot` read, and where they write.
SWEEP ?= quick
# $MLFLOW_TRACKING_URI when set, like every caat-sweep command.
TRACKING_URI ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///mlflow.db)
ANALYSIS_DIR ?= runs/analysis/$(SWEEP)

.PHONY: setup check-torch data browser plugin demo sweep-demo train-demo analyze ui-screenshot test test-fast lint clean

setup: $(VENV)/.installed data

# torchattacks: a second AutoAttack implementation, for one slow cross-check test only;
# without its dependencies, since it pins requests~=2.25.1 (which MLflow's cannot share) and
# needs nothing beyond torch.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps torchattacks==3.5.1
	touch $@

# The installed torch is the one TORCH_SPEC names, and a CPU build on a machine without a GPU.
check-torch: $(VENV)/.installed
	$(PY) scripts/check_torch.py "$(TORCH_SPEC)"

# Fashion-MNIST from Debian where we can install packages; elsewhere point CAAT_DATA_DIR
# at the four .gz files, or install the `download` extra (torchvision) to fetch it.
data:
	@if [ -f $(FMNIST_DEB_DIR)/train-images-idx3-ubyte.gz ] || [ -n "$$CAAT_DATA_DIR" ]; then \
	  echo "Fashion-MNIST: present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	  echo "Fashion-MNIST: installed from Debian"; \
	else \
	  echo "Fashion-MNIST: not found; set CAAT_DATA_DIR to its .gz files, or pip install -e '.[download]' to fetch it"; \
	fi

# Headless Chromium for the MLflow UI test and README's screenshot (Debian's package, where
# we can install packages; elsewhere the UI test is skipped with a reason).
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then \
	  echo "Chromium: present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; \
	  echo "Chromium: installed from Debian"; \
	else \
	  echo "Chromium: not installed (the MLflow UI test will be skipped)"; \
	fi

# The main job: the quick sweep of search_spaces/quick.yaml (Fashion-MNIST subset, a noise
# and an imbalance scenario, ERM / PGD-AT / TRADES / CAAT; about 7 minutes on 2 cores),
# then its tables and plots in $(ANALYSIS_DIR).
demo: sweep-demo
	$(MAKE) --no-print-directory analyze SWEEP=quick

# Launch the quick sweep, or continue it when an earlier `make demo` was interrupted
# (a finished one is left as it is).
sweep-demo: setup
	@if [ -f runs/quick/sweep.json ]; then $(CLI) resume quick; \
	else $(CLI) launch search_spaces/quick.yaml --name quick; fi

# One trial with the default config (Fashion-MNIST, small_cnn, TRADES).
train-demo: setup
	$(CLI) train --out runs/train-demo

# Tables and plots of sweep $(SWEEP) from the MLflow store: summary.{csv,md,tex,html}, PNGs.
analyze: setup
	$(CLI) analyze $(SWEEP) --out $(ANALYSIS_DIR) --tracking-uri $(TRACKING_URI)

# README's screenshot of the sweep's runs in the MLflow UI.
ui-screenshot: setup browser
	$(PY) scripts/ui_screenshot.py $(SWEEP) --tracking-uri $(TRACKING_URI) \
	  --png docs/mlflow-runs-$(SWEEP).png

# The example plugin (examples/plugin): the tests sweep it through Ray workers. --no-deps:
# it needs only caat-sweeper, installed already, and must not let pip touch torch.
plugin: $(VENV)/.plugin-installed

$(VENV)/.plugin-installed: examples/plugin/pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps -e examples/plugin
	touch $@

test: setup browser plugin
	bash .ci/pytest.sh -m "slow or not slow"

test-fast: setup plugin
	bash .ci/pytest.sh

lint: setup
	$(VENV)/bin/ruff check trainables sweeper tests benchmarks scripts

clean:
	rm -rf runs .pytest_cache
