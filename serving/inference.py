"""Served model versions and the batched call over them.

A ServedModel is one version of one model, loaded (and warmed) in this process. A request is routed
to ServedModel objects once, when it is parsed, and keeps them until it is answered: a reload
(serving/lifecycle.py) changes which version new requests get, never the one a request holds.
The batch is a list of requests, each a list of (ServedModel, C x H x W array) already decoded and
validated on the HTTP side, so a bad upload fails alone.
"""
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from export_contract import calibration
from serving import answers
from serving.backends import BACKENDS, BackendError
from serving.registry import ModelEntry

WARMUP_BATCH_SIZES = (1, 8)
EVALUATION_BATCH = 256


class LoadError(Exception):
    """The artifact cannot be loaded or run by the backend; the message says why."""


@dataclass(eq=False)
class ServedModel:
    """Everything a version serves is held here, as read and checked: its folder may be replaced by the
    next version (or a rejected one) while this one still answers."""
    entry: ModelEntry              # name, manifest
    runner: object                 # a backends.BACKENDS instance: batch in, log-probabilities (and scores) out
    verified: dict                 # {"reproduced": True, errors, nll, n} or {"reproduced": None, "reason": ...}
    files: dict[str, bytes]        # "curves" (curves.png) and, if calibrated, "reliability" (its diagram)
    test_split: tuple[np.ndarray, np.ndarray] | None  # the embedded one (none: read from --data-dir)
    nondigits: np.ndarray | None = None  # the non-digit test pictures its calibration record was measured on

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def manifest(self) -> dict:
        return self.entry.manifest

    @property
    def version(self) -> str:
        return self.entry.manifest["version"]

    @property
    def calibration(self) -> dict:
        """The manifest's calibration record, or what an export made before it existed is answered with."""
        return self.entry.manifest.get("calibration", calibration.UNCALIBRATED)


def load_runner(entry: ModelEntry, backend: str, device: str, warm: bool = True):
    """The backend's runner for `entry`'s artifact, run once per warm-up size (`warm`) so the first real
    request is not slow. Raises LoadError.

    Before LitServe forks the HTTP processes, load only: running a model starts the runtime's thread
    pool (OpenMP for torch), which a forked child cannot use (it hangs)."""
    spec, artifact = entry.manifest["input"], entry.manifest["artifacts"][backend]
    try:
        runner = BACKENDS[backend](entry.content(artifact), artifact["file"], device, spec["name"])
        for size in WARMUP_BATCH_SIZES if warm else ():
            runner(np.zeros([size] + spec["shape"][1:], dtype=spec["dtype"]))
    except BackendError as err:
        raise LoadError(str(err)) from None
    except Exception as err:  # a graph that loads but cannot run: many runtime error types
        raise LoadError(f"{BACKENDS[backend].name} cannot run {artifact['file']}: {str(err).splitlines()[0]}") from None
    return runner


def run_all(runner, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Log-probabilities (and scores, or None) of a whole split, in backend calls of EVALUATION_BATCH images."""
    parts = [runner(x[i:i + EVALUATION_BATCH]) for i in range(0, len(x), EVALUATION_BATCH)]
    scores = None if parts[0][1] is None else np.concatenate([score for _, score in parts])
    return np.concatenate([log_probs for log_probs, _ in parts]), scores


@dataclass
class BatchResult:
    outputs: list[list[answers.Scored]]  # per request, per item
    images: int                  # images in the batch, all models together
    seconds: dict[str, float]    # model name -> time in its backend call


def predict(requests: list[list[tuple[ServedModel, np.ndarray]]]) -> BatchResult:
    """One backend call per model version for everything batched together; answers split back per request."""
    by_model = defaultdict(list)  # ServedModel -> [(request index, item index, array)]
    for r, items in enumerate(requests):
        for i, (model, array) in enumerate(items):
            by_model[model].append((r, i, array))
    outputs = [[None] * len(items) for items in requests]
    seconds = {}
    for model, entries in by_model.items():
        started = time.perf_counter()
        inputs = np.stack([array for _, _, array in entries])
        log_probs, scores = model.runner(inputs)
        seconds[model.name] = seconds.get(model.name, 0.0) + time.perf_counter() - started
        for (r, i, _), item in zip(entries, answers.scored(model, inputs, log_probs, scores)):
            outputs[r][i] = item
    return BatchResult(outputs, sum(len(items) for items in requests), seconds)
