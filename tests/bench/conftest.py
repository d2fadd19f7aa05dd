"""What the bench smoke tests share: a short scratch folder for a script's temporary files."""
import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def scratch():
    """A short folder under /tmp (the server's multiprocessing manager binds a Unix socket below
    TMPDIR, whose path may not be long), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
