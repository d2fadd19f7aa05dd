"""Model folders written by someone the server must not trust (a shared volume, a mistaken copy):
whatever a folder holds costs that folder, never the server's memory, its start-up or its other
models. The reproducers an adversary found (issue 21), each as it was, with our own code. Mostly
in-process (registry scans and the app through FastAPI's TestClient); start-up beside hostile folders
with a real server on loopback."""
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from bench.harness import copy_committed, running_server
import export_contract as contract
from export_contract import reader
from serving import registry
from tests.helpers import DIGITS_SPEC, in_process, tampered
from training.export import export_model

ZERO = {"pixels": [np.zeros((8, 8)).tolist()]}


@pytest.fixture
def exports(tmp_path):
    copy_committed(tmp_path / "exports", "digits-cnn")
    return tmp_path / "exports"


def rewrite_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "model.json").read_text())
    change(manifest)
    (folder / "model.json").write_text(json.dumps(manifest))


def replace_test_set(folder: Path, data: bytes) -> None:
    """test_set.npz replaced, its sha256 in the manifest too: only the split's own checks can refuse it."""
    (folder / "test_set.npz").write_bytes(data)
    rewrite_manifest(folder, lambda m: m["test_set"].update(sha256=contract.sha256_bytes(data)))


def npz(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_header(shape: tuple, dtype=np.float32) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                  "shape": shape})
    return buffer.getvalue()


def unavailable(client, name: str) -> str:
    (entry,) = [m for m in client.get("/models").json()["models"] if m["name"] == name]
    assert entry["status"] == "unavailable", entry
    return entry["reason"]


def labels_of(folder: Path) -> np.ndarray:
    with np.load(folder / "test_set.npz") as data:
        return data["y"]


@pytest.mark.parametrize("split, reason", [
    # LZMA of zeros: 0.23 MB that grew every process by 2.4 GB on each reload
    (lambda y: npz({"x.npy": npy_header((447, 1, 8, 8)) + bytes(447 * 256), "y.npy": npy(y)}, zipfile.ZIP_LZMA),
     "must be stored or DEFLATE"),
    # 894,000 images declared in a small file: 229 MB once decompressed, minutes of verification
    (lambda y: npz({"x.npy": npy_header((894_000, 1, 8, 8)) + bytes(64 << 20), "y.npy": npy(y)}), "declares"),
    (lambda y: npz({"x.npy": npy(np.zeros((447, 1, 8, 8), np.int32)), "y.npy": npy(y)}), "not the model's"),
    (lambda y: npz({"x.npy": npy(np.zeros((447, 1, 8, 8), np.float32)), "y.npy": npy(y), "z.npy": b""}),
     "exactly x.npy and y.npy"),
    (lambda y: b"PK\x03\x04 not a zip", "not a readable .npz"),
])
def test_a_test_split_is_refused_from_its_headers_before_anything_is_decompressed(exports, tmp_path, split, reason):
    folder = tampered(exports / "digits-cnn", tmp_path, lambda f: None)
    replace_test_set(folder, split(labels_of(folder)))
    (exports / "digits-cnn").rename(exports / ".old")
    folder.rename(exports / "digits-cnn")
    copy_committed(exports, "digits-mlp")
    with in_process(exports, reload_interval=0) as c:
        assert reason in unavailable(c, "digits-cnn")
        assert c.post("/predict", json=ZERO).json()["predictions"][0]["model"] == "digits-mlp"


def test_a_split_that_is_not_the_digits_test_split_it_claims_is_refused(exports):
    """Verification proves the artifact reproduces its figures on the split it carries: a kinder split
    (here the 400 easiest-looking) would pass, unless the contract knows which split the data record names."""
    folder = exports / "digits-cnn"
    with np.load(folder / "test_set.npz") as data:
        x, y = data["x"][:400], data["y"][:400]
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=x, y=y)
    replace_test_set(folder, buffer.getvalue())

    def claim_400(m):
        m["test_set"]["n"] = m["metrics"]["test"]["n"] = 400
        m["metrics"]["test"]["error"] = m["metrics"]["test"]["errors"] / 400
    rewrite_manifest(folder, claim_400)
    copy_committed(exports, "digits-mlp")
    with in_process(exports, reload_interval=0) as c:
        assert "is not the sklearn-digits test split" in unavailable(c, "digits-cnn")


def test_figures_that_disagree_with_each_other_are_refused(exports):
    rewrite_manifest(exports / "digits-cnn", lambda m: m["metrics"]["test"].update(error=0.0))  # 4/447 shown as 0.00 %
    (entry,) = registry.scan(exports, "onnx")
    assert "error 0.0 is not errors / n = 4/447" in entry.error


def fifo(folder: Path) -> None:
    (folder / "model.json").unlink()
    os.mkfifo(folder / "model.json")


def dev_zero(folder: Path) -> None:
    (folder / "model.json").unlink()
    (folder / "model.json").symlink_to("/dev/zero")


def deep_json(folder: Path) -> None:
    (folder / "model.json").write_text("[" * 100_000 + "]" * 100_000)


def huge_artifact(folder: Path) -> None:
    with open(folder / "model.onnx", "wb") as f:
        f.truncate(reader.MAX_BYTES["artifact"] + 1)  # sparse: no disk used


def artifact_is_a_folder(folder: Path) -> None:
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").mkdir()


HOSTILE_FOLDERS = {"fifo": (fifo, "model.json is not a regular file"),
                   "zero": (dev_zero, "model.json is not a regular file"),
                   "deep": (deep_json, "nested too deeply"),
                   "huge": (huge_artifact, "at most 268435456 are read"),
                   "dir": (artifact_is_a_folder, "model.onnx is not a regular file")}


def hostile_copies(exports: Path) -> None:
    for name, (change, _) in HOSTILE_FOLDERS.items():
        folder = exports / f"hostile-{name}"
        copy_committed(folder.parent / ".staging", "digits-cnn")
        (folder.parent / ".staging" / "digits-cnn").rename(folder)
        rewrite_manifest(folder, lambda m, n=folder.name: m.update(name=n))
        change(folder)


def test_folders_that_would_hang_or_exhaust_the_server_are_unavailable_and_the_rest_served(exports):
    hostile_copies(exports)
    with in_process(exports, reload_interval=0) as c:
        for name, (_, reason) in HOSTILE_FOLDERS.items():
            assert reason in unavailable(c, f"hostile-{name}"), name
        assert c.post("/predict", json=ZERO).status_code == 200


def test_a_server_starts_in_its_usual_time_beside_them(exports):
    """A FIFO once blocked start-up forever: the server never listened."""
    hostile_copies(exports)
    with running_server(exports, "--workers", "1", timeout=60) as server:
        models = {m["name"]: m["status"] for m in httpx_get(server.url + "/models")["models"]}
        assert models == {"digits-cnn": "ready", **{f"hostile-{n}": "unavailable" for n in HOSTILE_FOLDERS}}


def httpx_get(url: str) -> dict:
    import httpx
    return httpx.get(url, timeout=10).json()


def test_a_file_the_server_may_not_read_costs_its_folder_and_names_no_server_path(exports, monkeypatch):
    """As root the tests cannot lose a read permission: the open fails as it would for another user."""
    real_open = os.open

    def forbidden(path, *args, **kwargs):
        if str(path).endswith("model.onnx"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(reader.os, "open", forbidden)
    (entry,) = registry.scan(exports, "onnx")
    assert entry.error == "cannot read model.onnx: Permission denied"


def test_a_bug_while_reading_one_folder_costs_that_folder(exports, monkeypatch):
    def broken(manifest):
        raise ValueError("a bug")
    monkeypatch.setattr(contract, "manifest_errors", broken)
    (entry,) = registry.scan(exports, "onnx")
    assert "failed unexpectedly (ValueError" in entry.error


@pytest.mark.parametrize("raw", [b"bad\xffname", b"digits-cnn\nERROR forged log line"])
def test_folder_names_that_are_not_model_names_are_escaped_everywhere(exports, raw, caplog):
    """A non-UTF-8 name made /models and /metrics answer 500, for good; a newline forged log lines."""
    os.mkdir(os.fsencode(exports) + b"/" + raw)
    with in_process(exports, reload_interval=0) as c:
        shown = ascii(os.fsdecode(raw))[1:-1]
        assert "not a model name" in unavailable(c, shown)
        assert shown in metric_models(c)
        os.rmdir(os.fsencode(exports) + b"/" + raw)
        c.post("/models/reload")
        assert metric_models(c) >= {"digits-cnn"} and c.get("/models").status_code == 200
    assert not any(line.startswith("ERROR forged") for r in caplog.records for line in r.getMessage().splitlines())


def metric_models(client) -> set[str]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {s.labels["model"] for f in text_string_to_metric_families(response.text) for s in f.samples
            if "model" in s.labels}


def test_unknown_model_names_keep_nothing(exports):
    """Each distinct name asked for once created a history entry: 2,000 names of 60 KB kept 120 MB."""
    with in_process(exports, reload_interval=0) as c:
        service = c.app.state.service
        for i in range(200):
            assert c.get(f"/models/{'x' * 1000}{i}").status_code == 404
        assert set(service.lifecycle.history) == {"digits-cnn"}
        assert len(c.get(f"/models/{'y' * 5000}").json()["error"]) < 300  # the name is not echoed whole


def export_tiny(exports: Path, name: str, spec: dict, val_nll: float, seed: int = 0) -> Path:
    """A verified model of any input spec (untrained: its figures are whatever it measures)."""
    from training.export import Splits
    from training.models import Scale
    torch.manual_seed(seed)
    channels, height, width = spec["shape"][1:]
    model = nn.Sequential(Scale([0.0] * channels, [1.0] * channels), nn.Flatten(),  # Scale: uint8 in, floats on
                          nn.Linear(channels * height * width, 10), nn.LogSoftmax(1))
    dtype = torch.uint8 if spec["dtype"] == "uint8" else torch.float32
    x = torch.randint(0, int(spec["range"][1]) + 1, (50, channels, height, width)).to(dtype)
    y = torch.randint(0, 10, (50,))
    run = {"task": "digits", "arch": "tiny", "summary": "test", "seed": 0, "config": {}, "environment": {},
           "wall_seconds": 0.0, "best_epoch": 0, "epochs_run": 1, "val_nll": [val_nll], "val_error": [0.5]}
    return export_model(model, run, Path("run"), {"name": "pixels", "layout": "NCHW", **spec}, Splits((x, y), (x, y), (x, y)),
                        name, exports)


def test_a_model_of_another_input_takes_over_nothing_but_its_own_inputs(exports):
    """Published under the digits task, a 16x16 model made every 8x8 upload 422 and a uint8 8x8 one made
    JSON pixels answer 500."""
    export_tiny(exports, "digits-16", {**DIGITS_SPEC, "shape": [None, 1, 16, 16]}, val_nll=0.0001)
    export_tiny(exports, "digits-uint8", {**DIGITS_SPEC, "dtype": "uint8", "range": [0, 255]}, val_nll=0.5)
    with in_process(exports, reload_interval=0) as c:
        answer = c.post("/predict", json=ZERO).json()["predictions"][0]
        assert answer["model"] == "digits-cnn" and "default model for 8x8 grey" in answer["routed"]
        answer = c.post("/predict", json={"pixels": [np.zeros((16, 16)).tolist()]}).json()["predictions"][0]
        assert answer["model"] == "digits-16"
        named = c.post("/predict", json={**ZERO, "model": "digits-uint8"})
        assert named.status_code == 200 and named.json()["predictions"][0]["model"] == "digits-uint8"
        fractional = c.post("/predict", json={"pixels": [np.full((8, 8), 0.5).tolist()], "model": "digits-uint8"})
        assert fractional.status_code == 422 and "integers" in fractional.json()["error"]
        models = {m["name"]: m for m in c.get("/models").json()["models"]}
        assert models["digits-cnn"]["default_for"] == "8x8" and models["digits-uint8"]["default_for"] is None


def test_the_trailing_slash_redirect_does_not_reflect_the_host_header(exports):
    with in_process(exports, reload_interval=0) as c:
        response = c.get("/models/", headers={"Host": "evil.example"}, follow_redirects=False)
        assert response.status_code == 404 and "location" not in response.headers
