"""The KServe v2 protocol in-process (FastAPI's TestClient): model metadata, inference round trips
against ONNX Runtime run directly, and its errors."""
import numpy as np
import pytest

from tests.helpers import offline, synthetic_svhn


def test_v2_metadata_and_infer_round_trip(client, exports, test_digits):
    images, _ = test_digits
    meta = client.get("/v2/models/digits-cnn").json()
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert client.get("/v2/models/digits-cnn/ready").status_code == 200
    x = images[:4, None].astype(np.float32)
    request = {"id": "req-42", "inputs": [{"name": "pixels", "shape": [4, 1, 8, 8], "datatype": "FP32",
                                           "data": x.ravel().tolist()}]}
    body = client.post("/v2/models/digits-cnn/infer", json=request, headers={"X-Request-ID": "r1"}).json()
    assert body["id"] == "req-42" and body["model_name"] == "digits-cnn"
    output, confidence, decision, candidates, ids = body["outputs"]
    # the metadata names every output infer answers, with its datatype (it named only the first)
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [(o["name"], o["datatype"]) for o in body["outputs"]]
    assert ids["data"] == ["r1/0", "r1/1", "r1/2", "r1/3"]  # each row's prediction ID, for /feedback
    assert output["shape"] == [4, 10] and output["datatype"] == "FP32"
    log_probs = np.asarray(output["data"]).reshape(4, 10)
    assert np.allclose(np.exp(log_probs), offline(exports, "digits-cnn", x, calibrated=False), atol=1e-5)
    # how far to trust each row, as /predict says it
    answers = client.post("/predict", json={"pixels": images[:4].tolist()}).json()["predictions"]
    assert confidence["data"] == [a["confidence"] for a in answers] and confidence["shape"] == [4]
    assert decision["datatype"] == "BYTES" and decision["data"] == [a["decision"] for a in answers]
    assert candidates["data"] == [",".join(map(str, a["candidates"])) for a in answers]

    svhn_x, svhn_y = synthetic_svhn(2, seed=3)
    request = {"inputs": [{"name": "pixels", "shape": [2, 3, 32, 32], "datatype": "UINT8", "data": svhn_x.ravel().tolist()}]}
    body = client.post("/v2/models/svhn-tiny/infer", json=request).json()
    assert np.asarray(body["outputs"][0]["data"]).reshape(2, 10).argmax(1).tolist() == svhn_y.tolist()


@pytest.mark.parametrize("request_body, message", [
    ({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP64", "data": [0] * 64}]}, "datatype"),
    ({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 7], "datatype": "FP32", "data": [0] * 56}]}, "shape"),
    ({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0] * 63}]}, "values"),
    ({"inputs": "nope"}, "invalid inference request"),
])
def test_v2_errors(client, request_body, message):
    response = client.post("/v2/models/digits-cnn/infer", json=request_body)
    assert response.status_code == 400 and message in response.json()["error"]
    assert client.post("/v2/models/nope/infer", json=request_body).status_code == 404


def test_v2_fractional_values_for_a_uint8_model_are_refused(client):
    request = {"inputs": [{"name": "pixels", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.5] * 3072}]}
    response = client.post("/v2/models/svhn-tiny/infer", json=request)
    assert response.status_code == 400 and "values must be integers" in response.json()["error"]
