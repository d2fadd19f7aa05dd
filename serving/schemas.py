"""Request and response bodies: the Pydantic models behind validation and the OpenAPI document."""
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

FEEDBACK_ID_CHARS = 140  # a request ID (128) and "/255"


class PredictJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown option is a mistake to say, not to ignore

    model: str | None = Field(None, description="model name; default: routed by image size")
    invert: bool | None = Field(None, description="the image is dark ink on a light background (default: detected "
                                                  "with resize, else false)")
    resize: bool | None = Field(None, description="other sizes: find the digit, centre it and downsample it as the "
                                            "training data was (digits); centre-crop a colour photo (SVHN)")
    model_input: bool | None = Field(None, description="also answer what the model saw, for uploaded images")
    raw: bool | None = Field(None, description="the model's own probabilities instead of the calibrated ones (the "
                                              "confidence, decision and candidates stay calibrated)")
    unsure_below: float | None = Field(None, ge=0, le=1, description="confidence below which the decision is "
                                       "'unsure' (default: the model's own, chosen on validation)")
    images: list[str] = Field(default_factory=list, description="base64 (or data-URL) encoded image files")
    pixels: list[Any] = Field(default_factory=list,
                              description="raw arrays: 8x8 on 0..16 (digits) or 32x32x3 on 0..255 (SVHN, RGB)")


class Prediction(BaseModel):
    id: str = Field(description="this prediction's ID, for /feedback and the logs: the request's X-Request-ID, "
                    "or X-Request-ID/i for the i-th input of a request with several")
    input: str = Field(description="the upload's file name, or images[i] / pixels[i]")
    model: str
    version: str
    routed: str = Field(description="why this model answered: named in the request, the default for the input's "
                                    "size and colour, or resize=true's choice")
    label: int = Field(description="the most likely digit")
    confidence: float = Field(description="the calibrated probability of `label`")
    decision: str = Field(description="digit: trust the label; unsure: the confidence is below the model's threshold "
                                      "(chosen on validation for 99.5 % accuracy of what is answered), see candidates; "
                                      "not_a_digit: the picture is unlike the digits the model learnt")
    candidates: list[int] = Field(description="the conformal candidate set, most likely first: it holds the true digit "
                                              "with the model's conformal level (99 %) of probability")
    probabilities: list[float] = Field(description="one per class 0..9, calibrated (raw=true: the model's own)")
    batch_size: int = Field(description="images in the inference call this one shared")
    model_input: list[Any] | None = Field(None, description="uploaded images, when asked (model_input=true): what "
                                          "the model saw, in the form of a pixels[] entry (8x8 on 0..16 or 32x32x3 on 0..255)")


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class TestMetrics(BaseModel):
    nll: float
    error: float
    errors: int
    n: int


class TestFile(BaseModel):
    file: str
    md5: str
    n: int


class DataRecord(BaseModel):
    name: str = Field(description="sklearn-digits | sklearn-digits+photos | svhn | svhn-synthetic | svhn-format")
    description: str
    test_file: TestFile | None = Field(None, description="the test file /evaluate reads from the server's --data-dir")


class ModelEvent(BaseModel):
    model: str
    at: str
    event: str = Field(description="served | rejected | removed")
    version: str | None = None
    reason: str | None = Field(None, description="why the version was rejected")
    note: str | None = Field(None, description="why a served version is unverified")


class ModelSummary(BaseModel):
    name: str
    status: str = Field(description="ready | unavailable")
    reason: str | None = Field(None, description="why the model is unavailable")
    task: str | None = None
    version: str | None = None
    summary: str | None = None
    data: DataRecord | None = Field(None, description="what the model was trained and tested on")
    default_for: str | None = Field(None, description="the image size this model answers by default")
    answers: list[str] | None = Field(None, description="what this model answers unless a request names another, "
                                      "and why")
    input: dict | None = None
    device: str | None = Field(None, description="cuda | cpu: where this process runs the model")
    provider: str | None = Field(None, description="the ONNX Runtime execution provider, or the torch version")
    test: TestMetrics | None = None
    verified: dict | None = Field(None, description="this process's run of the test split through the served "
                                  "artifact before serving it: reproduced true with its figures, or null with the "
                                  "reason it could not be run")
    best_epoch: int | None = Field(None, description="the epoch whose weights were kept, counted from 1")
    epochs_run: int | None = None
    calibration: dict | None = Field(None, description="how its answers are calibrated (temperature, thresholds, "
                                     "test figures before and after, a link to its reliability diagram), or a note that "
                                     "it is not")
    rejected: ModelEvent | None = Field(None, description="the newest version found, when it was not served: when "
                                          "and why (the version above keeps answering)")


class ModelsResponse(BaseModel):
    backend: str
    models: list[ModelSummary]


class EvaluateResponse(BaseModel):
    model: str
    version: str
    backend: str
    served: TestMetrics
    manifest: TestMetrics
    calibration: dict | None = Field(None, description="the calibration record's test figures served and recorded, "
                                     "and where they differ")
    agrees: bool = Field(description="same error count and NLL within 1e-4 of the manifest's (and the calibration "
                                     "figures too)")
    seconds: float


class ReloadResponse(BaseModel):
    changes: list[ModelEvent] = Field(description="what this process's reload changed")
    models: list[str] = Field(description="the models this process serves now")


class ErrorResponse(BaseModel):
    error: str


class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class V2InferRequest(BaseModel):
    id: str | None = None
    inputs: list[V2Tensor]
    outputs: list[dict] | None = None
    parameters: dict | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2Tensor]


ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 422, 503)}


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=FEEDBACK_ID_CHARS, description="the prediction's `id` from /predict")
    label: StrictInt = Field(ge=0, le=9, description="the digit the input really shows")


class FeedbackResponse(BaseModel):
    id: str
    model: str
    version: str
    label: int = Field(description="what the model answered")
    truth: int = Field(description="what the input really shows, as told")
    right: bool
