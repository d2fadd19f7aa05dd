"""The exports folder, read: every model's manifest validated and every file it serves checked.

A broken export is listed as unavailable with its reason; the rest are served. The checks are the
export contract's (export_contract): the schema the server ships with, figures that agree with each
other, and the sha256 of each file the server reads, which must be a regular file directly inside
the export's folder and no larger than its kind allows (export_contract.reader). Each file is read
once, and what was checked is what is used (`contents`): a folder replaced meanwhile cannot pair one
version's manifest with another's files. Whatever goes wrong reading one folder makes that folder
unavailable, never the server.

Folder names come from the filesystem: one that is not a model name (non-UTF-8 bytes, a newline, a
space) is listed under an escaped form, which is what reaches JSON, log lines and metric labels.
"""
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import export_contract as contract
from export_contract.publish import model_folders
from export_contract.reader import FolderError, read_regular

log = logging.getLogger("digitserve")


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


def display_name(folder: Path) -> str:
    """The folder's name where it is a model name; otherwise an ASCII escape of it (no newline, no
    undecodable bytes) that tells it apart from every other name."""
    return folder.name if contract.name_error(folder.name) is None else ascii(folder.name)[1:-1]


def read_checked(folder: Path, item: dict, kind: str) -> bytes:
    """A file the manifest lists, read once and matched against its sha256; FolderError otherwise."""
    data = read_regular(folder, item["file"], kind)
    if contract.sha256_bytes(data) != item["sha256"]:
        raise FolderError(f"{item['file']} does not match the sha256 in its manifest")
    return data


def read_manifest(folder: Path) -> dict:
    """model.json, parsed and checked against the contract; FolderError saying what is wrong."""
    if contract.name_error(folder.name) is not None:
        raise FolderError(f"the folder's name is not a model name (it must match "
                          f"{contract.schema()['properties']['name']['pattern']}): rename it")
    try:
        text = read_regular(folder, contract.MANIFEST_FILE, "manifest")
    except FolderError as err:
        if str(err) == f"{contract.MANIFEST_FILE} is missing":
            raise FolderError(f"no {contract.MANIFEST_FILE}: export a run into it (python -m training export "
                              "RUN_DIR --to EXPORTS) rather than copying model files by hand") from None
        raise
    try:
        manifest = json.loads(text)
    except (UnicodeDecodeError, ValueError) as err:
        raise FolderError(f"{contract.MANIFEST_FILE} is not valid JSON: {str(err)[:200]}") from None
    except RecursionError:
        raise FolderError(f"{contract.MANIFEST_FILE} is nested too deeply to be a manifest") from None
    if isinstance(manifest, dict) and manifest.get("schema_version") != contract.SCHEMA_VERSION:
        raise FolderError(f"schema_version {str(manifest.get('schema_version'))[:20]} is not "
                          f"{contract.SCHEMA_VERSION}: export the run again (python -m training export RUN_DIR)")
    try:
        problems = contract.manifest_errors(manifest)
    except RecursionError:
        problems = ["nested too deeply"]
    if problems:
        raise FolderError(f"{contract.MANIFEST_FILE} does not follow the contract: " + "; ".join(problems[:5]))
    if manifest["name"] != folder.name:
        raise FolderError(f"manifest name {manifest['name']!r} does not match its folder {folder.name!r}: export "
                          f"it again with --name {folder.name}, or rename the folder")
    return manifest


def files_served(manifest: dict, backend: str) -> list[tuple[dict, str]]:
    """Every file the server reads from an export, with its kind (export_contract.reader.MAX_BYTES)."""
    calibration = manifest.get("calibration", {})
    optional = [(manifest.get("test_set"), "test_set"), (manifest.get("extra_test_set"), "test_set"),
                (calibration.get("nondigits"), "test_set"), (calibration.get("reliability"), "curves")]
    return [(manifest["artifacts"][backend], "artifact"), (manifest["curves"], "curves"),
            *((item, kind) for item, kind in optional if item is not None)]


def check_export(folder: Path, backend: str) -> ModelEntry:
    """Validate one export folder's manifest and read every file the service will use from it."""
    entry = ModelEntry(name=display_name(folder), folder=folder)
    try:
        entry.manifest = read_manifest(folder)
        for item, kind in files_served(entry.manifest, backend):
            entry.contents[item["file"]] = read_checked(folder, item, kind)
    except FolderError as err:
        entry.error = str(err)
    except Exception as err:  # a bug must cost this folder, not the server
        log.exception("model %s: reading its folder failed", entry.name)
        entry.error = f"reading it failed unexpectedly ({type(err).__name__}: see the server's log)"
    if entry.error:
        entry.contents.clear()
    return entry


def scan(exports_dir: Path, backend: str) -> list[ModelEntry]:
    if not exports_dir.is_dir():
        raise ExportsError(f"exports folder {exports_dir} does not exist")
    return [check_export(folder, backend) for folder in model_folders(exports_dir)]
