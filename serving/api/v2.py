"""The Open Inference Protocol (KServe v2) REST subset: server and model metadata, health,
readiness and infer, for clients and platforms (KServe, Triton tooling) that speak it."""
import time

import numpy as np
from fastapi import APIRouter, Request
from pydantic import ValidationError

from serving import answers, images, schemas
from serving.api.bodies import read_body
from serving.api.common import AUTH, error_response, service_of
from serving.errors import InputError
from serving.inference import ServedModel
from serving.request_ids import prediction_ids
from serving.service import MAX_IMAGES_PER_REQUEST

DATATYPES = {"FP32": np.float32, "UINT8": np.uint8}
MANIFEST_DATATYPES = {"float32": "FP32", "uint8": "UINT8"}
# After the log-probabilities, one value a row: how far to trust it, calibrated as /predict answers it
# (serving/answers.py; candidates comma-separated), and its prediction ID for /feedback.
ROW_OUTPUTS = {"confidence": "FP32", "decision": "BYTES", "candidates": "BYTES", "id": "BYTES"}
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": schemas.V2InferRequest.model_json_schema()}}}}

router = APIRouter(prefix="/v2", tags=["v2"])


def served(request: Request, name: str) -> ServedModel:
    """The model's served version, or 404 naming the known ones, or 503 saying why it is unavailable."""
    return service_of(request).catalog.model(name)


@router.get("", summary="Server metadata")
async def server_metadata():
    return {"name": "digitserve", "version": "0.1.0", "extensions": []}


@router.get("/health/live", summary="Liveness")
async def live():
    return {"live": True}


@router.get("/health/ready", responses={503: {"model": schemas.ErrorResponse}}, summary="Readiness")
async def ready(request: Request):
    if service_of(request).ready:
        return {"ready": True}
    return error_response(503, "models are still loading")


@router.get("/models/{name}", dependencies=AUTH, responses=schemas.ERROR_RESPONSES, summary="Model metadata")
async def model_metadata(name: str, request: Request):
    m = served(request, name).manifest
    return {"name": name, "versions": [m["version"]], "platform": f"digitserve_{service_of(request).config.backend}",
            "inputs": [{"name": m["input"]["name"], "datatype": MANIFEST_DATATYPES[m["input"]["dtype"]],
                        "shape": [-1 if d is None else d for d in m["input"]["shape"]]}],
            "outputs": [{"name": m["output"]["name"], "datatype": "FP32", "shape": [-1, 10]},
                        *({"name": key, "datatype": datatype, "shape": [-1]} for key, datatype in ROW_OUTPUTS.items())]}


@router.get("/models/{name}/ready", dependencies=AUTH, responses=schemas.ERROR_RESPONSES, summary="Model readiness")
async def model_ready(name: str, request: Request):
    served(request, name)
    if not service_of(request).ready:
        return error_response(400, f"model {name!r} is loading")
    return {"name": name, "ready": True}


@router.post("/models/{name}/infer", dependencies=AUTH, response_model=schemas.V2InferResponse,
             responses=schemas.ERROR_RESPONSES, openapi_extra=INFER_BODY,
             summary="Infer on an FP32 or UINT8 tensor N x C x H x W (row-major data)")
async def infer(name: str, request: Request):
    model, started = served(request, name), time.perf_counter()
    request.state.model = name
    body = await read_body(request, service_of(request).config.max_payload_bytes)
    try:
        infer_request = schemas.V2InferRequest.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        raise InputError(f"invalid inference request: {first['msg']} at {'/'.join(map(str, first['loc']))}",
                         400) from None
    if len(infer_request.inputs) != 1:
        raise InputError(f"expected exactly one input tensor, got {len(infer_request.inputs)}", 400)
    array = tensor_array(infer_request.inputs[0], model.manifest["input"])
    service = service_of(request)
    async with service.admission.admitted():
        outputs, _ = await service.infer([(model, row) for row in array])
    log_probs = np.stack([item.log_probs for item in outputs]).astype(np.float32)
    n, request_id = len(outputs), request.state.request_id
    trusted = [{"id": id_, "model": name, "version": model.version, **answers.answer(model, item, service.metrics)}
               for id_, item in zip(prediction_ids(request_id, n), outputs)]
    if service.prediction_log is not None:
        service.prediction_log.record(request_id, trusted, [None] * n, list(array), started)
    return {"model_name": name, "model_version": model.version, "id": infer_request.id,
            "outputs": [{"name": model.manifest["output"]["name"], "shape": list(log_probs.shape),
                         "datatype": "FP32", "data": log_probs.ravel().tolist()},
                        *({"name": key, "shape": [n], "datatype": datatype, "data": [v2_value(row[key]) for row in trusted]}
                          for key, datatype in ROW_OUTPUTS.items())]}


def v2_value(value):
    """A BYTES row holds a string: a list (the candidates) is written comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, list) else value


def tensor_array(tensor: schemas.V2Tensor, spec: dict) -> np.ndarray:
    """A v2 input tensor -> the model's N x C x H x W array, checked against the manifest spec."""
    if tensor.datatype not in DATATYPES:
        raise InputError(f"datatype {tensor.datatype} not supported (FP32 or UINT8)", 400)
    expected = spec["shape"][1:]
    if len(tensor.shape) != 4 or tensor.shape[1:] != expected or tensor.shape[0] < 1:
        raise InputError(f"shape {tensor.shape} does not match [N, {', '.join(map(str, expected))}]", 400)
    if tensor.shape[0] > MAX_IMAGES_PER_REQUEST:
        raise InputError(f"batch {tensor.shape[0]} exceeds {MAX_IMAGES_PER_REQUEST}", 400)
    try:
        flat = images.numbers(tensor.data, "data must be numbers").ravel()
    except InputError as err:
        raise InputError(err.message, 400) from None
    if flat.size != int(np.prod(tensor.shape)):
        raise InputError(f"data has {flat.size} values; shape {tensor.shape} needs {int(np.prod(tensor.shape))}", 400)
    if tensor.datatype == "UINT8" and not np.array_equal(flat, np.round(flat)):
        raise InputError("UINT8 data must be integers", 400)
    problem = images.value_problem(flat, spec)
    if problem:
        raise InputError(problem, 400)
    return flat.reshape(tensor.shape).astype(spec["dtype"])
