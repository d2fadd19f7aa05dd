"""Inference backends over an exported artifact: ONNX Runtime (default) or TorchScript.

Both take a batch in the manifest's input dtype (N x C x H x W) and return log-probabilities N x 10
as float32 NumPy. torch is imported only by the TorchScript backend.
"""
import os
from pathlib import Path

import numpy as np


def cuda_wanted(device: str) -> bool:
    return device in ("auto", "cuda")


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: Path, device: str, input_name: str):
        import onnxruntime as ort
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise RuntimeError("--device cuda: this ONNX Runtime has no CUDAExecutionProvider "
                               "(install onnxruntime-gpu)")
        use_cuda = cuda_wanted(device) and "CUDAExecutionProvider" in available
        if use_cuda:
            # CUDA and cuDNN from NVIDIA's pip wheels (the container's choice) are not on the loader's
            # path: ONNX Runtime loads them from site-packages itself.
            ort.preload_dlls()
        providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        # Small graphs: one intra-op thread per worker beats contention between workers on few cores.
        options.intra_op_num_threads = int(os.environ.get("DIGITSERVE_ORT_THREADS", "1"))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_name = input_name
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


class TorchScriptBackend:
    name = "torchscript"

    def __init__(self, path: Path, device: str, input_name: str):
        import torch
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: CUDA is not available to torch")
        self.torch = torch
        self.device = "cuda" if cuda_wanted(device) and torch.cuda.is_available() else "cpu"
        self.module = torch.jit.load(str(path), map_location=self.device).eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            x = self.torch.from_numpy(batch).to(self.device, non_blocking=True)
            return self.module(x).float().cpu().numpy()


BACKENDS = {"onnx": OnnxBackend, "torchscript": TorchScriptBackend}
