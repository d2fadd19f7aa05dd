"""Which model versions an HTTP process serves, and how that changes while it runs.

At start-up, and whenever the exports folder changes (polled every --reload-interval seconds, or at
once on POST /models/reload or SIGHUP), every new or changed model folder goes through the same
steps before it is served: the export contract (schema, the sha256 of every file it serves), loaded
by the backend and warmed, and its test split run through that backend reproducing the manifest's
test figures (same error count, NLL within 1e-4). A version that fails a step is not served: the
version before it keeps answering, and the rejection is kept in the model's history
(`/models/{name}`), the log and /metrics. A model whose test split is not at hand (trained on SVHN,
served without --data-dir) is served, marked unverified.

What is served is one immutable Catalog, replaced whole: a request takes the current one once and is
answered entirely by the versions in it. A removed folder leaves the next catalog; requests that
hold its version finish on it, then its memory goes with the last reference.

Publish by renaming a finished folder into place (`--export-to`, training.export.publish do): folders
whose names start with "." are never read, so a folder being written is not seen. A folder copied in
place file by file is rejected until its files match their manifest, then served.
"""
import asyncio
import logging
import os
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import export_contract as contract
from serving import images, registry, test_data
from serving.config import Config
from serving.errors import InputError, ModelNotFound, ModelUnavailable
from serving.inference import LoadError, ServedModel, load_runner, run_all
from serving.metrics import Metrics

log = logging.getLogger("digitserve")

HISTORY_LENGTH = 50  # events kept per model name
RETRYABLE_STEPS = {"load", "test_split", "unexpected"}  # may pass on another try with the same folder


class Rejected(Exception):
    """A version that is not served: why (`reason`, for people) and at which step (`step`, a metric label:
    export, load, test_split, metrics, unverified, unexpected)."""

    def __init__(self, version: str | None, reason: str, step: str):
        super().__init__(reason)
        self.version, self.reason, self.step = version, reason, step


@dataclass(frozen=True)
class Catalog:
    """The model versions this process serves at one moment, with what routing needs from them."""
    served: dict[str, ServedModel] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)   # name -> why it is not served
    task_specs: dict[str, dict] = field(default_factory=dict)   # task -> input spec (one image shape per task)
    defaults: dict[str, str] = field(default_factory=dict)      # task -> the model answering it by default

    @classmethod
    def of(cls, served: dict[str, ServedModel], unavailable: dict[str, str]) -> "Catalog":
        task_specs, defaults = {}, {}
        for name in sorted(served):
            task = served[name].manifest["task"]
            task_specs.setdefault(task, served[name].manifest["input"])
            if task not in defaults or name == f"{task}-cnn":
                defaults[task] = name
        return cls(dict(sorted(served.items())), dict(unavailable), task_specs, defaults)

    @property
    def names(self) -> list[str]:
        return sorted({*self.served, *self.unavailable})

    @property
    def accepted_sizes(self) -> list[tuple[int, int]]:
        return [images.spec_size(spec) for spec in self.task_specs.values()]

    def model(self, name: str) -> ServedModel:
        """The served version of `name`; 404 naming the known models, or 503 saying why it is unavailable."""
        if name in self.served:
            return self.served[name]
        if name in self.unavailable:
            raise ModelUnavailable(f"model {name!r} is unavailable: {self.unavailable[name]}")
        raise ModelNotFound(f"unknown model {name!r}; known: {', '.join(self.names)}")

    def default_model(self, task: str) -> ServedModel:
        if task not in self.defaults:
            raise InputError(f"no {task} model is served for this image size", 422)
        return self.served[self.defaults[task]]


def folder_stamp(folder: Path, tries: int = 3) -> tuple | None:
    """What changes when a model folder is replaced or any file in it is; None while it is changing
    under the look (a file renamed or deleted between listing and reading, three times running)."""
    for _ in range(tries):
        try:
            files = sorted((path.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                           for path in folder.iterdir() for st in [path.lstat()])
            return folder.stat().st_ino, tuple(files)
        except OSError:
            continue
    return None


def build(folder: Path, config: Config, device: str, previous: ServedModel | None) -> ServedModel:
    """One model folder, checked, loaded, warmed and verified on its test split; raises Rejected.
    `previous`: the version it would replace, if any."""
    entry = registry.check_export(folder, config.backend)
    version = entry.manifest["version"] if entry.manifest else None
    try:
        if not entry.available:
            raise Rejected(version, entry.error, "export")
        try:
            runner = load_runner(entry, config.backend, device)
        except LoadError as err:
            raise Rejected(version, str(err), "load") from None
        curves, split = entry.content(entry.manifest["curves"]), test_data.embedded(entry)
        if split is None and config.data_dir is None and "test_file" in entry.manifest.get("data", {}):
            # Trained on SVHN, whose test file this server was not given: served, marked unverified,
            # unless it would replace a version that was verified.
            reason = test_data.no_data_dir_reason(entry)
            if previous is not None and previous.verified["reproduced"]:
                raise Rejected(version, f"it cannot be verified here and would replace a verified version: {reason}",
                               "unverified")
            return ServedModel(entry, runner, {"reproduced": None, "reason": reason}, curves, None)
        try:
            x, y = split if split is not None else test_data.from_data_dir(entry, config.data_dir)
        except InputError as err:
            raise Rejected(version, err.message, "test_split") from None
        measured = contract.test_metrics(run_all(runner, x), y)
        claimed = entry.manifest["metrics"]["test"]
        if not contract.reproduces(measured, claimed):
            raise Rejected(version, f"on its {measured['n']} test images the {config.backend} artifact makes "
                                    f"{measured['errors']} errors with NLL {measured['nll']:.6f}; its manifest claims "
                                    f"{claimed['errors']} of {claimed['n']} and {claimed['nll']:.6f}", "metrics")
        verified = {"reproduced": True, **{k: measured[k] for k in ("errors", "nll", "n")}}
        return ServedModel(entry, runner, verified, curves, split)
    finally:
        entry.contents.clear()  # the artifact's bytes: the runner holds the model now


class Lifecycle:
    """This process's catalog, kept in line with the exports folder."""

    def __init__(self, config: Config, device: str, metrics: Metrics):
        self.config, self.device, self.metrics = config, device, metrics
        self.catalog = Catalog()
        self.stamps: dict[str, tuple] = {}
        self.history: dict[str, deque] = defaultdict(lambda: deque(maxlen=HISTORY_LENGTH))
        self.info: dict[str, tuple] = {}      # name -> its digitserve_model_info labels now set to 1
        self.rejected: dict[str, tuple] = {}  # name -> its digitserve_model_rejected labels now set to 1
        self.retryable: set[str] = set()      # names whose last version failed for a cause outside its folder
        self.lock = asyncio.Lock()        # one reload at a time: the poll, the route and SIGHUP queue up
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.reload()
        if self.config.reload_interval > 0:
            self.task = asyncio.get_running_loop().create_task(self.poll(), name="exports-poll")

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_interval)
            try:
                await self.reload()
            except Exception:  # a bug must not end the polling: logged, tried again next time
                log.exception("reloading the exports folder failed")

    async def reload(self, retry: bool = False) -> list[dict]:
        """Bring the catalog in line with the exports folder; returns what changed (history events).
        `retry` (asked for: POST /models/reload, SIGHUP): also check again the versions rejected for a
        cause outside their folder (a load failure, the data folder's test file), which polls leave be."""
        async with self.lock:
            try:
                folders = await asyncio.to_thread(registry.model_folders, self.config.exports)
            except OSError as err:  # a volume briefly away must not unload every model
                log.error("cannot read the exports folder %s (%s): serving what was loaded", self.config.exports, err)
                return []
            found = {folder.name: folder for folder in folders}
            served, unavailable = dict(self.catalog.served), dict(self.catalog.unavailable)
            events = []
            for name in sorted(set(self.stamps) - set(found)):
                del self.stamps[name]
                self.retryable.discard(name)
                gone = served.pop(name, None)
                unavailable.pop(name, None)
                events.append(self.record(name, "removed", gone.version if gone else None))
            for name, folder in found.items():
                stamp = await asyncio.to_thread(folder_stamp, folder)
                if stamp is None or (self.stamps.get(name) == stamp and not (retry and name in self.retryable)):
                    continue  # unchanged, or changing right now: the next look decides
                self.stamps[name] = stamp
                self.metrics.models.add(name)
                try:
                    model = await asyncio.to_thread(build, folder, self.config, self.device, served.get(name))
                except Exception as err:  # Rejected, or a bug: either way this version is not served
                    if not isinstance(err, Rejected):
                        log.exception("model %s: checking the new folder failed", name)
                        err = Rejected(None, f"checking it failed unexpectedly ({type(err).__name__}: see the log)",
                                       "unexpected")
                    if name not in served:
                        unavailable[name] = err.reason
                    if err.step in RETRYABLE_STEPS:
                        self.retryable.add(name)
                    events.append(self.record(name, "rejected", err.version, err.reason, step=err.step))
                    continue
                self.retryable.discard(name)
                served[name] = model
                unavailable.pop(name, None)
                events.append(self.record(name, "served", model.version, model.verified.get("reason"), model))
            if events:
                self.catalog = Catalog.of(served, unavailable)
            return events

    def record(self, name: str, event: str, version: str | None, reason: str | None = None,
               model: ServedModel | None = None, step: str | None = None) -> dict:
        """One change: into the model's history, the log and the metrics. `reason`: why a version was
        rejected, or why a served one is unverified."""
        entry = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "event": event, "version": version}
        if reason:
            entry["reason" if event == "rejected" else "note"] = reason
        self.history[name].append(entry)
        self.metrics.reloads.labels(name, event).inc()
        level = logging.ERROR if event == "rejected" else logging.INFO
        where = f" on {model.runner.device} ({model.runner.provider})" if model is not None else ""
        log.log(level, "model %s version %s %s%s in process %d%s", name, version, event, where, os.getpid(),
                f": {reason}" if reason else "")
        if model is not None:
            self.set_gauge(self.metrics.model_info, self.info, name,
                           (name, version, "ready", model.runner.device, model.runner.provider))
        elif event == "removed":
            self.set_gauge(self.metrics.model_info, self.info, name, None)
        elif name not in self.catalog.served:
            self.set_gauge(self.metrics.model_info, self.info, name, (name, version or "", "unavailable", "", ""))
        self.set_gauge(self.metrics.rejected, self.rejected, name,
                       (name, version or "", step) if event == "rejected" else None)
        return {"model": name, **entry}

    @staticmethod
    def set_gauge(gauge, current: dict, name: str, labels: tuple | None) -> None:
        """One series set to 1 per model (`current` remembers which): the previous one goes to 0."""
        previous = current.pop(name, None)
        if previous is not None:
            gauge.labels(*previous).set(0)
        if labels is not None:
            current[name] = labels
            gauge.labels(*labels).set(1)
