"""Scale-out manifests: the HorizontalPodAutoscaler and PodDisruptionBudget wired to the Deployment in
deploy/k8s, the request-rate alternative kept in hpa.yaml's comments, and the KServe InferenceService
in deploy/kserve. kubernetes-validate has no schema for KServe's CRD (no Python package ships it), so
the InferenceService is checked structurally and its pod fields validated strictly as a core/v1 Pod.
(tests/deploy/test_deployment.py validates every deploy/k8s manifest strictly.) The files are read and
validated here; nothing runs in a cluster."""
import os
import re
import subprocess
import sys

import yaml
from prometheus_client import generate_latest

from bench.harness import ROOT
from serving.api import v2
from serving.metrics import Metrics

K8S = ROOT / "deploy" / "k8s"
VALIDATE = os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")
# The predictor's own fields (ComponentExtensionSpec); the rest of it is a core/v1 PodSpec.
KSERVE_PREDICTOR_FIELDS = {"minReplicas", "maxReplicas"}
# What Knative (KServe's Knative mode) accepts without feature flags (knative/serving's fieldmask.go).
KNATIVE_POD_FIELDS = {"containers", "serviceAccountName", "volumes", "imagePullSecrets", "enableServiceLinks",
                      "automountServiceAccountToken"}
KNATIVE_CONTAINER_FIELDS = {"name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy",
                            "livenessProbe", "ports", "readinessProbe", "resources", "securityContext", "startupProbe",
                            "terminationMessagePath", "terminationMessagePolicy", "volumeMounts"}


def load(path):
    return yaml.safe_load(path.read_text())


def deployment():
    return load(K8S / "deployment.yaml")


def container_of(pod_spec: dict) -> dict:
    (container,) = pod_spec["containers"]
    return container


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def startup_seconds(container: dict) -> int:
    probe = container["startupProbe"]
    return probe["periodSeconds"] * probe["failureThreshold"]


def validate_strictly(tmp_path, document: dict) -> None:
    path = tmp_path / f"{document['kind'].lower()}.yaml"
    path.write_text(yaml.safe_dump(document))
    result = subprocess.run([VALIDATE, "--strict", str(path)], capture_output=True, text=True)
    # An unknown kind is only a warning with exit status 0: insist that a schema was applied.
    assert result.returncode == 0 and "passed for resource" in result.stdout, result.stdout + result.stderr


def commented_block(text: str, head: str):
    """The YAML commented out in `text` from the comment line that starts with `head` (after its `#`)
    down to the last line indented deeper than that one, uncommented."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.lstrip().startswith("#") and line.lstrip("# ").startswith(head))
    prefix = lines[start][:lines[start].index(head)]
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith(prefix + " "):
            break
        block.append(line)
    return yaml.safe_load("\n".join(line[len(prefix):] for line in block))


def test_hpa_scales_the_deployment_on_cpu_from_its_replica_count():
    hpa, dep = load(K8S / "hpa.yaml"), deployment()
    assert (hpa["apiVersion"], hpa["kind"]) == ("autoscaling/v2", "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": dep["apiVersion"], "kind": dep["kind"],
                                             "name": dep["metadata"]["name"]}
    spec = hpa["spec"]
    # Two at least, so that a drain (pdb.yaml) leaves one serving; the Deployment starts at that floor.
    assert 2 <= spec["minReplicas"] == dep["spec"]["replicas"] < spec["maxReplicas"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    target = metric["resource"]["target"]
    assert target["type"] == "Utilization" and 0 < target["averageUtilization"] < 100
    # Utilization is relative to the request, so the pod must request CPU.
    container = container_of(dep["spec"]["template"]["spec"])
    assert "cpu" in container["resources"]["requests"]
    # Capacity goes back no faster than a replacement pod could start.
    scale_down = spec["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= startup_seconds(container)
    assert all(p["periodSeconds"] >= startup_seconds(container) for p in scale_down["policies"])


def test_pdb_lets_a_drain_take_one_pod_while_the_others_serve():
    pdb, dep, hpa = load(K8S / "pdb.yaml"), deployment(), load(K8S / "hpa.yaml")
    assert (pdb["apiVersion"], pdb["kind"]) == ("policy/v1", "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == {"matchLabels": dep["spec"]["selector"]["matchLabels"]}
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    floor = hpa["spec"]["minReplicas"]
    (budget,) = {"minAvailable", "maxUnavailable"} & set(pdb["spec"])
    assert isinstance(pdb["spec"][budget], int)  # a percentage would round with the replica count
    evictable = pdb["spec"]["maxUnavailable"] if budget == "maxUnavailable" else floor - pdb["spec"]["minAvailable"]
    # At the HPA's floor a drain can still evict (else it blocks) and at least one pod keeps serving.
    assert 1 <= evictable < floor


def test_the_request_rate_alternative_in_hpa_yaml_validates_and_reads_the_served_counter(tmp_path):
    text = (K8S / "hpa.yaml").read_text()
    metric = commented_block(text, "- type: Pods")
    (rule,) = commented_block(text, "- seriesQuery:")
    hpa = yaml.safe_load(text)
    hpa["spec"]["metrics"] = metric
    validate_strictly(tmp_path, hpa)
    # The adapter's rule turns the counter the server exposes into the metric the HPA asks for.
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    name = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
    assert name == metric[0]["pods"]["metric"]["name"]
    metrics = Metrics(["digits-cnn"])
    metrics.record_request("digits-cnn", "/predict", "POST", 200, 0.01)
    assert f"\n{series}{{" in generate_latest(metrics.registry).decode()
    assert {"namespace", "pod"} == set(rule["resources"]["overrides"])
    # It counts inference, not the kubelet's probes or Prometheus' scrapes.
    excluded = re.search(r'route!~"([^"]+)"', rule["metricsQuery"]).group(1)
    container = container_of(deployment()["spec"]["template"]["spec"])
    probes = {container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert all(re.fullmatch(excluded, route) for route in probes | {"/metrics"})
    assert not any(re.fullmatch(excluded, route) for route in ("/predict", "/v2/models/{name}/infer"))


def test_the_kserve_inferenceservice_runs_the_same_server_as_a_v2_custom_predictor(tmp_path):
    isvc = load(ROOT / "deploy" / "kserve" / "inferenceservice.yaml")
    dep, hpa = deployment(), load(K8S / "hpa.yaml")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert set(isvc["spec"]) == {"predictor"}
    # KServe copies the InferenceService's labels onto its pods: they must stay out of deploy/k8s's
    # Service and PodDisruptionBudget.
    assert not dep["spec"]["selector"]["matchLabels"].items() <= isvc["metadata"].get("labels", {}).items()
    predictor = isvc["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (hpa["spec"]["minReplicas"],
                                                                      hpa["spec"]["maxReplicas"])
    container, served = container_of(predictor), container_of(dep["spec"]["template"]["spec"])
    assert container["name"] == "kserve-container" and container["image"] == served["image"]
    env = env_of(container)
    # A custom predictor declares its protocol in PROTOCOL; otherwise the Deployment's settings and key.
    assert env.pop("PROTOCOL") == "v2"
    assert env == env_of(served)
    # KServe routes to the first declared port (Knative: named http1 or h2c), where the server listens.
    assert container["ports"] == [{"name": "http1", "containerPort": int(env["DIGITSERVE_PORT"]), "protocol": "TCP"}]
    assert env["DIGITSERVE_HOST"] == "0.0.0.0"
    routes = {route.path: route for route in v2.router.routes}
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live"),
                        ("startupProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http1"}, probe
        assert "GET" in routes[path].methods and not routes[path].dependencies  # probes send no API key
    assert container["resources"] == served["resources"]
    # Everything but the predictor's own fields is a PodSpec: validated strictly as one, and within
    # what Knative accepts, for clusters whose default mode is Knative.
    pod_spec = {k: v for k, v in predictor.items() if k not in KSERVE_PREDICTOR_FIELDS}
    assert set(pod_spec) <= KNATIVE_POD_FIELDS and set(container) <= KNATIVE_CONTAINER_FIELDS
    validate_strictly(tmp_path, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": isvc["metadata"]["name"]},
                                 "spec": pod_spec})
