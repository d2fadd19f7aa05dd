"""The comparison point for bench/serve.py: a minimal FastAPI + ONNX Runtime endpoint.

One uvicorn process; decodes the uploaded PNG with Pillow and runs the same ONNX artifact per
request, with no batching, validation or metrics. Not part of the service.

    python bench/fastapi_baseline.py EXPORT_FOLDER PORT
"""
import io
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
app = FastAPI()


@app.post("/predict")
async def predict(file: UploadFile):
    image = Image.open(io.BytesIO(await file.read())).convert("L")
    x = (np.asarray(image, dtype=np.float32) * (16 / 255))[None, None]
    log_probs = session.run(None, {"pixels": x})[0][0]
    return {"label": int(log_probs.argmax()), "probabilities": np.exp(log_probs).round(6).tolist()}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
