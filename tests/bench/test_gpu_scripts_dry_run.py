"""The GPU machine's scripts (issue 27), run on the CPU so that they cannot rot before a GPU is lent:
bench/gpu_serve.sh and bench/gpu_train.sh in their dry runs (DRY_RUN=1: tiny sets, --device cpu, one
HTTP process, one-second loads), bench/gpu.sh's time boxes and what it leaves in $OUT, and
bench/gpu_wheels.sh splitting a wheel into chunks, keeping them across calls, and joining, checking
and installing them."""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from bench.harness import ROOT


def script(name: str, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "bench" / name), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.mark.long
def test_gpu_serve_dry_run_serves_measures_and_reports_verification(scratch):
    result = script("gpu_serve.sh", DRY_RUN="1", RESULTS=str(scratch), TMPDIR=str(scratch))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "a session on cpu: CPUExecutionProvider first" in result.stdout
    report = json.loads((scratch / "gpu_serve.json").read_text())
    runs = {(r["server"], r["backend"], r["model"]) for r in report["runs"]}
    assert runs == {(server, backend, model) for model in ("svhn-synthetic-w64", "digits-cnn")
                    for server, backend in (("digitserve", "onnx"), ("digitserve", "torchscript"),
                                            ("FastAPI + ORT", "onnx (cpu)"))}
    assert all(r["rps"] > 0 and r["non2xx"] == 0 for r in report["runs"])
    assert all(sum(r["batches"].values()) > 0 for r in report["runs"] if r["server"] == "digitserve")
    assert {(v["backend"], v["name"]) for v in report["verification"]} == {
        (backend, model) for backend in ("onnx", "torchscript") for model in ("svhn-synthetic-w64", "digits-cnn")}
    assert all(v["verified"]["reproduced"] for v in report["verification"])
    assert "| digitserve | onnx | svhn-synthetic-w64 |" in (scratch / "gpu_serve.md").read_text()


@pytest.mark.long
def test_gpu_train_dry_run_trains_each_run_and_tables_it(scratch):
    result = script("gpu_train.sh", DRY_RUN="1", RESULTS=str(scratch), TMPDIR=str(scratch))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (scratch / "gpu_train.md").read_text()
    assert "| val4 | --val-every 4 --batch-size 16 " in table and "| ddp | --batch-size 16 " in table
    assert "failed" not in table
    assert json.loads((scratch / "metrics-ddp.json").read_text())["config"]["world_size"] == 2


def test_gpu_train_refuses_a_bad_run_before_writing_any_data(scratch):
    result = script("gpu_train.sh", RUNS="eager val3x", RESULTS=str(scratch), timeout=30)
    assert result.returncode == 2 and "run val3x: bad name or flags" in result.stdout
    assert [p.name for p in scratch.iterdir()] == ["gpu_train.log"]


def test_gpu_train_skips_what_would_overrun_its_budget_and_still_tables_it(scratch):
    result = script("gpu_train.sh", DRY_RUN="1", RUNS="val4", BUDGET="1", RESULTS=str(scratch), TMPDIR=str(scratch))
    assert result.returncode == 0 and "--- val4: skipped, it might not end inside the 1 s budget" in result.stdout
    assert "| val4 | failed, timed out or skipped" in (scratch / "gpu_train.md").read_text()


def test_gpu_sh_boxes_each_script_and_leaves_its_files_in_out(scratch):
    result = script("gpu.sh", DRY_RUN="1", OUT=str(scratch), SERVE_LIMIT="1", TRAIN_LIMIT="1", timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (scratch / "summary.md").read_text()
    assert "gpu_serve.sh exit status 124, gpu_train.sh 124" in summary and "dry run: nothing installed" in summary
    with tarfile.open(scratch / "results.tar.gz") as packed:
        names = packed.getnames()
    assert {"install.log", "serve/gpu_serve.log", "train/gpu_train.log"} <= {n.removeprefix("./") for n in names}
    assert len(list(scratch.iterdir())) <= 8  # what the device tool brings back


def test_the_server_sees_the_packages_carried_to_the_gpu_machine(monkeypatch):
    from bench import gpu_serve
    seen = {}

    def server_process(exports, env, args):
        seen.update(env)
        raise StopIteration
    monkeypatch.setattr(gpu_serve, "ServerProcess", server_process)
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    with pytest.raises(StopIteration):
        gpu_serve.digitserve_runs("onnx", argparse.Namespace(exports=ROOT / "exports", device="cuda", workers=2), {}, None)
    assert seen["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/tmp/site"]


def fake_wheel(folder: Path, name: str, size: int = 0) -> Path:
    """A pure-Python wheel of package `name` (with `size` bytes of padding, to split)."""
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{name}/__init__.py", f"PADDING = {'x' * size!r}\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


def test_gpu_wheels_chunks_travel_one_call_at_a_time_and_install_checked(scratch):
    here, device, stash, site = scratch / "here", scratch / "device", scratch / "stash", scratch / "site"
    here.mkdir()
    big = fake_wheel(scratch, "bigort", size=5000)
    result = script("gpu_wheels.sh", "split", str(big), GPU_DIR=str(here), CHUNK="1500", timeout=30)
    assert result.returncode == 0 and "in 4 chunks of at most 1500 bytes" in result.stdout, result.stderr
    chunks = sorted(here.glob("ort-*"))
    assert [c.name for c in chunks] == ["ort-01", "ort-02", "ort-03", "ort-04"]
    env = {"GPU_DIR": str(device), "STASH": str(stash), "SITE": str(site)}
    for chunk in chunks[:3]:  # one call each, whose checkout holds that chunk alone
        device.mkdir()
        (device / chunk.name).symlink_to(chunk)
        assert script("gpu_wheels.sh", "stash", timeout=30, **env).returncode == 0
        (device / chunk.name).unlink()
        device.rmdir()
    (device / "base").mkdir(parents=True)
    fake_wheel(device / "base", "smallpkg")
    blocked = script("gpu_wheels.sh", "install", timeout=60, **env)  # the last chunk not carried
    assert blocked.returncode == 0, blocked.stderr
    assert "3 of 4 chunks here, not installed (ONNX Runtime CUDA blocked)" in blocked.stdout
    assert (site / "smallpkg").is_dir() and not (site / "bigort").exists()
    (device / "ort-04").symlink_to(chunks[3])  # the last call carries it with the base files
    installed = script("gpu_wheels.sh", "install", timeout=60, **env)
    assert installed.returncode == 0 and "2 wheels into" in installed.stdout, installed.stderr
    assert (site / "bigort" / "__init__.py").read_text() == (f"PADDING = {'x' * 5000!r}\n")
    exported = subprocess.run(["bash", "-c", f". {stash}/env.sh && echo $PYTHONPATH"], capture_output=True, text=True)
    assert exported.stdout.startswith(f"{site}")
    part = stash / "ort" / "part.01"
    part.write_bytes(part.read_bytes()[:-1] + b"?")  # one byte changed in transit
    corrupt = script("gpu_wheels.sh", "install", timeout=60, **env)
    assert corrupt.returncode == 1 and "does not match its sha256" in corrupt.stderr
