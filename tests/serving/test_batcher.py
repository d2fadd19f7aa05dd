"""serving/batcher.py with a fake model: batches never exceed --max-batch-size, requests are answered
in full and in order, and background work (/evaluate) runs when no request waits. Unit tests on an
asyncio loop of their own, no server."""
import asyncio
import threading

import numpy as np

from serving import batcher as batching
from serving.batcher import DynamicBatcher
from serving.metrics import Metrics
from tests.helpers import DIGITS_SPEC, stub_model


class Recorder:
    """A runner that answers image i of a batch with log-probabilities [i's value] * 10 (and no score),
    and records batches."""

    def __init__(self):
        self.batches = []

    def __call__(self, batch):
        self.batches.append([float(image[0, 0, 0]) for image in batch])
        return np.repeat(batch[:, 0, 0, :1], 10, axis=1).astype(np.float32), None


def served(recorder):
    model = stub_model("digits", DIGITS_SPEC)
    model.runner = recorder
    return model


def items(model, values):
    return [(model, np.full((1, 8, 8), value, np.float32)) for value in values]


def run(coroutine_function):
    async def main():
        batcher = DynamicBatcher(Metrics(models=["digits"]), max_batch_size=4, batch_timeout=0)
        batcher.start()
        try:
            return await coroutine_function(batcher)
        finally:
            await batcher.stop()
    return asyncio.run(main())


def test_no_batch_holds_more_than_max_batch_size_and_large_requests_are_answered_whole():
    recorder = Recorder()
    model = served(recorder)

    async def send(batcher):
        return await asyncio.gather(batcher.submit(items(model, range(10))), batcher.submit(items(model, [100, 101])),
                                    batcher.submit(items(model, range(200, 203))))
    answers = run(send)
    assert max(len(batch) for batch in recorder.batches) <= 4  # a request of 10 was cut into parts
    assert sorted(value for batch in recorder.batches for value in batch) == [*range(10), 100, 101, 200, 201, 202]
    for (outputs, _), expected in zip(answers, [range(10), [100, 101], range(200, 203)]):
        assert [float(item.log_probs[0]) for item in outputs] == list(expected)  # every image answered, in order


def test_requests_are_batched_in_the_order_they_arrived():
    recorder = Recorder()
    model = served(recorder)

    async def send(batcher):
        return await asyncio.gather(*(batcher.submit(items(model, [i])) for i in range(6)))
    run(send)
    assert [value for batch in recorder.batches for value in batch] == list(range(6))


def test_background_work_waits_its_turn_while_requests_arrive(monkeypatch):
    monkeypatch.setattr(batching, "BACKGROUND_SHARE", 0.01)
    recorder = Recorder()
    model = served(recorder)

    async def send(batcher):
        first = await batcher.submit(items(model, [-1]), background=True)  # idle: at once
        background = asyncio.ensure_future(batcher.submit(items(model, [-2]), background=True))
        await asyncio.gather(*(batcher.submit(items(model, [i, i])) for i in range(4)))  # requests arrive
        await background
        return first
    run(send)
    order = [value for batch in recorder.batches for value in batch]
    assert order[0] == -1 and order[-1] == -2  # the second part waited for the requests' time


def test_background_work_runs_back_to_back_on_an_idle_process():
    recorder = Recorder()
    model = served(recorder)

    async def send(batcher):
        return await batcher.submit(items(model, range(-100, 0)), background=True)
    (outputs, batch_images) = run(send)
    assert len(recorder.batches) == 25 and batch_images == 4 and len(outputs) == 100  # max_batch_size 4 here


def test_background_work_gets_its_share_under_constant_load(monkeypatch):
    """Under constant load no moment is idle: a part goes in beside the requests when its share allows."""
    recorder = Recorder()
    model = served(recorder)

    async def send(batcher):
        background = asyncio.ensure_future(batcher.submit(items(model, [-1]), background=True))
        await asyncio.gather(*(batcher.submit(items(model, [i, i, i, i])) for i in range(3)))
        return await background
    run(send)
    assert any(-1 in batch for batch in recorder.batches[:2])


def test_a_failing_model_fails_the_requests_of_its_batch_not_the_batcher():
    model = served(Recorder())

    def broken(batch):
        raise RuntimeError("the backend failed")

    async def send(batcher):
        bad = stub_model("other", DIGITS_SPEC)
        bad.runner = broken
        failed = await asyncio.gather(batcher.submit(items(bad, [1])), return_exceptions=True)
        return failed, await batcher.submit(items(model, [2]))
    (failure,), (outputs, _) = run(send)
    assert isinstance(failure, RuntimeError) and float(outputs[0].log_probs[0]) == 2


def test_a_batch_expected_to_be_quick_runs_on_the_loop_and_others_in_a_thread(monkeypatch):
    threads = []
    model = served(Recorder())
    recorder = model.runner

    def timed(batch):
        threads.append(threading.current_thread().name)
        return recorder(batch)
    model.runner = timed
    monkeypatch.setattr(batching, "INLINE_SECONDS", 1.0)  # every timed model counts as quick

    async def send(batcher):
        first = await batcher.submit(items(model, [1]))  # not timed yet: in a thread
        second = await batcher.submit(items(model, [2]))
        monkeypatch.setattr(batching, "INLINE_SECONDS", 0.0)
        third = await batcher.submit(items(model, [3]))
        return first, second, third, batcher.per_image
    *answers, per_image = run(send)
    assert [float(outputs[0].log_probs[0]) for outputs, _ in answers] == [1, 2, 3]
    loop_thread = threading.main_thread().name
    assert threads[0] != loop_thread and threads[1] == loop_thread and threads[2] != loop_thread
    assert 0 < per_image["digits"] < 1.0
