"""Model architectures. Every model maps raw service pixels to log-probabilities N x 10.

Input scaling lives inside each model (a `Scale` layer or the raw-pixel seed models), so the
exported graph takes exactly what the server receives.
"""
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


def digits_mlp(hidden: int = 1024, dropout: float = 0.05) -> nn.Module:
    return nn.Sequential(
        Scale(mean=[0.0], std=[16.0]), nn.Flatten(),
        nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(hidden, NUM_CLASSES), nn.LogSoftmax(dim=1))


# --- SVHN ---

def conv_group(c_in: int, c_out: int) -> list[nn.Module]:
    # airbench-style group: conv, pool, BN, activation, conv, BN, activation. Pooling right after the
    # first conv halves the cost of everything that follows at no accuracy cost.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c_out), nn.GELU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


class Standardize(nn.Module):
    """Each image to zero mean and unit variance over its pixels. House-number photos vary in
    brightness, colour and contrast far more than in content; with dataset-wide constants instead,
    the CNN sat at chance for its first ~100 steps on synthetic crops."""

    def forward(self, x):
        x = x.float()
        return (x - x.mean(dim=(1, 2, 3), keepdim=True)) / (x.std(dim=(1, 2, 3), keepdim=True) + 1.0)


def svhn_cnn(widths=(64, 256, 256)) -> nn.Module:
    """~2.1M parameters at the default widths: per-image standardisation, stem conv, three conv
    groups (32 -> 16 -> 8 -> 4), 2x2 average pool, linear. The head keeps where features are (a
    global pool would not): the labelled digit is the centred one, its neighbours are cut by the edges."""
    return nn.Sequential(
        Standardize(),
        nn.Conv2d(3, widths[0] // 2, 3, padding=1, bias=False), nn.BatchNorm2d(widths[0] // 2), nn.GELU(),
        *conv_group(widths[0] // 2, widths[0]), *conv_group(widths[0], widths[1]), *conv_group(widths[1], widths[2]),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * widths[2], NUM_CLASSES), nn.LogSoftmax(dim=1))
