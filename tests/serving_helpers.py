"""The service in-process (route tests) or as a real server on a loopback port (process tests), and a
tiny SVHN-shaped export for 32x32 tests."""
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from serving import api
from serving.config import Config
from serving.metrics import RequestMetrics
from serving.service import Service

ROOT = Path(__file__).resolve().parents[1]

# The SVHN export contract: RGB uint8 crops as the service receives them.
SVHN_INPUT = {"name": "pixels", "shape": [None, 3, 32, 32], "dtype": "uint8", "range": [0, 255],
              "layout": "NCHW", "color": "RGB"}


def in_process(exports: Path, **settings) -> TestClient:
    """The digitserve app in this process, without LitServe (which forks processes): the same
    routes, service and metrics middleware. Use as a context manager (it runs the lifespan)."""
    service = Service(Config(exports=exports, **settings))
    app = FastAPI(docs_url=None, redoc_url=None)  # as in serving/server.py: /docs is digitserve's own
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    api.install(app, service)
    return TestClient(app, raise_server_exceptions=False)


def stub_model(name: str, spec: dict, val_nll: float = 0.1):
    """A served model for routing tests: a manifest's input spec and validation figure, no artifact."""
    from serving.inference import ServedModel
    from serving.registry import ModelEntry
    manifest = {"name": name, "version": "v1", "input": {"name": "pixels", "layout": "NCHW", **spec},
                "metrics": {"best_epoch": 0, "val_nll": [val_nll]}}
    return ServedModel(ModelEntry(name, Path(name), manifest), runner=None, verified={}, curves=b"", test_split=None)


def stub_catalog(*models):
    from serving.routing import Catalog
    return Catalog.of({m.name: m for m in models}, {})


DIGITS_SPEC = {"shape": [None, 1, 8, 8], "dtype": "float32", "range": [0, 16], "color": "grayscale"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
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


def synthetic_svhn(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """32x32 RGB crops whose class is the position of a bright 6x6 patch on a noisy background."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    x = rng.integers(0, 90, (n, 3, 32, 32)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        x[i, :, 4 + row * 14:10 + row * 14, 1 + col * 6:7 + col * 6] = 230
    return x, labels.astype(np.int64)


def tiny_svhn_model() -> nn.Module:
    from training.models import Scale
    return nn.Sequential(Scale([128.0] * 3, [64.0] * 3), nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10), nn.LogSoftmax(1))


def build_svhn_export(exports: Path, name: str = "svhn-tiny", data: dict | None = None) -> Path:
    """A small SVHN-shaped export; `data`: its manifest's data record (none: its test split is embedded)."""
    from training.export import export_model
    from training.loop import Recipe, fit
    torch.manual_seed(0)
    train_x, train_y = map(torch.from_numpy, synthetic_svhn(600, 0))
    val_x, val_y = map(torch.from_numpy, synthetic_svhn(200, 1))
    test_x, test_y = map(torch.from_numpy, synthetic_svhn(200, 2))
    model = tiny_svhn_model()
    history = fit(model, train_x, train_y, val_x, val_y, Recipe(optimizer="adamw", lr=3e-3, batch_size=64),
                  max_epochs=6, patience=6, progress=False)
    run = {"task": "svhn", "arch": "tiny", "summary": "test-only SVHN-shaped CNN on synthetic crops", "seed": 0,
           "config": {}, "environment": {}, "wall_seconds": history.train_seconds, "best_epoch": history.best_epoch,
           "epochs_run": history.epochs_run, "val_nll": history.val_nll, "val_error": history.val_error,
           **({"data": data} if data else {})}
    return export_model(model, run, Path("synthetic-run"), SVHN_INPUT, test_x, test_y, name, exports)


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


def copy_committed(exports: Path, *names: str) -> None:
    exports.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(ROOT / "exports" / name, exports / name)


def tampered(source: Path, staging: Path, change) -> Path:
    """A copy of an export with `change(folder)` applied, ready to publish."""
    folder = staging / source.name
    shutil.copytree(source, folder)
    change(folder)
    return folder


def flip_last_byte(folder: Path) -> None:
    """The ONNX artifact no longer matches the sha256 in the manifest."""
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))


def claim_fewer_errors(folder: Path) -> None:
    """Every hash matches, but the manifest claims test figures its artifact does not reproduce."""
    manifest = json.loads((folder / "model.json").read_text())
    test = manifest["metrics"]["test"]
    test["errors"] -= 1
    test["error"] = test["errors"] / test["n"]
    (folder / "model.json").write_text(json.dumps(manifest))
