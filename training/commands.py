"""What each `python -m training` subcommand does, once its arguments are parsed and checked
(training/__main__.py); this module imports torch."""
from pathlib import Path

import torch

from training import digits, svhn, synthetic
from export_contract.publish import publish
from training.export import default_name, export_model, load_run
from training.recipes import DIGITS_ARCHS
from training.runs import check_writable
from training.train import comparison_table, knn_baseline, resolve_device, train_digits, train_svhn


def digits_command(args) -> None:
    device = resolve_device(args.device)
    archs = list(DIGITS_ARCHS) if args.all else [args.arch]
    rows = []
    for arch in archs:
        run_dir, metrics = train_digits(arch, args.seed, args.max_epochs, args.patience, device, args.out,
                                        reproducible_mode=args.reproducible)
        test = metrics["test"]
        print(f"{arch}: test NLL {test['nll']:.4f}, error {test['error']:.4f} ({test['errors']}/{test['n']}), "
              f"best epoch {metrics['best_epoch'] + 1} of {metrics['epochs_run']}, {metrics['wall_seconds']:.1f} s -> {run_dir}")
        if args.export_to is not None:
            print(f"  published {publish(run_dir / 'export' / default_name(metrics), args.export_to, args.replace)}")
        rows.append(metrics)
    if args.all:
        rows.append(knn_baseline())
        table = comparison_table(rows)
        path = args.out / f"digits-comparison-seed{args.seed}.md"
        path.write_text(f"# digits, seed {args.seed}, device {device}\n\n{table}")
        print("\n" + table + f"\nwritten to {path}")


def svhn_command(args) -> None:
    finished = train_svhn(args)
    if finished is None:  # a non-zero rank
        return
    run_dir, metrics = finished
    test = metrics["test"]
    print(f"svhn cnn: test NLL {test['nll']:.4f}, error {test['error']:.4f} ({test['errors']}/{test['n']}), "
          f"best epoch {metrics['best_epoch'] + 1} of {metrics['epochs_run']}, {metrics['wall_seconds']:.1f} s, "
          f"{metrics['images_per_second']:.0f} images/s -> {run_dir}")
    if args.export_to is not None:
        export = run_dir / "export" / (args.name or default_name(metrics))
        print(f"  published {publish(export, args.export_to, args.replace)}")


def svhn_synth_command(args) -> None:
    synthetic.write_synthetic(args.out, args.train, args.test, args.seed, args.jobs)
    print(f"wrote {args.train} + {args.test} synthetic crops to {args.out} (official .mat layout)")


def export_command(args) -> None:
    run, model = load_run(args.run_dir)
    check_writable(args.to)
    if run["task"] == "digits":
        test = digits.load_split("test")
        test_x, test_y, input_spec = test.x, test.y, digits.INPUT_SPEC
    else:
        arrays = svhn.load_split(Path(run["config"]["data_dir"]), "test", verify_md5=run["config"]["verify_md5"])
        test_x, test_y, input_spec = torch.from_numpy(arrays.x), torch.from_numpy(arrays.y), svhn.INPUT_SPEC
    folder = export_model(model, run, args.run_dir, input_spec, test_x, test_y, args.name or default_name(run), args.to,
                          args.replace)
    print(f"exported {folder}")


COMMANDS = {"digits": digits_command, "svhn": svhn_command, "svhn-synth": svhn_synth_command, "export": export_command}
