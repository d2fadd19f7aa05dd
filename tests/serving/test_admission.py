"""serving/admission.py: how many requests one HTTP process takes on, and how many large bodies (a
phone's photo, up to --max-payload-bytes) it reads at once. Units, no server."""
import asyncio
import json
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


def test_the_refusal_the_protocol_writes_is_a_whole_503_with_retry_after_and_the_request_id():
    admission = Admission(limit=1, metrics=Metrics([]))
    for keep_alive in (True, False):
        head, body = admission.answer(keep_alive, "abc-1").split(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"HTTP/1.1 503 Service Unavailable" and b"x-request-id: abc-1" in lines
        assert f"retry-after: {Overloaded.retry_after}".encode() in lines
        assert f"content-length: {len(body)}".encode() in lines and json.loads(body)["error"] == admission.message
        assert (b"connection: close" in lines) is not keep_alive
