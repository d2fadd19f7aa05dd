"""Serving throughput and latency: digitserve (LitServe) against a minimal FastAPI + ONNX Runtime
endpoint, same artifact, same machine, same load, in one run.

    .venv/bin/python -m bench.serve [--model digits-cnn] [--connections 32] [--seconds 20]
                                    [--backend onnx|torchscript] [--device auto|cpu|cuda]
                                    [--exports DIR] [--load auto|wrk|python] [--baseline-workers N]
                                    [--warmup-seconds 3] [--ceiling-seconds 5] [-- MORE SERVER FLAGS]

Single-image PNG multipart uploads, one per request: an 8x8 digit for grayscale models, a 32x32
RGB crop for RGB (SVHN-shaped) models. Load comes from `wrk` (Debian package) in its own process,
or from bench/load.py (several processes) where wrk is missing. Also reports the in-process
ceiling (decode + one-image inference on the same backend, no HTTP). Prints a Markdown section.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.harness import ROOT, ServerProcess, free_port, multipart, run_python_load, run_wrk, upload_image
from serving import images
from serving.backends import BACKENDS, BackendError


def in_process_ceiling(folder: Path, data: bytes, backend: str, device: str, seconds: float = 5.0) -> float:
    """Images/s for decode + validation + one-image inference, no HTTP, one thread."""
    manifest = json.loads((folder / "model.json").read_text())
    spec, artifact = manifest["input"], manifest["artifacts"][backend]["file"]
    backend = BACKENDS[backend]
    runner = backend((folder / artifact).read_bytes(), artifact, backend.resolve(device), spec["name"])
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        pixels = images.to_gray_or_rgb(images.decode(images.open_image(data)), spec["color"])
        runner(images.model_input(pixels, spec, invert=False)[None])
        n += 1
    return n / (time.perf_counter() - started)


def wait_for(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError(url)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exports", type=Path, default=ROOT / "exports")
    parser.add_argument("--model", default="digits-cnn")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--backend", default="onnx", choices=["onnx", "torchscript"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--load", default="auto", choices=["auto", "wrk", "python"])
    parser.add_argument("--baseline-workers", type=int, default=1, help="uvicorn processes of the FastAPI baseline")
    parser.add_argument("--warmup-seconds", type=int, default=3, help="load before each measured run (0: none)")
    parser.add_argument("--ceiling-seconds", type=float, default=5.0, help="length of the in-process measurement")
    parser.add_argument("server_flags", nargs="*", help="extra flags for python -m serving (after --)")
    args = parser.parse_args()
    folder = args.exports / args.model
    spec = json.loads((folder / "model.json").read_text())["input"]
    data = upload_image(folder, spec)
    body = Path(tempfile.mkdtemp()) / "body.bin"
    body.write_bytes(multipart(data))
    load = run_wrk if args.load == "wrk" or (args.load == "auto" and shutil.which("wrk")) else run_python_load

    port = free_port()
    try:  # the baseline runs ONNX Runtime: on CUDA only where it has the provider
        baseline_device = BACKENDS["onnx"].resolve(args.device)
    except BackendError:
        baseline_device = "cpu"
    baseline = subprocess.Popen([sys.executable, "-m", "bench.fastapi_baseline", str(folder), str(port),
                                 "--device", baseline_device, "--workers", str(args.baseline_workers)], cwd=ROOT)
    server = ServerProcess(args.exports, args=("--backend", args.backend, "--device", args.device,
                                               *args.server_flags))
    try:
        server.wait_ready()
        wait_for(f"http://127.0.0.1:{port}/docs")
        results = {}
        for name, url in (("FastAPI + ORT", f"http://127.0.0.1:{port}/predict"),
                          ("digitserve", f"{server.url}/predict?model={args.model}")):
            if args.warmup_seconds:
                load(url, body, args.connections, args.warmup_seconds)
            results[name] = load(url, body, args.connections, args.seconds)
    finally:
        server.stop()
        baseline.terminate()
        baseline.wait()
    ceiling = in_process_ceiling(folder, data, args.backend, args.device, args.ceiling_seconds)
    ratio = results["digitserve"]["rps"] / results["FastAPI + ORT"]["rps"]
    print(f"## Serving (`python -m bench.serve {' '.join(sys.argv[1:])}`), {platform.machine()}, "
          f"{os.cpu_count()} cores\n")
    print(f"Single-image PNG uploads to `{args.model}` ({args.backend}, device {args.device}; baseline "
          f"{baseline_device}, {args.baseline_workers} process(es)), "
          f"{args.connections} connections, {args.seconds} s, load from {load.__name__} in its own process(es).\n")
    print("| server | req/s | p50 ms | p99 ms | non-2xx | socket errors |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['non2xx']} | {r['socket_errors']} |")
    print(f"\nRatio digitserve / FastAPI: **{ratio:.2f}×**. In-process ceiling (decode + one-image inference, "
          f"one thread, no HTTP): {ceiling:.0f} images/s.")


if __name__ == "__main__":
    main()
