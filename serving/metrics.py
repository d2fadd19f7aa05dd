"""Prometheus text exposition, by hand, for a server of several HTTP processes.

Each process counts in memory and writes a snapshot to a shared folder (every second, and just
before it answers a scrape); /metrics merges every process's snapshot, so the counters are those
of the whole server whichever process the scrape lands on.
"""
import bisect
import json
import os
import threading
from collections import defaultdict
from pathlib import Path

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FLUSH_SECONDS = 1.0


def new_histogram(buckets) -> dict:
    return {"counts": [0] * (len(buckets) + 1), "sum": 0.0, "n": 0}


def observe(histogram: dict, buckets, value: float) -> None:
    histogram["counts"][bisect.bisect_left(buckets, value)] += 1
    histogram["sum"] += value
    histogram["n"] += 1


def histogram_lines(name: str, labels: str, histogram: dict, buckets) -> list[str]:
    lines, cumulative, sep = [], 0, "," if labels else ""
    for bound, count in zip([*buckets, "+Inf"], histogram["counts"]):
        cumulative += count
        lines.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}')
    brace = f"{{{labels}}}" if labels else ""
    return lines + [f"{name}_sum{brace} {histogram['sum']:.6f}", f"{name}_count{brace} {histogram['n']}"]


class Metrics:
    def __init__(self, folder: Path):
        self.folder = folder
        self.lock = threading.Lock()
        self.requests = defaultdict(int)  # "model|route|method|status" -> count
        self.latency = {}                 # route -> histogram (seconds)
        self.batch_size = new_histogram(BATCH_BUCKETS)
        self.images = defaultdict(int)    # model -> images classified

    def record_request(self, model: str, route: str, method: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[f"{model}|{route}|{method}|{status}"] += 1
            observe(self.latency.setdefault(route, new_histogram(LATENCY_BUCKETS)), LATENCY_BUCKETS, seconds)

    def record_inference(self, model_counts: dict[str, int], batch_size: int) -> None:
        with self.lock:
            observe(self.batch_size, BATCH_BUCKETS, batch_size)
            for model, count in model_counts.items():
                self.images[model] += count

    def flush(self) -> None:
        """This process's counters to FOLDER/PID.json (atomic replace)."""
        with self.lock:
            snapshot = json.dumps({"requests": self.requests, "latency": self.latency,
                                   "batch_size": self.batch_size, "images": self.images})
        target = self.folder / f"{os.getpid()}.json"
        staging = target.with_suffix(".tmp")
        staging.write_text(snapshot)
        staging.replace(target)

    def merged(self) -> dict:
        total = {"requests": defaultdict(int), "latency": {}, "batch_size": new_histogram(BATCH_BUCKETS),
                 "images": defaultdict(int)}
        for path in self.folder.glob("*.json"):
            try:
                part = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # a process mid-replace: its next snapshot counts
            for key, count in part["requests"].items():
                total["requests"][key] += count
            for model, count in part["images"].items():
                total["images"][model] += count
            for route, histogram in part["latency"].items():
                add_histogram(total["latency"].setdefault(route, new_histogram(LATENCY_BUCKETS)), histogram)
            add_histogram(total["batch_size"], part["batch_size"])
        return total

    def render(self, model_status: dict[str, str]) -> str:
        self.flush()
        total = self.merged()
        lines = ["# HELP digitserve_requests_total HTTP requests by model, route, method and status.",
                 "# TYPE digitserve_requests_total counter"]
        for key, count in sorted(total["requests"].items()):
            model, route, method, status = key.split("|")
            lines.append(f'digitserve_requests_total{{model="{model}",route="{route}",method="{method}",'
                         f'status="{status}"}} {count}')
        lines += ["# HELP digitserve_request_seconds Request latency by route.",
                  "# TYPE digitserve_request_seconds histogram"]
        for route, histogram in sorted(total["latency"].items()):
            lines += histogram_lines("digitserve_request_seconds", f'route="{route}"', histogram, LATENCY_BUCKETS)
        lines += ["# HELP digitserve_batch_size Images in the inference call each prediction request shared.",
                  "# TYPE digitserve_batch_size histogram"]
        lines += histogram_lines("digitserve_batch_size", "", total["batch_size"], BATCH_BUCKETS)
        lines += ["# HELP digitserve_images_total Images classified by model.",
                  "# TYPE digitserve_images_total counter"]
        lines += [f'digitserve_images_total{{model="{m}"}} {c}' for m, c in sorted(total["images"].items())]
        lines += ["# HELP digitserve_model_status 1 for the model's current status.",
                  "# TYPE digitserve_model_status gauge"]
        lines += [f'digitserve_model_status{{model="{m}",status="{s}"}} 1' for m, s in sorted(model_status.items())]
        return "\n".join(lines) + "\n"


def add_histogram(total: dict, part: dict) -> None:
    total["counts"] = [a + b for a, b in zip(total["counts"], part["counts"])]
    total["sum"] += part["sum"]
    total["n"] += part["n"]
