"""What the benchmarks and the tests share, none of it needing torch: a real server in its own process
group on a loopback port (`ServerProcess`, `running_server`), image bytes as clients upload them, the
multipart body the load tools send, the load generators (bench/load.py and wrk) in their own
processes, and the resident memory of a process tree."""
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from serving.sockets import ESTABLISHED, socket_inodes, tcp_inodes

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the real server ---

class ServerProcess:
    """`python -m serving` on a free loopback port, its output in a log file."""

    def __init__(self, exports: Path, env: dict | None = None, args: tuple = (), cwd: Path = ROOT):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"digitserve-{self.port}.log", "w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving", "--exports", str(exports), "--port", str(self.port), *args],
            cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group, so no LitServe worker outlives the test

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        """SIGTERM, as an orchestrator sends it; the exit status. Anything left of the group is killed."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()
        return self.process.returncode


@contextmanager
def running_server(exports: Path, *args: str, env: dict | None = None, cwd: Path = ROOT, timeout: float = 90):
    """A ready ServerProcess (`args`: its flags), stopped on the way out whatever happens."""
    server = ServerProcess(exports, env=env, args=args, cwd=cwd)
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.stop()


def copy_committed(exports: Path, *names: str) -> None:
    """The committed models `names` (from the checkout's exports/) copied into `exports`."""
    exports.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(ROOT / "exports" / name, exports / name)


# --- images as clients upload them ---

def saved(image: Image.Image, fmt: str, **options) -> bytes:
    """An image file's bytes, as a client would upload them."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png(array: np.ndarray, mode: str | None = None, **save) -> bytes:
    return saved(Image.fromarray(array, mode), save.pop("format", "PNG"), **save)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk (length, type, data, CRC): for hand-made, malformed PNGs."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def upload_image(folder: Path, spec: dict) -> bytes:
    """A digit from the export's own test split, or a random RGB crop of the model's size."""
    from serving import images
    if spec["color"] == "grayscale":
        with np.load(folder / "test_set.npz", allow_pickle=False) as data:
            digit = data["x"][0, 0]
        return png(np.round(digit * 255 / spec["range"][1]).astype(np.uint8), "L")
    height, width = images.spec_size(spec)
    return png(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


# --- load ---

BOUNDARY = "BENCHBOUNDARY"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary={boundary}"
local f = io.open("{body}", "rb")
wrk.body = f:read("*all")
f:close()
"""


def multipart(data: bytes) -> bytes:
    """One file field `file` holding `data`, as MULTIPART's content type frames it."""
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def upload_body(folder: Path, directory: Path | None = None) -> Path:
    """A file holding one multipart upload of `folder`'s model's test image (what the load tools send)."""
    spec = json.loads((folder / "model.json").read_text())["input"]
    body = Path(directory or tempfile.mkdtemp()) / "body.bin"
    body.write_bytes(multipart(upload_image(folder, spec)))
    return body


def run_wrk(url: str, body: Path, connections: int, seconds: int) -> dict:
    """wrk (the Debian package) posting `body` for `seconds`: req/s, p50/p99 ms, non-2xx, socket errors."""
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


def run_python_load(url: str, body: Path, connections: int, seconds: float, processes: int | None = None,
                    backoff: bool = False) -> dict:
    """bench/load.py posting `body` for `seconds` in its own process(es): its JSON line, parsed."""
    command = [sys.executable, "-m", "bench.load", url, str(body), MULTIPART, "--connections", str(connections),
               "--seconds", str(seconds), *(["--processes", str(processes)] if processes else []),
               *(["--backoff"] if backoff else [])]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


# --- processes and their memory ---

def rss_mb(pid: int) -> float | None:
    """Resident memory of `pid` in MB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes `pids` have used so far (those gone count 0)."""
    total = 0
    for pid in pids:
        fields = stat_fields(pid)
        if fields:
            total += int(fields[11]) + int(fields[12])  # utime, stime (stat's fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command name (the parent's is [1]); [] once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it."""
    found, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and stat_fields(entry.name)[1:2] == [str(parent)]:
                found.append(int(entry.name))
                frontier.append(int(entry.name))
    return found


def connections_by_process(port: int) -> list[int]:
    """How many established TCP connections each process holding one has accepted on local `port`
    (largest first), from /proc: how a server's processes split their connections (uvicorn's
    processes share one listening socket, and one may take them all; digitserve's each listen on
    their own, and the kernel picks one for each connection)."""
    inodes = tcp_inodes(ESTABLISHED, port)
    held = [len(socket_inodes(int(entry.name)) & inodes) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return sorted((count for count in held if count), reverse=True)


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
