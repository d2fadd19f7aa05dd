"""Shared by every test: the reproducible-mode pins (before anything imports torch), `python -m ...`
from the checkout (the `cli` fixture), the container and long tests skipped unless -m selects them, and a
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


# Marked tests that run only when -m names their mark: each takes long enough to matter to CI's time.
OPT_IN = {"container": "builds and runs the container images: make image-test (pytest -m container)",
          "long": "a long check: make test-long (pytest -m long)"}


def pytest_collection_modifyitems(config, items):
    selected = config.getoption("markexpr") or ""
    for mark, reason in OPT_IN.items():
        if mark in selected:
            continue
        for item in items:
            if item.get_closest_marker(mark):
                item.add_marker(pytest.mark.skip(reason=reason))


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
