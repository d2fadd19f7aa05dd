"""Prometheus metrics through prometheus_client, whole-server totals whichever process is scraped.

With several HTTP processes, prometheus_client's multiprocess mode keeps every process's values in
files under PROMETHEUS_MULTIPROC_DIR (serving/metrics_files.py: set by `python -m serving` before
anything imports prometheus_client) and /metrics sums them. Label values come only from known sets: model names the
server loaded, route templates, standard methods, status codes; anything else counts as "other",
so no request can add a series or break the exposition format.
"""
import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
                               multiprocess)
from prometheus_client.core import GaugeMetricFamily

from serving import metrics_files

CONTENT_TYPE = CONTENT_TYPE_LATEST  # of render()'s text
OTHER = "other"
METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
SHARE_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class Metrics:
    def __init__(self, models):
        self.models = set(models)  # the exports folder's model names; a reload adds the new ones
        self.registry = CollectorRegistry()
        self.children = {}
        r = self.registry
        self.requests = Counter("digitserve_http_requests",
                                "HTTP requests by model, route template, method and status.",
                                ["model", "route", "method", "status"], registry=r)
        self.request_seconds = Histogram("digitserve_http_request_duration_seconds",
                                         "Time from request to response, by route template.", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("digitserve_images", "Images classified, by model and version.", ["model", "version"],
                              registry=r)
        self.batch_size = Histogram("digitserve_inference_batch_images",
                                    "Images in each batcher run (all models together).", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue_seconds = Histogram("digitserve_queue_duration_seconds",
                                       "Time a request waited in its process's batcher queue before inference.",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram("digitserve_inference_duration_seconds",
                                           "Time of one backend call, per model and batch.", ["model"],
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.answers = Counter("digitserve_answers", "Answers by decision (digit, unsure, not_a_digit), per model and "
                               "version: the share of each, over time, is a drift signal.",
                               ["model", "version", "decision"], registry=r)
        self.confidence = Histogram("digitserve_answer_confidence", "Calibrated confidence of each answer, per model "
                                    "and version.", ["model", "version"], buckets=CONFIDENCE_BUCKETS, registry=r)
        self.brightness = Histogram("digitserve_input_brightness", "Mean value of each input the model took, as a "
                                    "share of its range (0 black .. 1 white), per model: a drift signal.", ["model"],
                                    buckets=SHARE_BUCKETS, registry=r)
        self.ink = Histogram("digitserve_input_ink", "Share of each input's values above half its range (the ink of "
                             "a digit, the bright pixels of a photo), per model: a drift signal.", ["model"],
                             buckets=SHARE_BUCKETS, registry=r)
        self.feedback = Counter("digitserve_feedback", "True labels told through POST /feedback, by model, version "
                                "and whether the prediction was right.", ["model", "version", "right"], registry=r)
        self.log_dropped = Counter("digitserve_prediction_log_dropped", "Prediction-log lines not written, by reason: "
                                   "queue_full (the disk is slow or stuck), write_failed and index_failed (a full or "
                                   "broken disk); prune_failed counts failed clean-ups.", ["reason"], registry=r)
        self.queue_images = Gauge("digitserve_queue_images", "Images waiting in the batcher queues now.",
                                  multiprocess_mode="livesum", registry=r)
        self.refused = Counter("digitserve_http_refused", "Requests the HTTP protocol answered itself, by reason: "
                               "url_too_long (414), too_many_headers and headers_too_large (431), read_timeout (408); "
                               "send_timeout: connections aborted because the client stopped taking answers.",
                               ["reason"], registry=r)
        self.shed = Counter("digitserve_shed_requests",
                            "Inference requests answered 503 at once: the process was at --max-queue.", registry=r)
        self.in_flight = Gauge("digitserve_requests_in_progress", "Inference requests admitted and not yet answered.",
                               multiprocess_mode="livesum", registry=r)
        self.reloads = Counter("digitserve_model_reloads", "Model versions served, rejected (their reason is in "
                               "the log and /models/NAME) and removed, per HTTP process's reload.",
                               ["model", "event"], registry=r)
        self.rejected = Gauge("digitserve_model_rejected", "1 for the last version of a model that was not served, "
                              "with the step it failed (export, load, test_split, metrics, calibration, unverified, unexpected; "
                              "the reason is in the log and /models/NAME); cleared once a version is served.",
                              ["model", "version", "step"], multiprocess_mode="livemax", registry=r)
        self.model_info = Gauge("digitserve_model_info", "1 for each model in the exports folder: the version "
                                "served, its status (ready or unavailable) and where it runs.",
                                ["model", "version", "status", "device", "provider"],
                                multiprocess_mode="livemax", registry=r)

    def child(self, metric, *labels):
        """`metric.labels(*labels)`, kept: prometheus_client checks and converts the values on every call
        (0.7 us, several times a request). Label values come from bounded sets and no series is ever
        removed, so this holds no more than the metric itself does."""
        key = (metric, labels)
        found = self.children.get(key)
        if found is None:
            found = self.children[key] = metric.labels(*labels)
        return found

    def model_label(self, name: str | None) -> str:
        return name if name in self.models else (OTHER if name else "")

    def record_request(self, model: str | None, route: str | None, method: str, status: int, seconds: float) -> None:
        route = route or OTHER  # a template of the app's routes, or no route matched
        self.child(self.requests, self.model_label(model), route, method if method in METHODS else OTHER,
                   str(status)).inc()
        self.child(self.request_seconds, route).observe(seconds)

    def render(self, live: dict[tuple[str, str], tuple[int, int]] | None = None) -> bytes:
        """The exposition text; `live`: (model, version) -> (answers told, right) from the feedback
        store, read for this scrape (it is shared by the processes, not counted in their files)."""
        if metrics_files.folder():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        return generate_latest(registry) + (b"" if live is None else generate_latest(LiveAccuracy(live)))


class LiveAccuracy:
    """A collector (and a registry of one, for generate_latest) of the feedback store's counts."""

    def __init__(self, live: dict[tuple[str, str], tuple[int, int]]):
        self.live = live

    def collect(self):
        accuracy = GaugeMetricFamily("digitserve_live_accuracy", "Share of right answers among the predictions "
                                     "told their true label (POST /feedback) and still in the feedback window, per "
                                     "model and version.", labels=["model", "version"])
        told = GaugeMetricFamily("digitserve_live_told", "Predictions told their true label and still in the "
                                 "feedback window, per model and version.", labels=["model", "version"])
        for (model, version), (count, right) in sorted(self.live.items()):
            accuracy.add_metric([model, version], right / count)
            told.add_metric([model, version], count)
        yield from (accuracy, told)


class RequestMetrics:
    """Pure ASGI middleware (BaseHTTPMiddleware would cost a task and a stream per request): counts
    every HTTP request with its route template and latency."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None)
            model = scope.get("path_params", {}).get("name") or scope.get("state", {}).get("model")
            self.metrics.record_request(model, route, scope["method"], status, time.perf_counter() - started)
