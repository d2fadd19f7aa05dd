"""What each `python -m training` subcommand does, once its arguments are parsed and checked
(training/__main__.py); this module imports torch."""
from pathlib import Path

import torch

from training import digits_synth, feedback_data, svhn, synthetic
from export_contract import sha256
from export_contract.publish import publish
from training.errors import DataError
from training.export import Splits, default_name, export_model, load_run
from training.recipes import DIGITS_ARCHS
from training.runs import check_writable
from training.train import comparison_table, digits_data, knn_baseline, resolve_device, train_digits, train_svhn


def digits_command(args) -> None:
    device = resolve_device(args.device)
    archs = list(DIGITS_ARCHS) if args.all else [args.arch]
    rows = []
    for arch in archs:
        spec = DIGITS_ARCHS[arch]
        run_dir, metrics = train_digits(arch, args.seed, args.max_epochs or spec.max_epochs,
                                        args.patience or spec.patience, device, args.out,
                                        reproducible_mode=args.reproducible, synth_dir=args.synth_dir, jobs=args.jobs,
                                        extra_train=args.extra_train)
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


def digits_synth_command(args) -> None:
    record = digits_synth.write(args.out, {split: getattr(args, split) for split in digits_synth.DEFAULT_COUNTS},
                                args.seed, args.jobs)
    counts = ", ".join(f"{item['n']:,} {split}" for split, item in record["files"].items())
    print(f"wrote {counts} pictures to {args.out}")


def svhn_synth_command(args) -> None:
    synthetic.write_synthetic(args.out, args.train, args.test, args.seed, args.jobs)
    print(f"wrote {args.train} + {args.test} synthetic crops to {args.out} (official .mat layout)")


def feedback_data_command(args) -> None:
    x, y, summary = feedback_data.labelled(args.log, args.model, args.shape)
    feedback_data.write(x, y, args.out)
    print(f"{summary} -> {args.out}")


def export_command(args) -> None:
    run, model = load_run(args.run_dir)
    check_writable(args.to)
    if run["task"] == "digits":
        synth_dir, extra = run["config"].get("synth_dir"), run["config"].get("extra_train")
        if extra is not None and (not Path(extra["file"]).is_file() or sha256(Path(extra["file"])) != extra["sha256"]):
            raise DataError(f"{extra['file']}: not the --extra-train file this run was trained with (missing or "
                            "changed)")
        data, _, input_spec, _ = digits_data(synth_dir is not None, "cpu", Path(synth_dir or "."),
                                             extra_train=None if extra is None else Path(extra["file"]))
    else:
        config = run["config"]
        train_all = svhn.load_split(Path(config["data_dir"]), "train", verify_md5=config["verify_md5"])
        test = svhn.load_split(Path(config["data_dir"]), "test", verify_md5=config["verify_md5"])
        train_idx, val_idx = svhn.stratified_split(train_all.y, config["val_fraction"], run["seed"])
        data = Splits(*((torch.from_numpy(x), torch.from_numpy(y)) for x, y in (
            (train_all.x[train_idx], train_all.y[train_idx]), (train_all.x[val_idx], train_all.y[val_idx]),
            (test.x, test.y))))
        input_spec = svhn.INPUT_SPEC
    folder = export_model(model, run, args.run_dir, input_spec, data, args.name or default_name(run), args.to,
                          args.replace)
    print(f"exported {folder}")


COMMANDS = {"digits": digits_command, "svhn": svhn_command, "svhn-synth": svhn_synth_command,
            "digits-synth": digits_synth_command, "feedback-data": feedback_data_command, "export": export_command}
