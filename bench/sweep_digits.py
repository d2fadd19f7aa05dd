"""Compare a digits recipe variant on the validation split: the tool behind the sweep tables in RESULTS.md.

    .venv/bin/python -m bench.sweep_digits --arch mlp --model dropout=0.05 --seeds 0 1 2 3 4 5
    .venv/bin/python -m bench.sweep_digits --arch mlp --recipe ema_decay=0.99 ema_bias_correction=true
    .venv/bin/python -m bench.sweep_digits [--arch mlp] [--seeds 0 1 2] [--max-epochs 1000]

`--model` overrides keyword arguments of the architecture's builder (training/models.py) and
`--recipe` fields of its Recipe (training/recipes.py). Decide on the mean best validation NLL;
the test figures are printed for the record only. Also prints the longest stall before the best
epoch (epochs without val improvement), which is the least patience the variant needs.
Trains in memory and writes nothing, in reproducible mode (training/reproducible.py) as the CLI does.
"""
import argparse
import dataclasses
import json
import statistics

from training import reproducible

reproducible.pin_before_torch()  # before torch is imported: the arithmetic of `python -m training digits`
import torch  # noqa: E402

from training import digits  # noqa: E402
from training.loop import evaluate, fit  # noqa: E402
from training.recipes import DIGITS_ARCHS  # noqa: E402


def assignment(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, json.loads(value)  # numbers and true/false as JSON


def longest_stall(val_nll: list[float], best_epoch: int) -> int:
    best, stall, longest = float("inf"), 0, 0
    for value in val_nll[:best_epoch + 1]:
        stall = 0 if value < best else stall + 1
        best, longest = min(best, value), max(longest, stall)
    return longest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=list(DIGITS_ARCHS), default="mlp")
    parser.add_argument("--model", nargs="*", type=assignment, default=[], metavar="KEY=VALUE")
    parser.add_argument("--recipe", nargs="*", type=assignment, default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=1000)
    args = parser.parse_args()
    spec = DIGITS_ARCHS[args.arch]
    try:  # unknown names fail here, before any training
        recipe = dataclasses.replace(spec.recipe, **dict(args.recipe))
        spec.build(**dict(args.model))
    except TypeError as error:
        parser.error(str(error))
    reproducible.activate(torch.device("cpu"))
    train, val, test = (digits.load_split(name) for name in ("train", "val", "test"))
    print("| seed | best val NLL | best epoch / run | longest stall | test errors | test NLL | train s |\n"
          "|---|---|---|---|---|---|---|")
    best_nlls, test_errors = [], []
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = spec.build(**dict(args.model))
        history = fit(model, train.x, train.y, val.x, val.y, recipe, max_epochs=args.max_epochs, patience=20, progress=False)
        result = evaluate(model, test.x, test.y)
        best_nlls.append(min(history.val_nll))
        test_errors.append(result.errors)
        print(f"| {seed} | {best_nlls[-1]:.4f} | {history.best_epoch} / {history.epochs_run} | "
              f"{longest_stall(history.val_nll, history.best_epoch)} | {result.errors} | {result.nll:.4f} | "
              f"{history.train_seconds:.1f} |", flush=True)
    print(f"\nmean best val NLL {statistics.mean(best_nlls):.4f} over seeds {args.seeds}; "
          f"test errors {test_errors} (median {statistics.median(test_errors):g}, for the record)")


if __name__ == "__main__":
    main()
