"""Calibrated answers, unit by unit: the arithmetic both sides share (export_contract/calibration.py)
and how training fits a record on validation data (training/calibrate.py), on made-up outputs whose
right answers are known."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from export_contract import calibration
from training import calibrate
from training.recipes import Recipe

RECORD = {"temperature": 2.0, "confidence": {"unsure_below": 0.8}, "not_a_digit": {"method": "mahalanobis", "above": 10.0},
          "conformal": {"level": 0.9, "quantile": 0.75}}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def test_probabilities_are_the_softmax_of_log_probabilities_over_the_temperature():
    logits = np.array([[2.0, 1.0, 0.0, *[-5.0] * 7]])
    probs = calibration.probabilities(log_softmax(logits), 2.0)
    assert np.allclose(probs, np.exp(logits / 2) / np.exp(logits / 2).sum())
    assert np.allclose(calibration.probabilities(log_softmax(logits), 1.0).sum(), 1)


def test_decisions_a_score_over_the_threshold_wins_over_the_confidence():
    probs = np.array([[0.95, 0.05, *[0] * 8], [0.6, 0.4, *[0] * 8], [0.99, 0.01, *[0] * 8]])
    decided = calibration.decisions(probs, np.array([1.0, 1.0, 11.0]), RECORD)
    assert [calibration.DECISIONS[d] for d in decided] == ["digit", "unsure", "not_a_digit"]
    assert calibration.decisions(probs, np.array([1.0, 1.0, 11.0]), RECORD, unsure_below=0.5)[1] == 0
    assert calibration.decisions(probs, None, RECORD)[2] == 0  # an artifact without a score: never not_a_digit


def test_candidates_are_the_digits_over_one_minus_the_quantile_most_likely_first():
    probs = np.array([[0.1, 0.6, 0.3, *[0] * 7], [0.05, 0.9, 0.05, *[0] * 7]])
    assert calibration.candidates(probs, RECORD) == [[1, 2], [1]]  # at least 1 - 0.75
    uncalibrated = {"conformal": {"level": 0.95}}  # no quantile: the top digits summing to the level
    assert calibration.candidates(probs, uncalibrated) == [[1, 2, 0], [1, 0]]


def test_ece_of_answers_as_sure_as_they_are_right_is_zero_and_of_overconfident_ones_is_the_gap():
    probs = np.zeros((4, 10))
    probs[:, 0] = 0.75
    probs[:, 1] = 0.25
    assert calibration.ece(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    assert calibration.ece(probs, np.array([0, 0, 1, 1])) == pytest.approx(0.25)


def test_figures_count_what_they_can_and_reproduces_names_each_difference():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    log_probs = log_softmax(rng.normal(0, 1, (200, 10)) + 4 * np.eye(10)[labels])
    figures = calibration.figures(log_probs, np.zeros(200), labels, RECORD, log_probs[:20], np.full(20, 20.0))
    assert figures["selective"]["n"] == figures["conformal"]["n"] == 200
    assert figures["nondigits"] == {"n": 20, "not_answered": 20, "not_a_digit": 20}
    assert calibration.reproduces(figures, figures) == []
    altered = {**figures, "selective": {**figures["selective"], "answered": figures["selective"]["answered"] + 1}}
    (difference,) = calibration.reproduces(figures, altered)
    assert difference.startswith("selective answered")


def overconfident(n: int, seed: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(logits / temperature) while the model says softmax(logits)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, 10))
    true = np.exp(logits / temperature) / np.exp(logits / temperature).sum(1, keepdims=True)
    labels = np.array([rng.choice(10, p=p) for p in true])
    return log_softmax(logits), labels


def test_the_fitted_temperature_recovers_how_overconfident_the_model_is():
    log_probs, labels = overconfident(4000, 0, temperature=2.0)
    record = calibrate.fit(log_probs, labels, (log_probs, np.zeros(4000)), None, "made up")
    assert record["temperature"] == pytest.approx(2.0, rel=0.1)


def test_the_unsure_threshold_keeps_the_answered_share_at_the_target_accuracy():
    log_probs, labels = overconfident(4000, 1, temperature=1.0)
    record = calibrate.fit(log_probs, labels, (log_probs, np.zeros(4000)), None, "made up")
    probs = calibration.probabilities(log_probs, record["temperature"])
    answered = probs.max(1) >= record["confidence"]["unsure_below"]
    assert np.mean(probs.argmax(1)[answered] == labels[answered]) >= calibrate.SELECTIVE_ACCURACY
    lac = np.sort(1 - probs[np.arange(4000), labels])  # the conformal quantile's finite-sample rank
    assert record["conformal"]["quantile"] == lac[math.ceil(4001 * calibrate.LEVEL) - 1]


def test_the_not_a_digit_threshold_keeps_the_digits_it_must_and_separates_what_it_can():
    digits, nondigits = np.arange(100.0), np.arange(50.0, 200.0)
    threshold = calibrate.threshold(digits, nondigits)
    assert np.mean(digits <= threshold) >= calibrate.DIGITS_KEPT
    assert threshold == 99.0  # Youden's J: 0.667 there (no digit flagged), 0.663 at the lowest allowed, 98
    assert calibrate.threshold(digits, np.zeros(0)) == 98.0  # no non-digit pictures: the digits kept decide


def test_the_rule_that_separates_the_validation_pictures_better_is_the_one_recorded():
    """A model taught non-digits towards uniform probabilities (outlier exposure): its confidence tells
    them apart; a model that was not: its features' distance does."""
    rng = np.random.default_rng(0)
    sure = log_softmax(np.where(np.eye(10)[rng.integers(0, 10, 300)] > 0, 8.0, 0.0))
    flat = log_softmax(rng.normal(0, 0.1, (300, 10)))
    by_confidence = calibrate.detector((sure, rng.normal(5, 1, 300)), (flat, rng.normal(5, 1, 300)), 1.0)
    assert by_confidence["method"] == "confidence" and by_confidence["validation"]["nondigits_flagged"] == 1.0
    by_score = calibrate.detector((sure, rng.normal(5, 1, 300)), (sure, rng.normal(50, 1, 300)), 1.0)
    assert by_score["method"] == "mahalanobis" and by_score["validation"]["digits_flagged"] <= 1 - calibrate.DIGITS_KEPT
    decided = calibration.decisions(calibration.probabilities(flat, 1.0), None, {**RECORD, "not_a_digit": by_confidence})
    assert set(decided) == {2}


def test_the_detector_is_the_distance_to_the_nearest_class_of_the_training_features():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Linear(3, 10), nn.LogSoftmax(1))
    x = torch.randn(400, 1, 2, 2)
    y = torch.randint(0, 10, (400,))
    scored = calibrate.with_detector(model, x, y)
    log_probs, scores = scored(x[:5])
    assert torch.allclose(log_probs, model(x[:5]))
    far = scored(x[:5] * 1000)[1]
    assert (scores >= 0).all() and (far > scores.max() * 100).all()


def test_the_calibration_set_adds_augmented_copies_only_for_a_recipe_that_augments():
    x, y = torch.rand(10, 1, 8, 8) * 16, torch.arange(10)
    assert calibrate.calibration_set(x, y, Recipe())[0] is x
    cal_x, cal_y = calibrate.calibration_set(x, y, Recipe(rotate_degrees=10.0, zoom=0.1, shift=1.0))
    assert len(cal_x) == len(cal_y) == 10 * (calibrate.COPIES + 1) and torch.equal(cal_x[:10], x)
    assert torch.equal(cal_y[10:20], y)
