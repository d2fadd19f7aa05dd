"""The digitserve HTTP API: the routers (operations, prediction, models, the KServe v2 protocol) and
the one error mapping, installed on an app: LitServe's (serving/server.py) or a plain FastAPI one in
the tests. Routes reach the process's Service through `app.state.service`; the lifespan here loads,
warms and verifies the models and starts the batcher in each HTTP process before it accepts
connections."""
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from serving.api import errors, feedback, models, operations, predict, v2
from serving.metrics import RequestMetrics
from serving.request_ids import RequestIds
from serving.service import Service
from serving.tracing import TracingMiddleware


@asynccontextmanager
async def lifespan(app: FastAPI):
    service: Service = app.state.service
    await service.start()
    try:
        yield
    finally:
        await service.stop()


def middlewares(service: Service) -> list[tuple[type, dict]]:
    """The app's ASGI middleware, innermost first (as LitServe's `middlewares` and add_middleware take
    them): the request ID outside the metrics, so that every answer carries it; the trace's server
    span inside the ID (which it records), and only when tracing is asked for; POST /predict's short
    path inside them all."""
    traced = [(TracingMiddleware, {"service": service})] if service.trace_exporters else []
    return [(predict.ShortPath, {}), (RequestMetrics, {"metrics": service.metrics}), *traced, (RequestIds, {})]


def install(app: FastAPI, service: Service) -> None:
    app.state.service = service
    app.title = "digitserve"
    app.description = "Digit classification over exported ONNX/TorchScript models: 8x8 digits, 32x32 house numbers."
    # Starlette would answer /models/ with a redirect to an absolute URL built from the Host header;
    # a path with a trailing slash is simply not a route.
    app.router.redirect_slashes = False
    app.include_router(APIRouter(lifespan=lifespan))
    for router in (operations.router, predict.router, feedback.router, models.router, v2.router):
        app.include_router(router)
    errors.install(app)
