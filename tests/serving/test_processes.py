"""The real server: LitServe's processes on a loopback port, its start-up checks and signals, and the one
place that touches LitServe's internals (serving/server.py's litserve_workarounds). Real servers on
loopback (`running_server`), and the command line as subprocesses; slow and greedy clients of a real
server: tests/serving/test_slow_clients.py."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import litserve
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import ROOT, ServerProcess, connections_by_process, running_server
from serving import connections
from serving import server as digitserve_server
from serving.config import Config
from serving.errors import StartupError
from serving.processes import alive
from serving.sockets import LISTEN, check_can_listen, socket_inodes, tcp_inodes
from tests.helpers import children, server_processes


@pytest.fixture(scope="module")
def server(exports):
    with running_server(exports, "--workers", "2") as process:
        yield process


def test_litserve_is_the_version_the_workarounds_were_checked_against():
    # pyproject pins it; moving the pin means re-reading serving/server.py against the new LitServe.
    assert litserve.__version__ == digitserve_server.LITSERVE_CHECKED


def test_uvicorn_is_the_version_the_connection_guards_were_checked_against():
    # pyproject pins 0.54.x; a wider pin must come with a re-read of serving/connections.py.
    assert uvicorn.__version__.split(".")[:2] == connections.UVICORN_CHECKED.split(".")[:2]


def test_our_routes_replace_the_litserve_ones_it_has_no_parameter_for(exports):
    litserver, _, _ = digitserve_server.build(Config(exports=exports))
    client = TestClient(litserver.app)  # no lifespan: LitServe's needs its worker processes
    assert client.get("/").text.startswith("<!doctype html>")  # LitServe's would say "litserve running"
    paths = client.get("/openapi.json").json()["paths"]
    assert paths["/predict"]["post"]["summary"].startswith("Classify")  # ours, not LitServe's queue path
    assert {"/health", "/ready", "/litserve/health", "/litserve/info"} <= set(paths)
    docs = client.get("/docs").text  # ours, from local files; FastAPI's loads Swagger UI from a CDN
    assert "/docs/assets/swagger-ui-bundle.js" in docs and "cdn" not in docs
    assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/redoc").status_code == 404
    assert client.get("/docs/assets/swagger-editor.js").status_code == 404  # only what /docs loads
    assert litserver.uvicorn_graceful_timeout == digitserve_server.GRACEFUL_SHUTDOWN_SECONDS
    # no GZip layer around every request: answers are small JSON
    assert "content-encoding" not in client.get("/openapi.json", headers={"Accept-Encoding": "gzip"}).headers
    with pytest.raises(RuntimeError, match="check litserve_workarounds"):
        digitserve_server.litserve_workarounds(litserver)  # the routes it removes are gone: it says so loudly


def test_litserve_worker_holds_no_model(server):
    processes = server_processes(server.process.pid, 2)
    assert len(processes["worker"]) == 1 and len(processes["http"]) == 2, processes
    maps = Path(f"/proc/{processes['worker'][0]}/maps").read_text()
    assert "onnxruntime" not in maps and "libtorch" not in maps


def test_each_http_process_listens_on_a_socket_of_its_own(server):
    """The kernel spreads new connections over the HTTP processes (SO_REUSEPORT). On one shared socket,
    uvloop's greedy accept put 31 of 32 connections opened together into one of two processes."""
    processes = server_processes(server.process.pid, 2)
    listening = tcp_inodes(LISTEN)
    own = [socket_inodes(pid) & listening for pid in processes["http"]]
    assert [len(sockets) for sockets in own] == [1, 1] and own[0] != own[1], own
    assert not socket_inodes(server.process.pid) & listening  # LitServe's bound socket never listens
    clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(64)]
    try:
        for client in clients:
            client.sendall(b"GET /health HTTP/1.1\r\nHost: digitserve\r\n\r\n")
        for client in clients:
            assert client.recv(4096).startswith(b"HTTP/1.1 200")  # accepted, by one process or the other
        held = connections_by_process(server.port)
        assert len(held) == 2 and min(held) >= 8, held  # a fair coin gives one of two 7 of 64 or fewer once in 10^10
    finally:
        for client in clients:
            client.close()
    with pytest.raises(StartupError):  # and a second server cannot join the group: the port is busy
        check_can_listen("127.0.0.1", server.port)


@pytest.mark.parametrize("role, expected", [
    ("worker", "recovers"),  # LitServe replaces its worker; requests never went through it
    ("http", 1),             # LitServe cannot replace an HTTP process: the server stops, its supervisor restarts it
    ("manager", 1),          # LitServe's queue manager: the same
    ("main", -9),            # the OOM killer's pick: its children must not live on as orphans
])
def test_killing_any_process_under_load_recovers_or_exits_within_10_s(exports, role, expected):
    with running_server(exports, "--workers", "2") as server:
        processes = server_processes(server.process.pid, 2)
        everyone = [pid for pids in processes.values() for pid in pids]
        body = {"pixels": [np.zeros((8, 8)).tolist()]}
        outcomes = []
        stop = threading.Event()

        def load():
            with httpx.Client(base_url=server.url, timeout=10) as client:
                while not stop.is_set():
                    try:
                        outcomes.append((time.monotonic(), client.post("/predict", json=body).status_code))
                    except httpx.TransportError:
                        outcomes.append((time.monotonic(), "transport"))
        threads = [threading.Thread(target=load) for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(1)
        os.kill(processes[role][0], signal.SIGKILL)
        killed = time.monotonic()
        if expected == "recovers":
            time.sleep(3)
            assert server.process.poll() is None
            assert httpx.get(server.url + "/ready").status_code == 200
        else:
            assert server.process.wait(10) == expected
        stop.set()
        for thread in threads:
            thread.join()
        if expected == "recovers":
            assert {status for _, status in outcomes} == {200}
        else:
            deadline = time.monotonic() + 10
            while any(alive(pid) for pid in everyone) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not [pid for pid in everyone if alive(pid)], "processes outlived the server"
        assert [status for at, status in outcomes if at < killed] and all(
            status == 200 for at, status in outcomes if at < killed - 0.1)


def test_torchscript_backend_serves_from_forked_http_processes(exports):
    with running_server(exports, "--backend", "torchscript", "--workers", "2", timeout=60) as process:
        body = {"model": "digits-cnn", "pixels": [np.zeros((8, 8)).tolist()]}
        for _ in range(6):  # new connections: both processes answer
            assert httpx.post(process.url + "/predict", json=body, timeout=30).status_code == 200


def test_metrics_sum_every_http_process(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        body = {"model": "digits-mlp", "pixels": [np.zeros((8, 8)).tolist()]}
        for _ in range(40):  # new connections: the kernel spreads them over both processes
            assert httpx.post(server.url + "/predict", json=body, timeout=30).status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    requests = [s for s in families["digitserve_http_requests"].samples
                if s.name.endswith("_total") and s.labels["route"] == "/predict" and s.labels["model"] == "digits-mlp"]
    assert sum(s.value for s in requests) == 40
    info = {s.labels["model"]: s.value for s in families["digitserve_model_info"].samples}
    assert info == {"digits-cnn": 1, "digits-mlp": 1}


@pytest.mark.parametrize("args, env, status, message", [
    (["--port", "80"], {}, 2, "argument --port: must be 1024..65535"),
    (["--host", "10.0.0.1"], {}, 2, "argument --host: invalid choice"),
    ([], {"DIGITSERVE_WORKERS": "0"}, 2, "DIGITSERVE_WORKERS=0: must be 1..256"),
    ([], {"DIGITSERVE_PORT": "http"}, 2, "DIGITSERVE_PORT=http: 'http' is not an integer"),
    ([], {"DIGITSERVE_DEVICE": "tpu"}, 2, "DIGITSERVE_DEVICE=tpu: choose from auto, cpu, cuda"),
    ([], {"DIGITSERVE_DATA_DIR": "/nonexistent"}, 2, "DIGITSERVE_DATA_DIR=/nonexistent: /nonexistent is not a folder"),
    (["--workers", "3"], {"DIGITSERVE_WORKERS": "0"}, 1, "does not exist"),  # the flag wins over the variable
    (["--exports", "missing"], {}, 1, "exports folder missing does not exist"),
    # beyond what the process may ever open, clients were reset rather than answered 503
    (["--max-connections", "100000000"], {}, 2, "needs 100000256 open files"),
    (["--max-header-count", "5"], {}, 2, "argument --max-header-count: must be 8..10000"),
])
def test_bad_settings_are_one_line_before_anything_starts(cli, tmp_path, args, env, status, message):
    exports = ["--exports", str(tmp_path / "missing")] if "--exports" not in args else []
    result = cli("serving", *exports, *args, env={**os.environ, **env}, cwd=tmp_path, timeout=60)
    assert result.returncode == status, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_busy_port_is_one_line_before_anything_is_announced(exports, cli):
    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", 0))
        other_server.listen()
        port = other_server.getsockname()[1]
        result = cli("serving", "--exports", str(exports), "--port", str(port), timeout=60)
    assert result.returncode == 1 and "at http://" not in result.stderr, result.stderr  # no "serving ... at"
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_no_usable_model_refuses_to_start(tmp_path, cli):
    (tmp_path / "exports" / "junk").mkdir(parents=True)
    result = cli("serving", "--exports", str(tmp_path / "exports"), timeout=60)
    assert result.returncode == 1 and "no usable model" in result.stderr and "junk: no model.json" in result.stderr


@pytest.mark.slow
def test_a_wheel_install_trains_exports_and_serves(tmp_path, cli):
    """Not editable, away from the checkout: the schema and the page must travel inside the package."""
    source, wheels, site = tmp_path / "source", tmp_path / "wheels", tmp_path / "site"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "export_contract", "serving", "training"):  # setuptools builds in place
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("digitserve-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the checkout's editable install
    where = subprocess.run([sys.executable, "-c", "import serving, training, export_contract as c; "
                            "print(serving.__file__, training.__file__, c.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True)
    assert where.stdout.count(str(site)) == 3, where.stdout + where.stderr
    trained = subprocess.run([sys.executable, "-m", "training", "digits", "--arch", "cnn", "--max-epochs", "2",
                              "--out", "runs", "--export-to", "exports"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    with running_server(tmp_path / "exports", env=env, cwd=tmp_path) as process:
        assert httpx.get(process.url + "/").text.startswith("<!doctype html>")
        body = {"pixels": [np.zeros((8, 8)).tolist()]}
        assert httpx.post(process.url + "/predict", json=body, timeout=30).json()["predictions"][0]["model"] == "digits-cnn"


def test_sigterm_under_keep_alive_load_cuts_no_request_off(exports):
    """Clients that reuse their connections, as load balancers do: on SIGTERM every request sent on
    a connection the server had kept alive is answered (the last with `Connection: close`);
    afterwards new connections are refused. A client that reconnects in the instant the listening
    socket closes can be reset from the kernel's accept queue (no server can answer those); such
    resets are counted apart: at most one per client and HTTP process (7 for 16 clients once in CI)."""
    server = ServerProcess(exports, args=("--workers", "2"))
    server.wait_ready()
    body = {"pixels": [np.zeros((8, 8)).tolist()]}
    statuses, cut_off, refused, at_the_door = [], [], [], []
    signalled = threading.Event()

    def client():
        with httpx.Client(base_url=server.url, timeout=10) as c:
            fresh = True  # the next request opens a new connection
            while server.process.poll() is None:
                try:
                    response = c.post("/predict", json=body)
                    statuses.append(response.status_code)
                    fresh = response.headers.get("connection", "").lower() == "close"
                except httpx.ConnectError:
                    refused.append(1)  # never accepted: the listening socket is closed
                    if signalled.is_set():
                        return
                except httpx.TransportError as err:
                    (at_the_door if fresh else cut_off).append(repr(err))
                    fresh = True
    threads = [threading.Thread(target=client) for _ in range(16)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        server.process.send_signal(signal.SIGTERM)
        signalled.set()
        exit_code = server.process.wait(10)
        for thread in threads:
            thread.join(10)
    finally:
        server.stop()
    assert exit_code == 0
    assert not cut_off, cut_off[:3]
    assert len(at_the_door) <= 2 * len(threads), at_the_door[:3]  # once per client and HTTP process at most
    assert len(statuses) > 100 and set(statuses) == {200}


EARLY_DEATH = """
import os, signal, threading, time
from serving.processes import HttpProcesses
processes = HttpProcesses(2, 0, None, lambda: [], "http://test")
processes.supervise(16)

def http_process(registers_after, dies_after):  # as listen_apart raising in the lifespan, once registered
    pid = os.fork()
    if pid == 0:
        time.sleep(registers_after)
        with processes.pids.get_lock():
            processes.pids[list(processes.pids).index(0)] = os.getpid()
        time.sleep(dies_after)
        os._exit(3)
    return pid
children = [http_process(0.1, 0), http_process(1.0, 0.5)]
try:
    threading.Event().wait(15)  # LitServe's main thread waits on its shutdown event
    print("still waiting")
except KeyboardInterrupt:
    print("stopped", processes.failed.is_set())
for pid in children:
    os.waitpid(pid, 0)
"""


def test_an_http_process_dying_before_the_others_are_up_still_stops_the_server():
    """The stop a dead HTTP process asks for waits until every HTTP process is up; the watch used to
    give up after asking, and the server waited forever."""
    result = subprocess.run([sys.executable, "-c", EARLY_DEATH], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["stopped", "True"], result.stdout + result.stderr


def test_a_stop_during_start_up_is_delivered_once_the_server_is_up():
    """SIGTERM right after the start-up line, while LitServe is still forking its processes."""
    server = ServerProcess(ROOT / "exports")
    try:
        deadline = time.monotonic() + 30
        while "starting" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.01)
        everyone = [server.process.pid, *children(server.process.pid)]
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(20) == 0
        time.sleep(0.5)
        assert not [pid for pid in everyone if alive(pid)]
        assert "Traceback" not in server.output(), server.output()
    finally:
        server.stop()
