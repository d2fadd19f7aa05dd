"""OpenTelemetry traces: off, and free, unless asked for.

Asked for by the standard variables: OTEL_TRACES_EXPORTER=otlp (or console, or both, comma-separated)
turns tracing on in every HTTP process; OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
OTEL_TRACES_SAMPLER(_ARG), OTEL_EXPORTER_OTLP_* and OTEL_BSP_* configure it as the SDK reads them;
OTEL_SDK_DISABLED=true or no exporter leaves it off. It needs the `otel` extra
(`pip install 'digitserve[otel]'`): asked for without it, the server does not start.

A request's spans: the request (`POST /predict`, a server span that continues an incoming W3C
`traceparent`; garbage there starts a new trace), `decode` (reading the body, headers, decoding,
resize, routing), `queue` (waiting in the batcher), and `inference`: one span per backend call,
linked to every request whose images it held, with model, version and batch size. The request span
gets the answers' models, versions and decisions, and an `admitted` event (admission never waits).
Each span costs the SDK about 12 us to make and 25 us to encode for OTLP (2-core VM): a request has
three, a batch one.
"""
import os

from serving.errors import StartupError

EXPORTERS = ("otlp", "console")


def requested() -> list[str]:
    """The exporters OTEL_TRACES_EXPORTER names, or [] (off)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise StartupError(f"OTEL_TRACES_EXPORTER={','.join(unknown)}: digitserve exports traces by "
                           f"{' or '.join(EXPORTERS)}")
    if names:
        try:
            import opentelemetry.sdk.trace  # noqa: F401  (checked here, used in each HTTP process)
        except ImportError:
            raise StartupError("OTEL_TRACES_EXPORTER is set but OpenTelemetry is not installed: "
                               "pip install 'digitserve[otel]'") from None
    return names


class Tracing:
    """One HTTP process's tracer (made after the fork: the SDK's export thread is per process)."""

    def __init__(self, provider):
        from opentelemetry import propagate, trace
        self.trace, self.propagate = trace, propagate
        self.provider = provider
        self.tracer = provider.get_tracer("digitserve")

    @classmethod
    def from_environment(cls, exporters: list[str]) -> "Tracing":
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                          "digitserve")}))
        for name in exporters:
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            else:
                provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        return cls(provider)

    def shutdown(self) -> None:
        self.provider.shutdown()  # exports what is buffered

    def current(self):
        """The active span's context, for the batcher (whose task is not the request's)."""
        return self.trace.get_current_span().get_span_context()

    def waited(self, context, since_ns: int, until_ns: int) -> None:
        """A `queue` span, child of the request `context`, from its arrival in the batcher to its batch."""
        parent = self.trace.set_span_in_context(self.trace.NonRecordingSpan(context))
        self.tracer.start_span("queue", context=parent, start_time=since_ns).end(end_time=until_ns)

    def batch(self, contexts: list, attributes: dict, since_ns: int, until_ns: int) -> None:
        """The `inference` span of one batcher run, linked to every request it answered."""
        links = [self.trace.Link(context) for context in contexts if context is not None and context.is_valid]
        span = self.tracer.start_span("inference", context=self.trace.set_span_in_context(self.trace.INVALID_SPAN),
                                      links=links, attributes=attributes, start_time=since_ns)
        span.end(end_time=until_ns)


def spanned(tracing: Tracing | None, name: str, since_ns: int, **attributes) -> None:
    """A child span of the current one from `since_ns` to now (when tracing is on): made once its
    work is done, which costs less than entering and leaving one around it."""
    if tracing is not None:
        tracing.tracer.start_span(name, attributes=attributes, start_time=since_ns).end()


def annotate(tracing: Tracing | None, event: str | None = None, **attributes) -> None:
    """Attributes (or an event with them) on the current span, when tracing is on."""
    if tracing is not None:
        current = tracing.trace.get_current_span()
        current.add_event(event, attributes) if event else current.set_attributes(attributes)


class TracingMiddleware:
    """Pure ASGI middleware, installed only when tracing is asked for: the request's server span."""

    def __init__(self, app, service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        tracing = self.service.tracing
        if scope["type"] != "http" or tracing is None:
            return await self.app(scope, receive, send)
        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        status = 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        with tracing.tracer.start_as_current_span(
                scope["method"], context=tracing.propagate.extract(carrier),
                kind=tracing.trace.SpanKind.SERVER) as request_span:
            try:
                await self.app(scope, receive, send_and_note)
            finally:
                route = getattr(scope.get("route"), "path", None)
                request_span.update_name(f"{scope['method']} {route or 'unmatched'}")
                request_span.set_attributes({"http.request.method": scope["method"], "url.path": scope["path"][:200],
                                             "http.route": route or "", "http.response.status_code": status,
                                             "digitserve.request_id": scope.get("state", {}).get("request_id", "")})
