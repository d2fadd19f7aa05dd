"""Command line: `python -m training digits ...` (and `export`, `svhn`).

    python -m training digits --arch cnn                # one run into runs/
    python -m training digits --all                     # the four archs + k-NN, comparison table
    python -m training export runs/RUN --to exports     # re-export a run for the server
"""
import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from training import digits
from training.export import ExportError, export_model, load_run, publish
from training.loop import evaluate, fit
from training.recipes import DIGITS_ARCHS
from training.runs import UsageError, atomic_folder, check_writable, environment, plot_curves, utc_stamp, write_json


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def train_digits(arch: str, seed: int, max_epochs: int, patience: int, device: torch.device, out: Path,
                 progress: bool = True) -> tuple[Path, dict]:
    """Train one digits model, evaluate it on test, export it, and write its run folder atomically.

    The run folder holds the checkpoint, metrics.json, the curves, and export/digits-ARCH/ (servable).
    """
    spec = DIGITS_ARCHS[arch]
    torch.manual_seed(seed)
    train, val, test = (digits.load_split(name, device) for name in ("train", "val", "test"))
    model = spec.build().to(device)
    started = time.perf_counter()
    history = fit(model, train.x, train.y, val.x, val.y, spec.recipe, max_epochs=max_epochs, patience=patience,
                  progress=progress, desc=f"digits {arch}")
    result = evaluate(model, test.x, test.y)
    metrics = {
        "task": "digits", "arch": arch, "summary": spec.summary, "seed": seed,
        "config": {"max_epochs": max_epochs, "patience": patience, "recipe": asdict(spec.recipe)},
        "environment": environment(str(device)),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "epochs_run": history.epochs_run, "best_epoch": history.best_epoch,
        "val_nll": history.val_nll, "val_error": history.val_error,
        "test": {"nll": result.nll, "error": result.error, "errors": result.errors, "n": result.n},
    }
    final = out / f"digits-{arch}-seed{seed}-{utc_stamp()}"
    with atomic_folder(final) as staging:
        torch.save(model.state_dict(), staging / "model.pt")
        write_json(staging / "metrics.json", metrics)
        plot_curves(staging / "curves", history.val_nll, history.val_error, result.nll, result.error,
                    f"digits {arch} (seed {seed}): best epoch {history.best_epoch}")
        export_model(model, metrics, final, digits.INPUT_SPEC, test.x, test.y, f"digits-{arch}", staging / "export",
                     embed_test_set=True)
    return final, metrics


def knn_baseline() -> dict:
    """k-nearest neighbours on the same split, k chosen on validation error."""
    from sklearn.neighbors import KNeighborsClassifier
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
        (x.reshape(len(x), -1), y) for x, y in map(digits.split_arrays, ("train", "val", "test")))
    started = time.perf_counter()
    val_errors = {k: np.mean(KNeighborsClassifier(k).fit(train_x, train_y).predict(val_x) != val_y)
                  for k in range(1, 11)}
    k = min(val_errors, key=lambda k: (val_errors[k], k))
    errors = int(np.sum(KNeighborsClassifier(k).fit(train_x, train_y).predict(test_x) != test_y))
    return {"arch": f"k-NN (k={k}, chosen on val)", "test": {"nll": None, "error": errors / len(test_y),
            "errors": errors, "n": len(test_y)}, "epochs_run": None, "wall_seconds": round(time.perf_counter() - started, 2)}


def comparison_table(rows: list[dict]) -> str:
    lines = ["| model | test NLL | test error | errors | epochs (best) | wall s |", "|---|---|---|---|---|---|"]
    for row in rows:
        test = row["test"]
        nll = "n/a (hard votes)" if test["nll"] is None else f"{test['nll']:.4f}"
        epochs = "—" if row["epochs_run"] is None else f"{row['epochs_run']} ({row['best_epoch']})"
        lines.append(f"| {row['arch']} | {nll} | {test['error']:.4f} | {test['errors']}/{test['n']} | {epochs} "
                     f"| {row['wall_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def cmd_digits(args) -> None:
    if not args.all and args.arch is None:
        raise UsageError("choose --arch {" + ",".join(DIGITS_ARCHS) + "} or --all")
    device = resolve_device(args.device)
    check_writable(args.out)
    if args.export_to is not None:
        check_writable(args.export_to)
    archs = list(DIGITS_ARCHS) if args.all else [args.arch]
    rows = []
    for arch in archs:
        run_dir, metrics = train_digits(arch, args.seed, args.max_epochs, args.patience, device, args.out)
        test = metrics["test"]
        print(f"{arch}: test NLL {test['nll']:.4f}, error {test['error']:.4f} ({test['errors']}/{test['n']}), "
              f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']}, {metrics['wall_seconds']:.1f} s -> {run_dir}")
        if args.export_to is not None:
            print(f"  published {publish(run_dir / 'export' / f'digits-{arch}', args.export_to)}")
        rows.append(metrics)
    if args.all:
        rows.append(knn_baseline())
        table = comparison_table(rows)
        path = args.out / f"digits-comparison-seed{args.seed}.md"
        path.write_text(f"# digits, seed {args.seed}, device {device}\n\n{table}")
        print("\n" + table + f"\nwritten to {path}")


def cmd_export(args) -> None:
    run, model = load_run(args.run_dir)
    check_writable(args.to)
    if run["task"] != "digits":
        raise UsageError(f"exporting {run['task']} runs is not supported yet")
    test = digits.load_split("test")
    name = args.name or f"{run['task']}-{run['arch']}"
    folder = export_model(model, run, args.run_dir, digits.INPUT_SPEC, test.x, test.y, name, args.to,
                          embed_test_set=True)
    print(f"exported {folder}")


class Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line (no usage dump) with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = commands.add_parser("digits", help="train on scikit-learn's 8x8 digits (original fixed split)")
    p.add_argument("--arch", choices=list(DIGITS_ARCHS), help="architecture to train")
    p.add_argument("--all", action="store_true", help="train every arch plus a k-NN baseline; write a comparison table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=positive_int, default=1000)
    p.add_argument("--patience", type=positive_int, default=20, help="epochs without val NLL improvement before stopping")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder that receives one folder per run")
    p.add_argument("--export-to", type=Path, help="also publish each run's export here (e.g. exports/)")
    p.set_defaults(func=cmd_digits)

    p = commands.add_parser("export", help="export a run's best checkpoint to TorchScript + ONNX with a manifest")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--name", help="export name (default TASK-ARCH, e.g. digits-cnn)")
    p.add_argument("--to", type=Path, default=Path("exports"), help="exports folder the server loads")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UsageError as err:
        print(f"python -m training: error: {err}", file=sys.stderr)
        return 2
    except ExportError as err:
        print(f"python -m training: export failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
