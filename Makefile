# Two commands on a fresh clone: `make digits` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: digits test clean

# pip takes torch/torchvision from this machine's local wheel store (capped at 2.14.1/0.29.1).
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

digits: $(STAMP)
	$(PY) -m training digits --all

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
