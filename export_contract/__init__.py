"""The export contract: what `exports/NAME/` holds, shared by training (which writes it) and serving
(which reads it). No web framework, no torch: NumPy and jsonschema only.

- `model.json` follows `manifest.schema.json` (shipped inside this package, so a server validates
  against the schema it was built with, never a file lying in the exports folder).
- Every file the server reads is listed with its sha256 and checked before use.
- Test figures are mean NLL and error of log-probabilities; a served artifact reproduces its
  manifest when it makes the same number of errors and its NLL is within NLL_TOLERANCE.
"""
import hashlib
import json
import re
from functools import cache
from importlib.resources import files
from pathlib import Path

import jsonschema
import numpy as np

MANIFEST_FILE = "model.json"
SCHEMA_VERSION = 2
NLL_TOLERANCE = 1e-4  # evaluation on another machine or backend moves the NLL by ~1e-8; a wrong model by far more


@cache
def schema() -> dict:
    return json.loads(files(__package__).joinpath("manifest.schema.json").read_text())


def schema_errors(manifest: object) -> list[str]:
    """Every violation of the schema as a readable `path: message` line (empty when valid)."""
    validator = jsonschema.Draft202012Validator(schema())
    return [f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(manifest), key=lambda e: list(e.path))]


def name_error(name: str) -> str | None:
    """Why `name` cannot name an export (it becomes a folder and a URL path segment), or None."""
    pattern = schema()["properties"]["name"]["pattern"]
    return None if re.fullmatch(pattern, name) else f"export name {name!r} must match {pattern}"


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_metrics(log_probs: np.ndarray, labels: np.ndarray) -> dict:
    """Mean NLL, error rate and error count of log-probabilities N x 10 against labels N."""
    log_probs = np.asarray(log_probs, dtype=np.float64)
    errors = int((log_probs.argmax(1) != labels).sum())
    return {"nll": float(-log_probs[np.arange(len(labels)), labels].mean()), "error": errors / len(labels),
            "errors": errors, "n": int(len(labels))}


def reproduces(measured: dict, recorded: dict) -> bool:
    """The measured test figures are the manifest's: as many images, the same error count, NLL within
    NLL_TOLERANCE."""
    return (measured["n"] == recorded["n"] and measured["errors"] == recorded["errors"]
            and abs(measured["nll"] - recorded["nll"]) <= NLL_TOLERANCE)
