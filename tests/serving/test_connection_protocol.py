"""serving/connections.py, the HTTP protocol digitserve runs uvicorn with, driven byte by byte over a
fake transport: its refusals (limits, a full process), answered without the application. The same
limits on a real server over loopback: tests/serving/test_slow_clients.py."""
import asyncio
import json
import re
import tracemalloc

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from serving.config import Config as Settings
from serving.connections import guarded_protocol

LIMITS = Settings(read_timeout=5, send_timeout=5, max_url_bytes=256, max_header_count=8, max_header_bytes=1024)


class Transport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.written, self.closed, self.half_closed = b"", False, False

    def write(self, data):
        self.written += data

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.half_closed = True

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


class Counter:
    def __init__(self):
        self.counts = {}

    def labels(self, reason):
        counter = self

        class Child:
            def inc(self):
                counter.counts[reason] = counter.counts.get(reason, 0) + 1
        return Child()


class Door:
    retry_after = 0.3

    def __init__(self, full: bool):
        self.is_full, self.refused = full, 0

    def full(self):
        return self.is_full

    def refuses(self, method, path):
        if method == b"POST" and path == b"/predict":
            self.refused += 1
            return True
        return False

    def answer(self, keep_alive, request_id):
        return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nx-request-id: " + request_id.encode()
                + b"\r\n" + (b"" if keep_alive else b"connection: close\r\n") + b"\r\n")


def exchange(*chunks: bytes, full: bool = False) -> tuple[Transport, list, Counter, Door]:
    """Feed `chunks` to one connection; what was written, what reached the application, what was counted."""
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["path"])
        message = await receive()
        while message.get("more_body"):
            message = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run():
        config = Config(app, log_level="warning")
        config.load()
        counter, door = Counter(), Door(full)
        protocol = guarded_protocol(LIMITS, counter, door)(config, ServerState(), {})
        transport = Transport()
        protocol.connection_made(transport)
        for chunk in chunks:
            protocol.data_received(chunk)
            await asyncio.sleep(0.01)  # the application's task runs
        transport.open_at_end = not transport.closed
        protocol.connection_lost(None)
        return transport, seen, counter, door
    return asyncio.run(run())


BODY = json.dumps({"pixels": []}).encode()
PREDICT = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
           + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)


@pytest.mark.parametrize("chunks, status, reason", [
    ([b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n\r\n"], 414, "url_too_long"),
    ([b"GET /health HTTP/1.1\r\n" + b"a: b\r\n" * 9 + b"\r\n"], 431, "too_many_headers"),
    ([b"GET /health HTTP/1.1\r\nX: " + b"a" * 1100 + b"\r\n\r\n"], 431, "headers_too_large"),
    ([b"GET /health HTTP/1.1\r\nX: "] + [b"a" * 200] * 7, 431, "headers_too_large"),  # a line that never ends
])
def test_a_head_over_its_limits_is_answered_by_the_protocol_and_half_closed(chunks, status, reason):
    transport, seen, counter, _ = exchange(*chunks)
    assert transport.written.startswith(f"HTTP/1.1 {status}".encode()) and b"connection: close" in transport.written
    assert seen == [] and counter.counts == {reason: 1}
    assert transport.half_closed  # the client reads the answer; what it still sends is dropped
    assert re.search(rb"\r\nx-request-id: [0-9a-f]{32}\r\n", transport.written)  # made here: the head was not read


def test_heads_within_the_limits_reach_the_application():
    transport, seen, counter, _ = exchange(b"GET /health HTTP/1.1\r\n" + b"a: b\r\n" * 8 + b"\r\n")
    assert seen == ["/health"] and transport.written.startswith(b"HTTP/1.1 200") and counter.counts == {}


def test_a_full_process_refuses_inference_at_the_door_and_keeps_the_connection():
    transport, seen, _, door = exchange(PREDICT, b"GET /health HTTP/1.1\r\n\r\n", full=True)
    assert door.refused == 1 and seen == ["/health"]  # the refused request never reached the application
    first, second = transport.written.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"503") and second.startswith(b"200") and transport.open_at_end


@pytest.mark.parametrize("headers, echoed", [(b"X-Request-ID: order-17.a:b\r\n", True),
                                              (b"X-Request-ID: has space\r\n", False),
                                              (b"X-Request-ID: a\r\nX-Request-ID: b\r\n", False), (b"", False)])
def test_a_refusal_at_the_door_carries_the_clients_request_id_or_a_new_one(headers, echoed):
    transport, _, _, _ = exchange(PREDICT.replace(b"Host: x\r\n", b"Host: x\r\n" + headers), full=True)
    (sent,) = re.findall(rb"\r\nx-request-id: ([^\r]*)\r\n", transport.written)
    assert sent == b"order-17.a:b" if echoed else re.fullmatch(rb"[0-9a-f]{32}", sent)


def test_a_refusal_without_keep_alive_closes():
    transport, seen, _, _ = exchange(PREDICT.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"), full=True)
    assert transport.written.startswith(b"HTTP/1.1 503") and b"connection: close" in transport.written
    assert seen == [] and not transport.open_at_end


def test_a_full_process_lets_other_routes_through():
    _, seen, _, door = exchange(b"GET /health HTTP/1.1\r\n\r\n", full=True)
    assert seen == ["/health"] and door.refused == 0


def test_a_refused_request_is_let_go_at_once_not_when_its_connection_ends():
    """The failed parser held the refusal's traceback, and with it every chunk of the request, for as
    long as the connection lingered: 2,000 refused 60 KB URLs held 230 MB."""
    async def refuse_many():
        config = Config(lambda scope, receive, send: None, log_level="warning")
        config.load()
        protocol_class, state = guarded_protocol(LIMITS, Counter(), Door(False)), ServerState()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        lingering = []
        for i in range(30):
            protocol = protocol_class(config, state, {})
            protocol.connection_made(Transport())
            protocol.data_received(b"GET /" + b"%06d" % i + b"x" * 60_000 + b" HTTP/1.1\r\n\r\n")
            lingering.append(protocol)  # still connected: the client has not hung up yet
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        return held
    assert asyncio.run(refuse_many()) < 30 * 20_000


async def slow_app(scope, receive, send):
    """Answers 200 after 0.3 s."""
    await asyncio.sleep(0.3)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def answers_over_time(*steps, full: bool = True, lost_after: int | None = None, timeout_keep_alive: float = 5
                      ) -> tuple[list[tuple[float, bytes]], list[int], Transport]:
    """Feed each step's bytes (or wait its seconds, or call protocol.shutdown() for "stop") on one
    connection to a full process whose application is `slow_app`: the status lines written, with when
    (seconds from the start), and how many had been written after each step. `lost_after`: the client
    hangs up after that many steps."""
    async def run():
        config = Config(slow_app, log_level="warning", timeout_keep_alive=timeout_keep_alive)
        config.load()
        loop, written, counts = asyncio.get_running_loop(), [], []

        class Timed(Transport):
            def write(self, data):
                super().write(data)
                written.extend((loop.time() - start, status) for status in re.findall(rb"HTTP/1.1 (\d+)", data))

            closed_at = None

            def close(self):
                if self.closed_at is None:
                    self.closed_at = loop.time() - start
                super().close()
        protocol = guarded_protocol(LIMITS, Counter(), Door(full))(config, ServerState(), {})
        transport, start = Timed(), loop.time()
        protocol.connection_made(transport)
        for i, step in enumerate(steps):
            if i == lost_after:
                protocol.connection_lost(None)
            if step == "stop":
                protocol.shutdown()
            elif isinstance(step, bytes):
                protocol.data_received(step)
            else:
                await asyncio.sleep(step)
            counts.append(len(written))
        if lost_after is None:
            protocol.connection_lost(None)
        return written, counts, transport
    return asyncio.run(run())


def test_a_client_resending_much_sooner_than_retry_after_is_refused_when_it_may_come_back():
    written, counts, transport = answers_over_time(PREDICT, 0.01, PREDICT, 0.5)
    assert counts == [1, 1, 1, 2] and [status for _, status in written] == [b"503", b"503"]
    assert written[1][0] - written[0][0] >= Door.retry_after - 0.01  # held, not answered at once
    assert b"connection: close" not in transport.written


def test_a_client_honouring_retry_after_is_refused_at_once():
    _, counts, _ = answers_over_time(PREDICT, Door.retry_after + 0.01, PREDICT)
    assert counts == [1, 1, 2]


def test_a_pipelined_request_releases_the_held_refusal_before_it_is_read():
    # the second refusal is written as the third request begins (answers stay in order); the third is held
    _, counts, _ = answers_over_time(PREDICT + PREDICT + PREDICT)
    assert counts == [2]


def test_a_stop_releases_a_held_refusal_at_once_with_connection_close():
    _, counts, transport = answers_over_time(PREDICT, PREDICT, "stop")
    assert counts == [1, 1, 2] and transport.written.endswith(b"connection: close\r\n\r\n")


def test_a_client_that_hangs_up_gets_no_held_refusal_written_after():
    _, counts, _ = answers_over_time(PREDICT, PREDICT, 0.5, lost_after=2)
    assert counts == [1, 1, 1]


def test_a_request_answered_between_two_refusals_means_no_hold(monkeypatch):
    """Behind a proxy one connection carries many clients: only a refusal right after a refusal is held."""
    monkeypatch.setattr(Door, "retry_after", 1.0)
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    _, counts, _ = answers_over_time(PREDICT, health, 0.35, PREDICT)
    assert counts == [1, 1, 2, 3]  # the 200 after 0.3 s, then the refusal at once


def test_a_request_pipelined_after_a_refusal_is_not_cut_off_by_the_keep_alive_timer():
    """The refusal armed uvicorn's keep-alive timer while the same read was parsed: it closed the
    connection 0.2 s into the request behind it, before its answer."""
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    written, _, transport = answers_over_time(PREDICT + health, 0.4, timeout_keep_alive=0.2)
    assert [status for _, status in written] == [b"503", b"200"]
    assert transport.closed_at is None or transport.closed_at > written[1][0]  # not closed before its answer
