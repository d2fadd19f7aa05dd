"""The LitServe API: the inference worker's side of the service.

Requests reach `predict` already decoded and validated by the HTTP side (serving/app.py), as a list
of (model name, C x H x W array). Decoding there, not in `decode_request`, is deliberate: LitServe
fails every request of a batch when one of them raises, and a bad upload must only fail itself.
"""
from collections import defaultdict
from pathlib import Path

import litserve as ls
import numpy as np

from serving.backends import BACKENDS

WARMUP_BATCH_SIZES = (1, 8)


class ClassifierAPI(ls.LitAPI):
    def __init__(self, models: dict[str, dict], backend: str, device: str, max_batch_size: int, batch_timeout: float):
        """`models`: name -> {"path": artifact file, "input": manifest input spec}."""
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.models = models
        self.backend_name = backend
        self.device_choice = device
        self.runners = {}

    def setup(self, device):
        """Load every model and run it once per warm-up size, so the first real request is not slow."""
        backend = BACKENDS[self.backend_name]
        for name, model in self.models.items():
            spec = model["input"]
            runner = backend(Path(model["path"]), self.device_choice, spec["name"])
            for size in WARMUP_BATCH_SIZES:
                runner(np.zeros([size] + spec["shape"][1:], dtype=spec["dtype"]))
            self.runners[name] = runner

    def decode_request(self, request: dict) -> list[tuple[str, np.ndarray]]:
        return request["items"]

    def batch(self, inputs: list) -> list:
        return inputs

    def predict(self, x):
        requests = x if self.max_batch_size > 1 else [x]
        outputs = self.run_grouped(requests)
        return outputs if self.max_batch_size > 1 else outputs[0]

    def run_grouped(self, requests: list[list[tuple[str, np.ndarray]]]) -> list[dict]:
        """One backend call per model for everything queued together; answers split back per request."""
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

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: dict) -> dict:
        return output
