"""Reproducible mode: the same weights whatever CPU dispatch level and core count the machine has
(`python -m training digits` as subprocesses under imitated environments), and the training progress
output (unit)."""
import io
import json
import os
import subprocess
import sys

import pytest

from training import reproducible
from training.progress import EpochProgress

# What a 1-core machine whose best vector extension is AVX2 gives PyTorch on its own. On an AVX-512
# machine this changes ATen's and oneDNN's kernels and MKL's code path; on any machine the thread count.
AVX2_ONE_CORE = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                 "OMP_NUM_THREADS": "1"}


def natural_env() -> dict:
    """The environment without the pins the test process itself runs under (conftest.py)."""
    return {key: value for key, value in os.environ.items() if key not in {*reproducible.PINNED_ENV, *AVX2_ONE_CORE}}


def train_cnn(cli, out, *flags, env):
    result = cli("training", "digits", "--arch", "cnn", "--max-epochs", "2", "--out", str(out), *flags, env=env)
    assert result.returncode == 0, result.stderr
    (run_dir,) = out.iterdir()
    return (run_dir / "model.pt").read_bytes(), json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.long
def test_pinned_runs_give_the_same_weights_under_another_machines_dispatch(cli, tmp_path):
    """The same command on this machine as it is and as a 1-core AVX2 machine would present itself:
    different kernels and thread counts unpinned, the same arithmetic pinned, so the same weights.
    It fails if any pin stops working (on an AVX-512 machine: any of the three; anywhere: the threads)."""
    weights, metrics = train_cnn(cli, tmp_path / "natural", env=natural_env())
    if not metrics["reproducibility"]["pinned"]:
        pytest.skip(f"this machine cannot pin: {metrics['reproducibility']['reason']}")
    other_weights, other_metrics = train_cnn(cli, tmp_path / "avx2-1-core", env={**natural_env(), **AVX2_ONE_CORE})
    assert weights == other_weights
    assert metrics["val_nll"] == other_metrics["val_nll"] and metrics["test"] == other_metrics["test"]
    for record in (metrics, other_metrics):
        assert record["reproducibility"] == {"pinned": True, "env": reproducible.PINNED_ENV,
                                             "threads": reproducible.THREADS, "deterministic_algorithms": True}
        assert record["environment"]["cpu_capability"] == "AVX2"
        assert record["environment"]["threads"] == reproducible.THREADS
        assert record["environment"]["cpu_model"]
    # The imitation reaches PyTorch: unpinned, the same environment trains on one thread.
    _, unpinned = train_cnn(cli, tmp_path / "unpinned", "--no-reproducible", env={**natural_env(), **AVX2_ONE_CORE})
    assert unpinned["reproducibility"] == {"pinned": False}
    assert unpinned["environment"]["threads"] == 1


@pytest.mark.parametrize("flags, env, message", [
    (["--device", "cuda"], {}, "reproducible mode trains on the CPU only; pass --no-reproducible"),
    ([], {"ATEN_CPU_CAPABILITY": "avx512"}, "ATEN_CPU_CAPABILITY=avx512 in the environment conflicts"),
    ([], {"MKL_CBWR": "AUTO"}, "MKL_CBWR=AUTO in the environment conflicts"),
])
def test_what_an_explicit_reproducible_cannot_honour_is_refused_before_training(cli, tmp_path, flags, env, message):
    result = cli("training", "digits", "--arch", "cnn", "--reproducible", "--out", str(tmp_path / "runs"), *flags,
                 env={**natural_env(), **env})
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_by_default_a_run_that_cannot_be_pinned_goes_on_unpinned_and_says_why(cli, tmp_path):
    result = cli("training", "digits", "--arch", "cnn", "--max-epochs", "1", "--out", str(tmp_path),
                 env={**natural_env(), "ATEN_CPU_CAPABILITY": "default"})
    assert result.returncode == 0, result.stderr
    assert "note: ATEN_CPU_CAPABILITY=default in the environment conflicts" in result.stderr
    (run_dir,) = tmp_path.iterdir()
    record = json.loads((run_dir / "metrics.json").read_text())["reproducibility"]
    assert record["pinned"] is False and "ATEN_CPU_CAPABILITY=default" in record["reason"]


def test_pinning_after_torch_is_imported_is_refused():
    code = "import torch\nfrom training import reproducible\nreproducible.pin_before_torch()"
    result = subprocess.run([sys.executable, "-c", code], env=natural_env(), capture_output=True, text=True)
    assert result.returncode != 0 and "must be set up before torch is imported" in result.stderr


def test_the_command_line_parses_without_importing_torch():
    code = "import sys\nfrom training.__main__ import build_parser\nbuild_parser()\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


class Terminal(io.StringIO):
    def isatty(self):
        return True


def feed(progress: EpochProgress, epochs: int) -> None:
    for epoch in range(epochs):
        progress.update(epoch, val_nll=1.0 / (epoch + 1), val_error=0.1, best_epoch=epoch, best_nll=1.0 / (epoch + 1),
                        patience_left=20)
    progress.close()


def test_progress_in_a_log_is_plain_throttled_lines():
    log = io.StringIO()
    feed(EpochProgress("digits cnn", 1000, stream=log, every=3600), epochs=300)
    assert "\r" not in log.getvalue()
    # Nothing within the interval but the last epoch, which always closes the log.
    assert log.getvalue().splitlines() == [
        "digits cnn: epoch 300 (at most 1000), val NLL 0.0033, val error 0.1000, best 0.0033 at epoch 300, patience left 20, 0 s"]
    every_epoch = io.StringIO()
    feed(EpochProgress("digits cnn", 1000, stream=every_epoch, every=0), epochs=5)
    assert len(every_epoch.getvalue().splitlines()) == 5


def test_progress_on_a_terminal_rewrites_one_line():
    terminal = Terminal()
    feed(EpochProgress("digits cnn", 1000, stream=terminal), epochs=5)
    assert terminal.getvalue().count("\r") == 6 and terminal.getvalue().count("\n") == 1
