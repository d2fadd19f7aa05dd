"""Helpers only the tests use (those the benchmarks share are in bench/harness.py): the service
in-process for route tests, stub models for routing, the real server's processes by role, tampered
exports, and a tiny SVHN-shaped export for 32x32 tests (the one helper that trains: torch)."""
import json
import shutil
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import png, stat_fields
from serving import api
from serving.config import Config
from serving.service import Service
from serving.sockets import LISTEN, socket_inodes, tcp_inodes

# The SVHN export contract: RGB uint8 crops as the service receives them.
SVHN_INPUT = {"name": "pixels", "shape": [None, 3, 32, 32], "dtype": "uint8", "range": [0, 255],
              "layout": "NCHW", "color": "RGB"}
DIGITS_SPEC = {"shape": [None, 1, 8, 8], "dtype": "float32", "range": [0, 16], "color": "grayscale"}


# --- the service in this process ---

def in_process(exports: Path, **settings) -> TestClient:
    """The digitserve app in this process, without LitServe (which forks processes): the same
    routes, service and middleware. Use as a context manager (it runs the lifespan)."""
    service = Service(Config(exports=exports, **settings))
    app = FastAPI(docs_url=None, redoc_url=None)  # as in serving/server.py: /docs is digitserve's own
    for middleware, options in api.middlewares(service):
        app.add_middleware(middleware, **options)
    api.install(app, service)
    return TestClient(app, raise_server_exceptions=False)


def metric(client, name: str, **labels) -> float:
    """The value of the first sample of /metrics named `name` with these labels (0 if none)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def digit_png(image: np.ndarray) -> bytes:
    """An 8x8 digit of the dataset (counts 0..16) as an 8-bit grey PNG."""
    return png(np.round(image * 255 / 16).astype(np.uint8), "L")


def offline(exports: Path, name: str, x: np.ndarray, calibrated: bool = True) -> np.ndarray:
    """Probabilities of the export's ONNX artifact run directly by ONNX Runtime, calibrated with its
    manifest's temperature as the service answers them (or the model's own): the reference."""
    import onnxruntime

    from export_contract import calibration
    manifest = json.loads((exports / name / "model.json").read_text())
    temperature = manifest.get("calibration", calibration.UNCALIBRATED)["temperature"] if calibrated else 1.0
    session = onnxruntime.InferenceSession(str(exports / name / "model.onnx"), providers=["CPUExecutionProvider"])
    return calibration.probabilities(session.run(None, {"pixels": x})[0], temperature)


# --- routing without artifacts ---

def stub_model(name: str, spec: dict, val_nll: float = 0.1):
    """A served model for routing tests: a manifest's input spec and validation figure, no artifact."""
    from serving.inference import ServedModel
    from serving.registry import ModelEntry
    manifest = {"name": name, "version": "v1", "input": {"name": "pixels", "layout": "NCHW", **spec},
                "metrics": {"best_epoch": 0, "val_nll": [val_nll]}}
    return ServedModel(ModelEntry(name, Path(name), manifest), runner=None, verified={}, files={}, test_split=None)


def stub_catalog(*models):
    from serving.routing import Catalog
    return Catalog.of({m.name: m for m in models}, {})


# --- the real server's processes ---

def children(pid: int) -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and stat_fields(entry.name)[1:2] == [str(pid)]]


def server_processes(main: int, http_processes: int) -> dict[str, list[int]]:
    """The server's children by role: LitServe's spawned worker, the HTTP processes (forked, each
    listening on the port), its queue manager (forked, listening on nothing); the resource tracker
    aside. Waits up to 10 s for `http_processes` to listen: each listens once its own models are
    loaded, and /ready answers as soon as one does."""
    deadline = time.monotonic() + 10
    while True:
        listening = tcp_inodes(LISTEN)
        roles = {"worker": [], "http": [], "manager": [], "main": [main]}
        for pid in children(main):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                roles["worker"].append(pid)
            elif b"resource_tracker" not in cmdline:
                roles["http" if socket_inodes(pid) & listening else "manager"].append(pid)
        if len(roles["http"]) >= http_processes or time.monotonic() > deadline:
            return roles
        time.sleep(0.05)


# --- exports changed after they were made ---

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


def claim_other_calibration(folder: Path) -> None:
    """Every hash matches, but the calibration record claims a temperature its figures were not measured at."""
    manifest = json.loads((folder / "model.json").read_text())
    manifest["calibration"]["temperature"] *= 1.5
    (folder / "model.json").write_text(json.dumps(manifest))


# --- a tiny SVHN-shaped export (trains: imports torch) ---

def synthetic_svhn(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """32x32 RGB crops whose class is the position of a bright 6x6 patch on a noisy background."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    x = rng.integers(0, 90, (n, 3, 32, 32)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        x[i, :, 4 + row * 14:10 + row * 14, 1 + col * 6:7 + col * 6] = 230
    return x, labels.astype(np.int64)


def tiny_svhn_model():
    from torch import nn

    from training.models import Scale
    return nn.Sequential(Scale([128.0] * 3, [64.0] * 3), nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10), nn.LogSoftmax(1))


def build_svhn_export(exports: Path, name: str = "svhn-tiny", data: dict | None = None) -> Path:
    """A small SVHN-shaped export; `data`: its manifest's data record (none: its test split is embedded)."""
    import torch

    from training.export import Splits, export_model
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
    data = Splits((train_x, train_y), (val_x, val_y), (test_x, test_y))
    return export_model(model, run, Path("synthetic-run"), SVHN_INPUT, data, name, exports)
