"""Admission control: how many inference requests one HTTP process takes on at a time."""
import json
import re
from contextlib import asynccontextmanager

from serving.errors import Overloaded
from serving.metrics import Metrics

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
