"""Serving on a GPU (issue 27): digitserve on each backend with `--device DEVICE` against the FastAPI +
ONNX Runtime baseline, the same number of HTTP processes on both sides, single-image PNG uploads to
each model named (a 32x32 colour crop or an 8x8 digit, by the model's input). Per run: req/s, p50/p99,
errors, GPU utilisation (nvidia-smi sampled every 200 ms; none without it) and, for digitserve, the
batcher's batch sizes (the difference of /metrics' histogram over the run). Also each served model's
start-up verification on that backend and device, as /models reports it. Prints Markdown and writes
gpu_serve.md and gpu_serve.json into --out. bench/gpu_serve.sh runs it on a GPU machine.

    .venv/bin/python -m bench.gpu_serve --exports DIR --models svhn-w64 digits-cnn [--backends onnx torchscript]
        [--device cuda] [--workers 16] [--connections 384] [--seconds 10] [--warmup-seconds 2]
        [--load auto|wrk|python] [--out DIR]
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from bench.harness import ROOT, ServerProcess, free_port, run_python_load, run_wrk, upload_body
from bench.serve import wait_for
from serving.backends import BACKENDS, BackendError

BATCH_BUCKET = re.compile(r'^digitserve_inference_batch_images_bucket\{le="([^"]+)"\} ([\d.e+]+)$', re.M)


class GpuSampler:
    """nvidia-smi's utilisation readings while the block runs: (mean, max) percent, or None without a GPU."""

    def __enter__(self):
        self.process = None
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                             "-lms", "200"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        self.readings = []
        if self.process:
            self.process.terminate()
            out, _ = self.process.communicate()
            self.readings = [float(line) for line in out.split() if line.replace(".", "", 1).isdigit()]

    @property
    def utilisation(self) -> tuple[float, float] | None:
        return (sum(self.readings) / len(self.readings), max(self.readings)) if self.readings else None


def batch_buckets(url: str) -> dict[str, float]:
    """The cumulative bucket counts of digitserve's batch-size histogram, whole server."""
    return {le: float(n) for le, n in BATCH_BUCKET.findall(httpx.get(f"{url}/metrics", timeout=10).text)}


def batch_sizes(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Batches per size bucket during the run ("≤8": 5 to 8 images), empty buckets left out."""
    counts, below, bound = {}, 0.0, "0"
    for le in sorted(after, key=float):  # float() reads "+Inf"
        cumulative = after[le] - before.get(le, 0.0)
        if cumulative > below:
            counts[f"≤{float(le):g}" if le != "+Inf" else f">{float(bound):g}"] = int(cumulative - below)
        below, bound = cumulative, le
    return counts


def measure(url: str, body: Path, load, args) -> dict:
    if args.warmup_seconds:
        load(url, body, args.connections, args.warmup_seconds)
    with GpuSampler() as gpu:
        result = load(url, body, args.connections, args.seconds)
    return {**result, "gpu_utilisation": gpu.utilisation}


def digitserve_runs(backend: str, args, bodies: dict, load) -> tuple[list[dict], list[dict]]:
    """One server on `backend`: what /models says of every model, then one run per model."""
    # ServerProcess sets PYTHONPATH to the checkout: the packages carried to a GPU machine come after it
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    server = ServerProcess(args.exports, env={"PYTHONPATH": path},
                           args=("--backend", backend, "--device", args.device, "--workers", str(args.workers)))
    runs = []
    try:
        server.wait_ready(timeout=300)
        models = httpx.get(f"{server.url}/models", timeout=30).json()["models"]
        verification = [{"backend": backend, **{k: m.get(k) for k in ("name", "status", "device", "provider",
                                                                       "verified")}} for m in models]
        for name, body in bodies.items():
            before = batch_buckets(server.url)
            run = measure(f"{server.url}/predict?model={name}", body, load, args)
            runs.append({"server": "digitserve", "backend": backend, "model": name, **run,
                         "batches": batch_sizes(before, batch_buckets(server.url))})
    finally:
        server.stop()
    return verification, runs


def baseline_runs(args, bodies: dict, load) -> list[dict]:
    try:  # ONNX Runtime on CUDA only where it has the provider, as bench.serve decides
        device = BACKENDS["onnx"].resolve(args.device)
    except BackendError:
        device = "cpu"
    runs = []
    for name, body in bodies.items():
        port = free_port()
        baseline = subprocess.Popen([sys.executable, "-m", "bench.fastapi_baseline", str(args.exports / name), str(port),
                                     "--device", device, "--workers", str(args.workers)], cwd=ROOT)
        try:
            wait_for(f"http://127.0.0.1:{port}/docs", timeout=120)
            runs.append({"server": "FastAPI + ORT", "backend": f"onnx ({device})", "model": name,
                         **measure(f"http://127.0.0.1:{port}/predict", body, load, args), "batches": {}})
        finally:
            baseline.terminate()
            baseline.wait()
    return runs


def markdown(report: dict) -> str:
    lines = [f"## Serving on {report['machine']}\n",
             f"`python -m bench.gpu_serve {report['command']}`: {report['connections']} connections, "
             f"{report['seconds']} s a run after {report['warmup_seconds']} s of warm-up, {report['workers']} HTTP "
             f"processes on each side, load from {report['load']}.\n",
             "| server | backend | model | req/s | p50 ms | p99 ms | non-2xx | socket errors | GPU util mean / max % "
             "| batches (images per batch: count) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        gpu = "—" if r["gpu_utilisation"] is None else "{:.0f} / {:.0f}".format(*r["gpu_utilisation"])
        batches = ", ".join(f"{k}: {v}" for k, v in r["batches"].items()) or "—"
        lines.append(f"| {r['server']} | {r['backend']} | {r['model']} | {r['rps']:.0f} | {r['p50']:.1f} | "
                     f"{r['p99']:.1f} | {r['non2xx']} | {r['socket_errors']} | {gpu} | {batches} |")
    lines += ["", "Start-up verification, as /models reports it:", "",
              "| backend | model | status | device | provider | verified |", "|---|---|---|---|---|---|"]
    for v in report["verification"]:
        lines.append(f"| {v['backend']} | {v['name']} | {v['status']} | {v['device']} | {v['provider']} | "
                     f"{json.dumps(v['verified'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exports", type=Path, required=True, help="the folder digitserve serves")
    parser.add_argument("--models", nargs="+", required=True, help="the models to load, one run each")
    parser.add_argument("--backends", nargs="+", default=["onnx", "torchscript"], choices=list(BACKENDS))
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="HTTP processes, on both sides")
    parser.add_argument("--connections", type=int, default=384)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--warmup-seconds", type=int, default=2)
    parser.add_argument("--load", default="auto", choices=["auto", "wrk", "python"])
    parser.add_argument("--out", type=Path, help="folder for gpu_serve.md and gpu_serve.json")
    args = parser.parse_args()
    load = run_wrk if args.load == "wrk" or (args.load == "auto" and shutil.which("wrk")) else run_python_load
    bodies, scratch = {}, Path(tempfile.mkdtemp())
    for name in args.models:  # upload_body writes body.bin: a folder each
        (scratch / name).mkdir()
        bodies[name] = upload_body(args.exports / name, scratch / name)
    verification, runs = [], []
    for backend in args.backends:
        checked, measured = digitserve_runs(backend, args, bodies, load)
        verification += checked
        runs += measured
    runs += baseline_runs(args, bodies, load)
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() if shutil.which("nvidia-smi") else "no GPU"
    report = {"machine": f"{gpu}, {os.cpu_count()} cores", "command": " ".join(sys.argv[1:]), "load": load.__name__,
              "connections": args.connections, "seconds": args.seconds, "warmup_seconds": args.warmup_seconds,
              "workers": args.workers, "runs": runs, "verification": verification}
    text = markdown(report)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_serve.md").write_text(text)
        (args.out / "gpu_serve.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
