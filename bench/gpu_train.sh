#!/usr/bin/env bash
# SVHN training on a GPU machine, full size: writes 73,257 train / 26,032 test synthetic crops in
# the official layout, then trains the default recipe (no flags but the data) eager, with
# --compile, and data-parallel (torchrun: 2 processes on one GPU, or one per GPU). Prints one
# Markdown row per run for bench/RESULTS.md: training images/s, seconds per epoch, seconds to the
# best epoch, test accuracy; the card's name first. Each run is time-boxed, and one that fails
# does not stop the others. About 8 minutes on one H100/H200.
#
#   bench/gpu_train.sh                                                   # on the GPU machine
#   DEVICE=cpu TRAIN=1200 TEST=300 MAX_EPOCHS=2 bench/gpu_train.sh       # the dry run on a CPU machine
#   WHEELS=.whl bench/gpu_train.sh     # an image without jsonschema: install the wheels carried in
#
# Files for bench/RESULTS.md land in $OUT when it is set (the device tool's folder): this script's
# log, each run's whole output (NAME.log) and its metrics.json (metrics-NAME.json).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
TRAIN=${TRAIN:-73257}
TEST=${TEST:-26032}
MAX_EPOCHS=${MAX_EPOCHS:-40}
RUN_LIMIT=${RUN_LIMIT:-150}  # seconds per training run, export included
WORK=$(mktemp -d)
RESULTS=${OUT:-$WORK/results}
mkdir -p "$RESULTS"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
exec > >(tee "$RESULTS/gpu_train.log") 2>&1

gpus=1
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  gpus=$(nvidia-smi -L | wc -l)
fi
"$PYTHON" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}")'
echo "$(nproc) cores; $TRAIN train / $TEST test crops; at most $MAX_EPOCHS epochs, $RUN_LIMIT s per run"

started=$SECONDS
"$PYTHON" -m training svhn-synth --out "$WORK/synth" --train "$TRAIN" --test "$TEST" --seed 0 || exit 1
echo "synthetic set written in $((SECONDS - started)) s"

train() {  # name, launcher (a command line), extra training flags
  local name=$1 launcher=$2 extra=$3 run
  echo "--- $name: $launcher -m training svhn ... $extra"
  # shellcheck disable=SC2086  # the launcher and the flags are word lists
  timeout "$RUN_LIMIT" $launcher -m training svhn --data-dir "$WORK/synth" --skip-md5 --device "$DEVICE" \
    --max-epochs "$MAX_EPOCHS" --out "$WORK/runs-$name" $extra > "$RESULTS/$name.log" 2>&1
  echo "exit status $? (whole output: $name.log)"; grep -v Warning "$RESULTS/$name.log" | tail -4
  run=$(ls -d "$WORK/runs-$name"/*/ 2>/dev/null | head -1)
  if [ -n "$run" ]; then cp "$run/metrics.json" "$RESULTS/metrics-$name.json"; else echo "$name: no run folder"; fi
}
train eager "$PYTHON" ""
train compiled "$PYTHON" "--compile"
procs=$(( gpus > 1 ? gpus : 2 ))  # one GPU: two processes share it (gloo), which still runs the DDP path
train ddp "$PYTHON -m torch.distributed.run --standalone --nproc-per-node $procs" ""

"$PYTHON" - "$RESULTS" <<'PY'
import json, sys
from pathlib import Path
print("\n| run | device | processes | epochs (best) | train images/s | s/epoch | s to best epoch | test accuracy | wall s |")
print("|---|---|---|---|---|---|---|---|---|")
for name in ("eager", "compiled", "ddp"):
    path = Path(sys.argv[1]) / f"metrics-{name}.json"
    if not path.exists():
        print(f"| {name} | failed or timed out: see the log |||||||")
        continue
    m = json.loads(path.read_text())
    env = m["environment"]
    print(f"| {name} | {env['device_name']} | {m['config']['world_size']} | {m['epochs_run']} "
          f"({m['best_epoch'] + 1}) | {m['images_per_second']:,.0f} | {m['seconds_per_epoch']} | "
          f"{m['seconds_to_best_epoch']} | {1 - m['test']['error']:.2%} | {m['wall_seconds']} |")
PY
