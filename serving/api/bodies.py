"""A /predict request's body and options, read: multipart uploads, JSON (base64 images, pixel arrays)
or one image sent as the body itself; the options from the query, form fields or JSON fields.

The body is read up to --max-payload-bytes (413 from its declared length, or as soon as it passes
the limit). One rule for every option: a value in the body wins over the query's; each is checked
wherever it is given. Nothing is decoded here (serving/routing.py does that, off the event loop for
large requests): an input is (label, "bytes" | "pixels", value).
"""
import base64
import binascii
import re
from dataclasses import dataclass

from fastapi import Request
from pydantic import ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header

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
        inputs, given = parse_multipart(content_type, body)
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


MAX_FIELDS = 16  # form fields (options) in one multipart body; files: MAX_IMAGES_PER_REQUEST


def parse_multipart(content_type: str, body: bytes) -> tuple[list, dict]:
    """A multipart body already read: plainly framed ones (what browsers, curl and HTTP libraries send)
    split at their delimiters, any other by python-multipart's parser, which also says what is wrong."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise InputError("malformed multipart body: its Content-Type names no boundary", 400)
    parts = framed_parts(boundary, body)
    if parts is None:
        parts = streamed_parts(boundary, body)
    fields, inputs = {}, []
    for headers, chunks in parts:
        disposition, params = parse_options_header(headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in params:
            raise InputError("malformed multipart body: a part without 'Content-Disposition: form-data; name=...'",
                             400)
        name = params[b"name"].decode("utf-8", "replace")
        if b"filename" not in params:
            fields[name] = b"".join(chunks).decode("utf-8", "replace")
        elif name in Options.NAMES:
            raise InputError(f"form field {name!r} must be a value, not a file", 422)
        else:
            inputs.append((params[b"filename"].decode("utf-8", "replace") or name, "bytes", b"".join(chunks)))
    if len(inputs) > MAX_IMAGES_PER_REQUEST or len(fields) > MAX_FIELDS:
        raise InputError(f"malformed multipart body: more than {MAX_IMAGES_PER_REQUEST} files or {MAX_FIELDS} "
                         "fields", 400)
    return inputs, options(fields, "form field")


HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token
# What the fast split takes; anything larger goes to the parser, whose own limits (8 header lines of 4,224
# bytes a part, a 256-byte boundary) then refuse it. Clients send one or two short header lines a part.
PLAIN_BOUNDARY = 70        # bytes: RFC 2046's longest boundary
PLAIN_HEADER_LINES = 4     # a part's
PLAIN_HEADER_LINE = 1024   # bytes


def framed_parts(boundary: bytes, body: bytes) -> list[tuple[dict, list]] | None:
    """The parts (headers, [content]) of a body framed plainly: it opens with the first delimiter and
    ends with the closing one (a CRLF after it or not), the delimiter appears nowhere else, every part
    has 1 to PLAIN_HEADER_LINES header lines `Name: value`. None for anything else: the streaming parser
    takes it. A single 8x8 upload is split in 2.4 us this way, 10.7 us through the parser's callbacks
    (bench/RESULTS.md, issue 28). tests/serving/test_bodies.py checks that both give the same parts."""
    delimiter = b"\r\n--" + boundary
    if len(boundary) > PLAIN_BOUNDARY or not body.startswith(delimiter[2:] + b"\r\n"):
        return None
    parts, start = [], len(delimiter) - 2  # each part starts at the CRLF ending its delimiter line
    while True:
        end = body.find(delimiter, start)
        if end < 0 or len(parts) == MAX_IMAGES_PER_REQUEST + MAX_FIELDS:
            return None
        head_end = body.find(b"\r\n\r\n", start, end)
        if head_end <= start or head_end - start > PLAIN_HEADER_LINES * (PLAIN_HEADER_LINE + 2):
            return None
        lines = body[start + 2:head_end].split(b"\r\n")
        if len(lines) > PLAIN_HEADER_LINES:
            return None
        headers = {}
        for line in lines:
            name, colon, value = line.partition(b":")
            if (not colon or len(line) > PLAIN_HEADER_LINE or not HEADER_NAME.fullmatch(name)
                    or b"\r" in value or b"\n" in value):
                return None
            headers[name.lower()] = value.lstrip(b" ")
        parts.append((headers, [body[head_end + 4:end]]))
        start = end + len(delimiter)
        if body[start:] in (b"--", b"--\r\n"):
            return parts
        if not body.startswith(b"\r\n", start):
            return None


def streamed_parts(boundary: bytes, body: bytes) -> list[tuple[dict, list]]:
    """The parts (headers, chunks of the content) by python-multipart's parser, in one pass (Starlette's
    form() spools each file through a temporary-file object: 4 times the cost of a small upload)."""
    parts: list[tuple[dict, list]] = []
    header, ended = [b"", b""], [0]

    def begin():
        if len(parts) >= MAX_IMAGES_PER_REQUEST + MAX_FIELDS:
            raise InputError(f"malformed multipart body: more than {MAX_IMAGES_PER_REQUEST} files and "
                             f"{MAX_FIELDS} fields", 400)
        parts.append(({}, []))

    def header_end():
        parts[-1][0][header[0].lower()] = header[1]
        header[:] = [b"", b""]
    callbacks = {"on_part_begin": begin, "on_header_end": header_end,
                 "on_header_field": lambda data, start, end: header.__setitem__(0, header[0] + data[start:end]),
                 "on_header_value": lambda data, start, end: header.__setitem__(1, header[1] + data[start:end]),
                 "on_part_data": lambda data, start, end: parts[-1][1].append(data[start:end]),
                 "on_part_end": lambda: ended.__setitem__(0, ended[0] + 1)}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except InputError:
        raise
    except Exception as err:  # the parser raises several types for malformed bodies
        raise InputError(f"malformed multipart body: {images.one_line(err)}", 400) from None
    if ended[0] < len(parts):  # the parser keeps a part cut off by the body's end
        raise InputError("malformed multipart body: it ends before its closing boundary", 400)
    return parts


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
