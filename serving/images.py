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
from PIL import Image, ImageOps, UnidentifiedImageError

from serving.errors import InputError

# Declared width x height above which an upload is refused before any pixel is decoded: a small
# file can declare a gigapixel canvas (a decompression bomb). 4096 x 4096 covers any real photo.
MAX_DECLARED_PIXELS = 4096 * 4096
Image.MAX_IMAGE_PIXELS = MAX_DECLARED_PIXELS  # Pillow's own guard, as a second line
# The formats the service documents; Pillow would otherwise try a dozen more decoders (TIFF, ICO,
# PCX, SGI, ...), each one more parser for an attacker to reach.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")


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


def size_error(width: int, height: int, accepted: list[tuple[int, int]]) -> InputError:
    names = " or ".join(f"{w}x{h}" for h, w in accepted)
    return InputError(f"image is {width}x{height}; accepted sizes: {names} (or pass resize=true)", 422)


def fit_size(pixels: np.ndarray, size: tuple[int, int], resize: bool, accepted: list[tuple[int, int]]) -> np.ndarray:
    if pixels.shape[:2] == size:
        return pixels
    if not resize:
        raise size_error(pixels.shape[1], pixels.shape[0], accepted)
    mode = "L" if pixels.ndim == 2 else "RGB"
    resized = Image.fromarray(pixels, mode).resize((size[1], size[0]), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(resized)


def model_input(pixels8: np.ndarray, spec: dict, invert: bool) -> np.ndarray:
    """8-bit pixels (H x W or H x W x 3) -> one C x H x W array in the model's dtype and range."""
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


def pixels_array(value: object, specs: dict[str, dict], invert: bool) -> tuple[str, np.ndarray]:
    """A raw pixel array from JSON: 8x8 on 0..16 (digits) or 32x32x3 on 0..255 (SVHN).

    Returns the task it belongs to and the model-ready C x H x W array.
    """
    array = numbers(value, "pixels[] entries must be rectangular arrays of numbers")
    for task, spec in specs.items():
        channels, height, width = spec["shape"][1:]
        expected = (height, width) if channels == 1 else (height, width, channels)
        if array.shape == expected:
            problem = value_problem(array, spec)
            if problem:
                raise InputError(f"{task} pixel {problem}", 422)
            if invert:
                array = spec["range"][1] - array
            chw = array[None] if channels == 1 else array.transpose(2, 0, 1)
            return task, np.ascontiguousarray(chw).astype(spec["dtype"])
    shapes = " or ".join("x".join(map(str, s["shape"][2:] if s["shape"][1] == 1 else s["shape"][2:] + [s["shape"][1]]))
                         for s in specs.values())
    raise InputError(f"pixels[] entry has shape {'x'.join(map(str, array.shape)) or 'scalar'}; accepted: {shapes}", 422)
