"""What every route shares: the checked exports, routing by image size, the API key, and this
process's models, batcher and metrics.

One Service is built in the main process (exports checked, every model test-loaded on the CPU, so a
broken one is unavailable before anything forks); each HTTP process then loads its own copy of the
models and starts its batcher in `start()`, run by the routes' lifespan.
"""
import asyncio
import hmac
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
from prometheus_client import multiprocess

from serving import images, registry, test_data
from serving.backends import BACKENDS, BackendError
from serving.batcher import DynamicBatcher
from serving.config import Config
from serving.errors import InputError, ModelNotFound, ModelUnavailable, Overloaded, Unauthorized
from serving.inference import Classifier
from serving.metrics import Metrics, multiprocess_dir

log = logging.getLogger("digitserve")

MAX_IMAGES_PER_REQUEST = 256
# All uploads of one request together, counted from their headers before any is decoded: one
# photo at the per-image limit, or many small ones, but never 31 of 4096 x 4096.
MAX_REQUEST_PIXELS = images.MAX_DECLARED_PIXELS
# Up to this much a request is decoded on the event loop: a few 8x8 or 32x32 images take
# microseconds, less than handing them to a thread and back.
INLINE_PIXELS = 64 * 64
INLINE_ARRAYS = 4


def decoder_threads() -> int:
    """The cores this process may use (a container's CPU set, not the host's), at most 4: each of the
    largest decodes holds about 100 MB while it runs."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


class StartupError(Exception):
    """The server cannot start: no usable model, a bad exports folder, a device it cannot use."""


class Service:
    def __init__(self, config: Config):
        self.config = config
        try:
            self.device = BACKENDS[config.backend].resolve(config.device)
            self.entries = {e.name: e for e in registry.scan(config.exports, config.backend)}
        except (BackendError, registry.ExportsError) as err:
            raise StartupError(str(err)) from None
        if config.data_dir is not None and (problem := test_data.mat_reader_problem()):
            raise StartupError(problem)
        # Every model loads here (on the CPU, without running) before anything forks: one that
        # cannot is unavailable with its reason, and the others still serve.
        self.mark_unavailable(Classifier(self.artifacts(), config.backend, "cpu").load(warm=False))
        if not self.ready_models:
            reasons = "; ".join(f"{name}: {e.error}" for name, e in self.entries.items()) or "the folder is empty"
            raise StartupError(f"no usable model in {config.exports} ({reasons})")
        # One input spec per image shape: 8x8 grayscale -> digits models, 32x32 RGB -> SVHN models.
        self.task_specs, self.defaults = {}, {}  # task -> input spec; task -> default model name
        for name, entry in self.ready_models.items():
            task = entry.manifest["task"]
            self.task_specs.setdefault(task, entry.manifest["input"])
            if task not in self.defaults or name == f"{task}-cnn":
                self.defaults[task] = name
        self.accepted_sizes = [images.spec_size(spec) for spec in self.task_specs.values()]
        self.metrics = Metrics(models=self.entries)
        self.classifier: Classifier | None = None
        self.batcher: DynamicBatcher | None = None
        self.decoders: ThreadPoolExecutor | None = None
        self.in_progress = 0  # inference requests this process has admitted and not yet answered

    @property
    def ready_models(self) -> dict[str, registry.ModelEntry]:
        return {name: e for name, e in self.entries.items() if e.available}

    def artifacts(self) -> dict[str, dict]:
        return {name: {"path": str(e.artifact_path(self.config.backend)), "input": e.manifest["input"]}
                for name, e in self.ready_models.items()}

    def mark_unavailable(self, reasons: dict[str, str]) -> None:
        for name, reason in reasons.items():
            self.entries[name].error = reason

    # --- life in one HTTP process ---

    def start(self) -> None:
        """Load and warm this process's models on their device, then batch (before it accepts connections)."""
        self.classifier = Classifier(self.artifacts(), self.config.backend, self.device)
        failed = self.classifier.load()
        for name, reason in failed.items():
            log.error("model %s unavailable in process %d: %s", name, os.getpid(), reason)
        self.mark_unavailable(failed)
        placement = self.classifier.placement()
        for name, entry in self.entries.items():
            where = placement.get(name, {"device": "", "provider": ""})
            version = entry.manifest["version"] if entry.manifest else ""
            self.metrics.model_info.labels(name, version, "ready" if name in placement else "unavailable",
                                           where["device"], where["provider"]).set(1)
        self.decoders = ThreadPoolExecutor(max_workers=decoder_threads(), thread_name_prefix="decode")
        self.batcher = DynamicBatcher(self.classifier, self.metrics, self.config.max_batch_size,
                                      self.config.batch_timeout)
        self.batcher.start()

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        if self.decoders is not None:
            self.decoders.shutdown(wait=False, cancel_futures=True)
        if multiprocess_dir():
            multiprocess.mark_process_dead(os.getpid())  # its live gauges (queue depth) leave the totals

    @property
    def ready(self) -> bool:
        """This process's models are warm and its batcher is running."""
        return self.batcher is not None and self.batcher.ready

    def status(self, name: str) -> str:
        if not self.entries[name].available:
            return "unavailable"
        return "ready" if self.ready else "loading"

    def placement(self, name: str) -> dict:
        where = self.classifier.placement().get(name) if self.classifier else None
        return where or {"device": self.device, "provider": None}

    # --- requests ---

    def check_key(self, headers) -> None:
        if self.config.api_key is None:
            return
        supplied = headers.get("x-api-key")
        authorization = headers.get("authorization", "")
        if supplied is None and authorization.lower().startswith("bearer "):
            supplied = authorization[7:]
        if supplied is None or not hmac.compare_digest(supplied.encode(), self.config.api_key.encode()):
            raise Unauthorized("missing or wrong API key (X-API-Key header or Authorization: Bearer)")

    def model(self, name: str) -> registry.ModelEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise ModelNotFound(f"unknown model {name!r}; known: {', '.join(sorted(self.entries))}")
        if not entry.available:
            raise ModelUnavailable(f"model {name!r} is unavailable: {entry.error}")
        return entry

    def default_model(self, task: str) -> registry.ModelEntry:
        if task not in self.defaults:
            raise InputError(f"no {task} model is served for this image size", 422)
        return self.model(self.defaults[task])  # 503 if it failed to load in this process

    @asynccontextmanager
    async def admitted(self):
        """At most --max-queue inference requests in progress in this process; the others are refused
        at once (503, Retry-After) instead of waiting behind them. With more clients than the machine
        can serve, latency otherwise grows with their number (p99 1.5 s at 512 connections on 2 cores).
        Entered once the request's body has arrived, so that slow uploads hold no place."""
        if self.in_progress >= self.config.max_queue:
            self.metrics.shed.inc()
            raise Overloaded(f"the server is at capacity ({self.config.max_queue} requests in progress in this "
                             f"process); retry in {Overloaded.retry_after} s")
        self.in_progress += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.in_progress -= 1
            self.metrics.in_flight.dec()

    async def prepare(self, inputs: list[tuple[str, str, object]], model: str | None, invert: bool | None,
                      resize: bool) -> list[tuple[str, np.ndarray]]:
        """Every input of one request -> (model name, model-ready array).

        `invert`: the image is dark ink on light (None: resize=true detects it, exact sizes take it as no).

        Headers are read here (cheap) and the request's pixels counted before anything is decoded.
        Small requests are decoded on the event loop (a thread hand-off would cost more than the
        decoding); larger ones in the decoder threads, so the loop keeps answering meanwhile."""
        if not inputs:
            raise InputError("no image: upload files, or send images[] or pixels[] as JSON", 422)
        if len(inputs) > MAX_IMAGES_PER_REQUEST:
            raise InputError(f"{len(inputs)} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}", 413)
        if model is not None:
            self.model(model)
        opened = [(kind, images.open_image(value) if kind == "bytes" else value) for _, kind, value in inputs]
        pixels = sum(value.size[0] * value.size[1] for kind, value in opened if kind == "bytes")
        if pixels > MAX_REQUEST_PIXELS:
            raise InputError(f"the images of this request declare {pixels} pixels in all (limit "
                             f"{MAX_REQUEST_PIXELS})", 413)
        arrays = sum(1 for kind, _ in opened if kind == "pixels")
        if pixels <= INLINE_PIXELS and arrays <= INLINE_ARRAYS:
            return self.decode_all(opened, model, invert, resize)
        return await asyncio.get_running_loop().run_in_executor(self.decoders, self.decode_all, opened, model,
                                                                invert, resize)

    def decode_all(self, opened, model, invert, resize) -> list[tuple[str, np.ndarray]]:
        return [self.prepare_image(value, model, invert, resize) if kind == "bytes" else
                self.prepare_pixels(value, model, invert) for kind, value in opened]

    def prepare_image(self, image, model: str | None, invert: bool | None, resize: bool) -> tuple[str, np.ndarray]:
        entry = self.model(model) if model is not None else self.route_by_size(image, resize)  # 422 before decoding
        image = images.decode(image)
        if model is None and self.grey_photo_for_svhn(entry, image):
            entry = self.default_model("digits")  # a scan or a drawing saved as RGB (JPEG, a canvas PNG)
        spec = entry.manifest["input"]
        pixels = images.to_gray_or_rgb(image, spec["color"])
        if pixels.shape[:2] == images.spec_size(spec):
            return entry.name, images.model_input(pixels, spec, bool(invert))
        if not resize:
            raise images.size_error(pixels.shape[1], pixels.shape[0], self.accepted_sizes)
        return entry.name, images.fitted_input(pixels, spec, invert)

    def prepare_pixels(self, value, model: str | None, invert: bool | None) -> tuple[str, np.ndarray]:
        task, array = images.pixels_array(value, self.task_specs, bool(invert))
        entry = self.model(model) if model else self.default_model(task)
        if entry.manifest["task"] != task:
            raise InputError(f"model {entry.name!r} takes {entry.manifest['task']} inputs, not {task}", 422)
        return entry.name, array

    def route_by_size(self, image, resize: bool) -> registry.ModelEntry:
        width, height = image.size
        for task, spec in self.task_specs.items():
            if images.spec_size(spec) == (height, width):
                return self.default_model(task)
        if resize:  # no exact match: colour photos go to SVHN when served, the rest (and grey RGB: prepare_image) to digits
            colour = image.mode not in images.GREY_MODES and "svhn" in self.defaults
            return self.default_model("svhn" if colour or "digits" not in self.defaults else "digits")
        raise images.size_error(width, height, self.accepted_sizes)

    def grey_photo_for_svhn(self, entry: registry.ModelEntry, image) -> bool:
        """A resized RGB upload routed to SVHN that has no colour, while digits are served."""
        return (entry.manifest["task"] == "svhn" and "digits" in self.defaults
                and images.spec_size(entry.manifest["input"]) != (image.height, image.width) and images.looks_grey(image))

    async def infer(self, items: list[tuple[str, np.ndarray]]) -> tuple[list[np.ndarray], int]:
        """Queue one request's arrays; they may share an inference call with other requests'.
        Returns the log-probabilities per item and the number of images in that call."""
        log_probs, batch_images = await self.batcher.submit(items)
        for name in {name for name, _ in items}:
            count = sum(1 for n, _ in items if n == name)
            self.metrics.images.labels(name, self.entries[name].manifest["version"]).inc(count)
        return log_probs, batch_images

    # --- descriptions ---

    def summary(self, name: str) -> dict:
        entry = self.entries[name]
        if not entry.available:
            return {"name": name, "status": "unavailable", "reason": entry.error}
        m = entry.manifest
        default_for = next((f"{w}x{h}" for task, default in self.defaults.items() if default == name
                            for h, w in [images.spec_size(m["input"])]), None)
        test = m["metrics"]["test"]
        return {"name": name, "status": self.status(name), "task": m["task"], "version": m["version"],
                "summary": m.get("summary"), "data": m.get("data"), "default_for": default_for, "input": m["input"],
                **self.placement(name),
                "test": {k: test[k] for k in ("nll", "error", "errors", "n")},
                "best_epoch": m["metrics"]["best_epoch"], "epochs_run": m["metrics"]["epochs_run"]}
