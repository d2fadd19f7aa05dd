#!/usr/bin/env bash
# Serving on a GPU machine: digitserve on CUDA (ONNX Runtime's CUDA provider, then TorchScript)
# against a minimal FastAPI + ONNX Runtime endpoint, same 32x32 model and payload: single PNG
# uploads, CONNECTIONS connections, one HTTP process per core on both sides. Prints one Markdown
# table per backend (req/s, p50/p99, errors) for bench/RESULTS.md, with the card's name.
#
#   bench/gpu_serve.sh                                   # on the GPU machine, about 5 minutes
#   DEVICE=cpu CONNECTIONS=32 RUN_SECONDS=5 bench/gpu_serve.sh   # the dry run on a CPU machine
#
# Needs the project's serving and training dependencies in PYTHON's environment (a GPU image
# without them: WHEELS=DIR points pip at wheels carried in; see bench/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
CONNECTIONS=${CONNECTIONS:-384}
SECONDS_PER_RUN=${RUN_SECONDS:-20}  # not SECONDS: bash counts that one itself
WORKERS=${WORKERS:-$(nproc)}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH=$PWD

if [ -n "${WHEELS:-}" ]; then
  "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" litserve prometheus-client python-multipart jsonschema
fi
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
echo "python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'), $(nproc) cores, $WORKERS HTTP processes"

# An SVHN-shaped model to serve: a short run on synthetic crops (the figures are about serving).
"$PYTHON" -m training svhn-synth --out "$WORK/synth" --train 3000 --test 500 --seed 0
"$PYTHON" -m training svhn --data-dir "$WORK/synth" --skip-md5 --max-epochs 2 --width 32 --device "$DEVICE" \
  --out "$WORK/runs" --export-to "$WORK/exports" | tail -2

backends=(torchscript)
if "$PYTHON" -c "import onnxruntime as o, sys; sys.exit(0 if '$DEVICE' == 'cpu' or 'CUDAExecutionProvider' in o.get_available_providers() else 1)"; then
  backends=(onnx torchscript)
else
  echo "onnx: skipped, this ONNX Runtime has no CUDA provider (onnxruntime-gpu is not installed)"
fi
for backend in "${backends[@]}"; do
  timeout 200 "$PYTHON" -m bench.serve --exports "$WORK/exports" --model svhn-synthetic-cnn --backend "$backend" \
    --device "$DEVICE" --connections "$CONNECTIONS" --seconds "$SECONDS_PER_RUN" --load python \
    --baseline-workers "$WORKERS" -- --workers "$WORKERS"
done
