"""bench.dashboard_shot (the picture of the Grafana dashboard in docs/img/) at its smallest: drawing every
panel of the dashboard from saved answers (`--data`), and, where Prometheus is installed, the whole run
with a few seconds per phase: every panel's queries accepted by a real Prometheus scraping a real
server, and every one but the prediction-log drops (nothing is dropped) answered with data."""
import json
import os
import shutil

import pytest
from PIL import Image

from bench.harness import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "digitserve.json"


def saved_answers() -> dict:
    """What the script keeps of Prometheus' answers, made up: two series per panel."""
    start = 1_700_000_000.0
    times = [start + 2 * i for i in range(60)]
    panels = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "timeseries":
            panels[panel["id"]] = [(f"series {k}", times, [0.1 * k + i / 100 for i in range(60)]) for k in (1, 2)]
        elif panel["type"] in ("stat", "table"):
            labels = {"model": "digits-cnn", "version": "20261207T031944Z-be4754e3", "status": "ready",
                      "device": "cpu", "provider": "CPUExecutionProvider"}
            panels[panel["id"]] = [("digits-cnn", labels, 42.0)]
    return {"start": start, "end": times[-1], "prometheus": "test", "rate_interval": "15s", "phase_seconds": 60,
            "panels": panels}


def test_every_panel_is_drawn_from_saved_answers(cli, tmp_path):
    (tmp_path / "data.json").write_text(json.dumps(saved_answers()))
    result = cli("bench.dashboard_shot", "--data", str(tmp_path / "data.json"), "--out", str(tmp_path / "d.png"),
                 timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    with Image.open(tmp_path / "d.png") as image:
        assert image.format == "PNG" and image.width == 1920 and image.height > 1500


@pytest.mark.long
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Prometheus not installed (apt-get install prometheus)")
def test_a_short_run_answers_every_panel_from_a_real_prometheus(cli, scratch):
    result = cli("bench.dashboard_shot", "--phase-seconds", "4", "--out", str(scratch / "d.png"), "--data",
                 str(scratch / "data.json"), env={**os.environ, "TMPDIR": str(scratch)}, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    empty = [line for line in result.stdout.splitlines() if line.startswith("no data:")]
    assert empty in ([], ["no data: Prediction-log drops A"]), result.stdout
    saved = json.loads((scratch / "data.json").read_text())
    told = next(p for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"] == "Predictions told their label")
    assert sum(value for _, _, value in saved["panels"][str(told["id"])]) > 0
