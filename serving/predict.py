"""`digitserve-predict` (or `python -m serving.predict`): classify image files in bulk, through a running
server (`--url`) or in this process with no server (`--exports`).

    digitserve-predict samples/ 'scans/**/*.png' --url http://127.0.0.1:8000 > answers.jsonl
    digitserve-predict samples/ --exports exports --format csv --out answers.csv

PATHs are files, folders (every image file below them: .png .jpg .jpeg .bmp .gif .webp) and globs
(`**` goes down folders). One row per image, in the order found: path, label, confidence, decision,
candidates, model, version, error (for a file that failed: it could not be read, or the service
refused it). A progress bar on a terminal, otherwise a line on stderr every few seconds; a summary at
the end. Exit status 0; 1 if any image failed; 2 if nothing could be classified at all (a URL that
does not answer, an exports folder with no usable model, bad flags).

`--exports` runs what the server runs: the models checked and verified on their test splits
(serving/verify.py), the same routing and decoding (serving/routing.py), backends and answers
(serving/answers.py). `--url` uses serving/client.py: $DIGITSERVE_API_KEY is sent as the key.
"""
import argparse
import asyncio
import contextlib
import csv
import glob
import importlib
import io
import json
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from serving import client as api_client
from serving.client import DigitserveError, Prediction
from serving.config import integer

PROG = "digitserve-predict"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
COLUMNS = ("path", "label", "confidence", "decision", "candidates", "model", "version", "error")
PROGRESS_SECONDS = 5.0  # between progress lines when stderr is not a terminal
CHECK_SECONDS = 300  # the longest a worker process may take to verify its models (serving/lifecycle.py's)


class Failed(Exception):
    """Nothing can be classified (exit status 2): the message says why."""


# --- which files ---

def expand(paths: list[str]) -> list[str]:
    """Files in the order given: a folder's image files below it (sorted), a glob's matches (sorted);
    a path that does not exist is kept, to become a row with its error."""
    found = []
    for path in paths:
        if glob.has_magic(path):
            matches = sorted(glob.glob(path, recursive=True))
            found += [m for m in matches if os.path.isfile(m)] or [path]
        elif os.path.isdir(path):
            for folder, subfolders, files in os.walk(path):
                subfolders.sort()
                found += [os.path.join(folder, f) for f in sorted(files)
                          if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def groups(paths: list[str], batch_size: int) -> list[list[str]]:
    """Paths in the groups one request takes (api_client.batches: 256 files, about 1 MiB)."""
    def size(path):
        try:
            return os.stat(path).st_size + api_client.PART_OVERHEAD
        except OSError:
            return 0
    return [[paths[i] for i in group] for group in api_client.batches([size(p) for p in paths], batch_size)]


# --- rows ---

def row(path: str, result) -> dict:
    if isinstance(result, Prediction):
        return {"path": path, "label": result.label, "confidence": result.confidence, "decision": result.decision,
                "candidates": list(result.candidates), "model": result.model, "version": result.version,
                "error": None}
    return {"path": path, **{column: None for column in COLUMNS[1:-1]}, "error": failure(result)}


def failure(err: Exception) -> str:
    status = f" ({err.status})" if getattr(err, "status", None) else ""
    return f"{type(err).__name__}{status}: {getattr(err, 'message', err)}"


def rendered(rows: list[dict], format: str) -> tuple[str, int, list[str]]:
    """Rows as the text written for them (jsonl, or csv without its header), their count and their
    errors: what Progress takes (worker processes render their own)."""
    if format == "csv":
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(
            [*(r[c] for c in COLUMNS[:4]), " ".join(map(str, r["candidates"] or ())), *(r[c] for c in COLUMNS[5:])]
            for r in rows)
        text = buffer.getvalue()
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    return text, len(rows), [r["error"] for r in rows if r["error"]]


class Progress:
    """Rows written as they come, and progress shown: a bar on a terminal (tqdm), otherwise a line every
    PROGRESS_SECONDS. Counts failures by reason."""

    def __init__(self, total: int, out, stream=sys.stderr):
        self.total, self.out, self.stream = total, out, stream
        self.done, self.failures = 0, Counter()
        self.created = self.started = self.last = time.perf_counter()
        self.bar = None

    def start(self) -> None:
        """Classifying begins: the models are verified (--exports), or the server answered (--url)."""
        self.started = self.last = time.perf_counter()
        if self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, unit="img", file=self.stream, dynamic_ncols=True)

    def add(self, rendering: tuple[str, int, list[str]]) -> None:
        text, count, errors = rendering
        self.out.write(text)
        self.done += count
        self.failures.update(errors)
        if self.bar is not None:
            self.bar.update(count)
            self.bar.set_postfix(failed=sum(self.failures.values()), refresh=False)
        elif time.perf_counter() - self.last >= PROGRESS_SECONDS:
            self.last = time.perf_counter()
            print(f"{self.done}/{self.total} images, {sum(self.failures.values())} failed, "
                  f"{self.rate():,.0f} images/s", file=self.stream, flush=True)

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.started, 1e-9)

    def summary(self) -> str:
        if self.bar is not None:
            self.bar.close()
        failed = sum(self.failures.values())
        lines = [f"{self.done} images in {time.perf_counter() - self.started:.2f} s ({self.rate():,.0f} images/s; "
                 f"{self.started - self.created:.2f} s before, getting ready): {self.done - failed} answered, "
                 f"{failed} failed"]
        lines += [f"  {count} × {reason}" for reason, count in self.failures.most_common(10)]
        if len(self.failures) > 10:
            lines.append(f"  ... and {len(self.failures) - 10} other reasons")
        return "\n".join(lines)


# --- through a server ---

async def through_server(url: str, paths: list[str], options: dict, args, progress: Progress) -> None:
    """Every group of paths sent by an AsyncClient, `args.concurrency` requests at a time; rows emitted
    in order."""
    async with api_client.AsyncClient(url, batch_size=args.batch_size, concurrency=1) as client:
        try:
            readiness = await client.ready()
            if not readiness.ready:
                raise Failed(f"{url} is not ready: {readiness.reason}")
            names = {m.name for m in await client.models()}  # also checks the API key ($DIGITSERVE_API_KEY)
            if options.get("model") is not None and options["model"] not in names:
                raise Failed(f"{url} has no model {options['model']!r}; it has {', '.join(sorted(names))}")
        except DigitserveError as err:
            hint = ": set DIGITSERVE_API_KEY" if isinstance(err, api_client.Unauthorized) else ""
            raise Failed(f"{url}: {err.message}{hint}" if err.status else err.message) from None
        progress.start()
        room = asyncio.Semaphore(args.concurrency or 4)

        async def send(group):
            async with room:
                return await client.predict(group, errors="return", **options)
        grouped = groups(paths, args.batch_size)
        tasks = [asyncio.ensure_future(send(group)) for group in grouped]
        try:
            for group, task in zip(grouped, tasks):
                progress.add(rendered([row(path, result) for path, result in zip(group, await task)], args.format))
        finally:
            for task in tasks:
                task.cancel()


# --- in this process ---

class Uncounted:
    """What serving/answers.py counts each answer into for /metrics: with no server, nobody scrapes
    them. Any metric, labelled any way, counts nothing (`metrics.child(metrics.answers, ...).inc()`)."""

    def __getattr__(self, name: str) -> "Uncounted":
        return self

    def __call__(self, *args, **kwargs) -> "Uncounted":
        return self


class Local:
    """The models of an exports folder served in this process: checked, loaded and verified as the
    server does (serving/verify.py), routed and decoded as it does (serving/routing.py), answered as
    it does (serving/answers.py). Raises Failed where no model is usable."""

    def __init__(self, exports: Path, backend: str = "onnx", device: str = "auto"):
        from export_contract.publish import model_folders
        from serving import registry, routing, verify
        from serving.backends import BACKENDS, BackendError
        from serving.config import Config
        from serving.lifecycle import as_rejected
        if not exports.is_dir():
            raise Failed(f"exports folder {exports} does not exist")
        try:
            resolved = BACKENDS[backend].resolve(device)
        except BackendError as err:
            raise Failed(str(err)) from None
        config = Config(exports=exports, backend=backend, device=device)
        served, unavailable = {}, {}
        for folder in model_folders(exports):
            name = registry.display_name(folder)
            try:
                served[name] = verify.build(folder, config, resolved, None)
            except Exception as err:  # Rejected, or a bug: as the server, that model is not served
                unavailable[name] = as_rejected(name, err).reason
        if not served:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in unavailable.items()) or "the folder is empty"
            raise Failed(f"no usable model in {exports} ({reasons})")
        self.catalog = routing.Catalog.of(served, unavailable)
        self.metrics = Uncounted()

    def check_model(self, name: str | None) -> None:
        from serving.errors import ServiceError
        if name is not None:
            try:
                self.catalog.model(name)
            except ServiceError as err:
                raise Failed(err.message) from None

    def predict(self, paths: list[str], options: dict) -> list:
        """Predictions (or errors, as the client's exception types) of files, in one batched call per model."""
        from serving import answers, images, inference, routing
        from serving.errors import ServiceError
        results, routed, answered = [], [], []
        for path in paths:
            try:
                with open(path, "rb") as file:
                    data = file.read()
            except OSError as err:
                results.append(api_client.UnreadableFile(f"cannot read it: {err.strerror or err}", input=path))
                continue
            try:
                routed.append(routing.route_image(self.catalog, images.open_image(data), options.get("model"),
                                                  options.get("invert"), bool(options.get("resize"))))
                results.append(len(routed) - 1)
            except ServiceError as err:
                results.append(api_client.ERRORS.get(err.status, DigitserveError)(err.message, err.status, input=path))
        if routed:
            batch = inference.predict([[(r.model, r.array) for r in routed]])
            answered = [{"model": r.model.name, "version": r.model.version, "routed": r.reason,
                         **answers.answer(r.model, item, self.metrics, options.get("raw", False),
                                          options.get("unsure_below")), "batch_size": batch.images}
                        for r, item in zip(routed, batch.outputs[0])]
        return [answered[result] if isinstance(result, int) else result for result in results]

    def rows(self, paths: list[str], options: dict) -> list[dict]:
        return [row(path, Prediction.of(result, path) if isinstance(result, dict) else result)
                for path, result in zip(paths, self.predict(paths, options))]


def in_process(exports: Path, paths: list[str], options: dict, args, progress: Progress) -> None:
    """Groups of files through Local: here, or in `args.concurrency` worker processes (forked, each
    verifying its own models, as the server's HTTP processes do); rows emitted in order."""
    grouped = groups(paths, args.batch_size)
    workers = min(args.concurrency or len(os.sched_getaffinity(0)), max(1, len(grouped)))
    if workers == 1:
        local = Local(exports, args.backend)
        local.check_model(options.get("model"))
        progress.start()
        for group in grouped:
            progress.add(rendered(local.rows(group, options), args.format))
        return
    import multiprocessing
    for module in ("serving.verify", "serving.routing", "serving.answers", "onnxruntime"):
        with contextlib.suppress(ImportError):  # once here, before the workers fork, rather than in each
            importlib.import_module(module)
    context = multiprocessing.get_context("fork")  # as the server forks: nothing has run a model or a thread
    ready = context.Barrier(workers + 1)
    with ProcessPoolExecutor(workers, context, initializer=start_worker,
                             initargs=(exports, args.backend, options.get("model"), ready)) as pool:
        results = pool.map(worker_rows, grouped, [options] * len(grouped), [args.format] * len(grouped))
        try:
            ready.wait(timeout=CHECK_SECONDS)
        except threading.BrokenBarrierError:
            pass  # a worker died: its group's result says how
        progress.start()
        try:
            for rendering in results:
                progress.add(rendering)
        except BrokenProcessPool:
            raise Failed("a worker process died (see above)") from None
        finally:
            pool.shutdown(cancel_futures=True)


WORKER: "Local | Failed | None" = None  # in a worker process: its models, or why it has none


def start_worker(exports: Path, backend: str, model: str | None, ready) -> None:
    global WORKER
    try:
        WORKER = Local(exports, backend)
        WORKER.check_model(model)
    except Failed as err:
        WORKER = err
    finally:
        ready.wait()


def worker_rows(group: list[str], options: dict, format: str) -> tuple[str, int, list[str]]:
    if isinstance(WORKER, Failed):
        raise WORKER
    return rendered(WORKER.rows(group, options), format)


# --- the command line ---

class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) and globs")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="a running digitserve server, e.g. http://127.0.0.1:8000")
    source.add_argument("--exports", type=Path, help="an exports folder: classify in this process, no server")
    p.add_argument("--model", help="this model answers every image (default: routed by size and colour)")
    p.add_argument("--resize", action=argparse.BooleanOptionalAction, default=None,
                   help="accept other sizes: photos and drawings of one digit")
    p.add_argument("--invert", action=argparse.BooleanOptionalAction, default=None,
                   help="dark ink on a light background (default: as the service: detected with --resize)")
    p.add_argument("--concurrency", type=integer(1), default=None,
                   help="requests in flight (--url; default 4), or worker processes (--exports; default: one per "
                        "core)")
    p.add_argument("--batch-size", type=integer(1), default=api_client.MAX_IMAGES_PER_REQUEST,
                   help=f"images per request or batch (at most {api_client.MAX_IMAGES_PER_REQUEST})")
    p.add_argument("--backend", choices=["onnx", "torchscript"], default="onnx", help="with --exports")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("--out", type=Path, help="write the rows here (default: stdout)")
    return p




def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size > api_client.MAX_IMAGES_PER_REQUEST:
        parser.error(f"--batch-size must be at most {api_client.MAX_IMAGES_PER_REQUEST}")
    options = {name: value for name, value in (("model", args.model), ("resize", args.resize),
                                               ("invert", args.invert)) if value is not None}
    paths = expand(args.paths)
    try:
        out = open(args.out, "w", newline="") if args.out else sys.stdout
    except OSError as err:
        print(f"{PROG}: error: cannot write {args.out}: {err.strerror}", file=sys.stderr)
        return 2
    if args.format == "csv":
        out.write(",".join(COLUMNS) + "\n")
    progress = Progress(len(paths), out)
    try:
        if args.url:
            asyncio.run(through_server(args.url, paths, options, args, progress))
        else:
            in_process(args.exports, paths, options, args, progress)
    except Failed as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted\n{progress.summary()}", file=sys.stderr)
        return 130
    finally:
        out.flush()
        if args.out:
            out.close()
    print(progress.summary(), file=sys.stderr)
    return 1 if progress.failures else 0


if __name__ == "__main__":
    sys.exit(main())
