"""Publishing models to a real server on loopback under load (≥ 32 connections for the whole test): a retrained
version is served by every HTTP process within 10 s of its rename, tampered versions are rejected
while the previous keeps answering, a removed model turns 404, and no other request fails. In-process
details: tests/serving/test_lifecycle.py."""
import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import ServerProcess, copy_committed, running_server
from export_contract.publish import publish
from tests.helpers import claim_fewer_errors, flip_last_byte, tampered

CONNECTIONS = 32
INTERVAL = 2.0  # --reload-interval for these tests (the default is 5 s)
PIXELS = [np.zeros((8, 8)).tolist()]


class Load:
    """CONNECTIONS clients posting back to back, half to the model being changed (digits-mlp), half to
    one left alone (digits-cnn); every answer recorded as (time, model, status, version or error)."""

    def __init__(self, url: str):
        self.url, self.records, self.stopping = url, [], threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self.run()), daemon=True)

    async def run(self):
        limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits) as client:
            async def client_loop(i):
                model = "digits-mlp" if i % 2 == 0 else "digits-cnn"
                while not self.stopping.is_set():
                    try:
                        response = await client.post("/predict", json={"model": model, "pixels": PIXELS})
                        body = response.json()
                        outcome = body["predictions"][0]["version"] if response.status_code == 200 else body["error"]
                        self.records.append((time.monotonic(), model, response.status_code, outcome))
                    except (httpx.HTTPError, ValueError) as err:
                        self.records.append((time.monotonic(), model, None, repr(err)))
            await asyncio.gather(*(client_loop(i) for i in range(CONNECTIONS)))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(30)

    def since(self, start: float, model: str) -> list[tuple]:
        return [r for r in self.records if r[0] >= start and r[1] == model]

    def wait_for(self, start: float, model: str, accept, timeout: float) -> float:
        """Seconds after `start` from which every answer for `model` satisfies `accept` (for at least
        a second); fails after `timeout`."""
        deadline = start + timeout
        while time.monotonic() < deadline + 1:
            records = self.since(start, model)
            bad = [r for r in records if not accept(r)]
            settled = bad[-1][0] if bad else start
            if time.monotonic() - settled >= 1 and records and records[-1][0] > settled:
                assert settled - start <= timeout, f"{model}: still {bad[-1]} {settled - start:.1f} s after the change"
                return settled - start
            time.sleep(0.2)
        raise AssertionError(f"{model}: not settled {timeout} s after the change; last: {self.since(start, model)[-3:]}")


def version_of(folder: Path) -> str:
    return json.loads((folder / "model.json").read_text())["version"]


def history(server: ServerProcess, name: str) -> list[dict]:
    return httpx.get(f"{server.url}/models/{name}", timeout=10).json()["history"]


def test_publishing_under_load_fails_no_request(tmp_path, retrained):
    exports = tmp_path / "exports"
    copy_committed(exports, "digits-cnn", "digits-mlp")
    committed = tmp_path / "committed"
    copy_committed(committed, "digits-mlp")
    old, new = version_of(exports / "digits-mlp"), version_of(retrained)
    with running_server(exports, "--reload-interval", str(INTERVAL)) as server:
        with Load(server.url) as load:
            time.sleep(1)
            assert {r[3] for r in load.since(0, "digits-mlp")} == {old}
            # A retrained version, renamed into place: every process serves it within 10 s.
            published = time.monotonic()
            publish(retrained, exports, replace=True)
            load.wait_for(published, "digits-mlp", lambda r: r[3] == new, timeout=10)
            # Tampered versions of the committed model (its version string: serving one would show):
            # rejected, the retrained version keeps answering, the rejection is visible.
            for number, (change, reason) in enumerate([(flip_last_byte, "does not match the sha256"),
                                                       (claim_fewer_errors, "its manifest claims")]):
                changed = time.monotonic()
                publish(tampered(committed / "digits-mlp", tmp_path / f"tampered-{number}", change), exports, replace=True)
                while not any(e["event"] == "rejected" and reason in e["reason"] for e in history(server, "digits-mlp")):
                    assert time.monotonic() < changed + 3 * INTERVAL, history(server, "digits-mlp")
                    time.sleep(0.2)
                time.sleep(INTERVAL)  # every process has looked by now
                assert {r[3] for r in load.since(changed, "digits-mlp")} == {new}
                detail = httpx.get(f"{server.url}/models/digits-mlp", timeout=10).json()
                assert detail["version"] == new and detail["status"] == "ready"
            rejections = [s.value for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
                          for s in f.samples if s.name == "digitserve_model_reloads_total"
                          and s.labels == {"model": "digits-mlp", "event": "rejected"}]
            assert rejections == [4.0]  # two versions, each in both processes
            # Removed (renamed away, as a deletion that is not half done): 404 once every process has looked.
            removed = time.monotonic()
            (exports / "digits-mlp").rename(exports / ".digits-mlp.removed")
            load.wait_for(removed, "digits-mlp", lambda r: r[2] == 404, timeout=3 * INTERVAL)
        records = load.records
    failed = [r for r in records if r[2] != 200 and not (r[1] == "digits-mlp" and r[2] == 404 and r[0] >= removed)]
    assert not failed, failed[:5]
    other = [r for r in records if r[1] == "digits-cnn"]
    assert len(other) > 100 and {r[3] for r in other} == {version_of(exports / "digits-cnn")}


def answers_from_every_process(server: ServerProcess, version: str, timeout: float = 5) -> None:
    """Fresh connections (spread over the HTTP processes by the kernel) all answer `version`."""
    deadline = time.monotonic() + timeout
    while True:
        versions = {httpx.post(f"{server.url}/predict", json={"model": "digits-mlp", "pixels": PIXELS},
                               timeout=10).json()["predictions"][0]["version"] for _ in range(24)}
        if versions == {version}:
            return
        assert time.monotonic() < deadline, versions
        time.sleep(0.2)


def every_process_started(server: ServerProcess, processes: int, timeout: float = 60) -> None:
    """/ready answers once one HTTP process is up; on a busy machine the others may still be loading
    (and would then see a model published meanwhile without being asked). The server says when all are."""
    deadline = time.monotonic() + timeout
    while f"({processes} HTTP processes)" not in server.output():
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.2)
    time.sleep(1)  # each one's last look at start-up


def test_reload_route_and_sighup_reach_every_http_process(tmp_path, retrained):
    exports = tmp_path / "exports"
    copy_committed(exports, "digits-mlp")
    committed = tmp_path / "committed"
    copy_committed(committed, "digits-mlp")
    server = ServerProcess(exports, args=("--reload-interval", "0", "--workers", "3"))  # no polling
    try:
        server.wait_ready()
        every_process_started(server, 3)
        publish(retrained, exports, replace=True)
        time.sleep(1)
        answers_from_every_process(server, version_of(committed / "digits-mlp"), timeout=0)  # nothing polls
        changes = httpx.post(f"{server.url}/models/reload", timeout=30).json()["changes"]
        assert [(c["event"], c["version"]) for c in changes] == [("served", version_of(retrained))]
        answers_from_every_process(server, version_of(retrained))
        publish(committed / "digits-mlp", exports, replace=True)
        server.process.send_signal(signal.SIGHUP)
        answers_from_every_process(server, version_of(committed / "digits-mlp"))
        assert server.process.poll() is None  # SIGHUP reloads, it does not end anything
    finally:
        assert server.stop() == 0
