"""Model lifecycle in one process (serving/lifecycle.py), in-process: a new version is served only once
verified, a failing one is rejected while the previous keeps answering, a request is answered by one
version, removed models leave. With a real server under load: tests/serving/test_server_reload.py."""
import asyncio
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import copy_committed
from export_contract.publish import publish
from serving import inference, lifecycle, verify
from tests.helpers import (build_svhn_export, claim_fewer_errors, claim_other_calibration, flip_last_byte, in_process,
                           tampered)

ZERO = {"pixels": [np.zeros((8, 8)).tolist()]}


@pytest.fixture
def exports(tmp_path):
    copy_committed(tmp_path / "exports", "digits-cnn", "digits-mlp")
    return tmp_path / "exports"


def version_of(folder) -> str:
    return json.loads((folder / "model.json").read_text())["version"]


def answer(client, model="digits-mlp"):
    response = client.post("/predict", json={**ZERO, "model": model})
    return response.status_code, response.json()


def reload(client) -> list[dict]:
    response = client.post("/models/reload")
    assert response.status_code == 200, response.text
    return response.json()["changes"]


def test_a_published_version_is_served_once_it_reproduces_its_test_figures(exports, retrained):
    old = version_of(exports / "digits-mlp")
    with in_process(exports, reload_interval=0) as c:
        assert answer(c)[1]["predictions"][0]["version"] == old
        assert reload(c) == []  # nothing changed
        publish(retrained, exports, replace=True)
        (change,) = reload(c)
        assert change["model"] == "digits-mlp" and change["event"] == "served"
        assert change["version"] == version_of(retrained) != old
        assert answer(c)[1]["predictions"][0]["version"] == change["version"]
        detail = c.get("/models/digits-mlp").json()
        assert detail["version"] == change["version"] and detail["verified"]["reproduced"] is True
        assert [(e["event"], e["version"]) for e in detail["history"]] == [("served", old), ("served", change["version"])]


@pytest.mark.parametrize("change, reason", [
    (flip_last_byte, "model.onnx does not match the sha256 in its manifest"),
    (claim_fewer_errors, "its manifest claims"),
    (claim_other_calibration, "its calibration figures are not the artifact's"),
])
def test_a_version_that_fails_its_checks_is_rejected_and_the_previous_keeps_answering(exports, tmp_path, retrained,
                                                                                       change, reason):
    old = version_of(exports / "digits-mlp")
    with in_process(exports, reload_interval=0) as c:
        publish(tampered(retrained, tmp_path, change), exports, replace=True)
        (event,) = reload(c)
        assert event["event"] == "rejected" and reason in event["reason"]
        status, body = answer(c)
        assert status == 200 and body["predictions"][0]["version"] == old
        detail = c.get("/models/digits-mlp").json()
        assert detail["status"] == "ready" and detail["version"] == old
        assert detail["history"][-1]["event"] == "rejected" and reason in detail["history"][-1]["reason"]
        (listed,) = [m for m in c.get("/models").json()["models"] if m["name"] == "digits-mlp"]
        assert reason in listed["rejected"]["reason"]  # the page says it beside "ready"
        samples = [s for f in text_string_to_metric_families(c.get("/metrics").text) for s in f.samples]
        reloads = {s.labels["event"]: s.value for s in samples
                   if s.name == "digitserve_model_reloads_total" and s.labels["model"] == "digits-mlp"}
        assert reloads == {"served": 1, "rejected": 1}
        (rejected,) = [s.labels for s in samples if s.name == "digitserve_model_rejected" and s.value == 1]
        assert rejected == {"model": "digits-mlp", "version": version_of(retrained),
                            "step": {flip_last_byte: "export", claim_fewer_errors: "metrics"}.get(change, "calibration")}
        publish(retrained, exports, replace=True)  # a good version after a rejected one
        assert [e["event"] for e in reload(c)] == ["served"]
        assert answer(c)[1]["predictions"][0]["version"] == version_of(retrained)


def test_a_new_model_that_fails_is_unavailable_with_its_reason(exports, tmp_path, retrained):
    with in_process(exports, reload_interval=0) as c:
        folder = tampered(retrained, tmp_path, claim_fewer_errors)
        manifest = json.loads((folder / "model.json").read_text())
        manifest["name"] = "digits-extra"
        (folder / "model.json").write_text(json.dumps(manifest))
        publish(folder.rename(folder.with_name("digits-extra")), exports, replace=True)
        (event,) = reload(c)
        assert event["model"] == "digits-extra" and event["event"] == "rejected"
        status, body = answer(c, "digits-extra")
        assert status == 503 and "its manifest claims" in body["error"]


@contextmanager
def slow_backend(monkeypatch):
    """Inside: every backend call takes 0.5 s; yields an Event set once one has started."""
    predict, started = inference.predict, threading.Event()

    def slow_predict(requests):
        started.set()
        time.sleep(0.5)
        return predict(requests)
    monkeypatch.setattr(inference, "predict", slow_predict)
    try:
        yield started
    finally:
        monkeypatch.setattr(inference, "predict", predict)


def test_a_removed_model_is_404_after_the_requests_it_holds_are_answered(exports, monkeypatch):
    with in_process(exports, reload_interval=0) as c:
        version = version_of(exports / "digits-mlp")
        results = []
        with slow_backend(monkeypatch) as started:
            worker = threading.Thread(target=lambda: results.append(answer(c)))
            worker.start()
            assert started.wait(5)
            shutil.rmtree(exports / "digits-mlp")  # while its request is in the backend
            (event,) = reload(c)
            worker.join(10)
        assert event["event"] == "removed" and event["version"] == version
        status, body = results[0]
        assert status == 200 and body["predictions"][0]["version"] == version  # answered by what it was routed to
        status, body = answer(c)
        assert status == 404 and "unknown model 'digits-mlp'" in body["error"]
        assert answer(c, "digits-cnn")[0] == 200
        assert c.get("/models/digits-mlp").status_code == 404


def test_a_request_is_answered_entirely_by_the_version_it_was_routed_to(exports, retrained, monkeypatch):
    """A swap while a request's images are in the backend: every image of it comes from the old version."""
    images = [np.random.default_rng(i).uniform(0, 16, (8, 8)).tolist() for i in range(4)]
    with in_process(exports, reload_interval=0) as c:
        before = c.post("/predict", json={"model": "digits-mlp", "pixels": images}).json()["predictions"]
        results = []
        with slow_backend(monkeypatch) as started:
            worker = threading.Thread(target=lambda: results.append(
                c.post("/predict", json={"model": "digits-mlp", "pixels": images}).json()["predictions"]))
            worker.start()
            assert started.wait(5)
            publish(retrained, exports, replace=True)
            assert [e["event"] for e in reload(c)] == ["served"]
            worker.join(10)
        after = c.post("/predict", json={"model": "digits-mlp", "pixels": images}).json()["predictions"]
    assert [p["version"] for p in results[0]] == [p["version"] for p in before]
    assert [p["probabilities"] for p in results[0]] == [p["probabilities"] for p in before]
    assert {p["version"] for p in after} == {version_of(retrained)}
    assert [p["probabilities"] for p in after] != [p["probabilities"] for p in before]


def test_the_folder_is_polled_and_hidden_folders_are_never_read(exports, retrained):
    with in_process(exports, reload_interval=0.5) as c:
        shutil.copytree(retrained, exports / ".digits-mlp.half-written.tmp")
        (exports / ".digits-mlp.half-written.tmp" / "model.onnx").write_bytes(b"partial")
        time.sleep(1.2)
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["digits-cnn", "digits-mlp"]
        assert set(c.app.state.service.lifecycle.history) == {"digits-cnn", "digits-mlp"}  # nothing else looked at
        assert len(c.get("/models/digits-mlp").json()["history"]) == 1
        publish(retrained, exports, replace=True)
        deadline = time.monotonic() + 5
        while answer(c)[1]["predictions"][0]["version"] != version_of(retrained):
            assert time.monotonic() < deadline, "the poll did not pick the new version up within 5 s"
            time.sleep(0.1)


def test_an_exports_folder_briefly_away_unloads_nothing(exports):
    with in_process(exports, reload_interval=0) as c:
        exports.rename(exports.with_name("elsewhere"))
        try:
            assert reload(c) == []
            assert answer(c)[0] == 200 and answer(c, "digits-cnn")[0] == 200
        finally:
            exports.with_name("elsewhere").rename(exports)


def test_a_model_without_its_test_split_at_hand_is_served_marked_unverified(tmp_path):
    test_file = {"file": "test_32x32.mat", "md5": "0" * 32, "n": 200}
    build_svhn_export(tmp_path / "exports", "svhn-cnn", data={"name": "svhn", "description": "SVHN",
                                                               "test_file": test_file})
    with in_process(tmp_path / "exports") as c:
        (model,) = c.get("/models").json()["models"]
        assert model["status"] == "ready" and model["verified"]["reproduced"] is None
        assert "--data-dir" in model["verified"]["reason"]
        assert "--data-dir" in c.get("/models/svhn-cnn").json()["history"][0]["note"]


def test_an_unexpected_failure_while_checking_rejects_that_version_only(exports, retrained, monkeypatch):
    from serving import lifecycle
    old = version_of(exports / "digits-mlp")
    with in_process(exports, reload_interval=0) as c:
        monkeypatch.setattr(lifecycle, "build", lambda *args: (_ for _ in ()).throw(RuntimeError("a bug")))
        publish(retrained, exports, replace=True)
        (event,) = reload(c)
        assert event["event"] == "rejected" and "unexpectedly (RuntimeError" in event["reason"]
        assert answer(c)[1]["predictions"][0]["version"] == old


def test_a_folder_changing_under_a_look_is_left_for_the_next_one(exports, monkeypatch):
    """A file renamed or deleted inside a served folder while it is looked at: not a removal."""
    from serving import lifecycle
    real_stamp = lifecycle.folder_stamp
    with in_process(exports, reload_interval=0) as c:
        monkeypatch.setattr(lifecycle, "folder_stamp",
                            lambda folder: None if folder.name == "digits-mlp" else real_stamp(folder))
        (exports / "digits-mlp" / "notes.txt").write_text("changed")
        assert reload(c) == [] and answer(c)[0] == 200


def test_a_served_version_keeps_its_own_files_when_its_folder_is_replaced(exports, tmp_path, retrained):
    """Its curves and test split are what was checked when it was loaded, not the rejected folder's."""
    curves, old = (exports / "digits-mlp" / "curves.png").read_bytes(), version_of(exports / "digits-mlp")
    with in_process(exports, reload_interval=0) as c:
        def other_curves(folder):
            (folder / "curves.png").write_bytes(b"\x89PNG not these")
        publish(tampered(retrained, tmp_path, other_curves), exports, replace=True)
        assert [e["event"] for e in reload(c)] == ["rejected"]
        assert c.get("/models/digits-mlp/curves.png").content == curves
        evaluation = c.post("/models/digits-mlp/evaluate").json()
        assert evaluation["agrees"] is True and evaluation["version"] == old


def test_an_unverifiable_version_does_not_replace_a_verified_one(tmp_path):
    build_svhn_export(tmp_path / "exports", "svhn-cnn")  # carries its test split: verified
    test_file = {"file": "test_32x32.mat", "md5": "0" * 32, "n": 200}
    build_svhn_export(tmp_path / "staging", "svhn-cnn", data={"name": "svhn", "description": "SVHN", "test_file": test_file})
    with in_process(tmp_path / "exports", reload_interval=0) as c:
        verified = c.get("/models/svhn-cnn").json()["version"]
        publish(tmp_path / "staging" / "svhn-cnn", tmp_path / "exports", replace=True)
        (event,) = reload(c)
        assert event["event"] == "rejected" and "would replace a verified version" in event["reason"]
        assert c.get("/models/svhn-cnn").json()["version"] == verified


def test_ready_is_503_when_this_process_serves_no_model(exports, monkeypatch):
    def fail(entry, backend, device, warm=True):  # in the HTTP process, after the start-up check passed
        raise inference.LoadError("CUDA ran out of memory (simulated)")
    monkeypatch.setattr(verify, "load_runner", fail)
    with in_process(exports, reload_interval=0) as c:
        response = c.get("/ready")
        assert response.status_code == 503 and "no model is served" in response.json()["error"]


def test_an_emptied_exports_folder_keeps_the_models_served_until_one_is_published(exports, retrained):
    """An unmounted volume looks like an empty folder: dropping every model would take the service down."""
    with in_process(exports, reload_interval=0) as c:
        for name in ("digits-cnn", "digits-mlp"):
            shutil.rmtree(exports / name)
        assert reload(c) == []
        assert answer(c)[0] == 200 and c.get("/ready").status_code == 200
        publish(retrained, exports, replace=True)  # the folder holds models again: it is followed again
        events = {(e["model"], e["event"]) for e in reload(c)}
        assert events == {("digits-cnn", "removed"), ("digits-mlp", "served")}


def test_the_reload_route_needs_the_api_key(exports):
    with in_process(exports, reload_interval=0, api_key="k") as c:
        assert c.post("/models/reload").status_code == 401
        assert c.post("/models/reload", headers={"X-API-Key": "k"}).status_code == 200


def test_reload_asks_are_coalesced_and_a_rejected_version_is_not_checked_again(exports, tmp_path, retrained,
                                                                                 monkeypatch):
    """With one rejected export present, 20 POST /models/reload once cost 53 s of server CPU."""
    looks, builds = [], []
    real_look, real_build = lifecycle.Lifecycle.look, lifecycle.build

    async def slow_look(self, retry):
        looks.append((self, retry))  # whose: the class is patched, and any other server's looks are not these
        await asyncio.sleep(1.0)  # long enough for every ask to arrive while one look runs (0.2 s was not, under load)
        return await real_look(self, retry)
    monkeypatch.setattr(lifecycle.Lifecycle, "look", slow_look)
    monkeypatch.setattr(lifecycle, "build", lambda folder, *args: builds.append(folder.name) or real_build(folder, *args))
    publish(tampered(retrained, tmp_path, claim_fewer_errors), exports, replace=True)
    with in_process(exports, reload_interval=0) as c:
        looks.clear()
        builds.clear()
        with ThreadPoolExecutor(20) as pool:
            statuses = list(pool.map(lambda _: c.post("/models/reload").status_code, range(20)))
        assert statuses == [200] * 20
        assert len([retry for owner, retry in looks if owner is c.app.state.service.lifecycle]) <= 2 and builds == []


def test_a_version_rejected_for_a_cause_outside_its_files_is_tried_again_when_asked(exports, monkeypatch):
    real_load = verify.load_runner

    def flaky(entry, *args, **kwargs):
        if entry.name == "digits-mlp" and not recovered:
            raise inference.LoadError("CUDA ran out of memory (simulated)")
        return real_load(entry, *args, **kwargs)
    recovered = False
    monkeypatch.setattr(verify, "load_runner", flaky)
    with in_process(exports, reload_interval=0) as c:
        assert answer(c)[0] == 503
        recovered = True
        assert reload(c) == []  # asked for at once: not before RETRY_SECONDS
        monkeypatch.setattr(lifecycle, "RETRY_SECONDS", 0)
        (event,) = reload(c)
        assert event["event"] == "served" and answer(c)[0] == 200
