"""Every `curl` example in the README, run as written (bar the address) against a real server on
the committed models: each answers 200 with the digit its `# label N` comment names."""
import json
import re
import shutil
import subprocess

import pytest

from bench.harness import ROOT, copy_committed, running_server

README_ADDRESS = "http://127.0.0.1:8000"
EXAMPLES = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("curl ")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    exports = tmp_path_factory.mktemp("exports")  # the committed models, whatever else exports/ holds here
    # all four, as `make serve` serves them: resize=true photos go to digits-photo-cnn
    copy_committed(exports, "digits-cnn", "digits-mlp", "digits-photo-cnn", "svhn-synthetic-cnn")
    with running_server(exports) as process:
        yield process


def test_the_readme_has_curl_examples_and_each_names_its_label():
    assert len(EXAMPLES) >= 4
    assert all(re.search(r"# label \d$", line) for line in EXAMPLES), EXAMPLES


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda line: line[:60])
def test_readme_example_answers_the_digit_it_names(server, example):
    command = re.sub(r"\s+# label \d$", "", example).replace(README_ADDRESS, server.url)
    assert README_ADDRESS in example  # where `make serve` listens
    result = subprocess.run(["bash", "-c", command + " --silent --show-error --write-out '\\n%{http_code}'"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    body, _, status = result.stdout.rpartition("\n")
    assert result.returncode == 0 and status == "200", (result.stderr, result.stdout)
    (prediction,) = json.loads(body)["predictions"]
    assert prediction["label"] == int(re.search(r"# label (\d)$", example).group(1)), prediction
