#!/usr/bin/env bash
# SVHN training on a GPU machine, full size (issue 27): writes 73,257 train / 26,032 test synthetic
# crops in the official layout, then trains the default recipe and each speed change on its own and
# together, and data-parallel (torchrun: 2 processes sharing the one GPU, or one per GPU; a few
# epochs). Prints one Markdown row per run for bench/RESULTS.md: the change, training images/s,
# seconds per epoch, seconds to the best epoch, best validation error, test accuracy; the card's
# name first. Each run is time-boxed, one that fails does not stop the others, and one that might
# overrun BUDGET is skipped, so the table is always printed. About 4 minutes on one H100/H200;
# bench/gpu.sh runs it after the serving benchmark.
#
#   bench/gpu_train.sh                    # on the GPU machine (bench/gpu.sh installs what the image lacks)
#   DRY_RUN=1 bench/gpu_train.sh          # on the CPU, tiny (tests/bench/test_gpu_scripts_dry_run.py)
#   RUNS="eager fast" bench/gpu_train.sh  # some of the runs
#
# RESULTS (default: $OUT, the device tool's folder, or a temporary one) receives this script's log,
# each run's output (NAME.log), its metrics.json (metrics-NAME.json) and the table (gpu_train.md).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -n "${DRY_RUN:-}" ]; then  # every step at its smallest: seconds on 2 cores
  DEVICE=${DEVICE:-cpu} TRAIN=${TRAIN:-200} TEST=${TEST:-50} MAX_EPOCHS=${MAX_EPOCHS:-1} DDP_EPOCHS=${DDP_EPOCHS:-1}
  EXTRA=${EXTRA:-"--width 8"} RUNS=${RUNS:-"val4 ddp"}
  # one thread: two on a busy 2-core machine ran the tiny model 10 to 40 times slower (OpenMP waiting)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
DEVICE=${DEVICE:-cuda}
TRAIN=${TRAIN:-73257}
TEST=${TEST:-26032}
MAX_EPOCHS=${MAX_EPOCHS:-40}
DDP_EPOCHS=${DDP_EPOCHS:-3}  # sharing one GPU, DDP measures the path, not a speed-up
EXTRA=${EXTRA:-}             # flags for every run
RUNS=${RUNS:-"eager fast ddp val4 batch1024 graphs"}  # the most wanted first: a BUDGET skips the last
RUN_LIMIT=${RUN_LIMIT:-75}   # seconds per training run, export included
BUDGET=${BUDGET:-}           # seconds for the whole script: a run that might not end inside it is skipped
WORK=$(mktemp -d)
RESULTS=${RESULTS:-${OUT:-$WORK/results}}
mkdir -p "$RESULTS"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec > >(tee "$RESULTS/gpu_train.log") 2>&1

flags_of() {  # the change each run measures, as training flags
  case $1 in
    eager) echo "" ;;                                     # the default recipe
    val4) echo "--val-every 4" ;;                          # validation every 4th epoch
    batch1024) echo "--batch-size 1024 --lr 2.8e-3" ;;     # twice the batch, lr times sqrt(2) (Adam)
    graphs) echo "--compile reduce-overhead" ;;            # torch.compile replaying CUDA graphs
    fast) echo "--val-every 4 --batch-size 1024 --lr 2.8e-3 --compile reduce-overhead" ;;
    ddp) echo "--max-epochs $DDP_EPOCHS" ;;
    *) return 1 ;;
  esac
}
for name in $RUNS; do  # a misspelt run or flag stops here, before minutes of data are written
  # shellcheck disable=SC2046  # the flags are a word list
  flags=$(flags_of "$name") && "$PYTHON" -c 'import sys; from training.__main__ import build_parser
build_parser().parse_args(["svhn", *sys.argv[1:]])' $flags $EXTRA || { echo "run $name: bad name or flags"; exit 2; }
done

gpus=1
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  gpus=$(nvidia-smi -L | wc -l)
fi
"$PYTHON" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}")'
echo "$(nproc --all) cores; $TRAIN train / $TEST test crops; at most $MAX_EPOCHS epochs, $RUN_LIMIT s per run; runs: $RUNS"

started=$SECONDS
"$PYTHON" -m training svhn-synth --out "$WORK/synth" --train "$TRAIN" --test "$TEST" --seed 0 || exit 1
echo "synthetic set written in $((SECONDS - started)) s"

procs=$(( gpus > 1 ? gpus : 2 ))  # one GPU: two processes share it (gloo), which still runs the DDP path
for name in $RUNS; do
  if [ -n "$BUDGET" ] && [ $((SECONDS + RUN_LIMIT)) -gt "$BUDGET" ]; then
    echo "--- $name: skipped, it might not end inside the $BUDGET s budget"
    continue
  fi
  launcher=$PYTHON
  [ "$name" = ddp ] && launcher="$PYTHON -m torch.distributed.run --standalone --nproc-per-node $procs"
  flags="$(flags_of "$name") $EXTRA"
  echo "--- $name: $launcher -m training svhn ... $flags"
  # shellcheck disable=SC2086  # the launcher and the flags are word lists
  timeout "$RUN_LIMIT" $launcher -m training svhn --data-dir "$WORK/synth" --skip-md5 --device "$DEVICE" \
    --max-epochs "$MAX_EPOCHS" --out "$WORK/runs-$name" $flags > "$RESULTS/$name.log" 2>&1
  echo "exit status $? (whole output: $name.log)"; grep -v Warning "$RESULTS/$name.log" | tail -3
  run=$(ls -d "$WORK/runs-$name"/*/ 2>/dev/null | head -1)
  if [ -n "$run" ]; then cp "$run/metrics.json" "$RESULTS/metrics-$name.json"; else echo "$name: no run folder"; fi
done

"$PYTHON" - "$RESULTS" $RUNS <<'PY' | tee "$RESULTS/gpu_train.md"
import json, sys
from pathlib import Path
results, runs = Path(sys.argv[1]), sys.argv[2:]
print("\n| run | flags | device | processes | epochs (best) | train images/s | s/epoch (median) | s to best epoch "
      "| best val error | test accuracy | wall s |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for name in runs:
    path = results / f"metrics-{name}.json"
    if not path.exists():
        print(f"| {name} | failed, timed out or skipped: see gpu_train.log and {name}.log ||||||||||")
        continue
    m = json.loads(path.read_text())
    c = m["config"]
    flags = " ".join(f for f in (f"--val-every {c['val_every']}" if c["val_every"] > 1 else "",
                                 f"--batch-size {c['recipe']['batch_size']} --lr {c['recipe']['lr']:g}",
                                 f"--compile {c['compile']}" if c["compile"] else "") if f)
    best_val = min(e for e in m["val_error"] if e is not None)
    print(f"| {name} | {flags} | {m['environment']['device_name']} | {c['world_size']} | {m['epochs_run']} "
          f"({m['best_epoch'] + 1}) | {m['images_per_second']:,.0f} | {m['seconds_per_epoch']} | "
          f"{m['seconds_to_best_epoch']} | {best_val:.2%} | {1 - m['test']['error']:.2%} | {m['wall_seconds']} |")
PY
