"""The test split a model's manifest figures were measured on, for `/models/{name}/evaluate`.

Either the export carries it (`test_set.npz`: digits, synthetic crops) or the manifest names the
SVHN-layout file it came from (`data.test_file`: the official 26,032-image test_32x32.mat is too
large to carry), which the server reads from its `--data-dir`, checked against the MD5 recorded at
training. Reading runs off the event loop (the caller's to_thread): the official file is 64 MB.
"""
import logging
from pathlib import Path

import numpy as np

from export_contract import svhn_mat
from serving.errors import InputError
from serving.registry import ModelEntry

log = logging.getLogger("digitserve")


def mat_reader_problem() -> str | None:
    """Why a server given --data-dir could not read its .mat files (checked at start-up), or None."""
    try:
        import scipy.io  # noqa: F401
    except ImportError:
        return "--data-dir needs SciPy to read .mat files: pip install 'digitserve[svhn]'"
    return None


def load(entry: ModelEntry, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of `entry`'s test split; InputError (422) saying what is missing otherwise.
    The messages name the file but not the server's folders, which clients have no business knowing."""
    manifest = entry.manifest
    if "test_set" in manifest:
        with np.load(entry.file(manifest["test_set"]), allow_pickle=False) as data:
            return data["x"], data["y"]
    test_file = manifest.get("data", {}).get("test_file")
    if test_file is None:
        raise InputError(f"model {entry.name!r} carries no test split and names no test file to evaluate on", 422)
    wanted = f"{test_file['file']} (MD5 {test_file['md5']}, {test_file['n']} images)"
    if data_dir is None:
        raise InputError(f"model {entry.name!r} was tested on {wanted}, which it does not carry: start the server "
                         f"with --data-dir (DIGITSERVE_DATA_DIR) naming a folder that holds it", 422)
    path = data_dir / test_file["file"]
    if not path.is_file():
        log.warning("evaluate %s: %s is missing", entry.name, path)
        raise InputError(f"the server's data folder has no {test_file['file']}: model {entry.name!r} was tested on "
                         f"{wanted}", 422)
    if svhn_mat.md5(path) != test_file["md5"]:
        log.warning("evaluate %s: %s is not the file the model was tested on", entry.name, path)
        raise InputError(f"the server's {test_file['file']} is not the file model {entry.name!r} was tested on "
                         f"(MD5 differs from {test_file['md5']})", 422)
    try:
        return svhn_mat.read(path)
    except svhn_mat.MatFileError:  # its MD5 matched, so the file is what training read: a broken install
        log.exception("evaluate %s: %s", entry.name, path)
        raise InputError(f"the server cannot read its {test_file['file']} (see its log)", 422) from None
