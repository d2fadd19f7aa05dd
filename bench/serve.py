"""Serving throughput and latency: digitserve (LitServe) against a minimal FastAPI + ONNX Runtime
endpoint, same artifact, same machine, same load, in one run.

    .venv/bin/python bench/serve.py [--model digits-cnn] [--connections 32] [--seconds 20] [-- SERVER FLAGS]

Load comes from `wrk` (Debian package `wrk`) in its own process: single-image PNG multipart
uploads, one per request. Also reports the in-process ceiling (decode + inference, no HTTP).
Prints a Markdown section for bench/RESULTS.md.
"""
import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from serving_helpers import ServerProcess, free_port, png  # noqa: E402

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=BENCHBOUNDARY"
local f = io.open("{image}", "rb")
local data = f:read("*all")
f:close()
wrk.body = "--BENCHBOUNDARY\\r\\nContent-Disposition: form-data; name=\\"file\\"; filename=\\"d.png\\"\\r\\n" ..
           "Content-Type: image/png\\r\\n\\r\\n" .. data .. "\\r\\n--BENCHBOUNDARY--\\r\\n"
"""


def digit_png() -> bytes:
    from sklearn.datasets import load_digits
    return png(np.round(load_digits().images[1400] * 255 / 16).astype(np.uint8), "L")


def run_wrk(url: str, script: Path, connections: int, seconds: int) -> dict:
    out = subprocess.run(["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--latency", "-s", str(script),
                          url], capture_output=True, text=True, check=True).stdout
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def latency(p):
        value, u = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M).groups()
        return float(value) * unit[u]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": latency(50), "p99": latency(99),
            "non2xx": int(non2xx.group(1)) if non2xx else 0, "socket_errors": errors.group(1) if errors else "none"}


def in_process_ceiling(folder: Path, data: bytes, seconds: float = 5.0) -> float:
    """Images/s for decode + validation + one-image ONNX Runtime inference, no HTTP, one thread."""
    import json
    from serving import images
    from serving.backends import OnnxBackend
    spec = json.loads((folder / "model.json").read_text())["input"]
    backend = OnnxBackend(folder / "model.onnx", "cpu", spec["name"])
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        pixels = images.to_gray_or_rgb(images.decode_image_bytes(data), spec["color"])
        backend(images.model_input(pixels, spec, invert=False)[None])
        n += 1
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="digits-cnn")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("server_flags", nargs="*", help="extra flags for python -m serving (after --)")
    args = parser.parse_args()
    folder = ROOT / "exports" / args.model
    work = Path(tempfile.mkdtemp())
    image = work / "digit.png"
    image.write_bytes(digit_png())
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT.format(image=image))

    port = free_port()
    baseline = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fastapi_baseline.py"), str(folder), str(port)])
    server = ServerProcess(ROOT / "exports", args=tuple(args.server_flags))
    try:
        server.wait_ready()
        for _ in range(100):
            try:
                httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        results = {}
        for name, url in (("FastAPI + ORT", f"http://127.0.0.1:{port}/predict"),
                          ("digitserve", f"{server.url}/predict?model={args.model}")):
            run_wrk(url, script, args.connections, 3)  # warm-up
            results[name] = run_wrk(url, script, args.connections, args.seconds)
    finally:
        server.stop()
        baseline.terminate()
        baseline.wait()
    ceiling = in_process_ceiling(folder, image.read_bytes())
    ratio = results["digitserve"]["rps"] / results["FastAPI + ORT"]["rps"]
    print(f"## Serving (`bench/serve.py {' '.join(sys.argv[1:])}`), {platform.machine()}, {os.cpu_count()} cores\n")
    print(f"Single-image PNG uploads to `{args.model}`, {args.connections} connections, {args.seconds} s, wrk in its own process.\n")
    print("| server | req/s | p50 ms | p99 ms | non-2xx | socket errors |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['non2xx']} | {r['socket_errors']} |")
    print(f"\nRatio digitserve / FastAPI: **{ratio:.2f}×**. In-process ceiling (decode + one-image inference, "
          f"one thread, no HTTP): {ceiling:.0f} images/s.")


if __name__ == "__main__":
    main()
