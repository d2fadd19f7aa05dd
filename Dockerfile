# syntax=docker/dockerfile:1
# digitserve images. Targets:
#   serve (default)  python -m serving on the baked-in exports/ (ONNX Runtime; DEVICE=gpu or cpu)
#   train            python -m training on CUDA (torch + torchvision)
#
#   docker build -t digitserve .                                  # GPU-capable serving (CUDA 13, cuDNN 9)
#   docker build -t digitserve:cpu --build-arg DEVICE=cpu .       # CPU-only serving, no NVIDIA libraries
#   docker build -t digitserve:ts --build-arg WITH_TORCH=true .   # + torch for --backend torchscript
#   docker build -t digitserve-train --target train .
#   make image [DEVICE=cpu]   # the same with docker, or with buildah where there is no Docker engine
#
# Build arguments: PYTHON_IMAGE (the base, e.g. a mirror's copy of python:3.11-slim-bookworm),
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_TRUSTED_HOST (a package index mirror or proxy; the
# build stage only, so they are not in the serving image), DEVICE, ORT_VERSION, WITH_TORCH.
# HTTP_PROXY / HTTPS_PROXY / NO_PROXY are predefined build arguments and need no declaration.
#
# CUDA and cuDNN come from NVIDIA's pip-packaged libraries (onnxruntime-gpu[cuda,cudnn]), not from
# a CUDA base image: they hold only the libraries ONNX Runtime loads, version-matched to it by pip,
# on a slim Python base. The host needs only the NVIDIA driver and the NVIDIA container toolkit
# (`docker run --gpus all`). Without a GPU the GPU image serves on the CPU (it decides by NVML
# before asking ONNX Runtime for CUDA); the CPU image is the one to pick for CPU-only hosts.
#
# The serving image holds the venv and the exports, both owned by root: the service (UID 10001)
# can read but not change its code or models. Not in it: pip, setuptools, compilers, caches,
# tests, training code, torch (unless WITH_TORCH), scipy (digitserve[svhn], for --data-dir).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment holding the serving package and its runtime dependencies ---
FROM ${PYTHON_IMAGE} AS build
ARG DEVICE=gpu
ARG ORT_VERSION=1.31.1
ARG WITH_TORCH=false
# OpenTelemetry traces (the [otel] extra), on when the container's OTEL_TRACES_EXPORTER asks for them.
ARG WITH_OTEL=false
ARG OTEL_VERSION=1.45.2
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_TRUSTED_HOST=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Serving never imports training/: the serving image is built without it.
COPY pyproject.toml README.md ./
COPY export_contract ./export_contract
COPY serving ./serving
# The [gpu] extra (ONNX Runtime with its CUDA provider, CUDA 13 and cuDNN 9 libraries), pinned, or
# ONNX Runtime's CPU build.
RUN case "${DEVICE}" in \
      gpu) pip install . "onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}" ;; \
      cpu) pip install . "onnxruntime==${ORT_VERSION}" ;; \
      *) echo "DEVICE must be gpu or cpu, not '${DEVICE}'" >&2; exit 1 ;; \
    esac \
 && if [ "${WITH_TORCH}" = "true" ]; then pip install "torch>=2.4,<2.15"; fi \
 && if [ "${WITH_OTEL}" = "true" ]; then pip install "opentelemetry-sdk==${OTEL_VERSION}" \
      "opentelemetry-exporter-otlp-proto-http==${OTEL_VERSION}"; fi
# What serving does not need (bench/RESULTS.md, "Container images", measures each):
# - cuFFT (and nvJitLink, which only cuFFT requires): ONNX Runtime's CUDA provider does not link it,
#   and onnxruntime.preload_dlls() treats it as optional; only DFT/STFT graphs would use it (torch does)
# - headers, static libraries, nvBLAS: for building against CUDA, not for running
# - Swagger UI's editor bundles and source maps: /docs serves 3 of the package's files (DOCS_FILES)
# - ONNX Runtime's offline tools (transformers/quantization/tools: model optimisation scripts)
# - every package's tests, then setuptools and pip themselves
RUN sp="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && if [ "${DEVICE}" = "gpu" ] && [ "${WITH_TORCH}" != "true" ]; then pip uninstall -y nvidia-cufft nvidia-nvjitlink; fi \
 && rm -rf "${sp}"/nvidia/*/include \
 && find "${sp}" -path '*/nvidia/*' \( -name '*.a' -o -name 'libnvblas.so*' \) -delete \
 && keep="$(python -c 'from serving.api.operations import DOCS_FILES; print(" ".join(DOCS_FILES))') LICENSE" \
 && for f in "${sp}"/swagger_ui/static/*; do case " ${keep} " in *" ${f##*/} "*) ;; *) rm "${f}" ;; esac; done \
 && rm -rf "${sp}"/onnxruntime/transformers "${sp}"/onnxruntime/quantization "${sp}"/onnxruntime/tools \
           /opt/venv/bin/onnxruntime_test /opt/venv/bin/digitserve-train \
 && find "${sp}" -depth -type d -name tests -exec rm -rf {} + \
 && pip uninstall -y setuptools \
 && python -m pip uninstall -y pip

# --- exports: the committed models, readable by all, TorchScript artifacts only WITH_TORCH ---
FROM ${PYTHON_IMAGE} AS exports
ARG WITH_TORCH=false
COPY exports /exports
RUN chmod -R a+rX,go-w /exports \
 && if [ "${WITH_TORCH}" != "true" ]; then find /exports -name model.ts -delete; fi

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

# --- serve (the last stage: the default target): the service, as a non-root user that cannot write
#     its code or its baked-in models ---
FROM ${PYTHON_IMAGE} AS serve
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
COPY --from=exports /exports /app/exports
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
