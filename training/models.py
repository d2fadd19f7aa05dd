"""Model architectures. Every model maps raw service pixels to log-probabilities N x 10.

Input scaling lives inside each model (a `Scale` layer or the raw-pixel seed models), so the
exported graph takes exactly what the server receives.
"""
import math

import torch
from torch import nn

NUM_CLASSES = 10


class Scale(nn.Module):
    """(x - mean) / std with constants stored as buffers, so they travel into TorchScript/ONNX."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x):
        return (x.float() - self.mean) / self.std


# --- The original notebook's architectures (faithful: raw 0..16 inputs, sigmoids) ---

def seed_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.Sigmoid(), nn.Linear(256, NUM_CLASSES),
                         nn.LogSoftmax(dim=1))


def seed_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 256), nn.Sigmoid(), nn.Linear(256, NUM_CLASSES), nn.LogSoftmax(dim=1))


# --- Improved digits models ---

def conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    # BatchNorm + GELU instead of bare sigmoids: well-scaled gradients, convergence in tens of epochs.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


def digits_cnn(width: int = 32, dropout: float = 0.3) -> nn.Module:
    return nn.Sequential(
        Scale(mean=[0.0], std=[16.0]),
        *conv_bn(1, width), *conv_bn(width, width), nn.MaxPool2d(2),              # 8x8 -> 4x4
        *conv_bn(width, 2 * width), *conv_bn(2 * width, 2 * width), nn.MaxPool2d(2),  # -> 2x2
        *conv_bn(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(dropout), nn.Linear(4 * width, NUM_CLASSES), nn.LogSoftmax(dim=1))


def digits_mlp(hidden: int = 512, dropout: float = 0.3) -> nn.Module:
    return nn.Sequential(
        Scale(mean=[0.0], std=[16.0]), nn.Flatten(),
        nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(hidden, NUM_CLASSES), nn.LogSoftmax(dim=1))


class Ensemble(nn.Module):
    """Members trained jointly on the NLL of their averaged probabilities; one graph when exported."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        log_probs = torch.stack([member(x) for member in self.members])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))
