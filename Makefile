# Two commands on a fresh clone: `make serve` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
HOST ?= 127.0.0.1
PORT ?= 8000
# ONNX Runtime's GPU build where NVIDIA's driver reports a GPU, its CPU build elsewhere (pyproject's extras).
ORT ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: serve digits test chromium clean

# The service alone: no torch, no test tools.
$(VENV)/.serve: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) -e '.[$(ORT)]'
	touch $@

# Training and the tests on top. pip takes torch/torchvision from this machine's local wheel store
# (capped at 2.14.1/0.29.1).
$(VENV)/.dev: $(VENV)/.serve
	$(PIP) -e '.[dev,$(ORT)]'
	touch $@

# The service on the committed models (ONNX Runtime; on the GPU when there is one).
serve: $(VENV)/.serve
	$(PY) -m serving --exports exports --host $(HOST) --port $(PORT)

# Retrain the four digits models + k-NN and print the comparison table.
digits: $(VENV)/.dev
	$(PY) -m training digits --all

# The browser test drives Debian's Chromium (Playwright cannot download a browser here).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: $(VENV)/.dev chromium
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
