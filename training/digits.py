"""scikit-learn's 8x8 digits with the original notebook's fixed split. torch and scikit-learn load
when a split is: the command line reads INPUT_SPEC before torch may be imported."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# The original split, by position and without shuffling: the last 447 digits are the test set.
SPLITS = {"train": slice(0, 1000), "val": slice(1000, 1350), "test": slice(1350, 1797)}
PIXEL_MAX = 16.0  # load_digits() gives ink intensities 0..16


@dataclass
class Split:
    x: torch.Tensor  # N x 1 x 8 x 8 float32, raw 0..16 (models normalise inside their graph)
    y: torch.Tensor  # N int64

    def __len__(self):
        return len(self.y)


def split_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    """One split as numpy arrays: images N x 8 x 8 float32 on 0..16, labels N int64."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    part = SPLITS[name]
    return digits.images[part].astype(np.float32), digits.target[part].astype(np.int64)


def load_split(name: str, device: torch.device | str = "cpu") -> Split:
    """One split as tensors resident on `device` (the whole set is a few hundred KB)."""
    import torch
    images, labels = split_arrays(name)
    return Split(torch.from_numpy(images).unsqueeze(1).to(device), torch.from_numpy(labels).to(device))

# What an exported digits model takes: exactly what the service sends it.
INPUT_SPEC = {"name": "pixels", "shape": [None, 1, 8, 8], "dtype": "float32", "range": [0, PIXEL_MAX],
              "layout": "NCHW", "color": "grayscale", "polarity": "ink bright (16) on a dark (0) background"}
# What the models were trained and tested on, for their manifests.
DATA = {"name": "sklearn-digits",
        "description": "scikit-learn's 8x8 digits (1,797 images from UCI's optdigits), the original notebook's "
                       "split by position: 1,000 train, 350 validation, the last 447 test"}
