"""The export contract: what `exports/NAME/` holds, shared by training (which writes it) and serving
(which reads it). No web framework, no torch: NumPy and jsonschema only.

- `model.json` follows `manifest.schema.json` (shipped inside this package, so a server validates
  against the schema it was built with, never a file lying in the exports folder).
- Every file the server reads is listed with its sha256 and checked before use, and read as
  `reader.read_regular` says (regular files only, sizes capped); the test split an export carries is
  read by `test_split`, bounded before anything is decompressed.
- Test figures are mean NLL and error of log-probabilities; a served artifact reproduces its
  manifest when it makes the same number of errors on as many images and its NLL is within
  NLL_TOLERANCE. What that proves: the artifact is the model the figures were measured on, run on the
  split the export carries. What it cannot prove: that the split is the held-out data the manifest
  says it is, except where the split is one the contract knows (KNOWN_TEST_SPLITS).
"""
import hashlib
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path

import jsonschema
import numpy as np

MANIFEST_FILE = "model.json"
SCHEMA_VERSION = 2
NLL_TOLERANCE = 1e-4  # evaluation on another machine or backend moves the NLL by ~1e-8; a wrong model by far more
# sha256 of x (float32 N x 1 x 8 x 8) then y (int64) of the test splits a data record names: an export
# claiming to be tested on one of these must carry exactly it, not a kinder selection.
KNOWN_TEST_SPLITS = {name: "f7f50014aed91fbb814f04cf042b95d28aa11ea36dbad1b3f3c09efb8b4a7a2d"
                     for name in ("sklearn-digits", "sklearn-digits+photos")}


@cache
def schema() -> dict:
    return json.loads(files(__package__).joinpath("manifest.schema.json").read_text())


def schema_errors(manifest: object) -> list[str]:
    """Every violation of the schema as a readable `path: message` line (empty when valid)."""
    validator = jsonschema.Draft202012Validator(schema())
    return [f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(manifest), key=lambda e: list(e.path))]


def manifest_errors(manifest: object) -> list[str]:
    """schema_errors(), then what a schema cannot say: figures that agree with each other."""
    problems = schema_errors(manifest)
    if problems:
        return problems
    metrics = manifest["metrics"]
    test = metrics["test"]
    if abs(test["error"] - test["errors"] / test["n"]) > 1e-9:
        problems.append(f"metrics/test: error {test['error']} is not errors / n = {test['errors']}/{test['n']}")
    if test["errors"] > test["n"]:
        problems.append(f"metrics/test: {test['errors']} errors on {test['n']} images")
    sizes = {"test_set/n": manifest.get("test_set", {}).get("n"),
             "data/test_file/n": manifest.get("data", {}).get("test_file", {}).get("n")}
    problems += [f"{where}: {n} images, but metrics/test/n is {test['n']}" for where, n in sizes.items()
                 if n is not None and n != test["n"]]
    if not metrics["best_epoch"] < metrics["epochs_run"] == len(metrics["val_nll"]) == len(metrics["val_error"]):
        problems.append("metrics: best_epoch, epochs_run and the validation curves do not agree")
    return problems


def split_digest(x: np.ndarray, y: np.ndarray) -> str:
    """What KNOWN_TEST_SPLITS holds for a split: sha256 of its arrays' bytes."""
    return hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.ascontiguousarray(y, dtype=np.int64).tobytes()
                          ).hexdigest()


def name_error(name: str) -> str | None:
    """Why `name` cannot name an export (it becomes a folder and a URL path segment), or None."""
    pattern = schema()["properties"]["name"]["pattern"]
    return None if re.fullmatch(pattern, name) else f"export name {name!r} must match {pattern}"


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Figures:
    """Mean NLL, error rate and error count of log-probabilities on n labelled images: a split's test
    (or validation) figures, as manifests record them and servers re-measure them."""
    nll: float
    error: float
    errors: int
    n: int

    @classmethod
    def of(cls, log_probs: np.ndarray, labels: np.ndarray) -> "Figures":
        """Of log-probabilities N x 10 against labels N."""
        log_probs, labels = np.asarray(log_probs, dtype=np.float64), np.asarray(labels)
        errors = int((log_probs.argmax(1) != labels).sum())
        return cls(float(-log_probs[np.arange(len(labels)), labels].mean()), errors / len(labels), errors,
                   int(len(labels)))

    @classmethod
    def recorded(cls, figures: dict) -> "Figures":
        """As a manifest records them (metrics/test)."""
        return cls(figures["nll"], figures["error"], figures["errors"], figures["n"])

    def as_dict(self) -> dict:
        return {"nll": self.nll, "error": self.error, "errors": self.errors, "n": self.n}

    def reproduces(self, recorded: "Figures") -> bool:
        """These are `recorded`: as many images, the same error count, NLL within NLL_TOLERANCE."""
        return (self.n == recorded.n and self.errors == recorded.errors
                and abs(self.nll - recorded.nll) <= NLL_TOLERANCE)
