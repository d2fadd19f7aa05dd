"""A small HTTP/1.1 load generator for machines without wrk: several processes, each holding
keep-alive connections on asyncio streams, each connection sending one request after another.

    python bench/load.py URL BODY_FILE CONTENT_TYPE --connections 384 --seconds 20 [--processes 8]

Prints one JSON line: requests/s, p50/p99 latency (ms), non-2xx responses, connection errors.
"""
import argparse
import asyncio
import json
import multiprocessing as mp
import time
from urllib.parse import urlsplit


async def connection(host: str, port: int, request: bytes, deadline: float, latencies: list, failures: list) -> None:
    reader = writer = None
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            started = time.monotonic()
            writer.write(request)
            await writer.drain()
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            latencies.append(time.monotonic() - started)
            if not status_line.split()[1].startswith(b"2"):
                failures.append("non2xx")
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
            failures.append("connection")
            if writer is not None:
                writer.close()
            reader = writer = None


def worker(url: str, body: bytes, content_type: str, connections: int, seconds: float, out: mp.Queue) -> None:
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    request = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    latencies, failures = [], []

    async def run():
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(connection(parts.hostname, parts.port, request, deadline, latencies, failures)
                               for _ in range(connections)))
    asyncio.run(run())
    out.put((latencies, failures))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("body_file")
    parser.add_argument("content_type")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--processes", type=int, default=max(1, min(8, mp.cpu_count() // 2)))
    args = parser.parse_args()
    body = open(args.body_file, "rb").read()
    out = mp.Queue()
    shares = [args.connections // args.processes + (i < args.connections % args.processes)
              for i in range(args.processes)]
    procs = [mp.Process(target=worker, args=(args.url, body, args.content_type, n, args.seconds, out))
             for n in shares if n]
    for p in procs:
        p.start()
    latencies, failures = [], []
    for _ in procs:
        part_latencies, part_failures = out.get()
        latencies += part_latencies
        failures += part_failures
    for p in procs:
        p.join()
    latencies.sort()

    def percentile(q):
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")
    print(json.dumps({"rps": len(latencies) / args.seconds, "p50": percentile(0.50), "p99": percentile(0.99),
                      "non2xx": failures.count("non2xx"), "socket_errors": failures.count("connection")}))


if __name__ == "__main__":
    main()
