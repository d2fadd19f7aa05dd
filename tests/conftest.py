"""Shared by every test: the reproducible-mode pins (before anything imports torch), `python -m ...`
from the checkout (the `cli` fixture), the container tests skipped unless -m selects them, and a
retrained digits-mlp export (`retrained`). Helpers: tests/helpers.py, and bench/harness.py for what the
benchmarks share."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training import reproducible

# Before anything imports torch: every in-process training run in the suite is pinned, so the
# tests get the same arithmetic on any x86_64 machine (training/reproducible.py).
reproducible.pin_before_torch()

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 240, env: dict | None = None,
            umask: int = -1) -> subprocess.CompletedProcess:
    """Run `python -m <args>` from the checkout as a user would, capturing output."""
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, umask=umask)


def pytest_collection_modifyitems(config, items):
    """The container tests build and run images for minutes: only when -m selects them (make image-test)."""
    if "container" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="builds and runs the container images: make image-test (pytest -m container)")
    for item in items:
        if item.get_closest_marker("container"):
            item.add_marker(skip)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def retrained(tmp_path_factory) -> Path:
    """A retrained digits-mlp export (another seed, a few epochs): a new version whose manifest is true."""
    import torch
    from training.train import train_digits
    run_dir, _ = train_digits("mlp", seed=1, max_epochs=3, patience=3, device=torch.device("cpu"),
                              out=tmp_path_factory.mktemp("runs"), progress=False)
    return run_dir / "export" / "digits-mlp"
