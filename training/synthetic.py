"""Synthetic house-number crops in the official SVHN layout (SVHN is not reachable here).

Each crop is made the way SVHN's were cut from street photos: a house number of 1-4 digits in one
of the machine's fonts, the labelled digit centred, the square crop around it sized from the
digit's height so its neighbours are cut by the edges; a textured wall behind it, uneven light,
shadow, perspective and rotation, then blur, noise and JPEG at the end. Every random choice comes
from the seed; the fonts come from the machine (`digit_fonts`), so two machines with different
fonts write different, equally valid sets.
"""
import contextlib
import io
import json
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from export_contract import svhn_mat
from training.progress import Progress
from training.svhn import FILES, SYNTHETIC_RECORD

CANVAS = 128  # drawn at 4x the crop's size, then cut and shrunk: antialiased strokes and edges
SYMBOL_FONTS = ("cmex", "cmsy", "Sym", "Math")  # their digit code points draw symbols


@cache
def digit_fonts() -> tuple[Path, ...]:
    """Every TrueType/OpenType font on the machine (system fonts, and matplotlib's when installed)
    that draws ten different digits, sorted by file name."""
    folders = [Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path.home() / ".fonts"]
    try:
        import matplotlib
        folders.append(Path(matplotlib.get_data_path()) / "fonts" / "ttf")
    except ImportError:
        pass
    found = {path.name: path for folder in folders if folder.is_dir()
             for path in folder.rglob("*") if path.suffix.lower() in (".ttf", ".otf")}
    fonts = tuple(path for name, path in sorted(found.items())
                  if not any(symbol in name for symbol in SYMBOL_FONTS) and draws_ten_digits(path))
    if not fonts:
        raise RuntimeError("no font on this machine draws the digits 0-9 (install fonts-dejavu-core)")
    return fonts


def draws_ten_digits(path: Path) -> bool:
    """Every digit has a glyph with ink, and no two look the same (a font without digits draws boxes)."""
    font = ImageFont.truetype(str(path), 48)
    glyphs = set()
    for digit in "0123456789":
        canvas = Image.new("L", (80, 80))
        ImageDraw.Draw(canvas).text((10, 5), digit, fill=255, font=font)
        if not canvas.getbbox():
            return False
        glyphs.add(canvas.tobytes())
    return len(glyphs) == 10


# --- walls ---

def value_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Smooth noise on the canvas in -1..1: random values on a cells x cells grid, bicubic between."""
    grid = Image.fromarray(rng.uniform(-1, 1, (cells, cells)).astype(np.float32))
    return np.asarray(grid.resize((CANVAS, CANVAS), Image.Resampling.BICUBIC))


def wall(rng: np.random.Generator) -> np.ndarray:
    """CANVAS x CANVAS x 3 floats on 0..255: painted plaster, brick, wood or metal, with a colour cast."""
    base = rng.uniform(30, 230) + rng.normal(0, 25, 3)  # mostly greys, browns and muted colours
    kind = rng.integers(4)
    rows, cols = np.mgrid[:CANVAS, :CANVAS].astype(np.float32)
    if kind == 0:  # plaster: noise at two scales
        shade = 25 * value_noise(rng, 4) + 10 * value_noise(rng, 16)
    elif kind == 1:  # brick: courses of jittered blocks, light mortar
        height = rng.uniform(14, 30)
        course = (rows // height).astype(int)
        width = height * rng.uniform(1.8, 2.6)
        block = ((cols + (course % 2) * width / 2) // width).astype(int)
        jitter = rng.normal(0, 18, (course.max() + 2, block.max() + 2))[course, block]
        mortar = ((rows % height) < 2.5) | (((cols + (course % 2) * width / 2) % width) < 2.5)
        shade = jitter + 8 * value_noise(rng, 24) + np.where(mortar, rng.uniform(30, 70), 0)
    elif kind == 2:  # wood: bent grain lines
        frequency, bend = rng.uniform(0.15, 0.5), 12 * value_noise(rng, 3)
        shade = 20 * np.sin(frequency * (rows if rng.random() < 0.5 else cols) + bend) + 8 * value_noise(rng, 32)
    else:  # brushed metal or a painted plate: a gradient and fine streaks
        angle = rng.uniform(0, np.pi)
        shade = 0.4 * (np.cos(angle) * rows + np.sin(angle) * cols) - 25 + 6 * value_noise(rng, 64)
    cast = rng.uniform(0.8, 1.2, 3)
    return np.clip((base + shade[..., None]) * cast, 0, 255)


# --- the house number ---

def number_layer(rng: np.random.Generator, label: int, font_path: Path) -> tuple[Image.Image, float]:
    """The ink coverage (L, CANVAS x CANVAS) of a 1-4 digit number whose labelled digit is centred,
    and that digit's height in pixels."""
    size = int(rng.uniform(0.35, 0.55) * CANVAS)
    font = ImageFont.truetype(str(font_path), size)
    stroke = int(rng.integers(0, 3)) if rng.random() < 0.3 else 0  # sign-writers' heavier strokes
    condense = rng.uniform(0.65, 1.0) if rng.random() < 0.3 else 1.0
    count = int(rng.integers(1, 5))
    position = int(rng.integers(count))  # which digit of the number is the labelled one
    digits = [int(rng.integers(10)) for _ in range(count)]
    digits[position] = label
    gap = rng.uniform(-0.1, 0.2) * size
    # Each glyph is drawn on its own tile (condensed horizontally), then the tiles are laid side by side.
    tiles = []
    for digit in digits:
        left, top, right, bottom = font.getbbox(str(digit), stroke_width=stroke)
        tile = Image.new("L", (right - left + 2, bottom - top + 2))
        ImageDraw.Draw(tile).text((1 - left, 1 - top), str(digit), fill=255, font=font, stroke_width=stroke,
                                  stroke_fill=255)
        tiles.append(tile.resize((max(1, round(tile.width * condense)), tile.height), Image.Resampling.BILINEAR))
    layer = Image.new("L", (CANVAS, CANVAS))
    height = max(tile.height for tile in tiles)
    centre_x = CANVAS / 2 + rng.normal(0, 1.0)
    x = centre_x - tiles[position].width / 2 - sum(tile.width + gap for tile in tiles[:position])
    top = round(CANVAS / 2 - height / 2 + rng.normal(0, 1.0))
    for tile in tiles:
        layer.paste(tile, (round(x), top + height - tile.height), tile)
        x += tile.width + gap
    if rng.random() < 0.4:  # italic or leaning: a shear about the centre
        shear = rng.uniform(-0.3, 0.3)
        layer = layer.transform(layer.size, Image.Transform.AFFINE, (1, shear, -shear * CANVAS / 2, 0, 1, 0),
                                Image.Resampling.BILINEAR)
    return layer, float(tiles[position].height)


def perspective(rng: np.random.Generator, layer: Image.Image, strength: float) -> Image.Image:
    """A camera not square to the wall: the corners moved by up to `strength` of the canvas, then a
    rotation of up to 15 degrees."""
    corners = np.array([[0, 0], [CANVAS, 0], [CANVAS, CANVAS], [0, CANVAS]], np.float64)
    moved = corners + rng.uniform(-strength, strength, corners.shape) * CANVAS
    # the 8 coefficients that map output (x, y) to input (x', y'), from the four corner pairs
    rows = []
    for (x, y), (u, v) in zip(moved, corners):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    coefficients = np.linalg.solve(np.array(rows), corners.ravel())
    warped = layer.transform(layer.size, Image.Transform.PERSPECTIVE, tuple(coefficients), Image.Resampling.BILINEAR)
    return warped.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR, center=(CANVAS / 2, CANVAS / 2))


CHUNK = 1000  # crops per independently seeded chunk: the same files whatever the number of processes
MAT_HEADER = b"MATLAB 5.0 MAT-file, written by python -m training svhn-synth".ljust(116)  # its descriptive text


def synthetic_crops(n: int, seed: int, jobs: int = 1, desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """n crops: X uint8 [32, 32, 3, n] and y uint8 [n, 1] with 10 for zero (the official layout),
    made in `jobs` processes; `desc`: show progress under that name."""
    chunks = [(min(CHUNK, n - start), seed, start // CHUNK) for start in range(0, n, CHUNK)]
    progress, parts = Progress(enabled=desc is not None), []
    with contextlib.ExitStack() as stack:
        if jobs > 1 and len(chunks) > 1:
            from concurrent.futures import ProcessPoolExecutor
            pool = stack.enter_context(ProcessPoolExecutor(min(jobs, len(chunks))))
            made = pool.map(crops_chunk, *zip(*chunks))
        else:
            made = (crops_chunk(*chunk) for chunk in chunks)
        for part in made:
            parts.append(part)
            progress.show(f"{desc}: {sum(x.shape[3] for x, _ in parts):,} of {n:,} crops, {progress.seconds:.0f} s")
    progress.close()
    return np.concatenate([x for x, _ in parts], axis=3), np.concatenate([y for _, y in parts])


def crops_chunk(n: int, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, index])
    fonts = digit_fonts()
    x = np.empty((32, 32, 3, n), np.uint8)
    y = rng.integers(0, 10, n)
    for i in range(n):
        x[..., i] = crop(rng, int(y[i]), fonts[int(rng.integers(len(fonts)))])
    return x, np.where(y == 0, 10, y).astype(np.uint8).reshape(n, 1)


def crop(rng: np.random.Generator, label: int, font_path: Path) -> np.ndarray:
    background = wall(rng)
    layer, digit_height = number_layer(rng, label, font_path)
    layer = perspective(rng, layer, rng.uniform(0, 0.12))
    coverage = np.asarray(layer, np.float32)[..., None] / 255
    # ink: a colour of its own, at a contrast from clear to faint
    contrast = rng.uniform(25, 180) * rng.choice([-1, 1])
    ink = np.clip(background.mean(axis=(0, 1)) + contrast * rng.uniform(0.7, 1.3, 3), 0, 255)
    if rng.random() < 0.3:  # raised or painted digits cast a shadow down and to one side
        offset = rng.integers(-4, 5, 2)
        shadow = np.roll(coverage, tuple(offset), axis=(0, 1)) * rng.uniform(0.2, 0.5)
        background = background * (1 - shadow)
    image = background * (1 - coverage) + ink * coverage
    light = 1 + 0.35 * value_noise(rng, 2)[..., None]  # one lamp, or the sun from a side
    if rng.random() < 0.3:  # a shadow edge across the number
        rows, cols = np.mgrid[:CANVAS, :CANVAS]
        angle = rng.uniform(0, 2 * np.pi)
        edge = np.cos(angle) * (cols - CANVAS / 2) + np.sin(angle) * (rows - CANVAS / 2) > rng.normal(0, 20)
        light = light * np.where(edge, rng.uniform(0.4, 0.8), 1.0)[..., None]
    image = np.clip(image * light + rng.normal(0, rng.uniform(2, 10), image.shape), 0, 255).astype(np.uint8)
    # SVHN's crops: a square around the digit's box, enlarged, so neighbours are cut by the edges
    side = min(CANVAS, digit_height * rng.uniform(1.05, 1.6))
    centre = CANVAS / 2 + rng.normal(0, 1.5, 2)
    box = (centre[0] - side / 2, centre[1] - side / 2, centre[0] + side / 2, centre[1] + side / 2)
    small = Image.fromarray(image).resize((32, 32), Image.Resampling.LANCZOS, box=box)
    small = small.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.6)))
    if rng.random() < 0.5:  # street photos are JPEGs
        buffer = io.BytesIO()
        small.save(buffer, "JPEG", quality=int(rng.integers(20, 90)))
        small = Image.open(buffer)
    return np.asarray(small.convert("RGB"))


def write_synthetic(data_dir: Path, n_train: int, n_test: int, seed: int, jobs: int = 1) -> None:
    """train_32x32.mat and test_32x32.mat of synthetic crops, in the official layout, and beside them
    SYNTHETIC_RECORD: how they were made and their MD5s, so that a model trained on them says so."""
    import scipy.io
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / SYNTHETIC_RECORD).unlink(missing_ok=True)  # files being rewritten are no longer those it describes
    digests = {}
    for split, n, split_seed in (("train", n_train, seed), ("test", n_test, seed + 1)):
        x, y = synthetic_crops(n, split_seed, jobs, desc=f"svhn-synth {split}")
        path = data_dir / FILES[split][0]
        staging = path.with_suffix(".tmp.mat")
        scipy.io.savemat(staging, {"X": x, "y": y})
        with staging.open("r+b") as f:  # SciPy writes the time into the header: the same seed, the same bytes
            f.write(MAT_HEADER)
        staging.replace(path)
        digests[split] = svhn_mat.md5(path)
    record = {"command": f"python -m training svhn-synth --train {n_train} --test {n_test} --seed {seed}",
              "fonts": len(digit_fonts()), "md5": digests}
    (data_dir / SYNTHETIC_RECORD).write_text(json.dumps(record, indent=2) + "\n")
