"""serving/admission.py: how many requests one HTTP process takes on, and how many large bodies (a
phone's photo, up to --max-payload-bytes) it reads at once. Units, no server."""
import asyncio
from contextlib import AsyncExitStack

import pytest

from serving.admission import LARGE_BODIES, SMALL_BODY, Admission
from serving.errors import Overloaded
from serving.metrics import Metrics


def test_large_bodies_are_read_a_few_at_a_time_and_small_ones_always():
    async def scenario():
        admission = Admission(limit=64, metrics=Metrics([]))
        async with AsyncExitStack() as held:
            for _ in range(LARGE_BODIES - 1):
                await held.enter_async_context(admission.body_room(str(SMALL_BODY + 1)))
            await held.enter_async_context(admission.body_room(None))  # no declared length: counted as large
            with pytest.raises(Overloaded, match=f"{LARGE_BODIES} uploads over 1 MB"):
                await held.enter_async_context(admission.body_room(str(5 << 20)))
            with pytest.raises(Overloaded):
                await held.enter_async_context(admission.body_room("chunked"))  # not a length: large
            async with admission.body_room(str(SMALL_BODY)):  # a small body never waits on the large ones
                pass
        async with admission.body_room(str(16 << 20)):  # the places are given back
            assert admission.large_bodies == 1
        assert admission.large_bodies == 0
        assert admission.metrics.registry.get_sample_value("digitserve_shed_requests_total") == 2
    asyncio.run(scenario())


def test_requests_over_the_limit_are_refused_at_once_and_their_places_given_back():
    async def scenario():
        admission = Admission(limit=2, metrics=Metrics([]))
        async with admission.admitted(), admission.admitted():
            assert admission.full()
            with pytest.raises(Overloaded, match="2 requests in progress"):
                async with admission.admitted():
                    pass
        assert admission.in_progress == 0 and not admission.full()
    asyncio.run(scenario())
