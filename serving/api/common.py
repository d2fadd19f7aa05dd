"""What every router shares: the process's Service, the API-key dependency, the `{"error": ...}` body."""
from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from serving.service import Service


def service_of(request: Request) -> Service:
    return request.app.state.service


async def require_key(request: Request) -> None:
    """Async: FastAPI runs a plain function dependency in a worker thread, a hand-off per request."""
    service_of(request).check_key(request.headers)


AUTH = [Depends(require_key)]


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)
