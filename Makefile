# Two commands on a fresh clone: `make serve` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve digits test chromium clean

# pip takes torch/torchvision from this machine's local wheel store (capped at 2.14.1/0.29.1).
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# The service on the committed digits models (ONNX Runtime; GPU when usable).
serve: $(STAMP)
	$(PY) -m serving --exports exports --host $(HOST) --port $(PORT)

# Retrain the four digits models + k-NN and print the comparison table.
digits: $(STAMP)
	$(PY) -m training digits --all

# The browser test drives Debian's Chromium (Playwright cannot download a browser here).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: $(STAMP) chromium
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
