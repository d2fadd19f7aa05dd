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


@pytest.fixture
def cli():
    return run_cli
