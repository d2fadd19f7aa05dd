"""The Grafana dashboard (deploy/grafana/dashboards/digitserve.json) and the alert rules
(deploy/prometheus/alerts.yml) against the metrics a real service exposes: every PromQL expression
is read token by token, and each metric it selects must be a sample name that the service's /metrics
shows after a prediction and its feedback (in this process, with a copy of the committed digits-cnn and
a prediction log), with the labels its matchers and `by`/`without`/`on`/`ignoring` clauses name;
counters and histogram parts only inside rate()/increase(), gauges never; histogram_quantile() over
buckets aggregated by `le`. Every panel has a title, the dashboard's data-source variable and queries.
Where Prometheus' promtool is installed, it parses every expression too. The checker's own test feeds
it wrong names, labels and types."""
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import ROOT, copy_committed
from serving.metrics import Metrics
from tests.helpers import in_process

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "digitserve.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PREFIX = "digitserve_"
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
# What the issue asks the dashboard to show, as the series that show it.
REQUIRED = {
    "request rate": "digitserve_http_requests_total",
    "shed rate": "digitserve_shed_requests_total",
    "latency percentiles": "digitserve_http_request_duration_seconds_bucket",
    "queue time": "digitserve_queue_duration_seconds_bucket",
    "inference time": "digitserve_inference_duration_seconds_bucket",
    "batch sizes": "digitserve_inference_batch_images_bucket",
    "decisions": "digitserve_answers_total",
    "confidence": "digitserve_answer_confidence_bucket",
    "live accuracy": "digitserve_live_accuracy",
    "live accuracy from the counters": "digitserve_feedback_total",
    "brightness drift": "digitserve_input_brightness_bucket",
    "ink drift": "digitserve_input_ink_bucket",
    "prediction-log drops": "digitserve_prediction_log_dropped_total",
    "refusals": "digitserve_http_refused_total",
}

# --- PromQL, read token by token ---

TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){},@])
""", re.X)
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
                "quantile", "limitk", "limit_ratio"}
RANGE_FUNCTIONS = {"rate", "increase", "irate", "delta", "idelta", "deriv", "predict_linear", "changes", "resets",
                   "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
                   "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time",
                   "present_over_time", "absent_over_time"}
COUNTER_FUNCTIONS = {"rate", "increase", "irate", "resets"}
FUNCTIONS = AGGREGATIONS | RANGE_FUNCTIONS | {
    "abs", "absent", "ceil", "clamp", "clamp_max", "clamp_min", "day_of_month", "day_of_week", "days_in_month",
    "exp", "floor", "histogram_quantile", "hour", "label_join", "label_replace", "ln", "log10", "log2", "minute",
    "month", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "time", "timestamp", "vector", "year"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def tokens(expr: str) -> list[tuple[str, str]]:
    out, at = [], 0
    while at < len(expr):
        match = TOKEN.match(expr, at)
        if not match:
            raise ValueError(f"cannot read {expr[at:at + 20]!r} in {expr!r}")
        at = match.end()
        if match.lastgroup != "space":
            out.append((match.lastgroup, match.group()))
    return out


def closing(toks, start: int) -> int:
    """The index of the `)` or `}` that closes the bracket at `start`."""
    pairs, depth = {"(": ")", "{": "}"}, 0
    opening = toks[start][1]
    for i in range(start, len(toks)):
        if toks[i][1] == opening:
            depth += 1
        elif toks[i][1] == pairs[opening]:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced brackets")


def label_list(toks, start: int) -> tuple[list[str], int]:
    """The label names in the `( ... )` at `start`, and the index after it."""
    end = closing(toks, start)
    return [value for kind, value in toks[start + 1:end] if kind == "ident"], end + 1


@dataclass
class Selector:
    name: str
    labels: list[str]
    ranged: bool
    function: str | None  # the innermost function or aggregation it is an argument of
    at: int  # its token's index


@dataclass
class Query:
    selectors: list[Selector] = field(default_factory=list)
    # (aggregation, by or without, labels, the selectors it aggregates)
    groupings: list[tuple[str, str, list[str], list[Selector]]] = field(default_factory=list)
    matching: list[str] = field(default_factory=list)  # on/ignoring/group_left/group_right labels
    functions: list[str] = field(default_factory=list)


def parse(expr: str) -> Query:
    """The metric selectors, aggregations and label names of a PromQL expression (not a full parser:
    enough to check names, labels and types; Prometheus itself parses them in the promtool test and
    in bench/dashboard_shot.py)."""
    toks, query = tokens(expr), Query()
    calls = []  # (function, index of its `)`)
    pending = {}  # index of an aggregation's `(` -> (aggregation, by or without, labels)
    i = 0
    while i < len(toks):
        kind, value = toks[i]
        while calls and i > calls[-1][1]:
            calls.pop()
        nxt = toks[i + 1][1] if i + 1 < len(toks) else None
        if kind == "ident" and value in AGGREGATIONS and nxt in ("by", "without"):  # sum by (...) (...)
            labels, after = label_list(toks, i + 2)
            pending[after] = (value, nxt, labels)
            query.functions.append(value)
            calls.append((value, closing(toks, after)))
            i = after + 1
            continue
        if kind == "ident" and nxt == "(" and value not in KEYWORDS:
            if value not in FUNCTIONS:
                raise ValueError(f"unknown function {value!r} in {expr!r}")
            query.functions.append(value)
            end = closing(toks, i + 1)
            calls.append((value, end))
            if value in AGGREGATIONS and end + 1 < len(toks) and toks[end + 1][1] in ("by", "without"):
                labels, _ = label_list(toks, end + 2)  # sum(...) by (...)
                pending[i + 1] = (value, toks[end + 1][1], labels)
            i += 2
            continue
        if kind == "ident" and value in GROUPING:
            if nxt == "(":
                labels, after = label_list(toks, i + 1)
                if value in ("by", "without"):  # written after its aggregation's argument: handled there
                    i = after
                    continue
                query.matching += labels
                i = after
            else:
                i += 1
            continue
        if kind == "ident" and value not in KEYWORDS:
            labels, j = [], i + 1
            if j < len(toks) and toks[j][1] == "{":
                end = closing(toks, j)
                labels = [v for k, v in toks[j + 1:end] if k == "ident"]
                j = end + 1
            ranged = j < len(toks) and toks[j][0] == "range"
            query.selectors.append(Selector(value, labels, ranged, calls[-1][0] if calls else None, i))
            i = j + (1 if ranged else 0)
            continue
        if kind == "op" and value == "{":  # a selector by matchers alone: {__name__="..."}
            raise ValueError(f"name the metric before its braces in {expr!r}")
        i += 1
    # The selectors each aggregation covers: those between the brackets of its argument.
    for start, (aggregation, how, labels) in pending.items():
        end = closing(toks, start)
        query.groupings.append((aggregation, how, labels, [s for s in query.selectors if start < s.at < end]))
    return query


# --- what the service exposes ---

@dataclass
class Series:
    family: str
    type: str
    labels: set


def exposed_series(text: str) -> dict[str, Series]:
    """Sample name -> its family, type and label names, from /metrics' text. A family with no
    samples yet (a labelled counter nothing has counted) gets the sample names of its type and the
    label names it was declared with in serving/metrics.py."""
    declared = {}
    for metric in vars(Metrics([])).values():
        if hasattr(metric, "_labelnames"):
            declared[metric._name] = set(metric._labelnames)
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, Series(family.name, family.type, set())).labels.update(sample.labels)
        if not family.samples:
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
            for suffix in suffixes:
                labels = set(declared.get(family.name, ())) | ({"le"} if suffix == "_bucket" else set())
                out[family.name + suffix] = Series(family.name, family.type, labels)
    return {name: series for name, series in out.items() if not name.endswith("_created")}


def problems(expr: str, series: dict[str, Series]) -> list[str]:
    """What is wrong with `expr` against the exposed `series` (empty: nothing)."""
    try:
        query = parse(expr)
    except ValueError as err:
        return [str(err)]
    found = []
    ours = [s for s in query.selectors if s.name.startswith(PREFIX)]
    for s in ours:
        if s.name not in series:
            found.append(f"{s.name}: not exported")
            continue
        known = series[s.name].labels | TARGET_LABELS | {"__name__"}
        found += [f"{s.name}: no label {label!r}" for label in s.labels if label not in known]
        counted = series[s.name].type in ("counter", "histogram") and not s.name.endswith("_created")
        if counted and s.function not in COUNTER_FUNCTIONS:
            found.append(f"{s.name}: a {series[s.name].type} used without rate() or increase()")
        if not counted and s.function in COUNTER_FUNCTIONS:
            found.append(f"{s.name}: a gauge inside {s.function}()")
        if s.ranged != (s.function in RANGE_FUNCTIONS):
            found.append(f"{s.name}: a range selector outside a range function, or the reverse")
    for aggregation, how, labels, inside in query.groupings:
        for s in inside:
            if s.name in series:
                known = series[s.name].labels | TARGET_LABELS
                found += [f"{aggregation} {how} ({label}): {s.name} has no such label" for label in labels
                          if label not in known]
        if any(s.name.endswith("_bucket") for s in inside) and "histogram_quantile" in query.functions:
            if (how == "by") != ("le" in labels):
                found.append(f"{aggregation} {how} ({', '.join(labels)}) over buckets loses 'le'")
    everything = set().union(*(series[s.name].labels for s in ours if s.name in series), TARGET_LABELS)
    found += [f"on/ignoring ({label}): no metric here has it" for label in query.matching if label not in everything]
    return found


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def query_panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable; label_values(metric, label) as a
    selector of that metric with that label."""
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in query_panels() for t in p["targets"]]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            text = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", text).groups()
            out.append((f"variable {variable['name']}", f'max by ({label}) ({metric})'))
    return out


def alert_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """The service's /metrics after a prediction and its feedback."""
    tmp = tmp_path_factory.mktemp("dashboard")
    copy_committed(tmp / "exports", "digits-cnn")
    with in_process(tmp / "exports", prediction_log=tmp / "log") as client:
        with open(ROOT / "samples" / "digit-8x8-6.png", "rb") as image:
            answer = client.post("/predict", files={"file": image})
        assert answer.status_code == 200, answer.text
        (prediction,) = answer.json()["predictions"]
        told = client.post("/feedback", json={"id": prediction["id"], "label": 6})
        assert told.status_code == 200, told.text
        text = client.get("/metrics").text
    exposed = exposed_series(text)
    assert {"digitserve_live_accuracy", "digitserve_feedback_total"} <= set(exposed)
    return exposed


def test_every_dashboard_query_selects_series_the_service_exports(series):
    queries = dashboard_queries()
    assert len(queries) > 20
    found = {where: problems(expr, series) for where, expr in queries}
    assert {where: p for where, p in found.items() if p} == {}
    used = {s.name for _, expr in queries for s in parse(expr).selectors}
    assert {item: name for item, name in REQUIRED.items() if name not in used} == {}


def test_every_alert_rule_selects_series_the_service_exports(series):
    found = {where: problems(expr, series) for where, expr in alert_queries()}
    assert len(found) >= 5
    assert {where: p for where, p in found.items() if p} == {}


def test_the_checker_catches_wrong_names_labels_and_types(series):
    good = "histogram_quantile(0.99, sum by (le, route) (rate(digitserve_http_request_duration_seconds_bucket[5m])))"
    assert problems(good, series) == []
    wrong = {
        "sum(rate(digitserve_http_request_total[5m]))": "not exported",
        "sum(rate(digitserve_answers[5m]))": "not exported",
        "histogram_quantile(0.9, sum by (le) (rate(digitserve_answer_confidence[5m])))": "not exported",
        'sum(rate(digitserve_images_total{decision="digit"}[5m]))': "no label 'decision'",
        "sum by (route) (rate(digitserve_images_total[5m]))": "has no such label",
        "sum(rate(digitserve_live_accuracy[5m]))": "a gauge inside rate()",
        "sum(digitserve_feedback_total)": "without rate() or increase()",
        "histogram_quantile(0.99, sum by (route) (rate(digitserve_http_request_duration_seconds_bucket[5m])))":
            "loses 'le'",
        "histogram_quantile(0.99, sum(rate(digitserve_http_request_duration_seconds_bucket[5m])) by (route))":
            "loses 'le'",
        "sum(rate(digitserve_shed_requests_total[5m])) / ignoring (reason) sum(rate(digitserve_images_total[5m]))":
            "no metric here has it",
        "histogram_quantlie(0.5, sum by (le) (rate(digitserve_inference_batch_images_bucket[5m])))":
            "unknown function",
        "digitserve_model_info[5m]": "range selector",
    }
    for expr, why in wrong.items():
        found = problems(expr, series)
        assert any(why in p for p in found), (expr, found)


def test_every_panel_has_a_title_the_datasource_variable_and_queries():
    board = dashboard()
    (datasource,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert datasource["query"] == "prometheus"
    ours = {"type": "prometheus", "uid": "${%s}" % datasource["name"]}
    assert 36 <= board["schemaVersion"] <= 41 and board["uid"] and board["title"]  # Grafana 10.0 .. 12
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in board["panels"]:
        assert panel["title"].strip(), panel["id"]
        box = panel["gridPos"]
        assert box["x"] >= 0 and box["w"] > 0 and box["x"] + box["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == ours, panel["title"]
        assert panel.get("description"), panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == ours and target["expr"].strip(), (panel["title"], target["refId"])
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == ours


def grafana_to_prometheus(expr: str) -> str:
    """What Grafana sends for `expr`: its range variable as a duration (the strings keep `$model`)."""
    return expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "1h")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="Prometheus' promtool not installed (apt-get install "
                    "prometheus)")
def test_promtool_parses_every_query_and_the_prometheus_config(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"digitserve:dashboard_query_{n}", "expr": grafana_to_prometheus(expr)}
        for n, (_, expr) in enumerate(dashboard_queries())]}]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    for command in (["check", "rules", str(tmp_path / "dashboard.yml")],
                    ["check", "config", str(ROOT / "deploy" / "prometheus" / "prometheus.yml")]):
        result = subprocess.run(["promtool", *command], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
