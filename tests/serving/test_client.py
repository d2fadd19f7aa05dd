"""serving/client.py: typed answers from a real server on loopback (the committed models, one of them
tampered so that it is unavailable, an API key set), each documented failure as its exception class
with the service's own message, and, against a scripted transport (httpx.MockTransport), the retries:
503 + Retry-After within the budget, connection failures with backoff, and large batches split. The
Python examples of docs/api.md's "Python client and batch prediction" print what their comments say."""
import asyncio
import json
import os
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.harness import ROOT, copy_committed, free_port, png, running_server
from serving.client import (AsyncClient, BadInput, Client, Evaluation, ModelInfo, ModelNotFound, Prediction, Readiness,
                            TooLarge, Unauthorized, Unavailable, UnreadableFile, Unreachable)
from tests.helpers import digit_png, flip_last_byte, tampered

KEY = "client-test-key"
SAMPLE_6 = ROOT / "samples" / "digit-8x8-6.png"
HOUSE_6 = ROOT / "samples" / "house-number-32x32-6.png"
DOCS = (ROOT / "docs" / "api.md").read_text()
SECTION = DOCS[DOCS.index("## Python client and batch prediction"):DOCS.index("## Outside this checkout")]
PYTHON_EXAMPLES = re.findall(r"```python\n(.*?)```", SECTION, re.S)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    exports = tmp_path_factory.mktemp("exports")
    copy_committed(exports, "digits-cnn", "svhn-synthetic-cnn", "digits-photo-cnn")
    tampered(ROOT / "exports" / "digits-mlp", exports, flip_last_byte)  # unavailable: 503 when named
    with running_server(exports, "--workers", "1", env={"DIGITSERVE_API_KEY": KEY}) as process:
        yield process


@pytest.fixture
def client(server):
    with Client(server.url, api_key=KEY) as c:
        yield c


@pytest.fixture(scope="module")
def test_split():
    with np.load(ROOT / "exports" / "digits-cnn" / "test_set.npz") as data:
        return data["x"][:, 0], data["y"]


def service_says(server, path: str = "/predict", **request) -> dict:
    """The service's own answer to a raw request, for comparing messages."""
    response = httpx.request("POST", server.url + path, headers={"X-API-Key": KEY}, timeout=30, **request)
    return response.json()


# --- typed answers, every kind of input ---

def test_one_path_gives_one_typed_prediction(client):
    answer = client.predict(SAMPLE_6)
    assert isinstance(answer, Prediction)
    assert (answer.label, answer.decision, answer.model, answer.input) == (6, "digit", "digits-cnn", str(SAMPLE_6))
    assert isinstance(answer.confidence, float) and answer.candidates == (6,) and len(answer.probabilities) == 10
    assert answer.routed == "the default model for 8x8 grey images" and answer.version and answer.batch_size >= 1


def test_each_kind_of_input_in_one_call_keeps_its_order(client, test_split):
    x, y = test_split
    inputs = [SAMPLE_6, str(HOUSE_6), digit_png(x[0]), Image.fromarray(np.round(x[1] * 255 / 16).astype(np.uint8)),
              x[2], np.asarray(Image.open(HOUSE_6).convert("RGB"))]
    answers = client.predict(inputs)
    assert [a.label for a in answers] == [6, 6, y[0], y[1], y[2], 6]
    assert [a.input for a in answers] == [str(SAMPLE_6), str(HOUSE_6), "images[2]", "images[3]", "pixels[4]",
                                          "pixels[5]"]
    assert [a.model for a in answers] == ["digits-cnn", "svhn-synthetic-cnn", "digits-cnn", "digits-cnn",
                                          "digits-cnn", "svhn-synthetic-cnn"]


def test_a_stack_of_arrays_is_many_and_one_array_is_one(client, test_split):
    x, y = test_split
    assert [a.label for a in client.predict(x[:5])] == list(y[:5])
    assert client.predict(x[7]).label == y[7]


def test_options_reach_the_service(client):
    named = client.predict(SAMPLE_6, model="digits-cnn", raw=True, unsure_below=1.0, model_input=True)
    assert named.routed == "named in the request" and named.decision == "unsure"
    assert np.asarray(named.model_input).shape == (8, 8)
    photo = client.predict(ROOT / "samples" / "photo-4.jpg", resize=True)
    assert photo.label == 4 and photo.routed.startswith("resize=true")
    with pytest.raises(ValueError, match="unsure_below"):
        client.predict(SAMPLE_6, unsure_below=2)


def test_a_batch_over_the_request_limit_is_split_and_answered_in_order(server, client, test_split):
    x, y = test_split
    files = [digit_png(image) for image in x[:300]]
    labels = [a.label for a in client.predict(files)]  # 256 + 44
    assert np.mean(np.array(labels) == y[:300]) > 0.98  # the model's own few errors aside
    with Client(server.url, api_key=KEY, batch_size=64, concurrency=3) as c:
        assert [a.label for a in c.predict(files)] == labels

    async def main():
        async with AsyncClient(server.url, api_key=KEY, max_request_bytes=4000) as ac:
            return await ac.predict(files[:120])
    assert [a.label for a in asyncio.run(main())] == labels[:120]


def test_models_evaluate_ready_reload_are_typed(client):
    models = {m.name: m for m in client.models()}
    assert all(isinstance(m, ModelInfo) for m in models.values())
    assert models["digits-cnn"].status == "ready" and models["digits-cnn"].reproduced is True
    assert models["digits-cnn"].default_for == "8x8" and models["digits-cnn"].test.n == 447
    assert models["digits-mlp"].status == "unavailable" and "sha256" in models["digits-mlp"].reason
    evaluation = client.evaluate("digits-cnn")
    assert isinstance(evaluation, Evaluation) and evaluation.agrees and evaluation.served == evaluation.manifest
    assert client.ready() == Readiness(True, ("digits-cnn", "digits-photo-cnn", "svhn-synthetic-cnn"))
    reload = client.reload()
    assert reload.changes == () and "digits-cnn" in reload.models


# --- each documented failure, with the service's message ---

def test_bad_input_carries_the_services_message(server, client):
    with pytest.raises(BadInput) as caught:
        client.predict(b"not an image")
    assert caught.value.status == 400
    assert caught.value.message == service_says(server, files={"file": ("x", b"not an image")})["error"]
    with pytest.raises(BadInput) as caught:
        client.predict(png(np.zeros((10, 10), np.uint8)))
    assert caught.value.status == 422 and caught.value.message.startswith("image is 10x10")


def test_too_large_unknown_unavailable_unauthorised(server, client):
    huge = png(np.zeros((4100, 4100), np.uint8))  # declares more pixels than the service takes
    with pytest.raises(TooLarge) as caught:
        client.predict(huge)
    assert caught.value.message == service_says(server, files={"file": ("x", huge)})["error"]
    with pytest.raises(ModelNotFound) as caught:
        client.predict(SAMPLE_6, model="nope")
    assert caught.value.message == service_says(server, params={"model": "nope"},
                                                files={"file": ("x", SAMPLE_6.read_bytes())})["error"]
    with pytest.raises(ModelNotFound):
        client.evaluate("nope")
    with pytest.raises(Unavailable) as caught:  # the tampered export, named: 503 without Retry-After, not retried
        client.predict(SAMPLE_6, model="digits-mlp")
    assert caught.value.message.startswith("model 'digits-mlp' is unavailable") and "sha256" in caught.value.message
    with Client(server.url, api_key="wrong") as stranger:
        with pytest.raises(Unauthorized) as caught:
            stranger.models()
        assert caught.value.message == httpx.get(server.url + "/models").json()["error"]
        assert stranger.ready().ready  # an open route


def test_failures_in_a_batch_are_found_and_returned_in_their_places(client, tmp_path, test_split):
    x, y = test_split
    inputs = [digit_png(image) for image in x[:40]]
    labels = [a.label for a in client.predict(inputs)]
    inputs[7], inputs[31] = b"junk", png(np.zeros((9, 9), np.uint8))
    inputs.append(tmp_path / "missing.png")
    answers = client.predict(inputs, errors="return")
    assert isinstance(answers[7], BadInput) and answers[7].status == 400 and answers[7].input == "images[7]"
    assert isinstance(answers[31], BadInput) and answers[31].status == 422
    assert isinstance(answers[40], UnreadableFile) and "No such file" in str(answers[40])
    assert [a.label for i, a in enumerate(answers[:40]) if i not in (7, 31)] == [
        label for i, label in enumerate(labels) if i not in (7, 31)]
    with pytest.raises(BadInput) as caught:  # errors="raise": the first, naming its input
        client.predict(inputs[:40])
    assert caught.value.input == "images[7]"


def test_nothing_listening_is_unreachable_after_the_retries():
    started = time.monotonic()
    with Client(f"http://127.0.0.1:{free_port()}", retries=1) as c:
        with pytest.raises(Unreachable, match="does not answer: Connection refused"):
            c.models()
    assert time.monotonic() - started < 5


# --- retries, against a scripted transport ---

def answers_for(request: httpx.Request) -> httpx.Response:
    """What /predict answers: one prediction per uploaded file or pixels[] entry."""
    json_body = request.headers["content-type"] == "application/json"
    n = len(json.loads(request.content)["pixels"]) if json_body else request.content.count(b'name="file"')
    prediction = {"input": "x", "model": "m", "version": "v", "routed": "r", "label": 3, "confidence": 0.9,
                  "decision": "digit", "candidates": [3], "probabilities": [0.1] * 10, "batch_size": n}
    return httpx.Response(200, json={"predictions": [prediction] * n})


def scripted(*steps):
    """A transport that answers each request with the next step (a status with headers, or an
    exception to raise), then as /predict does; it records each request."""
    seen, script = [], list(steps)

    def handle(request):
        seen.append(request)
        step = script.pop(0) if script else None
        if isinstance(step, Exception):
            raise step
        if step is not None:
            status, headers = step
            return httpx.Response(status, headers=headers, json={"error": f"scripted {status}"})
        return answers_for(request)
    return httpx.MockTransport(handle), seen


def test_503_with_retry_after_is_retried_after_the_time_it_names():
    transport, seen = scripted((503, {"Retry-After": "0.3"}), (503, {"Retry-After": "0"}))
    started = time.monotonic()
    with Client("http://digitserve", transport=transport) as c:
        assert c.predict(b"png").label == 3
    assert len(seen) == 3 and time.monotonic() - started >= 0.3


def test_503_beyond_the_budget_is_raised_with_the_services_message():
    transport, seen = scripted(*[(503, {"Retry-After": "0.2"})] * 50)
    started = time.monotonic()
    with Client("http://digitserve", transport=transport, retry_budget=1.0) as c:
        with pytest.raises(Unavailable, match="scripted 503"):
            c.predict(b"png")
    assert 2 <= len(seen) <= 5 and time.monotonic() - started < 1.5
    transport, seen = scripted((503, {}))  # no Retry-After (a model unavailable): not retried
    with Client("http://digitserve", transport=transport) as c, pytest.raises(Unavailable):
        c.predict(b"png")
    assert len(seen) == 1


def test_connection_failures_are_retried_with_backoff_then_raised():
    transport, seen = scripted(httpx.ConnectError("refused"), httpx.RemoteProtocolError("closed"))
    with Client("http://digitserve", transport=transport) as c:
        assert c.predict(b"png").label == 3
    assert len(seen) == 3
    transport, seen = scripted(*[httpx.ConnectError("refused")] * 5)
    with Client("http://digitserve", transport=transport, retries=2) as c, pytest.raises(Unreachable):
        c.predict(b"png")
    assert len(seen) == 3


def test_async_client_retries_the_same_way():
    transport, seen = scripted((503, {"Retry-After": "0"}), httpx.ConnectError("refused"))

    async def main():
        async with AsyncClient("http://digitserve", transport=transport) as c:
            return await c.predict([b"a", b"b"])
    assert [a.label for a in asyncio.run(main())] == [3, 3] and len(seen) == 3


def test_batches_are_split_to_256_images_and_the_byte_limit():
    transport, seen = scripted()
    with Client("http://digitserve", transport=transport) as c:
        assert len(c.predict([b"x" * 100] * 600)) == 600
    assert sorted(r.content.count(b'name="file"') for r in seen) == [88, 256, 256]
    transport, seen = scripted()
    with Client("http://digitserve", transport=transport, max_request_bytes=50_000, concurrency=1) as c:
        c.predict([b"x" * 10_000] * 12)
    assert [r.content.count(b'name="file"') for r in seen] == [4, 4, 4]
    assert all(len(r.content) < 50_000 for r in seen)
    transport, seen = scripted()
    with Client("http://digitserve", transport=transport) as c:
        c.predict(np.zeros((300, 8, 8)))
    assert sorted(len(json.loads(r.content)["pixels"]) for r in seen) == [44, 256]


# --- import weight ---

def test_importing_the_client_loads_no_server_and_no_numpy():
    code = ("import sys, serving.client; heavy = {'numpy', 'PIL', 'fastapi', 'litserve', 'onnxruntime', 'torch', "
            "'serving.service'}; print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the docs' examples ---

def printed_as_commented(example: str) -> list[str]:
    """What an example's print lines say they print: the comment after each."""
    return [line.split("  # ", 1)[1] for line in example.splitlines() if "print(" in line and "  # " in line]


def test_the_docs_have_python_examples_that_say_what_they_print():
    assert len(PYTHON_EXAMPLES) >= 2 and all(printed_as_commented(example) for example in PYTHON_EXAMPLES)


@pytest.mark.parametrize("example", PYTHON_EXAMPLES, ids=lambda code: code.splitlines()[0])
def test_docs_python_example_prints_what_it_says(example, server):
    code = example.replace("http://127.0.0.1:8000", server.url)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "DIGITSERVE_API_KEY": KEY})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == printed_as_commented(example)
