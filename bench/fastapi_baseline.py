"""The comparison point for bench.serve: a minimal FastAPI + ONNX Runtime endpoint.

Decodes the uploaded PNG with Pillow and runs the same ONNX artifact per request (grayscale digits
scaled to the model's range, or RGB crops as uint8), with no batching, validation or metrics. On
CUDA when asked and ONNX Runtime has the provider. Not part of the service.

    .venv/bin/python -m bench.fastapi_baseline EXPORT_FOLDER PORT [--device cpu|cuda] [--workers N]
"""
import argparse
import io
import json
import os

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, UploadFile
from PIL import Image

# uvicorn's worker processes import this module afresh: the settings travel in the environment.
FOLDER, DEVICE = os.environ.get("BASELINE_EXPORT", "."), os.environ.get("BASELINE_DEVICE", "cpu")
app = FastAPI()
session = spec = None
if os.environ.get("BASELINE_EXPORT"):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if DEVICE == "cuda":
        ort.preload_dlls()  # CUDA and cuDNN from NVIDIA's pip wheels, as serving/backends.py finds them
    providers = (["CUDAExecutionProvider"] if DEVICE == "cuda" else []) + ["CPUExecutionProvider"]
    session = ort.InferenceSession(f"{FOLDER}/model.onnx", options, providers=providers)
    spec = json.loads(open(f"{FOLDER}/model.json").read())["input"]


@app.post("/predict")
async def predict(file: UploadFile):
    image = Image.open(io.BytesIO(await file.read()))
    if spec["color"] == "grayscale":
        x = (np.asarray(image.convert("L"), dtype=np.float32) * (spec["range"][1] / 255))[None, None]
    else:
        x = np.ascontiguousarray(np.asarray(image.convert("RGB")).transpose(2, 0, 1))[None]
    log_probs = session.run(None, {spec["name"]: x})[0][0]
    return {"label": int(log_probs.argmax()), "probabilities": np.exp(log_probs).round(6).tolist()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("port", type=int)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    os.environ.update(BASELINE_EXPORT=args.folder, BASELINE_DEVICE=args.device)
    uvicorn.run("bench.fastapi_baseline:app", app_dir=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                host="127.0.0.1", port=args.port, workers=args.workers, log_level="warning")
