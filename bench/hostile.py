"""Hostile input against a running server: at least 10,000 requests drawn from the families an
adversary used (broken image headers, undocumented formats, decode bombs, mutated valid uploads,
absurd JSON and v2 tensors, hostile paths and methods). Target: 0 answers 5xx, 0 hangs, 0 process
deaths.

    .venv/bin/python -m bench.hostile [--requests 12000] [--connections 16] [--seed 0] [--url URL]

Starts its own server on the committed exports (or --url for one already running). Prints the
status counts, the slowest answers, and whether every process of the server is still there.
"""
import argparse
import asyncio
import json
import random
import struct
import sys
import time
from collections import Counter

import httpx
import numpy as np
from PIL import Image

from bench.harness import ROOT, ServerProcess, png_chunk, saved


def seeds() -> list[bytes]:
    """Valid uploads of every accepted format and mode, to mutate."""
    digit = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    crop = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    gray, rgb = Image.fromarray(digit, "L"), Image.fromarray(crop, "RGB")
    return [saved(gray, "PNG"), saved(rgb, "PNG"), saved(gray.convert("P"), "PNG"), saved(rgb.convert("RGBA"), "PNG"),
            saved(Image.fromarray(digit.astype(np.uint16) * 257), "PNG"), saved(rgb, "JPEG"),
            saved(rgb.convert("CMYK"), "JPEG"), saved(gray, "GIF"), saved(rgb, "WEBP"), saved(gray, "BMP"),
            saved(rgb.resize((200, 120)), "PNG")]


FIXED = [  # the reproducers and their relatives
    b"", b"\xff\xd8\xff\xe0\x00\x10", b"RIFF\x16\x00\x00\x00WEBPVP8 \x0a\x00\x00\x00",
    b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", b"\0\0\0\x08\0\0"),
    b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)),
    b"RIFF" + struct.pack("<I", 22) + b"WEBPVP8X" + struct.pack("<I", 10) + b"\0" * 4 + (9998).to_bytes(3, "little") * 2,
    b"BM" + struct.pack("<IHHI", 70, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 8, 8, 1, 0, 0, 16, 0, 0, 0, 0),
    b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\0" * 8,
    saved(Image.new("LAB", (8, 8)), "TIFF"), saved(Image.new("RGB", (16, 16)), "ICO"),
    saved(Image.new("L", (8, 8)), "PPM"), saved(Image.new("L", (8, 8)), "PCX"), saved(Image.new("L", (8, 8)), "TGA"),
    saved(Image.new("I;16", (4096, 4096)), "PNG"),  # the largest allowed: decoded in a thread
]
PATHS = ["/models/a%22b", "/models/a|b", "/models/%0A", "/models/" + "x" * 2000, "/v2/models/a%22/infer",
         "/predict/../models", "/%00", "/docs/../../etc/passwd", "/models/digits-cnn/curves.png/..", "/no"]
HUGE = "1" + "0" * 400


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 10)):
        if not data:
            break
        at = rng.randrange(len(data))
        kind = rng.random()
        if kind < 0.5:
            data[at] ^= rng.randrange(1, 256)
        elif kind < 0.7:
            del data[at:at + rng.randint(1, 64)]
        elif kind < 0.9:
            data[at:at] = rng.randbytes(rng.randint(1, 32))
        else:
            del data[at:]
    return bytes(data)


def absurd_json(rng: random.Random) -> bytes:
    choices = [
        lambda: '{"pixels": [[' + ",".join(["[" + ",".join([HUGE] * 8) + "]"] * 8) + "]]}",
        lambda: json.dumps({"pixels": [[[rng.uniform(-1e308, 1e308)] * 8] * 8]}),
        lambda: json.dumps({"pixels": [[[0] * 8] * 7 + [[0] * 9]]}),
        lambda: json.dumps({"pixels": ["a" * 100]}),
        lambda: json.dumps({"images": [rng.randbytes(30).hex()], "model": "digits-cnn"}),
        lambda: json.dumps({"images": ["data:image/png;base64,%%%"]}),
        lambda: "[" * 5000 + "]" * 5000,
        lambda: json.dumps({"pixels": [[[0] * 8] * 8] * 300}),
        lambda: json.dumps({"model": {"$ne": 1}, "invert": "yes", "resize": [1]}),
        lambda: '{"pixels": [NaN, Infinity]}',
        lambda: rng.randbytes(rng.randint(0, 200)).decode("latin-1"),
    ]
    return rng.choice(choices)().encode("utf-8", "surrogatepass")


def v2_body(rng: random.Random) -> bytes:
    shape = rng.choice([[1, 1, 8, 8], [1, 1, 8, 7], [0, 1, 8, 8], [-1, 1, 8, 8], [1000, 1, 8, 8], [1, 3, 32, 32], []])
    data = rng.choice([[0] * 64, [HUGE] * 64, ["x"] * 64, [[0] * 8] * 8, [0.5] * 3072, []])
    body = {"inputs": [{"name": "pixels", "shape": shape, "datatype": rng.choice(["FP32", "UINT8", "FP64", "BYTES"]),
                        "data": data}]}
    return json.dumps(body).replace('"' + HUGE + '"', HUGE).encode()


def generate(n: int, seed: int):
    """(method, path, params, headers, content) for n hostile requests."""
    rng = random.Random(seed)
    valid = seeds()
    for _ in range(n):
        family = rng.random()
        if family < 0.45:
            data = mutate(rng.choice(valid), rng)
        elif family < 0.55:
            data = rng.choice(FIXED)
        else:
            data = None
        if data is not None:
            boundary = "b" + rng.randbytes(4).hex()
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n").encode() \
                + data + f"\r\n--{boundary}--\r\n".encode()
            params = rng.choice([{}, {"resize": "true"}, {"invert": "true", "model": "digits-mlp"}, {"resize": "maybe"}])
            yield "POST", "/predict", params, {"content-type": f"multipart/form-data; boundary={boundary}"}, body
        elif family < 0.75:
            yield "POST", "/predict", {}, {"content-type": "application/json"}, absurd_json(rng)
        elif family < 0.85:
            name = rng.choice(["digits-cnn", "digits-mlp", "nope"])
            yield "POST", f"/v2/models/{name}/infer", {}, {"content-type": "application/json"}, v2_body(rng)
        elif family < 0.92:
            yield rng.choice(["GET", "POST", "DELETE", "BREW"]), rng.choice(PATHS), {}, {}, b""
        else:  # malformed multipart and odd content types
            yield "POST", "/predict", {}, {"content-type": rng.choice(["multipart/form-data", "multipart/form-data; "
                                                                        "boundary=", "text/plain", "application/xml"])}, \
                rng.randbytes(rng.randint(0, 300))


async def send_all(url: str, requests: list, connections: int, timeout: float) -> tuple[Counter, list]:
    statuses, slow = Counter(), []
    queue = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)

    async def worker(client):
        while not queue.empty():
            method, path, params, headers, content = queue.get_nowait()
            started = time.monotonic()
            try:
                response = await client.request(method, path, params=params, headers=headers, content=content)
                statuses[response.status_code] += 1
            except httpx.TimeoutException:
                statuses["hang"] += 1
            except httpx.TransportError as err:
                statuses[type(err).__name__] += 1
            slow.append((time.monotonic() - started, method, path))
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(connections)))
    return statuses, sorted(slow, reverse=True)[:3]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=12000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url", help="a running server (default: start one on the committed exports)")
    args = parser.parse_args()
    requests = list(generate(args.requests, args.seed))
    server = None if args.url else ServerProcess(ROOT / "exports", args=("--workers", "2"))
    try:
        if server:
            server.wait_ready()
        url = args.url or server.url
        started = time.monotonic()
        statuses, slowest = asyncio.run(send_all(url, requests, args.connections, timeout=30))
        seconds = time.monotonic() - started
        alive = server is None or server.process.poll() is None
        ready = httpx.get(url + "/ready", timeout=5).status_code
    finally:
        log = server.output() if server else ""
        if server:
            server.stop()
    errors = sum(count for status, count in statuses.items() if not isinstance(status, int) or status >= 500)
    print(f"{len(requests)} hostile requests in {seconds:.1f} s at {args.connections} connections: "
          f"{dict(sorted(statuses.items(), key=str))}")
    print(f"5xx, hangs or transport errors: {errors}; server alive: {alive}; /ready after: {ready}; "
          f"tracebacks in its log: {log.count('Traceback')}")
    print("slowest: " + "; ".join(f"{s:.2f} s {m} {p[:40]}" for s, m, p in slowest))
    sys.exit(0 if errors == 0 and alive and ready == 200 else 1)


if __name__ == "__main__":
    main()
