"""Where the HTTP processes keep their metrics for /metrics to sum: prometheus_client's multiprocess
mode (checked against prometheus_client PROMETHEUS_CLIENT_CHECKED), made safe on a full disk.

prometheus_client keeps each process's values in memory-mapped files `{kind}_{pid}.db` under
PROMETHEUS_MULTIPROC_DIR, created sparse: when the filesystem is full, the first write into a page
it cannot back kills the process with SIGBUS. So the folder is checked for room at start (without
room, metrics are per process, with a warning: the server still serves), and each process creates
its files itself, allocated in full (`posix_fallocate`), before prometheus_client opens them: it then
takes their size as its capacity and never writes into an unbacked page unless a process needs more
than RESERVED_BYTES of one kind (label values come from bounded sets: it does not).

This module does not import prometheus_client: the folder must be chosen before that import, which
reads PROMETHEUS_MULTIPROC_DIR once.
"""
import logging
import os
import shutil
import tempfile

log = logging.getLogger("digitserve")

PROMETHEUS_CLIENT_CHECKED = "0.26"
ENV = "PROMETHEUS_MULTIPROC_DIR"
KINDS = ("counter", "histogram", "gauge_livesum", "gauge_livemax")  # the multiprocess modes serving/metrics.py uses
RESERVED_BYTES = 1 << 20  # per kind and process (prometheus_client starts at 64 KB and doubles)


def open_folder(processes: int) -> str | None:
    """A new folder for the metrics files of `processes` processes, set as PROMETHEUS_MULTIPROC_DIR; None
    (metrics per process) where the temporary folder has no room for them."""
    folder = tempfile.mkdtemp(prefix="digitserve-metrics-")
    needed = 2 * processes * len(KINDS) * RESERVED_BYTES  # twice: room for a process that replaces one
    status = os.statvfs(folder)
    if status.f_bavail * status.f_frsize < needed:
        log.warning("the temporary folder %s has less than %d MB free for the metrics files: /metrics reports "
                    "only the process that answers it", tempfile.gettempdir(), needed >> 20)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    os.environ[ENV] = folder
    return folder


def folder() -> str | None:
    return os.environ.get(ENV)


def reserve() -> None:
    """This process's files, allocated in full before prometheus_client opens them (call before this
    process's first metric update)."""
    where = folder()
    if where is None:
        return
    for kind in KINDS:
        path = os.path.join(where, f"{kind}_{os.getpid()}.db")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue  # opened by prometheus_client already
        try:
            os.posix_fallocate(fd, 0, RESERVED_BYTES)
        except OSError as err:
            os.unlink(path)  # prometheus_client makes its own, sparse
            log.error("cannot reserve room for this process's metrics (%s): a full disk may stop it", err.strerror)
        finally:
            os.close(fd)
