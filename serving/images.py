"""Uploads decoded safely, and images and pixel arrays turned into the exact arrays a model takes.

Everything here is pure NumPy + Pillow and raises `InputError` (an HTTP status and a message) for
anything a client got wrong; it never touches a model. Decoding is CPU work: the service runs it in
a decoder thread, off the event loop, unless the request is small (serving/service.py). Photos of
another size, read the way the training data was made (resize=true): serving/resize.py.
"""
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


def decode(image: Image.Image, at_least: int | None = None) -> Image.Image:
    """The first frame (GIF, animated WebP), decoded, with its EXIF orientation applied. `at_least`: a
    JPEG may be decoded at a reduced scale (1/2 to 1/8, by its own DCT) while both sides keep at least
    this many pixels: a 12 MP phone photo costs a fraction of its full decode."""
    try:
        image.seek(0)
        if at_least is not None and image.format == "JPEG":
            image.draft(image.mode, (at_least, at_least))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # not a copy of every upload, rotated or not
        return image
    except Exception as err:  # decoders raise OSError, ValueError, SyntaxError, EOFError, struct.error, ...
        raise InputError(f"truncated or corrupt image: {one_line(err)}", 400) from None


def looks_grey(image: Image.Image) -> bool:
    """No colour to speak of (a scan, a drawing, a grey photo saved as RGB): once the picture's overall
    cast is taken out (the paper's tint, a warm lamp: each channel scaled so that the median colour is
    grey), its channels differ by less than GREY_SPREAD on average, judged on a thumbnail."""
    if image.mode in GREY_MODES:
        return True
    thumbnail = image.convert("RGB")
    thumbnail.thumbnail((64, 64))
    channels = np.asarray(thumbnail, dtype=np.float32)
    cast = np.maximum(np.median(channels.reshape(-1, 3), axis=0), 1.0)
    balanced = channels * (cast.mean() / cast)
    return float((balanced.max(axis=2) - balanced.min(axis=2)).mean()) < GREY_SPREAD


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
    # CMYK, YCbCr, 1, ... all convert; one already in the target mode is read as it is (convert copies it)
    return np.asarray(image if image.mode == target else image.convert(target))


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
