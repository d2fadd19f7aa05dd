"""Uploaded images and pixel arrays -> the exact arrays an exported model takes.

Everything here is pure NumPy + Pillow and raises `InputError` (an HTTP status and a message) for
anything a client got wrong; it never touches a model. Decoding is CPU work: the service runs it in
a decoder thread, off the event loop, unless the request is small (serving/service.py).
"""
import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from serving.errors import InputError

# Declared width x height above which an upload is refused before any pixel is decoded: a small
# file can declare a gigapixel canvas (a decompression bomb). 4096 x 4096 covers any real photo.
MAX_DECLARED_PIXELS = 4096 * 4096
Image.MAX_IMAGE_PIXELS = MAX_DECLARED_PIXELS  # Pillow's own guard, as a second line
# The formats the service documents; Pillow would otherwise try a dozen more decoders (TIFF, ICO,
# PCX, SGI, ...), each one more parser for an attacker to reach.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
GREY_SPREAD = 12  # mean channel spread (0..255) below which an RGB image is taken as grey
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # Pillow modes without colour channels


def spec_size(spec: dict) -> tuple[int, int]:
    """(height, width) from a manifest input spec (N x C x H x W)."""
    return spec["shape"][2], spec["shape"][3]


def open_image(data: bytes) -> Image.Image:
    """Read the header only (size, mode): nothing is decoded yet. Refuses non-images and bombs."""
    if not data:
        raise InputError("empty upload", 400)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"image declares too many pixels (limit {MAX_DECLARED_PIXELS})", 413) from None
    except UnidentifiedImageError:
        raise InputError("not an image (accepted: PNG, JPEG, BMP, GIF, WebP)", 400) from None
    except Exception as err:  # a header Pillow recognised but cannot parse: many types (OSError, KeyError, ...)
        raise InputError(f"corrupt image header: {one_line(err)}", 400) from None
    width, height = image.size
    if width * height > MAX_DECLARED_PIXELS or width <= 0 or height <= 0:
        raise InputError(f"image declares {width}x{height} pixels (limit {MAX_DECLARED_PIXELS})", 413)
    return image


def decode(image: Image.Image) -> Image.Image:
    """The first frame (GIF, animated WebP), decoded, with its EXIF orientation applied."""
    try:
        image.seek(0)
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as err:  # decoders raise OSError, ValueError, SyntaxError, EOFError, struct.error, ...
        raise InputError(f"truncated or corrupt image: {one_line(err)}", 400) from None


def looks_grey(image: Image.Image) -> bool:
    """No colour to speak of (a scan, a drawing, a grey photo saved as RGB): its channels differ by
    less than GREY_SPREAD on average, judged on a thumbnail."""
    if image.mode in GREY_MODES:
        return True
    thumbnail = image.convert("RGB")
    thumbnail.thumbnail((64, 64))
    channels = np.asarray(thumbnail, dtype=np.int16)
    return float((channels.max(axis=2) - channels.min(axis=2)).mean()) < GREY_SPREAD


def one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def to_gray_or_rgb(image: Image.Image, color: str) -> np.ndarray:
    """8-bit grayscale (H x W) or RGB (H x W x 3), whatever the source mode.

    Transparent pixels become the dark background; 16-bit images are scaled, not clipped.
    """
    try:
        return convert(image, color)
    except Exception as err:  # a mode or palette Pillow cannot convert (OSError, ValueError, KeyError, ...)
        raise InputError(f"cannot convert a {image.mode} image: {one_line(err)}", 400) from None


def convert(image: Image.Image, color: str) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 0..65535 -> 0..255, rounded, in integers and in place: a 4096 x 4096 upload needs one 64 MB array
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        values += 128
        values //= 257
        image = Image.fromarray(values.astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    target = "L" if color == "grayscale" else "RGB"
    return np.asarray(image.convert(target))  # CMYK, YCbCr, 1, ... all convert


def model_input(pixels8: np.ndarray, spec: dict, invert: bool) -> np.ndarray:
    """8-bit pixels of the model's exact size (H x W or H x W x 3) -> one C x H x W array in the
    model's dtype and range."""
    high = spec["range"][1]
    if spec["color"] == "grayscale":
        values = pixels8.astype(np.float32) * (high / 255.0)  # digits: 0..255 -> 0..16
        if invert:
            values = high - values
        return values[None].astype(spec["dtype"])
    values = pixels8.transpose(2, 0, 1)
    if invert:
        values = 255 - values
    return np.ascontiguousarray(values).astype(spec["dtype"])


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


# How the UCI/scikit-learn 8x8 digits were made (NIST's preprocessing): each digit's bounding box
# scaled into a 32x32 bitmap, then the ink pixels of each 4x4 block counted (0..16). In the
# training split every digit spans all 8 rows, and its strokes are about a block wide.
SIDE = 8
FINE = 128  # the bitmap is drawn 4x finer than the dataset's 32x32, then averaged: no aliasing
PEN = 20  # thinner strokes are thickened to this (at FINE; 5 px of 32): thin ones read as other digits
WORK_SIDE = 512  # photos are first reduced to this (box filter): noise averages out, the rest is cheap
MIN_CONTRAST = 0.15  # ink this much darker (or brighter) than the background, on 0..1, or no digit
MIN_DIGIT_SHARE = 1 / 8  # of the image's shorter side: a smaller mark is a dot, a tap or dust, not a digit


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


def decode_base64(text: object) -> bytes:
    if not isinstance(text, str):
        raise InputError("images[] must be base64 strings", 422)
    if text.startswith("data:"):  # a data URL, as browsers produce
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("images[] entry is not valid base64", 400) from None


def numbers(value: object, message: str) -> np.ndarray:
    """JSON numbers as a float64 array; `message` (422) for ragged lists, strings, or integers beyond
    float range (JSON allows 10**400)."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        raise InputError(message, 422) from None


def value_problem(values: np.ndarray, spec: dict) -> str | None:
    """Why raw values do not fit a model's input spec (range, and integers for uint8 models), or None."""
    low, high = spec["range"]
    if not np.isfinite(values).all() or values.min() < low or values.max() > high:
        return f"values must lie in [{low:g}, {high:g}]"
    if spec["dtype"] == "uint8" and not np.array_equal(values, np.round(values)):
        return "values must be integers"
    return None


def as_pixels(array: np.ndarray) -> list:
    """A model-ready C x H x W array as the `pixels` JSON entry it equals (8x8, or H x W x 3): what the
    model saw, for a client to display or to send again."""
    values = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    return np.round(values.astype(np.float64), 2).tolist()


def pixels_input(array: np.ndarray, spec: dict, invert: bool) -> np.ndarray:
    """A raw pixel array of the model's shape (H x W, or H x W x C) -> its C x H x W array, checked
    against the model's range and dtype."""
    problem = value_problem(array, spec)
    if problem:
        raise InputError(f"pixel {problem}", 422)
    if invert:
        array = spec["range"][1] - array
    chw = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return np.ascontiguousarray(chw).astype(spec["dtype"])
