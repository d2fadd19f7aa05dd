"""The exports folder, read: every model's manifest validated and every file it serves checked.

A broken export is listed as unavailable with its reason; the rest are served. The checks are the
export contract's (export_contract): the schema the server ships with, and the sha256 of each file
the server reads, which must be a regular file directly inside the export's folder.
"""
import json
import stat
from dataclasses import dataclass
from pathlib import Path

import export_contract as contract


class ExportsError(Exception):
    """The exports folder itself is unusable."""


@dataclass
class ModelEntry:
    name: str
    folder: Path
    manifest: dict | None = None
    error: str | None = None          # why the model is unavailable, if it is

    @property
    def available(self) -> bool:
        return self.error is None

    def file(self, item: dict) -> Path:
        return self.folder / item["file"]

    def artifact_path(self, backend: str) -> Path:
        return self.file(self.manifest["artifacts"][backend])


def file_problem(folder: Path, item: dict) -> str | None:
    """Why a file named by the manifest must not be read (missing, not a plain file, altered), or None."""
    path = folder / item["file"]
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return f"{item['file']} is missing"
    if not stat.S_ISREG(mode):  # a symlink could point anywhere (/etc/passwd); a FIFO would block the read
        return f"{item['file']} is not a regular file"
    if contract.sha256(path) != item["sha256"]:
        return f"{item['file']} does not match the sha256 in its manifest"
    return None


def check_export(folder: Path, backend: str) -> ModelEntry:
    """Validate one export folder's manifest and every file the service will read from it."""
    entry = ModelEntry(name=folder.name, folder=folder)
    try:
        manifest = json.loads((folder / contract.MANIFEST_FILE).read_text())
    except FileNotFoundError:
        entry.error = f"no {contract.MANIFEST_FILE}"
        return entry
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        entry.error = f"{contract.MANIFEST_FILE} is not valid JSON: {err}"
        return entry
    if isinstance(manifest, dict) and manifest.get("schema_version") != contract.SCHEMA_VERSION:
        entry.error = (f"schema_version {manifest.get('schema_version')} is not {contract.SCHEMA_VERSION}: export the "
                       f"run again (python -m training export RUN_DIR)")
        return entry
    problems = contract.schema_errors(manifest)
    if problems:
        entry.error = f"{contract.MANIFEST_FILE} does not follow the schema: " + "; ".join(problems[:5])
        return entry
    if manifest["name"] != folder.name:
        entry.error = f"manifest name {manifest['name']!r} does not match its folder {folder.name!r}"
        return entry
    entry.manifest = manifest
    served = [manifest["artifacts"][backend], manifest["curves"], *([manifest["test_set"]] if "test_set" in manifest
                                                                    else [])]
    entry.error = next(filter(None, (file_problem(folder, item) for item in served)), None)
    return entry


def scan(exports_dir: Path, backend: str) -> list[ModelEntry]:
    """Every sub-folder of the exports folder (hidden ones are exports being written), in name order."""
    if not exports_dir.is_dir():
        raise ExportsError(f"exports folder {exports_dir} does not exist")
    return [check_export(folder, backend)
            for folder in sorted(p for p in exports_dir.iterdir() if p.is_dir() and not p.name.startswith("."))]
