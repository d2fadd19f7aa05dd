"""Export a trained run to TorchScript and ONNX with a validated manifest (exports/NAME/model.json).

The exported graph takes pixels as the service receives them and returns log-probabilities N x 10.
Every export runs the test split through both artifacts, checks them against the PyTorch model, and
records the metrics measured on the ONNX artifact: the served model is the measured model.
"""
import json
import pickle
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

import export_contract as contract
from export_contract import test_split
from training.errors import ExportError
from training.recipes import ARCHS
from export_contract.publish import atomic_folder, check_replacement
from training.runs import plot_curves, write_json

# TorchScript is deprecated upstream but is the artifact the TorchScript backend asks for; say it once, not per call.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)

PARITY_TOLERANCE = 1e-4  # max |log-prob| difference between an artifact and the PyTorch model
ONNX_OPSET = 18
LABELS = [str(digit) for digit in range(10)]


def validate_manifest(manifest: dict) -> None:
    """Raise ExportError naming every violation (the same check the server applies on reading)."""
    problems = contract.manifest_errors(manifest)
    if problems:
        raise ExportError("manifest invalid: " + "; ".join(problems))


def save_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    traced = torch.jit.trace(model, example)
    torch.jit.save(traced, str(path))


def save_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=["log_probs"],
                      dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET, dynamo=True, external_data=False,
                      verbose=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def run_onnx(path: Path, x: np.ndarray, input_name: str, batch_size: int = 512) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {input_name: x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])


@torch.no_grad()
def run_torch(model, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).float().numpy()


def default_name(run: dict) -> str:
    """digits-cnn, svhn-cnn; svhn-synthetic-cnn for a model that has seen only synthetic crops, so
    that it never takes the place (or the name) of one trained on SVHN."""
    synthetic = run.get("data", {}).get("name") == "svhn-synthetic"
    return f"{run['task']}-synthetic-{run['arch']}" if synthetic else f"{run['task']}-{run['arch']}"


def embed_test_set(folder: Path, x: np.ndarray, labels: np.ndarray, data: dict | None) -> dict:
    """The test split beside the artifacts, so that the server can re-measure the served model with no
    training code and no download: the manifest's test_set entry, or {} where the split is the official
    SVHN test file (anyone can fetch it) or larger than a server reads (export_contract.test_split)."""
    path = folder / test_split.FILE_NAME
    if (data is not None and data["name"] == "svhn") or not test_split.write(path, x, labels):
        return {}
    return {"test_set": {"file": path.name, "sha256": contract.sha256(path), "n": len(labels)}}


def export_model(model: torch.nn.Module, run: dict, run_dir: Path, input_spec: dict,
                 test_x: torch.Tensor, test_y: torch.Tensor, name: str, exports_dir: Path,
                 replace: bool = False) -> Path:
    """Write exports_dir/name atomically; raise ExportError (writing nothing) if parity fails, or
    PublishError if it would silently replace a better model there (`replace`: do)."""
    if problem := contract.name_error(name):
        raise ExportError(problem)
    model = model.cpu().eval()
    test_x, labels = test_x.cpu(), test_y.cpu().numpy()
    input_name = input_spec["name"]
    reference = run_torch(model, test_x)
    with atomic_folder(exports_dir / name) as staging:
        onnx_path, ts_path = staging / "model.onnx", staging / "model.ts"
        save_onnx(model, test_x[:2], onnx_path, input_name)
        save_torchscript(model, test_x[:2], ts_path)
        onnx_out = run_onnx(onnx_path, test_x.numpy(), input_name)
        ts_out = run_torch(torch.jit.load(str(ts_path)), test_x)
        parity = {"onnx_max_abs": float(np.abs(onnx_out - reference).max()),
                  "torchscript_max_abs": float(np.abs(ts_out - reference).max()), "tolerance": PARITY_TOLERANCE}
        for artifact, out in (("onnx", onnx_out), ("torchscript", ts_out)):
            if parity[f"{artifact}_max_abs"] > PARITY_TOLERANCE or not np.array_equal(out.argmax(1), reference.argmax(1)):
                raise ExportError(f"{artifact} artifact disagrees with the PyTorch model: max |diff| "
                                  f"{parity[f'{artifact}_max_abs']:.2e} (tolerance {PARITY_TOLERANCE:.0e})")
        test = {**contract.Figures.of(onnx_out, labels).as_dict(), "measured_on": "onnx"}
        plot_curves(staging / "curves", run["val_nll"], run["val_error"], test["nll"], test["error"],
                    f"{name}: best epoch {run['best_epoch'] + 1} of {run['epochs_run']}, test error "
                    f"{test['errors']}/{test['n']}")
        (staging / "curves.pdf").unlink()  # the service shows the PNG; the PDF stays in the run folder
        onnx_sha = contract.sha256(onnx_path)
        now = datetime.now(timezone.utc)
        test_set = embed_test_set(staging, test_x.numpy(), labels, run.get("data"))
        manifest = {
            "schema_version": contract.SCHEMA_VERSION, "name": name, "version": f"{now:%Y%m%dT%H%M%SZ}-{onnx_sha[:8]}",
            "task": run["task"], "arch": run["arch"], "summary": run.get("summary", ""),
            "created_at": now.isoformat(timespec="seconds"),
            "input": input_spec, "output": {"name": "log_probs", "shape": [None, 10], "kind": "log_probabilities"},
            "labels": LABELS,
            "artifacts": {
                "onnx": {"file": onnx_path.name, "sha256": onnx_sha, "bytes": onnx_path.stat().st_size, "opset": ONNX_OPSET},
                "torchscript": {"file": ts_path.name, "sha256": contract.sha256(ts_path), "bytes": ts_path.stat().st_size},
            },
            "curves": {"file": "curves.png", "sha256": contract.sha256(staging / "curves.png")},
            **test_set,
            **({"data": run["data"]} if "data" in run else {}),
            "metrics": {"best_epoch": run["best_epoch"], "epochs_run": run["epochs_run"], "val_nll": run["val_nll"],
                        "val_error": run["val_error"], "test": test, "parity": parity},
            "training": {"seed": run["seed"], "config": run["config"], "environment": run["environment"],
                         "wall_seconds": run["wall_seconds"], "run": run_dir.name,
                         **{key: run[key] for key in ("reproducibility", "checkpoint_sha256") if key in run}},
        }
        validate_manifest(manifest)
        write_json(staging / contract.MANIFEST_FILE, manifest)
        check_replacement(exports_dir / name, manifest, replace)
    return exports_dir / name


def load_run(run_dir: Path) -> tuple[dict, torch.nn.Module]:
    """A run folder's metrics and its best checkpoint, loaded without unpickling anything."""
    try:
        run = json.loads((run_dir / "metrics.json").read_text())
    except FileNotFoundError:
        raise ExportError(f"{run_dir} is not a run folder: it has no metrics.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{run_dir / 'metrics.json'} is corrupt: {err}") from None
    spec = ARCHS.get(run.get("task"), {}).get(run.get("arch")) if isinstance(run, dict) else None
    if spec is None:
        raise ExportError(f"{run_dir / 'metrics.json'} names no known task/arch")
    model = spec.build(**run.get("config", {}).get("model_kwargs", {}))
    try:
        state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ExportError(f"{run_dir} has no checkpoint model.pt") from None
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ExportError(f"{run_dir / 'model.pt'} is not a loadable state dict: {str(err).splitlines()[0]}") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ExportError(f"{run_dir / 'model.pt'} does not fit arch {run['arch']!r}: "
                          f"{str(err).splitlines()[0]}") from None
    return run, model
