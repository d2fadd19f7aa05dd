"""The exports folder, read: every model's manifest validated and its artifacts' sha256 checked.

This module and `exports/manifest.schema.json` are the reading side of the only contract between
training and serving. A broken export is listed as unavailable with its reason; the rest are served.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import jsonschema

SCHEMA_FILE = "manifest.schema.json"
MANIFEST_FILE = "model.json"
SUPPORTED_SCHEMA_VERSION = 1


class ExportsError(Exception):
    """The exports folder itself is unusable (missing, or without its schema)."""


@dataclass
class ModelEntry:
    name: str
    folder: Path
    manifest: dict | None = None
    error: str | None = None          # why the model is unavailable, if it is

    @property
    def available(self) -> bool:
        return self.error is None

    def artifact_path(self, backend: str) -> Path:
        return self.folder / self.manifest["artifacts"][backend]["file"]


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def schema_errors(manifest: object, schema: dict) -> list[str]:
    """Every violation as a readable `path: message` line (empty when valid)."""
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(manifest), key=lambda e: list(e.path))]


def load_schema(exports_dir: Path) -> dict:
    if not exports_dir.is_dir():
        raise ExportsError(f"exports folder {exports_dir} does not exist")
    try:
        return json.loads((exports_dir / SCHEMA_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportsError(f"exports folder {exports_dir} has no readable {SCHEMA_FILE}: {err}") from None


def check_export(folder: Path, schema: dict, backend: str) -> ModelEntry:
    """Validate one export folder's manifest and the sha256 of the files the service will read."""
    entry = ModelEntry(name=folder.name, folder=folder)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        entry.error = f"no {MANIFEST_FILE}"
        return entry
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        entry.error = f"{MANIFEST_FILE} is not valid JSON: {err}"
        return entry
    problems = schema_errors(manifest, schema)
    if problems:
        entry.error = f"{MANIFEST_FILE} does not follow the schema: " + "; ".join(problems[:5])
        return entry
    if manifest["schema_version"] != SUPPORTED_SCHEMA_VERSION:
        entry.error = f"schema_version {manifest['schema_version']} is not supported"
        return entry
    if manifest["name"] != folder.name:
        entry.error = f"manifest name {manifest['name']!r} does not match its folder {folder.name!r}"
        return entry
    entry.manifest = manifest
    checked = [manifest["artifacts"][backend]] + ([manifest["test_set"]] if "test_set" in manifest else [])
    for item in checked:
        path = folder / item["file"]
        if not path.is_file():
            entry.error = f"{item['file']} is missing"
        elif sha256(path) != item["sha256"]:
            entry.error = f"{item['file']} does not match the sha256 in its manifest"
    return entry


def scan(exports_dir: Path, backend: str) -> list[ModelEntry]:
    """Every sub-folder of the exports folder, in name order, checked."""
    schema = load_schema(exports_dir)
    return [check_export(folder, schema, backend)
            for folder in sorted(p for p in exports_dir.iterdir() if p.is_dir() and not p.name.startswith("."))]
