"""Dynamic batching inside each HTTP process: concurrent requests share one inference call.

LitServe's own request path hands every request to a separate worker process through a
multiprocessing.Manager queue (an IPC round trip per request, plus a worker polling that queue
every millisecond). On a 2-core machine that path ran at 0.2x the throughput of a plain FastAPI +
ONNX Runtime endpoint (bench/RESULTS.md). Here requests queue in memory in the process that parsed
them; a batch is whatever arrived while the previous batch ran (plus up to `batch_timeout`), never
more than `max_batch_size` images: a larger request is cut into parts that go into successive
batches, and is answered when its last part is. The models run in a thread, since ONNX Runtime and
torch release the GIL, while the event loop keeps reading requests. How much may wait is bounded
before requests get here (Service.admitted).

Background work (/models/NAME/evaluate) queues apart and runs one small part (BACKGROUND_PART
images) at a time, so that it never delays a prediction by more than that part. On an idle process
it runs back to back; while requests arrive, it gets at most BACKGROUND_SHARE of the batcher's time
(each part's time sets when the next may start), whether or not a request is waiting, so that an
evaluation finishes under constant load too, slowly, and costs predictions little.
"""
import asyncio
import gc
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from serving import inference
from serving.metrics import Metrics
from serving.tracing import Tracing

BACKGROUND_PART = 32  # images: a background part costs a prediction that shares its batch little
BACKGROUND_SHARE = 0.1  # of the batcher's time, while requests arrive
# A batch expected to take less than this runs on the event loop: handing it to a thread and back
# costs about as much (a small 8x8 batch takes ~0.1 ms). Larger ones run in a thread.
INLINE_SECONDS = 0.001
EXPECTED_WEIGHT = 0.1  # of each batch's time per image in a model's running estimate


@dataclass(eq=False)
class Request:
    """One submitted request: its answers fill in as its parts come back."""
    future: asyncio.Future
    outputs: list
    parts_left: int
    batch_images: int = 0  # the largest inference call any of its parts shared


@dataclass(eq=False)
class Part:
    request: Request
    offset: int
    items: list  # (ServedModel, C x H x W array), at most max_batch_size of them
    background: bool
    trace: object = None  # the request span's context, when tracing is on
    queued_at: float = field(default_factory=time.perf_counter)
    queued_ns: int = field(default_factory=time.time_ns)


class DynamicBatcher:
    def __init__(self, metrics: Metrics, max_batch_size: int, batch_timeout: float,
                 tracing: Tracing | None = None):
        self.metrics, self.tracing = metrics, tracing
        self.per_image: dict[str, float] = {}  # model name -> seconds per image, a running estimate
        self.max_batch_size, self.batch_timeout = max_batch_size, batch_timeout
        self.waiting: deque[Part] = deque()
        self.background: deque[Part] = deque()
        self.background_ended = self.background_spent = 0.0  # the last background part's end and time
        self.requests_arrived = False  # since the last background part: the process is not idle
        self.arrived: asyncio.Event | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        """Start batching (the models are loaded and warm: before this process accepts connections)."""
        # What is loaded so far lives about as long as the process: keep it out of the garbage
        # collector's generations, so collections under load are short (tail latency). A model
        # version a reload replaces is still freed, by its reference count.
        gc.collect()
        gc.freeze()
        self.arrived = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self.run(), name="dynamic-batcher")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    @property
    def ready(self) -> bool:
        return self.task is not None and not self.task.done()

    async def submit(self, items: list[tuple[inference.ServedModel, np.ndarray]], background: bool = False,
                     trace=None) -> tuple[list[np.ndarray], int]:
        """Queue one request's images; resolves to (per image: its log-probabilities and score, the
        most images an inference call of it held)."""
        request = Request(asyncio.get_running_loop().create_future(), [None] * len(items), 0)
        queue, size = ((self.background, min(BACKGROUND_PART, self.max_batch_size)) if background
                       else (self.waiting, self.max_batch_size))
        self.requests_arrived |= not background
        for offset in range(0, len(items), size):
            queue.append(Part(request, offset, items[offset:offset + size], background, trace))
            request.parts_left += 1
        self.metrics.queue_images.inc(len(items))
        self.arrived.set()
        return await request.future

    def take(self) -> list[Part]:
        """The next batch: waiting requests' parts in order while they fit, and a background part when
        its turn has come."""
        batch, images = [], 0
        while self.waiting and images + len(self.waiting[0].items) <= self.max_batch_size:
            images += len(self.waiting[0].items)
            batch.append(self.waiting.popleft())
        if self.background and time.perf_counter() >= self.background_turn():
            batch.append(self.background.popleft())
            self.requests_arrived = False  # from now on: those that arrive while it runs count
        return batch

    def background_turn(self) -> float:
        """When the next background part may run: at once on an idle process; while requests arrive,
        once they have had (1 / share - 1) times the time the last part took."""
        pause = self.background_spent * (1 / BACKGROUND_SHARE - 1) if self.requests_arrived else 0.0
        return self.background_ended + pause

    async def run(self) -> None:
        while True:
            await self.arrived.wait()
            if self.batch_timeout > 0 and sum(len(part.items) for part in self.waiting) < self.max_batch_size:
                await asyncio.sleep(self.batch_timeout)
            batch = self.take()
            if batch:
                # One batch per call: its requests (and the model versions they hold) are let go when it
                # returns, not when the next request arrives; an idle process frees a replaced version.
                await self.run_batch(batch)
                continue
            self.arrived.clear()
            if self.background:  # its turn comes later, or sooner with a request
                try:
                    await asyncio.wait_for(self.arrived.wait(), self.background_turn() - time.perf_counter())
                except TimeoutError:
                    self.arrived.set()

    async def run_batch(self, batch: list[Part]) -> None:
        images = sum(len(part.items) for part in batch)
        self.metrics.queue_images.dec(images)
        started = time.perf_counter()
        for part in batch:
            for name in {model.name for model, _ in part.items}:
                self.metrics.child(self.metrics.queue_seconds, name).observe(started - part.queued_at)
        started_ns = time.time_ns()
        try:
            requests = [part.items for part in batch]
            if self.expected_seconds(batch) < INLINE_SECONDS:
                result = inference.predict(requests)
            else:
                result = await asyncio.to_thread(inference.predict, requests)
        except Exception as err:  # a backend failure fails this batch's requests, not the batcher
            for part in batch:
                if not part.request.future.done():
                    part.request.future.set_exception(err)
            return
        if self.tracing is not None:
            self.traced(batch, result, started_ns)
        self.metrics.batch_size.observe(result.images)
        background = sum(len(part.items) for part in batch if part.background)
        if background:  # its share of this batch's time
            self.background_ended = time.perf_counter()
            self.background_spent = (self.background_ended - started) * background / images
        for name, seconds in result.seconds.items():
            self.metrics.child(self.metrics.inference_seconds, name).observe(seconds)
        self.learn(batch, result)
        for part, outputs in zip(batch, result.outputs):
            request = part.request
            request.outputs[part.offset:part.offset + len(outputs)] = outputs
            request.batch_images = max(request.batch_images, result.images)
            request.parts_left -= 1
            if request.parts_left == 0 and not request.future.done():  # the client may have gone away
                request.future.set_result((request.outputs, request.batch_images))

    def expected_seconds(self, batch: list[Part]) -> float:
        """The batch's expected inference time, from each model's seconds per image so far (a model not
        yet timed here: infinite, so that its first batch runs in a thread)."""
        return sum(self.per_image.get(model.name, float("inf")) for part in batch for model, _ in part.items)

    def learn(self, batch: list[Part], result: inference.BatchResult) -> None:
        for name, seconds in result.seconds.items():
            images = sum(1 for part in batch for model, _ in part.items if model.name == name)
            now = seconds / images
            before = self.per_image.get(name)
            self.per_image[name] = now if before is None else before + EXPECTED_WEIGHT * (now - before)

    def traced(self, batch: list[Part], result: inference.BatchResult, started_ns: int) -> None:
        """Each request's wait in the queue, and the batch's inference linked to them."""
        for part in batch:
            if part.trace is not None:
                self.tracing.waited(part.trace, part.queued_ns, started_ns)
        models = sorted({(model.name, model.version) for part in batch for model, _ in part.items})
        self.tracing.batch([part.trace for part in batch],
                           {"digitserve.models": [name for name, _ in models],
                            "digitserve.versions": [version for _, version in models],
                            "digitserve.batch_size": result.images}, started_ns, time.time_ns())
