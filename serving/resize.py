"""resize=true: a photo, scan or drawing of one digit, of any size, turned into what the model was
trained on. For the 8x8 digits that is how the UCI/scikit-learn digits were made (NIST's
preprocessing): the ink found (its polarity detected), its bounding box scaled into a 32x32 bitmap
with the aspect kept and centred, strokes about a block wide, and the ink of each 4x4 block counted
(0..16). For colour models (house-number crops): the photo's centre square, resampled.
"""
import numpy as np
from PIL import Image, ImageFilter

from serving.errors import InputError
from serving.images import model_input, spec_size

# In the UCI training split every digit spans all 8 rows, and its strokes are about a block wide.
SIDE = 8
FINE = 128  # the bitmap is drawn 4x finer than the dataset's 32x32, then averaged: no aliasing
PEN = 20  # thinner strokes are thickened to this (at FINE; 5 px of 32): thin ones read as other digits
WORK_SIDE = 512  # photos are first reduced to this (box filter): noise averages out, the rest is cheap
MIN_CONTRAST = 0.15  # ink this much darker (or brighter) than the background, on 0..1, or no digit
MIN_DIGIT_SHARE = 1 / 8  # of the image's shorter side: a smaller mark is a dot, a tap or dust, not a digit


def fitted_input(pixels8: np.ndarray, spec: dict, ink_dark: bool | None) -> np.ndarray:
    """A photo or drawing of another size -> what the model was trained on (resize=true)."""
    height, width = spec_size(spec)
    if spec["color"] == "grayscale":
        if (height, width) != (8, 8):
            raise InputError(f"resize=true knows the 8x8 digits' preprocessing, not a {width}x{height} "
                             "grayscale model's: send its exact size", 422)
        return digit_bitmap_counts(pixels8, ink_dark)[None].astype(spec["dtype"])
    return model_input(centre_square(pixels8, (height, width)), spec, bool(ink_dark))


def centre_square(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """SVHN crops are square windows around the digit: cut the photo's centre square (the digit is
    assumed centred), then resample it; squashing a wide photo would distort the digit."""
    height, width = rgb.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(np.ascontiguousarray(rgb[top:top + side, left:left + side]), "RGB")
    return np.asarray(square.resize((size[1], size[0]), Image.Resampling.LANCZOS, reducing_gap=3.0))


def digit_bitmap_counts(gray: np.ndarray, ink_dark: bool | None) -> np.ndarray:
    """A photo or drawing of one digit (8-bit gray, any size) -> the 8x8 block counts on 0..16.

    `ink_dark`: dark ink on a light background; None: the ink is what departs furthest from the
    border's median (the background), darker or brighter."""
    image = Image.fromarray(gray, "L")
    if max(image.size) > WORK_SIDE:
        scale = WORK_SIDE / max(image.size)  # a side never below 1 px (an 8192 x 8 upload exists)
        image = image.resize(tuple(max(1, round(side * scale)) for side in image.size), Image.Resampling.BOX)
    values = np.asarray(image, dtype=np.float32) / 255
    border = np.concatenate([values[0], values[-1], values[:, 0], values[:, -1]])
    background = float(np.median(border))
    if ink_dark is None:
        ink_dark = background - values.min() > values.max() - background
    ink = background - values if ink_dark else values - background
    peak = float(ink.max())
    if peak < MIN_CONTRAST:
        raise InputError("no digit found: the image is blank or its ink too faint (resize=true looks for one "
                         "digit darker or brighter than its background)", 422)
    ink = np.clip(ink / peak, 0.0, 1.0)
    mask = ink > 0.5
    mask &= neighbours(mask) >= 3  # isolated specks are noise, not the digit
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise InputError("no digit found: only specks differ from the background", 422)
    extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    if extent < MIN_DIGIT_SHARE * min(values.shape):
        raise InputError(f"no digit found: the ink spans {extent / min(values.shape):.0%} of the image; crop the "
                         "photo to the digit (it should fill most of the picture)", 422)
    bitmap = thickened(centred(ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]))
    block = FINE // SIDE
    return bitmap.reshape(SIDE, block, SIDE, block).mean(axis=(1, 3)) * 16


def neighbours(mask: np.ndarray) -> np.ndarray:
    """How many of each pixel's 3x3 neighbourhood (itself included) are set."""
    padded = np.pad(mask, 1).astype(np.uint8)
    height, width = mask.shape
    return sum(padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3))


def centred(box: np.ndarray) -> np.ndarray:
    """The digit's box scaled, aspect kept, to fill the bitmap's height (or its width, for a wide
    digit), centred in a FINE x FINE bitmap of ink 0..1."""
    height, width = box.shape
    scale = FINE / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    scaled = np.asarray(Image.fromarray(box, "F").resize((new_width, new_height), Image.Resampling.BOX))
    bitmap = np.zeros((FINE, FINE), np.float32)
    top, left = (FINE - new_height) // 2, (FINE - new_width) // 2
    bitmap[top:top + new_height, left:left + new_width] = np.clip(scaled, 0.0, 1.0)
    return bitmap


def thickened(bitmap: np.ndarray) -> np.ndarray:
    """Strokes thinner than PEN grown to it. Width = 2 x area / edge length: a stroke of width w
    and length L covers w*L pixels and has 2L edge pixels."""
    mask = bitmap > 0.5
    edge = np.count_nonzero(mask & (neighbours(mask) < 9))
    width = 2 * np.count_nonzero(mask) / max(edge, 1)
    steps = round((PEN - width) / 2)  # each 3x3 maximum adds a pixel on both sides
    if steps <= 0:
        return bitmap
    image = Image.fromarray(np.round(bitmap * 255).astype(np.uint8), "L")
    for _ in range(steps):
        image = image.filter(ImageFilter.MaxFilter(3))
    return np.asarray(image, dtype=np.float32) / 255
