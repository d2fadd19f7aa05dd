"""A model's outputs turned into answers a user can trust: the digit, its calibrated confidence, the
decision ("digit", "unsure", "not_a_digit"), the candidate set, the probabilities
(export_contract/calibration.py does the arithmetic, with the version's own calibration record).

`scored` works on a whole backend call at once, in the inference thread: NumPy on one 10-value row
costs as much as on a batch of them, and a request's answer is then only looked up. `answer` presents
one, and counts it: answers by decision and confidence per model, and the inputs' brightness and ink,
are the operator's drift signals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from export_contract import calibration

if TYPE_CHECKING:
    from serving.inference import ServedModel
    from serving.metrics import Metrics


@dataclass(slots=True)
class Scored:
    """One input's outputs, calibrated with its version's record and its default thresholds."""
    log_probs: np.ndarray      # (10,) as the model gave them
    score: float | None        # the not-a-digit score, where the export has a detector
    probs: np.ndarray          # (10,) calibrated, float64
    label: int
    confidence: float          # the calibrated probability of `label`
    decision: int              # index into calibration.DECISIONS
    candidates: list[int]
    probabilities: list[float]  # `probs`, rounded for the answer
    brightness: float          # the input's mean, as a share of the model's input range
    ink: float                 # the share of the input's values above half that range


def scored(model: ServedModel, inputs: np.ndarray, log_probs: np.ndarray, scores: np.ndarray | None) -> list[Scored]:
    """Every row of one backend call, calibrated together."""
    record = model.calibration
    low, high = model.manifest["input"]["range"]
    shares = (inputs.reshape(len(inputs), -1).astype(np.float32) - low) / (high - low)
    brightness, ink = shares.mean(axis=1).tolist(), (shares > 0.5).mean(axis=1).tolist()
    probs = calibration.probabilities(log_probs, record["temperature"])
    decided = calibration.decisions(probs, scores, record).tolist()
    labels, confidences = probs.argmax(axis=1).tolist(), np.round(probs.max(axis=1), 6).tolist()
    shown = np.round(probs, 6).tolist()
    score_list = [None] * len(probs) if scores is None else np.asarray(scores, dtype=np.float64).tolist()
    return [Scored(log_probs[i], score_list[i], probs[i], labels[i], confidences[i], decided[i], candidates, shown[i],
                   brightness[i], ink[i]) for i, candidates in enumerate(calibration.candidates(probs, record))]


def answer(model: ServedModel, item: Scored, metrics: Metrics, raw: bool = False,
           unsure_below: float | None = None) -> dict:
    """`raw`: the probabilities as the model gives them (the rest stays calibrated); `unsure_below`:
    this request's own confidence threshold."""
    decision = item.decision
    if unsure_below is not None:
        scores = None if item.score is None else np.array([item.score])
        decision = int(calibration.decisions(item.probs[None], scores, model.calibration, unsure_below)[0])
    metrics.child(metrics.answers, model.name, model.version, calibration.DECISIONS[decision]).inc()
    metrics.child(metrics.confidence, model.name, model.version).observe(item.confidence)
    metrics.child(metrics.brightness, model.name).observe(item.brightness)
    metrics.child(metrics.ink, model.name).observe(item.ink)
    probabilities = (np.round(calibration.probabilities(item.log_probs[None], 1.0)[0], 6).tolist() if raw
                     else item.probabilities)
    return {"label": item.label, "confidence": item.confidence, "decision": calibration.DECISIONS[decision],
            "candidates": item.candidates, "probabilities": probabilities}
