"""Soak: valid and hostile requests mixed at 64 connections against a real server, with the
resident memory of every one of its processes sampled throughout. Targets: 0 errors on the valid
requests, resident memory growth <= 50 MB per process after warm-up.

    .venv/bin/python -m bench.soak [--valid 20000] [--hostile 5000] [--connections 64] [--warmup 2000]
"""
import argparse
import asyncio
import base64
import json
import random
import sys
import threading
import time
from collections import Counter

import httpx
import numpy as np

from bench.harness import ROOT, png, process_tree, rss_mb, running_server
from bench.hostile import generate


def valid_requests(n: int, seed: int):
    rng = random.Random(seed)
    with np.load(ROOT / "exports" / "digits-cnn" / "test_set.npz", allow_pickle=False) as data:
        digits = data["x"][:, 0]
    for i in range(n):
        digit = digits[i % len(digits)]
        kind = rng.random()
        if kind < 0.5:
            image = png(np.round(digit * 255 / 16).astype(np.uint8), "L")
            boundary = "soak"
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.png\"\r\n\r\n"
                    ).encode() + image + f"\r\n--{boundary}--\r\n".encode()
            yield "valid", "POST", "/predict", {"content-type": f"multipart/form-data; boundary={boundary}"}, body
        elif kind < 0.75:
            encoded = base64.b64encode(png(np.round(digit * 255 / 16).astype(np.uint8), "L")).decode()
            body = json.dumps({"model": "digits-mlp", "images": [encoded], "pixels": [digit.tolist()]}).encode()
            yield "valid", "POST", "/predict", {"content-type": "application/json"}, body
        else:
            body = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                           "data": digit.ravel().tolist()}]}).encode()
            yield "valid", "POST", "/v2/models/digits-cnn/infer", {"content-type": "application/json"}, body


async def send(url: str, requests: list, connections: int) -> Counter:
    outcomes = Counter()
    queue = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)

    async def worker(client):
        while not queue.empty():
            kind, method, path, headers, content = queue.get_nowait()
            try:
                response = await client.request(method, path, headers=headers, content=content)
                outcomes[(kind, response.status_code)] += 1
            except httpx.TransportError as err:
                outcomes[(kind, type(err).__name__)] += 1
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=connections)) as c:
        await asyncio.gather(*(worker(c) for _ in range(connections)))
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--valid", type=int, default=20000)
    parser.add_argument("--hostile", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2000, help="valid requests sent before memory is measured")
    args = parser.parse_args()
    hostile = [("hostile", method, path + ("?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else ""),
                headers, body) for method, path, params, headers, body in generate(args.hostile, seed=1)]
    mixed = list(valid_requests(args.valid, seed=0)) + hostile
    random.Random(2).shuffle(mixed)
    with running_server(ROOT / "exports", "--workers", "2") as server:
        asyncio.run(send(server.url, list(valid_requests(args.warmup, seed=9)), args.connections))  # warm-up
        pids = process_tree(server.process.pid)
        baseline = {pid: rss_mb(pid) for pid in pids}
        peaks = dict(baseline)
        done = threading.Event()

        def sample():
            while not done.wait(0.5):
                for pid in pids:
                    value = rss_mb(pid)
                    if value is not None:
                        peaks[pid] = max(peaks[pid], value)
        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        outcomes = asyncio.run(send(server.url, mixed, args.connections))
        seconds = time.monotonic() - started
        done.set()
        sampler.join()
        final = {pid: rss_mb(pid) for pid in pids}
        alive = server.process.poll() is None
        log = server.output()
    valid_errors = sum(n for (kind, status), n in outcomes.items() if kind == "valid" and status != 200)
    hostile_5xx = sum(n for (kind, status), n in outcomes.items()
                      if kind == "hostile" and (not isinstance(status, int) or status >= 500))
    print(f"{args.valid} valid + {args.hostile} hostile requests, shuffled, {args.connections} connections, "
          f"{seconds:.1f} s ({len(mixed) / seconds:.0f} req/s); server alive: {alive}; tracebacks: {log.count('Traceback')}")
    print(f"outcomes: {dict(sorted(outcomes.items(), key=str))}")
    print(f"valid requests not answered 200: {valid_errors}; hostile answered 5xx or not at all: {hostile_5xx}")
    print("| process | RSS after warm-up MB | peak MB | final MB | growth MB |\n|---|---|---|---|---|")
    growths = []
    for pid in pids:
        if baseline[pid] is None or final[pid] is None:
            continue
        growths.append(final[pid] - baseline[pid])
        print(f"| {pid} | {baseline[pid]:.0f} | {peaks[pid]:.0f} | {final[pid]:.0f} | {final[pid] - baseline[pid]:+.1f} |")
    ok = valid_errors == 0 and hostile_5xx == 0 and alive and max(growths) <= 50
    print(f"targets (0 valid errors, 0 hostile 5xx, growth <= 50 MB per process): {'met' if ok else 'NOT met'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
