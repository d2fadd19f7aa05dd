"""What uvicorn's HTTP connections lack (checked against uvicorn UVICORN_CHECKED): a deadline for
each request to arrive whole, and a stop that leaves no keep-alive client cut off mid-request.

uvicorn times out only idle keep-alive connections; a client that sends its headers or its body a
byte at a time (slowloris), or declares a Content-Length it never sends, holds a connection and a
task forever. Here a request must arrive complete within `read_timeout` seconds of its first byte
(or of the connection opening); else it is answered 408 and the connection closed.

On a graceful stop uvicorn closes idle keep-alive connections at once, racing a client that is
sending its next request on one (it sees a reset). Here an idle connection lingers for
SHUTDOWN_LINGER seconds: a request that arrives is answered, with `Connection: close`.

Used through uvicorn's own parameter for the protocol class (`http=`), which LitServe passes on.
"""
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

UVICORN_CHECKED = "0.54.0"  # pyproject admits 0.54.x
SHUTDOWN_LINGER = 2.0  # seconds: time for a client's next request even on a loaded machine (1 s raced in CI)


def guarded_protocol(read_timeout: float) -> type:
    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.read_deadline = self.loop.call_later(read_timeout, self.request_too_slow)
            self.stopping = False
            self.awaiting_headers = True  # of a request not yet answered (self.cycle is the last one's)

        def connection_lost(self, exc) -> None:
            self.read_deadline.cancel()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:  # the first byte of a request (the next one on a kept-alive connection)
            super().on_message_begin()
            self.awaiting_headers = True
            self.read_deadline.cancel()
            self.read_deadline = self.loop.call_later(read_timeout, self.request_too_slow)

        def on_headers_complete(self) -> None:
            self.awaiting_headers = False
            super().on_headers_complete()
            if self.stopping and self.cycle is not None:
                self.cycle.keep_alive = False  # the last request on this connection

        def on_message_complete(self) -> None:
            self.read_deadline.cancel()
            super().on_message_complete()

        def request_too_slow(self) -> None:
            if self.transport.is_closing():
                return
            if self.awaiting_headers or not self.cycle.response_started:  # else it was answered (413, 503) early
                body = json.dumps({"error": f"the request did not arrive whole within {read_timeout:g} s"}).encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
                                     + body)
                if not self.awaiting_headers:
                    self.cycle.disconnected = True  # the application's answer, if any, is not sent now
            self.transport.close()

        def shutdown(self) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self.stopping = True
                self._unset_keepalive_if_required()
                self.loop.call_later(SHUTDOWN_LINGER, self.close_if_idle)
            else:
                super().shutdown()

        def close_if_idle(self) -> None:
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return GuardedHttpToolsProtocol
