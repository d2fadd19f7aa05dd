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
_refused: str | None = None  # why pin_before_torch() did not pin (said once, recorded with each run)


def pin_before_torch(required: bool = True) -> bool:
    """Put the pinned kernel choices in the environment; must run before this process imports torch.

    Returns whether they are set. What prevents them is a UsageError when `required` (the user asked
    for --reproducible), else a note on stderr: the run goes on unpinned."""
    global _pinned, _refused
    if _pinned:
        return True
    problem = None
    if "torch" in sys.modules:
        problem = ("reproducible mode must be set up before torch is imported: call "
                   "training.reproducible.pin_before_torch() first (python -m training does)")
    for name, value in PINNED_ENV.items():
        if problem is None and os.environ.get(name, value) != value:
            problem = f"{name}={os.environ[name]} in the environment conflicts with reproducible mode, which pins {value}"
    if problem is not None:
        _refused = problem
        return refuse(problem, required)
    os.environ.update(PINNED_ENV)
    _pinned = True
    return True


def activate(device, required: bool = True) -> dict:
    """Apply the run-time half of the pins and check that the kernel choices took. Returns the record
    that metrics.json and the manifest carry: pinned, or not and why (then a UsageError if `required`)."""
    import torch
    if not _pinned and _refused is not None and not required:
        return {**OFF, "reason": _refused}  # said when pinning was refused
    if device.type != "cpu":
        problem = f"reproducible mode trains on the CPU only, and this run is on {device}"
    elif not _pinned:
        problem = "the CPU kernels were not pinned before torch was imported"
    elif (capability := torch.backends.cpu.get_cpu_capability()) != "AVX2":
        problem = f"reproducible mode needs PyTorch's AVX2 kernels and this CPU gives {capability} ones"
    else:
        torch.set_num_threads(THREADS)
        torch.use_deterministic_algorithms(True)
        return {"pinned": True, "env": dict(PINNED_ENV), "threads": THREADS, "deterministic_algorithms": True}
    refuse(problem, required)
    return {**OFF, "reason": problem}


def refuse(problem: str, required: bool) -> bool:
    if required:
        raise UsageError(f"{problem}; pass --no-reproducible")
    print(f"note: {problem}: this run is not pinned, and its weights depend on the machine", file=sys.stderr)
    return False
