"""A model's outputs for one input turned into the answer a user can trust: the digit, its calibrated
confidence, the decision ("digit", "unsure", "not_a_digit"), the candidate set, the probabilities
(export_contract/calibration.py does the arithmetic, with the version's own calibration record), and
counted: answers by decision and confidence per model are the operator's drift signal.
"""
import numpy as np

from export_contract import calibration
from serving.inference import ServedModel
from serving.metrics import Metrics


def answer(model: ServedModel, log_probs: np.ndarray, score: float | None, metrics: Metrics, raw: bool = False,
           unsure_below: float | None = None) -> dict:
    """`raw`: the probabilities as the model gives them (the rest stays calibrated); `unsure_below`:
    this request's own confidence threshold."""
    record = model.calibration
    probs = calibration.probabilities(log_probs[None], record["temperature"])
    scores = None if score is None else np.array([score])
    decision = calibration.DECISIONS[int(calibration.decisions(probs, scores, record, unsure_below)[0])]
    confidence = float(probs.max())
    metrics.answers.labels(model.name, model.version, decision).inc()
    metrics.confidence.labels(model.name).observe(confidence)
    shown = calibration.probabilities(log_probs[None], 1.0) if raw else probs
    return {"label": int(probs.argmax()), "confidence": round(confidence, 6), "decision": decision,
            "candidates": calibration.candidates(probs, record)[0],
            "probabilities": [round(float(p), 6) for p in shown[0]]}
