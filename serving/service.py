"""What every route shares: routing by image size, the API key, admission, and this process's
models (serving/lifecycle.py), batcher and metrics.

One Service is built in the main process (exports checked, every model test-loaded on the CPU, so
that a broken one is reported and an unusable folder refused before anything forks); each HTTP
process then loads, warms and verifies its own versions of the models and starts its batcher in
`start()`, run by the routes' lifespan, and keeps them in line with the exports folder.
"""
import asyncio
import hmac
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
from prometheus_client import multiprocess

from serving import images, registry, routing, test_data
from serving.backends import BACKENDS, BackendError
from serving.batcher import DynamicBatcher
from serving.config import Config
from serving.errors import InputError, Overloaded, Unauthorized
from serving.inference import LoadError, ServedModel, load_runner
from serving.lifecycle import Lifecycle
from serving.routing import Catalog, Routed
from serving import metrics_files
from serving.metrics import Metrics


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


# The inference routes, which admission control counts (and the protocol refuses when a process is full).
ADMITTED = re.compile(rb"/predict|/v2/models/[^/]+/infer|/models/[^/]+/evaluate")


class Admission:
    """At most `limit` (--max-queue) inference requests in progress in this process; the others are
    refused at once (503, Retry-After) instead of waiting behind them. With more clients than the
    machine can serve, latency otherwise grows with their number (p99 1.5 s at 512 connections on 2
    cores). A request is admitted once its body has arrived, so that slow uploads hold no place; when
    the process is full, the HTTP protocol refuses it before the application sees it
    (serving/connections.py: this is its Door), which costs a fraction of an answer."""

    def __init__(self, limit: int, metrics: Metrics):
        self.limit, self.metrics = limit, metrics
        self.in_progress = 0
        self.message = (f"the server is at capacity ({limit} requests in progress in this process); retry in "
                        f"{Overloaded.retry_after} s")
        body = json.dumps({"error": self.message}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                f"retry-after: {Overloaded.retry_after}\r\ncontent-length: {len(body)}\r\n")
        self.answers = {True: f"{head}\r\n".encode() + body, False: f"{head}connection: close\r\n\r\n".encode() + body}

    def full(self) -> bool:
        return self.in_progress >= self.limit

    def refuses(self, method: bytes, path: bytes) -> bool:
        if method == b"POST" and ADMITTED.fullmatch(path):
            self.metrics.shed.inc()
            return True
        return False

    def answer(self, keep_alive: bool) -> bytes:
        return self.answers[keep_alive]

    @asynccontextmanager
    async def admitted(self):
        if self.full():
            self.metrics.shed.inc()
            raise Overloaded(self.message)
        self.in_progress += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.in_progress -= 1
            self.metrics.in_flight.dec()


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
        # cannot is reported unavailable with its reason, and the others still serve.
        for entry in self.entries.values():
            if entry.available:
                try:
                    load_runner(entry, config.backend, "cpu", warm=False)
                except LoadError as err:
                    entry.error = str(err)
            entry.contents.clear()  # each HTTP process reads and checks its own copy
        if not any(e.available for e in self.entries.values()):
            reasons = "; ".join(f"{name}: {e.error}" for name, e in self.entries.items()) or "the folder is empty"
            raise StartupError(f"no usable model in {config.exports} ({reasons})")
        metrics_files.reserve()
        self.metrics = Metrics(models=self.entries)
        self.lifecycle = Lifecycle(config, self.device, self.metrics)
        self.batcher: DynamicBatcher | None = None
        self.decoders: ThreadPoolExecutor | None = None
        self.admission = Admission(config.max_queue, self.metrics)
        self.evaluating = asyncio.Lock()  # one /evaluate at a time: it is background work
        self.notify_other_processes = None  # set by serving/server.py: asks every HTTP process to reload

    @property
    def catalog(self) -> Catalog:
        """The model versions this process serves now: take it once per request."""
        return self.lifecycle.catalog

    # --- life in one HTTP process ---

    async def start(self) -> None:
        """Load, warm and verify this process's models on their device, then batch (before it accepts
        connections); from then on follow the exports folder."""
        metrics_files.reserve()  # before this process's first metric update
        await self.lifecycle.start()
        self.decoders = ThreadPoolExecutor(max_workers=decoder_threads(), thread_name_prefix="decode")
        self.batcher = DynamicBatcher(self.metrics, self.config.max_batch_size, self.config.batch_timeout)
        self.batcher.start()

    async def stop(self) -> None:
        self.lifecycle.stop()
        if self.batcher is not None:
            await self.batcher.stop()
        if self.decoders is not None:
            self.decoders.shutdown(wait=False, cancel_futures=True)
        if metrics_files.folder():
            multiprocess.mark_process_dead(os.getpid())  # its live gauges (queue depth) leave the totals

    @property
    def ready(self) -> bool:
        """This process's models are warm and its batcher is running."""
        return self.batcher is not None and self.batcher.ready

    async def reload(self) -> list[dict]:
        """Follow the exports folder now, here and (through the main process) in every HTTP process."""
        if self.notify_other_processes is not None:
            self.notify_other_processes()
        return await self.lifecycle.reload(retry=True)

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

    async def prepare(self, inputs: list[tuple[str, str, object]], model: str | None, invert: bool | None,
                      resize: bool) -> list[Routed]:
        """Every input of one request -> (the model version that answers it, model-ready array), all
        from one catalog: a reload meanwhile does not split a request between versions.

        `invert`: the image is dark ink on light (None: resize=true detects it, exact sizes take it as no).

        Headers are read here (cheap) and the request's pixels counted before anything is decoded.
        Small requests are decoded on the event loop (a thread hand-off would cost more than the
        decoding); larger ones in the decoder threads, so the loop keeps answering meanwhile."""
        if not inputs:
            raise InputError("no image: upload files, or send images[] or pixels[] as JSON", 422)
        if len(inputs) > MAX_IMAGES_PER_REQUEST:
            raise InputError(f"{len(inputs)} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}", 413)
        catalog = self.catalog
        if model is not None:
            catalog.model(model)
        opened = [(kind, images.open_image(value) if kind == "bytes" else value) for _, kind, value in inputs]
        pixels = sum(value.size[0] * value.size[1] for kind, value in opened if kind == "bytes")
        if pixels > MAX_REQUEST_PIXELS:
            raise InputError(f"the images of this request declare {pixels} pixels in all (limit "
                             f"{MAX_REQUEST_PIXELS})", 413)
        arrays = sum(1 for kind, _ in opened if kind == "pixels")
        if pixels <= INLINE_PIXELS and arrays <= INLINE_ARRAYS:
            return self.decode_all(catalog, opened, model, invert, resize)
        return await asyncio.get_running_loop().run_in_executor(self.decoders, self.decode_all, catalog, opened,
                                                                model, invert, resize)

    @staticmethod
    def decode_all(catalog: Catalog, opened, model, invert, resize) -> list[Routed]:
        return [routing.route_image(catalog, value, model, invert, resize) if kind == "bytes" else
                routing.route_pixels(catalog, value, model, invert) for kind, value in opened]

    async def infer(self, items: list[tuple[ServedModel, np.ndarray]],
                    background: bool = False) -> tuple[list[np.ndarray], int]:
        """Queue one request's arrays; they may share an inference call with other requests'.
        Returns the log-probabilities per item and the most images an inference call of them held.
        `background`: only in the room predictions leave (serving/batcher.py)."""
        log_probs, batch_images = await self.batcher.submit(items, background)
        for model in {model for model, _ in items}:
            self.metrics.images.labels(model.name, model.version).inc(sum(1 for m, _ in items if m is model))
        return log_probs, batch_images

    # --- descriptions ---

    def summary(self, name: str, catalog: Catalog) -> dict:
        if name not in catalog.served:
            return {"name": name, "status": "unavailable", "reason": catalog.unavailable[name]}
        served = catalog.served[name]
        m = served.manifest
        key = catalog.default_for(name)
        test = m["metrics"]["test"]
        return {"name": name, "status": "ready", "task": m["task"], "version": m["version"],
                "summary": m.get("summary"), "data": m.get("data"), "default_for": f"{key[2]}x{key[1]}" if key else None,
                "input": m["input"],
                "device": served.runner.device, "provider": served.runner.provider,
                "test": {k: test[k] for k in ("nll", "error", "errors", "n")}, "verified": served.verified,
                "best_epoch": m["metrics"]["best_epoch"], "epochs_run": m["metrics"]["epochs_run"]}
