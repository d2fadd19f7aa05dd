"""The data plane, as KServe calls it: what every route shares in one HTTP process. Its life (start,
stop, reload), the API key, admission, and turning a request's inputs into answers: routed and
decoded (serving/routing.py), batched and run (serving/batcher.py) on this process's models
(serving/lifecycle.py). How the answers are presented is the routes' (serving/api/).

One Service is built in the main process (exports checked, every model test-loaded on the CPU, so
that a broken one is reported and an unusable folder refused before anything forks); each HTTP
process then loads, warms and verifies its own versions of the models and starts its batcher in
`start()`, run by the API's lifespan, and keeps them in line with the exports folder.
"""
import asyncio
import hmac
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client import multiprocess

from serving import feedback, images, metrics_files, registry, routing, tracing, verify
from serving.admission import Admission
from serving.backends import BACKENDS, BackendError
from serving.batcher import DynamicBatcher
from serving.config import Config
from serving.errors import InputError, PredictionNotFound, StartupError, Unauthorized
from serving.inference import LoadError, ServedModel, load_runner
from serving.lifecycle import Lifecycle
from serving.metrics import Metrics
from serving.prediction_log import PredictionLog
from serving.routing import Catalog, Routed


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


class Service:
    def __init__(self, config: Config):
        self.config = config
        try:
            self.device = BACKENDS[config.backend].resolve(config.device)
            self.entries = {e.name: e for e in registry.scan(config.exports, config.backend)}
        except (BackendError, registry.ExportsError) as err:
            raise StartupError(str(err)) from None
        if config.data_dir is not None and (problem := verify.mat_reader_problem()):
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
        self.trace_exporters = tracing.requested()  # [] unless OTEL_TRACES_EXPORTER asks (serving/tracing.py)
        self.tracing: tracing.Tracing | None = None
        self.prediction_log: PredictionLog | None = None
        self.feedback: feedback.Feedback | None = None
        if config.prediction_log is not None:
            self.prediction_log = PredictionLog(config.prediction_log, config.prediction_sample, config.log_inputs,
                                                config.prediction_log_mb << 20, config.prediction_log_files,
                                                config.feedback_days, self.metrics)
            feedback.open_store(config).close()  # here, so that an unusable folder stops the start-up
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
        if self.trace_exporters:
            self.tracing = tracing.Tracing.from_environment(self.trace_exporters)
        self.batcher = DynamicBatcher(self.metrics, self.config.max_batch_size, self.config.batch_timeout, self.tracing)
        self.batcher.start()
        if self.prediction_log is not None:
            self.prediction_log.start()
            self.feedback = feedback.Feedback(self.config, self.prediction_log, self.metrics)
            await self.feedback.start()

    async def stop(self) -> None:
        self.lifecycle.stop()
        if self.batcher is not None:
            await self.batcher.stop()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)
        if self.decoders is not None:
            self.decoders.shutdown(wait=False, cancel_futures=True)
        if self.prediction_log is not None:
            await asyncio.to_thread(self.prediction_log.stop)
        if self.feedback is not None:
            self.feedback.stop()
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

    async def prepare(self, inputs: list[tuple[str, str, object]], options) -> list[Routed]:
        """Every input of one request (label, "bytes" | "pixels", value) -> the model version that
        answers it and its array, all from one catalog: a reload meanwhile does not split a request
        between versions. `options`: api.bodies.Options (model, invert, resize).

        Headers are read here (cheap) and the request's pixels counted before anything is decoded.
        Small requests are decoded on the event loop (a thread hand-off would cost more than the
        decoding); larger ones in the decoder threads, so the loop keeps answering meanwhile."""
        if not inputs:
            raise InputError("no image: upload files, send images[] or pixels[] as JSON, or an image as the body", 422)
        if len(inputs) > MAX_IMAGES_PER_REQUEST:
            raise InputError(f"{len(inputs)} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}", 413)
        catalog = self.catalog
        if options.model is not None:
            catalog.model(options.model)
        opened = [(kind, images.open_image(value) if kind == "bytes" else value) for _, kind, value in inputs]
        pixels = sum(value.size[0] * value.size[1] for kind, value in opened if kind == "bytes")
        if pixels > MAX_REQUEST_PIXELS:
            raise InputError(f"the images of this request declare {pixels} pixels in all (limit "
                             f"{MAX_REQUEST_PIXELS})", 413)
        arrays = sum(1 for kind, _ in opened if kind == "pixels")
        if pixels <= INLINE_PIXELS and arrays <= INLINE_ARRAYS:
            return self.decode_all(catalog, opened, options)
        return await asyncio.get_running_loop().run_in_executor(self.decoders, self.decode_all, catalog, opened,
                                                                options)

    @staticmethod
    def decode_all(catalog: Catalog, opened, options) -> list[Routed]:
        return [routing.route_image(catalog, value, options.model, options.invert, options.resize) if kind == "bytes"
                else routing.route_pixels(catalog, value, options.model, options.invert) for kind, value in opened]

    async def infer(self, items: list[tuple[ServedModel, np.ndarray]],
                    background: bool = False) -> tuple[list[np.ndarray], int]:
        """Queue one request's arrays; they may share an inference call with other requests'.
        Returns the log-probabilities per item and the most images an inference call of them held.
        `background`: only in the room predictions leave (serving/batcher.py)."""
        trace = None if self.tracing is None or background else self.tracing.current()
        log_probs, batch_images = await self.batcher.submit(items, background, trace)
        for model in {model for model, _ in items}:
            images = sum(1 for m, _ in items if m is model)
            self.metrics.child(self.metrics.images, model.name, model.version).inc(images)
        return log_probs, batch_images

    # --- feedback (with --prediction-log) ---

    async def tell(self, prediction_id: str, truth: int) -> tuple[str, str, int]:
        if self.feedback is None:
            raise PredictionNotFound("feedback needs the prediction log: start the server with --prediction-log DIR")
        return await self.feedback.tell(prediction_id, truth)

    async def live_accuracy(self) -> dict[tuple[str, str], tuple[int, int]] | None:
        return None if self.feedback is None else await self.feedback.live_accuracy()
