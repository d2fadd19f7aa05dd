"""deploy/compose.yaml: the service with its prediction log, and the `monitoring` profile's Prometheus and
Grafana, wired to each other and to files that exist. There is no Docker engine on the development VMs,
so nothing here starts a container: the files are read, and every path, port, name and flag one of them
gives another is checked against it (the service's flags by its own parser)."""
import json
import re
import shlex
from pathlib import Path

import yaml

from bench.harness import ROOT
from serving.config import parse

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
PROMETHEUS_PORT = 9090  # Prometheus' default --web.listen-address
GRAFANA_PORT = 3000


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolated(text: str) -> str:
    """Compose's ${NAME:-default} with nothing set: the default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source (a path relative to deploy/, or a named volume) of a service's volumes."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        out[target] = source
    return out


def bind_source(source: str) -> Path:
    return (DEPLOY / source).resolve()


def mounted_file(service: dict, container_path: str) -> Path:
    """The repository file a service sees at `container_path` (through a file or a folder mount)."""
    for target, source in sorted(mounts(service).items(), key=lambda item: -len(item[0])):
        if source.startswith(".") and (container_path == target or container_path.startswith(target + "/")):
            return bind_source(source) / container_path[len(target):].lstrip("/")
    raise AssertionError(f"{container_path} is not mounted from the repository")


def serve_stage() -> str:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return next(stage for stage in re.split(r"^FROM ", text, flags=re.M) if re.match(r"\S+ AS serve\b", stage))


def test_every_mount_names_a_file_in_the_repository_or_a_declared_volume():
    spec = compose()
    used = set()
    for name, service in spec["services"].items():
        for target, source in mounts(service).items():
            if source.startswith("."):
                assert bind_source(source).exists(), f"{name}: {source} does not exist"
                assert bind_source(source).is_relative_to(ROOT), f"{name}: {source} is outside the repository"
            else:
                assert source in spec["volumes"], f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == set(spec["volumes"])


def test_monitoring_is_a_profile_beside_the_service_from_the_dockerfile():
    services = compose()["services"]
    assert set(services) == {"digitserve", "prometheus", "grafana"}
    assert "profiles" not in services["digitserve"]  # `up` alone starts the service
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]
    build = services["digitserve"]["build"]
    assert (bind_source(build["context"]) / "Dockerfile").is_file() and bind_source(build["context"]) == ROOT
    assert interpolated(build["args"]["DEVICE"]) in ("cpu", "gpu")
    # Official images, pinned to a release.
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", services["prometheus"]["image"])
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", services["grafana"]["image"])
    assert "./exports:/app/exports:ro" in yaml.safe_load((ROOT / "compose.yaml").read_text())["services"][
        "digitserve"]["volumes"] and "../exports:/app/exports:ro" in services["digitserve"]["volumes"]


def test_the_service_keeps_its_prediction_log_on_a_volume_its_user_can_write():
    service = compose()["services"]["digitserve"]
    stage = serve_stage()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", stage, re.M).group(1))
    command = service["command"]
    assert command[:len(cmd)] == cmd  # the image's CMD, with flags added
    config = parse(command[len(cmd):], environ={})
    assert config.prediction_log is not None
    # The image's user and its home: the only folder of the image that user owns. A named volume
    # mounted on a folder of the image starts as a copy of it, owner included; elsewhere, root's.
    uid = re.search(r"^USER (\d+)$", stage, re.M).group(1)
    useradd = shlex.split(re.search(r"^RUN (useradd .*)$", stage, re.M).group(1))
    assert useradd[useradd.index("--uid") + 1] == uid and "--create-home" in useradd
    home = f"/home/{useradd[-1]}"
    assert mounts(service)[home] in compose()["volumes"]
    assert config.prediction_log.is_relative_to(home)
    port = int(re.search(r"DIGITSERVE_PORT=(\d+)", stage).group(1))
    assert f"{port}:{port}" in service["ports"]


def test_prometheus_scrapes_the_service_and_loads_the_alert_rules():
    spec = compose()
    prometheus = spec["services"]["prometheus"]
    flags = dict(arg.split("=", 1) for arg in prometheus["command"])
    config_file = mounted_file(prometheus, flags["--config.file"])
    assert config_file == DEPLOY / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_file.read_text())
    for rules in config["rule_files"]:  # relative to the config file, inside the container
        in_container = str(Path(flags["--config.file"]).parent / rules)
        assert mounted_file(prometheus, in_container).is_file(), rules
    assert mounts(prometheus)[flags["--storage.tsdb.path"]] in spec["volumes"]
    (job,) = config["scrape_configs"]
    (static,) = job["static_configs"]
    (target,) = static["targets"]
    host, port = target.split(":")
    assert host == "digitserve" and f"{port}:{port}" in spec["services"]["digitserve"]["ports"]
    assert job["metrics_path"] == "/metrics"
    assert f"{PROMETHEUS_PORT}:{PROMETHEUS_PORT}" in prometheus["ports"]


def test_grafana_is_provisioned_with_the_prometheus_datasource_and_the_dashboard():
    spec = compose()
    grafana = spec["services"]["grafana"]
    provisioning = mounted_file(grafana, "/etc/grafana/provisioning")  # Grafana's default paths.provisioning
    assert mounts(grafana)["/var/lib/grafana"] in spec["volumes"]
    (datasources,) = [yaml.safe_load(f.read_text()) for f in (provisioning / "datasources").glob("*.yaml")]
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == f"http://prometheus:{PROMETHEUS_PORT}"
    # $__rate_interval is four scrapes only if Grafana knows the scrape interval.
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape
    (dashboards,) = [yaml.safe_load(f.read_text()) for f in (provisioning / "dashboards").glob("*.yaml")]
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file"
    folder = mounted_file(grafana, provider["options"]["path"])
    assert folder == DEPLOY / "grafana" / "dashboards"
    boards = [json.loads(f.read_text()) for f in folder.glob("*.json")]
    assert [b["uid"] for b in boards] == ["digitserve"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounted_file(grafana, home).is_file()
    # The dashboard's data-source variable offers this kind of source.
    (variable,) = [v for v in boards[0]["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == source["type"]
    assert f"{GRAFANA_PORT}:{GRAFANA_PORT}" in grafana["ports"]
    assert interpolated(grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"])  # never empty
