"""A /predict request's body and options, read: multipart uploads, JSON (base64 images, pixel arrays)
or one image sent as the body itself; the options from the query, form fields or JSON fields.

The body is read up to --max-payload-bytes (413 from its declared length, or as soon as it passes
the limit). One rule for every option: a value in the body wins over the query's; each is checked
wherever it is given. Nothing is decoded here (serving/routing.py does that, off the event loop for
large requests): an input is (label, "bytes" | "pixels", value).
"""
import base64
import binascii
from dataclasses import dataclass

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from serving import images, schemas
from serving.errors import InputError
from serving.service import MAX_IMAGES_PER_REQUEST

# Image files sent as the whole body (`curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg'`).
IMAGE_TYPES = {"image/png", "image/jpeg", "image/bmp", "image/gif", "image/webp"}


@dataclass(frozen=True)
class Options:
    model: str | None = None     # None: routed by the input (serving/routing.py)
    invert: bool | None = None   # dark ink on light; None: resize=true detects it, exact sizes take no
    resize: bool = False
    model_input: bool = False    # answer what the model saw, for uploaded images
    raw: bool = False            # the model's own probabilities, not the calibrated ones
    unsure_below: float | None = None  # this request's confidence threshold (None: the model's own)

    BOOLEAN = ("invert", "resize", "model_input", "raw")
    NAMES = ("model", *BOOLEAN, "unsure_below")


async def read_request(request: Request, limit: int) -> tuple[list[tuple], Options]:
    body = await read_body(request, limit)
    content_type = request.headers.get("content-type", "")
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        inputs, given = await parse_multipart(request, body)
    elif media_type in ("application/json", ""):
        inputs, given = parse_json(body)
    elif media_type in IMAGE_TYPES:
        inputs, given = [("body", "bytes", body)] if body else [], {}
    else:
        raise InputError(f"send multipart/form-data, application/json or an image ({', '.join(sorted(IMAGE_TYPES))}), "
                         f"not {content_type[:100]!r}", 415)
    query = options(request.query_params, "query parameter")
    merged = {name: given.get(name) if given.get(name) is not None else query.get(name) for name in Options.NAMES}
    return inputs, Options(**{name: value for name, value in merged.items() if value is not None})


def options(fields, where: str) -> dict:
    """The options among query parameters or form fields, each checked; 422 naming an unknown one."""
    values = {}
    for name, value in fields.items():
        if name not in Options.NAMES:
            raise InputError(f"unknown {where} {name[:50]!r}; the options are {', '.join(Options.NAMES)}", 422)
        if isinstance(value, UploadFile):
            raise InputError(f"form field {name!r} must be a value, not a file", 422)
        values[name] = (value or None if name == "model" else
                        parse_share(value, name) if name == "unsure_below" else parse_bool(value, name))
    return values


async def read_body(request: Request, limit: int, images: bool = True) -> bytes:
    """The request body, refused with 413 from its declared length, or as soon as it passes the limit.
    `images`: the limit is --max-payload-bytes, and the message says how to raise it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(f"payload of {declared} bytes exceeds the limit of {limit} bytes",
                        f"--max-payload-bytes {declared} or more", images)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"payload exceeds the limit of {limit} bytes", "a larger --max-payload-bytes", images)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(message: str, flag: str, images: bool) -> InputError:
    advice = f": send a smaller image, or start the server with {flag} (DIGITSERVE_MAX_PAYLOAD_BYTES)" if images else ""
    return InputError(message + advice, 413)


def parse_share(value: str | None, name: str) -> float | None:
    """A number in [0, 1]; None where it is not given."""
    if value is None or value == "":
        return None
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if not 0 <= share <= 1:
        raise InputError(f"{name} must be a number in [0, 1], got {value[:50]!r}", 422)
    return share


def parse_bool(value: str | None, name: str) -> bool | None:
    """A form or query flag; None where it is not given."""
    if value is None or value == "":
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise InputError(f"{name} must be true or false, got {value[:50]!r}", 422)


async def parse_multipart(request: Request, body: bytes) -> tuple[list, dict]:
    async def replay():  # the body already read (and size-checked), handed to Starlette's form parser
        return {"type": "http.request", "body": body, "more_body": False}
    try:
        form = await Request(request.scope, replay).form(max_files=MAX_IMAGES_PER_REQUEST, max_fields=16)
    except HTTPException as err:  # Starlette's own limits (too many files or fields)
        raise InputError(f"malformed multipart body: {err.detail}", 400) from None
    except Exception as err:  # the multipart parser raises several types for malformed bodies
        raise InputError(f"malformed multipart body: {images.one_line(err)}", 400) from None
    given = options({key: value for key, value in form.multi_items() if key in Options.NAMES or
                     not isinstance(value, UploadFile)}, "form field")
    inputs = [(value.filename or key, "bytes", await value.read())
              for key, value in form.multi_items() if isinstance(value, UploadFile)]
    return inputs, given


def parse_json(body: bytes) -> tuple[list, dict]:
    if not body.strip():
        return [], {}  # "no image", from the service
    try:
        payload = schemas.PredictJSON.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        status = 400 if first["type"] == "json_invalid" else 422
        raise InputError(f"invalid JSON body: {first['msg']} at {'/'.join(map(str, first['loc'])) or '(root)'}",
                         status) from None
    inputs = [(f"images[{i}]", "bytes", decode_base64(text)) for i, text in enumerate(payload.images)]
    inputs += [(f"pixels[{i}]", "pixels", value) for i, value in enumerate(payload.pixels)]
    return inputs, {name: getattr(payload, name) for name in Options.NAMES}


def decode_base64(text: object) -> bytes:
    if not isinstance(text, str):
        raise InputError("images[] must be base64 strings", 422)
    if text.startswith("data:"):  # a data URL, as browsers produce
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("images[] entry is not valid base64", 400) from None
