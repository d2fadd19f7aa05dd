"""The digitserve HTTP API (v2 protocol aside: serving/v2.py): operations, prediction, models.

Routes reach the process's Service through `app.state.service`; the router's lifespan loads the
models and starts the batcher in each HTTP process before it accepts connections. `install()` puts
the routers and the one error mapping on an app: LitServe's (serving/server.py) or a plain FastAPI
one in the tests.
"""
import asyncio
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from importlib.resources import files
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException

import export_contract as contract
from serving import images, schemas, test_data, v2
from serving.errors import InputError, Overloaded, ServiceError
from serving.http_helpers import AUTH, error_response, read_body, service_of
from serving.metrics import CONTENT_TYPE
from serving.routing import Routed
from serving.service import MAX_IMAGES_PER_REQUEST, Service

PAGE = (Path(__file__).parent / "static" / "index.html").read_text()
DOCS_ASSETS = "/docs/assets"
SWAGGER_UI = files("swagger_ui") / "static"  # the swagger-ui-py package's copy of Swagger UI 5
DOCS_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}


@asynccontextmanager
async def lifespan(app: FastAPI):
    service: Service = app.state.service
    await service.start()
    try:
        yield
    finally:
        await service.stop()


router = APIRouter(lifespan=lifespan)


# --- liveness, readiness, metrics, page ---

@router.get("/health", tags=["operations"], summary="Liveness: the process answers")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", tags=["operations"], summary="Readiness: this process's models are warm",
            responses={503: {"model": schemas.ErrorResponse}})
async def ready(request: Request):
    service = service_of(request)
    if not service.ready:
        return error_response(503, "models are still loading")
    if not service.catalog.served:  # every model failed its checks here: send traffic elsewhere
        return error_response(503, "no model is served by this process: see /models for the reasons")
    return {"status": "ready", "models": sorted(service.catalog.served)}


@router.get("/metrics", tags=["operations"], response_class=PlainTextResponse,
            summary="Prometheus metrics of the whole server")
async def metrics(request: Request):
    return Response(service_of(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/", include_in_schema=False)
async def page():
    return HTMLResponse(PAGE)


@router.get("/docs", include_in_schema=False)
async def docs():
    """Swagger UI from the swagger-ui-py package's files (FastAPI's own /docs loads it from a CDN)."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title="digitserve API",
                               swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                               swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                               swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


@router.get(DOCS_ASSETS + "/{name}", include_in_schema=False)
async def docs_asset(name: str):
    """The three files the page above loads, and nothing else of the package (its editor bundles)."""
    if name not in DOCS_FILES:
        raise HTTPException(404)
    return FileResponse(SWAGGER_UI / name, media_type=DOCS_FILES[name])


# --- prediction ---

PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": schemas.PredictJSON.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "model": {"type": "string"}, "invert": {"type": "boolean"}, "resize": {"type": "boolean"}}}},
}}}


@router.post("/predict", dependencies=AUTH, response_model=schemas.PredictResponse,
             responses=schemas.ERROR_RESPONSES, openapi_extra=PREDICT_BODY, tags=["prediction"],
             summary="Classify one or several 8x8 (digits) or 32x32 (SVHN) images")
async def predict(request: Request):
    """Multipart upload (any number of file fields) or JSON. Options `model`, `invert`, `resize` as
    query parameters, form fields or JSON fields. 8x8 images go to the default digits model, 32x32 to
    the default SVHN model, unless `model` names one."""
    service = service_of(request)
    body = await read_body(request)
    content_type = request.headers.get("content-type", "")
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        inputs, options = await parse_multipart(request, body)
    elif media_type in ("application/json", ""):
        inputs, options = parse_json(body)
    else:
        raise InputError(f"send multipart/form-data or application/json, not {content_type!r}", 415)
    # One rule for every option: a value in the body wins over the query's; each is checked wherever given.
    query = {"model": request.query_params.get("model") or None,
             "invert": parse_bool(request.query_params.get("invert"), "invert"),
             "resize": parse_bool(request.query_params.get("resize"), "resize")}
    model, invert, resize = (options[name] if options[name] is not None else query[name]
                             for name in ("model", "invert", "resize"))
    async with service.admission.admitted():
        routed = await service.prepare(inputs, model, invert, bool(resize))
        request.state.model = routed[0].model.name
        log_probs, batch_images = await service.infer([(r.model, r.array) for r in routed])
    return {"predictions": [prediction(label, r, rows, batch_images, kind == "bytes")
                            for (label, kind, _), r, rows in zip(inputs, routed, log_probs)]}


def prediction(label: str, routed: Routed, log_probs: np.ndarray, batch_images: int, uploaded: bool) -> dict:
    """One input's answer, naming the version that gave it and why; for uploaded images what the model
    saw (a pixels[] entry is what the client sent)."""
    probabilities = np.exp(log_probs.astype(np.float64))
    answer = {"input": label, "model": routed.model.name, "version": routed.model.version, "routed": routed.reason,
              "label": int(np.argmax(log_probs)), "probabilities": [round(float(p), 6) for p in probabilities],
              "batch_size": batch_images}
    if uploaded:
        answer["model_input"] = images.as_pixels(routed.array)
    return answer


def parse_bool(value: str | None, name: str) -> bool | None:
    """A form or query flag; None where it is not given."""
    if value is None or value == "":
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise InputError(f"{name} must be true or false, got {value!r}", 422)


async def parse_multipart(request: Request, body: bytes) -> tuple[list, dict]:
    async def replay():  # the body already read (and size-checked), handed to Starlette's form parser
        return {"type": "http.request", "body": body, "more_body": False}
    try:
        form = await Request(request.scope, replay).form(max_files=MAX_IMAGES_PER_REQUEST, max_fields=16)
    except HTTPException as err:  # Starlette's own limits (too many files or fields)
        raise InputError(f"malformed multipart body: {err.detail}", 400) from None
    except Exception as err:  # the multipart parser raises several types for malformed bodies
        raise InputError(f"malformed multipart body: {images.one_line(err)}", 400) from None
    options = {}
    for name in ("model", "invert", "resize"):
        value = form.get(name)
        if isinstance(value, UploadFile):
            raise InputError(f"form field {name!r} must be a value, not a file", 422)
        options[name] = value
    inputs = [(value.filename or key, "bytes", await value.read())
              for key, value in form.multi_items() if isinstance(value, UploadFile)]
    return inputs, {"model": options["model"] or None, "invert": parse_bool(options["invert"], "invert"),
                    "resize": parse_bool(options["resize"], "resize")}


def parse_json(body: bytes) -> tuple[list, dict]:
    if not body.strip():
        return [], {"model": None, "invert": None, "resize": None}  # "no image", from prepare()
    try:
        payload = schemas.PredictJSON.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        status = 400 if first["type"] == "json_invalid" else 422
        raise InputError(f"invalid JSON body: {first['msg']} at {'/'.join(map(str, first['loc'])) or '(root)'}",
                         status) from None
    inputs = [(f"images[{i}]", "bytes", images.decode_base64(text)) for i, text in enumerate(payload.images)]
    inputs += [(f"pixels[{i}]", "pixels", value) for i, value in enumerate(payload.pixels)]
    return inputs, {"model": payload.model, "invert": payload.invert, "resize": payload.resize}


# --- models ---

@router.get("/models", dependencies=AUTH, response_model=schemas.ModelsResponse, tags=["models"],
            summary="Every model with its status, device, input spec and held-out test metrics")
async def list_models(request: Request):
    service = service_of(request)
    catalog = service.catalog
    return {"backend": service.config.backend, "models": [service.summary(name, catalog) for name in catalog.names]}


@router.get("/models/{name}", dependencies=AUTH, responses=schemas.ERROR_RESPONSES, tags=["models"],
            summary="The full manifest (with validation curves), a link to its curves image, and the versions "
                    "served and rejected since start-up")
async def get_model(name: str, request: Request):
    """An unavailable model answers too (no manifest): its history says which versions failed and why."""
    service = service_of(request)
    catalog = service.catalog
    if name in catalog.unavailable:
        return {**service.summary(name, catalog), "history": list(service.lifecycle.history.get(name, ()))}
    served = catalog.model(name)  # 404 for a name no folder ever had: nothing is kept of it
    return {**service.summary(name, catalog), "manifest": served.manifest, "curves_url": f"/models/{name}/curves.png",
            "history": list(service.lifecycle.history.get(name, ()))}


@router.get("/models/{name}/curves.png", dependencies=AUTH, responses=schemas.ERROR_RESPONSES, tags=["models"],
            response_class=Response, summary="Validation curves with the test value dashed")
async def get_curves(name: str, request: Request):
    return Response(service_of(request).catalog.model(name).curves, media_type="image/png")


@router.post("/models/{name}/evaluate", dependencies=AUTH, response_model=schemas.EvaluateResponse,
             responses=schemas.ERROR_RESPONSES, tags=["models"],
             summary="Run the held-out test split through the served backend now (SVHN: from --data-dir)")
async def evaluate(name: str, request: Request):
    """At low priority: one evaluation at a time per process, its images riding in the room that
    predictions leave in each batch (serving/batcher.py)."""
    service = service_of(request)
    served = service.catalog.model(name)
    started = time.perf_counter()
    async with service.admission.admitted(), service.evaluating:  # before reading: the official SVHN file is 64 MB
        x, y = served.test_split or await asyncio.to_thread(test_data.from_data_dir, served.entry,
                                                            service.config.data_dir)
        log_probs, _ = await service.infer([(served, array) for array in x], background=True)
    measured = contract.test_metrics(np.stack(log_probs), y)
    recorded = {k: served.manifest["metrics"]["test"][k] for k in ("nll", "error", "errors", "n")}
    return {"model": name, "version": served.version, "backend": service.config.backend, "served": measured,
            "manifest": recorded, "agrees": contract.reproduces(measured, recorded),
            "seconds": round(time.perf_counter() - started, 4)}


@router.post("/models/reload", dependencies=AUTH, response_model=schemas.ReloadResponse, tags=["models"],
             summary="Follow the exports folder now: serve new and changed models once verified, drop removed ones")
async def reload_models(request: Request):
    """This process reloads before answering, and every other HTTP process is asked to at once. A
    version that fails its checks is listed as rejected with the reason; the one before it keeps
    answering."""
    service = service_of(request)
    changes = await service.reload()
    return {"changes": changes, "models": sorted(service.catalog.served)}


# --- errors: every one as {"error": ...} with its status ---

async def service_error(request: Request, err: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after)} if isinstance(err, Overloaded) else None
    return error_response(err.status, err.message, headers)


async def http_error(request: Request, err: HTTPException) -> JSONResponse:
    """Starlette's own: unknown paths (404), wrong methods (405)."""
    headers = getattr(err, "headers", None)
    if err.status_code == 404:
        message = f"no route {request.url.path}: see /docs for the API"
    elif err.status_code == 405 and headers and "allow" in {k.lower() for k in headers}:
        allowed = next(v for k, v in headers.items() if k.lower() == "allow")
        message = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
    else:
        message = str(err.detail)
    return error_response(err.status_code, message, headers)


async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    return error_response(422, f"{first['msg']} at {'/'.join(map(str, first['loc']))}")


async def client_gone(request: Request, err: ClientDisconnect) -> Response:
    """The client closed the connection before its request arrived: nobody to answer, nothing wrong
    here. 499 (nginx's "client closed request") is what the metrics count."""
    return Response(status_code=499)


async def unexpected_error(request: Request, err: Exception) -> JSONResponse:
    """A bug: the client gets one JSON line; Starlette re-raises so that the server logs the traceback."""
    return error_response(500, "internal error (logged by the server)")


def install(app: FastAPI, service: Service) -> None:
    """The digitserve routes, the v2 protocol and the error mapping, on `app`."""
    app.state.service = service
    # Starlette would answer /models/ with a redirect to an absolute URL built from the Host header;
    # a path with a trailing slash is simply not a route.
    app.router.redirect_slashes = False
    app.title = "digitserve"
    app.description = "Digit classification (8x8 digits, 32x32 SVHN) over exported ONNX/TorchScript models."
    app.include_router(router)
    app.include_router(v2.router)
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, unexpected_error)
