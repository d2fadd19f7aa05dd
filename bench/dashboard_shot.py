"""The picture of the Grafana dashboard in docs/img/dashboard.png, made without Grafana: a real server
under load, scraped by a real Prometheus every second, and every panel of
deploy/grafana/dashboards/digitserve.json drawn with matplotlib from Prometheus' answers to that
panel's own queries (query_range), laid out on the dashboard's grid. Grafana itself could not be
installed where this was made (no Debian package, no other source reachable); Prometheus is Debian's
(`apt-get install prometheus`).

    .venv/bin/python -m bench.dashboard_shot [--out docs/img/dashboard.png] [--phase-seconds 60]

What it does: serves digits-cnn, digits-mlp and svhn-synthetic-cnn with --prediction-log and
--max-queue 8, then runs three phases of load with bench.load (test-split 8x8 digits; then 8x8
digits at 96 connections, which sheds; then digits, 32x32 house-number crops and 8x8 noise, which
moves the answers and the inputs' brightness), while a thread predicts test-split digits one by one
with digits-cnn and digits-mlp and posts each one's true label to /feedback. Grafana's variables are
given as Grafana would: $model as `.*` (All), $__rate_interval as --rate-interval. Any query that
Prometheus refuses stops it; queries that return nothing are listed. Takes about 4 minutes.
"""
import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np

from bench.harness import ROOT, copy_committed, free_port, running_server

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "digitserve.json"
MODELS = ("digits-cnn", "digits-mlp", "svhn-synthetic-cnn")
# Grafana's dark theme, roughly.
BACKGROUND, PANEL, GRID, TEXT, MUTED = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e8e"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d",
           "#fade2a", "#447ebc", "#c15c17", "#890f02", "#0a437c", "#6d1f62", "#584477"]


# --- the run ---

def prometheus(folder: Path, target: str) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("prometheus")
    if binary is None:
        sys.exit("prometheus is not installed: apt-get install prometheus")
    port = free_port()
    config = folder / "prometheus.yml"
    config.write_text(json.dumps({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                                  "scrape_configs": [{"job_name": "digitserve", "metrics_path": "/metrics",
                                                      "static_configs": [{"targets": [target]}]}]}))
    with open(folder / "prometheus.log", "w") as log:
        process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=log,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    sys.exit(f"prometheus not ready in 30 s: {(folder / 'prometheus.log').read_text()[-2000:]}")


def bodies(folder: Path) -> dict[str, Path]:
    from training.digits import split_arrays
    images, _ = split_arrays("test")
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 16, size=(8, 8, 8)).round(1)
    out = {"digits": {"pixels": images[:8].tolist()},
           "mixed": {"pixels": [*images[8:12].tolist(), *noise[:4].tolist()]}}
    paths = {}
    for name, body in out.items():
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(json.dumps(body))
    paths["house"] = ROOT / "samples" / "house-number-32x32-6.png"
    return paths


def load(url: str, body: Path, content_type: str, connections: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.load", url, str(body), content_type, "--connections",
                             str(connections), "--seconds", str(seconds), "--processes", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)


def feedback(url: str, stop: threading.Event, counts: dict) -> None:
    """Predict test-split digits one at a time and tell the service each one's true label."""
    from training.digits import split_arrays
    images, labels = split_arrays("test")
    with httpx.Client(base_url=url, timeout=30) as client:
        i = 0
        while not stop.is_set():
            model = MODELS[i % 2]
            answer = client.post(f"/predict?model={model}", json={"pixels": [images[i % len(images)].tolist()]})
            if answer.status_code == 200:
                (prediction,) = answer.json()["predictions"]
                body = {"id": prediction["id"], "label": int(labels[i % len(labels)])}
                told = client.post("/feedback", json=body)
                if told.status_code == 404:  # not yet indexed by the log's writer: once more, a moment later
                    stop.wait(1)
                    told = client.post("/feedback", json=body)
                    counts["404 then " + str(told.status_code)] = counts.get("404 then " + str(told.status_code), 0) + 1
                else:
                    counts[told.status_code] = counts.get(told.status_code, 0) + 1
            i += 1
            stop.wait(0.05)


def run(seconds: float, folder: Path) -> tuple[str, float, float, subprocess.Popen]:
    """Serve, scrape and load; returns Prometheus' URL, the run's start and end, and its process."""
    copy_committed(folder / "exports", *MODELS)
    with running_server(folder / "exports", "--prediction-log", str(folder / "log"), "--max-queue", "8") as server:
        process, prom = prometheus(folder, f"127.0.0.1:{server.port}")
        paths = bodies(folder)
        predict = server.url + "/predict"
        stop, counts = threading.Event(), {}
        teller = threading.Thread(target=feedback, args=(server.url, stop, counts), daemon=True)
        time.sleep(2)  # a few scrapes before the load: each rate() has its starting point
        start = time.time()
        teller.start()
        phases = [("steady: 8x8 digits, 8 connections", [(paths["digits"], "application/json", 8)]),
                  ("overload: 8x8 digits, 96 connections", [(paths["digits"], "application/json", 96)]),
                  ("drift: digits and noise, house numbers", [(paths["mixed"], "application/json", 6),
                                                              (paths["house"], "image/png", 4)])]
        for name, loads in phases:
            print(f"{name} ({seconds:g} s)", flush=True)
            running = [load(predict, body, kind, connections, seconds) for body, kind, connections in loads]
            for p in running:
                print("  bench.load:", p.communicate()[0].strip(), flush=True)
        time.sleep(min(5.0, seconds))  # the service idle again
        stop.set()
        teller.join(30)
        print(f"feedback answers by status: {counts}")
        time.sleep(2)  # the last scrapes
        return prom, start, time.time(), process


# --- the queries ---

def grafana_expr(expr: str, rate_interval: str) -> str:
    return expr.replace("$__rate_interval", rate_interval).replace("$model", ".*")


def query(prom: str, expr: str, start: float, end: float, step: float, instant: bool) -> list[dict]:
    if instant:
        answer = httpx.get(prom + "/api/v1/query", params={"query": expr, "time": end}, timeout=30).json()
    else:
        answer = httpx.get(prom + "/api/v1/query_range", params={"query": expr, "start": start, "end": end,
                                                                 "step": step}, timeout=30).json()
    if answer["status"] != "success":
        raise SystemExit(f"Prometheus refused {expr!r}: {answer.get('error')}")
    return answer["data"]["result"]


def legend(template: str, labels: dict) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template or "")
    return re.sub(r"\s+", " ", text).strip() or "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def short_version(text: str) -> str:
    """The versions' timestamps make legends long: keep their date and hash."""
    return re.sub(r"(\d{8})T\d{6}Z-([0-9a-f]{8})", r"\1-\2", text)


def fetch(prom: str, board: dict, start: float, end: float, step: float, rate_interval: str) -> dict:
    """Panel id -> list of (legend, times, values) or table rows; prints the queries that found nothing."""
    out, empty = {}, []
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        series = []
        for target in panel["targets"]:
            instant = panel["type"] in ("stat", "table")
            for result in query(prom, grafana_expr(target["expr"], rate_interval), start, end, step, instant):
                name = short_version(legend(target.get("legendFormat", ""), result["metric"]))
                if instant:
                    series.append((name, result["metric"], float(result["value"][1])))
                else:
                    series.append((name, [float(t) for t, _ in result["values"]],
                                   [float(v) for _, v in result["values"]]))
            if not series:
                empty.append(f"{panel['title']} {target['refId']}")
        out[panel["id"]] = series
    if empty:
        print("no data:", ", ".join(empty))
    return out


# --- the picture ---

def formatter(unit: str):
    def fmt(value, _=None):
        if unit == "percentunit":
            return f"{100 * value:.3g}%"
        if unit == "s":
            return f"{1000 * value:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
        suffix = {"reqps": " req/s", "cps": "/s"}.get(unit, "")
        if abs(value) >= 1000:
            return f"{value / 1000:.1f}k{suffix}"
        return f"{value:.0f}{suffix}" if abs(value) >= 10 or value == 0 else f"{value:.2g}{suffix}"
    return fmt


def draw(board: dict, data: dict, start: float, end: float, out: Path, note: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
    plt.rcParams["text.parse_math"] = False  # legends and notes hold $ signs

    unit_px, width_px, top_px = 34, 1920, 70
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
    height_px = top_px + rows * unit_px + 10
    figure = plt.figure(figsize=(width_px / 100, height_px / 100), dpi=100, facecolor=BACKGROUND)
    figure.text(12 / width_px, 1 - 22 / height_px, f"{board['title']}", color=TEXT, fontsize=15, weight="bold",
                va="center")
    figure.text(12 / width_px, 1 - 50 / height_px, note, color=MUTED, fontsize=9, va="center", linespacing=1.5)
    col_px = (width_px - 16) / 24
    local = datetime.fromtimestamp

    def box(grid, pad=4):
        x0 = 8 + grid["x"] * col_px + pad
        y0 = top_px + grid["y"] * unit_px + pad
        return [x0 / width_px, 1 - (y0 + grid["h"] * unit_px - 2 * pad) / height_px,
                (grid["w"] * col_px - 2 * pad) / width_px, (grid["h"] * unit_px - 2 * pad) / height_px]

    for panel in board["panels"]:
        grid = panel["gridPos"]
        if panel["type"] == "row":
            x, y, _, h = box(grid, 0)
            figure.text(x + 4 / width_px, y + h / 2, panel["title"], color=TEXT, fontsize=12, weight="bold",
                        va="center")
            continue
        x, y, w, h = box(grid)
        frame = figure.add_axes([x, y, w, h])
        frame.set_facecolor(PANEL)
        frame.set_xticks([])
        frame.set_yticks([])
        for spine in frame.spines.values():
            spine.set_color(GRID)
        frame.text(8 / (w * width_px), 1 - 14 / (h * height_px), panel["title"], color=TEXT, fontsize=10,
                   weight="bold", transform=frame.transAxes, va="center")
        series = data[panel["id"]]
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        legend_rows = 0 if panel["type"] != "timeseries" else min(3, math.ceil(len(series) / 3))
        inner_top, inner_bottom = 30, 26 + 15 * legend_rows
        inner = [x + 52 / width_px, y + inner_bottom / height_px, w - 76 / width_px,
                 h - (inner_top + inner_bottom) / height_px]
        if not series:
            frame.text(0.5, 0.45, "No data", color=MUTED, fontsize=12, ha="center", transform=frame.transAxes)
            continue
        if panel["type"] == "stat":
            for i, (name, _, value) in enumerate(series):
                cx = (i + 0.5) / len(series)
                frame.text(cx, 0.45, formatter(unit)(value), color=PALETTE[2], fontsize=26, weight="bold",
                           ha="center", va="center", transform=frame.transAxes)
                frame.text(cx, 0.15, name, color=MUTED, fontsize=8, ha="center", transform=frame.transAxes)
            continue
        if panel["type"] == "table":
            columns = [c for c in sorted(panel["transformations"][0]["options"]["indexByName"],
                                         key=panel["transformations"][0]["options"]["indexByName"].get)]
            cells = [[short_version(labels.get(c, "")) for c in columns] for _, labels, _ in series]
            axes = figure.add_axes(inner)
            axes.axis("off")
            table = axes.table(cellText=cells, colLabels=columns, loc="upper left", cellLoc="left")
            table.auto_set_font_size(False)
            table.set_fontsize(9)
            for (r, _), cell in table.get_celld().items():
                cell.set_facecolor(PANEL if r else GRID)
                cell.set_edgecolor(GRID)
                cell.get_text().set_color(TEXT)
                cell.set_height(0.16)
            continue
        axes = figure.add_axes(inner, facecolor=PANEL)
        stacked = panel["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
        lines = [([local(t) for t in times], values) for _, times, values in series]
        for i, ((when, values), (name, *_)) in enumerate(zip(lines, series)):
            axes.plot(when, values, color=PALETTE[i % len(PALETTE)], linewidth=1.2, label=name)
        defaults = panel["fieldConfig"]["defaults"]
        low, high = axes.get_ylim()  # scaled to the lines, as Grafana scales its axis
        low, high = defaults.get("min", low), defaults.get("max", high)
        axes.set_ylim(low, high)
        if not stacked:
            for i, (when, values) in enumerate(lines):
                axes.fill_between(when, values, low, color=PALETTE[i % len(PALETTE)], alpha=0.06)
        axes.set_xlim(local(start), local(end))
        axes.yaxis.set_major_formatter(FuncFormatter(formatter(unit)))
        axes.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        span = end - start
        axes.xaxis.set_major_locator(mdates.SecondLocator(bysecond=[0, 30]) if span <= 300 else
                                     mdates.MinuteLocator(interval=max(1, round(span / 300))))
        axes.tick_params(colors=MUTED, labelsize=8, length=0)
        axes.grid(color=GRID, linewidth=0.6)
        for spine in axes.spines.values():
            spine.set_visible(False)
        shown = series[:9]
        handles = axes.get_lines()[:len(shown)]
        names = [n if len(n) <= 42 else n[:40] + "…" for n, *_ in shown]
        if len(series) > len(shown):
            names[-1] += f" (+{len(series) - len(shown)} more)"
        axes.legend(handles, names, loc="upper left", bbox_to_anchor=(-44 / (inner[2] * width_px), -0.1), ncol=3,
                    frameon=False, fontsize=7.5, labelcolor=TEXT, handlelength=1.2, columnspacing=1.2,
                    borderaxespad=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100, facecolor=BACKGROUND)
    plt.close(figure)
    from PIL import Image
    with Image.open(out) as image:  # a palette of 256 colours: a third of the bytes, the same look
        image.convert("RGB").quantize(256).save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png")
    parser.add_argument("--phase-seconds", type=float, default=60)
    parser.add_argument("--rate-interval", default="15s", help="what $__rate_interval stands for")
    parser.add_argument("--step", type=float, default=2, help="seconds between the points of a panel")
    parser.add_argument("--data", type=Path, help="also keep Prometheus' answers in this JSON file; if it exists, "
                        "draw from it instead of running (to change the drawing only)")
    args = parser.parse_args()
    board = json.loads(DASHBOARD.read_text())
    if args.data and args.data.exists():
        saved = json.loads(args.data.read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="dashboard-shot-") as tmp:
            prom, start, end, process = run(args.phase_seconds, Path(tmp))
            try:
                version = httpx.get(prom + "/api/v1/status/buildinfo", timeout=10).json()["data"]["version"]
                saved = {"start": start, "end": end, "prometheus": version, "rate_interval": args.rate_interval,
                         "phase_seconds": args.phase_seconds,
                         "panels": fetch(prom, board, start, end, args.step, args.rate_interval)}
            finally:
                process.terminate()
                process.wait(30)
        if args.data:
            args.data.write_text(json.dumps(saved))
    data = {int(k): v for k, v in saved["panels"].items()}
    note = (f"deploy/grafana/dashboards/digitserve.json: each panel's queries answered by Prometheus "
            f"{saved['prometheus']} (scraping every 1 s; $__rate_interval = {saved['rate_interval']}, $model = All) "
            f"and drawn by bench/dashboard_shot.py with matplotlib, not by Grafana.\n"
            f"Load: steady, then overload (shedding), then drift (noise, house numbers), "
            f"{saved['phase_seconds']:g} s each; feedback with true labels throughout.")
    draw(board, data, saved["start"], saved["end"], args.out, note)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
