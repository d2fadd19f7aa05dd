"""Each training benchmark of bench/ run for real at its smallest (`python -m bench.NAME` in a
subprocess from the repository root: one arch, one seed, one epoch, a few images): it exits 0 and
prints its Markdown table. The GPU scripts' dry runs: test_gpu_scripts_dry_run.py."""
import os

import pytest


def tiny_runs(scratch):
    """(script, flags, what its report must show)."""
    return {
        "digits": (["--archs", "mlp", "--seeds", "0", "--max-epochs", "1", "--out", str(scratch / "runs")],
                   ["## Digits (`python -m bench.digits`)", "| mlp | 0 |", "| arch | median errors |", "k-NN"]),
        "notebook_replay": (["--archs", "mlp", "--seeds", "0", "--max-epochs", "1"],
                            ["| notebook arch | seed | test NLL |", "| mlp | 0 |"]),
        "sweep_digits": (["--arch", "mlp", "--seeds", "0", "--max-epochs", "1"],
                         ["| seed | best val NLL |", "| 0 |", "mean best val NLL"]),
        "reproducibility": (["--arch", "mlp", "--setting", "reproducible mode (default)", "--max-epochs", "1"],
                            ["digits mlp, seed 0, on", "| setting | kernels, threads |",
                             "| reproducible mode (default) |"]),
        "svhn_cpu": (["--data", str(scratch / "synth"), "--out", str(scratch / "runs"), "--train", "200", "--test",
                      "100", "--max-epochs", "1"],
                     ["## SVHN on CPU (`python -m bench.svhn_cpu`)", "on 200 synthetic crops (",
                      "| wall s (whole command) |", "| 1 (0) |"]),
        "photo_digits": (["--n", "10"], ["10 renders, seed 0", "| preprocessing | accuracy | refused |",
                                         "| after, polarity detected |"]),
    }


@pytest.mark.slow
@pytest.mark.parametrize("script", ["notebook_replay", "sweep_digits", *(
    pytest.param(script, marks=pytest.mark.long) for script in ("digits", "reproducibility", "svhn_cpu", "photo_digits"))])
def test_a_training_benchmark_runs_tiny_and_reports(cli, scratch, script):
    flags, report = tiny_runs(scratch)[script]
    result = cli(f"bench.{script}", *flags, env={**os.environ, "TMPDIR": str(scratch)}, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for text in report:
        assert text in result.stdout, result.stdout
