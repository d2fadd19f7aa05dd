"""What the serving tests share: the committed digits models in a folder of their own (modules that
need other exports, tampered, retrained, in-process, define their own `exports`), and a small
filesystem that fills up."""
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from bench.harness import copy_committed


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports")
    copy_committed(folder, "digits-mlp", "digits-cnn")
    return folder


@pytest.fixture(scope="session")
def test_digits():
    """The UCI digits' test split: images 447 x 8 x 8 on 0..16, labels."""
    from training import digits
    return digits.split_arrays("test")


@pytest.fixture
def small_tmpfs():
    """A 32 MB filesystem for TMPDIR (root only: elsewhere the test is skipped). A short path: the
    server's multiprocessing manager binds a Unix socket under it."""
    mount = Path(tempfile.mkdtemp(prefix="ds-", dir="/tmp"))
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        mount.rmdir()
        pytest.skip("needs to mount a tmpfs (root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()
