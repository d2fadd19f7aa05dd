"""Where digits training diverges between machines: one run per CPU dispatch setting, compared.

    .venv/bin/python -m bench.reproducibility [--arch cnn] [--seed 0] [--reference-ts FILE]
                                              [--setting LABEL ...] [--max-epochs N]
    .venv/bin/python -m bench.reproducibility --arch cnn --cost 5

Each row is `python -m training digits --arch ARCH --seed SEED` in a fresh process with environment
variables that imitate another machine (a lower vector extension, fewer cores) or pin one choice.
Columns: test errors and NLL (PyTorch, best epoch), the first epoch whose validation NLL differs
from the reproducible-mode run's, seconds per epoch, the checkpoint's sha256 prefix and, with
--reference-ts (e.g. an earlier commit's exports/digits-cnn/model.ts), whether its weights are
bit-identical to that model's. `--setting` runs only the rows named (with the reproducible-mode row,
which the others are compared with); `--max-epochs` caps each run (the training command's default:
1000 with early stopping).

--cost N measures what reproducible mode costs instead: N runs of 30 epochs each (no early stop) in
natural dispatch and in reproducible mode, alternated so that a noisy neighbour hits both alike;
medians of the training seconds per epoch.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"}
UNPINNED = "--no-reproducible"
# (label, extra environment, flags)
SETTINGS = [
    ("natural dispatch", {}, [UNPINNED]),
    ("natural, 1 thread", {"OMP_NUM_THREADS": "1"}, [UNPINNED]),
    ("ATen AVX2", {"ATEN_CPU_CAPABILITY": "avx2"}, [UNPINNED]),
    ("ATen + oneDNN AVX2", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, [UNPINNED]),
    ("ATen + oneDNN AVX2, 1 thread", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                      "OMP_NUM_THREADS": "1"}, [UNPINNED]),
    ("ATen + oneDNN + MKL AVX2 (the pins, natural threads)", PINS, [UNPINNED]),
    ("reproducible mode (default)", {}, []),
    ("reproducible mode, imitating a 1-core AVX2 machine", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                                            "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OMP_NUM_THREADS": "1"}, []),
]
BASELINE = "reproducible mode (default)"


def train(arch: str, seed: int, env: dict, flags: list[str], out: Path) -> dict:
    """One run in a fresh process; its metrics.json plus the path of its checkpoint."""
    base = {k: v for k, v in os.environ.items() if k not in {*PINS, "OMP_NUM_THREADS", "MKL_ENABLE_INSTRUCTIONS"}}
    subprocess.run([sys.executable, "-m", "training", "digits", "--arch", arch, "--seed", str(seed), "--out", str(out),
                    *flags], env={**base, **env, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
    (run_dir,) = out.iterdir()
    return {**json.loads((run_dir / "metrics.json").read_text()), "checkpoint": run_dir / "model.pt"}


def same_weights(checkpoint: Path, reference_ts: Path) -> bool:
    import warnings

    import torch
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
    state = torch.load(checkpoint, weights_only=True)
    reference = torch.jit.load(str(reference_ts)).state_dict()
    return state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


def cost(arch: str, seed: int, repeats: int) -> None:
    fixed = ["--max-epochs", "30", "--patience", "30"]
    per_epoch = {"natural dispatch": [], "reproducible mode": []}
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(repeats):
            for label, flags in (("natural dispatch", [UNPINNED]), ("reproducible mode", [])):
                run = train(arch, seed, {}, flags + fixed, Path(scratch) / f"{label}-{i}")
                per_epoch[label].append(run["wall_seconds"] / run["epochs_run"])
    natural, pinned = (statistics.median(per_epoch[label]) for label in per_epoch)
    print(f"digits {arch}, {repeats} x 30 epochs each: natural {natural * 1000:.0f} ms/epoch "
          f"({min(per_epoch['natural dispatch']) * 1000:.0f}-{max(per_epoch['natural dispatch']) * 1000:.0f}), "
          f"reproducible {pinned * 1000:.0f} ms/epoch ({min(per_epoch['reproducible mode']) * 1000:.0f}-"
          f"{max(per_epoch['reproducible mode']) * 1000:.0f}): {100 * (pinned / natural - 1):+.0f} %")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-ts", type=Path, help="a TorchScript export whose weights each run is compared with")
    parser.add_argument("--cost", type=int, metavar="N", help="measure the cost of reproducible mode over N runs each")
    parser.add_argument("--setting", action="append", choices=[label for label, _, _ in SETTINGS], metavar="LABEL",
                        help="run only this row (repeatable; the reproducible-mode row always runs): one of "
                             + "; ".join(label for label, _, _ in SETTINGS))
    parser.add_argument("--max-epochs", type=int, help="cap each run's epochs")
    args = parser.parse_args()
    if args.cost:
        return cost(args.arch, args.seed, args.cost)
    chosen = {BASELINE, *(args.setting or [label for label, _, _ in SETTINGS])}
    capped = ["--max-epochs", str(args.max_epochs)] if args.max_epochs else []
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        for i, (label, env, flags) in enumerate(SETTINGS):
            if label not in chosen:
                continue
            runs[label] = train(args.arch, args.seed, env, flags + capped, Path(scratch) / str(i))
            print(f"ran: {label}", file=sys.stderr, flush=True)
        baseline = runs[BASELINE]["val_nll"]
        header = "| setting | kernels, threads | test errors | test NLL | first epoch unlike the pinned run | s / epoch | checkpoint |"
        lines = [f"digits {args.arch}, seed {args.seed}, on {runs[BASELINE]['environment']['cpu_model']} "
                 f"({', '.join(runs[BASELINE]['environment']['cpu_features'])}), torch {runs[BASELINE]['environment']['torch']}",
                 "", header + (" same as reference |" if args.reference_ts else ""),
                 "|---" * (7 + bool(args.reference_ts)) + "|"]
        for label, run in runs.items():
            curve = run["val_nll"]
            differs = next((e for e, (a, b) in enumerate(zip(curve, baseline)) if a != b),
                           None if len(curve) == len(baseline) else min(len(curve), len(baseline)))
            environment = run["environment"]
            row = (f"| {label} | {environment['cpu_capability']}, {environment['threads']} | {run['test']['errors']} | "
                   f"{run['test']['nll']:.4f} | {'none' if differs is None else differs} | "
                   f"{run['wall_seconds'] / run['epochs_run']:.3f} | {run['checkpoint_sha256'][:12]} |")
            if args.reference_ts:
                row += f" {'yes' if same_weights(run['checkpoint'], args.reference_ts) else 'no'} |"
            lines.append(row)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
