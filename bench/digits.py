"""Digits targets: the four archs over seeds 0, 1, 2 (--seeds) on this machine; medians against the issue's targets.

    .venv/bin/python -m bench.digits [--out runs/bench-digits] [--archs ARCH ...] [--seeds 0 1 2] [--max-epochs 1000]
                                     [--no-reproducible]

Trains as `python -m training digits` does by default: in reproducible mode (training/reproducible.py).

Prints a Markdown section; paste it into bench/RESULTS.md. Runs sequentially (parallel runs on a
2-core machine oversubscribe and distort wall times).
"""
import argparse
import statistics
from pathlib import Path

from training import reproducible
from training.recipes import DIGITS_ARCHS

# (max median test errors of 447, max median test NLL, max wall seconds per run) from the issue.
TARGETS = {"cnn": (6, 0.10, 60), "mlp": (13, 0.12, 60), "seed-mlp": (36, 0.30, None), "seed-cnn": (28, 0.21, None)}
REFERENCE_LOW = {"seed-mlp": (33, 0.28), "seed-cnn": (26, 0.17)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/bench-digits"))
    parser.add_argument("--archs", nargs="+", default=list(DIGITS_ARCHS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=1000)
    parser.add_argument("--reproducible", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if args.reproducible:
        reproducible.pin_before_torch()
    import torch  # after the pins

    from training.runs import cpu_info
    from training.train import knn_baseline, train_digits
    lines = [f"## Digits (`python -m bench.digits`), {cpu_info()[0]}, torch {torch.__version__}, "
             f"{'reproducible mode' if args.reproducible else 'natural CPU dispatch'}", "",
             "| arch | seed | test NLL | errors /447 | best epoch / run | wall s |", "|---|---|---|---|---|---|"]
    summary = ["", "| arch | median errors | median NLL | max wall s | target | met |", "|---|---|---|---|---|---|"]
    for arch in args.archs:
        runs = []
        for seed in args.seeds:
            _, m = train_digits(arch, seed, args.max_epochs, 20, torch.device("cpu"), args.out, progress=False,
                                reproducible_mode=args.reproducible)
            runs.append(m)
            lines.append(f"| {arch} | {seed} | {m['test']['nll']:.4f} | {m['test']['errors']} | "
                         f"{m['best_epoch']} / {m['epochs_run']} | {m['wall_seconds']:.1f} |")
            print(lines[-1], flush=True)
        errors = statistics.median(m["test"]["errors"] for m in runs)
        nll = statistics.median(m["test"]["nll"] for m in runs)
        wall = max(m["wall_seconds"] for m in runs)
        max_errors, max_nll, max_wall = TARGETS[arch]
        met = errors <= max_errors and nll <= max_nll and (max_wall is None or wall <= max_wall)
        if arch in REFERENCE_LOW:
            low_errors, low_nll = REFERENCE_LOW[arch]
            target = f"reference {low_errors}–{max_errors} errors, NLL {low_nll}–{max_nll}"
            met = met and errors >= low_errors and nll >= low_nll
        else:
            target = f"≤ {max_errors} errors, NLL ≤ {max_nll}, ≤ {max_wall} s"
        summary.append(f"| {arch} | {errors:g} | {nll:.4f} | {wall:.1f} | {target} | {'yes' if met else 'NO'} |")
    knn = knn_baseline()
    summary.append(f"| {knn['arch']} | {knn['test']['errors']} | n/a | {knn['wall_seconds']:.1f} | — | — |")
    print("\n".join(lines + summary))


if __name__ == "__main__":
    main()
