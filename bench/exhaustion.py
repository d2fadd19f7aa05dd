"""What an adversary's requests and model folders cost a running server (issue 21's targets):

- 100 MB of tiny header lines on one connection to /health: peak growth of the HTTP process (< 50 MB);
- 2,000 distinct 60 KB model names asked for: memory kept afterwards (< 50 MB);
- a 0.23 MB test split that decompresses to 2.4 GB, published: peak growth while it is refused;
- /predict throughput while four clients loop on /evaluate of the largest model (>= 70 % kept).

    PYTHONPATH=. .venv/bin/python bench/exhaustion.py [--seconds 10]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from serve import BOUNDARY, multipart, run_python_load, upload_image  # noqa: E402
from serving_helpers import ServerProcess, copy_committed  # noqa: E402
from soak import process_tree, rss_mb  # noqa: E402


class PeakRss:
    """Samples the resident memory of the server's processes every 5 ms: the largest growth of any one."""

    def __init__(self, root: int):
        self.pids = process_tree(root)
        self.base = {pid: rss_mb(pid) or 0 for pid in self.pids}
        self.peak = dict(self.base)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self):
        while not self.stop.is_set():
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], rss_mb(pid) or 0)
            time.sleep(0.005)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def growth(self) -> float:
        return max(self.peak[pid] - self.base[pid] for pid in self.pids)


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


def split_bomb(server, exports: Path) -> tuple[float, float, str]:
    """digits-cnn published again with an LZMA test split of zeros that decompresses to 2.4 GB."""
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
            zeros = bytes(64 << 20)
            for _ in range(36):
                member.write(zeros)
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
    folder = ROOT / "exports" / "digits-cnn"
    body = Path(tempfile.mkdtemp()) / "body.bin"
    body.write_bytes(multipart(upload_image(folder, json.loads((folder / "model.json").read_text())["input"])))
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
    parser.add_argument("--megabytes", type=int, default=100)
    args = parser.parse_args()
    exports = Path(tempfile.mkdtemp()) / "exports"
    copy_committed(exports, "digits-cnn", "digits-mlp", "svhn-synthetic-cnn")
    server = ServerProcess(exports, args=("--workers", "2", "--reload-interval", "0"))
    try:
        server.wait_ready()
        flood, answer = header_flood(server, args.megabytes)
        names = unknown_names(server, 2000, 60_000)
        names_short = unknown_names(server, 2000, 6_000)
        alone, beside, evaluations = evaluate_fairness(server, args.seconds, "svhn-synthetic-cnn")
        bomb, bomb_seconds, bomb_result = split_bomb(server, exports)
    finally:
        server.stop()
    print(f"## Exhaustion (`bench/exhaustion.py {' '.join(sys.argv[1:])}`), {platform.machine()}, "
          f"{os.cpu_count()} cores\n")
    print("| attack | measured | target |\n|---|---|---|")
    print(f"| {args.megabytes} MB of header lines to /health | peak +{flood:.1f} MB in one process; answer "
          f"`{answer.decode()}` | < 50 MB |")
    print(f"| 2,000 distinct 60 KB names on /models/NAME | 414 each; +{names:.1f} MB kept (all processes) | < 50 MB |")
    print(f"| 2,000 distinct 6 KB names on /models/NAME | 404 each; +{names_short:.1f} MB kept (all processes) | "
          "< 50 MB |")
    print(f"| test-split bomb published ({bomb_result}) | peak +{bomb:.1f} MB, refused in {bomb_seconds:.2f} s | "
          "rejected before decompressing |")
    print(f"| /predict while 4 clients loop on /evaluate of svhn-synthetic-cnn | {beside:.0f} req/s of {alone:.0f} "
          f"alone ({beside / alone:.0%}; {evaluations} evaluations answered) | >= 70 % |")


if __name__ == "__main__":
    main()
