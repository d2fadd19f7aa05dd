"""Feedback on a real server with two HTTP processes (the prediction log's store is shared by them):
predictions and their true labels posted concurrently, each answer told wherever it was predicted,
live accuracy in /metrics exactly the share of right answers, whichever process is scraped, and every
prediction's log line in the folder (a file per process that answered), each with its request's ID."""
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import running_server
from tests.helpers import digit_png

ROUNDS = 120


def live(url: str) -> dict:
    samples = [s for f in text_string_to_metric_families(httpx.get(url + "/metrics").text) for s in f.samples]
    return {(s.name, s.labels.get("right", "")): s.value for s in samples
            if s.name in ("digitserve_live_accuracy", "digitserve_live_told", "digitserve_feedback_total")}


def test_feedback_interleaved_with_predictions_counts_live_accuracy_exactly(exports, tmp_path, test_digits):
    images, labels = test_digits
    log = tmp_path / "log"
    with running_server(exports, "--prediction-log", str(log), "--workers", "2") as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        def round_trip(i: int) -> bool:
            answer = client.post("/predict", files={"file": ("d.png", digit_png(images[i]))},
                                 headers={"X-Request-ID": f"load-{i}"}).json()["predictions"][0]
            truth = int(labels[i]) if i % 3 else (answer["label"] + 1) % 10  # a third told otherwise
            told = client.post("/feedback", json={"id": answer["id"], "label": truth})
            assert told.status_code == 200, told.text
            return answer["label"] == truth
        with ThreadPoolExecutor(8) as pool:
            right = list(pool.map(round_trip, range(ROUNDS)))
        for _ in range(4):  # any process answers for both
            figures = live(server.url)
            assert figures[("digitserve_live_told", "")] == ROUNDS
            assert figures[("digitserve_live_accuracy", "")] == sum(right) / ROUNDS
            assert figures[("digitserve_feedback_total", "true")] == sum(right)
            assert figures[("digitserve_feedback_total", "false")] == ROUNDS - sum(right)
    files = sorted(log.glob("predictions-*.jsonl"))
    assert 1 <= len(files) <= 2  # one per HTTP process that answered (the kernel spreads the connections)
    logged = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    predictions = {line["id"]: line for line in logged if line["type"] == "prediction"}
    assert set(predictions) == {f"load-{i}" for i in range(ROUNDS)}
    assert sum(line["type"] == "feedback" for line in logged) == ROUNDS
