"""Liveness, readiness, metrics, the web page and the offline API docs."""
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from serving import schemas
from serving.api.common import error_response, service_of
from serving.metrics import CONTENT_TYPE

PAGE = (Path(__file__).parents[1] / "static" / "index.html").read_text()
DOCS_ASSETS = "/docs/assets"
SWAGGER_UI = files("swagger_ui") / "static"  # the swagger-ui-py package's copy of Swagger UI 5
DOCS_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness: the process answers")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: this process's models are warm",
            responses={503: {"model": schemas.ErrorResponse}})
async def ready(request: Request):
    service = service_of(request)
    if not service.ready:
        return error_response(503, "models are still loading")
    if not service.catalog.served:  # every model failed its checks here: send traffic elsewhere
        return error_response(503, "no model is served by this process: see /models for the reasons")
    return {"status": "ready", "models": sorted(service.catalog.served)}


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics of the whole server")
async def metrics(request: Request):
    service = service_of(request)
    return Response(service.metrics.render(await service.live_accuracy()), media_type=CONTENT_TYPE)


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
