"""Command line: `python -m training digits ...` (and `svhn`, `svhn-synth`, `export`).

    python -m training digits --arch cnn                # one run into runs/
    python -m training digits --all                     # the five archs + k-NN, comparison table
    python -m training svhn --data-dir data/svhn        # SVHN CNN (torchrun --nproc-per-node N for DDP)
    python -m training svhn-synth --out data/synth      # synthetic crops in the official .mat layout
    python -m training export runs/RUN --to exports     # re-export a run for the server

    python -m training feedback-data --log LOG --out f.npz  # real traffic's told labels as training data

The arguments are parsed before torch is imported: --help and argument errors answer at once, and
reproducible mode can pin the CPU kernels before torch reads them (training/reproducible.py).
"""
import argparse
import difflib
import os
import re
import sys
from pathlib import Path

from export_contract import name_error
from training import digits_synth, reproducible, svhn
from export_contract.publish import PublishError
from training.errors import DataError, ExportError, UsageError
from training.recipes import DIGITS_ARCHS
from training.runs import check_writable

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
EXIT_STATUS = {UsageError: 2, DataError: 2, ExportError: 1, PublishError: 1}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def device_name(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (use auto, cpu, cuda or cuda:N)")
    return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every flag's default (where there is one)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line (no usage dump) with exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def unknown_flags_message(extra: list[str], command: argparse.ArgumentParser) -> str:
    """argparse's message for arguments no flag takes, with the command's flag that a misspelt one
    probably meant (--epochs: --max-epochs)."""
    hints = []
    for flag in (arg.split("=", 1)[0] for arg in extra if arg.startswith("--")):
        close = difflib.get_close_matches(flag, [o for o in command._option_string_actions if o != flag], n=1,
                                          cutoff=0.6)
        if close:
            hints.append(f"{flag} (did you mean {close[0]}?)")
    return f"unrecognized arguments: {' '.join(extra)}" + ("; " + ", ".join(hints) if hints else "")


def add_reproducible_flag(parser: argparse.ArgumentParser, default: bool | None) -> None:
    parser.add_argument("--reproducible", action=argparse.BooleanOptionalAction, default=default,
                        help="pin the CPU kernels and threads so that the run gives the same weights on any x86_64 "
                             "machine with AVX2 (CPU only; --device auto then means cpu). Default for digits: "
                             "pinned where the machine allows, with a note where it does not")


def add_publish_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--export-to", type=Path, help=f"also publish {what} here (e.g. exports/)")
    add_replace_flag(parser)


def add_replace_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replace", action="store_true",
                        help="replace a published model of the same name even where its test figures are better, "
                             "or measured on another test split (without it, that is an error)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = commands.add_parser("digits", help="train on scikit-learn's 8x8 digits (original fixed split)")
    p.add_argument("--arch", choices=list(DIGITS_ARCHS), help="architecture to train")
    p.add_argument("--all", action="store_true", help="train every arch plus a k-NN baseline; write a comparison table")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the batch order")
    p.add_argument("--max-epochs", type=positive_int, help="a cap: early stopping ends runs long before (default: "
                   "1000; photo-cnn 60)")
    p.add_argument("--patience", type=positive_int, help="epochs without val NLL improvement before stopping (default: "
                   "20; photo-cnn 8)")
    p.add_argument("--device", type=device_name, default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder that receives one folder per run")
    p.add_argument("--synth-dir", type=Path, default=Path("data/digits-synth"),
                   help="generated photos and drawings for photo-cnn (python -m training digits-synth; made there with "
                        "its defaults if missing)")
    p.add_argument("--jobs", type=positive_int, default=max(1, len(os.sched_getaffinity(0))),
                   help="processes drawing the pictures when photo-cnn's are made (this machine's cores)")
    p.add_argument("--extra-train", type=Path, metavar="FILE",
                   help="labelled pictures added to the training split only (python -m training feedback-data)")
    add_publish_flags(p, "each run's export")
    add_reproducible_flag(p, default=None)

    p = commands.add_parser("svhn", help="train the SVHN CNN (official train/test .mat files; torchrun for multi-GPU)")
    p.add_argument("--data-dir", type=Path, default=Path("data/svhn"), help="holds train_32x32.mat and test_32x32.mat")
    p.add_argument("--download", action="store_true", help="fetch the official files via torchvision (MD5-checked)")
    p.add_argument("--skip-md5", action="store_true", help="accept files that are not the official ones (synthetic data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="stratified share of train held out (>= 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the initialisation and the batch order")
    p.add_argument("--max-epochs", type=positive_int, default=40, help="a cap: early stopping may end the run before")
    p.add_argument("--patience", type=positive_int, default=5, help="epochs without val NLL improvement before stopping")
    p.add_argument("--device", type=device_name, default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--width", type=positive_int, default=64, help="channels of the first group; the others get 4x")
    p.add_argument("--batch-size", type=positive_int, help="global batch size (default: the recipe's 512, less on sets under "
                   "16,384 training images so that an epoch is at least 32 steps)")
    p.add_argument("--lr", type=float, help="peak learning rate (default from the recipe: 2e-3)")
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the training forward pass in MODE (without one: default); reduce-overhead "
                        "and max-autotune replay CUDA graphs on CUDA")
    p.add_argument("--val-every", type=positive_int, default=1, metavar="N",
                   help="validate every N epochs and after the last; --patience still counts epochs")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder that receives one folder per run")
    add_publish_flags(p, "the export")
    p.add_argument("--name", help="export name (default svhn-cnn, or svhn-synthetic-cnn for synthetic crops)")
    add_reproducible_flag(p, default=False)

    p = commands.add_parser("svhn-synth", help="write synthetic house-number crops in the official .mat layout")
    p.add_argument("--out", type=Path, required=True, help="folder for train_32x32.mat and test_32x32.mat")
    p.add_argument("--train", type=positive_int, default=5000, help="crops in the train split")
    p.add_argument("--test", type=positive_int, default=2000, help="crops in the test split")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same files")
    p.add_argument("--jobs", type=positive_int, default=max(1, len(os.sched_getaffinity(0))),
                   help="processes drawing the crops (default: this machine's cores); the files do not depend on it")

    p = commands.add_parser("digits-synth", help="write generated photos and drawings of digits, read as resize=true "
                                                 "reads uploads (for the photo-cnn arch)")
    p.add_argument("--out", type=Path, default=Path("data/digits-synth"), help="folder for train.npz, val.npz, test.npz")
    for split, count in digits_synth.DEFAULT_COUNTS.items():
        p.add_argument(f"--{split}", type=positive_int, default=count,
                       help="non-digit pictures, for outlier exposure" if split == "outliers"
                       else f"pictures in the {split} split")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same files")
    p.add_argument("--jobs", type=positive_int, default=max(1, len(os.sched_getaffinity(0))),
                   help="processes drawing the pictures (this machine's cores); the files do not depend on it")

    p = commands.add_parser("feedback-data", help="turn a server's prediction log and the labels told through "
                                                  "/feedback into extra training data (for digits --extra-train)")
    p.add_argument("--log", type=Path, required=True, help="the server's --prediction-log folder")
    p.add_argument("--out", type=Path, required=True, help="the .npz to write (x: the arrays the model took, y)")
    p.add_argument("--model", help="only this model's predictions")
    p.add_argument("--shape", help="only inputs of this shape, e.g. 1x8x8 (default: the commonest)")

    p = commands.add_parser("export", help="export a run's best checkpoint to TorchScript + ONNX with a manifest")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder that python -m training wrote (runs/...)")
    p.add_argument("--name", help="export name (default TASK-ARCH, e.g. digits-cnn)")
    p.add_argument("--to", type=Path, default=Path("exports"), help="exports folder the server loads")
    add_replace_flag(p)
    return parser


def check_before_torch(args) -> None:
    """Every check that needs no torch, so that a mistake is reported at once, before anything is written."""
    if args.command == "digits" and not args.all and args.arch is None:
        raise UsageError("choose --arch {" + ",".join(DIGITS_ARCHS) + "} or --all")
    if args.command == "svhn":
        svhn.check_val_fraction(args.val_fraction)
    if args.command in ("digits", "svhn", "svhn-synth", "digits-synth"):
        check_writable(args.out)
    if args.command == "feedback-data":
        check_writable(args.out.parent)
    if getattr(args, "export_to", None) is not None:
        check_writable(args.export_to)
    if getattr(args, "name", None) and (problem := name_error(args.name)):
        raise UsageError(problem)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        (commands,) = (action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
        parser.error(unknown_flags_message(extra, commands.choices[args.command]))
    try:
        mode = getattr(args, "reproducible", False)  # True: asked for; None: where the machine allows; False: off
        if mode is not False:
            if args.device.startswith("cuda"):
                if mode:
                    raise UsageError(f"reproducible mode trains on the CPU only; pass --no-reproducible to train "
                                     f"on {args.device}")
                args.reproducible = False
            else:
                args.device = "cpu" if args.device == "auto" else args.device
                reproducible.pin_before_torch(required=bool(mode))
        check_before_torch(args)
        from training.commands import COMMANDS  # torch is imported here, after the pins
        COMMANDS[args.command](args)
    except tuple(EXIT_STATUS) as err:
        print(f"python -m training: error: {err}", file=sys.stderr)
        return EXIT_STATUS[type(err)]
    return 0


if __name__ == "__main__":
    sys.exit(main())
