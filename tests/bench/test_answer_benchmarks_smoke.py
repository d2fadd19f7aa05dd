"""The benchmarks of the answers' quality run for real at their smallest (`python -m bench.NAME` in a
subprocess from the repository root): bench.trust on one committed model with a short bootstrap, and
bench.drawings replaying one drawing of each kind through the page's pad in headless Chromium on a
real server. Each exits 0 and prints its Markdown table."""
import os
import shutil

import pytest


def test_trust_reports_calibration_abstention_and_non_digits(cli):
    result = cli("bench.trust", "--models", "digits-mlp", "--bootstrap", "10", timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for text in ("## Answers a user can trust", "| model | T | test ECE before -> after", "| digits-mlp | ",
                 "/447 (", "Decision rules (chosen on validation"):
        assert text in result.stdout, result.stdout


@pytest.mark.long
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed (make chromium)")
def test_drawings_are_replayed_on_the_page_and_reported(cli, scratch):
    result = cli("bench.drawings", "--per-variant", "1", "--models", "digits-photo-cnn",
                 env={**os.environ, "TMPDIR": str(scratch)}, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for text in ("## Drawings on the page's pad", "14 drawings per model", "| digits-photo-cnn | ",
                 "| model | accuracy | answered (digit) |"):
        assert text in result.stdout, result.stdout
