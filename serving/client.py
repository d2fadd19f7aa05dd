"""A Python client for a running digitserve server: `Client` (blocking) and `AsyncClient` (asyncio).

    from serving.client import Client
    with Client("http://127.0.0.1:8000") as client:
        client.predict("samples/digit-8x8-6.png").label          # 6
        [p.label for p in client.predict(["a.png", "b.png"])]      # one Prediction per input, in order

`predict` takes a path, image file bytes, a PIL image or a NumPy array (8x8 on 0..16, 32x32x3 on
0..255; a stack of them is many), one or a list, with the service's options (`model`, `resize`,
`invert`, `raw`, `unsure_below`, `model_input`). Many inputs are sent in requests within the server's
limits (256 inputs, and `max_request_bytes`: 1 MiB, the size up to which the server reads bodies
without rationing; its payload limit is 16 MiB by default), `concurrency` of them at a time. Where a request is
refused for one bad input, it is split until the bad ones are found: with `errors="return"` each
failed input's place holds its exception, the others their answers; otherwise the first is raised.

Every failure the service documents has its exception class, carrying the service's message
(`message`) and status: BadInput (400, 415, 422), TooLarge (413), ModelNotFound (404), Unauthorized
(401), Unavailable (503); Unreachable when nothing answers. A 503 with Retry-After (the server is at
capacity) is retried after the time it names, within `retry_budget` seconds from the first try;
connection failures are retried `retries` times with exponential backoff.

Importing this module loads httpx and nothing of the server; NumPy and Pillow are not imported (arrays
and images are recognised by their type's module).
"""
from __future__ import annotations

import asyncio
import email.utils
import io
import json
import os
import random
import time
from collections.abc import Generator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import quote

import httpx

__all__ = ["Client", "AsyncClient", "Prediction", "ModelInfo", "Figures", "Evaluation", "Readiness", "Change",
           "Reload", "DigitserveError", "BadInput", "UnreadableFile", "TooLarge", "ModelNotFound", "Unauthorized",
           "Unavailable", "Unreachable", "batches"]

MAX_IMAGES_PER_REQUEST = 256  # the server's limit (serving/service.py)
MAX_REQUEST_BYTES = 1 << 20   # the server's default --max-payload-bytes, and its SMALL_BODY (serving/admission.py)
PART_OVERHEAD = 200           # bytes of multipart framing per file, counted generously
SPLIT_STATUSES = {400, 413, 422}  # statuses one input can cause: a request of several is split to find it


# --- results ---

@dataclass(frozen=True)
class Prediction:
    """One input's answer (docs/api.md, "The answer")."""
    input: str                       # the path as given, images[i] or pixels[i] (i: its place in the call)
    label: int
    confidence: float                # calibrated probability of `label`
    decision: str                    # "digit", "unsure" or "not_a_digit"
    candidates: tuple[int, ...]      # the conformal candidate set, most likely first
    probabilities: tuple[float, ...]  # digits 0..9
    model: str
    version: str
    routed: str                      # why that model answered
    batch_size: int
    model_input: list | None = None  # what the model saw (model_input=True, uploaded images only)

    @classmethod
    def of(cls, answer: dict, name: str) -> Prediction:
        return cls(name, answer["label"], answer["confidence"], answer["decision"], tuple(answer["candidates"]),
                   tuple(answer["probabilities"]), answer["model"], answer["version"], answer["routed"],
                   answer["batch_size"], answer.get("model_input"))


@dataclass(frozen=True)
class Figures:
    nll: float
    error: float
    errors: int
    n: int

    @classmethod
    def of(cls, figures: dict | None) -> Figures | None:
        return None if figures is None else cls(figures["nll"], figures["error"], figures["errors"], figures["n"])


@dataclass(frozen=True)
class Change:
    """One event of a model's history: a version served, rejected or removed."""
    model: str
    at: str
    event: str
    version: str | None = None
    reason: str | None = None  # why it was rejected
    note: str | None = None    # why a served version is unverified

    @classmethod
    def of(cls, event: dict) -> Change:
        return cls(event["model"], event["at"], event["event"], event.get("version"), event.get("reason"),
                   event.get("note"))


@dataclass(frozen=True)
class ModelInfo:
    """A model as GET /models lists it; `details`: everything it said."""
    name: str
    status: str                     # "ready" or "unavailable"
    reason: str | None = None       # why it is unavailable
    version: str | None = None
    task: str | None = None
    summary: str | None = None
    default_for: str | None = None  # the input size it answers by default ("8x8")
    device: str | None = None
    provider: str | None = None
    test: Figures | None = None     # the manifest's test figures
    reproduced: bool | None = None  # this server reproduced them before serving it
    rejected: Change | None = None  # the newest version found, when it was not served
    details: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, model: dict) -> ModelInfo:
        rejected = model.get("rejected")
        return cls(model["name"], model["status"], model.get("reason"), model.get("version"), model.get("task"),
                   model.get("summary"), model.get("default_for"), model.get("device"), model.get("provider"),
                   Figures.of(model.get("test")), (model.get("verified") or {}).get("reproduced"),
                   Change.of(rejected) if rejected else None, model)


@dataclass(frozen=True)
class Evaluation:
    """POST /models/NAME/evaluate: the test split through the served backend now."""
    model: str
    version: str
    backend: str
    served: Figures
    manifest: Figures
    agrees: bool
    seconds: float
    calibration: dict | None = None

    @classmethod
    def of(cls, answer: dict) -> Evaluation:
        return cls(answer["model"], answer["version"], answer["backend"], Figures.of(answer["served"]),
                   Figures.of(answer["manifest"]), answer["agrees"], answer["seconds"], answer.get("calibration"))


@dataclass(frozen=True)
class Readiness:
    ready: bool
    models: tuple[str, ...] = ()
    reason: str | None = None  # why not ready


@dataclass(frozen=True)
class Reload:
    changes: tuple[Change, ...]
    models: tuple[str, ...]


# --- errors ---

class DigitserveError(Exception):
    """A request the service refused (`status`, its `message`), or that could not be made (status None).
    `input`: the input it concerns, when one input caused it."""

    def __init__(self, message: str, status: int | None = None, input: str | None = None):
        super().__init__(message)
        self.message, self.status, self.input = message, status, input

    def __str__(self) -> str:
        return f"{self.input}: {self.message}" if self.input else self.message


class BadInput(DigitserveError):
    """400 (not an image, corrupt), 415 (content type), 422 (a size no model takes, no digit found, ...)."""


class UnreadableFile(BadInput):
    """A path the client could not read (nothing was sent)."""


class TooLarge(DigitserveError):
    """413: over the server's payload limit, or an image declaring too many pixels."""


class ModelNotFound(DigitserveError):
    """404: the model named is unknown (the message names the known ones)."""


class Unauthorized(DigitserveError):
    """401: a missing or wrong API key."""


class Unavailable(DigitserveError):
    """503: at capacity beyond the retry budget, the model named is unavailable, or still loading."""


class Unreachable(DigitserveError):
    """Nothing answered: connection refused, reset or timed out, after the retries."""


ERRORS = {400: BadInput, 415: BadInput, 422: BadInput, 413: TooLarge, 404: ModelNotFound, 401: Unauthorized,
          503: Unavailable}


def error_of(response: httpx.Response) -> DigitserveError:
    try:
        message = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:500] or response.reason_phrase
    return ERRORS.get(response.status_code, DigitserveError)(message, response.status_code)


def transport_reason(err: httpx.TransportError) -> str:
    """What went wrong, in words: the operating system's reason where there is one ("Connection refused")."""
    if isinstance(err, httpx.TimeoutException):
        return f"no answer in time ({type(err).__name__})"
    cause, depth = err, 0
    while cause is not None and depth < 10:
        if isinstance(cause, OSError) and cause.strerror:
            return os.strerror(cause.errno) if isinstance(cause.errno, int) and cause.errno > 0 else cause.strerror
        cause, depth = cause.__cause__ or cause.__context__, depth + 1
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date), or None."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds()) if when.tzinfo else None


# --- inputs ---

@dataclass
class Item:
    """One input, ready to send: image file bytes ("bytes") or a pixel array's JSON value ("pixels")."""
    index: int
    name: str
    kind: str
    value: object
    size: int  # bytes it adds to a request
    error: DigitserveError | None = None


def is_array(value) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "ndim")


def is_pil_image(value) -> bool:
    return type(value).__module__.startswith("PIL.") and hasattr(value, "save") and hasattr(value, "mode")


def one_or_many(inputs) -> tuple[list, bool]:
    """The inputs as a list, and whether one was given. A NumPy array is one image when it is H x W or
    H x W x C (C at most 4), otherwise a stack of them."""
    if is_array(inputs):
        single = inputs.ndim == 2 or (inputs.ndim == 3 and inputs.shape[-1] <= 4)
        return ([inputs], True) if single else (list(inputs), False)
    if isinstance(inputs, (str, bytes, bytearray, memoryview, os.PathLike)) or is_pil_image(inputs):
        return [inputs], True
    if isinstance(inputs, Iterable):
        return list(inputs), False
    raise TypeError(f"predict takes a path, bytes, a PIL image or a NumPy array, or a list of them, not "
                    f"{type(inputs).__name__}")


def item(index: int, value) -> Item:
    if isinstance(value, (str, os.PathLike)):
        try:
            with open(value, "rb") as file:
                data = file.read()
        except OSError as err:
            return Item(index, str(value), "bytes", b"", 0,
                        UnreadableFile(f"cannot read it: {err.strerror or err}", input=str(value)))
        return Item(index, str(value), "bytes", data, len(data) + PART_OVERHEAD)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return Item(index, f"images[{index}]", "bytes", data, len(data) + PART_OVERHEAD)
    if is_pil_image(value):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return Item(index, f"images[{index}]", "bytes", buffer.getvalue(), buffer.tell() + PART_OVERHEAD)
    if is_array(value):
        pixels = value.tolist()
        return Item(index, f"pixels[{index}]", "pixels", pixels, len(json.dumps(pixels)) + 2)
    raise TypeError(f"input {index}: a path, bytes, a PIL image or a NumPy array, not {type(value).__name__}")


def batches(sizes: list[int], batch_size: int = MAX_IMAGES_PER_REQUEST,
            max_bytes: int = MAX_REQUEST_BYTES) -> list[list[int]]:
    """Indices of `sizes` in consecutive groups of at most `batch_size` whose sizes add up to at most
    `max_bytes` (an item larger than that goes alone)."""
    groups, current, total = [], [], 0
    for index, size in enumerate(sizes):
        if current and (len(current) >= batch_size or total + size > max_bytes):
            groups.append(current)
            current, total = [], 0
        current.append(index)
        total += size
    return groups + [current] if current else groups


def options_of(model, resize, invert, raw, unsure_below, model_input) -> dict:
    """The options given, checked here so that a bad one costs no request (and no search for a bad input)."""
    if unsure_below is not None and not (isinstance(unsure_below, (int, float)) and 0 <= unsure_below <= 1):
        raise ValueError(f"unsure_below must be a number in [0, 1], got {unsure_below!r}")
    given = {"model": model, "resize": resize, "invert": invert, "raw": raw, "unsure_below": unsure_below,
             "model_input": model_input}
    return {name: value for name, value in given.items() if value is not None}


# --- the exchanges, written once for both clients ---
# Each is a generator that yields what to do ("send" a request, or "sleep") and gets the response back
# (or the transport error thrown in); Client and AsyncClient drive it, blocking or awaiting.

def resume(steps: Generator, response: httpx.Response | None = None, error: Exception | None = None) -> tuple:
    """An exchange's next step, given what the last one gave (a response, a transport error, or nothing
    after a sleep): ("send", request), ("sleep", seconds), or ("done", its result)."""
    try:
        return steps.throw(error) if error is not None else steps.send(response)
    except StopIteration as done:
        return "done", done.value


class Base:
    def __init__(self, url: str, api_key: str | None = None, timeout: float | httpx.Timeout = 30.0, retries: int = 3,
                 retry_budget: float = 30.0, batch_size: int = MAX_IMAGES_PER_REQUEST,
                 max_request_bytes: int = MAX_REQUEST_BYTES, concurrency: int = 4):
        """`api_key`: default $DIGITSERVE_API_KEY. `retries`: tries again after a connection failure;
        `retry_budget`: seconds from a request's first try within which a 503 at capacity is retried.
        `batch_size`, `max_request_bytes`: a request's limits; `concurrency`: requests in flight per call."""
        if not 1 <= batch_size <= MAX_IMAGES_PER_REQUEST:
            raise ValueError(f"batch_size must be 1..{MAX_IMAGES_PER_REQUEST}, got {batch_size}")
        self.url = url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get("DIGITSERVE_API_KEY") or None
        self.headers = {"X-API-Key": key} if key else {}
        self.timeout = timeout
        self.retries, self.retry_budget = retries, retry_budget
        self.batch_size, self.max_request_bytes, self.concurrency = batch_size, max_request_bytes, concurrency

    def request(self, method: str, path: str, headers: dict | None = None, **content) -> httpx.Request:
        try:
            request = httpx.Request(method, self.url + path, headers={**self.headers, **(headers or {})}, **content)
        except httpx.InvalidURL as err:
            raise Unreachable(f"{self.url} is not a URL: {err}") from None
        request.read()  # a multipart body as one piece: streamed, it costs several socket writes per file
        return request

    def exchange(self, method: str, path: str, **content) -> Generator:
        """One request, retried: after a connection failure (with backoff), and after a 503 with
        Retry-After (the time it names) while the budget lasts. Returns the response; raises Unreachable."""
        started, failures = time.monotonic(), 0
        while True:
            try:
                response = yield "send", self.request(method, path, **content)
            except httpx.TransportError as err:
                failures += 1
                backoff = 0.2 * 2 ** (failures - 1) * random.uniform(0.75, 1.25)
                if (isinstance(err, (httpx.UnsupportedProtocol, httpx.ReadTimeout, httpx.WriteTimeout))
                        or failures > self.retries or time.monotonic() - started + backoff > self.retry_budget):
                    raise Unreachable(f"{self.url} does not answer: {transport_reason(err)}") from None
                yield "sleep", backoff
                continue
            wait = retry_after(response.headers.get("retry-after")) if response.status_code == 503 else None
            if wait is not None:
                wait += random.uniform(0, 0.25 * max(wait, 1.0))  # clients refused together come back apart
                if time.monotonic() - started + wait <= self.retry_budget:
                    yield "sleep", wait
                    continue
            return response

    def call(self, method: str, path: str, **content) -> Generator:
        """The JSON answer of a request that must succeed; raises the error the service answered."""
        response = yield from self.exchange(method, path, **content)
        if response.status_code != 200:
            raise error_of(response)
        return response.json()

    def predict_request(self, items: list[Item], options: dict) -> dict:
        if items[0].kind == "pixels":
            body = {**options, "pixels": [i.value for i in items]}
            return {"content": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}}
        fields = {name: str(value).lower() if isinstance(value, bool) else str(value)
                  for name, value in options.items()}
        files = [("file", (os.path.basename(i.name) or "image", i.value, "application/octet-stream")) for i in items]
        return {"data": fields, "files": files}

    def predict_chunk(self, items: list[Item], options: dict, errors: str) -> Generator:
        """Answers (or errors) for items of one kind, sent in one request; split in two and sent again
        while one input's error refuses the whole request."""
        try:
            answer = yield from self.call("POST", "/predict", **self.predict_request(items, options))
            return [Prediction.of(p, i.name) for p, i in zip(answer["predictions"], items, strict=True)]
        except DigitserveError as err:
            if len(items) > 1 and err.status in SPLIT_STATUSES:
                half = len(items) // 2
                return ((yield from self.predict_chunk(items[:half], options, errors))
                        + (yield from self.predict_chunk(items[half:], options, errors)))
            if len(items) == 1 and err.status in SPLIT_STATUSES:
                err.input = items[0].name
            if errors == "raise":
                raise
            return [err] * len(items)

    def plan(self, inputs, options: dict, errors: str) -> tuple[list[Item], list[list[Item]], bool]:
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', not {errors!r}")
        values, single = one_or_many(inputs)
        items = [item(index, value) for index, value in enumerate(values)]
        failed = [i for i in items if i.error is not None]
        if failed and errors == "raise":
            raise failed[0].error
        chunks = []
        for kind in ("bytes", "pixels"):
            group = [i for i in items if i.kind == kind and i.error is None]
            chunks += [[group[k] for k in indices]
                       for indices in batches([i.size for i in group], self.batch_size, self.max_request_bytes)]
        return items, chunks, single

    @staticmethod
    def assemble(items: list[Item], chunks: list[list[Item]], answers: list[list], single: bool):
        results = [i.error for i in items]
        for chunk, answered in zip(chunks, answers):
            for i, result in zip(chunk, answered):
                results[i.index] = result
        return results[0] if single else results

    def readiness(self) -> Generator:
        response = yield from self.exchange("GET", "/ready")
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code not in (200, 503) or not isinstance(answer, dict):
            raise DigitserveError(f"GET {self.url}/ready answered {response.status_code} {response.reason_phrase}: "
                                  "is it a digitserve server?", response.status_code)
        if response.status_code == 503:
            return Readiness(False, reason=error_of(response).message)
        return Readiness(True, tuple(answer.get("models", ())))

    def listing(self) -> Generator:
        answer = yield from self.call("GET", "/models")
        return [ModelInfo.of(model) for model in answer["models"]]

    def evaluation(self, name: str) -> Generator:
        return Evaluation.of((yield from self.call("POST", f"/models/{quote(name, safe='')}/evaluate")))

    def reloading(self) -> Generator:
        answer = yield from self.call("POST", "/models/reload")
        return Reload(tuple(Change.of(c) for c in answer["changes"]), tuple(answer["models"]))


PREDICT_DOC = """Classify `inputs`: a path, image file bytes, a PIL image or a NumPy array (8x8 on 0..16,
        32x32x3 on 0..255; a stack of them is many), or a list of them. One input gives a Prediction,
        a list gives a list in the same order. `errors="return"`: each failed input's place holds its
        exception (a DigitserveError) instead of raising the first. Options as in docs/api.md."""


class Client(Base):
    """Blocking client; one per thread or shared (httpx.Client is thread-safe). Use as a context
    manager, or call close()."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float | httpx.Timeout = 30.0, *,
                 transport: httpx.BaseTransport | None = None, **settings):
        super().__init__(url, api_key, timeout, **settings)
        self.http = httpx.Client(timeout=timeout, transport=transport)

    def run(self, steps: Generator):
        action, argument = resume(steps)
        while action != "done":
            if action == "sleep":
                time.sleep(argument)
                action, argument = resume(steps)
                continue
            try:
                response = self.http.send(argument)
                response.read()
            except httpx.TransportError as err:
                action, argument = resume(steps, error=err)
                continue
            action, argument = resume(steps, response)
        return argument

    def predict(self, inputs, *, model: str | None = None, resize: bool | None = None, invert: bool | None = None,
                raw: bool | None = None, unsure_below: float | None = None, model_input: bool | None = None,
                errors: str = "raise"):
        options = options_of(model, resize, invert, raw, unsure_below, model_input)
        items, chunks, single = self.plan(inputs, options, errors)
        send = lambda chunk: self.run(self.predict_chunk(chunk, options, errors))  # noqa: E731
        if self.concurrency > 1 and len(chunks) > 1:
            pool = ThreadPoolExecutor(min(self.concurrency, len(chunks)))
            try:
                answers = list(pool.map(send, chunks))
            finally:
                pool.shutdown(cancel_futures=True)  # after an error raised: the requests not yet sent
        else:
            answers = [send(chunk) for chunk in chunks]
        return self.assemble(items, chunks, answers, single)

    predict.__doc__ = PREDICT_DOC

    def ready(self) -> Readiness:
        """GET /ready: whether the process that answers has its models warm (never raises for 503)."""
        return self.run(self.readiness())

    def models(self) -> list[ModelInfo]:
        """GET /models: every model, served or not."""
        return self.run(self.listing())

    def evaluate(self, name: str) -> Evaluation:
        """POST /models/NAME/evaluate: the model's test split through the served backend now."""
        return self.run(self.evaluation(name))

    def reload(self) -> Reload:
        """POST /models/reload: follow the exports folder now."""
        return self.run(self.reloading())

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(Base):
    """asyncio client: the same methods as Client, awaited. Use with `async with`, or await aclose()."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float | httpx.Timeout = 30.0, *,
                 transport: httpx.AsyncBaseTransport | None = None, **settings):
        super().__init__(url, api_key, timeout, **settings)
        self.http = httpx.AsyncClient(timeout=timeout, transport=transport)

    async def run(self, steps: Generator):
        action, argument = resume(steps)
        while action != "done":
            if action == "sleep":
                await asyncio.sleep(argument)
                action, argument = resume(steps)
                continue
            try:
                response = await self.http.send(argument)
                await response.aread()
            except httpx.TransportError as err:
                action, argument = resume(steps, error=err)
                continue
            action, argument = resume(steps, response)
        return argument

    async def predict(self, inputs, *, model: str | None = None, resize: bool | None = None,
                      invert: bool | None = None, raw: bool | None = None, unsure_below: float | None = None,
                      model_input: bool | None = None, errors: str = "raise"):
        options = options_of(model, resize, invert, raw, unsure_below, model_input)
        items, chunks, single = self.plan(inputs, options, errors)
        room = asyncio.Semaphore(max(1, self.concurrency))

        async def send(chunk):
            async with room:
                return await self.run(self.predict_chunk(chunk, options, errors))
        tasks = [asyncio.ensure_future(send(chunk)) for chunk in chunks]
        try:
            answers = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # after an error raised: the requests not yet answered
                task.cancel()
        return self.assemble(items, chunks, answers, single)

    predict.__doc__ = PREDICT_DOC

    async def ready(self) -> Readiness:
        return await self.run(self.readiness())

    async def models(self) -> list[ModelInfo]:
        return await self.run(self.listing())

    async def evaluate(self, name: str) -> Evaluation:
        return await self.run(self.evaluation(name))

    async def reload(self) -> Reload:
        return await self.run(self.reloading())

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
