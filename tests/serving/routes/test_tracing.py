"""OpenTelemetry traces (serving/tracing.py) with an in-memory exporter: a request's spans (the server
span continuing the client's W3C traceparent, read, decode, queue, and the inference span linked to
every request of its batch), their attributes, garbage traceparents ignored, and tracing off unless
OTEL_TRACES_EXPORTER asks for it, which then needs the SDK. In-process and on the batcher."""
import asyncio
import sys

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench.harness import copy_committed
from serving import api, tracing
from serving.batcher import DynamicBatcher
from serving.errors import StartupError
from serving.metrics import Metrics
from tests.helpers import DIGITS_SPEC, digit_png, in_process, stub_model

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


def in_memory() -> tuple[tracing.Tracing, InMemorySpanExporter]:
    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return tracing.Tracing(provider), exporter


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A client whose service traces into memory, as OTEL_TRACES_EXPORTER=console would turn it on."""
    exports = tmp_path_factory.mktemp("exports")
    copy_committed(exports, "digits-cnn")
    traces, exporter = in_memory()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OTEL_TRACES_EXPORTER", "console")
        patch.setattr(tracing.Tracing, "from_environment", classmethod(lambda cls, exporters: traces))
        with in_process(exports) as client:
            yield client, exporter


def test_a_prediction_is_traced_from_the_clients_span_to_its_batch(traced, test_digits):
    client, exporter = traced
    exporter.clear()
    response = client.post("/predict", files={"file": ("d.png", digit_png(test_digits[0][3]))},
                           headers={"traceparent": TRACEPARENT, "X-Request-ID": "traced-1"})
    assert response.status_code == 200
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"POST /predict", "decode", "queue", "inference"}
    request = spans["POST /predict"]
    assert f"{request.context.trace_id:032x}" == TRACE_ID and f"{request.parent.span_id:016x}" == "b7ad6b7169203331"
    for name in ("decode", "queue"):
        assert spans[name].parent.span_id == request.context.span_id and spans[name].context.trace_id == request.context.trace_id
    answer = response.json()["predictions"][0]
    assert request.attributes["digitserve.request_id"] == "traced-1"
    assert request.attributes["http.route"] == "/predict" and request.attributes["http.response.status_code"] == 200
    assert list(request.attributes["digitserve.decisions"]) == [answer["decision"]]
    assert list(request.attributes["digitserve.versions"]) == [answer["version"]]
    assert [event.name for event in request.events] == ["admitted"]
    batch = spans["inference"]
    assert [link.context.span_id for link in batch.links] == [request.context.span_id]
    assert list(batch.attributes["digitserve.models"]) == ["digits-cnn"] and batch.attributes["digitserve.batch_size"] == 1
    assert spans["queue"].end_time <= batch.start_time


@pytest.mark.parametrize("garbage", ["garbage", "00-zz-yy-01", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "é" * 50])
def test_a_garbage_traceparent_starts_a_new_trace(traced, test_digits, garbage):
    client, exporter = traced
    exporter.clear()
    response = client.post("/predict", files={"file": ("d.png", digit_png(test_digits[0][3]))},
                           headers={"traceparent": garbage.encode("utf-8")})
    assert response.status_code == 200
    (request,) = [span for span in exporter.get_finished_spans() if span.name == "POST /predict"]
    assert request.parent is None and request.context.trace_id != 0


def test_other_routes_get_their_server_span(traced):
    client, exporter = traced
    exporter.clear()
    assert client.get("/nowhere").status_code == 404
    (span,) = exporter.get_finished_spans()
    assert span.name == "GET unmatched" and span.attributes["http.response.status_code"] == 404


def test_one_inference_span_links_every_request_of_its_batch():
    traces, exporter = in_memory()
    model = stub_model("digits", DIGITS_SPEC)
    model.runner = lambda batch: (batch.reshape(len(batch), -1)[:, :10] * 0 - 2.3, None)

    async def main():
        batcher = DynamicBatcher(Metrics(models=["digits"]), max_batch_size=8, batch_timeout=0.05, tracing=traces)
        batcher.start()
        tracer = traces.tracer
        with tracer.start_as_current_span("first") as first, tracer.start_as_current_span("second") as second:
            image = np.zeros((1, 8, 8), np.float32)
            await asyncio.gather(batcher.submit([(model, image)], trace=first.get_span_context()),
                                 batcher.submit([(model, image)] * 2, trace=second.get_span_context()))
        await batcher.stop()
        return first, second
    first, second = asyncio.run(main())
    (batch,) = [span for span in exporter.get_finished_spans() if span.name == "inference"]
    assert {link.context.span_id for link in batch.links} == {first.get_span_context().span_id,
                                                               second.get_span_context().span_id}
    assert batch.attributes["digitserve.batch_size"] == 3
    assert sorted(span.parent.span_id for span in exporter.get_finished_spans() if span.name == "queue") == sorted(
        [first.get_span_context().span_id, second.get_span_context().span_id])


def test_tracing_is_off_unless_an_exporter_is_asked_for(monkeypatch, exports):
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert tracing.requested() == []
    with in_process(exports) as client:
        service = client.app.state.service
        assert service.tracing is None
        assert tracing.TracingMiddleware not in [cls for cls, _ in api.middlewares(service)]
    for value, expected in (("none", []), ("otlp,console", ["otlp", "console"])):
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", value)
        assert tracing.requested() == expected
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.requested() == []
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(StartupError, match="by otlp or console"):
        tracing.requested()


def test_asking_for_traces_without_the_sdk_stops_the_start(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if the extra were not installed
    with pytest.raises(StartupError, match=r"pip install 'digitserve\[otel\]'"):
        tracing.requested()
