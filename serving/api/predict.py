"""POST /predict: one or several images (or pixel arrays) in, one answer per input out."""
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving import answers, images, schemas
from serving.api import errors
from serving.api.bodies import Options, read_request
from serving.api.common import service_of
from serving.request_ids import prediction_ids
from serving.tracing import annotate, spanned
from serving.routing import Routed

PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": schemas.PredictJSON.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "model": {"type": "string"}, "invert": {"type": "boolean"}, "resize": {"type": "boolean"},
        "model_input": {"type": "boolean"}, "raw": {"type": "boolean"},
        "unsure_below": {"type": "number", "minimum": 0, "maximum": 1}}}},
    **{media: {"schema": {"type": "string", "format": "binary"}} for media in ("image/png", "image/jpeg")},
}}}

router = APIRouter(tags=["prediction"])


# No `dependencies`: ShortPath would not run them. The endpoint checks the API key itself.
@router.post("/predict", response_model=schemas.PredictResponse,
             responses=schemas.ERROR_RESPONSES, openapi_extra=PREDICT_BODY,
             summary="Classify one or several images (8x8 digits, 32x32 house-number crops, or photos with resize)")
async def predict(request: Request):
    """Multipart upload (any number of file fields), JSON, or one image as the body. Options `model`,
    `invert`, `resize`, `model_input`, `raw`, `unsure_below` as query parameters, form fields or JSON
    fields. Each input goes to the model that takes its size and colour (its answer says why), unless
    `model` names one; each answer says how far to trust it (confidence, decision, candidates)."""
    service, started, started_ns = service_of(request), time.perf_counter(), time.time_ns()
    service.check_key(request.headers)
    async with service.admission.body_room(request.headers.get("content-length")):
        inputs, options = await read_request(request, service.config.max_payload_bytes)
        async with service.admission.admitted():
            # Admission never waits (beyond --max-queue it refuses at once): an event, not a span.
            annotate(service.tracing, "admitted", **{"digitserve.in_progress": service.admission.in_progress})
            routed = await service.prepare(inputs, options)
            spanned(service.tracing, "decode", started_ns, **{"digitserve.inputs": len(inputs)})
            request.state.model = routed[0].model.name
            outputs, batch_images = await service.infer([(r.model, r.array) for r in routed])
    ids = prediction_ids(request.state.request_id, len(inputs))
    predictions = [prediction(id_, label, r, output, batch_images, options, kind == "bytes", service.metrics)
                   for id_, (label, kind, _), r, output in zip(ids, inputs, routed, outputs)]
    annotate(service.tracing, **{"digitserve.models": [p["model"] for p in predictions],
                                 "digitserve.versions": [p["version"] for p in predictions],
                                 "digitserve.decisions": [p["decision"] for p in predictions]})
    if service.prediction_log is not None:
        service.prediction_log.record(request.state.request_id, predictions,
                                      [value if kind == "bytes" else None for _, kind, value in inputs],
                                      [r.array for r in routed], started)
    # Written here, not through response_model: FastAPI's validation and re-encoding of the answer cost
    # about 5 % of a request's CPU (bench/RESULTS.md, issue 28). The model still documents it, and
    # tests/serving/test_schema_fuzz.py checks answers against it.
    return Response(json.dumps({"predictions": predictions}, separators=(",", ":"), allow_nan=False),
                    media_type="application/json")


ROUTE = next(route for route in router.routes if route.endpoint is predict)


class ShortPath:
    """Pure ASGI middleware, the innermost of digitserve's (inside the request ID, the metrics and the
    trace's server span): POST /predict goes straight to `predict()` with a plain Request, past
    FastAPI's exception middleware, router, dependency solving and request handler, which took
    about a quarter of such a request's CPU (py-spy; bench/RESULTS.md, issue 28). FastAPI still
    documents the route from its declaration above and answers its other methods (405); errors get the
    one mapping's answers. The route must keep no `dependencies` and be included without a prefix
    (tests/serving/routes/test_predict.py checks both)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != ROUTE.path or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        scope["route"] = ROUTE  # the metrics' route label, as the router would set it
        request = Request(scope, receive)
        try:
            response = await predict(request)
        except Exception as err:
            response = await errors.answer(request, err)
        await response(scope, receive, send)


def prediction(id_: str, label: str, routed: Routed, output: answers.Scored, batch_images: int, options: Options,
               uploaded: bool, metrics) -> dict:
    """One input's answer, naming the version that gave it and why; what the model saw if asked."""
    return {"id": id_, "input": label, "model": routed.model.name, "version": routed.model.version,
            "routed": routed.reason,
            **answers.answer(routed.model, output, metrics, options.raw, options.unsure_below),
            "batch_size": batch_images,
            **({"model_input": images.as_pixels(routed.array)} if options.model_input and uploaded else {})}
