"""Deployment: the Dockerfile (linted, its CMD run against the checkout), graceful SIGTERM, and the
Kubernetes and compose manifests. The CMD and SIGTERM with real servers on loopback; the files read and
validated (hadolint, kubernetes-validate). The images themselves are built and run by
tests/deploy/test_container.py (make image-test), not by every CI run."""
import asyncio
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import yaml

from bench.harness import ROOT, ServerProcess, copy_committed, free_port, running_server

VENV_BIN = os.path.dirname(sys.executable)


def dockerfile_stage(name: str) -> str:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages = re.split(r"^FROM ", text, flags=re.M)
    return next(stage for stage in stages if re.match(rf"\S+ AS {name}\b", stage))


def test_hadolint_is_clean():
    result = subprocess.run([os.path.join(VENV_BIN, "hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_serving_stage_runs_non_root_exposes_8000_and_checks_health():
    serve = dockerfile_stage("serve")
    assert re.search(r"^USER 10001$", serve, re.M)
    assert re.search(r"^EXPOSE 8000$", serve, re.M)
    assert "HEALTHCHECK" in serve and "127.0.0.1:8000/health" in serve
    # code and baked-in models belong to root: the service (UID 10001) cannot change them
    assert "COPY --from=build /opt/venv /opt/venv" in serve and "COPY --from=exports /exports /app/exports" in serve
    assert "--chown" not in serve
    build = dockerfile_stage("build")
    assert "onnxruntime-gpu[cuda,cudnn]" in build and "WITH_TORCH" in build
    # training dependencies stay out of the serving image (torch only behind WITH_TORCH)
    assert "[train]" not in build and "pip install" not in serve
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv/", "runs/", "data/", "**/__pycache__/"} <= set(ignored)


def test_the_dockerfile_cmd_starts_a_ready_server(tmp_path):
    serve = dockerfile_stage("serve")
    command = json.loads(re.search(r"^CMD (\[.*\])$", serve, re.M).group(1))
    env_line = re.search(r"^ENV (PATH=.*)$", serve, re.M).group(1)
    env = dict(pair.split("=", 1) for pair in env_line.split())
    assert command == ["python", "-m", "serving"] and env["DIGITSERVE_HOST"] == "0.0.0.0"
    # The image's environment, with the checkout's exports and a free port in place of the image's paths.
    env.update(DIGITSERVE_EXPORTS=str(ROOT / "exports"), DIGITSERVE_PORT=str(free_port()),
               PATH=f"{VENV_BIN}:{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{env['DIGITSERVE_PORT']}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            raise AssertionError("the Dockerfile's CMD did not give a ready server in 90 s")
        served = {m["name"] for m in httpx.get(url + "/models").json()["models"]}
        assert served == {folder.parent.name for folder in (ROOT / "exports").glob("*/model.json")}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)


def test_sigterm_during_a_burst_answers_every_accepted_request(tmp_path):
    copy_committed(tmp_path / "exports", "digits-cnn")
    server = ServerProcess(tmp_path / "exports", args=("--max-queue", "100"))  # drain, not admission, is tested
    server.wait_ready()
    body = {"pixels": [np.zeros((8, 8)).tolist()]}

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=80)) as c:
            tasks = [asyncio.create_task(c.post("/predict", json=body)) for _ in range(80)]
            while sum(t.done() for t in tasks) < 10:
                await asyncio.sleep(0.001)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            responses = await asyncio.gather(*tasks, return_exceptions=True)
            exit_code = await asyncio.to_thread(server.process.wait, 10)
            return responses, exit_code, time.monotonic() - signalled

    try:
        responses, exit_code, seconds = asyncio.run(burst())
    finally:
        server.stop()
    failures = [r for r in responses if isinstance(r, Exception) or r.status_code != 200]
    assert not failures, failures[:3]
    assert exit_code == 0 and seconds < 10


def test_ctrl_c_stops_the_whole_process_group_quietly(tmp_path):
    """A terminal's Ctrl-C sends SIGINT to every process of the group at once, LitServe's included."""
    copy_committed(tmp_path / "exports", "digits-cnn")
    with running_server(tmp_path / "exports") as server:
        os.killpg(server.process.pid, signal.SIGINT)
        exit_code = server.process.wait(15)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the children end on their own, not by the test's clean-up
            try:
                os.killpg(server.process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("processes of the server's group still running 10 s after it exited")
        output = server.output()
    assert exit_code == 0
    assert "Traceback" not in output and "died" not in output, output


def test_kubernetes_manifests_validate_and_wire_probes_ports_and_secret():
    result = subprocess.run([os.path.join(VENV_BIN, "kubernetes-validate"), "--strict",
                             *map(str, sorted((ROOT / "deploy" / "k8s").glob("*.yaml")))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    service = yaml.safe_load((ROOT / "deploy" / "k8s" / "service.yaml").read_text())
    assert deployment["spec"]["replicas"] >= 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])
    key = next(e for e in container["env"] if e["name"] == "DIGITSERVE_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "digitserve", "key": "api-key"}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_compose_reserves_a_gpu_and_mounts_exports():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["digitserve"]
    assert compose["ports"] == ["8000:8000"]
    assert "./exports:/app/exports:ro" in compose["volumes"]
    (device,) = compose["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_the_dockerfiles_python_lines_import_what_exists():
    """The image build runs `python -c 'from serving... import NAME'`: a module that moved broke the
    build only minutes into it (serving.routes, after the reshape of issue 22)."""
    imports = re.findall(r"from ([\w.]+) import (\w+)", (ROOT / "Dockerfile").read_text())
    assert imports
    for module, name in imports:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"
