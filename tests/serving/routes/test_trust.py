"""How far to trust an answer, through the routes, in-process: every answer's calibrated confidence,
decision and candidate set, the options that change them, the figures /models shows, and the drift
metrics; a model exported before calibration existed answers too, and says it is uncalibrated."""
import json
import shutil

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from export_contract import calibration
from tests.helpers import digit_png, in_process


def predict(client, pixels, **options):
    response = client.post("/predict", json={"pixels": [np.asarray(p).tolist() for p in pixels], **options})
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def test_every_answer_says_how_far_to_trust_it(client, test_digits):
    images, labels = test_digits
    for answer in predict(client, images[:20]):
        assert answer["confidence"] == max(answer["probabilities"])
        assert answer["decision"] in calibration.DECISIONS
        assert answer["candidates"] == sorted(answer["candidates"], key=lambda d: -answer["probabilities"][d])
        if answer["decision"] == "digit":
            assert answer["candidates"][0] == answer["label"]


def test_raw_probabilities_and_another_threshold_on_request(client, test_digits):
    images, _ = test_digits
    (calibrated,) = predict(client, images[:1])
    (raw,) = predict(client, images[:1], raw=True)
    assert raw["probabilities"] != calibrated["probabilities"]  # the model's own (T = 1)
    assert raw["confidence"] == calibrated["confidence"] and raw["decision"] == calibrated["decision"]
    (strict,) = predict(client, images[:1], unsure_below=1.0)
    assert strict["decision"] == "unsure"
    answer = client.post("/predict?unsure_below=0", files={"file": ("d.png", digit_png(images[0]))}).json()
    assert answer["predictions"][0]["decision"] == "digit"


@pytest.mark.parametrize("request_kwargs, message", [
    ({"params": {"threshold": "0.5"}}, "unknown query parameter 'threshold'"),
    ({"params": {"unsure_below": "1.5"}}, "unsure_below must be a number in [0, 1]"),
    ({"params": {"unsure_below": "much"}}, "unsure_below must be a number in [0, 1]"),
    ({"json": {"pixels": [[[0] * 8] * 8], "unsure_below": -0.1}}, "unsure_below"),
    ({"json": {"pixels": [[[0] * 8] * 8], "sure": True}}, "sure"),
    ({"data": {"colour": "red"}, "files": {"file": ("d.png", b"x")}}, "unknown form field 'colour'"),
])
def test_options_out_of_range_or_unknown_are_422_naming_the_option(client, request_kwargs, message):
    response = client.post("/predict", **request_kwargs)
    assert response.status_code == 422 and message in response.json()["error"], response.text


def test_the_non_digit_pictures_a_model_was_measured_on_are_refused_as_its_manifest_says(client, exports):
    """The export carries its non-digit test pictures: answered through the route, as many are refused
    as the calibration record's test figures say."""
    manifest = json.loads((exports / "svhn-tiny" / "model.json").read_text())
    recorded = manifest["calibration"]["test"]["nondigits"]
    with np.load(exports / "svhn-tiny" / manifest["calibration"]["nondigits"]["file"]) as data:
        pictures = data["x"]
    answers = []
    for start in range(0, len(pictures), 50):  # 50 crops of JSON numbers stay under the payload limit
        answers += predict(client, pictures[start:start + 50].transpose(0, 2, 3, 1), model="svhn-tiny")
    assert sum(a["decision"] != "digit" for a in answers) == recorded["not_answered"]
    assert sum(a["decision"] == "not_a_digit" for a in answers) == recorded["not_a_digit"]


def test_models_show_the_calibration_and_its_diagram(client):
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    trust = models["svhn-tiny"]["calibration"]
    assert trust["temperature"] > 0 and 0 <= trust["unsure_below"] <= 1 and trust["conformal_level"] == 0.99
    assert set(trust["test"]) >= {"before", "after", "selective", "conformal"}
    diagram = client.get(trust["reliability_url"])
    assert diagram.status_code == 200 and diagram.content.startswith(b"\x89PNG")


def test_a_model_exported_before_calibration_answers_uncalibrated_and_says_so(exports, tmp_path, test_digits):
    folder = tmp_path / "exports" / "digits-cnn"
    shutil.copytree(exports / "digits-cnn", folder)
    manifest = json.loads((folder / "model.json").read_text())
    manifest.pop("calibration", None)
    (folder / "model.json").write_text(json.dumps(manifest))
    images, _ = test_digits
    with in_process(folder.parent, reload_interval=0) as c:
        (answer,) = predict(c, images[:1])
        assert answer["probabilities"] == predict(c, images[:1], raw=True)[0]["probabilities"]  # T = 1
        (model,) = c.get("/models").json()["models"]
        assert "exported before calibration existed" in model["calibration"]["note"]
        assert c.get("/models/digits-cnn/reliability.png").status_code == 404


def test_answers_are_counted_by_decision_and_confidence(client, test_digits):
    images, _ = test_digits

    def counts():
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        answers = sum(s.value for s in families["digitserve_answers"].samples
                      if s.labels.get("model") == "digits-cnn" and s.name.endswith("_total"))
        confidence = sum(s.value for s in families["digitserve_answer_confidence"].samples
                         if s.labels.get("model") == "digits-cnn" and s.name.endswith("_count"))
        return answers, confidence
    before = counts()
    predict(client, images[:7])
    assert counts() == (before[0] + 7, before[1] + 7)
