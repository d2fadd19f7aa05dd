# syntax=docker/dockerfile:1
# digitserve images. Targets:
#   serve (default)  python -m serving on the baked-in exports/; ONNX Runtime with its CUDA provider
#   train            python -m training on CUDA (torch + torchvision)
#
#   docker build -t digitserve .                                   # serving, ONNX Runtime (GPU-capable)
#   docker build -t digitserve:ts --build-arg WITH_TORCH=true .    # + torch for --backend torchscript
#   docker build -t digitserve-train --target train .
#
# CUDA and cuDNN come from NVIDIA's pip-packaged libraries (onnxruntime-gpu[cuda,cudnn]), not from
# a CUDA base image: they hold only the libraries ONNX Runtime loads, version-matched to it by pip,
# on a slim Python base (one Python, no second OS layer of CUDA tools). The host needs only the
# NVIDIA driver and the NVIDIA container toolkit (`docker run --gpus all`). Without a GPU the same
# image serves on the CPU.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment holding the project and the serving dependencies ---
FROM ${PYTHON_IMAGE} AS build
ARG ORT_VERSION=1.31.1
ARG WITH_TORCH=false
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY export_contract ./export_contract
COPY serving ./serving
COPY training ./training
# The [gpu] extra, pinned: ONNX Runtime with its CUDA provider.
RUN pip install . "onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}" \
 && if [ "${WITH_TORCH}" = "true" ]; then pip install "torch>=2.4,<2.15"; fi

# --- serve: the service, as a non-root user ---
FROM ${PYTHON_IMAGE} AS serve
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
COPY --chown=app:app exports /app/exports
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DIGITSERVE_HOST=0.0.0.0 \
    DIGITSERVE_PORT=8000 \
    DIGITSERVE_EXPORTS=/app/exports
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
CMD ["python", "-m", "serving"]

# --- train: the training script on CUDA (torch's CUDA wheels carry their own CUDA libraries) ---
FROM ${PYTHON_IMAGE} AS train
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app
WORKDIR /app
COPY pyproject.toml README.md ./
COPY export_contract ./export_contract
COPY serving ./serving
COPY training ./training
RUN python -m venv /opt/venv && /opt/venv/bin/pip install ".[train,gpu]" && chown app:app /app
ENV PATH=/opt/venv/bin:$PATH
USER 10001
ENTRYPOINT ["python", "-m", "training"]
CMD ["--help"]

# The last stage is the default target: the serving image.
FROM serve
