"""Dynamic batching inside each HTTP process: concurrent requests share one inference call.

LitServe's own request path hands every request to a separate worker process through a
multiprocessing.Manager queue (an IPC round trip per request, plus a worker polling that queue
every millisecond). On a 2-core machine that path ran at 0.2x the throughput of a plain FastAPI +
ONNX Runtime endpoint (bench/RESULTS.md). Here requests queue in memory in the process that parsed
them; a batch is whatever arrived while the previous batch ran (plus up to `batch_timeout`, up to
`max_batch_size` images), and the models run in a thread, since ONNX Runtime and torch release the
GIL, while the event loop keeps reading requests. How much may wait is bounded before requests
get here (Service.admitted).
"""
import asyncio
import gc
import time

import numpy as np

from serving import inference
from serving.metrics import Metrics


class DynamicBatcher:
    def __init__(self, metrics: Metrics, max_batch_size: int, batch_timeout: float):
        self.metrics = metrics
        self.max_batch_size, self.batch_timeout = max_batch_size, batch_timeout
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        """Start batching (the models are loaded and warm: before this process accepts connections)."""
        # What is loaded so far lives about as long as the process: keep it out of the garbage
        # collector's generations, so collections under load are short (tail latency). A model
        # version a reload replaces is still freed, by its reference count.
        gc.collect()
        gc.freeze()
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self.run(), name="dynamic-batcher")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    @property
    def ready(self) -> bool:
        return self.task is not None and not self.task.done()

    async def submit(self, items: list[tuple[inference.ServedModel, np.ndarray]]) -> tuple[list[np.ndarray], int]:
        """Queue one request's images; resolves to (log-probabilities per image, images in the batch)."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((items, future, time.perf_counter()))
        self.metrics.queue_images.inc(len(items))
        return await future

    def take_waiting(self, batch: list, images: int) -> int:
        while not self.queue.empty() and images < self.max_batch_size:
            entry = self.queue.get_nowait()
            batch.append(entry)
            images += len(entry[0])
        return images

    async def run(self) -> None:
        while True:
            # One batch per call: its requests (and the model versions they hold) are let go when it
            # returns, not when the next request arrives; an idle process frees a replaced version.
            await self.run_batch([await self.queue.get()])

    async def run_batch(self, batch: list) -> None:
        images = self.take_waiting(batch, len(batch[0][0]))
        if images < self.max_batch_size and self.batch_timeout > 0:
            await asyncio.sleep(self.batch_timeout)
            images = self.take_waiting(batch, images)
        self.metrics.queue_images.dec(images)
        started = time.perf_counter()
        for items, _, queued_at in batch:
            for name in {model.name for model, _ in items}:
                self.metrics.queue_seconds.labels(name).observe(started - queued_at)
        try:
            result = await asyncio.to_thread(inference.predict, [items for items, _, _ in batch])
        except Exception as err:  # a backend failure fails this batch's requests, not the batcher
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(err)
            return
        self.metrics.batch_size.observe(result.images)
        for name, seconds in result.seconds.items():
            self.metrics.inference_seconds.labels(name).observe(seconds)
        for (_, future, _), log_probs in zip(batch, result.log_probs):
            if not future.done():  # the client may have gone away
                future.set_result((log_probs, result.images))
