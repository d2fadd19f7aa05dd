"""How far the committed models' answers can be trusted (issue 23's targets), measured on what each
export carries: its test split and its non-digit test pictures, through ONNX Runtime with its own
calibration record (export_contract/calibration.py), as the server answers.

    .venv/bin/python -m bench.trust [--models digits-cnn digits-mlp digits-photo-cnn svhn-synthetic-cnn]
                                    [--bootstrap 2000] [--seed 0]

ECE on 447 digits is noisy: each figure comes with a 95 % bootstrap interval (the test split resampled
with replacement).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from export_contract import calibration, test_split
from serving.backends import BACKENDS

ROOT = Path(__file__).resolve().parents[1]


def outputs(folder: Path, manifest: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    artifact = manifest["artifacts"]["onnx"]["file"]
    runner = BACKENDS["onnx"]((folder / artifact).read_bytes(), artifact, "cpu", manifest["input"]["name"])
    parts = [runner(x[i:i + 512]) for i in range(0, len(x), 512)]
    scores = None if parts[0][1] is None else np.concatenate([s for _, s in parts])
    return np.concatenate([lp for lp, _ in parts]), scores


def interval(values: np.ndarray) -> str:
    low, high = np.percentile(values, [2.5, 97.5])
    return f"{low:.2%}-{high:.2%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["digits-cnn", "digits-mlp", "digits-photo-cnn",
                                                         "svhn-synthetic-cnn"])
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"## Answers a user can trust (`python -m bench.trust {' '.join(sys.argv[1:])}`)\n")
    print("| model | T | test ECE before -> after (95 % interval after) | test NLL before -> after | answered | "
          "right among answered | conformal coverage (level) | mean set size | non-digits refused (not a digit) |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        folder = ROOT / "exports" / name
        manifest = json.loads((folder / "model.json").read_text())
        record = manifest["calibration"]
        item = manifest["test_set"]
        x, y = test_split.read((folder / item["file"]).read_bytes(), manifest["input"], item["n"])
        log_probs, scores = outputs(folder, manifest, x)
        nondigit = record.get("nondigits")
        pictures = test_split.read_images((folder / nondigit["file"]).read_bytes(), manifest["input"], nondigit["n"],
                                          nondigit["file"]) if nondigit else None
        figures = calibration.figures(log_probs, scores, y, record,
                                      *(outputs(folder, manifest, pictures) if pictures is not None else (None, None)))
        probs = calibration.probabilities(log_probs, record["temperature"])
        resampled = [calibration.ece(probs[sample], y[sample])
                     for sample in (rng.integers(0, len(y), len(y)) for _ in range(args.bootstrap))]
        selective, conformal, n = figures["selective"], figures["conformal"], len(y)
        refused = figures.get("nondigits")
        print(f"| {name} | {record['temperature']:.3f} | {figures['before']['ece']:.2%} -> {figures['after']['ece']:.2%} "
              f"({interval(np.array(resampled))}) | {figures['before']['nll']:.4f} -> {figures['after']['nll']:.4f} | "
              f"{selective['answered']}/{n} ({selective['answered'] / n:.1%}) | "
              f"{selective['right']}/{selective['answered']} ({selective['right'] / max(1, selective['answered']):.2%}) | "
              f"{conformal['covered'] / n:.2%} ({record['conformal']['level']:.0%}) | {conformal['mean_size']:.3f} | "
              + (f"{refused['not_answered'] / refused['n']:.1%} ({refused['not_a_digit'] / refused['n']:.1%}) |"
                 if refused else "— |"))
    print("\nDecision rules (chosen on validation, `calibration.not_a_digit` in each manifest): " + "; ".join(
        f"{name}: {json.loads((ROOT / 'exports' / name / 'model.json').read_text())['calibration']['not_a_digit']['method']}"
        for name in args.models))


if __name__ == "__main__":
    main()
