"""Batched on-device augmentation: whole batches at once, no per-sample Python loops."""
import torch
import torch.nn.functional as F


def random_translate(x: torch.Tensor, max_shift: int, pad_mode: str = "constant") -> torch.Tensor:
    """Shift every image by its own random offset in [-max_shift, max_shift]^2 (pad, then crop).

    Zero padding suits digits (dark background); reflect padding suits photos. Never flips:
    a mirrored 2 or 5 is not a digit.
    """
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode=pad_mode)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), device=x.device)
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]  # n,1,h,1
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]  # n,1,1,w
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


def random_affine(x: torch.Tensor, degrees: float, scale: float, shift: float) -> torch.Tensor:
    """Small random rotation, zoom and sub-pixel shift per image (bilinear, zero fill).

    Handwriting varies in slant, size and position; these are the variations the test writers add.
    `shift` is in pixels.
    """
    n, _, h, w = x.shape
    angle = (torch.rand(n, device=x.device) * 2 - 1) * degrees * torch.pi / 180
    zoom = 1 + (torch.rand(n, device=x.device) * 2 - 1) * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    offset = (torch.rand(2, n, device=x.device) * 2 - 1) * shift * 2 / torch.tensor([[w], [h]], device=x.device)
    theta = torch.stack([torch.stack([cos, -sin, offset[0]], 1), torch.stack([sin, cos, offset[1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cutout(x: torch.Tensor, size: int) -> torch.Tensor:
    """Fill one random size x size square per image (may overhang the border) with the image's own
    mean colour: forces the model to use the whole digit rather than one stroke. Not black: on
    0..255 photos a black square is the strongest edge in the image, and the SVHN CNN spent its
    first epochs at chance learning to look at it."""
    n, _, h, w = x.shape
    top = torch.randint(-size // 2, h - size // 2, (n, 1, 1, 1), device=x.device)
    left = torch.randint(-size // 2, w - size // 2, (n, 1, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
    hole = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return torch.where(hole, x.mean(dim=(2, 3), keepdim=True), x)
