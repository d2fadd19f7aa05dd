"""How far to trust an answer: the calibration record of a manifest, applied and measured the same way
by training (which fits it and records its test figures) and by the server (which applies it to every
answer and reproduces the figures before serving the version).

A model's artifact returns log-probabilities, and, where the export carries a detector, a second
output: a "not a digit" score (higher: less like the training digits). The record holds:
- `temperature` T: the answer's probabilities are softmax(log_probs / T) (Guo et al. 2017);
- `confidence.unsure_below`: an answer whose calibrated top probability is below it is "unsure";
- `not_a_digit`: a score above `above` (method "mahalanobis"), or a calibrated confidence below
  `below` (method "confidence"), makes the answer "not_a_digit" (absent: no detector);
- `conformal.quantile` q at `conformal.level`: the candidate set is every digit with probability at
  least 1 - q (split-conformal prediction, LAC score), most likely first;
- the figures on the test split, and the non-digit test pictures' rejection rate, before and after.

Figures are counts where counts are possible (reproduced exactly) and means otherwise (within
TOLERANCE). A model without a record (exported before calibration existed) is applied with
UNCALIBRATED: its raw probabilities, a fixed threshold, no detector, and a candidate set that is the
most likely digits summing to the conformal level (no coverage guarantee).
"""
import numpy as np

DECISIONS = ("digit", "unsure", "not_a_digit")
ECE_BINS = 15
TOLERANCE = 1e-4
UNCALIBRATED = {"temperature": 1.0, "confidence": {"unsure_below": 0.9}, "conformal": {"level": 0.99}}


def probabilities(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log_probs / T), in float64, rows summing to 1."""
    scaled = np.asarray(log_probs, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def decisions(probs: np.ndarray, scores: np.ndarray | None, record: dict, unsure_below: float | None = None
              ) -> np.ndarray:
    """0 digit, 1 unsure, 2 not_a_digit, per row (indices into DECISIONS)."""
    threshold = record["confidence"]["unsure_below"] if unsure_below is None else unsure_below
    decided = np.where(probs.max(axis=1) < threshold, 1, 0)
    detector = record.get("not_a_digit")
    if detector is None:
        return decided
    if detector["method"] == "confidence":
        return np.where(probs.max(axis=1) < detector["below"], 2, decided)
    return decided if scores is None else np.where(np.asarray(scores, dtype=np.float64) > detector["above"], 2, decided)


def candidates(probs: np.ndarray, record: dict) -> list[list[int]]:
    """Each row's candidate set, most likely first."""
    order = np.argsort(-probs, axis=1, kind="stable")
    conformal = record["conformal"]
    if "quantile" in conformal:
        keep = probs >= 1 - conformal["quantile"]
        return [[int(c) for c in row if keep[i, c]] for i, row in enumerate(order)]
    sorted_probs = np.take_along_axis(probs, order, axis=1)  # uncalibrated: the top digits up to the level
    sizes = (np.cumsum(sorted_probs, axis=1) < conformal["level"]).sum(axis=1) + 1
    return [[int(c) for c in row[:size]] for row, size in zip(order, sizes)]


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top probability, equal-width bins on (0, 1]."""
    confidence, right = probs.max(axis=1), probs.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(right[members].mean() - confidence[members].mean())
    return float(total)


def figures(log_probs: np.ndarray, scores: np.ndarray | None, labels: np.ndarray, record: dict,
            nondigit_log_probs: np.ndarray | None = None, nondigit_scores: np.ndarray | None = None) -> dict:
    """The record's figures on a labelled split (and on non-digit pictures, when given): before
    calibration (T = 1) and after; answered = decision "digit"."""
    labels = np.asarray(labels)
    n = len(labels)
    out = {}
    for stage, temperature in (("before", 1.0), ("after", record["temperature"])):
        probs = probabilities(log_probs, temperature)
        out[stage] = {"n": n, "ece": ece(probs, labels),
                      "nll": float(-np.log(np.maximum(probs[np.arange(n), labels], 1e-300)).mean()),
                      "brier": float(((probs - np.eye(10)[labels]) ** 2).sum(axis=1).mean())}
    probs = probabilities(log_probs, record["temperature"])
    answered = decisions(probs, scores, record) == 0
    sets = candidates(probs, record)
    out["selective"] = {"answered": int(answered.sum()),
                        "right": int((probs.argmax(axis=1) == labels)[answered].sum()), "n": n}
    out["conformal"] = {"covered": sum(int(label in s) for label, s in zip(labels, sets)),
                        "mean_size": float(np.mean([len(s) for s in sets])), "n": n}
    if nondigit_log_probs is not None:
        decided = decisions(probabilities(nondigit_log_probs, record["temperature"]), nondigit_scores, record)
        out["nondigits"] = {"n": len(decided), "not_answered": int((decided != 0).sum()),
                            "not_a_digit": int((decided == 2).sum())}
    return out


def reproduces(measured: dict, recorded: dict) -> list[str]:
    """Where `measured` figures differ from `recorded` ones (counts exactly, means within TOLERANCE)."""
    differences = []
    for group, values in recorded.items():
        for key, value in values.items():
            found = measured.get(group, {}).get(key)
            same = (found == value if isinstance(value, int) else
                    found is not None and abs(found - value) <= TOLERANCE)
            if not same:
                differences.append(f"{group} {key} {found} (recorded {value})")
    return differences
