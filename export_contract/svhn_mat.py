"""SVHN format 2's `.mat` layout, read alike by training (its splits) and serving (`/evaluate` on the
test file a manifest names): `X` uint8 [32, 32, 3, N], `y` [N, 1] in 1..10 with 10 meaning digit 0.

SciPy reads the file (MATLAB v5, no pickle involved); it is imported only when a file is read, so a
server that never evaluates on a data folder does not need it.
"""
import hashlib
from pathlib import Path

import numpy as np


class MatFileError(ValueError):
    """The file is not a readable SVHN-layout .mat file; the message says what is wrong."""


def md5(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images N x 3 x 32 x 32 uint8 (the exported models' input layout) and labels N int64 in 0..9."""
    import scipy.io
    try:
        mat = scipy.io.loadmat(path)
    except Exception as err:  # scipy raises several types for unreadable files
        raise MatFileError(f"{path} is not a readable .mat file: {err}") from None
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise MatFileError(f"{path}: X must be uint8 [32, 32, 3, N], got "
                           f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
    if not isinstance(y, np.ndarray) or y.size != x.shape[3] or y.ndim not in (1, 2) or y.dtype.kind not in "iuf":
        raise MatFileError(f"{path}: y must hold one label per image ({x.shape[3]}), got "
                           f"{list(getattr(y, 'shape', []))}")
    labels = y.reshape(-1)
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise MatFileError(f"{path}: labels must be integers")
    labels = labels.astype(np.int64)
    if labels.min() < 1 or labels.max() > 10:
        raise MatFileError(f"{path}: labels must lie in 1..10 (10 = digit 0), got {labels.min()}..{labels.max()}")
    labels[labels == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels
