"""The serving images, built and run (`make image-test`; pytest -m container, never part of `make test`).

For each variant in DIGITSERVE_IMAGE_VARIANTS ("cpu gpu"): builds the image the way `make image` does
where there is no Docker engine (buildah through ../shared/container/make-base.sh, with --layers so
an unchanged image rebuilds from cache), then runs it with buildah's chroot isolation on the host
network (podman's OCI runtime does not work on these VMs) and checks what a user of the image gets:
readiness, a prediction from every model in exports/, /metrics, the UID, that the service cannot
write its code or its models, that exports mounted read-only from the host are served, and SIGTERM.

Chroot isolation has no PID namespace, so `python -m serving` is not PID 1 here as it is under
Docker: the tests signal the server's main process (the one the image's CMD starts) instead, which is
what `docker stop` does to PID 1. A unique variable in the container's environment marks every
process of one run, so that /proc shows which processes it left behind.
"""
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from bench.harness import ROOT, free_port

pytestmark = [pytest.mark.container, pytest.mark.timeout(1500)]  # an uncached build takes minutes

VARIANTS = os.environ.get("DIGITSERVE_IMAGE_VARIANTS", "cpu gpu").split()
IMAGE = os.environ.get("DIGITSERVE_IMAGE", "digitserve")
MAKE_BASE = Path(os.environ.get("DIGITSERVE_MAKE_BASE", ROOT.parent / "shared" / "container" / "make-base.sh"))
# make-base.sh's containers.conf (no default ulimits: this VM refuses to raise them)
BUILDAH_ENV = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF",
                                                                "/etc/containers/digitserve-build.conf")}
APP_UID = 10001
# What the image's own layers may add to its base: the targets (CPU image <= 400 MB, GPU image
# <= 2.5 GB) less an allowance of 150 MB for the official python:3.11-slim-bookworm, whose size cannot
# be measured here (no registry). The stand-in base make-base.sh builds is Debian's minbase with its
# apt cache, 272 MB, so the totals measured here are larger than a user's.
ADDED_BYTES = {"cpu": 250e6, "gpu": 2.35e9}
# buildah 1.28's chroot runner now and then fails to seal the memfd copy of itself it executes (EBUSY)
# before it starts anything in the container: such a run is tried again.
BUILDAH_FLAKE = "sealing memfd copy"
SAMPLES = {(1, 8, 8): "digit-8x8-6.png", (3, 32, 32): "house-number-32x32-6.png"}  # both a 6


def buildah(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["buildah", *args], env=BUILDAH_ENV, capture_output=True, text=True, check=True, **kwargs)


def committed_models() -> dict[str, dict]:
    """The manifests of the models the image bakes in: whatever exports/ holds."""
    return {folder.name: json.loads((folder / "model.json").read_text())
            for folder in sorted((ROOT / "exports").iterdir()) if (folder / "model.json").is_file()}


@pytest.fixture(scope="module", params=VARIANTS)
def image(request) -> str:
    if os.geteuid() != 0 or not MAKE_BASE.is_file():
        pytest.skip(f"builds with buildah through {MAKE_BASE}, as root")
    tag = f"{IMAGE}:{'cpu' if request.param == 'cpu' else 'latest'}"
    started = time.monotonic()
    # The command `make image` runs where there is no Docker engine.
    mirrors = [arg for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST") if os.environ.get(name)
               for arg in ("--build-arg", f"{name}={os.environ[name]}")]
    build = subprocess.run([str(MAKE_BASE), "build", "--layers", "-t", tag, "--build-arg", f"DEVICE={request.param}",
                            *mirrors], cwd=ROOT, env=BUILDAH_ENV, capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    print(f"\n{tag}: built in {time.monotonic() - started:.0f} s")
    return tag


class Container:
    """A working container of the image; `start` runs the image's CMD in it, `run` a command to completion."""

    def __init__(self, image: str, volumes: tuple[str, ...] = ()):
        self.image = image
        self.name = buildah("from", image).stdout.strip()
        self.volumes = [arg for volume in volumes for arg in ("--volume", volume)]
        self.marker = f"IMAGE_TEST_RUN={uuid.uuid4().hex}"
        self.process: subprocess.Popen | None = None
        self.log = None

    def command(self, env: dict, argv: list[str]) -> list[str]:
        environment = [arg for item in [self.marker, *(f"{k}={v}" for k, v in env.items())] for arg in ("--env", item)]
        return ["buildah", "run", "--isolation", "chroot", "--network", "host", *environment, *self.volumes, self.name,
                "--", *argv]

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        for _ in range(3):
            result = subprocess.run(self.command({}, list(argv)), env=BUILDAH_ENV, capture_output=True, text=True,
                                    timeout=120)
            if BUILDAH_FLAKE not in result.stderr:
                break
        return result

    def start(self) -> str:
        """The image's CMD with its environment (the port moved to a free one: the network is the host's)."""
        config = json.loads(buildah("inspect", "--type", "image", self.image).stdout)["Docker"]["config"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"digitserve-container-{self.port}.log"
        log.write_text("")
        self.log = open(log, "a+")  # appending: reading it meanwhile moves no write offset

        def spawn() -> subprocess.Popen:
            return subprocess.Popen(self.command({"DIGITSERVE_PORT": self.port}, config["Cmd"]), env=BUILDAH_ENV,
                                    stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

        started, retries = time.monotonic(), 0
        self.process = spawn()
        while time.monotonic() < started + 180:
            if self.process.poll() is not None and self.output().count(BUILDAH_FLAKE) > retries and retries < 2:
                retries += 1
                self.process = spawn()
                continue
            assert self.process.poll() is None, f"the container exited {self.process.returncode}: {self.output()}"
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    print(f"\n{self.image}: ready {time.monotonic() - started:.1f} s after start")
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"not ready in 180 s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def processes(self) -> dict[int, dict]:
        """This run's processes (those whose environment holds the marker): pid -> ppid, uids, cmdline."""
        found = {}
        for entry in Path("/proc").iterdir():
            try:
                if not entry.name.isdigit() or self.marker.encode() not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                status = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines())
                found[int(entry.name)] = {"ppid": int(status["PPid"]), "uids": status["Uid"].split(),
                                          "cmdline": (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()}
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue  # exited while we looked
        return found

    def main_process(self) -> int:
        """The process the CMD started (buildah's chroot-exec helper is its parent): PID 1 under Docker."""
        servers = {pid: info for pid, info in self.processes().items() if "-m serving" in info["cmdline"]}
        roots = [pid for pid, info in servers.items() if info["ppid"] not in servers]
        assert len(roots) == 1, servers
        return roots[0]

    def remove(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in self.processes():  # anything a failed test left
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.log:
            self.log.close()
        subprocess.run(["buildah", "rm", self.name], env=BUILDAH_ENV, capture_output=True)


@pytest.fixture
def container(image):
    made = []

    def make(volumes: tuple[str, ...] = ()) -> Container:
        made.append(Container(image, volumes))
        return made[-1]

    yield make
    for c in made:
        c.remove()


def predict(url: str, model: str, input_shape: list) -> dict:
    sample = SAMPLES[tuple(input_shape[1:])]
    with open(ROOT / "samples" / sample, "rb") as f:
        response = httpx.post(url + "/predict", params={"model": model}, files={"file": (sample, f, "image/png")},
                              timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]


def test_the_image_is_lean(image, container):
    """No compilers, pip, setuptools, caches, tests, torch or scipy; NVIDIA libraries only in the GPU image;
    the image's own layers within their budget."""
    variant = "cpu" if image.endswith(":cpu") else "gpu"
    c = container()
    script = r"""
import importlib.util, json, os, shutil, sysconfig
sp = sysconfig.get_paths()["purelib"]
print(json.dumps({
    "tools": [t for t in ("gcc", "cc", "g++", "c++", "make", "ld", "pip", "pip3") if shutil.which(t)],
    "modules": [m for m in ("pip", "setuptools", "torch", "scipy", "training", "sympy") if importlib.util.find_spec(m)],
    "tests": [os.path.join(d, n) for d, ds, _ in os.walk(sp) for n in ds if n == "tests"],
    "caches": [p for p in ("/root/.cache", "/home/app/.cache", "/tmp/pip") if os.path.exists(p)],
    "torchscript": [os.path.join(d, f) for d, _, fs in os.walk("/app/exports") for f in fs if f == "model.ts"],
    "nvidia": os.path.isdir(os.path.join(sp, "nvidia")),
    "providers": __import__("onnxruntime").get_available_providers(),
}))
"""
    found = json.loads(c.run("python", "-c", script).stdout)
    assert found["tools"] == [] and found["modules"] == [] and found["tests"] == [] and found["caches"] == [], found
    assert found["torchscript"] == []  # no torch in the image: the TorchScript artifacts stay out too
    assert found["nvidia"] == (variant == "gpu")
    assert ("CUDAExecutionProvider" in found["providers"]) == (variant == "gpu")
    sizes = json.loads(subprocess.run(["podman", "image", "inspect", image, "localhost/python:3.11-slim-bookworm"],
                                      env=BUILDAH_ENV, capture_output=True, text=True, check=True).stdout)
    added = sizes[0]["Size"] - sizes[1]["Size"]
    print(f"\n{image}: {sizes[0]['Size'] / 1e6:.0f} MB, {added / 1e6:.0f} MB on top of its base")
    assert added <= ADDED_BYTES[variant]


def test_serves_every_committed_model_as_uid_10001_and_exits_0_on_sigterm(image, container):
    c = container()
    url = c.start()
    models = committed_models()
    served = {m["name"]: m for m in httpx.get(url + "/models", timeout=10).json()["models"]}
    assert set(served) == set(models)
    for name, manifest in models.items():
        assert served[name]["version"] == manifest["version"] and served[name]["device"] == "cpu"
        answer = predict(url, name, manifest["input"]["shape"])
        assert (answer["model"], answer["version"], answer["label"]) == (name, manifest["version"], 6)
    metrics = httpx.get(url + "/metrics", timeout=10)
    assert metrics.status_code == 200
    for name, manifest in models.items():
        assert f'digitserve_images_total{{model="{name}",version="{manifest["version"]}"}} 1.0' in metrics.text
    # /docs still has the Swagger UI files it serves (the image keeps only those)
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"):
        assert httpx.get(f"{url}/docs/assets/{asset}", timeout=10).status_code == 200

    processes = c.processes()
    servers = {pid: p for pid, p in processes.items() if "-m serving" in p["cmdline"]}
    assert len(servers) >= 3  # the main process, its HTTP processes and the LitServe worker
    assert all(p["uids"] == [str(APP_UID)] * 4 for p in processes.values()), processes
    # No alarming start-up lines on a host without a GPU, from the GPU image either.
    log = c.output()
    for alarming in (" ERROR ", "[E:onnxruntime", "Failed to create CUDAExecutionProvider", "libcuda", "Traceback"):
        assert alarming not in log, log

    signalled = time.monotonic()
    os.kill(c.main_process(), signal.SIGTERM)
    assert c.process.wait(10) == 0, c.output()
    print(f"\n{image}: exited 0 {time.monotonic() - signalled:.1f} s after SIGTERM")
    assert c.processes() == {}, "processes left behind"


def test_the_service_cannot_write_its_code_or_its_models(image, container):
    c = container()
    script = """
import json, os, sysconfig, serving
sp = sysconfig.get_paths()["purelib"]
attempts = {
    "append to serving/__init__.py": lambda: open(serving.__file__, "a"),
    "create in serving/": lambda: open(os.path.join(os.path.dirname(serving.__file__), "x.py"), "w"),
    "create in site-packages": lambda: open(os.path.join(sp, "x.pth"), "w"),
    "create in /opt/venv/bin": lambda: open("/opt/venv/bin/x", "w"),
    "replace /opt/venv/bin/python": lambda: os.replace("/opt/venv/bin/python3", "/opt/venv/bin/python"),
    "create in /app": lambda: open("/app/x", "w"),
    "append to a baked-in model": lambda: open(next(os.scandir("/app/exports")).path + "/model.onnx", "a"),
    "create in /app/exports": lambda: os.mkdir("/app/exports/x"),
}
denied = {}
for what, attempt in attempts.items():
    try:
        attempt()
        denied[what] = False
    except PermissionError:
        denied[what] = True
print(json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "denied": denied}))
"""
    result = c.run("python", "-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(result.stdout)
    assert found["uid"] == found["euid"] == APP_UID
    assert all(found["denied"].values()), found["denied"]
    assert c.run("id", "-u").stdout.strip() == str(APP_UID)


def test_serves_exports_mounted_read_only_from_the_host(image, container, retrained, tmp_path):
    """A model the user has just trained, in a host folder mounted read-only over the baked-in exports."""
    exports = tmp_path / "exports"
    shutil.copytree(retrained, exports / retrained.name)
    for path in [exports, *exports.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # pytest's folders are private to their owner
    manifest = json.loads((retrained / "model.json").read_text())
    assert manifest["version"] != committed_models().get(retrained.name, {}).get("version")

    c = container(volumes=(f"{exports}:/app/exports:ro",))
    probe = c.run("python", "-c", "import os\ntry:\n    os.mkdir('/app/exports/x')\nexcept OSError as e:\n"
                                  "    print(e.errno)")
    assert probe.stdout.strip() == "30", probe  # EROFS: the mount, not only the ownership, refuses writes
    url = c.start()
    served = httpx.get(url + "/models", timeout=10).json()["models"]
    assert [(m["name"], m["version"]) for m in served] == [(retrained.name, manifest["version"])]
    answer = predict(url, retrained.name, manifest["input"]["shape"])
    assert (answer["model"], answer["version"]) == (retrained.name, manifest["version"])
    os.kill(c.main_process(), signal.SIGTERM)
    assert c.process.wait(10) == 0, c.output()
    assert c.processes() == {}
