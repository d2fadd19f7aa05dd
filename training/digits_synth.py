"""Photo-like and drawn digits for the 8x8 task, as users upload them: `python -m training digits-synth`.

The UCI writers crossed their 7s and drew 1s without a foot; printed 1s and 7s, serif fonts and pen
drawings fall outside that data (bench/RESULTS.md). These are the rest of what users send:
- printed: every font on the machine (training/synthetic.py's digit_fonts), any size, weight, slant
  and position;
- drawn: pen strokes along each digit's shapes (open and closed 4s, crossed and plain 7s, footed and
  plain 1s, looped and straight 9s ...), every point jittered, slanted, squeezed, of any thickness;
  a third of them on the page's drawing pad (black, 18 px round pen on a white 224 px canvas);
then on paper under some light, blurred, noisy, maybe JPEG, either polarity (training/render.py) and
read by the server's own resize=true code to 8x8 on 0..16: training sees exactly what serving feeds
the model. Pictures resize=true refuses ("no digit found") are left out, as the server would refuse
them. Beside the digits, non-digit pictures (training/nondigits.py, from seeds of their own) for
outlier exposure. Chunks of CHUNK pictures are seeded apart: the same seed gives the same files
whatever --jobs.
"""
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from export_contract import sha256
from training import digits, nondigits, render, synthetic
from training.progress import Progress

CHUNK = 500
SPLITS = ("train", "val", "test")
SEED_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_003, "outliers": 3_000_003}  # no two share a seed
RECORD = "digits_synth.json"
PAD_SIDE, PAD_PEN = 224, 18  # serving/static/index.html's drawing pad

# Each digit's ways of being drawn: strokes of points in a unit box (x right, y down), the pen lifted
# between strokes. Arcs are ("arc", cx, cy, rx, ry, start, end) in degrees, clockwise from 3 o'clock.
STROKES = {
    0: [[("arc", 0.5, 0.5, 0.32, 0.45, 0, 360)], [("arc", 0.5, 0.5, 0.28, 0.45, -80, 270)]],
    1: [[(0.5, 0.05), (0.5, 0.95)],
        [(0.3, 0.25), (0.55, 0.05), (0.55, 0.95)],
        [(0.3, 0.25), (0.55, 0.05), (0.55, 0.95)], [(0.35, 0.95), (0.75, 0.95)]],
    2: [[("arc", 0.5, 0.3, 0.3, 0.25, 190, 380), (0.2, 0.95), (0.82, 0.95)]],
    3: [[("arc", 0.48, 0.28, 0.3, 0.23, 200, 450), ("arc", 0.48, 0.72, 0.33, 0.23, 270, 520)]],
    4: [[(0.62, 0.95), (0.62, 0.05), (0.15, 0.68), (0.85, 0.68)],
        [(0.35, 0.05), (0.18, 0.62), (0.85, 0.62)], [(0.65, 0.3), (0.65, 0.95)]],
    5: [[(0.78, 0.05), (0.3, 0.05), (0.26, 0.45), ("arc", 0.5, 0.67, 0.3, 0.28, 240, 500)]],
    6: [[(0.72, 0.05), ("arc", 0.5, 0.68, 0.3, 0.27, 200, 200 + 360)],
        [("arc", 0.62, 0.62, 0.45, 0.58, 245, 180), ("arc", 0.5, 0.7, 0.3, 0.25, 180, 540)]],
    7: [[(0.18, 0.06), (0.82, 0.06), (0.4, 0.95)],
        [(0.18, 0.06), (0.82, 0.06), (0.4, 0.95)], [(0.35, 0.52), (0.78, 0.52)]],
    8: [[("arc", 0.5, 0.27, 0.25, 0.22, 90, 450), ("arc", 0.5, 0.72, 0.3, 0.24, 270, 630)]],
    9: [[("arc", 0.5, 0.32, 0.3, 0.27, 0, 360), (0.8, 0.32), (0.72, 0.95)],
        [("arc", 0.5, 0.32, 0.3, 0.27, 0, 360), ("arc", 0.45, 0.45, 0.35, 0.5, 0, 100)]],
}
# Which lists of STROKES make one way of drawing each digit (a 1 with a foot is its 2nd and 3rd list).
VARIANTS = {0: [[0], [1]], 1: [[0], [1], [2, 3]], 2: [[0]], 3: [[0]], 4: [[0], [1, 2]], 5: [[0]],
            6: [[0], [1]], 7: [[0], [1, 2]], 8: [[0]], 9: [[0], [1]]}


def points(stroke: list, rng: np.random.Generator, wobble: float) -> list[tuple[float, float]]:
    """A stroke's points in the unit box, arcs sampled every 20 degrees, each point jittered."""
    out = []
    for step in stroke:
        if step[0] == "arc":
            _, cx, cy, rx, ry, start, end = step
            angles = np.radians(np.linspace(start, end, max(2, int(abs(end - start) / 20) + 1)))
            out += [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]
        else:
            out.append(step)
    return [(x + rng.normal(0, wobble), y + rng.normal(0, wobble)) for x, y in out]


def drawn(rng: np.random.Generator, digit: int, width: int, height: int, pen: float | None = None) -> Image.Image:
    """Ink coverage (L) of a pen drawing of `digit`: one of its variants, jittered, slanted, squeezed."""
    variant = VARIANTS[digit][int(rng.integers(len(VARIANTS[digit])))]
    box_h = height * rng.uniform(0.45, 0.8)
    box_w = min(box_h * rng.uniform(0.5, 0.85), 0.85 * width)
    left, top = rng.uniform(0.05, 0.95 - box_w / width) * width, rng.uniform(0.05, 0.95 - box_h / height) * height
    slant = rng.uniform(-0.3, 0.3)
    wobble = rng.uniform(0.003, 0.015)
    pen = pen or max(2.0, box_h * rng.uniform(0.05, 0.16))
    layer = Image.new("L", (width, height))
    draw = ImageDraw.Draw(layer)
    for index in variant:
        line = [(left + (x + slant * (1 - y)) * box_w, top + y * box_h) for x, y in points(STROKES[digit][index], rng, wobble)]
        draw.line(line, fill=255, width=int(round(pen)), joint="curve")
        for x, y in (line[0], line[-1]):  # round pen ends
            draw.ellipse([x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2], fill=255)
    return layer


def printed(rng: np.random.Generator, digit: int, width: int, height: int) -> Image.Image:
    """Ink coverage (L) of `digit` in one of the machine's fonts: any size, weight, slant and place."""
    fonts = synthetic.digit_fonts()
    size = glyph_size(rng, width, height)
    return glyph(rng, digit, ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), size), width, height)


def glyph_size(rng: np.random.Generator, width: int, height: int) -> int:
    return int(min(height * rng.uniform(0.3, 0.9), width * 0.9 / 0.7))


def glyph(rng: np.random.Generator, digit: int, font: ImageFont.FreeTypeFont, width: int, height: int) -> Image.Image:
    """Ink coverage (L) of `digit` in that font (of glyph_size): random weight, place and slant. Also
    bench.photo_digits' renders: the order of the random draws is theirs as much as this data's."""
    stroke = int(rng.integers(0, max(1, font.size // 25) + 1))
    layer = Image.new("L", (width, height))
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font, stroke_width=stroke)
    x = rng.integers(-left, max(-left + 1, width - right))
    y = rng.integers(-top, max(-top + 1, height - bottom))
    draw.text((int(x), int(y)), str(digit), fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    return layer.rotate(float(rng.uniform(-10, 10)), resample=Image.Resampling.BICUBIC)


def picture(rng: np.random.Generator, digit: int) -> Image.Image:
    """One upload of `digit`: printed or drawn on paper, or drawn on the page's pad."""
    kind = rng.random()
    if kind < 0.15:  # the page's drawing pad: black on white, its pen, a PNG
        ink = np.asarray(drawn(rng, digit, PAD_SIDE, PAD_SIDE, pen=PAD_PEN), np.float32) / 255
        return render.as_upload(rng, (255 * (1 - ink)).astype(np.uint8))
    width, height = render.canvas_size(rng)
    mark = printed(rng, digit, width, height) if kind < 0.6 else drawn(rng, digit, width, height)
    return render.as_upload(rng, render.on_paper(rng, mark))


def outlier_chunk(n: int, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """n non-digit pictures as 8x8 model inputs (training/nondigits.py), labelled -1."""
    rng = np.random.default_rng([seed, index])
    made = []
    while len(made) < n:
        array = render.model_input(nondigits.picture(rng, "grayscale"), digits.INPUT_SPEC)
        if array is not None:
            made.append(array)
    return np.stack(made).astype(np.float32), np.full(n, -1, np.int64)


def chunk(n: int, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """n pictures of digits 0-9 in turn, as 8x8 model inputs N x 1 x 8 x 8 on 0..16, and their labels."""
    rng = np.random.default_rng([seed, index])
    x, y = [], []
    while len(y) < n:
        digit = int(rng.integers(10))
        array = render.model_input(picture(rng, digit), digits.INPUT_SPEC)
        if array is not None:
            x.append(array)
            y.append(digit)
    return np.stack(x).astype(np.float32), np.array(y, np.int64)


def make(n: int, seed: int, jobs: int, desc: str, draw=None) -> tuple[np.ndarray, np.ndarray]:
    """n pictures drawn by `draw` (chunk: digits; outlier_chunk: non-digits) in `jobs` processes."""
    draw = draw or chunk
    starts = list(range(0, n, CHUNK))
    progress, parts = Progress(), []
    args = [(min(CHUNK, n - start), seed, start // CHUNK) for start in starts]
    if jobs > 1 and len(args) > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(min(jobs, len(args))) as pool:
            for part in pool.map(draw, *zip(*args)):
                parts.append(part)
                progress.show(f"{desc}: {sum(len(y) for _, y in parts):,} of {n:,} pictures, {progress.seconds:.0f} s")
    else:
        for a in args:
            parts.append(draw(*a))
            progress.show(f"{desc}: {sum(len(y) for _, y in parts):,} of {n:,} pictures, {progress.seconds:.0f} s")
    progress.close()
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def write(out: Path, counts: dict[str, int], seed: int, jobs: int) -> dict:
    """train.npz, val.npz and test.npz (x, y) in `out`, and RECORD: the command and the files' sha256."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORD).unlink(missing_ok=True)  # files being rewritten are no longer those it describes
    files = {}
    for split in (*SPLITS, "outliers"):
        x, y = make(counts[split], seed + SEED_OFFSETS[split], jobs, f"digits-synth {split}",
                    outlier_chunk if split == "outliers" else chunk)
        path = out / f"{split}.npz"
        staging = path.with_suffix(".tmp.npz")
        np.savez(staging, x=x, y=y)
        staging.replace(path)
        files[split] = {"file": path.name, "sha256": sha256(path), "n": int(len(y))}
    record = {"command": f"python -m training digits-synth --out {out} --train {counts['train']} --val {counts['val']} "
                         f"--test {counts['test']} --outliers {counts['outliers']} --seed {seed}", "seed": seed,
              "counts": counts, "files": files}
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


DEFAULT_COUNTS = {"train": 12_000, "val": 2_000, "test": 2_000, "outliers": 4_000}


def ensure(out: Path, jobs: int) -> dict:
    """The record of the pictures in `out`, written there first (default counts, seed 0) unless the
    files its record lists are there and unchanged: a run after the first reuses them."""
    try:
        record = json.loads((out / RECORD).read_text())
        if all(sha256(out / item["file"]) == item["sha256"] for item in record["files"].values()):
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return write(out, DEFAULT_COUNTS, 0, jobs)


def load(out: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split: images N x 1 x 8 x 8 float32 on 0..16, labels N int64."""
    with np.load(out / f"{split}.npz", allow_pickle=False) as data:
        return data["x"], data["y"]


def data_record(record: dict) -> dict:
    """What a model trained on the UCI digits and these pictures was trained and tested on, for its manifest."""
    n = {split: item["n"] for split, item in record["files"].items()}  # outliers: trained towards no digit
    return {"name": "sklearn-digits+photos",
            "description": f"scikit-learn's 8x8 digits (the original split) and photos and drawings of digits made "
                           f"by `{record['command']}`, read as resize=true reads uploads: 1,000 + {n['train']:,} "
                           f"training images, 350 + {n['val']:,} validation, tested on the UCI test split (447) "
                           f"and {n['test']:,} generated pictures"}
