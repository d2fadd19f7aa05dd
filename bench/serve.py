"""Serving throughput and latency: digitserve (LitServe) against a minimal FastAPI + ONNX Runtime
endpoint, same artifact, same machine, same load, in one run.

    .venv/bin/python bench/serve.py [--model digits-cnn] [--connections 32] [--seconds 20]
                                    [--backend onnx|torchscript] [--device auto|cpu|cuda]
                                    [--exports DIR] [--load auto|wrk|python] [--baseline-workers N]
                                    [-- MORE SERVER FLAGS]

Single-image PNG multipart uploads, one per request: an 8x8 digit for grayscale models, a 32x32
RGB crop for RGB (SVHN-shaped) models. Load comes from `wrk` (Debian package) in its own process,
or from bench/load.py (several processes) where wrk is missing. Also reports the in-process
ceiling (decode + one-image inference on the same backend, no HTTP). Prints a Markdown section.
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from serving import images  # noqa: E402
from serving.backends import BACKENDS, BackendError  # noqa: E402
from serving_helpers import ServerProcess, free_port, png  # noqa: E402

BOUNDARY = "BENCHBOUNDARY"
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary={boundary}"
local f = io.open("{body}", "rb")
wrk.body = f:read("*all")
f:close()
"""


def upload_image(folder: Path, spec: dict) -> bytes:
    """A digit from the export's own test split, or a random RGB crop of the model's size."""
    if spec["color"] == "grayscale":
        with np.load(folder / "test_set.npz", allow_pickle=False) as data:
            digit = data["x"][0, 0]
        return png(np.round(digit * 255 / spec["range"][1]).astype(np.uint8), "L")
    height, width = images.spec_size(spec)
    return png(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def multipart(data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def run_wrk(url: str, body: Path, connections: int, seconds: int) -> dict:
    script = body.with_suffix(".lua")
    script.write_text(WRK_SCRIPT.format(boundary=BOUNDARY, body=body))
    threads = min(connections, max(1, (os.cpu_count() or 2) // 2))
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def latency(p):
        value, u = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M).groups()
        return float(value) * unit[u]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": latency(50), "p99": latency(99),
            "non2xx": int(non2xx.group(1)) if non2xx else 0, "socket_errors": errors.group(1) if errors else "none"}


def run_python_load(url: str, body: Path, connections: int, seconds: int) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), url, str(body),
                          f"multipart/form-data; boundary={BOUNDARY}", "--connections", str(connections),
                          "--seconds", str(seconds)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def in_process_ceiling(folder: Path, data: bytes, backend: str, device: str, seconds: float = 5.0) -> float:
    """Images/s for decode + validation + one-image inference, no HTTP, one thread."""
    spec = json.loads((folder / "model.json").read_text())["input"]
    manifest = json.loads((folder / "model.json").read_text())
    backend = BACKENDS[backend]
    runner = backend(folder / manifest["artifacts"][backend.name]["file"], backend.resolve(device), spec["name"])
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
    baseline = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fastapi_baseline.py"), str(folder), str(port),
                                 "--device", baseline_device, "--workers", str(args.baseline_workers)])
    server = ServerProcess(args.exports, args=("--backend", args.backend, "--device", args.device,
                                               *args.server_flags))
    try:
        server.wait_ready()
        wait_for(f"http://127.0.0.1:{port}/docs")
        results = {}
        for name, url in (("FastAPI + ORT", f"http://127.0.0.1:{port}/predict"),
                          ("digitserve", f"{server.url}/predict?model={args.model}")):
            load(url, body, args.connections, 3)  # warm-up
            results[name] = load(url, body, args.connections, args.seconds)
    finally:
        server.stop()
        baseline.terminate()
        baseline.wait()
    ceiling = in_process_ceiling(folder, data, args.backend, args.device)
    ratio = results["digitserve"]["rps"] / results["FastAPI + ORT"]["rps"]
    print(f"## Serving (`bench/serve.py {' '.join(sys.argv[1:])}`), {platform.machine()}, {os.cpu_count()} cores\n")
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
