"""What an adversary's requests and model folders cost a running server (issue 21's targets):

- 100 MB of tiny header lines on one connection to /health: peak growth of the HTTP process (< 50 MB);
- 2,000 distinct 60 KB model names asked for: memory kept afterwards (< 50 MB);
- a 0.23 MB test split that decompresses to 2.4 GB, published: peak growth while it is refused;
- /predict throughput while four clients loop on /evaluate of the largest model (>= 70 % kept).

    .venv/bin/python -m bench.exhaustion [--seconds 10] [--megabytes 100] [--names 2000] [--bomb-megabytes 2304]
"""
import argparse
import io
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np

from bench.harness import (ROOT, PeakRss, copy_committed, process_tree, rss_mb, run_python_load, running_server,
                           upload_body)


def header_flood(server, megabytes: int) -> tuple[float, bytes]:
    with PeakRss(server.process.pid) as rss, socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(megabytes):
                sock.sendall(b"a:b\r\n" * 209_716)
        except OSError:
            pass
        answer = sock.recv(100)
    return rss.growth, answer.split(b"\r\n")[0]


def unknown_names(server, count: int, size: int) -> float:
    before = sum(rss_mb(pid) or 0 for pid in process_tree(server.process.pid))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        statuses = {client.get(f"/models/{i:06d}{'x' * (size - 6)}").status_code for i in range(count)}
    assert statuses == {404} or statuses == {414}, statuses
    return sum(rss_mb(pid) or 0 for pid in process_tree(server.process.pid)) - before


def split_bomb(server, exports: Path, megabytes: int) -> tuple[float, float, str]:
    """digits-cnn published again with an LZMA test split of zeros that decompresses to `megabytes`
    (2.4 GB by default) and declares 2.4 GB."""
    staging = Path(tempfile.mkdtemp(dir=exports, prefix=".bomb"))
    folder = staging / "digits-cnn"
    shutil.copytree(exports / "digits-cnn", folder)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_LZMA) as archive:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (9_375_000, 1, 8, 8)})
        with archive.open("x.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            zeros, left = memoryview(bytes(64 << 20)), megabytes << 20
            while left:
                member.write(zeros[:min(left, len(zeros))])
                left -= min(left, len(zeros))
        archive.writestr("y.npy", (folder / "test_set.npz").read_bytes()[:0])
    (folder / "test_set.npz").write_bytes(buffer.getvalue())
    manifest = json.loads((folder / "model.json").read_text())
    manifest["test_set"]["sha256"] = __import__("hashlib").sha256(buffer.getvalue()).hexdigest()
    (folder / "model.json").write_text(json.dumps(manifest))
    (exports / "digits-cnn").rename(staging / "old")
    folder.rename(exports / "digits-cnn")
    with PeakRss(server.process.pid) as rss:
        started = time.perf_counter()
        changes = httpx.post(server.url + "/models/reload", timeout=600).json()["changes"]
        seconds = time.perf_counter() - started
    (change,) = [c for c in changes if c["model"] == "digits-cnn"]
    return rss.growth, seconds, f"{len(buffer.getvalue()) / 1e6:.2f} MB file: {change['event']}: {change.get('reason')}"


def evaluate_fairness(server, seconds: int, model: str) -> tuple[float, float, int]:
    body = upload_body(ROOT / "exports" / "digits-cnn")
    url = f"{server.url}/predict"
    alone = run_python_load(url, body, 32, seconds)["ok_rps"]
    stop, evaluations = threading.Event(), []

    def loop():
        with httpx.Client(base_url=server.url, timeout=120) as client:
            while not stop.is_set():
                evaluations.append(client.post(f"/models/{model}/evaluate").status_code)
    threads = [threading.Thread(target=loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    beside = run_python_load(url, body, 32, seconds)["ok_rps"]
    stop.set()
    for thread in threads:
        thread.join()
    return alone, beside, sum(1 for status in evaluations if status == 200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--megabytes", type=int, default=100, help="header lines sent to /health")
    parser.add_argument("--names", type=int, default=2000, help="distinct unknown model names asked for, per size")
    parser.add_argument("--bomb-megabytes", type=int, default=2304, help="what the published test split inflates to")
    args = parser.parse_args()
    exports = Path(tempfile.mkdtemp()) / "exports"
    copy_committed(exports, "digits-cnn", "digits-mlp", "svhn-synthetic-cnn")
    with running_server(exports, "--workers", "2", "--reload-interval", "0") as server:
        flood, answer = header_flood(server, args.megabytes)
        names = unknown_names(server, args.names, 60_000)
        names_short = unknown_names(server, args.names, 6_000)
        alone, beside, evaluations = evaluate_fairness(server, args.seconds, "svhn-synthetic-cnn")
        bomb, bomb_seconds, bomb_result = split_bomb(server, exports, args.bomb_megabytes)
    print(f"## Exhaustion (`python -m bench.exhaustion {' '.join(sys.argv[1:])}`), {platform.machine()}, "
          f"{os.cpu_count()} cores\n")
    print("| attack | measured | target |\n|---|---|---|")
    print(f"| {args.megabytes} MB of header lines to /health | peak +{flood:.1f} MB in one process; answer "
          f"`{answer.decode()}` | < 50 MB |")
    print(f"| {args.names:,} distinct 60 KB names on /models/NAME | 414 each; +{names:.1f} MB kept (all processes) | "
          "< 50 MB |")
    print(f"| {args.names:,} distinct 6 KB names on /models/NAME | 404 each; +{names_short:.1f} MB kept "
          "(all processes) | < 50 MB |")
    print(f"| test-split bomb published ({bomb_result}) | peak +{bomb:.1f} MB, refused in {bomb_seconds:.2f} s | "
          "rejected before decompressing |")
    print(f"| /predict while 4 clients loop on /evaluate of svhn-synthetic-cnn | {beside:.0f} req/s of {alone:.0f} "
          f"alone ({beside / alone:.0%}; {evaluations} evaluations answered) | >= 70 % |")


if __name__ == "__main__":
    main()
