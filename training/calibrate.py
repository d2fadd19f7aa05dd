"""How far to trust an answer, fitted on validation data only: the "not a digit" detector baked into
the exported graph, the temperature, the abstention threshold and the conformal quantile
(export_contract/calibration.py applies and measures them).

- Not a digit: the exported graph also returns the Mahalanobis distance of the model's penultimate
  features (the input of its last linear layer) to the nearest class mean, with one covariance
  shared by the classes (Lee et al. 2018), Ledoit-Wolf shrunk, all fitted on the training split. On
  the committed digits models and the project's own non-digit pictures it separated them far better
  than the top probability on the validation split (AUROC 0.98-0.99 against 0.90-0.94); for a model
  trained with outlier exposure the calibrated confidence does better (0.999). `detector` picks,
  per model, the rule that does better on validation, and its threshold: among those that keep at
  least DIGITS_KEPT of the validation digits, the one that best separates them from the non-digit
  validation pictures (Youden's J).
- Calibration set: the validation split, plus COPIES copies of it under the recipe's own training
  augmentation where the recipe augments. The digits' 350 validation images hold 0-3 errors for the
  improved models: too few to fit a temperature (the NLL falls without end as T -> 0) or to choose a
  threshold; warped copies stand for the writers the validation split lacks.
- Temperature: the T minimising the calibration set's NLL of softmax(log_probs / T), in 1/8..8.
- Unsure below: the lowest confidence at which the answered share of the calibration set keeps
  SELECTIVE_ACCURACY accuracy.
- Conformal: split-conformal prediction with the LAC score 1 - p(true digit), the finite-sample
  quantile at level LEVEL.
"""
import math

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from sklearn.covariance import LedoitWolf
from torch import nn

from export_contract import calibration
from training import augment

DIGITS_KEPT = 0.99  # of the validation digits: at most 1 in 100 real digits called "not a digit"
SELECTIVE_ACCURACY = 0.995
LEVEL = 0.99
COPIES = 20


class ScoredModel(nn.Module):
    """The model, returning its log-probabilities and the Mahalanobis distance of its penultimate
    features to the nearest class mean: (f - mu_c)^T P (f - mu_c) = |f W - mu_c W|^2 with P = W W^T."""

    def __init__(self, model: nn.Sequential, means: np.ndarray, whitening: np.ndarray):
        super().__init__()
        last = max(i for i, layer in enumerate(model) if isinstance(layer, nn.Linear))
        self.trunk, self.head = model[:last], model[last:]
        self.register_buffer("whitening", torch.as_tensor(whitening, dtype=torch.float32))
        self.register_buffer("means", torch.as_tensor(means @ whitening, dtype=torch.float32))

    def forward(self, x):
        features = self.trunk(x)
        white = features.float() @ self.whitening
        distances = (white.unsqueeze(1) - self.means.unsqueeze(0)).pow(2).sum(dim=2)
        return self.head(features), distances.min(dim=1).values


@torch.no_grad()
def with_detector(model: nn.Sequential, train_x: torch.Tensor, train_y: torch.Tensor,
                  batch_size: int = 1024) -> ScoredModel:
    """The model with its "not a digit" score, fitted on the training split's features."""
    model = model.cpu().eval()
    last = max(i for i, layer in enumerate(model) if isinstance(layer, nn.Linear))
    features = torch.cat([model[:last](train_x[i:i + batch_size].cpu()) for i in range(0, len(train_x), batch_size)])
    features, labels = features.double().numpy(), train_y.cpu().numpy()
    means = np.stack([features[labels == c].mean(axis=0) for c in range(10)])
    precision = LedoitWolf().fit(features - means[labels]).precision_
    whitening = np.linalg.cholesky((precision + precision.T) / 2)
    return ScoredModel(model, means, whitening).eval()


def calibration_set(val_x: torch.Tensor, val_y: torch.Tensor, recipe, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split and, where the recipe augments, COPIES augmented copies of it."""
    if not (recipe.rotate_degrees or recipe.zoom or recipe.shift):
        return val_x, val_y
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the same copies whatever ran before
    copies = val_x.repeat(COPIES, *[1] * (val_x.dim() - 1)).float()
    if recipe.rotate_degrees or recipe.zoom:
        copies = augment.random_affine(copies, recipe.rotate_degrees, recipe.zoom, recipe.shift)
    else:
        copies = augment.random_translate(copies, int(recipe.shift), recipe.pad_mode)
    torch.random.set_rng_state(generator_state)
    return torch.cat([val_x, copies.to(val_x.dtype)]), val_y.repeat(COPIES + 1)


def fit(log_probs: np.ndarray, labels: np.ndarray, val: tuple[np.ndarray, np.ndarray],
        nondigits: tuple[np.ndarray, np.ndarray] | None, calibrated_on: str) -> dict:
    """The calibration record (without its figures): temperature, abstention and conformal quantile
    from the calibration set's log-probabilities and labels; the "not a digit" rule from the
    validation split's own digits and the non-digit validation pictures, (log-probabilities, scores)
    each (the augmented copies are left out there: a detector is for real digits)."""
    labels = np.asarray(labels)

    def nll(log_t: float) -> float:
        probs = calibration.probabilities(log_probs, math.exp(log_t))
        return float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-300)).mean())
    temperature = math.exp(minimize_scalar(nll, bounds=(math.log(1 / 8), math.log(8)), method="bounded").x)
    probs = calibration.probabilities(log_probs, temperature)
    confidence, right = probs.max(axis=1), probs.argmax(axis=1) == labels
    order = np.argsort(-confidence, kind="stable")
    accuracy = np.cumsum(right[order]) / np.arange(1, len(order) + 1)
    keeps = np.flatnonzero(accuracy >= SELECTIVE_ACCURACY)
    unsure_below = float(confidence[order][keeps.max()]) if len(keeps) else 1.0
    lac = np.sort(1 - probs[np.arange(len(labels)), labels])
    rank = min(len(lac), math.ceil((len(lac) + 1) * LEVEL))
    return {"temperature": temperature, "calibrated_on": calibrated_on,
            "confidence": {"unsure_below": unsure_below, "target_selective_accuracy": SELECTIVE_ACCURACY},
            "not_a_digit": detector(val, nondigits, temperature),
            "conformal": {"level": LEVEL, "quantile": float(lac[rank - 1])}}


def detector(val: tuple[np.ndarray, np.ndarray], nondigits: tuple[np.ndarray, np.ndarray] | None,
             temperature: float) -> dict:
    """The "not a digit" rule that separates the validation digits from the non-digit validation
    pictures best (Youden's J) while keeping DIGITS_KEPT of the digits: a Mahalanobis score above a
    threshold, or a calibrated confidence below one. A model trained with outlier exposure learnt to
    answer non-digits with near-uniform probabilities, and its confidence separates them best; the
    others' features do. Without non-digit pictures (no resize=true reading for this input), the
    score alone."""
    def flagged_by(digits: np.ndarray, others: np.ndarray, method: str) -> dict:
        cut = threshold(digits, others)
        return {"method": method, "cut": cut, "digits": float(np.mean(digits > cut)),
                "nondigits": float(np.mean(others > cut)) if len(others) else 0.0}
    confidence = [1 - calibration.probabilities(lp, temperature).max(axis=1) for lp, _ in (val, nondigits or val)]
    rules = [flagged_by(val[1], nondigits[1] if nondigits else np.empty(0), "mahalanobis")]
    if nondigits is not None:
        rules.append(flagged_by(confidence[0], confidence[1], "confidence"))
    best = max(rules, key=lambda rule: rule["nondigits"] - rule["digits"])
    kept = {"digits_kept_target": DIGITS_KEPT, "validation": {"digits_flagged": best["digits"],
                                                              "nondigits_flagged": best["nondigits"]}}
    if best["method"] == "mahalanobis":
        return {"method": "mahalanobis", "above": best["cut"], **kept}
    return {"method": "confidence", "below": 1 - best["cut"], **kept}


def threshold(digit_scores: np.ndarray, nondigit_scores: np.ndarray) -> float:
    """The score above which a picture is "not a digit": Youden's J (non-digits flagged minus digits
    flagged) at its best among thresholds that keep DIGITS_KEPT of the digits."""
    digit_scores, nondigit_scores = np.sort(digit_scores), np.asarray(nondigit_scores)
    lowest = digit_scores[min(len(digit_scores) - 1, math.ceil(DIGITS_KEPT * len(digit_scores)) - 1)]
    if not len(nondigit_scores):  # no non-digit pictures for this input (resize=true reads none)
        return float(lowest)
    candidates = np.unique(np.concatenate([digit_scores[digit_scores >= lowest], nondigit_scores[nondigit_scores >= lowest]]))
    j = [(nondigit_scores > t).mean() - (digit_scores > t).mean() for t in candidates]
    return float(candidates[int(np.argmax(j))])


def reliability_diagram(path, log_probs: np.ndarray, labels: np.ndarray, temperature: float, title: str) -> None:
    """Confidence against accuracy on the test split, before (T = 1) and after calibration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bins = np.linspace(0, 1, calibration.ECE_BINS + 1)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], linestyle="dashed", color="grey", label="perfectly calibrated")
    for stage, t, colour in (("before", 1.0, "tab:red"), ("after", temperature, "tab:blue")):
        probs = calibration.probabilities(log_probs, t)
        confidence, right = probs.max(axis=1), probs.argmax(axis=1) == labels
        which = np.clip(np.ceil(confidence * calibration.ECE_BINS).astype(int) - 1, 0, calibration.ECE_BINS - 1)
        points = [(confidence[which == b].mean(), right[which == b].mean()) for b in range(calibration.ECE_BINS)
                  if (which == b).any()]
        ece = calibration.ece(probs, labels)
        ax.plot(*zip(*points), marker="o", color=colour, label=f"{stage} (T={t:.2f}, ECE {ece:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(bins[0], bins[-1])
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
