"""Writes the sample images the README's examples send (run from the repository root, with the
training dependencies: `.venv/bin/python samples/make.py`). The same files on every run with the
same Pillow (its zlib and libjpeg).

- digit-8x8-<label>.png: digits of the test split, exactly as the 8x8 model takes them (ink bright
  on dark, 0..16 scaled to 0..255);
- photo-4.jpg: a "4" written in dark ink on a 240x200 sheet of grey, unevenly lit paper, slightly
  blurred, noisy and JPEG-compressed, as a phone photo would be (send it with resize=true);
- house-number-32x32-<label>.png: a synthetic SVHN-layout crop (training/synthetic.py), for an SVHN model.
"""
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from training import digits, synthetic

HERE = Path(__file__).resolve().parent
TEST_INDICES = (3, 7, 12)  # three different labels from the test split


def main() -> None:
    x, y = digits.split_arrays("test")
    for index in TEST_INDICES:
        pixels = np.round(x[index] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, "L").save(HERE / f"digit-8x8-{y[index]}.png", optimize=True)

    rng = np.random.default_rng(4)
    ink = Image.new("L", (240, 200))
    ImageDraw.Draw(ink).line([(140, 175), (138, 30), (70, 125), (175, 125)], fill=255, width=14, joint="curve")
    ink = ink.rotate(-4, resample=Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(1.2))
    light = np.linspace(215, 170, 240)[None, :] + np.linspace(0, 20, 200)[:, None]  # lit from the left
    paper = light - (light - 40) * np.asarray(ink, np.float32) / 255 + rng.normal(0, 4, (200, 240))
    photo = io.BytesIO()
    Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8), "L").convert("RGB").save(photo, "JPEG", quality=80)
    (HERE / "photo-4.jpg").write_bytes(photo.getvalue())

    crops, labels = synthetic.synthetic_crops(1, seed=5)  # X is 32 x 32 x 3 x N; y is 1..10 with 10 for zero
    label = int(labels[0, 0]) % 10
    Image.fromarray(crops[..., 0], "RGB").save(HERE / f"house-number-32x32-{label}.png", optimize=True)


if __name__ == "__main__":
    main()
