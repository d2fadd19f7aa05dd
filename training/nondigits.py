"""Pictures that are no digit at all, made the way users' uploads arrive (training/render.py): what a
model's "not a digit" detector is chosen on (a validation set) and measured on (a test set, carried in
the export so that the server reproduces the figure).

For a grey model (8x8 digits): letters that look like no digit (no O, I, l, S, Z, B, G, q, g), shapes
(triangles, squares, stars, crosses, zigzags, filled smudges), textures (stripes, checks, blotches)
and scribbles, drawn on paper as a photo or scan of them would be, then read by resize=true; the ones
it refuses ("no digit found": a blank or faint picture) never reach a model and are left out. For a
colour model (32x32 crops): the same marks, and none, on the synthetic walls of house-number crops
(training/synthetic.py) in their colours, cut and resampled as resize=true does.
"""
import hashlib
import json
import os
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from training import render, synthetic

LETTERS = "ACEFHKMNPRTVWXYadefhkmnrtuvwxy#%&@*+=?!<>{}[]$"
KINDS = ("letter", "shape", "texture", "scribble")
SEEDS = {"validation": 101, "test": 102}  # never the seeds digits or crops are drawn with
FILE_NAME = "nondigits.npz"  # the test pictures, carried in the export


def supported(spec: dict) -> bool:
    """Whether resize=true reads uploads for a model of this input (8x8 grey, or colour of any size)."""
    return spec["color"] == "RGB" or spec["shape"][2:] == [8, 8]


def letter(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    fonts = synthetic.digit_fonts()
    layer = Image.new("L", (width, height))
    draw = ImageDraw.Draw(layer)
    font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), int(height * rng.uniform(0.4, 0.85)))
    mark = LETTERS[int(rng.integers(len(LETTERS)))]
    left, top, right, bottom = draw.textbbox((0, 0), mark, font=font)
    stroke = int(rng.integers(0, 4))
    draw.text(((width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top), mark, fill=255, font=font,
              stroke_width=stroke, stroke_fill=255)
    return layer.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BICUBIC)


def shape(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    layer = Image.new("L", (width, height))
    draw = ImageDraw.Draw(layer)
    cx, cy, r = width / 2, height / 2, min(width, height) * rng.uniform(0.25, 0.45)
    line = int(max(2, r * rng.uniform(0.05, 0.25)))
    kind = int(rng.integers(6))
    if kind == 0:  # triangle
        points = [(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)]
    elif kind == 1:  # square
        points = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    elif kind == 2:  # five-pointed star
        points = [(cx + (r if i % 2 == 0 else r / 2.5) * np.sin(i * np.pi / 5),
                   cy - (r if i % 2 == 0 else r / 2.5) * np.cos(i * np.pi / 5)) for i in range(10)]
    elif kind == 3:  # cross
        draw.line([(cx - r, cy), (cx + r, cy)], fill=255, width=line)
        draw.line([(cx, cy - r), (cx, cy + r)], fill=255, width=line)
        points = None
    elif kind == 4:  # zigzag
        draw.line([(cx - r + 2 * r * i / 5, cy + (r / 2 if i % 2 else -r / 2)) for i in range(6)], fill=255, width=line)
        points = None
    else:  # a filled smudge
        draw.polygon([(cx + r * rng.uniform(0.5, 1) * np.cos(a), cy + r * rng.uniform(0.5, 1) * np.sin(a))
                      for a in np.linspace(0, 2 * np.pi, 9)[:-1]], fill=255)
        points = None
    if points is not None:
        if rng.random() < 0.5:
            draw.polygon(points, fill=255)
        else:
            draw.line(points + [points[0]], fill=255, width=line)
    return layer.rotate(float(rng.uniform(-30, 30)), resample=Image.Resampling.BICUBIC)


def texture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    rows, cols = np.mgrid[:height, :width]
    kind = int(rng.integers(3))
    if kind == 0:  # stripes
        cover = np.sin(cols * rng.uniform(0.05, 0.3) + rows * rng.uniform(-0.2, 0.2)) > 0
    elif kind == 1:  # checks
        side = int(rng.integers(8, 40))
        cover = ((cols // side) + (rows // side)) % 2 == 1
    else:  # blotches
        cells = int(rng.integers(3, 12))
        field = Image.fromarray(rng.uniform(0, 255, (cells, cells)).astype(np.float32))
        cover = np.asarray(field.resize((width, height), Image.Resampling.BICUBIC)) > 128
    return Image.fromarray((cover * 255).astype(np.uint8))


def scribble(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    layer = Image.new("L", (width, height))
    points = [(width / 2, height / 2)]
    for _ in range(int(rng.integers(4, 12))):
        x, y = points[-1]
        points.append((float(np.clip(x + rng.normal(0, width / 5), 0, width)),
                       float(np.clip(y + rng.normal(0, height / 5), 0, height))))
    ImageDraw.Draw(layer).line(points, fill=255, width=int(rng.integers(2, 12)), joint="curve")
    return layer


MARKS = {"letter": letter, "shape": shape, "texture": texture, "scribble": scribble}


def picture(rng: np.random.Generator, color: str) -> Image.Image:
    """One upload: a mark on paper (grey models), or on a wall, or a bare wall (colour models)."""
    if color == "grayscale":
        width, height = render.canvas_size(rng)
        mark = MARKS[KINDS[int(rng.integers(len(KINDS)))]](rng, width, height)
        return render.as_upload(rng, render.on_paper(rng, mark))
    wall = synthetic.wall(rng)
    if rng.random() < 0.75:
        mark = np.asarray(MARKS[KINDS[int(rng.integers(len(KINDS)))]](rng, synthetic.CANVAS, synthetic.CANVAS),
                          np.float32)[..., None] / 255
        paint = rng.uniform(0, 255, 3)
        wall = wall * (1 - mark) + paint * mark
    noisy = wall + rng.normal(0, rng.uniform(0, 8), wall.shape)
    return render.as_upload(rng, np.clip(noisy, 0, 255).astype(np.uint8))


def make(spec: dict, n: int, seed: int) -> np.ndarray:
    """n non-digit pictures as a model of input `spec` is fed them: N x C x H x W in its dtype."""
    rng = np.random.default_rng(seed)
    made = []
    while len(made) < n:
        array = render.model_input(picture(rng, spec["color"]), spec)
        if array is not None:
            made.append(array)
    return np.stack(made)


@cache
def for_spec(spec_json: str, n: int, seed: int) -> np.ndarray:
    """make(), kept for this process and in the user's cache folder (every export of a model of this
    input draws the same pictures; drawing 1,000 takes seconds). The cache key holds the source of the
    code that draws them, so a change to it draws them afresh."""
    root = Path(__file__).parents[1]
    code = b"".join((root / name).read_bytes() for name in ("training/nondigits.py", "training/render.py",
                                                             "training/synthetic.py", "serving/resize.py",
                                                             "serving/images.py"))
    key = hashlib.sha256(spec_json.encode() + f"{n} {seed}".encode() + code).hexdigest()[:16]
    path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "digitserve" / f"nondigits-{key}.npy"
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        pictures = make(json.loads(spec_json), n, seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(staging, pictures, allow_pickle=False)
        staging.replace(path)
    except OSError:
        pass  # no cache folder to write to: drawn again next time
    return pictures


def pictures_for(spec: dict, n: int, seed: int) -> np.ndarray:
    return for_spec(json.dumps(spec, sort_keys=True), n, seed)
