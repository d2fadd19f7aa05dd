"""What uvicorn's HTTP connections lack (checked against uvicorn UVICORN_CHECKED): limits on what a
request's head may hold, deadlines for a request to arrive and for its answer to be taken, and a
stop that leaves no keep-alive client cut off mid-request.

- uvicorn keeps every header line of a request in a Python list with no limit on their number or
  size, nor on the URL's length: 100 MB of tiny header lines grew a process by 2.7 GB. Here the URL,
  the header lines and the head's bytes are counted as they arrive, and a request over
  `max_url_bytes` is answered 414, over `max_header_count` or `max_header_bytes` 431, before more of
  it is kept.
- uvicorn times out only idle keep-alive connections; a client that sends its headers or its body a
  byte at a time (slowloris), or declares a Content-Length it never sends, holds a connection and a
  task forever. Here a request must arrive complete within `read_timeout` seconds of its first byte
  (or of the connection opening); else it is answered 408 and the connection closed.
- A client that stops reading its answers holds its connection, and the answers, forever once the
  socket's buffers are full. Here a connection whose writing stays paused, or that cannot finish
  closing, for `send_timeout` seconds is aborted.
- Admission control (serving/admission.py) refuses inference requests beyond --max-queue. Through the
  application each refusal cost nearly what an answer costs (routing, middleware, a task), so under
  overload refusing crowded out serving. Here a request that `door` refuses is answered by the
  protocol: no ASGI task is made, its body is read and dropped, and the same 503 + Retry-After is
  written (counted as shed, as the application would). Retry-After is the least a client must wait
  (RFC 9110): one that resends on the same connection sooner, and is refused again, gets that refusal
  once Retry-After has passed since the last one, its connection unread meanwhile (only where that
  connection's previous request was the refused one: behind a proxy one connection carries many
  clients). Clients that ignore it (2,048 of them resending at once left 9 % of the unloaded
  throughput to accepted requests) cost one refusal a second each; those that honour it are not
  slowed. A pipelined request gets the held refusal first.
- On a graceful stop uvicorn closes idle keep-alive connections at once, racing a client that is
  sending its next request on one (it sees a reset). Here an idle connection lingers for
  SHUTDOWN_LINGER seconds: a request that arrives is answered, with `Connection: close`.

A refusal is written by the protocol itself, counted in `digitserve_http_refused_total{reason}`, and
the connection half-closed: what the client still sends is read and dropped (closing with unread
data would reset the connection and could destroy the answer) until it hangs up, or for at most
REFUSAL_LINGER seconds.

Used through uvicorn's own parameter for the protocol class (`http=`), which LitServe passes on.
"""
import json
from typing import Protocol

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving import request_ids
from serving.config import Config

UVICORN_CHECKED = "0.54.0"  # pyproject admits 0.54.x
SHUTDOWN_LINGER = 2.0  # seconds: time for a client's next request even on a loaded machine (1 s raced in CI)
REFUSAL_LINGER = 2.0  # seconds a refused connection is drained before it is closed


class Refused(Exception):
    """A request the protocol answers itself: its status, message and metric reason."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


PHRASES = {408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large"}


class Door(Protocol):
    """Admission control as the protocol sees it (serving/service.py implements it)."""

    def full(self) -> bool:
        """No more inference requests are admitted in this process now."""

    def refuses(self, method: bytes, path: bytes) -> bool:
        """The request is one that full() refuses (and is counted as refused)."""

    def answer(self, keep_alive: bool, request_id: str) -> bytes:
        """The whole HTTP response of a refusal."""

    retry_after: float  # seconds: what a refusal asks the client to wait


def guarded_protocol(limits: Config, refused_counter, door: Door) -> type:
    """The protocol class, with the server's limits (read_timeout, send_timeout, max_url_bytes,
    max_header_count, max_header_bytes). `refused_counter`: a prometheus Counter labelled by reason."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.read_deadline = self.loop.call_later(limits.read_timeout, self.request_too_slow)
            self.send_deadline = None
            self.lost = False
            self.stopping = False
            self.refused = False          # answered by the protocol: what still arrives is dropped
            self.refusal: Refused | None = None
            self.awaiting_headers = True  # of a request not yet answered (self.cycle is the last one's)
            self.head_bytes = 0           # bytes read while the head was incomplete (URL, headers)
            self.shedding = False         # this request is refused by `door`: its body is dropped
            self.refused_at = float("-inf")  # when `door`'s last refusal on this connection was written
            self.refused_last = False     # and whether the connection's last request was that one
            self.held_refusal = None      # (timer, keep_alive, request_id) of a refusal held back until then

        def connection_lost(self, exc) -> None:
            self.lost = True
            if self.held_refusal is not None:
                self.held_refusal[0].cancel()
            self.read_deadline.cancel()
            if self.send_deadline is not None:
                self.send_deadline.cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            """uvicorn's, with the refusals below. httptools holds an incomplete header line until it
            ends, so the bytes of a head still incomplete after a read count towards its limit too."""
            if self.refused:
                return  # drained: the answer is on its way
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
                if self.awaiting_headers:
                    self.head_bytes += len(data)
                    if self.head_bytes > limits.max_url_bytes + limits.max_header_bytes:
                        raise self.refusing(431, "headers_too_large",
                                            f"the request's head exceeds {limits.max_header_bytes} bytes")
            except (Refused, httptools.HttpParserError):
                if self.refusal is not None:  # raised in a callback, which httptools wraps
                    self.refuse(self.refusal)
                    return
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()

        def on_message_begin(self) -> None:  # the first byte of a request (the next one on a kept-alive connection)
            self.release_refusal()  # a pipelined request: the refusal before it is answered first
            # A refusal written while this read was parsed armed uvicorn's keep-alive timer, which is
            # otherwise cancelled only when the next read arrives: it must not close this request.
            self._unset_keepalive_if_required()
            super().on_message_begin()
            self.awaiting_headers = True
            self.head_bytes = self.header_bytes = self.header_count = 0
            self.read_deadline.cancel()
            self.read_deadline = self.loop.call_later(limits.read_timeout, self.request_too_slow)

        def on_url(self, url: bytes) -> None:
            if len(self.url) + len(url) > limits.max_url_bytes:
                raise self.refusing(414, "url_too_long", f"the URL is longer than {limits.max_url_bytes} bytes")
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self.header_count += 1
            self.header_bytes += len(name) + len(value)
            if self.header_count > limits.max_header_count:
                raise self.refusing(431, "too_many_headers", f"more than {limits.max_header_count} header lines")
            if self.header_bytes > limits.max_header_bytes:
                raise self.refusing(431, "headers_too_large", f"the headers exceed {limits.max_header_bytes} bytes")
            super().on_header(name, value)

        def refusing(self, status: int, reason: str, message: str) -> "Refused":
            self.refusal = Refused(status, reason, message)
            return self.refusal

        def on_headers_complete(self) -> None:
            self.awaiting_headers = False
            idle = self.cycle is None or self.cycle.response_complete  # no earlier answer still to come
            if (idle and door.full() and not self.stopping and not self.expect_100_continue
                    and door.refuses(self.parser.get_method(), httptools.parse_url(self.url).path)):
                self.shedding = True  # no ASGI task: the body is read and dropped, then the refusal written
                return
            self.refused_last = False  # a proxy's connection carries many clients: one answered resets it
            super().on_headers_complete()
            if self.stopping and self.cycle is not None:
                self.cycle.keep_alive = False  # the last request on this connection

        def on_body(self, body: bytes) -> None:
            if not self.shedding:
                super().on_body(body)

        def on_message_complete(self) -> None:
            self.read_deadline.cancel()
            if not self.shedding:
                super().on_message_complete()
                return
            self.shedding = False
            supplied = [value for name, value in self.headers if name == request_ids.HEADER]
            request_id = request_ids.usable(supplied[0] if len(supplied) == 1 else None)
            wait = self.refused_at + door.retry_after - self.loop.time()
            if wait > 0 and self.refused_last and not self.stopping:  # back too soon: refused when it may come back
                self.flow.pause_reading()
                self.held_refusal = (self.loop.call_later(wait, self.release_refusal), self.parser.should_keep_alive(),
                                     request_id)
                return
            self.write_refusal(self.parser.should_keep_alive(), request_id)

        def release_refusal(self) -> None:
            if self.held_refusal is not None:
                timer, keep_alive, request_id = self.held_refusal
                self.held_refusal = None
                timer.cancel()
                self.write_refusal(keep_alive, request_id)

        def write_refusal(self, keep_alive: bool, request_id: str) -> None:
            self.refused_at, self.refused_last = self.loop.time(), True
            self.transport.write(door.answer(keep_alive and not self.stopping, request_id))
            if keep_alive and not self.stopping:
                self.on_response_complete()  # uvicorn's: the keep-alive timer, reading again, the next pipelined request
            else:
                self.close()

        def refuse(self, refusal: Refused) -> None:
            # The failed parser keeps the exception, whose traceback keeps every chunk of the request:
            # let both go now, not when the connection ends.
            self.parser, self.refusal = httptools.HttpRequestParser(self), None
            refused_counter.labels(refusal.reason).inc()
            self.answer(refusal.status, refusal.message)
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True  # the application's answer, if any, is not sent now

        def answer(self, status: int, message: str) -> None:
            """Answer without the application and half-close; the rest of what arrives is dropped."""
            self.refused = True
            self.read_deadline.cancel()
            body = json.dumps({"error": message}).encode()
            self.transport.write(f"HTTP/1.1 {status} {PHRASES[status]}\r\ncontent-type: application/json\r\n"
                                 f"content-length: {len(body)}\r\nx-request-id: {request_ids.usable(None)}\r\n"
                                 "connection: close\r\n\r\n".encode() + body)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(REFUSAL_LINGER, self.close)

        def request_too_slow(self) -> None:
            if self.transport.is_closing() or self.refused:
                return
            if self.awaiting_headers or not self.cycle.response_started:  # else it was answered (413, 503) early
                refused_counter.labels("read_timeout").inc()
                self.answer(408, f"the request did not arrive whole within {limits.read_timeout:g} s")
                if not self.awaiting_headers:
                    self.cycle.disconnected = True  # the application's answer, if any, is not sent now
            else:
                self.close()

        def pause_writing(self) -> None:
            """The client is not taking what was written: it gets send_timeout seconds to start again."""
            super().pause_writing()
            if self.send_deadline is None:
                self.send_deadline = self.loop.call_later(limits.send_timeout, self.send_too_slow)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self.send_deadline is not None:
                self.send_deadline.cancel()
                self.send_deadline = None

        def send_too_slow(self) -> None:
            refused_counter.labels("send_timeout").inc()
            self.transport.abort()  # what it has not taken is dropped: closing would wait to flush it

        def close(self) -> None:
            """Close, and abort if the client does not take the rest of what was written in time."""
            if self.lost:
                return
            if not self.transport.is_closing():
                self.transport.close()
            if self.send_deadline is None:
                self.send_deadline = self.loop.call_later(limits.send_timeout, self.send_too_slow)

        def timeout_keep_alive_handler(self) -> None:
            self.close()

        def shutdown(self) -> None:
            self.stopping = True
            self.release_refusal()  # now, and the last answer on this connection
            if self.cycle is None or self.cycle.response_complete:
                self._unset_keepalive_if_required()
                self.loop.call_later(SHUTDOWN_LINGER, self.close_if_idle)
            else:
                super().shutdown()

        def close_if_idle(self) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self.close()

    return GuardedHttpToolsProtocol
