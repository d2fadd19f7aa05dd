"""The model routes in-process (FastAPI's TestClient): health and readiness, /models and its reasons
for unavailable models, a model's detail and curves, /models/NAME/evaluate (embedded test splits and an
SVHN test file from --data-dir), files that must be regular, and a model that fails to load in one
process."""
import json
import shutil

import numpy as np
import scipy.io
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import copy_committed
from export_contract import svhn_mat
from tests.helpers import build_svhn_export, in_process, synthetic_svhn


def test_health_ready_and_v2_health(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and set(ready["models"]) == {"digits-cnn", "digits-mlp", "svhn-tiny"}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2").json()["name"] == "digitserve"


def test_models_list_metrics_and_unavailable_reason(client, exports):
    body = client.get("/models").json()
    models = {m["name"]: m for m in body["models"]}
    assert body["backend"] == "onnx"
    manifest = json.loads((exports / "digits-cnn" / "model.json").read_text())
    cnn = models["digits-cnn"]
    assert cnn["status"] == "ready" and cnn["default_for"] == "8x8" and cnn["task"] == "digits"
    assert cnn["test"]["errors"] == manifest["metrics"]["test"]["errors"] and cnn["test"]["n"] == 447
    assert cnn["best_epoch"] == manifest["metrics"]["best_epoch"] + 1  # counted from 1, as training says it
    assert cnn["input"]["dtype"] == "float32"
    assert models["svhn-tiny"]["default_for"] == "32x32"
    assert cnn["answers"] == ["8x8 grey images: the lowest validation NLL of the 2 models that take them",
                              "resize=true uploads without colour (photos, scans, drawings)"]
    assert models["digits-mlp"]["answers"] == []
    assert models["digits-broken"]["status"] == "unavailable"
    assert "sha256" in models["digits-broken"]["reason"]
    assert models["digits-garbage"]["status"] == "unavailable"
    assert "ONNX Runtime cannot load model.onnx" in models["digits-garbage"]["reason"]


def test_model_detail_and_curves(client):
    detail = client.get("/models/digits-mlp").json()
    assert len(detail["manifest"]["metrics"]["val_nll"]) == detail["epochs_run"]
    curves = client.get(detail["curves_url"])
    assert curves.status_code == 200 and curves.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get("/models/nope").status_code == 404
    broken = client.get("/models/digits-broken").json()  # unavailable: why, and its history, but no manifest
    assert broken["status"] == "unavailable" and "does not match the sha256" in broken["reason"]
    assert broken["history"][-1]["event"] == "rejected" and "manifest" not in broken
    assert client.get("/models/digits-broken/curves.png").status_code == 503


def test_evaluate_matches_manifest(client):
    body = client.post("/models/digits-cnn/evaluate").json()
    assert body["agrees"] is True and body["served"]["n"] == 447
    assert body["served"]["errors"] == body["manifest"]["errors"]
    svhn = client.post("/models/svhn-tiny/evaluate").json()  # its 200 test crops travel in the export
    assert svhn["agrees"] is True and svhn["served"]["n"] == 200


def test_evaluate_reads_an_svhn_test_file_from_the_data_dir(tmp_path):
    """The official SVHN test file is too large to carry in an export: /evaluate reads it from
    --data-dir, checked against the MD5 the manifest recorded, and says plainly what is missing."""
    x, y = synthetic_svhn(200, 2)  # the test crops build_svhn_export measures on, in the official layout
    data = tmp_path / "data"
    data.mkdir()
    scipy.io.savemat(data / "test_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": np.where(y == 0, 10, y)[:, None]})
    test_file = {"file": "test_32x32.mat", "md5": svhn_mat.md5(data / "test_32x32.mat"), "n": 200}
    build_svhn_export(tmp_path / "exports", "svhn-cnn", data={"name": "svhn", "description": "SVHN", "test_file": test_file})
    assert "test_set" not in json.loads((tmp_path / "exports" / "svhn-cnn" / "model.json").read_text())
    with in_process(tmp_path / "exports", data_dir=data) as c:
        body = c.post("/models/svhn-cnn/evaluate").json()
        assert body["agrees"] is True and body["served"]["n"] == 200
        assert c.get("/models").json()["models"][0]["data"]["test_file"] == test_file
    with in_process(tmp_path / "exports") as c:
        answer = c.post("/models/svhn-cnn/evaluate")
        assert answer.status_code == 422 and "start the server with --data-dir" in answer.json()["error"]
    other = tmp_path / "other"
    other.mkdir()
    with in_process(tmp_path / "exports", data_dir=other) as c:  # given a data folder, the model is verified
        detail = c.get("/models/svhn-cnn").json()
        assert detail["status"] == "unavailable" and "data folder has no test_32x32.mat" in detail["reason"]
        scipy.io.savemat(other / "test_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": np.ones((200, 1))})
        (change,) = c.post("/models/reload").json()["changes"]  # the data folder changed: checked again
        assert change["event"] == "rejected" and "is not the file model 'svhn-cnn' was tested on" in change["reason"]
        shutil.copy(data / "test_32x32.mat", other / "test_32x32.mat")
        (change,) = c.post("/models/reload").json()["changes"]
        assert change["event"] == "served" and c.get("/models/svhn-cnn").json()["verified"]["reproduced"] is True
        (other / "test_32x32.mat").write_bytes(b"replaced since")
        answer = c.post("/models/svhn-cnn/evaluate")
        assert answer.status_code == 422 and "is not the file model 'svhn-cnn' was tested on" in answer.json()["error"]
        assert str(tmp_path) not in answer.text  # the server's folders are not the client's business


def test_files_an_export_serves_must_be_regular_files_inside_it(tmp_path):
    exports = tmp_path / "exports"
    copy_committed(exports, "digits-cnn", "digits-mlp")
    outside = tmp_path / "elsewhere.png"
    shutil.copy(exports / "digits-cnn" / "curves.png", outside)  # the same bytes: the sha256 would match
    (exports / "digits-cnn" / "curves.png").unlink()
    (exports / "digits-cnn" / "curves.png").symlink_to(outside)
    with in_process(exports) as c:
        models = {m["name"]: m for m in c.get("/models").json()["models"]}
        assert models["digits-cnn"]["status"] == "unavailable"
        assert models["digits-cnn"]["reason"] == "curves.png is not a regular file"
        assert c.get("/models/digits-cnn/curves.png").status_code == 503
        assert c.get("/models/digits-mlp/curves.png").status_code == 200


def test_a_model_that_fails_to_load_in_a_process_is_503_and_its_task_falls_to_another(exports, monkeypatch):
    from serving import verify
    from serving.inference import LoadError

    def load_without_cnn(entry, backend, device, warm=True):
        if entry.name == "digits-cnn":  # in the HTTP process, after the start-up check passed
            raise LoadError("CUDA ran out of memory (simulated)")
        return real_load(entry, backend, device, warm)
    real_load = verify.load_runner
    monkeypatch.setattr(verify, "load_runner", load_without_cnn)
    with in_process(exports) as c:
        response = c.post("/predict", json={"model": "digits-cnn", "pixels": [np.zeros((8, 8)).tolist()]})
        assert response.status_code == 503 and "simulated" in response.json()["error"]
        answer = c.post("/predict", json={"pixels": [np.zeros((8, 8)).tolist()]})
        assert answer.status_code == 200 and answer.json()["predictions"][0]["model"] == "digits-mlp"
        info = {s.labels["model"]: s.labels["status"] for f in text_string_to_metric_families(c.get("/metrics").text)
                for s in f.samples if s.name == "digitserve_model_info" and s.value == 1}
        assert info["digits-cnn"] == "unavailable" and info["digits-mlp"] == "ready"
