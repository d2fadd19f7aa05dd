"""The LitServe API: the models and the one batched inference call.

`setup` loads every served model on its backend and warms it; `predict` takes a batch of requests,
each a list of (model name, C x H x W array) already decoded and validated by the HTTP side, makes
one backend call per model for everything in the batch, and splits the answers back per request.
Decoding happens on the HTTP side, not in `decode_request`: in LitServe an exception there fails
every request of the batch, and a bad upload must only fail itself.

Each HTTP process runs this API's `predict` behind its own dynamic batcher (serving/batcher.py).
LitServe also sets it up in the worker process it always starts, which receives no requests.
"""
import signal
from collections import defaultdict
from pathlib import Path

import litserve as ls
import numpy as np

from serving.backends import BACKENDS

WARMUP_BATCH_SIZES = (1, 8)


class ClassifierAPI(ls.LitAPI):
    def __init__(self, models: dict[str, dict], backend: str, device: str, max_batch_size: int):
        """`models`: name -> {"path": artifact file, "input": manifest input spec}."""
        super().__init__(max_batch_size=max_batch_size, api_path="/predict")
        self.models = models
        self.backend_name = backend
        self.device_choice = device
        self.runners = {}

    def setup(self, device):
        """Load every model and run it once per warm-up size, so the first real request is not slow.

        `device` is LitServe's; the backend follows --device (auto, cpu, cuda) on its own."""
        backend = BACKENDS[self.backend_name]
        for name, model in self.models.items():
            spec = model["input"]
            runner = backend(Path(model["path"]), self.device_choice, spec["name"])
            for size in WARMUP_BATCH_SIZES:
                runner(np.zeros([size] + spec["shape"][1:], dtype=spec["dtype"]))
            self.runners[name] = runner

    def predict(self, requests: list[list[tuple[str, np.ndarray]]]) -> list[dict]:
        """One backend call per model for everything batched together; answers split back per request."""
        by_model = defaultdict(list)  # name -> [(request index, item index, array)]
        for r, items in enumerate(requests):
            for i, (name, array) in enumerate(items):
                by_model[name].append((r, i, array))
        log_probs = [[None] * len(items) for items in requests]
        for name, entries in by_model.items():
            result = self.runners[name](np.stack([array for _, _, array in entries]))
            for (r, i, _), row in zip(entries, result):
                log_probs[r][i] = row
        shared = sum(len(items) for items in requests)
        return [{"log_probs": rows, "batch_size": shared} for rows in log_probs]


class LitServeWorkerAPI(ClassifierAPI):
    """The API in the worker process LitServe always starts, which receives no requests.

    That process is spawned, so it inherits none of the main process's signal handlers. Ctrl-C sends
    SIGINT to the whole process group; if this worker died of it first, LitServe's monitor would
    report a crash and race the main process's orderly shutdown. So it ignores SIGINT, and the main
    process stops it with SIGTERM once the HTTP side has drained."""

    def setup(self, device):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        super().setup(device)
