"""What production insight costs, and whether live accuracy is exact (issue 26's targets): throughput
of single 8x8 PNG uploads with tracing and the prediction log off, with the log at 100 % sampling,
with both (spans sent by OTLP/HTTP to a local sink that answers 200, as a collector would), and
with both and 1 trace in 10 kept by the SDK's sampler, measured in alternating rounds in one run; then predictions and their true labels posted
interleaved, and /metrics' live accuracy compared with the share of right answers.

    .venv/bin/python -m bench.insight [--seconds 10] [--rounds 2] [--connections 32] [--feedback 1000]

Targets: log and tracing at 100 % cost <= 10 % of throughput; live accuracy exactly the share.
"""
import argparse
import json
import statistics
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import ROOT, free_port, png, run_python_load, running_server, upload_body
from export_contract import test_split

SETTINGS = {"off": ([], {}),
            "prediction log": (["--prediction-log", "{log}"], {}),
            "prediction log + traces": (["--prediction-log", "{log}"], {"OTEL_TRACES_EXPORTER": "otlp"}),
            # the SDK's own sampler: one trace in ten kept, the others' spans never recorded
            "prediction log + traces, 10 % sampled": (["--prediction-log", "{log}"], {
                "OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.1"})}


class Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that takes every export and keeps nothing but their count and bytes."""
    exports = received = 0

    def do_POST(self):
        Sink.received += len(self.rfile.read(int(self.headers.get("content-length", 0))))
        Sink.exports += 1
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def throughput(args, scratch: Path, sink_url: str) -> dict[str, list[dict]]:
    body = upload_body(ROOT / "exports" / "digits-cnn")
    results = {name: [] for name in SETTINGS}
    for round_ in range(args.rounds):
        for name, (flags, env) in SETTINGS.items():
            log = scratch / f"log-{round_}-{len(results[name])}-{name.replace(' ', '')}"
            env = {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": sink_url} if env else env
            with running_server(ROOT / "exports", *[f.format(log=log) for f in flags], env=env) as server:
                if args.warmup_seconds:
                    run_python_load(f"{server.url}/predict", body, args.connections, args.warmup_seconds)
                results[name].append(run_python_load(f"{server.url}/predict", body, args.connections, args.seconds))
    return results


def feedback_exactness(n: int, scratch: Path) -> tuple[int, float, float]:
    """n predictions, each told its label (every third told wrongly) from 8 threads: (right, share, live)."""
    folder = ROOT / "exports" / "digits-cnn"
    manifest = json.loads((folder / "model.json").read_text())
    x, labels = test_split.read((folder / "test_set.npz").read_bytes(), manifest["input"], manifest["metrics"]["test"]["n"])
    images = np.round(x[:, 0] * 255 / 16).astype(np.uint8)  # 0..16 as an 8-bit grey PNG holds it
    with running_server(ROOT / "exports", "--prediction-log", str(scratch / "feedback")) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        def round_trip(i: int) -> bool:
            upload = png(images[i % len(images)], "L")
            answer = client.post("/predict", files={"file": ("d.png", upload)}).json()["predictions"][0]
            truth = int(labels[i % len(labels)]) if i % 3 else (answer["label"] + 1) % 10
            told = client.post("/feedback", json={"id": answer["id"], "label": truth})
            assert told.status_code == 200, told.text
            return answer["label"] == truth
        with ThreadPoolExecutor(8) as pool:
            right = sum(pool.map(round_trip, range(n)))
        samples = {s.name: s.value for f in text_string_to_metric_families(client.get("/metrics").text)
                   for s in f.samples if s.name == "digitserve_live_accuracy" and s.labels["model"] == "digits-cnn"}
    return right, right / n, samples["digitserve_live_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup-seconds", type=float, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--feedback", type=int, default=1000)
    args = parser.parse_args()
    sink = ThreadingHTTPServer(("127.0.0.1", free_port()), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory(prefix="insight-", dir="/tmp") as scratch:
        results = throughput(args, Path(scratch), f"http://127.0.0.1:{sink.server_port}")
        right, share, live = feedback_exactness(args.feedback, Path(scratch))
    sink.shutdown()
    print(f"## Production insight (`python -m bench.insight {' '.join(sys.argv[1:])}`)\n")
    print(f"Single 8x8 PNG uploads, {args.connections} connections, {args.rounds} alternating rounds of "
          f"{args.seconds:g} s each (median shown).\n")
    print("| setting | req/s (each round) | median req/s | vs off | p99 ms (median) |\n|---|---|---|---|---|")
    base = statistics.median(r["rps"] for r in results["off"])
    for name, runs in results.items():
        rps = statistics.median(r["rps"] for r in runs)
        each = ", ".join(f"{r['rps']:.0f}" for r in runs)
        print(f"| {name} | {each} | {rps:.0f} | {rps / base:.2f} | "
              f"{statistics.median(r['p99'] for r in runs):.1f} |")
    print(f"\nThe OTLP sink took {Sink.exports} exports ({Sink.received / 1e6:.1f} MB of spans).")
    print(f"\nFeedback: {args.feedback} predictions each told its label from 8 threads ({right} right): share "
          f"{share:.6f}, /metrics digitserve_live_accuracy {live:.6f}: {'exact' if share == live else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
