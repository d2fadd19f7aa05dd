"""serving/metrics_files.py: prometheus_client's multiprocess files on a full disk degrade /metrics,
never the server (a full temporary folder once killed it with SIGBUS). Units in this process (and one
child process), then real servers on loopback whose TMPDIR is a small tmpfs (root only)."""
import os
import subprocess
from pathlib import Path

import httpx
import numpy as np

from bench.harness import copy_committed, running_server
from serving import metrics_files


def test_a_folder_without_room_means_metrics_per_process(tmp_path, monkeypatch):
    monkeypatch.delenv(metrics_files.ENV, raising=False)
    monkeypatch.setattr(metrics_files.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(metrics_files.os, "statvfs", lambda path: os.statvfs_result((4096,) * 2 + (0,) * 8))
    assert metrics_files.open_folder(3) is None and metrics_files.ENV not in os.environ
    assert list(tmp_path.iterdir()) == []


def test_each_process_reserves_its_files_in_full(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics_files.ENV, str(tmp_path))
    metrics_files.reserve()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(f"{kind}_{os.getpid()}.db" for kind in metrics_files.KINDS)
    for name in files:  # allocated, not sparse
        assert (tmp_path / name).stat().st_blocks * 512 >= metrics_files.RESERVED_BYTES


def test_prometheus_client_uses_the_reserved_files(tmp_path):
    """The file names and the capacity taken from their size are prometheus_client's: checked here
    against the installed version, in a process of its own (the multiprocess mode is chosen at import)."""
    script = ("from serving import metrics_files; metrics_files.reserve();"
              "from serving.metrics import Metrics; Metrics(models=['m']).images.labels('m', 'v').inc()")
    env = {**os.environ, metrics_files.ENV: str(tmp_path)}
    subprocess.run([os.sys.executable, "-c", script], env=env, check=True)
    sizes = {p.name.rsplit("_", 1)[0]: p.stat().st_size for p in tmp_path.iterdir()}
    assert set(sizes) == set(metrics_files.KINDS) and set(sizes.values()) == {metrics_files.RESERVED_BYTES}


def fill(folder: Path, leave: int = 0) -> None:
    """Fill the filesystem, then free `leave` bytes."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError:
            pass
        f.truncate(max(0, f.tell() - leave))


def test_a_temporary_folder_that_fills_up_while_serving_costs_no_process(tmp_path, small_tmpfs):
    copy_committed(tmp_path / "exports", "digits-cnn")
    with running_server(tmp_path / "exports", "--workers", "2", env={"TMPDIR": str(small_tmpfs)}) as server:
        fill(small_tmpfs)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for i in range(60):  # new series: routes, statuses, models, versions
                client.get(f"/nowhere{i % 7}")
                client.post("/predict", json={"pixels": [np.zeros((8, 8)).tolist()]})
                client.get("/models/digits-cnn")
            assert client.get("/metrics").status_code == 200
        assert server.process.poll() is None, server.output()


def test_no_room_for_metrics_at_start_still_serves(tmp_path, small_tmpfs):
    fill(small_tmpfs, leave=1 << 20)  # room for Python to take it as TMPDIR, not for the metrics files
    copy_committed(tmp_path / "exports", "digits-cnn")
    with running_server(tmp_path / "exports", "--workers", "2", env={"TMPDIR": str(small_tmpfs)}) as server:
        assert httpx.get(server.url + "/metrics").status_code == 200
        assert "reports only the process that answers it" in server.output()
