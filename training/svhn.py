"""SVHN format 2 (32x32 cropped digits): the official .mat files and a leak-free validation split
(synthetic crops in the same layout: training/synthetic.py).

Official layout: `X` uint8 [32, 32, 3, N], `y` [N, 1] with 10 meaning digit 0. The `extra` split
is never used.
"""
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.errors import DataError

FILES = {  # split -> (file name, official MD5), as torchvision's SVHN dataset checks them
    "train": ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
}
MIN_VAL_FRACTION = 0.1

INPUT_SPEC = {"name": "pixels", "shape": [None, 3, 32, 32], "dtype": "uint8", "range": [0, 255],
              "layout": "NCHW", "color": "RGB"}


@dataclass
class Arrays:
    x: np.ndarray  # N x 3 x 32 x 32 uint8
    y: np.ndarray  # N int64, 0..9


def md5(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def load_split(data_dir: Path, split: str, verify_md5: bool = True) -> Arrays:
    """One official split from `data_dir`, checked: MD5, shapes, dtype, label range."""
    name, expected_md5 = FILES[split]
    path = data_dir / name
    hint = f"put the official SVHN files {FILES['train'][0]} and {FILES['test'][0]} in {data_dir} or pass --download"
    if not path.is_file():
        raise DataError(f"{path} is missing: {hint}")
    if verify_md5 and md5(path) != expected_md5:
        raise DataError(f"{path} is not the official file (MD5 differs from {expected_md5}): pass --skip-md5 for "
                        f"your own or synthetic files (python -m training svhn-synth), or --download to fetch the "
                        f"official ones")
    import scipy.io
    try:
        mat = scipy.io.loadmat(path)  # MATLAB v5 parser: no pickle involved
    except Exception as err:  # scipy raises several types for unreadable files
        raise DataError(f"{path} is not a readable .mat file: {err}") from None
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise DataError(f"{path}: X must be uint8 [32, 32, 3, N], got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
    if not isinstance(y, np.ndarray) or y.size != x.shape[3] or y.ndim not in (1, 2) or y.dtype.kind not in "iuf":
        raise DataError(f"{path}: y must hold one label per image ({x.shape[3]}), got {list(getattr(y, 'shape', []))}")
    labels = y.reshape(-1)
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise DataError(f"{path}: labels must be integers")
    labels = labels.astype(np.int64)
    if labels.min() < 1 or labels.max() > 10:
        raise DataError(f"{path}: labels must lie in 1..10 (10 = digit 0), got {labels.min()}..{labels.max()}")
    labels[labels == 10] = 0
    return Arrays(np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels)


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


# --- synthetic crops in the official layout ---
