"""Inference backends over an exported artifact: ONNX Runtime (default) or TorchScript.

Both take a batch in the manifest's input dtype (N x C x H x W), return log-probabilities N x 10 and,
where the artifact has one, its "not a digit" score N (else None), as float32 NumPy, and say where
they run (`device`, `provider`). torch is imported only by the
TorchScript backend. Whether a GPU is usable is decided here, from NVIDIA's management library
(NVML, which creates no CUDA context, so the decision can be made before LitServe forks the HTTP
processes), before any runtime is asked for CUDA: without a GPU nothing tries CUDA or logs about it.
"""
import ctypes
import io
import os
import warnings
from functools import cache

import numpy as np


@cache
def gpu_count() -> int:
    """NVIDIA GPUs on this machine (0 without a driver or a device)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return 0
    count = ctypes.c_uint(0)
    if nvml.nvmlInit_v2() != 0:
        return 0
    try:
        return count.value if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else 0
    finally:
        nvml.nvmlShutdown()


class BackendError(Exception):
    """The backend cannot run this artifact as asked (e.g. --device cuda without a usable GPU)."""


class OnnxBackend:
    name = "onnx"
    description = "ONNX Runtime (the default; on the GPU with onnxruntime-gpu)"

    @staticmethod
    def resolve(device: str) -> str:
        """--device auto/cpu/cuda -> where models will run ("cuda" or "cpu"), without touching CUDA."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("ONNX Runtime is not installed: pip install 'digitserve[cpu]', or 'digitserve[gpu]' "
                               "on a machine with an NVIDIA GPU (make serve picks)") from None
        has_provider = "CUDAExecutionProvider" in ort.get_available_providers()
        if device == "cuda" and not (gpu_count() and has_provider):
            raise BackendError("--device cuda: " + ("no NVIDIA GPU on this machine" if not gpu_count() else
                               "this ONNX Runtime has no CUDA provider (install onnxruntime-gpu: make serve does "
                               "on a machine with a GPU)"))
        return "cuda" if device != "cpu" and gpu_count() and has_provider else "cpu"

    def __init__(self, model: bytes, file_name: str, device: str, input_name: str):
        """`model`: the artifact's checked bytes; `device`: "cuda" or "cpu", as resolve() gave it."""
        import onnxruntime as ort
        use_cuda = device == "cuda"
        if use_cuda:
            # CUDA and cuDNN from NVIDIA's pip wheels are not on the loader's path: ONNX Runtime finds them.
            ort.preload_dlls()
        options = ort.SessionOptions()
        # Small graphs: one intra-op thread per HTTP process beats contention between processes on few cores.
        options.intra_op_num_threads = int(os.environ.get("DIGITSERVE_ORT_THREADS", "1"))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as err:  # ONNX Runtime raises its own types for unreadable graphs
            raise BackendError(f"ONNX Runtime cannot load {file_name}: {str(err).splitlines()[0]}") from None
        self.input_name = input_name
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.session.run(None, {self.input_name: batch})
        return outputs[0], outputs[1] if len(outputs) > 1 else None


class TorchScriptBackend:
    name = "torchscript"
    description = "TorchScript (needs torch)"

    @staticmethod
    def resolve(device: str) -> str:
        import torch
        usable = bool(gpu_count() and torch.version.cuda)  # torch.cuda.is_available() would create a context
        if device == "cuda" and not usable:
            raise BackendError("--device cuda: " + ("no NVIDIA GPU on this machine" if not gpu_count() else
                                                    "this torch is built without CUDA"))
        return "cuda" if device != "cpu" and usable else "cpu"

    def __init__(self, model: bytes, file_name: str, device: str, input_name: str):
        import torch
        self.torch = torch
        self.device = device
        self.provider = f"torch {torch.__version__}"
        try:
            with warnings.catch_warnings():  # deprecated upstream, but the artifact this backend serves
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
                self.module = torch.jit.load(io.BytesIO(model), map_location=self.device).eval()
        except RuntimeError as err:
            raise BackendError(f"torch cannot load {file_name}: {str(err).splitlines()[0]}") from None

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with self.torch.inference_mode():
            x = self.torch.from_numpy(batch).to(self.device, non_blocking=True)
            outputs = self.module(x)
            if isinstance(outputs, self.torch.Tensor):
                return outputs.float().cpu().numpy(), None
            return outputs[0].float().cpu().numpy(), outputs[1].float().cpu().numpy()


BACKENDS = {"onnx": OnnxBackend, "torchscript": TorchScriptBackend}
