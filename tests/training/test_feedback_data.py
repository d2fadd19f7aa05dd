"""Real traffic as training data (training/feedback_data.py): a prediction log written by the server's
own writer, joined with the labels told through /feedback, turned into an .npz that `digits
--extra-train` adds to the training split only; logs and files that are not what they should be
are one-line errors (exit 2)."""
import json
import time

import numpy as np
import pytest

from serving.metrics import Metrics
from serving.prediction_log import PredictionLog
from training import feedback_data
from training.errors import DataError


def write_log(folder, inputs: str = "model"):
    """Six 8x8 predictions and two 32x32 ones through the server's writer; five of them told."""
    folder.mkdir(parents=True, exist_ok=True)
    log = PredictionLog(folder, 1.0, inputs, 1 << 20, 2, 7.0, Metrics(models=[]))
    log.start()
    rng = np.random.default_rng(0)
    for i in range(8):
        shape = (1, 8, 8) if i < 6 else (3, 32, 32)
        array = rng.uniform(0, 16, shape).astype(np.float32)
        answer = {"id": f"p{i}", "model": "digits-cnn" if i < 6 else "svhn", "version": "v1", "label": i % 10,
                  "confidence": 0.9, "decision": "digit"}
        log.record(f"p{i}", [answer], [None], [array], time.perf_counter())
    for key, truth in (("p0", 0), ("p1", 7), ("p2", 2), ("p6", 6), ("unknown", 3)):
        log.put({"type": "feedback", "at": time.time(), "id": key, "model": "m", "version": "v1", "label": 0,
                 "truth": truth})
    log.stop()
    return folder


def test_told_predictions_with_their_inputs_become_labelled_pictures(tmp_path):
    x, y, summary = feedback_data.labelled(write_log(tmp_path), None, None)
    assert x.shape == (3, 1, 8, 8) and y.tolist() == [0, 7, 2]  # the commonest shape; p6 is 3x32x32
    assert summary.startswith("3 told predictions of shape 1x8x8 (1 the model got wrong)")
    x32, y32, _ = feedback_data.labelled(tmp_path, None, "3x32x32")
    assert x32.shape == (1, 3, 32, 32) and y32.tolist() == [6]
    assert feedback_data.labelled(tmp_path, "svhn", None)[1].tolist() == [6]


def test_a_log_without_inputs_or_lines_says_what_is_missing(tmp_path):
    with pytest.raises(DataError, match="no prediction log files"):
        feedback_data.labelled(tmp_path, None, None)
    write_log(tmp_path, inputs="none")
    with pytest.raises(DataError, match="none with its input: start the server with --log-inputs model"):
        feedback_data.labelled(tmp_path, None, None)
    with pytest.raises(DataError, match="no told prediction of shape 2x2x2"):
        feedback_data.labelled(write_log(tmp_path / "again"), None, "2x2x2")
    (tmp_path / "again" / "predictions-x-1.jsonl").write_text('{"type": "prediction"}\n')
    with pytest.raises(DataError, match=r"predictions-x-1.jsonl:1: not a prediction-log line"):
        feedback_data.labelled(tmp_path / "again", None, None)


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((2, 1, 8, 7)), np.zeros(2), "the model takes N x 1x8x8"),
    (np.full((2, 1, 8, 8), 17.0), np.zeros(2), "values outside 0..16"),
    (np.zeros((2, 1, 8, 8)), np.array([0, 10]), "labels outside 0..9"),
    (np.zeros((0, 1, 8, 8)), np.zeros(0), "the model takes"),
])
def test_an_extra_training_file_is_checked_against_the_models_input(tmp_path, x, y, message):
    np.savez(tmp_path / "f.npz", x=x, y=y)
    with pytest.raises(DataError, match=message):
        feedback_data.load(tmp_path / "f.npz", (1, 8, 8), (0, 16))


@pytest.mark.slow
def test_the_cli_turns_a_log_into_data_a_digits_run_trains_on(cli, tmp_path):
    made = cli("training", "feedback-data", "--log", str(write_log(tmp_path / "log")), "--out", str(tmp_path / "f.npz"))
    assert made.returncode == 0 and "3 told predictions of shape 1x8x8" in made.stdout, made.stderr
    run = cli("training", "digits", "--arch", "mlp", "--max-epochs", "1", "--out", str(tmp_path / "runs"),
              "--extra-train", str(tmp_path / "f.npz"))
    assert run.returncode == 0, run.stderr
    (folder,) = (tmp_path / "runs").iterdir()
    extra = json.loads((folder / "metrics.json").read_text())["config"]["extra_train"]
    assert extra["n"] == 3 and extra["file"] == str(tmp_path / "f.npz")
    manifest = json.loads((folder / "export" / "digits-mlp" / "model.json").read_text())
    assert "3 labelled pictures from f.npz added to the training split" in manifest["data"]["description"]
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 1, 8, 7)), y=np.zeros(2))
    bad = cli("training", "digits", "--arch", "mlp", "--extra-train", str(tmp_path / "bad.npz"), "--out", str(tmp_path))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "the model takes" in bad.stderr
