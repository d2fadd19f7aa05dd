"""Run folders: written atomically (export_contract.publish.atomic_folder), holding the checkpoint,
metrics.json and the curves.

Light to import (matplotlib loads when a plot is drawn): the command line checks folders with it
before torch is imported."""
import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from training.errors import UsageError


def check_writable(folder: Path) -> None:
    """Fail before any training if `folder` cannot hold a new run."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(f"output folder {folder} is not writable: {err.strerror or err}") from None


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def cpu_info() -> tuple[str, list[str]]:
    """The processor's name and its vector extensions that PyTorch dispatches on (from /proc/cpuinfo
    on Linux; platform.processor() is empty there)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = fields.get("flags", "").split()
    return (fields.get("model name") or platform.processor() or platform.machine(),
            [flag for flag in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if flag in flags])


def environment(device: str) -> dict:
    import numpy
    import torch
    cpu_model, cpu_features = cpu_info()
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "platform": platform.platform(), "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else cpu_model,
            "cpu_model": cpu_model, "cpu_features": cpu_features, "cpu_count": os.cpu_count(),
            # the kernels PyTorch actually used: AVX2 in reproducible mode, whatever the CPU offers
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def plot_curves(stem: Path, val_nll: list[float | None], val_error: list[float | None], test_nll: float,
                test_error: float, title: str) -> None:
    """Validation NLL and error per epoch, the test value dashed, as the original notebook drew them.
    Epochs that were not validated (None: --val-every) are left out."""
    import matplotlib
    matplotlib.use("Agg")  # headless: training runs on servers
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, curve, test, label, colour in ((axes[0], val_nll, test_nll, "NLL", "tab:blue"),
                                          (axes[1], val_error, test_error, "error", "tab:red")):
        # counted from 1, as the training output and /models count them
        epochs, values = zip(*((epoch, value) for epoch, value in enumerate(curve, 1) if value is not None))
        ax.plot(epochs, values, color=colour, linewidth=2, label=f"val {label}")
        ax.hlines(test, 1, max(len(curve), 2), linestyles="dashed", color="black", label=f"test {label} {test:.3f}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_yscale("log" if min(values) > 0 else "linear")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    for suffix in (".png", ".pdf"):
        fig.savefig(stem.with_suffix(suffix), dpi=110)
    plt.close(fig)
