"""The prediction log and POST /feedback (serving/prediction_log.py, serving/feedback_store.py): what a
logged line holds and never holds, the true label told once per prediction, live accuracy counted
exactly in /metrics and /models/NAME, bad feedback refused naming the field, and a slow, stuck or full
log disk costing no request. In-process (FastAPI's TestClient) with the real writer thread."""
import base64
import hashlib
import json
import subprocess
import threading
import time

import numpy as np
import pytest

from bench.harness import copy_committed
from serving import prediction_log
from serving.metrics import Metrics
from tests.helpers import digit_png, in_process, metric


@pytest.fixture(scope="module")
def digits_only(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports")
    copy_committed(folder, "digits-cnn")
    return folder


@pytest.fixture(scope="module")
def logged(digits_only, tmp_path_factory):
    folder = tmp_path_factory.mktemp("log")
    with in_process(digits_only, prediction_log=folder, log_inputs="upload", api_key="sesame") as client:
        client.headers["X-API-Key"] = "sesame"
        yield client, folder


def lines(folder, kind: str, at_least: int = 1, having: str | None = None) -> list[dict]:
    """The log's lines of one type, once the writer has written `at_least` of them and the one with the
    ID `having` (it writes a batch every few tenths of a second), or 5 s have passed."""
    deadline = time.monotonic() + 5
    while True:
        found = [line for path in sorted(folder.glob("predictions-*.jsonl*"))
                 for line in map(json.loads, path.read_text().splitlines()) if line["type"] == kind]
        done = len(found) >= at_least and (having is None or any(line["id"] == having for line in found))
        if done or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def predict(client, image, request_id: str) -> dict:
    response = client.post("/predict", files={"file": ("d.png", digit_png(image))}, headers={"X-Request-ID": request_id})
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]


def test_a_logged_prediction_holds_its_answer_and_input_and_no_header(logged, test_digits):
    client, folder = logged
    answer = predict(client, test_digits[0][5], "log-line-1")
    (line,) = [line for line in lines(folder, "prediction", having="log-line-1") if line["id"] == "log-line-1"]
    upload = digit_png(test_digits[0][5])
    assert {k: line[k] for k in ("model", "version", "label", "confidence", "decision", "request_id")} == {
        "model": answer["model"], "version": answer["version"], "label": answer["label"],
        "confidence": answer["confidence"], "decision": answer["decision"], "request_id": "log-line-1"}
    assert line["input_sha256"] == hashlib.sha256(upload).hexdigest() and line["input_shape"] == [1, 8, 8]
    assert base64.b64decode(line["upload"]) == upload and np.asarray(line["model_input"]).shape == (1, 8, 8)
    assert line["latency_ms"] > 0 and abs(line["at"] - time.time()) < 60
    text = "".join(path.read_text() for path in folder.glob("predictions-*"))
    assert "sesame" not in text and "x-api-key" not in text.lower()


def test_the_true_label_is_told_once_and_counted_exactly(logged, test_digits):
    client, folder = logged
    images, labels = test_digits
    told = []
    for i in range(20):
        answer = predict(client, images[i], f"told-{i}")
        truth = int(labels[i]) if i % 4 else (answer["label"] + 1) % 10  # every fourth told otherwise
        response = client.post("/feedback", json={"id": answer["id"], "label": truth})
        assert response.status_code == 200, response.text
        assert response.json() == {"id": answer["id"], "model": "digits-cnn", "version": answer["version"],
                                   "label": answer["label"], "truth": truth, "right": answer["label"] == truth}
        told.append(answer["label"] == truth)
    again = client.post("/feedback", json={"id": "told-3", "label": 1})
    assert again.status_code == 409 and "already" in again.json()["error"]
    version = answer["version"]
    assert metric(client, "digitserve_live_told", model="digits-cnn", version=version) == 20
    assert metric(client, "digitserve_live_accuracy", model="digits-cnn", version=version) == sum(told) / 20
    assert metric(client, "digitserve_feedback_total", model="digits-cnn", version=version, right="true") == sum(told)
    live = client.get("/models/digits-cnn").json()["live"]
    assert live["versions"][version] == {"told": 20, "right": sum(told), "accuracy": sum(told) / 20}
    feedback = {line["id"]: line for line in lines(folder, "feedback", at_least=20)}
    assert feedback["told-0"]["truth"] != feedback["told-0"]["label"] and len(feedback) >= 20


@pytest.mark.parametrize("body, status, message", [
    ({"id": "nobody-said-this", "label": 3}, 404, "no logged prediction 'nobody-said-this'"),
    ({"id": "x", "label": 10}, 422, "at label"),
    ({"id": "x", "label": -1}, 422, "at label"),
    ({"id": "x", "label": "3"}, 422, "valid integer at label"),
    ({"id": "x", "label": True}, 422, "at label"),
    ({"id": "x", "label": 2.5}, 422, "at label"),
    ({"label": 3}, 422, "Field required at id"),
    ({"id": 7, "label": 3}, 422, "at id"),
    ({"id": "", "label": 3}, 422, "at id"),
    ({"id": "x" * 141, "label": 3}, 422, "at id"),
    ({"id": "x", "label": 3, "user": "me"}, 422, "at user"),
    ([1, 2], 422, "the body"),
])
def test_bad_feedback_is_refused_naming_the_field(logged, body, status, message):
    response = logged[0].post("/feedback", json=body)
    assert response.status_code == status and message in response.json()["error"], response.text


def test_feedback_needs_the_key_a_small_body_and_the_log(logged, exports):
    client, _ = logged
    assert client.post("/feedback", json={"id": "x", "label": 1}, headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.post("/feedback", content=b"{" + b" " * 2000 + b"}").status_code == 413
    assert client.post("/feedback", content=b"not json").status_code == 422
    with in_process(exports) as unlogged:
        response = unlogged.post("/feedback", json={"id": "x", "label": 1})
        assert response.status_code == 404 and "--prediction-log" in response.json()["error"]
        assert "--prediction-log" in unlogged.get("/models/digits-cnn").json()["live"]["note"]


def test_a_stuck_disk_drops_lines_and_answers_every_request(digits_only, tmp_path, test_digits, monkeypatch):
    stuck = threading.Event()
    monkeypatch.setattr(prediction_log, "QUEUE_LINES", 5)
    monkeypatch.setattr(prediction_log.LogFile, "emit", lambda self, record: stuck.wait(30))
    with in_process(digits_only, prediction_log=tmp_path) as client:
        started = time.perf_counter()
        for i in range(30):
            predict(client, test_digits[0][i], f"stuck-{i}")
        assert time.perf_counter() - started < 10  # no request waited for the disk
        assert metric(client, "digitserve_prediction_log_dropped_total", reason="queue_full") >= 20
        stuck.set()


def test_a_full_disk_drops_lines_and_answers_every_request(digits_only, small_tmpfs, test_digits):
    log_folder = small_tmpfs / "log"
    with in_process(digits_only, prediction_log=log_folder) as client:
        subprocess.run(["dd", "if=/dev/zero", f"of={small_tmpfs / 'filler'}", "bs=1M"], capture_output=True)
        for i in range(40):
            predict(client, test_digits[0][i], f"full-{i}")
        deadline = time.monotonic() + 5
        while metric(client, "digitserve_prediction_log_dropped_total", reason="write_failed") == 0:
            assert time.monotonic() < deadline, "no write failure counted on a full disk"
            time.sleep(0.1)
        (small_tmpfs / "filler").unlink()  # room again: the next lines are written
        predict(client, test_digits[0][0], "after-room")
        assert any(line["id"] == "after-room" for line in lines(log_folder, "prediction", having="after-room"))


def test_the_log_is_rotated_by_size_keeping_the_files_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(prediction_log, "FLUSH_SECONDS", 0.01)
    log = prediction_log.PredictionLog(tmp_path, 1.0, "none", max_bytes=3000, backups=2, days=7,
                                       metrics=Metrics(models=[]))
    log.start()
    for batch in range(12):  # a batch of lines is written at once: wait for each
        for i in range(10):
            log.put({"type": "feedback", "at": 0.0, "id": f"r{batch}-{i}", "model": "m", "version": "v", "label": 1,
                     "truth": 1})
        while log.lines:
            time.sleep(0.01)
        time.sleep(0.05)
    log.stop()
    files = sorted(tmp_path.glob("predictions-*"))
    assert [path.suffix for path in files] == [".jsonl", ".1", ".2"]  # the live file and two rotated ones
    assert all(path.stat().st_size <= 3000 for path in files)
    kept = [json.loads(text)["id"] for path in reversed(files) for text in path.read_text().splitlines()]
    assert kept[-1] == "r11-9" and kept == sorted(kept, key=lambda name: tuple(map(int, name[1:].split("-"))))


def test_a_store_that_cannot_open_costs_the_index_not_the_log(tmp_path):
    (tmp_path / "feedback.sqlite3").mkdir()  # in the way of the store's file
    metrics = Metrics(models=[])
    log = prediction_log.PredictionLog(tmp_path, 1.0, "none", 1 << 20, 2, 7.0, metrics)
    log.start()
    for i in range(3):
        log.put({"type": "prediction", "at": 0.0, "id": f"p{i}", "model": "m", "version": "v", "label": 1})
        while log.lines:
            time.sleep(0.01)
        time.sleep(0.05)
    log.stop()
    assert log.thread is not None and not log.thread.is_alive()  # ended by stop(), not by the failure
    assert [line["id"] for line in lines(tmp_path, "prediction")] == ["p0", "p1", "p2"]
    assert metrics.registry.get_sample_value("digitserve_prediction_log_dropped_total", {"reason": "index_failed"}) == 3


def test_feedback_right_after_its_prediction_waits_for_it_to_reach_the_store(digits_only, tmp_path, test_digits,
                                                                              monkeypatch):
    slow = threading.Event()
    emit = prediction_log.LogFile.emit
    monkeypatch.setattr(prediction_log.LogFile, "emit", lambda self, record: (slow.wait(5), emit(self, record)))
    with in_process(digits_only, prediction_log=tmp_path) as client:
        answer = predict(client, test_digits[0][1], "just-now")
        threading.Timer(0.5, slow.set).start()  # the disk is slow: the line is indexed half a second later
        response = client.post("/feedback", json={"id": "just-now", "label": int(test_digits[1][1])})
        assert response.status_code == 200, response.text
        assert response.json()["label"] == answer["label"]
