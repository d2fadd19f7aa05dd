"""Dynamic batching inside each HTTP process: concurrent requests share one inference call.

LitServe's own request path hands every request to a separate worker process through a
multiprocessing.Manager queue (an IPC round trip per request, plus a worker polling that queue
every millisecond). On a 2-core machine that path ran at 0.2x the throughput of a plain FastAPI +
ONNX Runtime endpoint (bench/RESULTS.md). Here the LitAPI's own batching (`predict`) runs in
the process that parsed the request: requests queue in memory, the batch is whatever arrived while
the previous batch ran (plus up to `batch_timeout`, up to `max_batch_size` images), and the LitAPI's
`predict` runs in a thread, since ONNX Runtime and torch release the GIL, while the event loop
keeps parsing requests.
"""
import asyncio
import gc

import numpy as np

from serving.api import ClassifierAPI


class DynamicBatcher:
    def __init__(self, api: ClassifierAPI, max_batch_size: int, batch_timeout: float):
        self.api = api
        self.max_batch_size = max_batch_size
        self.batch_timeout = batch_timeout
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        """Load and warm the models (blocking: before this process accepts connections), then batch."""
        self.api.setup(device=None)
        # Everything loaded so far lives as long as the process: keep it out of the garbage
        # collector's generations, so collections under load are short (tail latency).
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

    async def submit(self, items: list[tuple[str, np.ndarray]]) -> dict:
        """Queue one request's images; resolves to {"log_probs": [...], "batch_size": n}."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((items, future))
        return await future

    def take_waiting(self, batch: list, images: int) -> int:
        while not self.queue.empty() and images < self.max_batch_size:
            entry = self.queue.get_nowait()
            batch.append(entry)
            images += len(entry[0])
        return images

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            images = self.take_waiting(batch, len(batch[0][0]))
            if images < self.max_batch_size and self.batch_timeout > 0:
                await asyncio.sleep(self.batch_timeout)
                self.take_waiting(batch, images)
            try:
                outputs = await asyncio.to_thread(self.api.predict, [items for items, _ in batch])
            except Exception as err:  # a backend failure fails this batch's requests, not the batcher
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), output in zip(batch, outputs):
                if not future.done():  # the client may have gone away
                    future.set_result(output)
