"""Batch prediction of a folder: `digitserve-predict --url` (through a server) against `--exports` (in
this process), on the same small PNGs, in one run.

    .venv/bin/python -m bench.predict_folder [--images 10000] [--exports exports] [--seconds 10]
                                             [--load auto|wrk|python] [--overload-images 2000]

Writes `--images` 8x8 PNGs of the UCI digits' test split (the committed digits-cnn export's, cycled)
in folders of 1,000, then: starts the server (bench.harness.running_server, default flags) and runs
`python -m serving.predict FOLDER --url` against it; measures the same server's throughput on
single-image uploads of one of those digits, as bench.serve does (wrk, or bench/load.py), and on
uploads of 256 of them (the most a request holds: what the client sends); stops it
and runs `--exports` with the machine to itself. Both runs' labels must agree. Then a server with
`--max-queue 1` under load from bench/load.py: the client must finish every image (it retries the
503s). Also times `import serving.client`. Prints a Markdown section with the targets.
"""
import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench.harness import BOUNDARY, ROOT, multipart, png, run_python_load, run_wrk, running_server

SUMMARY = re.compile(r"(\d+) images in ([\d.]+) s \(([\d,]+) images/s; ([\d.]+) s before, getting ready\): "
                     r"(\d+) answered, (\d+) failed")


def write_pngs(folder: Path, n: int, exports: Path) -> list[bytes]:
    """`n` PNGs of the digits test split, in subfolders of 1,000; returns the distinct files."""
    with np.load(exports / "digits-cnn" / "test_set.npz", allow_pickle=False) as data:
        digits = data["x"][:, 0]
    files = [png(np.round(d * 255 / 16).astype(np.uint8), "L") for d in digits]
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        (sub / f"{i:06d}.png").write_bytes(files[i % len(files)])
    return files


def multipart_of(data: bytes, files: int) -> bytes:
    """One multipart upload of `files` copies of `data` (bench.harness.multipart's framing)."""
    closing = f"--{BOUNDARY}--\r\n".encode()
    return multipart(data)[:-len(closing)] * files + closing


def predict(folder: Path, out: Path, *source: str) -> dict:
    """`python -m serving.predict FOLDER SOURCE...` timed: its summary figures and the wall time."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "serving.predict", str(folder), *source, "--out", str(out)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    match = SUMMARY.search(result.stderr)
    if match is None:
        raise RuntimeError(f"serving.predict {' '.join(source)} exited {result.returncode}: {result.stderr[-2000:]}")
    images, seconds, _, before, answered, failed = match.groups()
    return {"images": int(images), "seconds": float(seconds), "rate": int(images) / float(seconds),
            "before": float(before), "wall": wall, "failed": int(failed), "status": result.returncode,
            "errors": result.stderr.splitlines()[1:6]}


def labels(out: Path) -> dict[str, int | None]:
    return {r["path"]: r["label"] for r in map(json.loads, out.read_text().splitlines())}


def shed(url: str) -> float:
    """digitserve_shed_requests_total: the requests the server answered 503 at capacity."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("digitserve_shed_requests_total"))


def import_seconds(runs: int = 5) -> float:
    """Median wall time of `python -c "import serving.client"`."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import serving.client"], cwd=ROOT, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--exports", type=Path, default=ROOT / "exports")
    parser.add_argument("--seconds", type=float, default=10, help="the server's single-image throughput run")
    parser.add_argument("--connections", type=int, default=32, help="of that run")
    parser.add_argument("--load", default="auto", choices=["auto", "wrk", "python"])
    parser.add_argument("--overload-images", type=int, default=2000, help="images sent to the --max-queue 1 server")
    args = parser.parse_args()
    load = run_wrk if args.load == "wrk" or (args.load == "auto" and shutil.which("wrk")) else run_python_load
    scratch = Path(tempfile.mkdtemp(prefix="predict-folder-", dir="/tmp"))
    try:
        folder = scratch / "pngs"
        folder.mkdir()
        files = write_pngs(folder, args.images, args.exports)
        body, batch = scratch / "body.bin", scratch / "batch.bin"
        body.write_bytes(multipart(files[0]))
        batch.write_bytes(multipart_of(files[0], 256))
        with running_server(args.exports) as server:
            url = predict(folder, scratch / "url.jsonl", "--url", server.url)
            seconds = max(1, round(args.seconds))
            load(server.url + "/predict", body, args.connections, min(3, seconds))  # warm-up
            served = load(server.url + "/predict", body, args.connections, seconds)
            batched = load(server.url + "/predict", batch, 8, seconds)
        offline = predict(folder, scratch / "exports.jsonl", "--exports", str(args.exports))
        by_url, by_exports = labels(scratch / "url.jsonl"), labels(scratch / "exports.jsonl")
        differ = sum(by_url[path] != by_exports.get(path) for path in by_url) + abs(len(by_url) - len(by_exports))

        overload_folder = scratch / "overload"
        overload_folder.mkdir()
        write_pngs(overload_folder, min(args.overload_images, args.images), args.exports)
        with running_server(args.exports, "--max-queue", "1") as server:
            before = shed(server.url)
            pressure_seconds = max(1.0, min(4.0, args.seconds / 2))
            pressure = threading.Thread(target=run_python_load,
                                        args=(server.url + "/predict", body, 8, pressure_seconds, 1))
            pressure.start()
            time.sleep(0.5)
            overload = predict(overload_folder, scratch / "overload.jsonl", "--url", server.url, "--concurrency", "8",
                               "--batch-size", "16")
            pressure.join()
            refused = shed(server.url) - before
        imported = import_seconds()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    rps = served["rps"]
    command = " ".join(["python -m bench.predict_folder", *sys.argv[1:]])
    print(f"## Batch prediction (`{command}`), {platform.machine()}, "
          f"{os.cpu_count()} cores\n")
    print(f"{args.images:,} 8x8 PNGs of the digits test split, `python -m serving.predict FOLDER` with its defaults. "
          "Images/s counts from the first request (or, offline, once the models are verified) to the last row; "
          "wall includes the interpreter's start and getting ready.\n")
    print("| run | images | images/s | wall s (getting ready s) | failed | exit |\n|---|---|---|---|---|---|")
    for name, r in (("`--url` (server: default flags)", url), ("`--exports` (no server)", offline),
                    ("`--url --concurrency 8 --batch-size 16`, server `--max-queue 1` under load", overload)):
        print(f"| {name} | {r['images']:,} | {r['rate']:,.0f} | {r['wall']:.2f} ({r['before']:.2f}) | {r['failed']} "
              f"| {r['status']} |")
    print(f"| the server alone: single-image uploads, {load.__name__}, {args.connections} connections, {seconds} s "
          f"(as bench.serve) | | {rps:,.0f} | | {served['non2xx']} non-2xx | |")
    print(f"| the server alone: uploads of 256 images, {load.__name__}, 8 connections, {seconds} s | | "
          f"{batched['rps'] * 256:,.0f} | | {batched['non2xx']} non-2xx | |")
    targets = [
        ("`--url` ≥ 80 % of the server's single-image throughput", f"{url['rate'] / rps:.0%}",
         url["rate"] >= 0.8 * rps),
        ("(for comparison) `--url` against the server's throughput on 256-image uploads",
         f"{url['rate'] / (batched['rps'] * 256):.0%}", None),
        ("`--exports` ≥ 3× `--url` (images/s)", f"{offline['rate'] / url['rate']:.2f}×",
         offline["rate"] >= 3 * url["rate"]),
        ("(for comparison) `--exports` against `--url` in wall time, start-up included",
         f"{url['wall'] / offline['wall']:.2f}×", None),
        ("the two modes' labels identical", f"{differ} differ of {len(by_url):,}", differ == 0),
        ("`--max-queue 1` under load: every image answered", f"{overload['failed']} failed of "
         f"{overload['images']:,}; the server refused {refused:.0f} requests 503 meanwhile",
         overload["failed"] == 0 and overload["images"] == min(args.overload_images, args.images)),
        ("`import serving.client` < 0.3 s", f"{imported:.3f} s (median of 5)", imported < 0.3),
    ]
    print("\n| target | measured | met |\n|---|---|---|")
    for name, measured, met in targets:
        print(f"| {name} | {measured} | {'—' if met is None else 'yes' if met else 'no'} |")
    for r in (url, offline, overload):
        if r["failed"]:
            print("\n" + "\n".join(r["errors"]))


if __name__ == "__main__":
    main()
