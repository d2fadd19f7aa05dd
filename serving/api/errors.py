"""Every error any route raises, answered as `{"error": ...}` with its status: the one mapping."""
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from serving.api.common import error_response
from serving.errors import Overloaded, ServiceError


async def service_error(request: Request, err: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after)} if isinstance(err, Overloaded) else None
    return error_response(err.status, err.message, headers)


async def http_error(request: Request, err: HTTPException) -> JSONResponse:
    """Starlette's own: unknown paths (404), wrong methods (405)."""
    headers = getattr(err, "headers", None)
    if err.status_code == 404:
        message = f"no route {request.url.path[:200]}: see /docs for the API"
    elif err.status_code == 405 and headers and "allow" in {k.lower() for k in headers}:
        allowed = next(v for k, v in headers.items() if k.lower() == "allow")
        message = f"{request.method} is not allowed on {request.url.path[:200]}; use {allowed}"
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
    """A bug: the client gets one JSON line and the request's ID (Starlette answers it outside the
    middleware that adds it), then re-raises, so that the server logs the traceback with that ID."""
    request_id = getattr(request.state, "request_id", None)
    return error_response(500, "internal error (logged by the server)",
                          {"X-Request-ID": request_id} if request_id else None)


# Exception alone is answered outside the middleware (Starlette's ServerErrorMiddleware), which then
# re-raises it for the server to log.
HANDLERS = {ServiceError: service_error, HTTPException: http_error, RequestValidationError: validation_error,
            ClientDisconnect: client_gone, Exception: unexpected_error}


def install(app: FastAPI) -> None:
    for error_type, handler in HANDLERS.items():
        app.add_exception_handler(error_type, handler)


async def answer(request: Request, err: Exception) -> Response:
    """`err`'s answer, as FastAPI's exception middleware gives it, for a request that does not pass
    there (serving/api/predict.py's ShortPath); an unexpected error is raised on to the outermost."""
    for error_type in type(err).__mro__:
        if error_type in HANDLERS and error_type is not Exception:
            return await HANDLERS[error_type](request, err)
    raise err
