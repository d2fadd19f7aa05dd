"""SVHN format 2 (32x32 cropped digits): the official .mat files and a leak-free validation split
(synthetic crops in the same layout: training/synthetic.py).

Official layout: `X` uint8 [32, 32, 3, N], `y` [N, 1] with 10 meaning digit 0. The `extra` split
is never used.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export_contract import svhn_mat
from training.errors import DataError

FILES = {  # split -> (file name, official MD5), as torchvision's SVHN dataset checks them
    "train": ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
}
MIN_VAL_FRACTION = 0.1
SYNTHETIC_RECORD = "synthetic.json"  # written by `svhn-synth` beside its .mat files

INPUT_SPEC = {"name": "pixels", "shape": [None, 3, 32, 32], "dtype": "uint8", "range": [0, 255],
              "layout": "NCHW", "color": "RGB"}


@dataclass
class Arrays:
    x: np.ndarray  # N x 3 x 32 x 32 uint8
    y: np.ndarray  # N int64, 0..9
    md5: str       # of the file it came from


def load_split(data_dir: Path, split: str, verify_md5: bool = True) -> Arrays:
    """One official split from `data_dir`, checked: MD5, shapes, dtype, label range."""
    name, expected_md5 = FILES[split]
    path = data_dir / name
    hint = f"put the official SVHN files {FILES['train'][0]} and {FILES['test'][0]} in {data_dir} or pass --download"
    if not path.is_file():
        raise DataError(f"{path} is missing: {hint}")
    digest = svhn_mat.md5(path)
    if verify_md5 and digest != expected_md5:
        raise DataError(f"{path} is not the official file (MD5 differs from {expected_md5}): pass --skip-md5 for "
                        f"your own or synthetic files (python -m training svhn-synth), or --download to fetch the "
                        f"official ones")
    try:
        x, y = svhn_mat.read(path)
    except svhn_mat.MatFileError as err:
        raise DataError(str(err)) from None
    return Arrays(x, y, digest)


def data_record(data_dir: Path, train: Arrays, test: Arrays) -> dict:
    """What the model was trained and tested on, for its manifest: the official SVHN files, synthetic
    crops this package wrote (SYNTHETIC_RECORD beside them, with their MD5s), or other files in the layout.
    The test file's name and MD5 let a server re-evaluate the model on a data folder (`--data-dir`)."""
    test_file = {"file": FILES["test"][0], "md5": test.md5, "n": len(test.y)}
    if (train.md5, test.md5) == (FILES["train"][1], FILES["test"][1]):
        return {"name": "svhn", "test_file": test_file,
                "description": "SVHN format 2: the official train_32x32.mat (73,257 crops, a stratified part "
                               "held out for validation) and test_32x32.mat (26,032), MD5-checked"}
    try:
        written = json.loads((data_dir / SYNTHETIC_RECORD).read_text())
    except (OSError, ValueError):
        written = None
    if isinstance(written, dict) and written.get("md5") == {"train": train.md5, "test": test.md5}:
        return {"name": "svhn-synthetic", "test_file": test_file,
                "description": f"synthetic house-number crops, not SVHN: `{written['command']}` "
                               f"({len(train.y):,} crops in the train file, {len(test.y):,} in the test file); for a model of "
                               f"real house numbers: python -m training svhn --download"}
    return {"name": "svhn-format", "test_file": test_file,
            "description": f"files in SVHN's .mat layout that are neither the official ones nor synthetic crops "
                           f"written here (train MD5 {train.md5}, {len(train.y):,} crops; test {len(test.y):,})"}


def download(data_dir: Path) -> None:
    """Fetch both official splits through torchvision (which verifies their MD5s)."""
    from torchvision.datasets import SVHN
    for split in FILES:
        try:
            SVHN(str(data_dir), split=split, download=True)
        except Exception as err:  # network and checksum failures come as several types
            raise DataError(f"downloading SVHN {split} into {data_dir} failed: {err}") from None


def check_val_fraction(val_fraction: float) -> None:
    if not MIN_VAL_FRACTION <= val_fraction < 1:
        raise DataError(f"--val-fraction must be at least {MIN_VAL_FRACTION} and below 1 (got {val_fraction})")


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split of the official training set into (train, val) indices.

    Validation takes the same fraction of every class; train is the complement, so the two are
    disjoint by construction (the original notebook trained on its validation images).
    """
    check_val_fraction(val_fraction)
    rng = np.random.default_rng(seed)
    val = []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        rng.shuffle(members)
        val.append(members[:int(round(len(members) * val_fraction))])
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx, assume_unique=True)
    return train_idx, val_idx


