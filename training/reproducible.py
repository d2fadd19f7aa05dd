"""Bit-reproducible training on the CPU: the same weights, bit for bit, on any x86_64 machine with AVX2.

PyTorch picks its CPU kernels by what the processor offers and splits work by thread count, and
each choice adds floats up in a different order. The digits CNN, seed 0, made 3 test errors on an
AVX2 machine and 7 on an AVX-512 one, run after run (bench/RESULTS.md, `bench/reproducibility.py`).
Pinned here, every such choice is the same on every machine:
- ATen's vectorised kernels (elementwise ops, reductions, BatchNorm, pooling, sampling): AVX2
- oneDNN's convolutions: AVX2
- MKL's matrix products: its AVX2 conditional-numerical-reproducibility branch, strict
- the thread count: 2 whatever the machine has (work is split by thread count, not by core)
- torch.use_deterministic_algorithms
The kernel choices are read from the environment once, when torch first needs them, so they are
set before torch is imported. The guarantee holds for one torch build and for the CPU only.
"""
import os
import sys

from training.errors import UsageError

PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"}
THREADS = 2  # the development VMs' core count: more threads do not speed the 8x8 models up
OFF = {"pinned": False}

_pinned = False


def pin_before_torch() -> None:
    """Put the pinned kernel choices in the environment; must run before this process imports torch."""
    global _pinned
    if _pinned:
        return
    if "torch" in sys.modules:
        raise UsageError("reproducible mode must be set up before torch is imported: call "
                         "training.reproducible.pin_before_torch() first (python -m training does)")
    for name, value in PINNED_ENV.items():
        if os.environ.get(name, value) != value:
            raise UsageError(f"{name}={os.environ[name]} in the environment conflicts with reproducible mode, "
                             f"which pins {name}={value}: unset it, or pass --no-reproducible")
    os.environ.update(PINNED_ENV)
    _pinned = True


def activate(device) -> dict:
    """Apply the run-time half of the pins and check that the kernel choices took; returns the record
    that metrics.json and the manifest carry."""
    import torch
    if device.type != "cpu":
        raise UsageError(f"reproducible mode trains on the CPU only; pass --no-reproducible to train on {device}")
    if not _pinned:
        raise UsageError("reproducible mode was not set up before torch was imported: call "
                         "training.reproducible.pin_before_torch() first (python -m training does)")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        raise UsageError(f"reproducible mode needs PyTorch's AVX2 kernels but it runs {capability} ones "
                         "(a CPU without AVX2?): pass --no-reproducible")
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    return {"pinned": True, "env": dict(PINNED_ENV), "threads": THREADS, "deterministic_algorithms": True}
