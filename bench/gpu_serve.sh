#!/usr/bin/env bash
# Serving on a GPU machine (issue 27), in three steps:
#  1. ONNX Runtime: its version and providers, then one session on DEVICE the way serving makes it
#     (preload_dlls, the CUDA provider first) and a batch through it, before any benchmark spends the
#     lease. If CUDA fails, once more with NVIDIA's pip-wheel library folders on LD_LIBRARY_PATH; if
#     that fails too, ONNX Runtime CUDA is reported blocked and only TorchScript on CUDA is measured.
#  2. A width-64 32x32 model (svhn-synthetic-w64): synthetic crops, W64_EPOCHS epochs, exported beside
#     copies of the committed models.
#  3. python -m bench.gpu_serve over that folder: digitserve on each backend with --device DEVICE
#     and the FastAPI + ONNX Runtime baseline, one HTTP process per core on both sides, CONNECTIONS
#     connections, 32x32 PNG uploads to svhn-synthetic-w64 and 8x8 ones to digits-cnn; req/s,
#     p50/p99, batch sizes, GPU utilisation, every model's start-up verification on DEVICE.
# About 3 minutes on one H100/H200.
#
#   bench/gpu_serve.sh               # on the GPU machine (bench/gpu.sh installs what the image lacks first)
#   DRY_RUN=1 bench/gpu_serve.sh     # on the CPU, tiny (tests/bench/test_gpu_scripts_dry_run.py)
#
# RESULTS (default: $OUT, the device tool's folder, or a temporary one) receives gpu_serve.log,
# gpu_serve.md and gpu_serve.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -n "${DRY_RUN:-}" ]; then  # every step at its smallest: seconds on 2 cores
  DEVICE=${DEVICE:-cpu} WORKERS=${WORKERS:-1} CONNECTIONS=${CONNECTIONS:-8} RUN_SECONDS=${RUN_SECONDS:-1}
  WARMUP=${WARMUP:-0} W64_TRAIN=${W64_TRAIN:-300} W64_WIDTH=${W64_WIDTH:-8} W64_EPOCHS=${W64_EPOCHS:-1}
  COMMITTED=${COMMITTED:-digits-cnn}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # see bench/gpu_train.sh
fi
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-$(nproc --all)}
CONNECTIONS=${CONNECTIONS:-384}
RUN_SECONDS=${RUN_SECONDS:-10}  # not SECONDS: bash counts that one itself
WARMUP=${WARMUP:-2}
W64_TRAIN=${W64_TRAIN:-3000}
W64_WIDTH=${W64_WIDTH:-64}
W64_EPOCHS=${W64_EPOCHS:-2}
COMMITTED=${COMMITTED:-$(ls exports)}  # the committed models served beside it
WORK=$(mktemp -d)
RESULTS=${RESULTS:-${OUT:-$WORK/results}}
mkdir -p "$RESULTS"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec > >(tee "$RESULTS/gpu_serve.log") 2>&1
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
echo "python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'), $(nproc --all) cores, $WORKERS HTTP processes"

ort_check() {  # one session on DEVICE as serving/backends.py makes it, and a batch through it
  "$PYTHON" - "$DEVICE" <<'PY'
import json, sys
import numpy as np
import onnxruntime as ort
device = sys.argv[1]
print(f"onnxruntime {ort.__version__} ({ort.__file__}): providers {ort.get_available_providers()}")
if device == "cuda":
    ort.preload_dlls()
spec = json.load(open("exports/digits-cnn/model.json"))["input"]
session = ort.InferenceSession("exports/digits-cnn/model.onnx", providers=(["CUDAExecutionProvider"] if device == "cuda"
                                                                              else []) + ["CPUExecutionProvider"])
log_probs = session.run(None, {spec["name"]: np.zeros((4, 1, 8, 8), np.float32)})[0]
provider = session.get_providers()[0]
print(f"a session on {device}: {provider} first, output {log_probs.shape}")
sys.exit(0 if provider == ("CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider") else 1)
PY
}
backends=(onnx torchscript)
if ort_check; then
  echo "ONNX Runtime on $DEVICE: works"
else
  libs=$("$PYTHON" -c 'import glob, os, nvidia
print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/*/lib/lib*.so*")})))' || true)
  if [ -n "$libs" ] && LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ort_check; then
    export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "ONNX Runtime on $DEVICE: works with NVIDIA's pip-wheel libraries on LD_LIBRARY_PATH"
  else
    backends=(torchscript)
    echo "ONNX Runtime on $DEVICE: blocked (above); TorchScript alone is measured, the baseline runs where ORT can"
  fi
fi

"$PYTHON" -m training svhn-synth --out "$WORK/synth" --train "$W64_TRAIN" --test $((W64_TRAIN / 6)) --seed 0 | tail -1
mkdir "$WORK/exports"
for name in $COMMITTED; do cp -r "exports/$name" "$WORK/exports/"; done
"$PYTHON" -m training svhn --data-dir "$WORK/synth" --skip-md5 --max-epochs "$W64_EPOCHS" --width "$W64_WIDTH" \
  --device "$DEVICE" --out "$WORK/runs" --name svhn-synthetic-w64 --export-to "$WORK/exports" | tail -1

load=python  # wrk where it runs (carried from Debian to the GPU machine), else bench/load.py
(wrk --version 2>&1 || true) | grep -q "^wrk " && load=wrk
"$PYTHON" -m bench.gpu_serve --exports "$WORK/exports" --models svhn-synthetic-w64 digits-cnn --backends "${backends[@]}" \
  --device "$DEVICE" --workers "$WORKERS" --connections "$CONNECTIONS" --seconds "$RUN_SECONDS" \
  --warmup-seconds "$WARMUP" --load "$load" --out "$RESULTS"
