"""Prometheus text exposition, by hand: counters and histograms for one API-server process."""
import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, cumulative = [], 0
        sep = "," if labels else ""
        for bound, count in zip(list(self.buckets) + ["+Inf"], self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}')
        brace = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{brace} {self.total:.6f}", f"{name}_count{brace} {self.n}"]
        return out


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = defaultdict(int)                       # (model, route, method, status) -> count
        self.latency = defaultdict(lambda: Histogram(LATENCY_BUCKETS))  # route -> seconds
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.images = defaultdict(int)                         # model -> images classified

    def record_request(self, model: str, route: str, method: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(model, route, method, status)] += 1
            self.latency[route].observe(seconds)

    def record_inference(self, model_counts: dict[str, int], batch_size: int) -> None:
        with self.lock:
            self.batch_size.observe(batch_size)
            for model, count in model_counts.items():
                self.images[model] += count

    def render(self, model_status: dict[str, str]) -> str:
        with self.lock:
            lines = ["# HELP digitserve_requests_total HTTP requests by model, route, method and status.",
                     "# TYPE digitserve_requests_total counter"]
            for (model, route, method, status), count in sorted(self.requests.items()):
                lines.append(f'digitserve_requests_total{{model="{model}",route="{route}",method="{method}",'
                             f'status="{status}"}} {count}')
            lines += ["# HELP digitserve_request_seconds Request latency by route.",
                      "# TYPE digitserve_request_seconds histogram"]
            for route, histogram in sorted(self.latency.items()):
                lines += histogram.lines("digitserve_request_seconds", f'route="{route}"')
            lines += ["# HELP digitserve_batch_size Images in the inference call each prediction request shared.",
                      "# TYPE digitserve_batch_size histogram"]
            lines += self.batch_size.lines("digitserve_batch_size", "")
            lines += ["# HELP digitserve_images_total Images classified by model.",
                      "# TYPE digitserve_images_total counter"]
            lines += [f'digitserve_images_total{{model="{m}"}} {c}' for m, c in sorted(self.images.items())]
            lines += ["# HELP digitserve_model_status 1 for the model's current status.",
                      "# TYPE digitserve_model_status gauge"]
            lines += [f'digitserve_model_status{{model="{m}",status="{s}"}} 1' for m, s in sorted(model_status.items())]
            return "\n".join(lines) + "\n"
