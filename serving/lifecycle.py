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


class Rejected(Exception):
    def __init__(self, version: str | None, reason: str):
        super().__init__(reason)
        self.version, self.reason = version, reason


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


def folder_stamp(folder: Path) -> tuple | None:
    """What changes when a model folder is replaced or any file in it is (None: it vanished meanwhile)."""
    try:
        files = sorted((path.name, st.st_ino, st.st_size, st.st_mtime_ns)
                       for path in folder.iterdir() for st in [path.lstat()])
        return folder.stat().st_ino, tuple(files)
    except OSError:
        return None


def scan_stamps(exports: Path) -> dict[str, tuple[Path, tuple]]:
    """Every model folder (hidden ones are being written) with its stamp; OSError if the folder is unreadable."""
    found = {}
    for folder in sorted(exports.iterdir()):
        if folder.is_dir() and not folder.name.startswith("."):
            stamp = folder_stamp(folder)
            if stamp is not None:
                found[folder.name] = (folder, stamp)
    return found


def build(folder: Path, config: Config, device: str) -> ServedModel:
    """One model folder, checked, loaded, warmed and verified on its test split; raises Rejected."""
    entry = registry.check_export(folder, config.backend)
    version = entry.manifest["version"] if entry.manifest else None
    if not entry.available:
        raise Rejected(version, entry.error)
    try:
        runner = load_runner(entry, config.backend, device)
    except LoadError as err:
        raise Rejected(version, str(err)) from None
    try:
        x, y = test_data.load(entry, config.data_dir)
    except InputError as err:  # no test split at hand: served, and said to be unverified
        return ServedModel(entry, runner, {"reproduced": None, "reason": err.message})
    measured = contract.test_metrics(run_all(runner, x), y)
    claimed = entry.manifest["metrics"]["test"]
    if not contract.reproduces(measured, claimed):
        raise Rejected(version, f"on its {measured['n']} test images the {config.backend} artifact makes "
                                f"{measured['errors']} errors with NLL {measured['nll']:.6f}; its manifest claims "
                                f"{claimed['errors']} and {claimed['nll']:.6f}")
    return ServedModel(entry, runner, {"reproduced": True, **{k: measured[k] for k in ("errors", "nll", "n")}})


class Lifecycle:
    """This process's catalog, kept in line with the exports folder."""

    def __init__(self, config: Config, device: str, metrics: Metrics):
        self.config, self.device, self.metrics = config, device, metrics
        self.catalog = Catalog()
        self.stamps: dict[str, tuple] = {}
        self.history: dict[str, deque] = defaultdict(lambda: deque(maxlen=HISTORY_LENGTH))
        self.info: dict[str, tuple] = {}  # name -> the digitserve_model_info labels set to 1 for it
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

    async def reload(self) -> list[dict]:
        """Bring the catalog in line with the exports folder; returns what changed (history events)."""
        async with self.lock:
            try:
                found = await asyncio.to_thread(scan_stamps, self.config.exports)
            except OSError as err:  # a volume briefly away must not unload every model
                log.error("cannot read the exports folder %s (%s): serving what was loaded", self.config.exports, err)
                return []
            served, unavailable = dict(self.catalog.served), dict(self.catalog.unavailable)
            events = []
            for name in sorted(set(self.stamps) - set(found)):
                del self.stamps[name]
                gone = served.pop(name, None)
                unavailable.pop(name, None)
                events.append(self.record(name, "removed", gone.version if gone else None))
            for name, (folder, stamp) in found.items():
                if self.stamps.get(name) == stamp:
                    continue
                self.stamps[name] = stamp
                self.metrics.models.add(name)
                try:
                    model = await asyncio.to_thread(build, folder, self.config, self.device)
                except Exception as err:  # Rejected, or a bug: either way this version is not served
                    if not isinstance(err, Rejected):
                        log.exception("model %s: checking the new folder failed", name)
                        err = Rejected(None, f"checking it failed unexpectedly ({type(err).__name__}: see the log)")
                    if name not in served:
                        unavailable[name] = err.reason
                    events.append(self.record(name, "rejected", err.version, err.reason))
                    continue
                served[name] = model
                unavailable.pop(name, None)
                events.append(self.record(name, "served", model.version, model.verified.get("reason"), model))
            if events:
                self.catalog = Catalog.of(served, unavailable)
            return events

    def record(self, name: str, event: str, version: str | None, reason: str | None = None,
               model: ServedModel | None = None) -> dict:
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
            self.set_info(name, (name, version, "ready", model.runner.device, model.runner.provider))
        elif event == "removed":
            self.set_info(name, None)
        elif name not in self.catalog.served:
            self.set_info(name, (name, version or "", "unavailable", "", ""))
        return {"model": name, **entry}

    def set_info(self, name: str, labels: tuple | None) -> None:
        previous = self.info.pop(name, None)
        if previous is not None:
            self.metrics.model_info.labels(*previous).set(0)
        if labels is not None:
            self.info[name] = labels
            self.metrics.model_info.labels(*labels).set(1)
