"""/metrics in-process (FastAPI's TestClient): requests, images, queue and inference time counted per
model, and hostile paths and methods that can neither add series nor break the exposition format.
Metrics summed over a real server's processes: tests/serving/test_processes.py."""
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import metric


def test_metrics_count_requests_images_and_queue_vs_inference_time(client):
    labels = {"model": "digits-mlp", "route": "/predict", "method": "POST", "status": "200"}
    before = metric(client, "digitserve_http_requests_total", **labels)
    images_before = metric(client, "digitserve_images_total", model="digits-mlp")
    for _ in range(3):
        client.post("/predict", json={"model": "digits-mlp", "pixels": [np.zeros((8, 8)).tolist()] * 2})
    assert metric(client, "digitserve_http_requests_total", **labels) == before + 3
    assert metric(client, "digitserve_images_total", model="digits-mlp") == images_before + 6
    assert metric(client, "digitserve_queue_duration_seconds_count", model="digits-mlp") >= 3
    assert metric(client, "digitserve_inference_duration_seconds_count", model="digits-mlp") >= 3
    assert metric(client, "digitserve_queue_images") == 0
    assert metric(client, "digitserve_model_info", model="digits-cnn", status="ready", device="cpu") == 1
    assert metric(client, "digitserve_http_request_duration_seconds_count", route="/predict") > 0


def test_hostile_requests_cannot_add_series_or_break_the_exposition(client):
    for path in ["/models/a%22b", "/models/a|b", "/models/a%0Ab", "/models/" + "x" * 300, "/no/such", "/v2/models/a%22"]:
        client.get(path)
    client.request("BREW", "/models/digits-cnn")
    families = list(text_string_to_metric_families(client.get("/metrics").text))  # it parses: the format holds
    labels = [sample.labels for family in families for sample in family.samples]
    templates = {*client.get("/openapi.json").json()["paths"], "/"}
    known = {"digits-cnn", "digits-mlp", "svhn-tiny", "digits-broken", "digits-garbage"}
    assert {l["model"] for l in labels if "model" in l} <= known | {"other", ""}
    assert {l["route"] for l in labels if "route" in l} <= templates | {"other"}
    assert {l["method"] for l in labels if "method" in l} <= {"GET", "POST", "other"}
