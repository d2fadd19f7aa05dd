"""Request IDs: every response carries `X-Request-ID`, the client's own where it sent a usable one,
else one made here; the request's log lines and its predictions carry it too, so a user's complaint
leads to the log line and the prediction (and /feedback can name it).

A client's ID is used only if it is 1 to 128 characters of letters, digits and `._:-`: anything else
(too long, spaces, control characters, a second header) is replaced, never echoed, so that an ID can
be written to logs and headers as it is. `/` is not allowed: the predictions of a request with several
inputs are named `ID/0`, `ID/1`, ...
"""
import contextvars
import logging
import random
import re

HEADER = b"x-request-id"
VALID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
current: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def usable(supplied: bytes | None) -> str:
    """The client's ID where it is one, else a new one (32 hex digits)."""
    if supplied is not None and VALID.fullmatch(supplied):
        return supplied.decode("ascii")
    return f"{random.getrandbits(128):032x}"  # unique, not secret: uuid4's system call per request is not needed


def prediction_ids(request_id: str, count: int) -> list[str]:
    """The `id` of each prediction of one request: the request's own where it has one input."""
    return [request_id] if count == 1 else [f"{request_id}/{i}" for i in range(count)]


class RequestIds:
    """Pure ASGI middleware, outermost: the ID in `request.state.request_id`, in the log context
    (`current`), and in the response's headers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        supplied = [value for name, value in scope["headers"] if name == HEADER]
        request_id = usable(supplied[0] if len(supplied) == 1 else None)
        scope.setdefault("state", {})["request_id"] = request_id
        # Each request runs in a task of its own (uvicorn's), so the ID set here is its alone, and is
        # still set when an unexpected error is logged outside this middleware.
        current.set(request_id)
        header = (HEADER, request_id.encode("ascii"))

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)
        await self.app(scope, receive, send_with_id)


class RequestIdFilter(logging.Filter):
    """Puts the ID of the request being handled (or "-") on every log record as `request_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current.get()
        return True
