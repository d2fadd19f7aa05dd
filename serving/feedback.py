"""Feedback in one HTTP process (with --prediction-log): the true labels told through POST /feedback,
recorded in the shared store (serving/feedback_store.py) by one thread of this process (its SQLite
connection's), off the event loop; counted, and written to the prediction log beside the prediction.
"""
import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

from serving.config import Config
from serving.errors import FeedbackConflict, PredictionNotFound, ServiceUnavailable, StartupError
from serving.feedback_store import AlreadyTold, FeedbackStore, UnknownPrediction
from serving.metrics import Metrics
from serving.prediction_log import PredictionLog

# A prediction reaches the store a moment after it is answered (the log's writer thread): feedback
# for an unknown ID looks again for this long before it is 404.
IN_TRANSIT_SECONDS = 2.0


def open_store(config: Config) -> FeedbackStore:
    """The prediction log's folder (made if missing) and its store; StartupError if unusable."""
    try:
        config.prediction_log.mkdir(parents=True, exist_ok=True)
        return FeedbackStore(config.prediction_log, config.feedback_days)
    except (OSError, sqlite3.Error) as err:
        raise StartupError(f"--prediction-log {config.prediction_log}: cannot keep the log there ({err})") from None


class Feedback:
    def __init__(self, config: Config, log: PredictionLog, metrics: Metrics):
        self.config, self.log, self.metrics = config, log, metrics
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback")
        self.store: FeedbackStore | None = None

    async def start(self) -> None:
        self.store = await self.in_thread(open_store, self.config)

    def stop(self) -> None:
        if self.store is not None:
            self.thread.submit(self.store.close)
        self.thread.shutdown(wait=True)

    async def in_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.thread, function, *args)

    async def tell(self, prediction_id: str, truth: int) -> tuple[str, str, int]:
        """Record a logged prediction's true label: (model, version, predicted label)."""
        try:
            model, version, label = await self.tell_once_stored(prediction_id, truth)
        except UnknownPrediction:
            raise PredictionNotFound(f"no logged prediction {prediction_id!r} within the last "
                                     f"{self.config.feedback_days:g} days") from None
        except AlreadyTold:
            raise FeedbackConflict(f"prediction {prediction_id!r} already has its true label") from None
        except sqlite3.Error as err:
            raise ServiceUnavailable(f"the feedback store cannot take it now ({err}); try again") from None
        self.metrics.feedback.labels(model, version, str(label == truth).lower()).inc()
        self.log.put({"type": "feedback", "at": time.time(), "id": prediction_id, "model": model, "version": version,
                      "label": label, "truth": truth})
        return model, version, label

    async def tell_once_stored(self, prediction_id: str, truth: int) -> tuple[str, str, int]:
        """The store's tell(), looking again for IN_TRANSIT_SECONDS where the ID is unknown."""
        deadline = time.monotonic() + IN_TRANSIT_SECONDS
        while True:
            try:
                return await self.in_thread(self.store.tell, prediction_id, truth)
            except UnknownPrediction:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def live_accuracy(self) -> dict[tuple[str, str], tuple[int, int]] | None:
        """(model, version) -> (answers told, right); None when the store cannot be read now."""
        try:
            return await self.in_thread(self.store.live_accuracy)
        except sqlite3.Error:
            return None
