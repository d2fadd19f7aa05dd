"""The comparison point for bench/serve.py: a minimal FastAPI + ONNX Runtime endpoint.

One uvicorn process; decodes the uploaded PNG with Pillow and runs the same ONNX artifact per
request (grayscale digits scaled to the model's range, or RGB crops as uint8), with no batching,
validation or metrics. Not part of the service.

    python bench/fastapi_baseline.py EXPORT_FOLDER PORT
"""
import io
import json
import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, UploadFile
from PIL import Image

folder, port = sys.argv[1], int(sys.argv[2])
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(f"{folder}/model.onnx", options, providers=["CPUExecutionProvider"])
spec = json.loads(open(f"{folder}/model.json").read())["input"]
app = FastAPI()


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
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
