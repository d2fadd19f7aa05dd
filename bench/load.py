"""A small HTTP/1.1 load generator for machines without wrk: several processes, each holding
keep-alive connections on asyncio streams, each connection sending one request after another.

    .venv/bin/python -m bench.load URL BODY_FILE CONTENT_TYPE --connections 384 --seconds 20 [--processes 8]
                                   [--backoff]

Prints one JSON line: requests/s, p50/p99 latency (ms), non-2xx responses, connection errors; and
for admission control, the same for the 2xx answers alone and for the 503s (shed). `--backoff`: on a
503 with Retry-After, wait that long plus up to half more (jitter; Retry-After is the least a client
waits, RFC 9110) before the next request.
"""
import argparse
import asyncio
import json
import multiprocessing as mp
import random
import resource
import time
from urllib.parse import urlsplit


async def connection(host: str, port: int, request: bytes, deadline: float, latencies: list, failures: list,
                     backoff: bool) -> None:
    reader = writer = None
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            started = time.monotonic()
            writer.write(request)
            await writer.drain()
            status_line = await reader.readline()
            length, retry_after = 0, 0.0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                elif line.lower().startswith(b"retry-after:"):
                    retry_after = float(line.split(b":")[1])
            await reader.readexactly(length)
            status = int(status_line.split()[1])
            latencies.append((time.monotonic() - started, status))
            if not 200 <= status < 300:
                failures.append("non2xx")
            if backoff and retry_after:  # as a well-behaved client does: Retry-After, with jitter
                pause = retry_after * random.uniform(1.0, 1.5)
                await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
            failures.append("connection")
            if writer is not None:
                writer.close()
            reader = writer = None


def worker(url: str, body: bytes, content_type: str, connections: int, seconds: float, backoff: bool,
           out: mp.Queue) -> None:
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    request = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    latencies, failures = [], []

    async def run():
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(connection(parts.hostname, parts.port, request, deadline, latencies, failures, backoff)
                               for _ in range(connections)))
    asyncio.run(run())
    out.put((latencies, failures))


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of connections need thousands of files
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("body_file")
    parser.add_argument("content_type")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--processes", type=int, default=max(1, min(8, mp.cpu_count() // 2)))
    parser.add_argument("--backoff", action="store_true", help="wait Retry-After seconds after a 503 carrying it")
    args = parser.parse_args()
    body = open(args.body_file, "rb").read()
    out = mp.Queue()
    shares = [args.connections // args.processes + (i < args.connections % args.processes)
              for i in range(args.processes)]
    procs = [mp.Process(target=worker, args=(args.url, body, args.content_type, n, args.seconds, args.backoff, out))
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
    def percentile(values, q):
        values = sorted(values)
        return 1000 * values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")
    every = [seconds for seconds, _ in latencies]
    ok = [seconds for seconds, status in latencies if 200 <= status < 300]
    shed = [seconds for seconds, status in latencies if status == 503]
    print(json.dumps({"rps": len(latencies) / args.seconds, "p50": percentile(every, 0.50),
                      "p99": percentile(every, 0.99), "non2xx": failures.count("non2xx"),
                      "socket_errors": failures.count("connection"), "ok_rps": len(ok) / args.seconds,
                      "ok_p50": percentile(ok, 0.5), "ok_p99": percentile(ok, 0.99), "shed": len(shed),
                      "shed_p99": percentile(shed, 0.99), "max": percentile(every, 1.0)}))


if __name__ == "__main__":
    main()
