"""Export (training/export.py) and the export contract (export_contract/): the committed exports validate
and their hashes match, the schema names what is wrong, parity and test figures are measured on the
ONNX artifact, `python -m training export` round trip, and the committed models retrain bit for bit.
In this process on a two-epoch CNN run (module fixture); the CLI as subprocesses."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from bench.harness import ROOT
import export_contract as contract
from export_contract.reader import MAX_BYTES
from serving import registry
from training import digits, export
from training.errors import ExportError
from training.export import Splits, export_model, load_run
from training.train import train_digits

EXPORTS = ROOT / "exports"
COMMITTED = ("digits-mlp", "digits-cnn")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A two-epoch digits CNN run (with its own export inside)."""
    run_dir, _ = train_digits("cnn", seed=0, max_epochs=2, patience=2, device=torch.device("cpu"),
                              out=tmp_path_factory.mktemp("runs"), progress=False)
    return run_dir


def test_committed_exports_validate_and_hashes_match():
    entries = {entry.name: entry for entry in registry.scan(EXPORTS, "onnx")}
    assert set(COMMITTED) | {"svhn-synthetic-cnn"} <= set(entries)
    for name in [*COMMITTED, "svhn-synthetic-cnn"]:
        entry = entries[name]
        assert entry.available, entry.error
        assert contract.schema_errors(entry.manifest) == []
        m = entry.manifest
        for item in [*m["artifacts"].values(), m["curves"], m["test_set"]]:
            assert contract.sha256(entry.folder / item["file"]) == item["sha256"]
        assert len(entry.content(m["test_set"])) <= MAX_BYTES["test_set"]  # what a server reads


def test_the_committed_32x32_model_says_it_has_seen_only_synthetic_crops():
    (entry,) = [e for e in registry.scan(EXPORTS, "onnx") if e.name == "svhn-synthetic-cnn"]
    data = entry.manifest["data"]
    assert data["name"] == "svhn-synthetic" and "not SVHN" in data["description"]
    assert "python -m training svhn --download" in data["description"]  # and how to train the real one
    assert entry.manifest["test_set"]["n"] == data["test_file"]["n"] == entry.manifest["metrics"]["test"]["n"]


def test_schema_accepts_good_and_names_what_is_wrong_with_bad(tiny_run):
    manifest = json.loads((tiny_run / "export" / "digits-cnn" / "model.json").read_text())
    assert contract.schema_errors(manifest) == []
    broken = json.loads(json.dumps(manifest))
    broken["metrics"]["test"]["error"] = 1.5
    del broken["artifacts"]["onnx"]["sha256"]
    broken["curves"]["file"] = "../../etc/passwd"
    problems = contract.schema_errors(broken)
    assert any(p.startswith("artifacts/onnx: 'sha256' is a required property") for p in problems), problems
    assert any(p.startswith("metrics/test/error: 1.5 is greater than the maximum of 1") for p in problems), problems
    assert any(p.startswith("curves/file: '../../etc/passwd' does not match") for p in problems), problems
    with pytest.raises(ExportError, match="metrics/test/error"):
        export.validate_manifest(broken)


def splits() -> Splits:
    return Splits(*((split.x, split.y) for split in map(digits.load_split, ("train", "val", "test"))))


def test_parity_and_metrics_measured_on_the_onnx_artifact(tiny_run):
    folder = tiny_run / "export" / "digits-cnn"
    manifest = json.loads((folder / "model.json").read_text())
    parity = manifest["metrics"]["parity"]
    assert parity["onnx_max_abs"] <= 1e-4 and parity["torchscript_max_abs"] <= 1e-4
    test = digits.load_split("test")
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    log_probs, scores = session.run(None, {"pixels": test.x.numpy()})
    assert log_probs.shape == (447, 10) and scores.shape == (447,)  # and the not-a-digit score
    assert np.allclose(np.exp(log_probs).sum(1), 1, atol=1e-5)
    errors = int((log_probs.argmax(1) != test.y.numpy()).sum())
    assert manifest["metrics"]["test"]["errors"] == errors
    nll = float(-log_probs[np.arange(447), test.y.numpy()].mean())
    assert manifest["metrics"]["test"]["nll"] == pytest.approx(nll, abs=1e-6)
    scripted = torch.jit.load(str(folder / "model.ts"))
    assert np.abs(scripted(test.x[:5])[0].detach().numpy() - log_probs[:5]).max() <= 1e-4
    # dynamic batch axis: any batch size goes through
    assert session.run(None, {"pixels": test.x.numpy()[:1]})[0].shape == (1, 10)


def test_export_fails_loudly_when_an_artifact_disagrees(tiny_run, tmp_path, monkeypatch):
    run, model = load_run(tiny_run)
    real_run_onnx = export.run_onnx

    def shifted(*args, **kwargs):
        log_probs, scores = real_run_onnx(*args, **kwargs)
        return log_probs + 1e-3, scores
    monkeypatch.setattr(export, "run_onnx", shifted)
    with pytest.raises(ExportError, match="onnx artifact disagrees"):
        export_model(model, run, tiny_run, digits.INPUT_SPEC, splits(), "digits-cnn", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_sha256_mismatch_is_detected(tiny_run, tmp_path):
    shutil.copytree(tiny_run / "export", tmp_path / "exports")
    onnx_file = tmp_path / "exports" / "digits-cnn" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    (entry,) = registry.scan(tmp_path / "exports", "onnx")
    assert not entry.available and "does not match the sha256" in entry.error
    (entry,) = registry.scan(tmp_path / "exports", "torchscript")  # the other artifact is intact
    assert entry.available


def test_failed_export_leaves_previous_export_intact(tiny_run, tmp_path, monkeypatch):
    exports_dir = tmp_path / "exports"
    run, model = load_run(tiny_run)
    export_model(model, run, tiny_run, digits.INPUT_SPEC, splits(), "digits-cnn", exports_dir)
    before = {p.name: p.read_bytes() for p in (exports_dir / "digits-cnn").iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(export, "save_torchscript", crash)
    with pytest.raises(OSError, match="disk full"):
        export_model(model, run, tiny_run, digits.INPUT_SPEC, splits(), "digits-cnn", exports_dir)
    assert {p.name: p.read_bytes() for p in (exports_dir / "digits-cnn").iterdir()} == before
    assert sorted(p.name for p in exports_dir.iterdir()) == ["digits-cnn"]


@pytest.mark.parametrize("umask, others_read", [(0o022, True), (0o077, False)])
def test_fresh_exports_are_readable_by_other_users_unless_the_umask_says_not(cli, tiny_run, tmp_path, umask,
                                                                             others_read):
    """A container's user (UID 10001) reads exports that the host's user has just written."""
    result = cli("training", "export", str(tiny_run), "--to", str(tmp_path / "exports"), umask=umask)
    assert result.returncode == 0, result.stderr
    written = [tmp_path / "exports", *(tmp_path / "exports").rglob("*")]
    assert len(written) > 5
    for path in written:
        needed = 0o005 if path.is_dir() else 0o004  # read (and enter, for folders)
        assert (path.stat().st_mode & needed == needed) == others_read, (oct(path.stat().st_mode), path)


def test_export_cli_round_trip_and_bad_run_folders(cli, tiny_run, tmp_path):
    result = cli("training", "export", str(tiny_run), "--to", str(tmp_path / "exports"), "--name", "my-cnn")
    assert result.returncode == 0, result.stderr
    (entry,) = registry.scan(tmp_path / "exports", "onnx")
    assert entry.name == "my-cnn" and entry.available

    missing = cli("training", "export", str(tmp_path / "nope"), "--to", str(tmp_path / "out"))
    assert missing.returncode == 1 and "not a run folder" in missing.stderr

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_run, corrupt)
    (corrupt / "model.pt").write_bytes(b"not a checkpoint")
    result = cli("training", "export", str(corrupt), "--to", str(tmp_path / "out"))
    assert result.returncode == 1 and "not a loadable state dict" in result.stderr

    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_run, mismatched)
    metrics = json.loads((mismatched / "metrics.json").read_text())
    metrics["arch"] = "mlp"  # the checkpoint is a CNN's
    (mismatched / "metrics.json").write_text(json.dumps(metrics))
    result = cli("training", "export", str(mismatched), "--to", str(tmp_path / "out"))
    assert result.returncode == 1 and "does not fit arch 'mlp'" in result.stderr
    assert not (tmp_path / "out").exists()

    blocker = tmp_path / "file"
    blocker.write_text("")
    result = cli("training", "export", str(tiny_run), "--to", str(blocker / "exports"))
    assert result.returncode == 2 and "not writable" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMITTED)
def test_committed_model_retrains_bit_for_bit(name, tmp_path):
    """What `make digits` promises: the committed exports are what a user's retrain gives (reproducible mode)."""
    manifest = json.loads((EXPORTS / name / "model.json").read_text())
    training = manifest["training"]
    if torch.backends.cpu.get_cpu_capability() != "AVX2":
        pytest.skip("this CPU cannot run the pinned AVX2 kernels the committed models were trained with")
    if training["environment"]["torch"] != torch.__version__:
        pytest.skip(f"the committed {name} was trained with torch {training['environment']['torch']}; kernels "
                    f"differ between releases, and this is {torch.__version__}")
    assert training["reproducibility"]["pinned"]
    run_dir, metrics = train_digits(manifest["arch"], training["seed"], training["config"]["max_epochs"],
                                    training["config"]["patience"], torch.device("cpu"), tmp_path, progress=False)
    assert contract.sha256(run_dir / "model.pt") == training["checkpoint_sha256"]
    assert metrics["val_nll"] == manifest["metrics"]["val_nll"]
    # The manifest's figures are ONNX Runtime's, whose kernels follow the CPU: the error count is the
    # same; the NLL agrees far below the digits shown anywhere.
    served = json.loads((run_dir / "export" / name / "model.json").read_text())["metrics"]["test"]
    assert served["errors"] == manifest["metrics"]["test"]["errors"]
    assert served["nll"] == pytest.approx(manifest["metrics"]["test"]["nll"], abs=1e-6)
