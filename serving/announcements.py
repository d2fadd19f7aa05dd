"""What the server says about its models, once: each change (a version served, rejected, removed) is
one log line, however many HTTP processes made it ("in 2 of 2 HTTP processes"), and start-up ends
with one line saying the server is ready and what it serves.

An HTTP process reports to the main process through a pipe (serving/processes.py); the main process
gathers a change from every process, or for ANNOUNCE_AFTER seconds, then logs it. In a single
process (the tests' in-process server) a change is logged as it happens.
"""
import logging
import os

log = logging.getLogger("digitserve")

ANNOUNCE_AFTER = 3.0  # seconds the main process waits for the other processes to report the same change
MAX_REASON = 1500  # characters of a reason that travel: a report must stay within one atomic pipe write


def change(model: str, version: str | None, event: str, reason: str | None, where: str | None) -> dict:
    return {"model": model, "version": version, "event": event, "reason": (reason or "")[:MAX_REASON],
            "where": where or ""}


def text(report: dict, processes: str) -> str:
    where = f" on {report['where']}" if report["where"] else ""
    reason = f": {report['reason']}" if report["reason"] else ""
    return f"model {report['model']} version {report['version']} {report['event']}{where} {processes}{reason}"


def log_change(report: dict, processes: str) -> None:
    log.log(logging.ERROR if report["event"] == "rejected" else logging.INFO, "%s", text(report, processes))


def in_this_process(report: dict) -> None:
    log_change(report, f"in process {os.getpid()}")


class Gathering:
    """In the main process: the same change from several HTTP processes, logged once."""

    def __init__(self, processes: int):
        self.processes = processes
        self.pending: dict[tuple, tuple[float, set]] = {}  # change -> (first seen, pids)
        self.ready: dict[int, list[str]] = {}

    def add(self, report: dict, now: float) -> None:
        pid = report.pop("pid")
        if report.pop("kind") == "ready":
            self.ready[pid] = report["models"]
            return
        key = tuple(sorted(report.items()))
        first, pids = self.pending.setdefault(key, (now, set()))
        pids.add(pid)

    def flush(self, now: float) -> None:
        for key, (first, pids) in list(self.pending.items()):
            if len(pids) >= self.processes or now - first >= ANNOUNCE_AFTER:
                del self.pending[key]
                log_change(dict(key), f"in {len(pids)} of {self.processes} HTTP processes")

    def all_ready(self) -> list[str] | None:
        """What every HTTP process serves, once all have started (None before)."""
        if len(self.ready) < self.processes:
            return None
        return sorted(set().union(*self.ready.values()))
