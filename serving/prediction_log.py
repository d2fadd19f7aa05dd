"""The prediction log (opt-in, `--prediction-log DIR`): one JSON line per sampled prediction, and one
per label told through POST /feedback, so that the folder is a relabelled data set
(`python -m training feedback-data` reads it).

A prediction line holds its time, IDs, model and version, the input's sha256 and the shape the model
took, the answer (label, confidence, decision) and the request's latency; with `--log-inputs model`
the array the model took, with `--log-inputs upload` the upload's bytes too (base64). Never a header,
an API key, or anything the client named: file names are made here.

Requests never wait for the disk: lines go into a bounded queue, and when it is full (a slow or
stuck disk) they are dropped and counted (`digitserve_prediction_log_dropped_total{reason}`). One
thread per HTTP process writes what has come every FLUSH_SECONDS (woken for each line, it cost the
event loop a third of its throughput at 5,000 predictions/s: GIL hand-offs), a batch at a time: to `predictions-<host>-<pid>.jsonl`, rotated
by size (logging.handlers.RotatingFileHandler), and into the feedback store (serving/feedback_store.py).
A failed write (a full disk) drops that batch, counted, and the next batch tries again.
"""
import base64
import collections
import hashlib
import json
import logging
import logging.handlers
import os
import random
import socket
import threading
import time
from pathlib import Path

import numpy as np

from serving.feedback_store import FeedbackStore
from serving.metrics import Metrics

QUEUE_LINES = 10_000   # lines waiting for the writer; beyond, new ones are dropped
BATCH_LINES = 1_000    # lines written (and indexed) together, at most
FLUSH_SECONDS = 0.25   # the writer's pause between batches (POST /feedback waits longer for a line in transit)
PRUNE_SECONDS = 60.0   # how often the writer forgets predictions past the feedback window
log = logging.getLogger("digitserve")


class LogFile(logging.handlers.RotatingFileHandler):
    """The rotating file, written a batch at a time; a failure is the caller's to count, not printed."""

    def __init__(self, path: Path, max_bytes: int, backups: int):
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter("%(message)s"))

    def handleError(self, record):
        raise  # logging would print the error and go on: PredictionLog.attempt counts it instead


class PredictionLog:
    def __init__(self, folder: Path, sample: float, inputs: str, max_bytes: int, backups: int, days: float,
                 metrics: Metrics):
        self.folder, self.sample, self.inputs, self.days, self.metrics = folder, sample, inputs, days, metrics
        self.max_bytes, self.backups = max_bytes, backups
        self.lines: collections.deque = collections.deque()  # appended by the event loop, taken by the writer
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.store: FeedbackStore | None = None  # the writer thread's connection
        self.warned_at = -60.0

    def sampled(self) -> bool:
        return self.sample >= 1.0 or random.random() < self.sample

    def record(self, request_id: str, answers: list[dict], uploads: list[bytes | None], arrays: list[np.ndarray],
               started: float) -> None:
        """The sampled predictions of one answered request. `uploads`: each input's bytes (None for a pixel
        array: its sha256 is then the array's the model took); `arrays`: what the model took."""
        at, latency = time.time(), round((time.perf_counter() - started) * 1000, 3)
        for answer, upload, array in zip(answers, uploads, arrays):
            if not self.sampled():
                continue
            line = {"type": "prediction", "at": at, "id": answer["id"], "request_id": request_id,
                    "model": answer["model"], "version": answer["version"],
                    "input_sha256": hashlib.sha256(array.tobytes() if upload is None else upload).hexdigest(),
                    "input_shape": list(array.shape), "label": answer["label"], "confidence": answer["confidence"],
                    "decision": answer["decision"], "latency_ms": latency}
            if self.inputs != "none":
                line["model_input"] = array.tolist()
            if self.inputs == "upload" and upload is not None:
                line["upload"] = base64.b64encode(upload).decode("ascii")
            self.put(line)

    def put(self, line: dict) -> None:
        """Never waits: a full queue drops the line, counted."""
        if len(self.lines) >= QUEUE_LINES:
            self.metrics.log_dropped.labels("queue_full").inc()
        else:
            self.lines.append(line)

    # --- the writer thread, one per HTTP process ---

    def start(self) -> None:
        self.stopping.clear()
        self.thread = threading.Thread(target=self.run, name="prediction-log", daemon=True)
        self.thread.start()

    def stop(self, seconds: float = 2.0) -> None:
        """Write what is queued (for at most `seconds`), then end the thread."""
        if self.thread is not None:
            self.stopping.set()
            self.thread.join(seconds)

    def run(self) -> None:
        path = self.folder / f"predictions-{socket.gethostname()}-{os.getpid()}.jsonl"
        file, self.store = LogFile(path, self.max_bytes, self.backups), None
        pruned_at = time.monotonic()
        try:
            while True:
                ending = self.stopping.wait(FLUSH_SECONDS)
                waiting = len(self.lines)  # what has come by now: lines arriving meanwhile wait for the next pass
                while waiting:
                    batch = [self.lines.popleft() for _ in range(min(BATCH_LINES, waiting))]
                    waiting -= len(batch)
                    self.write(file, batch)
                if self.store is not None and time.monotonic() - pruned_at > PRUNE_SECONDS:
                    pruned_at = time.monotonic()
                    self.attempt(self.store.prune, "prune")
                if ending:
                    return
        finally:
            file.close()
            if self.store is not None:
                self.store.close()

    def write(self, file: LogFile, lines: list[dict]) -> None:
        if not lines:
            return
        text = "\n".join(json.dumps(line, separators=(",", ":")) for line in lines)
        if self.attempt(lambda: file.emit(logging.makeLogRecord({"msg": text})), "write", len(lines)):
            rows = [(line["id"], line["at"], line["model"], line["version"], line["label"])
                    for line in lines if line["type"] == "prediction"]
            if rows and (self.store is not None or self.attempt(self.open_store, "index", len(rows))):
                self.attempt(lambda: self.store.add(rows), "index", len(rows))

    def open_store(self) -> None:
        self.store = FeedbackStore(self.folder, self.days)  # made on first use: a failure is retried

    def attempt(self, action, what: str, lines: int = 0) -> bool:
        """Run one write; a failure (a full disk, a locked or broken store) drops its lines, counted,
        and is logged at most once a minute, never ending the thread."""
        try:
            action()
            return True
        except Exception as err:  # OSError, sqlite3.Error, ...: the next batch tries again
            self.metrics.log_dropped.labels(f"{what}_failed").inc(lines)
            if time.monotonic() - self.warned_at > 60:
                self.warned_at = time.monotonic()
                log.warning("prediction log: %s failed in %s (%s)%s", what, self.folder, err,
                            f": {lines} lines dropped" if lines else "")
            return False
