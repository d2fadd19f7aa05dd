"""The HTTP side: a LitServe server whose FastAPI app carries the digitserve routes.

LitServe owns the app, the HTTP processes (`--workers`), their start-up, readiness and graceful
shutdown. The routes here decode and validate uploads (so a bad one fails alone), hand clean arrays
to the LitAPI's batched predict through an in-process dynamic batcher (serving/batcher.py says why
not through LitServe's worker queue), and shape the answers: /predict, /models, the KServe v2
protocol, /health, /ready, /metrics and the web page.
"""
import asyncio
import contextlib
import hmac
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from litserve.utils import WorkerSetupStatus
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from serving import images, registry
from serving.api import ClassifierAPI, LitServeWorkerAPI
from serving.batcher import DynamicBatcher
from serving.metrics import FLUSH_SECONDS, Metrics

STATIC = Path(__file__).parent / "static"
MAX_IMAGES_PER_REQUEST = 256
GRACEFUL_SHUTDOWN_SECONDS = 7  # in-flight requests get this long after SIGTERM; orchestrators wait 10 s or more
V2_DATATYPES = {"FP32": np.float32, "UINT8": np.uint8}


@dataclass
class Config:
    exports: Path = Path("exports")
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "onnx"
    device: str = "auto"
    max_batch_size: int = 64
    batch_timeout: float = 0.0
    workers: int = 2
    api_key: str | None = None
    max_payload_bytes: int = 1 << 20
    request_timeout: float = 30.0


class StartupError(Exception):
    """The server cannot start (no usable model, bad exports folder)."""


# --- Request and response schemas (they are the OpenAPI document) ---

class PredictJSON(BaseModel):
    model: str | None = Field(None, description="model name; default: routed by image size")
    invert: bool = Field(False, description="digits: the image is dark ink on a light background")
    resize: bool = Field(False, description="resize other sizes (antialiased) instead of refusing them")
    images: list[str] = Field(default_factory=list, description="base64 (or data-URL) encoded image files")
    pixels: list[Any] = Field(default_factory=list,
                              description="raw arrays: 8x8 on 0..16 (digits) or 32x32x3 on 0..255 (SVHN, RGB)")


class Prediction(BaseModel):
    input: str = Field(description="the upload's file name, or images[i] / pixels[i]")
    model: str
    version: str
    label: int
    probabilities: list[float] = Field(description="one per class 0..9")
    batch_size: int = Field(description="images in the inference call this one shared")


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class TestMetrics(BaseModel):
    nll: float
    error: float
    errors: int
    n: int


class ModelSummary(BaseModel):
    name: str
    status: str = Field(description="ready | loading | unavailable")
    reason: str | None = Field(None, description="why the model is unavailable")
    task: str | None = None
    version: str | None = None
    summary: str | None = None
    default_for: str | None = Field(None, description="the image size this model answers by default")
    input: dict | None = None
    test: TestMetrics | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None


class ModelsResponse(BaseModel):
    backend: str
    models: list[ModelSummary]


class EvaluateResponse(BaseModel):
    model: str
    backend: str
    served: TestMetrics
    manifest: TestMetrics
    agrees: bool = Field(description="same error count and NLL within 1e-4 of the manifest's")
    seconds: float


class ErrorResponse(BaseModel):
    error: str


class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class V2InferRequest(BaseModel):
    id: str | None = None
    inputs: list[V2Tensor]
    outputs: list[dict] | None = None
    parameters: dict | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2Tensor]


ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 503)}


class Service:
    """Everything the routes share: the checked exports, the defaults, the key, the counters."""

    def __init__(self, config: Config):
        self.config = config
        try:
            self.entries = {e.name: e for e in registry.scan(config.exports, config.backend)}
        except registry.ExportsError as err:
            raise StartupError(str(err)) from None
        self.ready_models = {name: e for name, e in self.entries.items() if e.available}
        if not self.ready_models:
            reasons = "; ".join(f"{name}: {e.error}" for name, e in self.entries.items()) or "the folder is empty"
            raise StartupError(f"no usable model in {config.exports} ({reasons})")
        # One input spec per image shape: 8x8 grayscale -> digits models, 32x32 RGB -> SVHN models.
        self.task_specs = {}
        self.defaults = {}  # task -> default model name
        for name, entry in self.ready_models.items():
            task = entry.manifest["task"]
            self.task_specs.setdefault(task, entry.manifest["input"])
            if task not in self.defaults or name == f"{task}-cnn":
                self.defaults[task] = name
        self.accepted_sizes = [images.spec_size(spec) for spec in self.task_specs.values()]
        self.metrics: Metrics | None = None
        self.server: ls.LitServer | None = None
        self.batcher: DynamicBatcher | None = None

    # --- state ---

    def workers_ready(self) -> bool:
        """This process's models are warm and batching, and LitServe reports its workers set up."""
        status = self.server.workers_setup_status if self.server else None
        litserve_ready = bool(status) and all(v == WorkerSetupStatus.READY for v in status.values())
        return litserve_ready and self.batcher is not None and self.batcher.ready

    def model_status(self) -> dict[str, str]:
        ready = "ready" if self.workers_ready() else "loading"
        return {name: ready if e.available else "unavailable" for name, e in self.entries.items()}

    def model(self, name: str) -> registry.ModelEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise HTTPException(404, f"unknown model {name!r}; known: {', '.join(sorted(self.entries))}")
        if not entry.available:
            raise HTTPException(503, f"model {name!r} is unavailable: {entry.error}")
        return entry

    def default_model(self, task: str) -> registry.ModelEntry:
        if task not in self.defaults:
            raise HTTPException(422, f"no {task} model is served for this image size")
        return self.ready_models[self.defaults[task]]

    # --- inference, through this process's batcher ---

    async def infer(self, items: list[tuple[str, np.ndarray]]) -> dict:
        """Queue one request's arrays for the batcher; they may share an inference call with others."""
        result = await self.batcher.submit(items)
        counts = {}
        for name, _ in items:
            counts[name] = counts.get(name, 0) + 1
        self.metrics.record_inference(counts, result["batch_size"])
        return result

    # --- decoding an upload for a chosen or routed model ---

    def prepare_file(self, data: bytes, model: str | None, invert: bool, resize: bool) -> tuple[str, np.ndarray]:
        image = images.decode_image_bytes(data)
        if model is not None:
            entry = self.model(model)
        else:
            entry = self.route_by_size(image, resize)
        spec = entry.manifest["input"]
        pixels = images.to_gray_or_rgb(image, spec["color"])
        pixels = images.fit_size(pixels, images.spec_size(spec), resize, self.accepted_sizes)
        return entry.name, images.model_input(pixels, spec, invert)

    def route_by_size(self, image, resize: bool) -> registry.ModelEntry:
        width, height = image.size
        for task, spec in self.task_specs.items():
            if images.spec_size(spec) == (height, width):
                return self.default_model(task)
        if resize:  # no exact match: colour photos go to SVHN when served, everything else to digits
            colour = image.mode not in ("1", "L", "LA", "I", "I;16", "F") and "svhn" in self.defaults
            return self.default_model("svhn" if colour or "digits" not in self.defaults else "digits")
        raise images.size_error(width, height, self.accepted_sizes)


class RequestMetrics:
    """Counts every HTTP request by model, route template, method and status, with its latency.

    Plain ASGI (not BaseHTTPMiddleware, which costs a task and a stream per request)."""

    def __init__(self, app, service: "Service"):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            model = scope.get("path_params", {}).get("name") or scope.get("state", {}).get("model", "")
            self.service.metrics.record_request(model, route, scope["method"], status,
                                                time.perf_counter() - started)


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def parse_bool(value: str | None, name: str) -> bool:
    if value is None or value == "":
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise images.InputError(422, f"{name} must be true or false, got {value!r}")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise images.InputError(413, f"payload of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise images.InputError(413, f"payload exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def install_routes(app: FastAPI, service: Service) -> None:
    config = service.config

    def require_key(request: Request) -> None:
        if config.api_key is None:
            return
        supplied = request.headers.get("x-api-key")
        authorization = request.headers.get("authorization", "")
        if supplied is None and authorization.lower().startswith("bearer "):
            supplied = authorization[7:]
        if supplied is None or not hmac.compare_digest(supplied.encode(), config.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key (X-API-Key header or Authorization: Bearer)")

    auth = [Depends(require_key)]

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(images.InputError)
    async def input_error(request: Request, exc: images.InputError):
        return error_response(exc.status, exc.message)

    app.add_middleware(RequestMetrics, service=service)

    # --- liveness, readiness, metrics, page ---

    @app.get("/health", tags=["operations"], summary="Liveness: the process answers")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"], summary="Readiness: every loaded model is warm",
             responses={503: {"model": ErrorResponse}})
    async def ready():
        if service.workers_ready():
            return {"status": "ready", "models": sorted(service.ready_models)}
        return error_response(503, "models are still loading")

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.render(service.model_status()),
                                 media_type="text/plain; version=0.0.4")

    page_html = (STATIC / "index.html").read_text()

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(page_html)

    # --- prediction ---

    predict_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": PredictJSON.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "model": {"type": "string"}, "invert": {"type": "boolean"}, "resize": {"type": "boolean"}}}},
    }}}

    @app.post("/predict", dependencies=auth, response_model=PredictResponse, responses=ERRORS,
              openapi_extra=predict_body, tags=["prediction"],
              summary="Classify one or several 8x8 (digits) or 32x32 (SVHN) images")
    async def predict(request: Request):
        """Multipart upload (any number of file fields) or JSON. Options `model`, `invert`, `resize` as
        query parameters, form fields or JSON fields. 8x8 images go to the default digits model, 32x32 to
        the default SVHN model, unless `model` names one."""
        body = await read_body(request, config.max_payload_bytes)
        query = request.query_params
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            inputs, options = await parse_multipart(request, body)
        elif content_type.startswith("application/json") or not content_type:
            inputs, options = parse_json(body)
        else:
            raise images.InputError(415, f"send multipart/form-data or application/json, not {content_type!r}")
        model = options.get("model") or query.get("model") or None
        invert = options.get("invert") or parse_bool(query.get("invert"), "invert")
        resize = options.get("resize") or parse_bool(query.get("resize"), "resize")
        if not inputs:
            raise images.InputError(422, "no image: upload files, or send images[] or pixels[] as JSON")
        if len(inputs) > MAX_IMAGES_PER_REQUEST:
            raise images.InputError(413, f"{len(inputs)} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}")
        items, labels = [], []
        for label, kind, value in inputs:
            if kind == "bytes":
                items.append(service.prepare_file(value, model, invert, resize))
            else:
                items.append(prepare_pixels(value, model, invert))
            labels.append(label)
        request.state.model = items[0][0]
        result = await service.infer(items)
        return {"predictions": [prediction(label, name, log_probs, result["batch_size"])
                                for label, (name, _), log_probs in zip(labels, items, result["log_probs"])]}

    def prepare_pixels(value, model: str | None, invert: bool) -> tuple[str, np.ndarray]:
        task, array = images.pixels_array(value, service.task_specs, invert)
        entry = service.model(model) if model else service.default_model(task)
        if entry.manifest["task"] != task:
            raise images.InputError(422, f"model {entry.name!r} takes {entry.manifest['task']} inputs, not {task}")
        return entry.name, array

    def prediction(label: str, name: str, log_probs: np.ndarray, batch_size: int) -> dict:
        probabilities = np.exp(log_probs.astype(np.float64))
        return {"input": label, "model": name, "version": service.entries[name].manifest["version"],
                "label": int(np.argmax(log_probs)), "probabilities": [round(float(p), 6) for p in probabilities],
                "batch_size": batch_size}

    # --- models ---

    def summary(name: str) -> dict:
        entry = service.entries[name]
        status = service.model_status()[name]
        if not entry.available:
            return {"name": name, "status": status, "reason": entry.error}
        m = entry.manifest
        default_for = next((f"{w}x{h}" for task, default in service.defaults.items() if default == name
                            for h, w in [images.spec_size(m["input"])]), None)
        test = m["metrics"]["test"]
        return {"name": name, "status": status, "task": m["task"], "version": m["version"], "summary": m.get("summary"),
                "default_for": default_for, "input": m["input"],
                "test": {k: test[k] for k in ("nll", "error", "errors", "n")},
                "best_epoch": m["metrics"]["best_epoch"], "epochs_run": m["metrics"]["epochs_run"]}

    @app.get("/models", dependencies=auth, response_model=ModelsResponse, tags=["models"],
             summary="Every model with its status, input spec and held-out test metrics")
    async def list_models():
        return {"backend": config.backend, "models": [summary(name) for name in service.entries]}

    @app.get("/models/{name}", dependencies=auth, responses=ERRORS, tags=["models"],
             summary="The full manifest (with validation curves) and a link to its curves image")
    async def get_model(name: str):
        entry = service.model(name)
        return {**summary(name), "manifest": entry.manifest, "curves_url": f"/models/{name}/curves.png"}

    @app.get("/models/{name}/curves.png", dependencies=auth, responses=ERRORS, tags=["models"],
             response_class=FileResponse, summary="Validation curves with the test value dashed")
    async def get_curves(name: str):
        entry = service.model(name)
        return FileResponse(entry.folder / entry.manifest["curves"], media_type="image/png")

    @app.post("/models/{name}/evaluate", dependencies=auth, response_model=EvaluateResponse, responses=ERRORS,
              tags=["models"], summary="Run the held-out test split through the served backend now")
    async def evaluate(name: str):
        entry = service.model(name)
        if "test_set" not in entry.manifest:
            raise HTTPException(422, f"model {name!r} carries no embedded test split to evaluate on")
        with np.load(entry.folder / entry.manifest["test_set"]["file"], allow_pickle=False) as data:
            x, y = data["x"], data["y"]
        started = time.perf_counter()
        log_probs = []
        for start in range(0, len(y), MAX_IMAGES_PER_REQUEST):
            chunk = x[start:start + MAX_IMAGES_PER_REQUEST]
            log_probs += (await service.infer([(name, array) for array in chunk]))["log_probs"]
        log_probs = np.stack(log_probs).astype(np.float64)
        errors = int((log_probs.argmax(1) != y).sum())
        served = {"nll": float(-log_probs[np.arange(len(y)), y].mean()), "error": errors / len(y),
                  "errors": errors, "n": int(len(y))}
        recorded = {k: entry.manifest["metrics"]["test"][k] for k in ("nll", "error", "errors", "n")}
        agrees = served["errors"] == recorded["errors"] and abs(served["nll"] - recorded["nll"]) <= 1e-4
        return {"model": name, "backend": config.backend, "served": served, "manifest": recorded,
                "agrees": agrees, "seconds": round(time.perf_counter() - started, 4)}

    install_v2_routes(app, service, auth)


def install_v2_routes(app: FastAPI, service: Service, auth: list) -> None:
    """The Open Inference Protocol (KServe v2) REST subset: metadata, health, readiness and infer."""

    def v2_model(name: str) -> registry.ModelEntry:
        entry = service.entries.get(name)
        if entry is None or not entry.available:
            raise HTTPException(404, f"model {name!r} is not served")
        return entry

    @app.get("/v2", tags=["v2"], summary="Server metadata")
    async def v2_server():
        return {"name": "digitserve", "version": "0.1.0", "extensions": []}

    @app.get("/v2/health/live", tags=["v2"])
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"], responses={503: {"model": ErrorResponse}})
    async def v2_ready():
        if service.workers_ready():
            return {"ready": True}
        return error_response(503, "models are still loading")

    @app.get("/v2/models/{name}", dependencies=auth, tags=["v2"], responses=ERRORS)
    async def v2_metadata(name: str):
        m = v2_model(name).manifest
        dtype = {"float32": "FP32", "uint8": "UINT8"}[m["input"]["dtype"]]
        return {"name": name, "versions": [m["version"]], "platform": f"digitserve_{service.config.backend}",
                "inputs": [{"name": m["input"]["name"], "datatype": dtype,
                            "shape": [-1 if d is None else d for d in m["input"]["shape"]]}],
                "outputs": [{"name": m["output"]["name"], "datatype": "FP32", "shape": [-1, 10]}]}

    @app.get("/v2/models/{name}/ready", dependencies=auth, tags=["v2"], responses=ERRORS)
    async def v2_model_ready(name: str):
        v2_model(name)
        if not service.workers_ready():
            return error_response(400, f"model {name!r} is loading")
        return {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer", dependencies=auth, response_model=V2InferResponse, responses=ERRORS,
              tags=["v2"], summary="Infer on an FP32 or UINT8 tensor N x C x H x W (row-major data)")
    async def v2_infer(name: str, request: Request):
        entry = v2_model(name)
        request.state.model = name
        body = await read_body(request, service.config.max_payload_bytes)
        try:
            infer = V2InferRequest.model_validate_json(body)
        except ValidationError as err:
            raise HTTPException(400, f"invalid inference request: {err.errors()[0]['msg']} at "
                                     f"{'/'.join(map(str, err.errors()[0]['loc']))}") from None
        if len(infer.inputs) != 1:
            raise HTTPException(400, f"expected exactly one input tensor, got {len(infer.inputs)}")
        array = v2_tensor(infer.inputs[0], entry.manifest["input"])
        result = await service.infer([(name, row) for row in array])
        log_probs = np.stack(result["log_probs"]).astype(np.float32)
        return {"model_name": name, "model_version": entry.manifest["version"], "id": infer.id,
                "outputs": [{"name": entry.manifest["output"]["name"], "shape": list(log_probs.shape),
                             "datatype": "FP32", "data": log_probs.ravel().tolist()}]}


def v2_tensor(tensor: V2Tensor, spec: dict) -> np.ndarray:
    """A v2 input tensor -> the model's N x C x H x W array, checked against the manifest spec."""
    if tensor.datatype not in V2_DATATYPES:
        raise HTTPException(400, f"datatype {tensor.datatype} not supported (FP32 or UINT8)")
    expected = spec["shape"][1:]
    if len(tensor.shape) != 4 or tensor.shape[1:] != expected or tensor.shape[0] < 1:
        raise HTTPException(400, f"shape {tensor.shape} does not match [N, {', '.join(map(str, expected))}]")
    if tensor.shape[0] > MAX_IMAGES_PER_REQUEST:
        raise HTTPException(400, f"batch {tensor.shape[0]} exceeds {MAX_IMAGES_PER_REQUEST}")
    try:
        flat = np.asarray(tensor.data, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise HTTPException(400, "data must be numbers") from None
    if flat.size != int(np.prod(tensor.shape)):
        raise HTTPException(400, f"data has {flat.size} values; shape {tensor.shape} needs {int(np.prod(tensor.shape))}")
    if tensor.datatype == "UINT8" and not np.array_equal(flat, np.round(flat)):
        raise HTTPException(400, "UINT8 data must be integers")
    problem = images.value_problem(flat, spec)
    if problem:
        raise HTTPException(400, problem)
    return flat.reshape(tensor.shape).astype(spec["dtype"])


async def parse_multipart(request: Request, body: bytes) -> tuple[list, dict]:
    request._body = body  # the size-checked body, so Starlette's parser does not read the stream again
    try:
        form = await request.form(max_files=MAX_IMAGES_PER_REQUEST, max_fields=16)
    except Exception as err:  # Starlette raises several types for malformed multipart bodies
        raise images.InputError(400, f"malformed multipart body: {err}") from None
    inputs = []
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            inputs.append((value.filename or key, "bytes", await value.read()))
    options = {"model": form.get("model") or None,
               "invert": parse_bool(form.get("invert"), "invert"), "resize": parse_bool(form.get("resize"), "resize")}
    return inputs, options


def parse_json(body: bytes) -> tuple[list, dict]:
    try:
        payload = PredictJSON.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        status = 400 if first["type"] == "json_invalid" else 422
        raise images.InputError(status, f"invalid JSON body: {first['msg']} at "
                                        f"{'/'.join(map(str, first['loc'])) or '(root)'}") from None
    inputs = [(f"images[{i}]", "bytes", images.decode_base64(text)) for i, text in enumerate(payload.images)]
    inputs += [(f"pixels[{i}]", "pixels", value) for i, value in enumerate(payload.pixels)]
    return inputs, {"model": payload.model, "invert": payload.invert, "resize": payload.resize}


def build_server(config: Config) -> tuple[ls.LitServer, Service]:
    service = Service(config)
    models = {name: {"path": str(e.artifact_path(config.backend)), "input": e.manifest["input"]}
              for name, e in service.ready_models.items()}
    accelerator = "cuda" if config.device in ("cuda", "auto") and _cuda_present() else "cpu"
    # LitServe always launches a worker process for its LitAPI; ours sets the models up there too
    # (its readiness is part of /ready) but receives no requests: with max_batch_size 1 its loop
    # blocks on the queue instead of polling it.
    litserve_api = LitServeWorkerAPI(models, config.backend, config.device, max_batch_size=1)
    server = ls.LitServer(litserve_api, accelerator=accelerator, devices=1, workers_per_device=1,
                          timeout=config.request_timeout)
    server.uvicorn_graceful_timeout = GRACEFUL_SHUTDOWN_SECONDS
    # LitServe's own "/", "/health", "/info" and "/predict" give way to the routes below.
    server.app.router.routes = [r for r in server.app.router.routes
                                if getattr(r, "path", None) not in ("/", "/health", "/info", "/predict")]
    server.app.title = "digitserve"
    server.app.description = "Digit classification (8x8 digits, 32x32 SVHN) over exported ONNX/TorchScript models."
    service.server = server
    metrics_folder = Path(tempfile.mkdtemp(prefix="digitserve-metrics-"))
    service.metrics = Metrics(metrics_folder)
    batched_api = ClassifierAPI(models, config.backend, config.device, config.max_batch_size)
    install_lifespan(server.app, service, batched_api)
    install_routes(server.app, service)
    return server, service


def install_lifespan(app: FastAPI, service: Service, api: ClassifierAPI) -> None:
    """Each HTTP process loads and warms its models before accepting connections, and flushes its
    metrics for the other processes' /metrics answers."""
    litserve_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with litserve_lifespan(app):
            service.batcher = DynamicBatcher(api, service.config.max_batch_size, service.config.batch_timeout)
            service.batcher.start()
            flusher = asyncio.get_running_loop().create_task(flush_metrics(service.metrics))
            try:
                yield
            finally:
                flusher.cancel()
                await service.batcher.stop()
    app.router.lifespan_context = lifespan


async def flush_metrics(metrics: Metrics) -> None:
    while True:
        await asyncio.sleep(FLUSH_SECONDS)
        metrics.flush()


def _cuda_present() -> bool:
    """A GPU is usable when NVIDIA's driver library loads; no torch needed to find out."""
    import ctypes
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False
