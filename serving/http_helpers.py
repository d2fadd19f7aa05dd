"""Small pieces every router uses: the process's Service, the API-key dependency, bounded body
reading and the `{"error": ...}` response."""
from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from serving.errors import InputError
from serving.service import Service


def service_of(request: Request) -> Service:
    return request.app.state.service


def require_key(request: Request) -> None:
    service_of(request).check_key(request.headers)


AUTH = [Depends(require_key)]


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 from its declared length, or as soon as it passes the limit."""
    limit = service_of(request).config.max_payload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputError(f"payload of {declared} bytes exceeds the limit of {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(f"payload exceeds the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)
