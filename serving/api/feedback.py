"""POST /feedback: the true label of a logged prediction (needs --prediction-log). Counted per model
and version in /metrics (`digitserve_feedback_total`, `digitserve_live_accuracy`), shown by
/models/NAME, and written to the prediction log beside the prediction."""
from fastapi import APIRouter, Request
from pydantic import ValidationError

from serving import schemas
from serving.api.bodies import read_body
from serving.api.common import AUTH, service_of
from serving.errors import InputError

MAX_BODY = 1024  # bytes: an ID and a digit

router = APIRouter(tags=["feedback"])


@router.post("/feedback", dependencies=AUTH, response_model=schemas.FeedbackResponse,
             responses={**schemas.ERROR_RESPONSES, 409: {"model": schemas.ErrorResponse}},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": schemas.FeedbackRequest.model_json_schema()}}}},
             summary="Tell the service the true label of a prediction it logged")
async def feedback(request: Request):
    """`{"id": ..., "label": 0-9}`: 404 for an ID the log does not hold (never logged, sampled out, or
    past --feedback-days), 409 for a prediction already told."""
    body = await read_body(request, MAX_BODY, images=False)
    try:
        told = schemas.FeedbackRequest.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = "/".join(map(str, first["loc"])) or "the body"
        raise InputError(f"{first['msg']} at {where}", 422) from None
    model, version, label = await service_of(request).tell(told.id, told.label)
    request.state.model = model
    return {"id": told.id, "model": model, "version": version, "label": label, "truth": told.label,
            "right": label == told.label}
