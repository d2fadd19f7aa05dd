"""Real traffic as training data: the prediction log of a server run with `--prediction-log DIR
--log-inputs model` (or upload), joined with the true labels told through POST /feedback, written as
one .npz of the arrays the model took and their true labels, for `python -m training digits
--extra-train FILE` (added to the training split only: validation and test stay the dataset's).

    python -m training feedback-data --log DIR --out feedback.npz [--model NAME] [--shape 1x8x8]

Only predictions that were logged with their input and told their label are used; the JSON lines are
read as data (no pickle, no eval). A told prediction whose input was not logged is counted and left out.
"""
import json
from collections import Counter
from pathlib import Path

import numpy as np

from training.errors import DataError


def shape_text(shape: tuple) -> str:
    return "x".join(map(str, shape))


def read_log(folder: Path) -> tuple[dict[str, dict], dict[str, int]]:
    """Prediction lines by ID (the first of an ID wins, as in the feedback store) and the true label
    told for each ID, from every file of the log (rotated ones too)."""
    files = sorted(folder.glob("predictions-*.jsonl*"))
    if not files:
        raise DataError(f"{folder}: no prediction log files (predictions-*.jsonl): was the server started with "
                        "--prediction-log there?")
    predictions, truths = {}, {}
    for path in files:
        with open(path, encoding="utf-8") as file:
            for number, text in enumerate(file, 1):
                try:
                    line = json.loads(text)
                    kind, key = line["type"], line["id"]
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"{path}:{number}: not a prediction-log line") from None
                if kind == "prediction":
                    predictions.setdefault(key, line)
                elif kind == "feedback":
                    truths[key] = line["truth"]
    return predictions, truths


def labelled(folder: Path, model: str | None, shape: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(x N x C x H x W, y N, a summary) of the told predictions with logged inputs, of one input shape:
    `shape` ("1x8x8"), else the shape most of them have; `model`: that model's predictions only."""
    predictions, truths = read_log(folder)
    told = [(predictions[key], truth) for key, truth in truths.items() if key in predictions
            and (model is None or predictions[key]["model"] == model)]
    with_input = [(line, truth) for line, truth in told if "model_input" in line]
    if not with_input:
        raise DataError(f"{folder}: {len(told)} told predictions{f' of {model}' if model else ''}, none with its "
                        "input: start the server with --log-inputs model to log them")
    shapes = Counter(shape_text(line["input_shape"]) for line, _ in with_input)
    chosen = shape or shapes.most_common(1)[0][0]
    if chosen not in shapes:
        raise DataError(f"no told prediction of shape {chosen}; the log has {', '.join(sorted(shapes))}")
    rows = [(line, truth) for line, truth in with_input if shape_text(line["input_shape"]) == chosen]
    x = np.array([line["model_input"] for line, _ in rows], dtype=np.float32)
    y = np.array([truth for _, truth in rows], dtype=np.int64)
    wrong = sum(line["label"] != truth for line, truth in rows)
    summary = (f"{len(rows)} told predictions of shape {chosen} ({wrong} the model got wrong); "
               f"{len(told) - len(with_input)} told without their input left out")
    return x, y, summary


def write(x: np.ndarray, y: np.ndarray, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, x=x, y=y)


def load(path: Path, shape: tuple[int, ...], value_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """An --extra-train file, checked against the input the model takes; DataError if it is not one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"--extra-train {path}: not a feedback-data file ({err})") from None
    if x.ndim != 4 or tuple(x.shape[1:]) != shape or len(x) != len(y) or not len(y):
        raise DataError(f"--extra-train {path}: images {shape_text(x.shape)} and {len(y)} labels; the model takes "
                        f"N x {shape_text(shape)}")
    if not (np.isfinite(x).all() and x.min() >= value_range[0] and x.max() <= value_range[1]):
        raise DataError(f"--extra-train {path}: values outside {value_range[0]:g}..{value_range[1]:g}")
    if y.min() < 0 or y.max() > 9:
        raise DataError(f"--extra-train {path}: labels outside 0..9")
    return x, y
