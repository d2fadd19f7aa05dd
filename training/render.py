"""Pictures as users take them: ink on paper under some light, blurred, noisy, maybe JPEG, either
polarity, then read the way the server reads an upload of another size (serving/resize.py, its own
code), so that what training sees is exactly what the model is fed. Shared by the non-digit pictures
(training/nondigits.py) and the photo-like digits (training/digits_synth.py).

Everything draws from one numpy Generator: the same seed gives the same pictures.
"""
import io

import numpy as np
from PIL import Image, ImageFilter

from serving import images, resize
from serving.errors import InputError


def canvas_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of a photo or scan: 160-480 px a side."""
    return int(rng.integers(160, 481)), int(rng.integers(160, 481))


def on_paper(rng: np.random.Generator, coverage: Image.Image) -> np.ndarray:
    """Ink coverage (L, 255 = ink) -> an 8-bit grey picture: paper from white to dim grey (or dark
    paper with light ink), at least 60 levels of contrast, a light gradient, blur and sensor noise."""
    paper = int(rng.integers(110, 256))
    ink = int(rng.integers(0, min(90, paper - 60)))
    if rng.random() < 0.5:  # light ink on dark: a screen, chalk, a negative
        paper, ink = 255 - paper, 255 - ink
    blurred = coverage.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.5))))
    cover = np.asarray(blurred, np.float32) / 255
    height, width = cover.shape
    rows, cols = np.mgrid[:height, :width].astype(np.float32)
    angle, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0, 30)
    light = strength * ((np.cos(angle) * cols / width + np.sin(angle) * rows / height) - 0.5)
    pixels = paper + light + (ink - paper) * cover + rng.normal(0, rng.uniform(0, 8), cover.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def as_upload(rng: np.random.Generator, pixels: np.ndarray) -> Image.Image:
    """Encoded and decoded as an upload is: PNG, or JPEG at quality 60-95 three times in ten."""
    buffer = io.BytesIO()
    picture = Image.fromarray(pixels)
    if rng.random() < 0.3:
        picture.save(buffer, "JPEG", quality=int(rng.integers(60, 96)))
    else:
        picture.save(buffer, "PNG")
    return images.decode(images.open_image(buffer.getvalue()))


def model_input(picture: Image.Image, spec: dict) -> np.ndarray | None:
    """What the server would feed a model of input `spec` for this upload with resize=true (C x H x W
    in the model's dtype), or None where the server would refuse it (no digit found: 422)."""
    pixels = images.to_gray_or_rgb(picture, spec["color"])
    try:
        return resize.fitted_input(pixels, spec, None)
    except InputError:
        return None
