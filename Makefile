# Two commands on a fresh clone: `make serve` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
HOST ?= 127.0.0.1
PORT ?= 8000
# ONNX Runtime's GPU build where NVIDIA's driver reports a GPU, its CPU build elsewhere (pyproject's extras).
ORT ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: serve digits test test-long chromium clean image image-test

# The service alone: no torch, no test tools.
$(VENV)/.serve: pyproject.toml
	@echo "make: installing what serving needs into $(VENV) (ONNX Runtime's $(ORT) build; about a minute)"
	python3 -m venv $(VENV)
	$(PIP) -e '.[$(ORT)]'
	touch $@

# Training and the tests on top. pip takes torch/torchvision from this machine's local wheel store
# (capped at 2.14.1/0.29.1).
$(VENV)/.dev: $(VENV)/.serve
	@echo "make: installing training and the test tools (torch with its CUDA libraries: about 6 GB, minutes)"
	$(PIP) -e '.[dev,$(ORT)]'
	touch $@

# The service on the committed models (ONNX Runtime; on the GPU when there is one).
serve: $(VENV)/.serve
	$(PY) -m serving --exports exports --host $(HOST) --port $(PORT)

# Retrain the five digits architectures + k-NN and print the comparison table.
digits: $(VENV)/.dev
	$(PY) -m training digits --all

# The browser test drives Debian's Chromium (Playwright cannot download a browser here).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: $(VENV)/.dev chromium
	$(PY) -m pytest -q

# What `make test` leaves out for time: the bench scripts' tiny runs, the GPU scripts' dry runs and the
# end-to-end checks that repeat what faster tests pin (pytest's `long` mark; about 4 minutes here).
test-long: $(VENV)/.dev chromium
	$(PY) -m pytest -q -m long

clean:
	rm -rf $(VENV) runs .pytest_cache

# The serving image: `make image` (GPU-capable, CUDA 13 + cuDNN 9) or `make image DEVICE=cpu` (no
# NVIDIA libraries). With docker where a Docker engine answers, otherwise with buildah through
# ../shared/container/make-base.sh (a local stand-in for the base image; chroot isolation).
# PYTHON_IMAGE, PIP_INDEX_URL, PIP_EXTRA_INDEX_URL and PIP_TRUSTED_HOST, from the command line or the
# environment, are passed on as build arguments (a mirror's base image, a package index mirror);
# BUILD_ARGS adds any other (e.g. BUILD_ARGS='--build-arg WITH_TORCH=true').
IMAGE ?= digitserve
DEVICE ?= gpu
TAG ?= $(if $(filter cpu,$(DEVICE)),cpu,latest)
BUILD_ARGS ?=
CONTAINER_SH ?= ../shared/container/make-base.sh
IMAGE_ARGS = $(strip --build-arg DEVICE=$(DEVICE) $(foreach v,PYTHON_IMAGE PIP_INDEX_URL PIP_EXTRA_INDEX_URL \
	PIP_TRUSTED_HOST,$(if $($(v)),--build-arg $(v)='$($(v))')) $(BUILD_ARGS))

image:
	@if docker info >/dev/null 2>&1; then \
	  echo "docker build -t $(IMAGE):$(TAG) $(IMAGE_ARGS) ."; \
	  docker build -t $(IMAGE):$(TAG) $(IMAGE_ARGS) . ; \
	elif [ -x $(CONTAINER_SH) ]; then \
	  echo "$(CONTAINER_SH) build --layers -t $(IMAGE):$(TAG) $(IMAGE_ARGS)"; \
	  $(CONTAINER_SH) build --layers -t $(IMAGE):$(TAG) $(IMAGE_ARGS); \
	else \
	  echo "make image: no Docker engine answers and there is no $(CONTAINER_SH)" >&2; exit 1; \
	fi

# Builds the images (IMAGE_VARIANTS) and runs each: readiness, a prediction from every model in
# exports/, /metrics, UID 10001 that cannot write its code, exports mounted read-only from the host,
# SIGTERM. Not part of `make test`: tests/conftest.py skips them unless -m selects the container marker.
IMAGE_VARIANTS ?= cpu gpu
image-test: $(VENV)/.dev
	DIGITSERVE_IMAGE=$(IMAGE) DIGITSERVE_IMAGE_VARIANTS='$(IMAGE_VARIANTS)' \
	  $(PY) -m pytest -q -p no:cacheprovider -m container tests/deploy/test_container.py
