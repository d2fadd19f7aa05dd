"""SVHN pipeline on CPU: 5,000 synthetic crops (official .mat layout), one default-recipe run at
width 16 and batch 64, timed end to end; target <= 2 minutes and >= 90 % accuracy on a synthetic test set.

    .venv/bin/python -m bench.svhn_cpu [--data data/synth-5k] [--out runs/bench-svhn-cpu]
                                       [--train 5000] [--test 2000] [--max-epochs N]

The crops are written to --data when it holds none (--train and --test of them).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synth-5k")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-svhn-cpu")
    parser.add_argument("--train", type=int, default=5000, help="synthetic training crops written to --data")
    parser.add_argument("--test", type=int, default=2000, help="synthetic test crops written to --data")
    parser.add_argument("--max-epochs", type=int, help="the training command's own default unless given")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not (args.data / "test_32x32.mat").exists():
        subprocess.run([sys.executable, "-m", "training", "svhn-synth", "--out", str(args.data), "--train",
                        str(args.train), "--test", str(args.test)], check=True, env=env)
    command = ["svhn", "--data-dir", str(args.data), "--skip-md5", "--width", "16", "--batch-size", "64",
               "--device", "cpu", "--out", str(args.out),
               *(["--max-epochs", str(args.max_epochs)] if args.max_epochs else [])]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "training", *command], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(result.stderr)
    run_dir = Path(result.stdout.split("-> ")[1].split()[0])
    m = json.loads((run_dir / "metrics.json").read_text())
    accuracy = 1 - m["test"]["error"]
    print(f"## SVHN on CPU (`python -m bench.svhn_cpu`), {platform.machine()}, {os.cpu_count()} cores\n")
    train, val = m["config"]["train_images"], m["config"]["val_images"]
    print(f"`python -m training {' '.join(command)}` on {train + val:,} synthetic crops ({train:,} train / {val:,} "
          f"val), synthetic test set of {m['test']['n']}.\n")
    print("| wall s (whole command) | train + test s | epochs (best) | images/s | test accuracy | test NLL | target met |")
    print("|---|---|---|---|---|---|---|")
    met = wall <= 120 and accuracy >= 0.90
    print(f"| {wall:.1f} | {m['wall_seconds']:.1f} | {m['epochs_run']} ({m['best_epoch']}) | {m['images_per_second']:.0f} "
          f"| {100 * accuracy:.2f} % | {m['test']['nll']:.4f} | {'yes' if met else 'no'} (≤ 120 s, ≥ 90 %) |")


if __name__ == "__main__":
    main()
