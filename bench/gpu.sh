#!/usr/bin/env bash
# Issue 27's one device call: installs what the GPU image lacks (bench/gpu_wheels.sh install, from
# the chunks and base files carried in), measures serving (bench/gpu_serve.sh) and then training
# (bench/gpu_train.sh), each time-boxed, about 8 minutes in all. Leaves in $OUT: summary.md (the
# install, the ONNX Runtime check, both tables), gpu_serve.md, gpu_train.md, and results.tar.gz with
# every log and metrics file (the device tool brings back at most 8 files).
#
#   bench/gpu_wheels.sh fetch        # here, first: prints the device calls, the last of which runs this
#   DRY_RUN=1 bench/gpu.sh           # on the CPU: installs nothing, both scripts at their smallest
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
SERVE_LIMIT=${SERVE_LIMIT:-220}  # seconds: with the install, 8 minutes, inside the 15 of device time a session gets
TRAIN_LIMIT=${TRAIN_LIMIT:-240}  # gpu_train.sh skips the runs that would not fit 15 s less
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT" "$WORK/serve" "$WORK/train"
started=$SECONDS
STASH=${STASH:-/tmp/digitserve-gpu}
if [ -n "${DRY_RUN:-}" ]; then
  echo "dry run: nothing installed" | tee "$WORK/install.log"
else
  bench/gpu_wheels.sh install 2>&1 | tee "$WORK/install.log"
  # shellcheck disable=SC1091  # written by the install: the carried packages first
  . "$STASH/env.sh"
fi
RESULTS=$WORK/serve timeout "$SERVE_LIMIT" bench/gpu_serve.sh
serve_status=$?
RESULTS=$WORK/train BUDGET=$((TRAIN_LIMIT - 15)) timeout "$TRAIN_LIMIT" bench/gpu_train.sh
train_status=$?
{
  echo "# Issue 27 on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'no GPU'), $(nproc --all) cores"
  echo
  echo "bench/gpu.sh: $((SECONDS - started)) s; gpu_serve.sh exit status $serve_status, gpu_train.sh $train_status" \
       "(124: stopped at its time box)"
  echo
  grep -h -E "^dry run:|^install:|^stash:|^onnxruntime |^a session on|^ONNX Runtime on" \
    "$WORK/install.log" "$WORK/serve/gpu_serve.log"
  echo
  cat "$WORK/serve/gpu_serve.md" 2>/dev/null || echo "(no serving table: see gpu_serve.log)"
  cat "$WORK/train/gpu_train.md" 2>/dev/null || echo "(no training table: see gpu_train.log)"
} > "$OUT/summary.md"
cp "$WORK"/serve/gpu_serve.md "$WORK"/train/gpu_train.md "$OUT/" 2>/dev/null
tar czf "$OUT/results.tar.gz" -C "$WORK" install.log serve train
cat "$OUT/summary.md"
