"""Digits training (training/): the positional split, early stopping, the fit loop, checkpoints, atomic
folders, and the `python -m training digits` command line (flags, errors, what a run writes). Unit tests
in this process on small CPU trainings; the CLI as subprocesses (the `cli` fixture)."""
import argparse
import json
import threading
import time

import numpy as np
import pytest
import torch

from export_contract.publish import atomic_folder
from training import digits, digits_synth, models
from training.__main__ import build_parser
from training.loop import EarlyStopping, Recipe, evaluate, fit
from training.train import train_digits


def test_split_sizes_and_disjointness():
    sizes = {name: len(digits.load_split(name)) for name in digits.SPLITS}
    assert sizes == {"train": 1000, "val": 350, "test": 447}
    indices = {name: set(range(1797)[part]) for name, part in digits.SPLITS.items()}
    assert not indices["train"] & indices["val"] and not indices["train"] & indices["test"]
    assert not indices["val"] & indices["test"]
    assert set().union(*indices.values()) == set(range(1797))
    # The split is the original positional one: the first test digit is sample 1350.
    images, labels = digits.split_arrays("test")
    reference = __import__("sklearn.datasets").datasets.load_digits()
    assert np.array_equal(images[0], reference.images[1350]) and labels[0] == reference.target[1350]
    assert images.min() == 0 and images.max() == 16 and images.dtype == np.float32


def test_early_stopping_on_scripted_losses():
    model = torch.nn.Linear(1, 1, bias=False)
    losses = [1.0, 0.8, 0.5, 0.6, 0.7, 0.55, 0.9]  # best at epoch 2, then 3 epochs without improvement
    stopper = EarlyStopping(patience=3)
    stopped_at = None
    for epoch, loss in enumerate(losses):
        with torch.no_grad():
            model.weight.fill_(epoch)  # the weights say which epoch they come from
        if stopper.update(epoch, loss, model):
            stopped_at = epoch
            break
    assert stopped_at == 5  # epochs 3, 4, 5 did not beat 0.5
    assert stopper.best_epoch == 2 and stopper.best_nll == 0.5
    stopper.restore_best(model)
    assert model.weight.item() == 2.0


def test_fit_restores_best_epoch_and_lowers_val_nll():
    torch.manual_seed(0)
    train, val = digits.load_split("train"), digits.load_split("val")
    model = models.digits_mlp()
    before = evaluate(model, val.x, val.y).nll
    history = fit(model, train.x, train.y, val.x, val.y, Recipe(optimizer="adamw", lr=2e-3, batch_size=128),
                  max_epochs=4, patience=20, progress=False)
    after = evaluate(model, val.x, val.y).nll
    assert history.epochs_run == 4 and len(history.val_nll) == 4
    assert after < before / 2
    assert after == pytest.approx(min(history.val_nll), rel=1e-5)
    assert history.best_epoch == int(np.argmin(history.val_nll))


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    run_dir, metrics = train_digits("cnn", seed=0, max_epochs=2, patience=2, device=torch.device("cpu"),
                                    out=tmp_path, progress=False)
    state = torch.load(run_dir / "model.pt", weights_only=True)
    model = models.digits_cnn()
    model.load_state_dict(state)
    test = digits.load_split("test")
    reloaded = evaluate(model, test.x, test.y)
    assert reloaded.errors == metrics["test"]["errors"]
    assert reloaded.nll == pytest.approx(metrics["test"]["nll"], rel=1e-6)


def test_same_seed_same_result_on_cpu(tmp_path):
    runs = [train_digits("cnn", seed=3, max_epochs=3, patience=20, device=torch.device("cpu"),
                         out=tmp_path / str(i), progress=False) for i in range(2)]
    (dir_a, a), (dir_b, b) = runs
    assert a["val_nll"] == b["val_nll"] and a["test"] == b["test"]
    state_a, state_b = (torch.load(d / "model.pt", weights_only=True) for d in (dir_a, dir_b))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "run") as staging:
            (staging / "model.pt").write_text("partial")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_atomic_folder_replaces_a_folder_without_a_moment_when_it_is_missing(tmp_path):
    """A server polling the exports folder must never find a published model missing (it would stop
    serving it): the replacement is one exchange of the two folders, seen by a watcher thread."""
    final = tmp_path / "digits-cnn"
    final.mkdir()
    (final / "model.json").write_text("old")
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not final.is_dir():
                missing.append(time.monotonic())
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for round_ in range(50):
            with atomic_folder(final) as staging:
                (staging / "model.json").write_text(f"new {round_}")
    finally:
        stop.set()
        watcher.join()
    assert not missing and (final / "model.json").read_text() == "new 49"
    assert [p.name for p in tmp_path.iterdir()] == ["digits-cnn"]  # no staging or retired folder left


def test_cli_single_run_writes_complete_run_folder(cli, tmp_path):
    result = cli("training", "digits", "--arch", "mlp", "--max-epochs", "3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (run_dir,) = tmp_path.iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["curves.pdf", "curves.png", "export", "metrics.json", "model.pt"]
    assert sorted(p.name for p in (run_dir / "export" / "digits-mlp").iterdir()) == [
        "curves.png", "model.json", "model.onnx", "model.ts", "nondigits.npz", "reliability.png", "test_set.npz"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["arch"] == "mlp" and metrics["seed"] == 0 and metrics["epochs_run"] == 3
    assert len(metrics["val_nll"]) == len(metrics["val_error"]) == 3
    assert set(metrics["test"]) == {"nll", "error", "errors", "n"} and metrics["test"]["n"] == 447
    assert {"torch", "python", "device"} <= set(metrics["environment"])
    assert metrics["config"]["recipe"]["optimizer"] == "adamw"
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"-> {run_dir}" in result.stdout


@pytest.mark.long
def test_cli_all_writes_comparison_table(cli, tmp_path):
    synth = tmp_path / "synth"  # a small set of generated pictures: the defaults take minutes to draw
    digits_synth.write(synth, {"train": 100, "val": 50, "test": 50, "outliers": 50}, 0, 1)
    runs = tmp_path / "runs"
    result = cli("training", "digits", "--all", "--max-epochs", "1", "--out", str(runs), "--synth-dir", str(synth))
    assert result.returncode == 0, result.stderr
    table = (runs / "digits-comparison-seed0.md").read_text()
    for name in ("seed-mlp", "seed-cnn", "| mlp", "| cnn", "| photo-cnn", "k-NN"):
        assert name in table
    assert table.count("/447") == 6
    assert len([p for p in runs.iterdir() if p.is_dir()]) == 5


class AtChance(torch.nn.Module):
    """Uniform log-probabilities whatever it is shown (a model that has not found the digit yet);
    its NLL still drifts a little, with a parameter the optimizer moves."""

    def __init__(self):
        super().__init__()
        self.drift = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.log_softmax(torch.zeros(len(x), 10) + self.drift * torch.arange(10.0), dim=1)


def test_epochs_at_chance_use_no_patience_and_no_lr_decay():
    x, y = torch.zeros(64, 1, 8, 8), torch.arange(64) % 10
    recipe = Recipe(optimizer="adamw", lr=1e-2, weight_decay=0.0, batch_size=16, lr_decay_patience=1)
    model = AtChance()
    history = fit(model, x, y, x, y, recipe, max_epochs=6, patience=1, progress=False)
    assert history.epochs_run == 6  # patience 1 would have stopped it at epoch 2 or 3
    assert all(error >= 0.85 for error in history.val_error)


@pytest.mark.parametrize("args, message", [
    (["--arch", "resnet"], "invalid choice: 'resnet'"),
    (["--arch", "mlp", "--max-epochs", "0"], "must be positive"),
    (["--arch", "mlp", "--patience", "-3"], "must be positive"),
    (["--arch", "mlp", "--device", "tpu"], "unknown device"),
    ([], "choose --arch"),
    (["--arch", "cnn", "--epochs", "5"], "--epochs (did you mean --max-epochs?)"),
    (["--arch", "cnn", "--epochs=5"], "--epochs (did you mean --max-epochs?)"),
])
def test_cli_bad_input_one_line_and_nothing_written(cli, tmp_path, args, message):
    result = cli("training", "digits", *args, "--out", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cli_help_describes_every_flag_with_its_default(cli):
    parser = build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        undescribed = [action.dest for action in command._actions if not action.help]
        assert undescribed == [], f"{name}: {undescribed}"
    result = cli("training", "digits", "--help")
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert result.returncode == 0 and "(default: 1000; photo-cnn 60)" in text and "(default: runs)" in text


def test_cli_suggests_only_the_commands_own_flags(cli):
    result = cli("training", "digits", "--arch", "cnn", "--width", "16")  # an svhn flag
    assert result.returncode == 2 and result.stderr.strip().endswith("unrecognized arguments: --width 16")


def test_cli_unwritable_output(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = cli("training", "digits", "--arch", "mlp", "--out", str(blocker / "runs"))
    assert result.returncode == 2
    assert "not writable" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cli_cuda_without_cuda(cli, tmp_path):
    result = cli("training", "digits", "--arch", "mlp", "--device", "cuda", "--no-reproducible", "--out", str(tmp_path))
    assert result.returncode == 2 and "CUDA is not available" in result.stderr
    assert list(tmp_path.iterdir()) == []
