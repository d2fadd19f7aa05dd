"""Liveness under decode bombs: /health latency while clients send the largest images.

    .venv/bin/python -m bench.decode_bomb [--seconds 15]

Two kinds of sender, two of each: the adversary's bomb (31 blank 4096 x 4096 16-bit PNGs in one
request with resize=true, about 1 MB; refused 413 from the headers now), and the largest request
still accepted (one such PNG, decoded and resized in a decoder thread). Meanwhile /health is polled
every 20 ms. Target: /health p99 <= 100 ms.
"""
import argparse
import io
import threading
import time
from collections import Counter

import httpx
from PIL import Image

from bench.harness import ROOT, running_server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    buffer = io.BytesIO()
    Image.new("I;16", (4096, 4096)).save(buffer, format="PNG")
    blank = buffer.getvalue()
    bomb = [("file", (f"{i}.png", blank)) for i in range(31)]
    statuses, latencies = Counter(), []
    stop = threading.Event()
    with running_server(ROOT / "exports") as server:
        def sender(files):
            with httpx.Client(base_url=server.url, timeout=60) as client:
                while not stop.is_set():
                    statuses[client.post("/predict", params={"resize": "true"}, files=files).status_code] += 1
        senders = [threading.Thread(target=sender, args=(files,)) for files in (bomb, bomb, [bomb[0]], [bomb[0]])]
        for thread in senders:
            thread.start()
        deadline = time.monotonic() + args.seconds
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while time.monotonic() < deadline:
                started = time.monotonic()
                client.get("/health")
                latencies.append(1000 * (time.monotonic() - started))
                time.sleep(0.02)
        stop.set()
        for thread in senders:
            thread.join()
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(f"/health while bombs were sent ({args.seconds:g} s, {len(latencies)} polls): p50 "
          f"{latencies[len(latencies) // 2]:.1f} ms, p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms; bomb answers "
          f"{dict(statuses)}; target p99 <= 100 ms: {'met' if p99 <= 100 else 'NOT met'}")


if __name__ == "__main__":
    main()
