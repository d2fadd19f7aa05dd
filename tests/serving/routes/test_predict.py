"""/predict in-process (FastAPI's TestClient): multipart, JSON (base64 images and pixel arrays) and raw
image bodies, routing by size and by name, options in the query and the body, bad input (right status,
a JSON error, the service keeps serving), concurrent requests sharing batches, a full queue shedding
with Retry-After, and the TorchScript backend giving the ONNX backend's answers."""
import base64
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.routing import APIRoute
from PIL import Image

from bench.harness import png, png_chunk
from serving import inference, schemas
from serving.api import predict as api_predict
from serving.config import Config
from tests.helpers import digit_png, in_process, metric, offline, synthetic_svhn

VALID_DIGIT = png(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L")


def test_predict_multipart_routes_by_size_and_matches_offline(client, exports, test_digits):
    images, labels = test_digits
    svhn_x, svhn_y = synthetic_svhn(3, seed=7)
    files = [("file", (f"d{i}.png", digit_png(images[i]), "image/png")) for i in range(3)]
    files.append(("file", ("s.png", png(svhn_x[0].transpose(1, 2, 0), "RGB"), "image/png")))
    response = client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["model"] for p in predictions] == ["digits-cnn"] * 3 + ["svhn-tiny"]
    assert [p["input"] for p in predictions] == ["d0.png", "d1.png", "d2.png", "s.png"]
    # the PNG round trip quantises 0..16 to 0..255 and back; the offline reference does the same
    quantised = (np.round(images[:3] * 255 / 16) * (16 / 255)).astype(np.float32)[:, None]
    expected = offline(exports, "digits-cnn", quantised)
    for p, probs in zip(predictions[:3], expected):
        assert np.allclose(p["probabilities"], probs, atol=2e-6)
        assert p["label"] == int(np.argmax(probs)) and abs(sum(p["probabilities"]) - 1) < 1e-4
    assert predictions[3]["label"] == svhn_y[0]


def test_predict_json_base64_and_pixels_with_explicit_model(client, test_digits):
    images, labels = test_digits
    encoded = base64.b64encode(digit_png(images[5])).decode()
    body = {"model": "digits-mlp", "images": [f"data:image/png;base64,{encoded}"], "pixels": [images[6].tolist()]}
    predictions = client.post("/predict", json=body).json()["predictions"]
    assert [p["model"] for p in predictions] == ["digits-mlp", "digits-mlp"]
    assert [p["input"] for p in predictions] == ["images[0]", "pixels[0]"]
    assert predictions[1]["label"] == labels[6]
    version = client.get("/models/digits-mlp").json()["version"]
    assert predictions[0]["version"] == version


def test_invert_and_exact_sizes(client, test_digits):
    images, labels = test_digits
    light = 255 - np.round(images[10] * 255 / 16).astype(np.uint8)  # dark ink on white paper
    normal = client.post("/predict?model_input=true", files={"file": ("d.png", digit_png(images[10]))}
                         ).json()["predictions"][0]
    inverted = client.post("/predict?invert=true", files={"file": ("d.png", png(light, "L"))}).json()["predictions"][0]
    assert inverted["label"] == normal["label"]
    assert np.allclose(inverted["probabilities"], normal["probabilities"], atol=1e-5)
    assert np.allclose(normal["model_input"], images[10], atol=0.04)  # what the model saw: the digit (8-bit PNG)
    big = np.asarray(Image.fromarray(np.round(images[10] * 255 / 16).astype(np.uint8)).resize((64, 64), Image.NEAREST))
    refused = client.post("/predict", files={"file": ("big.png", png(big, "L"))})
    assert refused.status_code == 422 and "8x8" in refused.json()["error"] and "32x32" in refused.json()["error"]


def test_an_image_sent_as_the_body_is_an_upload(client, test_digits):
    images, labels = test_digits
    answer = client.post("/predict", content=digit_png(images[3]), headers={"content-type": "image/png"})
    assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == labels[3]
    empty = client.post("/predict", content=b"", headers={"content-type": "image/jpeg"})
    assert empty.status_code == 422 and "no image" in empty.json()["error"]


@pytest.mark.parametrize("where", ["form", "json"])
def test_an_option_in_the_body_wins_over_the_query(client, test_digits, where):
    images, _ = test_digits
    big = np.kron(np.round(images[10] * 255 / 16).astype(np.uint8), np.ones((4, 4), np.uint8))  # 32x32, grey

    def send(params: dict):  # resize=false in the body, the query's resize=true to be overridden
        if where == "form":
            return client.post("/predict", params=params, files={"file": ("d.png", png(big, "L"))},
                               data={"resize": "false"})
        return client.post("/predict", params=params, json={"resize": False, "images": [
            base64.b64encode(png(big, "L")).decode()]})
    answer = send({"resize": "true", "invert": "bogus-but-checked"})
    assert answer.status_code == 422 and "invert must be true or false" in answer.json()["error"]
    answer = send({"resize": "true"})
    assert answer.status_code == 200 and answer.json()["predictions"][0]["model"] == "svhn-tiny"  # exact 32x32


def test_model_input_comes_when_asked_and_only_with_uploads(client, test_digits):
    """20 KB for a 32x32 upload: only when asked (the page asks); a pixels[] entry is what the client sent."""
    images, _ = test_digits
    upload = {"file": ("d.png", digit_png(images[0]))}
    assert "model_input" not in client.post("/predict", files=upload).json()["predictions"][0]
    assert "model_input" in client.post("/predict", data={"model_input": "true"}, files=upload).json()["predictions"][0]
    answer = client.post("/predict", json={"pixels": [images[0].tolist()], "model_input": True}).json()["predictions"][0]
    assert "model_input" not in answer


@pytest.mark.parametrize("options", [{}, {"model_input": "true", "raw": "true"}, {"unsure_below": "0.999"}])
def test_answers_are_what_the_documented_schema_says(client, test_digits, options):
    """The route writes its JSON itself (not through FastAPI's response_model): it must still match it."""
    images, _ = test_digits
    body = client.post("/predict", data=options, files=[("file", ("a.png", digit_png(images[0]))),
                                                        ("file", ("b.png", digit_png(images[1])))]).json()
    assert schemas.PredictResponse.model_validate(body).model_dump(mode="json", exclude_none=True) == body


def bomb_png() -> bytes:
    """A valid PNG header declaring 100000 x 100000 pixels, with a tiny body."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


@pytest.mark.parametrize("request_kwargs, status, message", [
    ({"files": {"file": ("x.png", b"hello, not an image")}}, 400, "not an image"),
    ({"files": {"file": ("x.png", png(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8))[:300])}},
     400, "truncated"),
    ({"files": {"file": ("x.png", png(np.zeros((10, 12), np.uint8), "L"))}}, 422, "the served models take"),
    ({"json": {"pixels": [[[1, 2], [3, 4]]]}}, 422, "accepted"),
    ({"json": {"pixels": [[["a"] * 8] * 8]}}, 422, "numbers"),
    ({"json": {"pixels": [np.full((8, 8), 17).tolist()]}}, 422, "[0, 16]"),
    ({"json": {"images": "not-a-list"}}, 422, "images"),
    ({"json": {"images": ["%%%"]}}, 400, "base64"),
    ({"json": {}}, 422, "no image"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid JSON"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "multipart/form-data, application/json or an image"),
    ({"json": {"model": "resnet", "pixels": [np.zeros((8, 8)).tolist()]}}, 404, "unknown model"),
    ({"json": {"model": "svhn-tiny", "pixels": [np.zeros((8, 8)).tolist()]}}, 422, "svhn"),
    ({"files": {"file": ("x.png", b"\0" * (Config().max_payload_bytes + 1))}}, 413, "limit"),
    ({"files": {"file": ("bomb.png", bomb_png())}}, 413, "declares"),
])
def test_bad_input(client, request_kwargs, status, message):
    response = client.post("/predict", **request_kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert client.get("/health").status_code == 200
    ok = client.post("/predict", json={"pixels": [np.zeros((8, 8)).tolist()]})
    assert ok.status_code == 200


def test_concurrent_mixed_requests_each_get_their_own_answer(client, exports, test_digits):
    images, _ = test_digits
    svhn_x, svhn_y = synthetic_svhn(100, seed=11)
    digit_pngs = [digit_png(images[i]) for i in range(120)]
    quantised = (np.round(images[:120] * 255 / 16) * (16 / 255)).astype(np.float32)[:, None]
    expected_digits = offline(exports, "digits-cnn", quantised)

    def one(i):
        if i % 2 == 0 and i // 2 < 120:
            data = digit_pngs[i // 2]
        else:
            data = png(svhn_x[i % 100].transpose(1, 2, 0), "RGB")
        return i, client.post("/predict", files={"file": (f"req{i}.png", data)})

    with ThreadPoolExecutor(32) as pool:  # requests in flight together on the app's event loop
        results = list(pool.map(one, range(240)))
    batch_sizes = []
    for i, response in results:
        assert response.status_code == 200, response.text
        (p,) = response.json()["predictions"]
        assert p["input"] == f"req{i}.png"
        if i % 2 == 0 and i // 2 < 120:
            assert p["model"] == "digits-cnn"
            assert np.allclose(p["probabilities"], expected_digits[i // 2], atol=2e-6)
        else:
            assert p["model"] == "svhn-tiny" and p["label"] == svhn_y[i % 100]
        batch_sizes.append(p["batch_size"])
    assert max(batch_sizes) > 1  # concurrent requests shared inference calls


def test_torchscript_backend_serves_the_same_predictions(exports, client, test_digits):
    images, _ = test_digits
    body = {"model": "digits-mlp", "pixels": [images[i].tolist() for i in range(5)]}
    onnx_predictions = client.post("/predict", json=body).json()["predictions"]
    with in_process(exports, backend="torchscript") as c:
        models = c.get("/models").json()
        assert models["backend"] == "torchscript"
        assert {m["provider"] for m in models["models"] if m["status"] == "ready"} == {f"torch {torch.__version__}"}
        predictions = c.post("/predict", json=body).json()["predictions"]
        v2 = c.post("/v2/models/svhn-tiny/infer", json={"inputs": [{"name": "pixels", "shape": [1, 3, 32, 32],
                    "datatype": "UINT8", "data": synthetic_svhn(1, seed=5)[0].ravel().tolist()}]})
        assert v2.status_code == 200
    for ts, ort in zip(predictions, onnx_predictions):
        assert ts["label"] == ort["label"]
        assert np.allclose(ts["probabilities"], ort["probabilities"], atol=1e-5)


def test_a_full_queue_sheds_requests_at_once_with_retry_after(exports, monkeypatch):
    with in_process(exports, max_queue=2) as c:
        predict = inference.predict
        monkeypatch.setattr(inference, "predict", lambda requests: (time.sleep(0.3), predict(requests))[1])
        body = {"model": "digits-cnn", "pixels": [np.zeros((8, 8)).tolist()]}
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: c.post("/predict", json=body), range(8)))
        statuses = sorted(r.status_code for r in responses)
        shed = [r for r in responses if r.status_code == 503]
        assert 200 in statuses and shed and set(statuses) == {200, 503}
        assert all(r.headers["retry-after"] == "1" and "capacity" in r.json()["error"] for r in shed)
        assert metric(c, "digitserve_shed_requests_total") == len(shed)


def test_a_file_where_an_option_belongs_is_a_client_error(client):
    response = client.post("/predict", files=[("file", ("d.png", VALID_DIGIT)), ("invert", ("x.txt", b"true"))])
    assert response.status_code == 422 and "'invert' must be a value, not a file" in response.json()["error"]


def test_post_predict_takes_the_short_path_and_the_route_keeps_the_rest(client, test_digits, monkeypatch):
    """POST /predict is answered by api.predict.ShortPath, past FastAPI's router and request handler
    (a cost cut, issue 28); the declared route still answers other methods and documents the body."""
    before = metric(client, "digitserve_http_requests_total", route="/predict", method="POST", status="200")

    async def not_here(self, scope, receive, send):
        raise AssertionError(f"{scope['method']} {scope['path']} went through FastAPI's router")
    monkeypatch.setattr(APIRoute, "handle", not_here)
    response = client.post("/predict", files={"file": ("d.png", digit_png(test_digits[0][0]), "image/png")})
    assert response.status_code == 200, response.text
    bad = client.post("/predict", files={"file": ("d.png", b"not an image", "image/png")})
    assert bad.status_code == 400 and "error" in bad.json()  # the one error mapping's answer
    monkeypatch.undo()
    assert metric(client, "digitserve_http_requests_total", route="/predict", method="POST",
                  status="200") == before + 1  # labelled by its route, as the router would
    wrong = client.get("/predict")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert "requestBody" in client.get("/openapi.json").json()["paths"]["/predict"]["post"]
    # What the short path assumes of the route it stands in for: served at its own path (no prefix, as the
    # document above shows), with no dependencies, which it would not run (an API key there would go
    # unchecked).
    assert api_predict.ROUTE.path == "/predict" and api_predict.ROUTE.endpoint is api_predict.predict
    assert api_predict.ROUTE.dependencies == [] and api_predict.router.dependencies == []


def test_the_short_path_maps_errors_as_the_exception_middleware_does():
    import asyncio

    from starlette.requests import ClientDisconnect, Request

    from serving.api import errors
    from serving.errors import InputError, Overloaded
    request = Request({"type": "http", "method": "POST", "path": "/predict", "headers": [], "state": {}})

    def answer(err):
        return asyncio.run(errors.answer(request, err))
    assert answer(InputError("bad", 415)).status_code == 415
    overloaded = answer(Overloaded("full"))
    assert overloaded.status_code == 503 and overloaded.headers["retry-after"] == str(Overloaded.retry_after)
    assert answer(ClientDisconnect()).status_code == 499
    with pytest.raises(RuntimeError):  # a bug goes on to the outermost middleware, which logs it
        answer(RuntimeError("a bug"))
