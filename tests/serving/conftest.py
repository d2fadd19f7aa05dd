"""What the real-server tests of this folder share: the committed digits models in a folder of their
own. Modules that need other exports (tampered, retrained, in-process) define their own `exports`."""
import pytest

from bench.harness import copy_committed


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports")
    copy_committed(folder, "digits-mlp", "digits-cnn")
    return folder
