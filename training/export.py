"""Export a trained run to TorchScript and ONNX with a validated manifest (exports/NAME/model.json).

The exported graph takes pixels as the service receives them and returns log-probabilities N x 10
and a "not a digit" score N (training/calibrate.py). Every export runs the test split through both
artifacts, checks them against the PyTorch model, records the metrics measured on the ONNX artifact
(the served model is the measured model), and calibrates its answers on the validation split.
"""
import json
import pickle
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

import export_contract as contract
from export_contract import calibration, test_split
from export_contract.publish import atomic_folder, check_replacement
from training import calibrate, nondigits
from training.errors import ExportError
from training.recipes import ARCHS, Recipe
from training.runs import plot_curves, write_json

# TorchScript is deprecated upstream but is the artifact the TorchScript backend asks for; say it once, not per call.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)

PARITY_TOLERANCE = 1e-4  # max |log-prob| difference, and relative score difference, artifact vs PyTorch
OUTPUTS = ["log_probs", "not_a_digit_score"]
MIN_ERRORS = 30  # a calibration set with fewer errors gets augmented copies (training/calibrate.py)
NONDIGITS = 500  # non-digit pictures in each of the validation and test sets


@dataclass
class Splits:
    """The data an export is measured and calibrated on: (images, labels) tensors; `extra`: a second
    test set (what it is, images, labels), reported and reproduced beside the test split."""
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    extra: tuple[str, torch.Tensor, torch.Tensor] | None = None
    outliers: torch.Tensor | None = None  # non-digit pictures trained on (outlier exposure)
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
    torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=OUTPUTS,
                      dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET, dynamo=True, external_data=False,
                      verbose=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def run_onnx(path: Path, x: np.ndarray, input_name: str, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities, scores) of the artifact, as ONNX Runtime on the CPU computes them."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parts = [session.run(None, {input_name: x[i:i + batch_size]}) for i in range(0, len(x), batch_size)]
    return tuple(np.concatenate([part[k] for part in parts]) for k in range(2))


@torch.no_grad()
def run_torch(model, x: torch.Tensor, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    parts = [model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return tuple(torch.cat([part[k] for part in parts]).float().numpy() for k in range(2))


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


def embed_extra_test_set(folder: Path, onnx_path: Path, input_name: str,
                         extra: tuple[str, torch.Tensor, torch.Tensor] | None) -> dict:
    """The second test set beside the artifacts, with its figures through the ONNX artifact."""
    if extra is None:
        return {}
    description, x, y = extra[0], extra[1].cpu().numpy(), extra[2].cpu().numpy()
    path = folder / "extra_test_set.npz"
    if not test_split.write(path, x, y):
        raise ExportError(f"the extra test set ({len(y)} images) is larger than a server reads")
    figures = contract.Figures.of(run_onnx(path.parent / onnx_path.name, x, input_name)[0], y).as_dict()
    return {"extra_test_set": {"description": description, "file": path.name, "sha256": contract.sha256(path),
                               "n": len(y), "metrics": figures}}


def export_model(model: torch.nn.Module, run: dict, run_dir: Path, input_spec: dict, data: Splits, name: str,
                 exports_dir: Path, replace: bool = False) -> Path:
    """Write exports_dir/name atomically; raise ExportError (writing nothing) if parity fails, or
    PublishError if it would silently replace a better model there (`replace`: do)."""
    if problem := contract.name_error(name):
        raise ExportError(problem)
    scored = calibrate.with_detector(model, *data.train)
    test_x, labels = data.test[0].cpu(), data.test[1].cpu().numpy()
    input_name = input_spec["name"]
    reference = run_torch(scored, test_x)
    with atomic_folder(exports_dir / name) as staging:
        onnx_path, ts_path = staging / "model.onnx", staging / "model.ts"
        save_onnx(scored, test_x[:2], onnx_path, input_name)
        save_torchscript(scored, test_x[:2], ts_path)
        onnx_out = run_onnx(onnx_path, test_x.numpy(), input_name)
        parity = {"tolerance": PARITY_TOLERANCE}
        for artifact, out in (("onnx", onnx_out), ("torchscript", run_torch(torch.jit.load(str(ts_path)), test_x))):
            parity[f"{artifact}_max_abs"] = float(np.abs(out[0] - reference[0]).max())
            score_gap = float((np.abs(out[1] - reference[1]) / np.maximum(1.0, np.abs(reference[1]))).max())
            if (max(parity[f"{artifact}_max_abs"], score_gap) > PARITY_TOLERANCE
                    or not np.array_equal(out[0].argmax(1), reference[0].argmax(1))):
                raise ExportError(f"{artifact} artifact disagrees with the PyTorch model: max |diff| "
                                  f"{parity[f'{artifact}_max_abs']:.2e}, score {score_gap:.2e} (tolerance "
                                  f"{PARITY_TOLERANCE:.0e})")
        test = {**contract.Figures.of(onnx_out[0], labels).as_dict(), "measured_on": "onnx"}
        plot_curves(staging / "curves", run["val_nll"], run["val_error"], test["nll"], test["error"],
                    f"{name}: best epoch {run['best_epoch'] + 1} of {run['epochs_run']}, test error "
                    f"{test['errors']}/{test['n']}")
        (staging / "curves.pdf").unlink()  # the service shows the PNG; the PDF stays in the run folder
        recipe = Recipe(**run["config"].get("recipe", {}))
        record = calibrated(staging, onnx_path, input_spec, data, recipe, onnx_out, labels, name)
        onnx_sha = contract.sha256(onnx_path)
        now = datetime.now(timezone.utc)
        test_set = embed_test_set(staging, test_x.numpy(), labels, run.get("data"))
        extra = embed_extra_test_set(staging, onnx_path, input_name, data.extra)
        manifest = {
            "schema_version": contract.SCHEMA_VERSION, "name": name, "version": f"{now:%Y%m%dT%H%M%SZ}-{onnx_sha[:8]}",
            "task": run["task"], "arch": run["arch"], "summary": run.get("summary", ""),
            "created_at": now.isoformat(timespec="seconds"),
            "input": input_spec, "output": {"name": OUTPUTS[0], "shape": [None, 10], "kind": "log_probabilities"},
            "labels": LABELS,
            "artifacts": {
                "onnx": {"file": onnx_path.name, "sha256": onnx_sha, "bytes": onnx_path.stat().st_size, "opset": ONNX_OPSET},
                "torchscript": {"file": ts_path.name, "sha256": contract.sha256(ts_path), "bytes": ts_path.stat().st_size},
            },
            "curves": {"file": "curves.png", "sha256": contract.sha256(staging / "curves.png")},
            **test_set, **extra,
            **({"data": run["data"]} if "data" in run else {}),
            "metrics": {"best_epoch": run["best_epoch"], "epochs_run": run["epochs_run"], "val_nll": run["val_nll"],
                        "val_error": run["val_error"], "test": test, "parity": parity},
            "calibration": record,
            "training": {"seed": run["seed"], "config": run["config"], "environment": run["environment"],
                         "wall_seconds": run["wall_seconds"], "run": run_dir.name,
                         **{key: run[key] for key in ("reproducibility", "checkpoint_sha256") if key in run}},
        }
        validate_manifest(manifest)
        write_json(staging / contract.MANIFEST_FILE, manifest)
        check_replacement(exports_dir / name, manifest, replace)
    return exports_dir / name


def calibrated(staging: Path, onnx_path: Path, spec: dict, data: Splits, recipe: Recipe,
               test_out: tuple[np.ndarray, np.ndarray], labels: np.ndarray, name: str) -> dict:
    """The calibration record, fitted on the ONNX artifact's outputs on validation data (and the
    non-digit validation pictures), with its test figures, the non-digit test pictures it was measured
    on and its reliability diagram written beside the artifacts."""
    def outputs(x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return run_onnx(onnx_path, np.asarray(x), spec["name"])
    val_x, val_y = data.val[0].cpu(), data.val[1].cpu()
    val = outputs(val_x)
    fitted_on, (cal_lp, _), cal_y = "the validation split", val, val_y.numpy()
    if int((cal_lp.argmax(1) != cal_y).sum()) < MIN_ERRORS and recipe.augments():
        cal_x, cal_y_t = calibrate.calibration_set(val_x, val_y, recipe)
        (cal_lp, _), cal_y = outputs(cal_x), cal_y_t.numpy()
        fitted_on = f"the validation split and {calibrate.COPIES} copies of it under the training augmentation"
    supported = nondigits.supported(spec)
    nondigit_val = outputs(nondigits.pictures_for(spec, NONDIGITS, nondigits.SEEDS["validation"])) if supported else None
    record = calibrate.fit(cal_lp, cal_y, val, nondigit_val, fitted_on)
    nondigit_test = None
    if supported:
        pictures = nondigits.pictures_for(spec, NONDIGITS, nondigits.SEEDS["test"])
        nondigit_test = outputs(pictures)
        path = staging / nondigits.FILE_NAME
        test_split.write_images(path, pictures)
        record["nondigits"] = {"file": path.name, "sha256": contract.sha256(path), "n": len(pictures)}
    record["test"] = calibration.figures(*test_out, labels, record, *(nondigit_test or (None, None)))
    calibrate.reliability_diagram(staging / "reliability.png", test_out[0], labels, record["temperature"],
                                  f"{name}: confidence vs accuracy, test split")
    record["reliability"] = {"file": "reliability.png", "sha256": contract.sha256(staging / "reliability.png")}
    return record


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
