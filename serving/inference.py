"""The served models of one process: loaded, warmed, and run one backend call per model per batch.

Each HTTP process holds its own Classifier behind its own dynamic batcher (serving/batcher.py). The
batch is a list of requests, each a list of (model name, C x H x W array) already decoded and
validated on the HTTP side, so a bad upload fails alone.
"""
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.backends import BACKENDS, BackendError

WARMUP_BATCH_SIZES = (1, 8)


@dataclass
class BatchResult:
    log_probs: list[list[np.ndarray]]   # per request, per item: log-probabilities (10,)
    images: int                         # images in the batch, all models together
    seconds: dict[str, float]           # model -> time in its backend call


class Classifier:
    def __init__(self, models: dict[str, dict], backend: str, device: str):
        """`models`: name -> {"path": artifact file, "input": manifest input spec}."""
        self.models = models
        self.backend = BACKENDS[backend]
        self.device = device
        self.runners = {}

    def load(self, warm: bool = True) -> dict[str, str]:
        """Load every model and (`warm`) run it once per warm-up size, so the first real request is
        not slow. Returns the models that could not be loaded or run, with the reason; the others serve.

        Before LitServe forks the HTTP processes, load only: running a model starts the runtime's
        thread pool (OpenMP for torch), which a forked child cannot use (it hangs)."""
        failed = {}
        for name, model in self.models.items():
            spec = model["input"]
            try:
                runner = self.backend(Path(model["path"]), self.device, spec["name"])
                for size in WARMUP_BATCH_SIZES if warm else ():
                    runner(np.zeros([size] + spec["shape"][1:], dtype=spec["dtype"]))
            except BackendError as err:
                failed[name] = str(err)
                continue
            except Exception as err:  # a graph that loads but cannot run: many runtime error types
                failed[name] = f"{self.backend.name} cannot run {Path(model['path']).name}: {str(err).splitlines()[0]}"
                continue
            self.runners[name] = runner
        return failed

    def placement(self) -> dict[str, dict]:
        """Where each loaded model runs: {"device": "cuda" | "cpu", "provider": ...}."""
        return {name: {"device": runner.device, "provider": runner.provider} for name, runner in self.runners.items()}

    def predict(self, requests: list[list[tuple[str, np.ndarray]]]) -> BatchResult:
        """One backend call per model for everything batched together; answers split back per request."""
        by_model = defaultdict(list)  # name -> [(request index, item index, array)]
        for r, items in enumerate(requests):
            for i, (name, array) in enumerate(items):
                by_model[name].append((r, i, array))
        log_probs = [[None] * len(items) for items in requests]
        seconds = {}
        for name, entries in by_model.items():
            started = time.perf_counter()
            result = self.runners[name](np.stack([array for _, _, array in entries]))
            seconds[name] = time.perf_counter() - started
            for (r, i, _), row in zip(entries, result):
                log_probs[r][i] = row
        return BatchResult(log_probs, sum(len(items) for items in requests), seconds)
