"""Verification before a model version is served: its folder read and checked against the export
contract (serving/registry.py), its test split checked, its artifact loaded and warmed, and the split
run through the served backend reproducing the manifest's test figures (the same error count on as
many images, NLL within 1e-4: export_contract.Figures.reproduces). What that proves, and what not:
export_contract's docstring.

The split is the one the export carries (test_set.npz: digits, synthetic crops), or the SVHN-layout
file the manifest names (`data.test_file`: the official 26,032-image test_32x32.mat is too large to
carry), which the server reads from its `--data-dir`, checked against the MD5 recorded at training.
A model whose split is not at hand (trained on SVHN, served without --data-dir) is served marked
unverified, never in place of a verified version. `/models/{name}/evaluate` reads the same splits.
"""
import logging
from pathlib import Path

import numpy as np

import export_contract as contract
from export_contract import calibration, svhn_mat, test_split
from serving import registry
from serving.config import Config
from serving.errors import InputError
from serving.inference import LoadError, ServedModel, load_runner, run_all
from serving.registry import ModelEntry

log = logging.getLogger("digitserve")


class Rejected(Exception):
    """A version that is not served: why (`reason`, for people) and at which step (`step`, a metric label:
    export, load, test_split, metrics, calibration, unverified, unexpected)."""

    def __init__(self, version: str | None, reason: str, step: str):
        super().__init__(reason)
        self.version, self.reason, self.step = version, reason, step


def build(folder: Path, config: Config, device: str, previous: ServedModel | None) -> ServedModel:
    """One model folder, checked, loaded, warmed and verified on its test split; raises Rejected.
    `previous`: the version it would replace, if any."""
    entry = registry.check_export(folder, config.backend)
    version = entry.manifest["version"] if entry.manifest else None
    try:
        if not entry.available:
            raise Rejected(version, entry.error, "export")
        try:  # before loading: a split that is not what it claims costs nothing to refuse
            split, nondigits = embedded(entry), embedded_nondigits(entry)
        except test_split.TestSplitError as err:
            raise Rejected(version, str(err), "export") from None
        files = {key: entry.content(item) for key, item in (("curves", entry.manifest["curves"]),
                                                             ("reliability", entry.manifest.get("calibration", {}).get("reliability")))
                 if item is not None}
        try:
            runner = load_runner(entry, config.backend, device)
        except LoadError as err:
            raise Rejected(version, str(err), "load") from None
        if split is None and config.data_dir is None and "test_file" in entry.manifest.get("data", {}):
            reason = no_data_dir_reason(entry)
            if previous is not None and previous.verified["reproduced"]:
                raise Rejected(version, f"it cannot be verified here and would replace a verified version: {reason}",
                               "unverified")
            return ServedModel(entry, runner, {"reproduced": None, "reason": reason}, files, None, nondigits)
        try:
            x, y = split if split is not None else from_data_dir(entry, config.data_dir)
        except InputError as err:
            raise Rejected(version, err.message, "test_split") from None
        log_probs, scores = run_all(runner, x)
        measured = contract.Figures.of(log_probs, y)
        claimed = contract.Figures.recorded(entry.manifest["metrics"]["test"])
        if not measured.reproduces(claimed):
            raise Rejected(version, f"on its {measured.n} test images the {config.backend} artifact makes "
                                    f"{measured.errors} errors with NLL {measured.nll:.6f}; its manifest claims "
                                    f"{claimed.errors} of {claimed.n} and {claimed.nll:.6f}", "metrics")
        check_calibration(entry, runner, log_probs, scores, y, nondigits, version)
        check_extra_test_set(entry, runner, version)
        verified = {"reproduced": True, "errors": measured.errors, "nll": measured.nll, "n": measured.n}
        return ServedModel(entry, runner, verified, files, split, nondigits)
    finally:
        entry.contents.clear()  # the artifact's bytes: the runner holds the model now


def calibration_figures(manifest: dict, runner, log_probs: np.ndarray, scores: np.ndarray | None, labels: np.ndarray,
                        nondigits: np.ndarray | None) -> dict:
    """The calibration record's test figures, measured through `runner` (the served backend)."""
    record = manifest["calibration"]
    nondigit_outputs = run_all(runner, nondigits) if nondigits is not None else (None, None)
    return calibration.figures(log_probs, scores, labels, record, *nondigit_outputs)


def check_calibration(entry: ModelEntry, runner, log_probs: np.ndarray, scores: np.ndarray | None,
                      labels: np.ndarray, nondigits: np.ndarray | None, version: str) -> None:
    """Raise Rejected where the calibration record's test figures are not what the artifact gives."""
    record = entry.manifest.get("calibration")
    if record is None:
        return  # exported before calibration existed: answered uncalibrated, and /models says so
    if record.get("not_a_digit", {}).get("method") == "mahalanobis" and scores is None:
        raise Rejected(version, "its manifest has a not-a-digit threshold, but its artifact gives no score", "calibration")
    differences = calibration.reproduces(calibration_figures(entry.manifest, runner, log_probs, scores, labels,
                                                             nondigits), record["test"])
    if differences:
        raise Rejected(version, "its calibration figures are not the artifact's: " + "; ".join(differences[:4]),
                       "calibration")


def check_extra_test_set(entry: ModelEntry, runner, version: str) -> None:
    """Raise Rejected where a second test set's recorded figures are not what the artifact gives."""
    item = entry.manifest.get("extra_test_set")
    if item is None:
        return
    try:
        x, y = test_split.read(entry.content(item), entry.manifest["input"], item["n"], item["file"])
    except test_split.TestSplitError as err:
        raise Rejected(version, str(err), "export") from None
    measured, claimed = contract.Figures.of(run_all(runner, x)[0], y), contract.Figures.recorded(item["metrics"])
    if not measured.reproduces(claimed):
        raise Rejected(version, f"on its {measured.n} extra test images the artifact makes {measured.errors} errors "
                                f"with NLL {measured.nll:.6f}; its manifest claims {claimed.errors} and "
                                f"{claimed.nll:.6f}", "metrics")


def embedded_nondigits(entry: ModelEntry) -> np.ndarray | None:
    """The non-digit test pictures the export carries (as read and checked with it), or None."""
    item = entry.manifest.get("calibration", {}).get("nondigits")
    if item is None:
        return None
    return test_split.read_images(entry.content(item), entry.manifest["input"], item["n"], item["file"])


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
    """The test file the manifest names, from the server's data folder (off the event loop: the file
    is 64 MB); InputError (422) saying what is missing otherwise. The messages name the file but not
    the server's folders, which clients have no business knowing."""
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
