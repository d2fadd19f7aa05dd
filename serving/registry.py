"""The exports folder, read: every model's manifest validated and every file it serves checked.

A broken export is listed as unavailable with its reason; the rest are served. The checks are the
export contract's (export_contract): the schema the server ships with, and the sha256 of each file
the server reads, which must be a regular file directly inside the export's folder. Each file is
read once, and what was checked is what is used (`contents`): a folder replaced meanwhile cannot
pair one version's manifest with another's files.
"""
import json
import stat
from dataclasses import dataclass, field
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
    contents: dict[str, bytes] = field(default_factory=dict, repr=False)  # file name -> its checked bytes

    @property
    def available(self) -> bool:
        return self.error is None

    def content(self, item: dict) -> bytes:
        """A file the manifest lists (artifact, curves, test split), as read and checked."""
        return self.contents[item["file"]]


def read_checked(folder: Path, item: dict) -> tuple[bytes | None, str | None]:
    """A file the manifest lists, read once: (its bytes, None), or (None, why it must not be used:
    missing, not a plain file, altered)."""
    path = folder / item["file"]
    try:
        mode = path.lstat().st_mode
        if not stat.S_ISREG(mode):  # a symlink could point anywhere (/etc/passwd); a FIFO would block the read
            return None, f"{item['file']} is not a regular file"
        data = path.read_bytes()
    except FileNotFoundError:
        return None, f"{item['file']} is missing"
    if contract.sha256_bytes(data) != item["sha256"]:
        return None, f"{item['file']} does not match the sha256 in its manifest"
    return data, None


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
    for item in [manifest["artifacts"][backend], manifest["curves"], *([manifest["test_set"]] if "test_set" in manifest
                                                                       else [])]:
        data, entry.error = read_checked(folder, item)
        if entry.error:
            entry.contents.clear()
            return entry
        entry.contents[item["file"]] = data
    return entry


def model_folders(exports_dir: Path) -> list[Path]:
    """Every model folder, in name order: the sub-folders, but not hidden ones (exports being written)."""
    return sorted(p for p in exports_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan(exports_dir: Path, backend: str) -> list[ModelEntry]:
    if not exports_dir.is_dir():
        raise ExportsError(f"exports folder {exports_dir} does not exist")
    return [check_export(folder, backend) for folder in model_folders(exports_dir)]
