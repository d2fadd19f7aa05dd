"""Serving throughput and latency: digitserve (LitServe) against a minimal FastAPI + ONNX Runtime
endpoint with one process and with one per core, same artifact, same machine, same load, in one run.

    .venv/bin/python -m bench.serve [--model digits-cnn] [--connections 32] [--seconds 20]
                                    [--backend onnx|torchscript] [--device auto|cpu|cuda]
                                    [--exports DIR] [--load auto|wrk|python] [--baseline-workers 1 N]
                                    [--warmup-seconds 3] [--ceiling-seconds 5] [--rounds 1]
                                    [--digitserve-from CHECKOUT] [-- MORE SERVER FLAGS]

Single-image PNG multipart uploads, one per request: an 8x8 digit for grayscale models, a 32x32
RGB crop for RGB (SVHN-shaped) models. Load comes from `wrk` (Debian package) in its own process,
or from bench/load.py (several processes) where wrk is missing. Also reports the in-process
ceiling (decode + one-image inference on the same backend, no HTTP, one thread) times the cores,
and digitserve's share of it, and each server's CPU time (all its processes, from /proc) per answer:
the per-request cost, which `--digitserve-from` compares between two commits
(`git worktree add /tmp/before COMMIT`). Prints a Markdown section.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import statistics
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from bench.harness import (ROOT, ServerProcess, connections_by_process, cpu_seconds, free_port, multipart,
                           process_tree, run_python_load, run_wrk, upload_image)
from serving import images
from serving.backends import BACKENDS, BackendError
from serving import config


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


def warmed_load(load, url: str, body: Path, args, server_pid: int, processes: int) -> dict:
    """`--warmup-seconds` of load, unmeasured, then `--seconds` measured; `split`: the connections each
    of the server's `processes` held halfway through, 0 for one that held none (the kernel gives each new
    connection to whichever process accepts first, so one may get them all, and its cores' share of the
    work with them); `cpu_ms`: the server's CPU time (all its processes) per answer."""
    if args.warmup_seconds:
        load(url, body, args.connections, args.warmup_seconds)
    split = []

    def sample():
        held = connections_by_process(urlsplit(url).port)
        split.extend(held + [0] * (processes - len(held)))
    sampler = threading.Timer(args.seconds / 2, sample)
    sampler.start()
    pids = process_tree(server_pid)
    cpu_before = cpu_seconds(pids)
    try:
        result = load(url, body, args.connections, args.seconds)
    finally:
        sampler.cancel()
    answers = result["rps"] * args.seconds
    return {**result, "split": split, "cpu_ms": (cpu_seconds(pids) - cpu_before) / answers * 1000 if answers else 0.0}


def measure_baseline(command: list[str], workers: int, load, body: Path, args) -> dict:
    """One comparison server (`command` + PORT --workers N), loaded as digitserve is."""
    port = free_port()
    baseline = subprocess.Popen([sys.executable, "-m", *command, str(port), "--workers", str(workers)], cwd=ROOT)
    try:
        wait_for(f"http://127.0.0.1:{port}/")
        return warmed_load(load, f"http://127.0.0.1:{port}/predict", body, args, baseline.pid, workers)
    finally:
        baseline.terminate()
        baseline.wait()


def measure_digitserve(load, body: Path, args, processes: int) -> dict:
    code = args.digitserve_from or ROOT  # `python -m serving` imports the serving/ of its working directory
    server = ServerProcess(args.exports, args=("--backend", args.backend, "--device", args.device, *args.server_flags),
                           cwd=code, env={"PYTHONPATH": str(code)})
    try:
        server.wait_ready()
        return warmed_load(load, f"{server.url}/predict?model={args.model}", body, args, server.process.pid,
                           processes)
    finally:
        server.stop()


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser()
    parser.add_argument("--exports", type=Path, default=ROOT / "exports")
    parser.add_argument("--model", default="digits-cnn")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--backend", default="onnx", choices=["onnx", "torchscript"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--load", default="auto", choices=["auto", "wrk", "python"])
    parser.add_argument("--baseline-workers", type=int, nargs="+", default=sorted({1, cores}),
                        help="uvicorn processes of the FastAPI baseline, one run each (default: 1 and one per core)")
    parser.add_argument("--warmup-seconds", type=int, default=3, help="load before each measured run (0: none)")
    parser.add_argument("--ceiling-seconds", type=float, default=5.0, help="length of the in-process measurement")
    parser.add_argument("--rounds", type=config.integer(1), default=1,
                        help="every server measured this many times, alternating")
    parser.add_argument("--digitserve-from", type=Path, help="serve digitserve from this checkout instead "
                        "(another commit's worktree: an A/B of a change against the same baseline)")
    parser.add_argument("server_flags", nargs="*", help="extra flags for python -m serving (after --)")
    args = parser.parse_args()
    folder = args.exports / args.model
    spec = json.loads((folder / "model.json").read_text())["input"]
    data = upload_image(folder, spec)
    body = Path(tempfile.mkdtemp()) / "body.bin"
    body.write_bytes(multipart(data))
    load = run_wrk if args.load == "wrk" or (args.load == "auto" and shutil.which("wrk")) else run_python_load
    try:  # the baseline runs ONNX Runtime: on CUDA only where it has the provider
        baseline_device = BACKENDS["onnx"].resolve(args.device)
    except BackendError:
        baseline_device = "cpu"
    # One server at a time: each has the machine's cores to itself (and the load generator's share);
    # rounds alternate them, so that a slow spell of the machine falls on all of them.
    fastapi = ["bench.fastapi_baseline", "--device", baseline_device, str(folder)]
    baseline_names = {workers: f"FastAPI + ORT, {workers} process{'es' if workers > 1 else ''}"
                      for workers in args.baseline_workers}
    floor_name = f"bare ASGI app, constant answer, {cores} processes (the floor)"
    runs = {name: [] for name in [*baseline_names.values(), "digitserve", floor_name]}
    ours_processes = config.parse(["--exports", str(args.exports), *args.server_flags]).workers  # flags, then env
    for _ in range(args.rounds):
        for workers, name in baseline_names.items():
            runs[name].append(measure_baseline(fastapi, workers, load, body, args))
        runs["digitserve"].append(measure_digitserve(load, body, args, ours_processes))
        runs[floor_name].append(measure_baseline(["bench.asgi_floor"], cores, load, body, args))
    ceiling = in_process_ceiling(folder, data, args.backend, args.device, args.ceiling_seconds)
    print(f"## Serving (`python -m bench.serve {' '.join(sys.argv[1:])}`), {platform.machine()}, {cores} cores\n")
    print(f"Single-image PNG uploads to `{args.model}` ({args.backend}, device {args.device}; baseline "
          f"{baseline_device}), {args.connections} connections, {args.seconds} s each, one server at a time, "
          f"{args.rounds} round(s), load from {load.__name__} in its own process(es). Connections: how many "
          "each server process held.\n")
    print("| server | round | req/s | p50 ms | p99 ms | non-2xx | socket errors | connections "
          "| server CPU ms a request |\n|---|---|---|---|---|---|---|---|---|")
    for name, results in runs.items():
        for i, r in enumerate(results, 1):
            print(f"| {name} | {i} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['non2xx']} | "
                  f"{r['socket_errors']} | {'/'.join(map(str, r['split'])) or '?'} | {r['cpu_ms']:.3f} |")
    median = {name: statistics.median(r["rps"] for r in results) for name, results in runs.items()}
    ours = median["digitserve"]
    per_round = {name: [d["rps"] / b["rps"] for d, b in zip(runs["digitserve"], runs[name])]
                 for name in baseline_names.values()}
    ratios = ", ".join(f"**{ours / median[name]:.2f}×** {name} (rounds: "
                       f"{', '.join(f'{x:.2f}' for x in per_round[name])})" for name in baseline_names.values())
    # A run in which some process held no connection measures fewer cores: compare the rounds in which
    # every process of both servers held some.
    served_by_all = {name: [d["rps"] / b["rps"] for d, b in zip(runs["digitserve"], runs[name])
                            if d["split"] and b["split"] and 0 not in d["split"] + b["split"]]
                     for name in baseline_names.values()}
    fewest = baseline_names[min(baseline_names)]
    first = runs[fewest]
    spread = statistics.median(r["p99"] - r["p50"] for r in first)
    p99 = statistics.median(r["p99"] for r in runs["digitserve"])
    ours_spread = statistics.median(r["p99"] - r["p50"] for r in runs["digitserve"])
    print(f"\nRatio of the medians: digitserve / {ratios}. digitserve's p99 {p99:.1f} ms (its p50-to-p99 spread "
          f"{ours_spread:.1f} ms) against twice the p50-to-p99 spread of {fewest}, {2 * spread:.1f} ms. "
          f"In-process ceiling (decode + one-image inference, one "
          f"thread, no HTTP): {ceiling:.0f} images/s; × {cores} cores = {ceiling * cores:.0f}; digitserve reaches "
          f"**{ours / (ceiling * cores):.0%}** of it; the bare ASGI app, which neither decodes nor infers, "
          f"{median[floor_name] / (ceiling * cores):.0%}.")
    print("\nRounds in which every process of both servers held connections: " + "; ".join(
        f"{name}: {', '.join(f'{x:.2f}×' for x in ratios)} (median **{statistics.median(ratios):.2f}×**)"
        if ratios else f"{name}: none" for name, ratios in served_by_all.items()) + ".")


if __name__ == "__main__":
    main()
