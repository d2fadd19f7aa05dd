"""The digitserve HTTP service: LitServe + ONNX Runtime (or TorchScript) over the exports folder."""
