"""The floor under any Python HTTP service here, for bench.serve: uvicorn (httptools) running a bare
ASGI app that reads the request body and answers a constant 200 JSON, with no framework, decoding
or model. Whatever a service does per request costs on top of this. Not part of the service.

    .venv/bin/python -m bench.asgi_floor PORT [--workers N]
"""
import argparse
import os

import uvicorn

ANSWER = b'{"predictions":[{"label":0}]}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    message = {"more_body": True}
    while message.get("more_body"):
        message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    uvicorn.run("bench.asgi_floor:app", app_dir=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                host="127.0.0.1", port=args.port, workers=args.workers, log_level="warning", http="httptools",
                lifespan="off")
