"""Command line: `python -m training digits ...` (and `export`, `svhn`).

    python -m training digits --arch cnn                # one run into runs/
    python -m training digits --all                     # the four archs + k-NN, comparison table
    python -m training svhn --data-dir data/svhn        # SVHN CNN (torchrun --nproc-per-node N for DDP)
    python -m training svhn-synth --out data/synth      # synthetic crops in the official .mat layout
    python -m training export runs/RUN --to exports     # re-export a run for the server
"""
import argparse
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from training import digits, svhn
from training.export import ExportError, export_model, load_run, publish
from training.loop import evaluate, fit
from training.recipes import DIGITS_ARCHS, SVHN_ARCHS
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


def write_run(metrics: dict, model: torch.nn.Module, history, test_x: torch.Tensor, test_y: torch.Tensor,
              input_spec: dict, out: Path, embed_test_set: bool, splits: dict | None = None) -> Path:
    """The run folder, atomically: checkpoint, metrics.json, curves, export/TASK-ARCH/ (servable)."""
    task, arch, seed = metrics["task"], metrics["arch"], metrics["seed"]
    final = out / f"{task}-{arch}-seed{seed}-{utc_stamp()}"
    test = metrics["test"]
    with atomic_folder(final) as staging:
        torch.save(model.state_dict(), staging / "model.pt")
        write_json(staging / "metrics.json", metrics)
        if splits:  # the exact train/val indices, so the split can be audited and reproduced
            np.savez(staging / "splits.npz", **splits)
        plot_curves(staging / "curves", history.val_nll, history.val_error, test["nll"], test["error"],
                    f"{task} {arch} (seed {seed}): best epoch {history.best_epoch}")
        export_model(model, metrics, final, input_spec, test_x, test_y, f"{task}-{arch}", staging / "export",
                     embed_test_set=embed_test_set)
    return final


def run_metrics(task: str, arch: str, summary: str, seed: int, config: dict, device: torch.device, started: float,
                history, result) -> dict:
    return {
        "task": task, "arch": arch, "summary": summary, "seed": seed, "config": config,
        "environment": environment(str(device)),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "epochs_run": history.epochs_run, "best_epoch": history.best_epoch,
        "val_nll": history.val_nll, "val_error": history.val_error,
        "test": {"nll": result.nll, "error": result.error, "errors": result.errors, "n": result.n},
    }


def train_digits(arch: str, seed: int, max_epochs: int, patience: int, device: torch.device, out: Path,
                 progress: bool = True) -> tuple[Path, dict]:
    """Train one digits model, evaluate it on test, export it, and write its run folder atomically."""
    spec = DIGITS_ARCHS[arch]
    torch.manual_seed(seed)
    train, val, test = (digits.load_split(name, device) for name in ("train", "val", "test"))
    model = spec.build().to(device)
    started = time.perf_counter()
    history = fit(model, train.x, train.y, val.x, val.y, spec.recipe, max_epochs=max_epochs, patience=patience,
                  progress=progress, desc=f"digits {arch}")
    result = evaluate(model, test.x, test.y)
    config = {"max_epochs": max_epochs, "patience": patience, "recipe": asdict(spec.recipe)}
    metrics = run_metrics("digits", arch, spec.summary, seed, config, device, started, history, result)
    return write_run(metrics, model, history, test.x, test.y, digits.INPUT_SPEC, out, embed_test_set=True), metrics


def train_svhn(args) -> tuple[Path, dict] | None:
    """Train the SVHN CNN (under torchrun: data-parallel); rank 0 evaluates, exports and writes."""
    rank, world, device = init_distributed(args.device)
    try:
        if args.download and rank == 0:
            svhn.download(args.data_dir)
        if world > 1:
            dist.barrier()
        train_all = svhn.load_split(args.data_dir, "train", verify_md5=not args.skip_md5)
        test = svhn.load_split(args.data_dir, "test", verify_md5=not args.skip_md5)
        train_idx, val_idx = svhn.stratified_split(train_all.y, args.val_fraction, args.seed)
        spec = SVHN_ARCHS["cnn"]
        recipe = replace(spec.recipe, batch_size=args.batch_size or spec.recipe.batch_size, lr=args.lr or spec.recipe.lr)
        torch.manual_seed(args.seed)

        def on_device(array):
            return torch.from_numpy(array).to(device)
        train_x, train_y = on_device(train_all.x[train_idx]), on_device(train_all.y[train_idx])
        val_x, val_y = on_device(train_all.x[val_idx]), on_device(train_all.y[val_idx])
        model_kwargs = {"widths": [args.width, 4 * args.width, 4 * args.width]}
        model = spec.build(**model_kwargs).to(device)
        cuda = device.type == "cuda"
        started = time.perf_counter()
        history = fit(model, train_x, train_y, val_x, val_y, recipe, max_epochs=args.max_epochs,
                      patience=args.patience, progress=rank == 0, desc="svhn cnn", bf16=cuda, channels_last=cuda,
                      compile=args.compile)
        if rank != 0:
            return None
        test_x, test_y = on_device(test.x), on_device(test.y)
        result = evaluate(model, test_x, test_y)
        config = {"max_epochs": args.max_epochs, "patience": args.patience, "recipe": asdict(recipe),
                  "data_dir": str(args.data_dir.resolve()), "verify_md5": not args.skip_md5,
                  "val_fraction": args.val_fraction, "world_size": world, "compile": args.compile,
                  "model_kwargs": model_kwargs,
                  "train_images": len(train_idx), "val_images": len(val_idx), "bf16": cuda}
        metrics = run_metrics("svhn", "cnn", spec.summary, args.seed, config, device, started, history, result)
        metrics["images_per_second"] = round(history.epochs_run * len(train_idx) / history.train_seconds, 1)
        run_dir = write_run(metrics, model, history, test_x, test_y, svhn.INPUT_SPEC, args.out, embed_test_set=False,
                            splits={"train_indices": train_idx, "val_indices": val_idx})
        return run_dir, metrics
    finally:
        if world > 1:
            dist.destroy_process_group()


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """Join torchrun's process group when launched by it (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


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


def cmd_svhn(args) -> None:
    svhn.check_val_fraction(args.val_fraction)  # before any data is read or folder made
    check_writable(args.out)
    if args.export_to is not None:
        check_writable(args.export_to)
    finished = train_svhn(args)
    if finished is None:  # a non-zero rank
        return
    run_dir, metrics = finished
    test = metrics["test"]
    print(f"svhn cnn: test NLL {test['nll']:.4f}, error {test['error']:.4f} ({test['errors']}/{test['n']}), "
          f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']}, {metrics['wall_seconds']:.1f} s, "
          f"{metrics['images_per_second']:.0f} images/s -> {run_dir}")
    if args.export_to is not None:
        print(f"  published {publish(run_dir / 'export' / 'svhn-cnn', args.export_to)}")


def cmd_svhn_synth(args) -> None:
    check_writable(args.out)
    svhn.write_synthetic(args.out, args.train, args.test, args.seed)
    print(f"wrote {args.train} + {args.test} synthetic crops to {args.out} (official .mat layout)")


def cmd_export(args) -> None:
    run, model = load_run(args.run_dir)
    check_writable(args.to)
    if run["task"] == "digits":
        test = digits.load_split("test")
        test_x, test_y, input_spec = test.x, test.y, digits.INPUT_SPEC
    else:
        arrays = svhn.load_split(Path(run["config"]["data_dir"]), "test", verify_md5=run["config"]["verify_md5"])
        test_x, test_y, input_spec = torch.from_numpy(arrays.x), torch.from_numpy(arrays.y), svhn.INPUT_SPEC
    name = args.name or f"{run['task']}-{run['arch']}"
    folder = export_model(model, run, args.run_dir, input_spec, test_x, test_y, name, args.to,
                          embed_test_set=run["task"] == "digits")
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

    p = commands.add_parser("svhn", help="train the SVHN CNN (official train/test .mat files; torchrun for multi-GPU)")
    p.add_argument("--data-dir", type=Path, default=Path("data/svhn"), help="holds train_32x32.mat and test_32x32.mat")
    p.add_argument("--download", action="store_true", help="fetch the official files via torchvision (MD5-checked)")
    p.add_argument("--skip-md5", action="store_true", help="accept files that are not the official ones (synthetic data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="stratified share of train held out (>= 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=positive_int, default=40)
    p.add_argument("--patience", type=positive_int, default=5)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--width", type=positive_int, default=64, help="channels of the first group; the others get 4x")
    p.add_argument("--batch-size", type=positive_int, help="global batch size (default from the recipe: 512)")
    p.add_argument("--lr", type=float, help="peak learning rate (default from the recipe: 2e-3)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward pass")
    p.add_argument("--out", type=Path, default=Path("runs"))
    p.add_argument("--export-to", type=Path, help="also publish the export here (e.g. exports/)")
    p.set_defaults(func=cmd_svhn)

    p = commands.add_parser("svhn-synth", help="write synthetic house-number crops in the official .mat layout")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train", type=positive_int, default=5000)
    p.add_argument("--test", type=positive_int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_svhn_synth)

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
    except (UsageError, svhn.DataError) as err:
        print(f"python -m training: error: {err}", file=sys.stderr)
        return 2
    except ExportError as err:
        print(f"python -m training: export failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
