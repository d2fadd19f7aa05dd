"""The test split a model's manifest figures were measured on, for verifying a version before it
is served (serving/lifecycle.py) and for `/models/{name}/evaluate`.

Either the export carries it (`test_set.npz`: digits, synthetic crops) or the manifest names the
SVHN-layout file it came from (`data.test_file`: the official 26,032-image test_32x32.mat is too
large to carry), which the server reads from its `--data-dir`, checked against the MD5 recorded at
training. Reading from the data folder runs off the event loop (the caller's): the file is 64 MB.
"""
import logging
from pathlib import Path

import numpy as np

import export_contract as contract
from export_contract import svhn_mat, test_split
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


def embedded(entry: ModelEntry) -> tuple[np.ndarray, np.ndarray] | None:
    """The test split the export carries (as read and checked with it), or None. Raises
    test_split.TestSplitError for a file that is not this model's split, or not the known split its
    data record names."""
    manifest = entry.manifest
    if "test_set" not in manifest:
        return None
    x, y = test_split.read(entry.content(manifest["test_set"]), manifest["input"], manifest["test_set"]["n"])
    data = manifest.get("data", {}).get("name")
    if data in contract.KNOWN_TEST_SPLITS and contract.split_digest(x, y) != contract.KNOWN_TEST_SPLITS[data]:
        raise test_split.TestSplitError(f"{manifest['test_set']['file']} is not the {data} test split that its "
                                        "manifest says the figures were measured on")
    return x, y


def described(test_file: dict) -> str:
    return f"{test_file['file']} (MD5 {test_file['md5']}, {test_file['n']} images)"


def no_data_dir_reason(entry: ModelEntry) -> str:
    return (f"model {entry.name!r} was tested on {described(entry.manifest['data']['test_file'])}, which it does not "
            f"carry: start the server with --data-dir (DIGITSERVE_DATA_DIR) naming a folder that holds it")


def from_data_dir(entry: ModelEntry, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The test file the manifest names, from the server's data folder; InputError (422) saying what
    is missing otherwise. The messages name the file but not the server's folders, which clients
    have no business knowing."""
    test_file = entry.manifest.get("data", {}).get("test_file")
    if test_file is None:
        raise InputError(f"model {entry.name!r} carries no test split and names no test file to evaluate on", 422)
    if data_dir is None:
        raise InputError(no_data_dir_reason(entry), 422)
    wanted = described(test_file)
    path = data_dir / test_file["file"]
    if not path.is_file():
        log.warning("test split of %s: %s is missing", entry.name, path)
        raise InputError(f"the server's data folder has no {test_file['file']}: model {entry.name!r} was tested on "
                         f"{wanted}", 422)
    if svhn_mat.md5(path) != test_file["md5"]:
        log.warning("test split of %s: %s is not the file the model was tested on", entry.name, path)
        raise InputError(f"the server's {test_file['file']} is not the file model {entry.name!r} was tested on "
                         f"(MD5 differs from {test_file['md5']})", 422)
    try:
        return svhn_mat.read(path)
    except svhn_mat.MatFileError:  # its MD5 matched, so the file is what training read: a broken install
        log.exception("test split of %s: %s", entry.name, path)
        raise InputError(f"the server cannot read its {test_file['file']} (see its log)", 422) from None
