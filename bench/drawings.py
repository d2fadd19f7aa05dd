"""Pen drawings of digits through the web page's own drawing pad, as users draw them: strokes replayed
with the mouse in headless Chromium on a real server, the page's canvas turned into a PNG and sent
with resize=true, as the page does. Accuracy and decisions per model, per digit, and for the ways
the UCI writers did not draw: plain 7s and 1s with a foot.

    .venv/bin/python -m bench.drawings [--per-variant 6] [--seed 0] [--models digits-photo-cnn digits-cnn]

The strokes are this script's own (points on a 100 x 100 grid, written for it, not the training
generator's templates), each drawing scaled, moved, slanted and jittered. Needs Debian's chromium.
"""
import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from bench.harness import copy_committed, running_server

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")

# (digit, variant) -> strokes of (x, y) on a 100 x 100 grid, y down
DRAWINGS = {
    (0, "oval"): [[(50, 10), (30, 20), (24, 50), (32, 82), (50, 90), (68, 80), (75, 50), (68, 20), (50, 10)]],
    (1, "plain"): [[(50, 10), (50, 90)]],
    (1, "with a flag"): [[(34, 26), (52, 10), (52, 90)]],
    (1, "with a foot"): [[(34, 26), (52, 10), (52, 90)], [(34, 90), (70, 90)]],
    (2, "plain"): [[(25, 30), (35, 15), (55, 10), (70, 20), (70, 35), (25, 90), (76, 90)]],
    (3, "plain"): [[(25, 15), (60, 10), (70, 25), (55, 45), (40, 48)], [(55, 48), (72, 62), (70, 80), (55, 90), (25, 85)]],
    (4, "closed"): [[(62, 90), (62, 10), (20, 65), (80, 65)]],
    (4, "open"): [[(36, 10), (22, 60), (80, 60)], [(62, 30), (62, 90)]],
    (5, "plain"): [[(72, 12), (32, 12), (28, 45), (50, 40), (70, 50), (72, 72), (55, 90), (25, 85)]],
    (6, "plain"): [[(65, 12), (40, 30), (28, 60), (35, 85), (55, 90), (70, 75), (62, 55), (40, 52), (30, 62)]],
    (7, "plain"): [[(22, 12), (78, 12), (40, 90)]],
    (7, "crossed"): [[(22, 12), (78, 12), (40, 90)], [(34, 52), (68, 52)]],
    (8, "plain"): [[(50, 10), (30, 22), (50, 45), (72, 68), (50, 90), (28, 68), (50, 45), (70, 22), (50, 10)]],
    (9, "plain"): [[(70, 30), (50, 12), (30, 28), (45, 48), (70, 32), (65, 90)]],
}


def strokes(rng: np.random.Generator, digit_strokes: list, box: dict) -> list[list[tuple[float, float]]]:
    """The drawing in page coordinates: scaled, moved, slanted, every point jittered."""
    scale = rng.uniform(0.55, 0.95)
    slant = rng.uniform(-0.25, 0.25)
    left = rng.uniform(0, 1 - scale) * box["width"]
    top = rng.uniform(0, 1 - scale) * box["height"]
    out = []
    for stroke in digit_strokes:
        out.append([(box["x"] + left + (x + slant * (100 - y) + rng.normal(0, 1.5)) / 100 * scale * box["width"],
                     box["y"] + top + (y + rng.normal(0, 1.5)) / 100 * scale * box["height"]) for x, y in stroke])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-variant", type=int, default=6, help="drawings of each digit's each way")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="*", default=["digits-photo-cnn", "digits-cnn", "digits-mlp"],
                        help="picked on the page in turn (a model missing from exports/ is skipped)")
    args = parser.parse_args()
    if CHROMIUM is None:
        sys.exit("needs Debian's chromium (make chromium)")
    from playwright.sync_api import sync_playwright
    models = [name for name in args.models if (ROOT / "exports" / name).is_dir()]
    exports = Path(__import__("tempfile").mkdtemp()) / "exports"
    copy_committed(exports, *models)
    results = {name: [] for name in models}  # (digit, variant, answered digit, decision)
    with running_server(exports, "--workers", "1") as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function(f"document.querySelectorAll('#model option').length > {len(models)}")
        pad = page.locator("#pad")
        for name in models:
            page.select_option("#model", name)
            rng = np.random.default_rng(args.seed)
            for (digit, variant), drawing in DRAWINGS.items():
                for _ in range(args.per_variant):
                    page.click("#clear")
                    pad.scroll_into_view_if_needed()
                    for stroke in strokes(rng, drawing, pad.bounding_box()):
                        page.mouse.move(*stroke[0])
                        page.mouse.down()
                        for point in stroke[1:]:
                            page.mouse.move(*point, steps=3)
                        page.mouse.up()
                    page.wait_for_function("document.getElementById('pad').dataset.pending === '0'")
                    page.wait_for_function("document.getElementById('verdict').textContent !== ''")
                    answered = page.locator("#digit").text_content()
                    verdict = page.locator("#verdict").text_content()
                    decision = ("not_a_digit" if verdict.startswith("this does not") else
                                "unsure" if verdict.startswith("not sure") else "digit")
                    results[name].append((digit, variant, answered, decision))
        browser.close()
    total = len(DRAWINGS) * args.per_variant
    print(f"## Drawings on the page's pad (`python -m bench.drawings {' '.join(sys.argv[1:])}`)\n")
    print(f"{total} drawings per model ({len(DRAWINGS)} ways of drawing the ten digits, {args.per_variant} each), "
          "replayed with the mouse in headless Chromium, sent by the page with resize=true.\n")
    print("| model | accuracy | answered (digit) | right among answered | plain 7s | 1s with a foot |\n"
          "|---|---|---|---|---|---|")
    for name, rows in results.items():
        right = [str(digit) == answered for digit, _, answered, _ in rows]
        answered = [decision == "digit" for *_, decision in rows]

        def share(digit: int, variant: str) -> str:
            hits = [r for r, (d, v, _, _) in zip(right, rows) if (d, v) == (digit, variant)]
            return f"{sum(hits)}/{len(hits)}"
        print(f"| {name} | {np.mean(right):.1%} | {np.mean(answered):.1%} | "
              f"{np.mean([r for r, a in zip(right, answered) if a]):.1%} | {share(7, 'plain')} | "
              f"{share(1, 'with a foot')} |")
    for name, rows in results.items():
        wrong = [f"{digit} ({variant}) read as {answered}" for digit, variant, answered, _ in rows if str(digit) != answered]
        print(f"\n{name}: {len(wrong)} wrong" + (": " + "; ".join(sorted(set(wrong))) if wrong else ""))


if __name__ == "__main__":
    main()
