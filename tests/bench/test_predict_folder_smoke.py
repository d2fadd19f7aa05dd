"""bench/predict_folder.py run for real at its smallest (`python -m bench.predict_folder` in a
subprocess, against the servers it starts on loopback): it exits 0 and prints its tables, the two
modes agreeing and the --max-queue 1 run answering every image."""
import os

import pytest


@pytest.mark.long
def test_predict_folder_runs_tiny_and_reports(cli, scratch):
    result = cli("bench.predict_folder", "--images", "300", "--seconds", "1", "--load", "python", "--connections", "4",
                 "--overload-images", "60", env={**os.environ, "TMPDIR": str(scratch)}, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for text in ("## Batch prediction (`python -m bench.predict_folder", "| `--url` (server: default flags) | 300 |",
                 "| `--exports` (no server) | 300 |", "| the two modes' labels identical | 0 differ of 300 | yes |",
                 "| `--max-queue 1` under load: every image answered | 0 failed of 60;",
                 "`import serving.client` < 0.3 s"):
        assert text in result.stdout, result.stdout
