"""Which model versions an HTTP process serves, and how that changes while it runs.

At start-up, and whenever the exports folder changes (polled every --reload-interval seconds, or at
once on POST /models/reload or SIGHUP), every new or changed model folder is verified before it is
served (serving/verify.py). A version that fails is not served: the version before it keeps
answering, and the rejection is kept in the model's history (`/models/{name}`), the log and
/metrics.

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
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from export_contract.publish import model_folders
from serving import announcements, registry
from serving.config import Config
from serving.inference import ServedModel
from serving.metrics import Metrics
from serving.routing import Catalog
from serving.verify import Rejected, build

log = logging.getLogger("digitserve")

HISTORY_LENGTH = 50  # events kept per model name
# Steps that may pass on another try with the same files (memory, a driver, a bug's circumstances).
# A missing or wrong test file in --data-dir is not among them: a change there is seen by every look.
RETRYABLE_STEPS = {"load", "unexpected"}
RETRY_SECONDS = 30  # an asked-for reload checks such a version again at most this often
CHECK_SECONDS = 300  # checking one folder (read, load, verify) longer than this rejects it, freeing the look


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


def data_dir_stamp(data_dir: Path | None) -> tuple | None:
    """What changes when a test file in the data folder (--data-dir) appears, goes or changes."""
    if data_dir is None:
        return None
    try:
        return tuple(sorted((e.name, st.st_size, st.st_mtime_ns) for e in os.scandir(data_dir) if e.is_file()
                            for st in [e.stat()]))
    except OSError:
        return ()


@dataclass(eq=False)
class Look:
    """A look at the exports folder that asks wait for; `retry` if any of them asked for it."""
    retry: bool
    task: asyncio.Task | None = None


def as_rejected(name: str, err: Exception) -> "Rejected":
    if isinstance(err, Rejected):
        return err
    if isinstance(err, TimeoutError):
        return Rejected(None, f"checking it took longer than {CHECK_SECONDS} s", "unexpected")
    log.error("model %s: checking the new folder failed", name, exc_info=err)
    return Rejected(None, f"checking it failed unexpectedly ({type(err).__name__}: see the server's log)", "unexpected")


class Lifecycle:
    """This process's catalog, kept in line with the exports folder."""

    def __init__(self, config: Config, device: str, metrics: Metrics):
        self.config, self.device, self.metrics = config, device, metrics
        self.catalog = Catalog()
        self.stamps: dict[str, tuple] = {}    # name -> what its folder (and the data folder) looked like when checked
        self.history: dict[str, deque] = {}   # name -> its events; only names of folders ever found
        self.info: dict[str, tuple] = {}      # name -> its digitserve_model_info labels now set to 1
        self.rejected: dict[str, tuple] = {}  # name -> its digitserve_model_rejected labels now set to 1
        self.retryable: dict[str, float] = {}  # name -> when its last version failed for a cause outside its files
        self.lock = asyncio.Lock()            # one look at a time
        self.next_look: Look | None = None    # the look that asks made during the current one wait for
        self.emptied = False                  # the folder was found empty and the models kept
        self.task: asyncio.Task | None = None
        self.announce = announcements.in_this_process  # the server gathers them in its main process

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
        `retry` (asked for: POST /models/reload, SIGHUP): also check again a version that failed for a
        cause outside its files (loading it, a bug), at most once a RETRY_SECONDS.

        Asks are coalesced: every ask made while a look runs waits for the one look that starts after
        it, which sees the folder as it was when they asked. Twenty asks cost at most two looks."""
        look = self.next_look
        if look is None:
            look = self.next_look = Look(retry)
            look.task = asyncio.get_running_loop().create_task(self.look_when_free(look))
        look.retry |= retry
        return await asyncio.shield(look.task)  # a caller that goes away does not cancel it for the others

    async def look_when_free(self, look: "Look") -> list[dict]:
        async with self.lock:
            self.next_look = None  # asks from now on wait for the next look
            return await self.look(look.retry)

    async def look(self, retry: bool) -> list[dict]:
        try:
            folders = await asyncio.to_thread(model_folders, self.config.exports)
        except OSError as err:  # a volume briefly away must not unload every model
            log.error("cannot read the exports folder %s (%s): serving what was loaded", self.config.exports,
                      err.strerror)
            return []
        if not folders and self.catalog.served:  # an unmounted volume looks like this too
            if not self.emptied:
                log.error("the exports folder %s is empty: keeping the %d models served until one is published "
                          "again", self.config.exports, len(self.catalog.served))
            self.emptied = True
            return []
        self.emptied = False
        found = {registry.display_name(folder): folder for folder in folders}
        outside = await asyncio.to_thread(data_dir_stamp, self.config.data_dir)
        served, unavailable = dict(self.catalog.served), dict(self.catalog.unavailable)
        events = []
        for name in sorted(set(self.stamps) - set(found)):
            del self.stamps[name]
            self.retryable.pop(name, None)
            gone = served.pop(name, None)
            unavailable.pop(name, None)
            events.append(self.record(name, "removed", gone.version if gone else None))
        for name, folder in found.items():
            stamp = await asyncio.to_thread(folder_stamp, folder)
            if stamp is None:
                continue  # changing right now: the next look decides
            stamp = (*stamp, outside)
            if self.stamps.get(name) == stamp and not (retry and self.due_for_retry(name)):
                continue
            self.stamps[name] = stamp
            self.metrics.models.add(name)
            try:
                model = await asyncio.wait_for(
                    asyncio.to_thread(build, folder, self.config, self.device, served.get(name)), CHECK_SECONDS)
            except Exception as err:  # Rejected, or a bug: either way this version is not served
                err = as_rejected(name, err)
                if name not in served:
                    unavailable[name] = err.reason
                if err.step in RETRYABLE_STEPS:
                    self.retryable[name] = time.monotonic()
                else:
                    self.retryable.pop(name, None)
                events.append(self.record(name, "rejected", err.version, err.reason, step=err.step))
                continue
            self.retryable.pop(name, None)
            served[name] = model
            unavailable.pop(name, None)
            events.append(self.record(name, "served", model.version, model.verified.get("reason"), model))
        if events:
            self.catalog = Catalog.of(served, unavailable)
        return events

    def due_for_retry(self, name: str) -> bool:
        failed = self.retryable.get(name)
        return failed is not None and time.monotonic() - failed >= RETRY_SECONDS

    def record(self, name: str, event: str, version: str | None, reason: str | None = None,
               model: ServedModel | None = None, step: str | None = None) -> dict:
        """One change: into the model's history, the log and the metrics. `reason`: why a version was
        rejected, or why a served one is unverified."""
        entry = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "event": event, "version": version}
        if reason:
            entry["reason" if event == "rejected" else "note"] = reason
        self.history.setdefault(name, deque(maxlen=HISTORY_LENGTH)).append(entry)
        self.metrics.reloads.labels(name, event).inc()
        where = f"{model.runner.device} ({model.runner.provider})" if model is not None else None
        self.announce(announcements.change(name, version, event, reason, where))
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
