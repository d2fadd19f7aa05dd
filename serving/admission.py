"""Admission control: how many inference requests one HTTP process takes on at a time."""
import json
import re
from contextlib import asynccontextmanager

from serving.errors import Overloaded
from serving.metrics import Metrics

SMALL_BODY = 1 << 20  # bytes: larger request bodies (a phone's photo) are read a few at a time
LARGE_BODIES = 4      # per process: 4 x --max-payload-bytes (16 MB) at most held for large bodies
# The inference routes, which admission control counts (and the protocol refuses when a process is full).
ADMITTED = re.compile(rb"/predict|/v2/models/[^/]+/infer|/models/[^/]+/evaluate")


class Admission:
    """At most `limit` (--max-queue) inference requests in progress in this process; the others are
    refused at once (503, Retry-After) instead of waiting behind them. With more clients than the
    machine can serve, latency otherwise grows with their number (p99 1.5 s at 512 connections on 2
    cores). A request is admitted once its body has arrived, so that slow uploads hold no place; when
    the process is full, the HTTP protocol refuses it before the application sees it
    (serving/connections.py: this is its Door), which costs a fraction of an answer."""

    retry_after = Overloaded.retry_after

    def __init__(self, limit: int, metrics: Metrics):
        self.limit, self.metrics = limit, metrics
        self.in_progress = 0
        self.large_bodies = 0
        self.message = (f"the server is at capacity ({limit} requests in progress in this process); retry in "
                        f"{Overloaded.retry_after} s")
        body = json.dumps({"error": self.message}).encode()
        self.head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                     f"retry-after: {Overloaded.retry_after}\r\ncontent-length: {len(body)}\r\nx-request-id: ").encode()
        self.tails = {True: b"\r\n\r\n" + body, False: b"\r\nconnection: close\r\n\r\n" + body}

    def full(self) -> bool:
        return self.in_progress >= self.limit

    def refuses(self, method: bytes, path: bytes) -> bool:
        if method == b"POST" and ADMITTED.fullmatch(path):
            self.metrics.shed.inc()
            return True
        return False

    def answer(self, keep_alive: bool, request_id: str) -> bytes:
        return self.head + request_id.encode() + self.tails[keep_alive]

    @asynccontextmanager
    async def body_room(self, declared: str | None):
        """Room to read a request's body and keep it until it is answered: a body over SMALL_BODY bytes
        (or of no declared length) takes one of LARGE_BODIES places, or is refused 503 at once."""
        large = declared is None or not declared.isdigit() or int(declared) > SMALL_BODY
        if large and self.large_bodies >= LARGE_BODIES:
            self.metrics.shed.inc()
            raise Overloaded(f"{LARGE_BODIES} uploads over {SMALL_BODY >> 20} MB are being read in this process; "
                             f"retry in {Overloaded.retry_after} s")
        self.large_bodies += large
        try:
            yield
        finally:
            self.large_bodies -= large

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
