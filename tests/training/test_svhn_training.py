"""SVHN training (training/svhn.py, synthetic.py, augment.py): synthetic crops in the official .mat layout,
the loader and its refusals, the stratified split, augmentation, and `python -m training svhn` end to end
(one process and two with torchrun/gloo). Unit tests in this process; the CLI as subprocesses on a
small synthetic set."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import torch

from bench.harness import ROOT
from serving import registry
from training import svhn, synthetic
from training.augment import cutout, random_translate
from training.errors import DataError


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("svhn")
    synthetic.write_synthetic(folder, n_train=400, n_test=120, seed=0)
    return folder


def test_synthetic_files_use_the_official_layout(synth_dir):
    mat = scipy.io.loadmat(synth_dir / "train_32x32.mat")
    assert mat["X"].dtype == np.uint8 and mat["X"].shape == (32, 32, 3, 400)
    assert mat["y"].shape == (400, 1) and set(np.unique(mat["y"])) <= set(range(1, 11))
    assert 10 in mat["y"] and 0 not in mat["y"]


def test_synthetic_crops_do_not_depend_on_the_number_of_processes(monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK", 40)  # three chunks of a small set
    alone, labels_alone = synthetic.synthetic_crops(100, seed=3, jobs=1)
    shared, labels_shared = synthetic.synthetic_crops(100, seed=3, jobs=2)
    assert np.array_equal(alone, shared) and np.array_equal(labels_alone, labels_shared)
    assert len(np.unique(labels_alone)) > 5 and alone.std() > 10  # varied labels, not blank crops


def test_loader_maps_10_to_0_and_transposes(synth_dir):
    raw = scipy.io.loadmat(synth_dir / "train_32x32.mat")
    data = svhn.load_split(synth_dir, "train", verify_md5=False)
    assert data.x.shape == (400, 3, 32, 32) and data.x.dtype == np.uint8 and data.y.dtype == np.int64
    assert np.array_equal(data.y, np.where(raw["y"].ravel() == 10, 0, raw["y"].ravel()))
    assert np.array_equal(data.x[5], raw["X"][..., 5].transpose(2, 0, 1))
    assert data.y.min() == 0 and data.y.max() == 9


def test_official_md5_is_checked(synth_dir):
    with pytest.raises(DataError, match="not the official file .*MD5.*--skip-md5.*--download"):
        svhn.load_split(synth_dir, "train", verify_md5=True)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.update(X=m["X"].astype(np.float32)), "X must be uint8"),
    (lambda m: m.update(X=m["X"][:, :, :2]), r"X must be uint8 \[32, 32, 3, N\]"),
    (lambda m: m.update(y=m["y"][:-1]), "one label per image"),
    (lambda m: m.update(y=np.where(m["y"] == 10, 0, m["y"])), "labels must lie in 1..10"),
    (lambda m: m.update(y=m["y"] + 5), "labels must lie in 1..10"),
])
def test_malformed_files_are_refused(synth_dir, tmp_path, mutate, message):
    mat = {k: v for k, v in scipy.io.loadmat(synth_dir / "train_32x32.mat").items() if not k.startswith("__")}
    mutate(mat)
    scipy.io.savemat(tmp_path / "train_32x32.mat", mat)
    with pytest.raises(DataError, match=message):
        svhn.load_split(tmp_path, "train", verify_md5=False)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="train_32x32.mat is missing.*--download"):
        svhn.load_split(tmp_path, "train", verify_md5=False)
    (tmp_path / "train_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable .mat"):
        svhn.load_split(tmp_path, "train", verify_md5=False)


def test_split_is_disjoint_stratified_and_seeded():
    labels = np.random.default_rng(0).integers(0, 10, 5000)
    train, val = svhn.stratified_split(labels, 0.1, seed=3)
    assert not np.intersect1d(train, val).size and len(train) + len(val) == 5000
    for digit in range(10):
        share = np.mean(labels[val] == digit) / np.mean(labels == digit)
        assert abs(share * len(val) / 5000 - 0.1) < 0.002
    again_train, again_val = svhn.stratified_split(labels, 0.1, seed=3)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    assert not np.array_equal(val, svhn.stratified_split(labels, 0.1, seed=4)[1])
    with pytest.raises(DataError, match="val-fraction"):
        svhn.stratified_split(labels, 0.05, seed=0)


def test_translation_never_flips_and_keeps_shapes():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)  # asymmetric everywhere
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    crops = {(dy, dx): padded[:, :, dy:dy + 32, dx:dx + 32] for dy in range(5) for dx in range(5)}
    for _ in range(20):
        out = random_translate(x, 2, "reflect")
        assert out.shape == x.shape
        for i in range(2):
            assert any(torch.equal(out[i], crop[i]) for crop in crops.values())
            assert not torch.equal(out[i], torch.flip(x[i], dims=[2]))
    halves = torch.zeros(64, 3, 32, 32)
    halves[..., 16:] = 200.0  # each image's mean: 100
    holes = cutout(halves, 8)
    assert holes.shape == (64, 3, 32, 32)
    filled = (holes == 100.0).sum(dim=(1, 2, 3)) / 3  # the square takes the image's mean, not black
    assert filled.max() <= 64 and filled.float().mean() > 16
    assert torch.equal(holes[holes != 100.0], halves[holes != 100.0])  # nothing else changes


def run_training(*args, nproc: int = 1, timeout: float = 300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "training", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_short_cpu_run_splits_trains_and_exports(synth_dir, tmp_path):
    result = run_training("svhn", "--data-dir", str(synth_dir), "--skip-md5", "--max-epochs", "3", "--device", "cpu",
                          "--batch-size", "32", "--out", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3 and len(metrics["val_nll"]) == 3  # 360 crops: too few to learn from
    assert metrics["config"]["train_images"] == 360 and metrics["config"]["val_images"] == 40
    splits = np.load(run_dir / "splits.npz")
    assert not np.intersect1d(splits["train_indices"], splits["val_indices"]).size
    (entry,) = registry.scan(run_dir / "export", "onnx")
    assert entry.available and entry.manifest["input"]["dtype"] == "uint8" and entry.manifest["task"] == "svhn"
    assert entry.manifest["metrics"]["test"]["n"] == 120
    # Trained on synthetic crops: said in its name and manifest, with the test split it carries.
    assert entry.name == "svhn-synthetic-cnn" and entry.manifest["data"]["name"] == "svhn-synthetic"
    assert "not SVHN" in entry.manifest["data"]["description"]
    written = json.loads((synth_dir / svhn.SYNTHETIC_RECORD).read_text())
    assert entry.manifest["data"]["test_file"] == {"file": "test_32x32.mat", "md5": written["md5"]["test"], "n": 120}
    assert entry.manifest["test_set"]["n"] == 120
    with np.load(entry.folder / entry.manifest["test_set"]["file"], allow_pickle=False) as embedded:
        assert np.array_equal(embedded["x"], svhn.load_split(synth_dir, "test", verify_md5=False).x)


@pytest.mark.slow
def test_a_run_validated_every_second_epoch_records_the_others_as_null_and_is_servable(synth_dir, tmp_path):
    result = run_training("svhn", "--data-dir", str(synth_dir), "--skip-md5", "--max-epochs", "3", "--device", "cpu",
                          "--batch-size", "32", "--width", "8", "--val-every", "2", "--out", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["val_every"] == 2 and metrics["epochs_run"] == 3
    assert metrics["val_nll"][0] is None and None not in metrics["val_nll"][1:]  # epoch 2, and 3, the last
    (entry,) = registry.scan(run_dir / "export", "onnx")
    served = entry.manifest["metrics"]
    assert entry.available and served["val_nll"] == metrics["val_nll"] and served["val_error"][0] is None
    assert served["val_nll"][served["best_epoch"]] is not None  # what routing compares models by


def test_data_record_tells_official_synthetic_and_other_files_apart(synth_dir, tmp_path, monkeypatch):
    train, test = (svhn.load_split(synth_dir, split, verify_md5=False) for split in ("train", "test"))
    assert svhn.data_record(synth_dir, train, test)["name"] == "svhn-synthetic"
    # the same files without the generator's record, or not the files it describes: someone else's
    assert svhn.data_record(tmp_path, train, test)["name"] == "svhn-format"
    (tmp_path / svhn.SYNTHETIC_RECORD).write_text((synth_dir / svhn.SYNTHETIC_RECORD).read_text())
    altered = svhn.Arrays(train.x, train.y, "0" * 32)
    assert svhn.data_record(tmp_path, altered, test)["name"] == "svhn-format"
    # the official MD5s: SVHN, whose test file the server reads from --data-dir (nothing embedded)
    monkeypatch.setitem(svhn.FILES, "train", ("train_32x32.mat", train.md5))
    monkeypatch.setitem(svhn.FILES, "test", ("test_32x32.mat", test.md5))
    record = svhn.data_record(synth_dir, train, test)
    assert record["name"] == "svhn" and record["test_file"] == {"file": "test_32x32.mat", "md5": test.md5, "n": 120}
    from training.export import embed_test_set
    assert embed_test_set(tmp_path, test.x, test.y, record) == {} and not (tmp_path / "test_set.npz").exists()


@pytest.mark.long
def test_two_process_gloo_run_writes_once(synth_dir, tmp_path):
    result = run_training("svhn", "--data-dir", str(synth_dir), "--skip-md5", "--max-epochs", "2", "--device", "cpu",
                          "--out", str(tmp_path / "runs"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()  # rank 0 alone writes
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["world_size"] == 2 and len(metrics["val_nll"]) == 2
    assert result.stdout.count("svhn cnn: test NLL") == 1


@pytest.mark.parametrize("args, message", [
    (["--val-fraction", "0.05"], "--val-fraction must be at least 0.1"),
    (["--val-fraction", "1.0"], "and below 1"),
    (["--data-dir", "/nonexistent/svhn"], "train_32x32.mat is missing"),
])
def test_cli_bad_input(synth_dir, tmp_path, args, message):
    base = ["svhn", "--data-dir", str(synth_dir), "--skip-md5", "--device", "cpu", "--out", str(tmp_path / "runs")]
    result = run_training(*base, *args)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
