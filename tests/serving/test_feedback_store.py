"""The feedback store alone (serving/feedback_store.py): the feedback window, for telling and for live accuracy."""
import time

import pytest

from serving.feedback_store import FeedbackStore, UnknownPrediction


def test_live_accuracy_counts_only_predictions_inside_the_feedback_window(tmp_path):
    store = FeedbackStore(tmp_path, days=1)
    now = time.time()
    store.add([("new", now, "m", "v1", 3), ("old", now - 3600, "m", "v1", 5)])
    store.tell("new", 3)
    store.tell("old", 4)
    assert store.live_accuracy() == {("m", "v1"): (2, 1)}
    store.days = 0.5 / 24  # the window shrinks to 30 minutes: "old" is past it, before any prune removes it
    assert store.live_accuracy() == {("m", "v1"): (1, 1)}
    with pytest.raises(UnknownPrediction):
        store.tell("old", 5)
    store.close()
