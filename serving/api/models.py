"""The models: what is served and how it was measured, its curves, evaluation now, reloads."""
import asyncio
import time

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from export_contract import Figures, calibration
from serving import schemas, verify
from serving.api.common import AUTH, service_of
from serving.errors import ModelNotFound
from serving.routing import Catalog
from serving.service import Service

router = APIRouter(tags=["models"], dependencies=AUTH)


def summary(service: Service, name: str, catalog: Catalog) -> dict:
    """A model as /models lists it; `rejected` when the newest version found was not served."""
    history = service.lifecycle.history.get(name)
    newest = history[-1] if history else None
    rejected = {"rejected": {"model": name, **newest}} if newest and newest["event"] == "rejected" else {}
    if name not in catalog.served:
        return {"name": name, "status": "unavailable", "reason": catalog.unavailable[name], **rejected}
    served = catalog.served[name]
    m = served.manifest
    key = catalog.default_for(name)
    record = m.get("calibration")
    trust = ({"temperature": record["temperature"], "unsure_below": record["confidence"]["unsure_below"],
              "not_a_digit": record.get("not_a_digit"),
              "conformal_level": record["conformal"]["level"], "test": record["test"],
              "reliability_url": f"/models/{name}/reliability.png"} if record is not None else
             {"note": "exported before calibration existed: answers use its raw probabilities, 'unsure' below "
                      f"{calibration.UNCALIBRATED['confidence']['unsure_below']}, and it never says not_a_digit"})
    return {"name": name, "status": "ready", "task": m["task"], "version": m["version"], "summary": m.get("summary"),
            "data": m.get("data"), "default_for": f"{key[2]}x{key[1]}" if key else None,
            "answers": catalog.answers(name), "input": m["input"],
            "device": served.runner.device, "provider": served.runner.provider,
            "test": Figures.recorded(m["metrics"]["test"]).as_dict(), "verified": served.verified,
            "best_epoch": m["metrics"]["best_epoch"] + 1, "epochs_run": m["metrics"]["epochs_run"],
            "calibration": trust, **rejected}


@router.get("/models", response_model=schemas.ModelsResponse,
            summary="Every model with its status, device, input spec and held-out test metrics")
async def list_models(request: Request):
    service = service_of(request)
    catalog = service.catalog
    return {"backend": service.config.backend, "models": [summary(service, name, catalog) for name in catalog.names]}


@router.get("/models/{name}", responses=schemas.ERROR_RESPONSES,
            summary="The full manifest (with validation curves), a link to its curves image, and the versions "
                    "served and rejected since start-up")
async def get_model(name: str, request: Request):
    """An unavailable model answers too (no manifest): its history says which versions failed and why."""
    service = service_of(request)
    catalog = service.catalog
    history = {"history": list(service.lifecycle.history.get(name, ()))}
    if name in catalog.unavailable:
        return {**summary(service, name, catalog), **history}
    served = catalog.model(name)  # 404 for a name no folder ever had: nothing is kept of it
    return {**summary(service, name, catalog), "live": await live(service, name), "manifest": served.manifest,
            "curves_url": f"/models/{name}/curves.png", **history}


async def live(service: Service, name: str) -> dict:
    """Accuracy on real traffic, beside the test figures: from the true labels told through /feedback."""
    counts = await service.live_accuracy()
    if counts is None:
        return {"note": "no feedback store: start the server with --prediction-log DIR to take POST /feedback"}
    versions = {version: {"told": told, "right": right, "accuracy": right / told}
                for (model, version), (told, right) in sorted(counts.items()) if model == name}
    return {"feedback_days": service.config.feedback_days, "versions": versions}


@router.get("/models/{name}/curves.png", responses=schemas.ERROR_RESPONSES, response_class=Response,
            summary="Validation curves with the test value dashed")
async def get_curves(name: str, request: Request):
    return Response(service_of(request).catalog.model(name).files["curves"], media_type="image/png")


@router.get("/models/{name}/reliability.png", responses=schemas.ERROR_RESPONSES, response_class=Response,
            summary="Reliability diagram: confidence against accuracy on the test split, before and after calibration")
async def get_reliability(name: str, request: Request):
    served = service_of(request).catalog.model(name)
    if "reliability" not in served.files:
        raise ModelNotFound(f"model {name!r} was exported before calibration existed: it has no reliability diagram")
    return Response(served.files["reliability"], media_type="image/png")


@router.post("/models/{name}/evaluate", response_model=schemas.EvaluateResponse, responses=schemas.ERROR_RESPONSES,
             summary="Run the held-out test split through the served backend now (SVHN: from --data-dir)")
async def evaluate(name: str, request: Request):
    """Background work: one evaluation at a time per process, in small parts that predictions come
    before (serving/batcher.py)."""
    service = service_of(request)
    served = service.catalog.model(name)
    started = time.perf_counter()
    async with service.admission.admitted(), service.evaluating:  # before reading: the official SVHN file is 64 MB
        x, y = served.test_split or await asyncio.to_thread(verify.from_data_dir, served.entry,
                                                            service.config.data_dir)
        log_probs, scores = await evaluated(service, served, x)
        record = served.manifest.get("calibration")
        if record is not None:
            nondigits = await evaluated(service, served, served.nondigits) if served.nondigits is not None else None
            calibrated = calibration.figures(log_probs, scores, y, record, *(nondigits or (None, None)))
    measured, recorded = Figures.of(log_probs, y), Figures.recorded(served.manifest["metrics"]["test"])
    agrees = measured.reproduces(recorded)
    answer = {"model": name, "version": served.version, "backend": service.config.backend,
              "served": measured.as_dict(), "manifest": recorded.as_dict()}
    if record is not None:
        differences = calibration.reproduces(calibrated, record["test"])
        answer["calibration"] = {"served": calibrated, "manifest": record["test"], "differences": differences}
        agrees = agrees and not differences
    return {**answer, "agrees": agrees, "seconds": round(time.perf_counter() - started, 4)}


async def evaluated(service: Service, served, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Log-probabilities (and scores) of `x` through the batcher, as background work."""
    outputs, _ = await service.infer([(served, array) for array in x], background=True)
    scores = None if outputs[0].score is None else np.array([item.score for item in outputs])
    return np.stack([item.log_probs for item in outputs]), scores


@router.post("/models/reload", response_model=schemas.ReloadResponse,
             summary="Follow the exports folder now: serve new and changed models once verified, drop removed ones")
async def reload_models(request: Request):
    """This process reloads before answering, and every other HTTP process is asked to at once. A
    version that fails its checks is listed as rejected with the reason; the one before it keeps
    answering."""
    service = service_of(request)
    changes = await service.reload()
    return {"changes": changes, "models": sorted(service.catalog.served)}
