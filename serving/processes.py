"""The server's processes, watched from the main one: plain POSIX supervision around the processes
LitServe makes (serving/server.py says why LitServe is the launcher).

LitServe 0.2.19, in its run(): binds the port, forks a multiprocessing queue manager, spawns one
worker process for its LitAPI, forks the HTTP processes, then waits on the manager. What this module
adds, none of which LitServe has a parameter for:
- every child dies with the main process (Linux PR_SET_PDEATHSIG), even when that is killed with
  SIGKILL, instead of living on as an orphan that holds the port or a GPU;
- a dead HTTP process stops the whole server (exit 1, for its supervisor to restart it): LitServe
  replaces a dead worker of its own, but not an HTTP process, and the port would stay open with less
  capacity, or none;
- SIGTERM and SIGINT drain (the HTTP processes stop accepting and answer what they accepted), also
  when they arrive while LitServe is still forking; SIGHUP, forwarded to every HTTP process, reloads
  the exports folder;
- each HTTP process listens on a socket of its own, so that the kernel spreads connections over
  them (serving/sockets.py);
- the open-files limit is raised for --max-connections, and glibc returns freed memory.
"""
import asyncio
import ctypes
import json
import logging
import multiprocessing
import os
import resource
import signal
import sys
import threading
import time
import traceback
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter

from serving import announcements
from serving.config import open_files_needed
from serving.sockets import listen_apart

log = logging.getLogger("digitserve")


def die_with_parent(parent: int | None = None) -> None:
    """Linux: be killed when the main process dies, even by SIGKILL (the OOM killer), instead of
    living on as an orphan that holds the port or a GPU. `parent`: exit at once if it is already gone."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if parent is not None and os.getppid() != parent:
            os._exit(1)


class HttpProcesses:
    """The HTTP processes LitServe forks, watched from the main process.

    Each HTTP process records its pid at start-up, through a router whose only job is that lifespan,
    reports what it serves and how its models change (serving/announcements.py: the main process
    says each once), and reloads its models on SIGHUP (which the main process forwards to every one)."""

    def __init__(self, count: int, port: int, reload, served, url: str):
        self.reload = reload               # coroutine function: follow the exports folder now
        self.served = served               # function: the names this process serves now
        self.port, self.url = port, url
        context = multiprocessing.get_context("fork")  # all shared before LitServe forks
        self.pids = context.Array("i", count)
        self.reports, self.reporter = context.Pipe(duplex=False)
        self.started = threading.Event()   # every HTTP process is up: LitServe waits in its main loop
        self.stop_pending = False          # a stop asked for before that, delivered once started
        self.stopping = threading.Event()  # a deliberate stop: processes ending now are not failures
        self.failed = threading.Event()
        self.router = APIRouter(lifespan=self.lifespan)

    @asynccontextmanager
    async def lifespan(self, app):
        with self.pids.get_lock():
            free = [i for i, pid in enumerate(self.pids) if pid == 0]
            if free:
                self.pids[free[0]] = os.getpid()
        listen_apart(self.port, self.running)  # known to the main process first: it stops the server if this fails
        self.report({"kind": "ready", "models": self.served()})
        loop, reloads = asyncio.get_running_loop(), set()

        def reload_soon():
            task = loop.create_task(self.reload())
            reloads.add(task)  # held until done: the loop keeps only weak references to tasks
            task.add_done_callback(reloaded)

        def reloaded(task):
            reloads.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("reload on SIGHUP failed", exc_info=task.exception())
        loop.add_signal_handler(signal.SIGHUP, reload_soon)
        # The models loaded before this process was known to the main process, which forwarded it no
        # SIGHUP meanwhile: one more look catches a model published then (a no-op otherwise).
        reload_soon()
        yield
        loop.remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a late SIGHUP must not end a draining process

    def report(self, message: dict) -> None:
        """In an HTTP process: tell the main process (one write, atomic below PIPE_BUF bytes)."""
        self.reporter.send_bytes(json.dumps({"kind": "change", **message, "pid": os.getpid()}).encode())

    def forward_reload(self) -> None:
        """In the main process: every HTTP process, reload (SIGHUP to it); none while stopping."""
        if self.stopping.is_set():
            return
        for pid in self.running():
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGHUP)
                except ProcessLookupError:  # ended since
                    pass

    def running(self) -> list[int]:
        return [pid for pid in self.pids if pid]

    def supervise(self, connections: int) -> None:
        """In the main process, before LitServe's run(): the signal handlers, the fork hooks, the
        limits the children inherit, and the watch."""
        main_pid = os.getpid()

        def before_fork():  # in this process, about to fork
            manager = any(frame.filename.endswith(os.path.join("multiprocessing", "managers.py"))
                          for frame in traceback.extract_stack())
            # Forking an HTTP process: LitServe has spawned its worker (which kept SIGHUP ignored), so
            # from now on SIGHUP reloads. (The queue manager is forked before the worker is spawned.)
            if not manager and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGHUP, forward_reload)

        def after_fork():  # in the child
            die_with_parent(main_pid)

        def stop_gracefully(signum, frame):
            """SIGTERM (docker stop, Kubernetes) and SIGINT (Ctrl-C) take LitServe's graceful path: the
            HTTP processes stop accepting and finish in-flight requests, then the workers stop, then
            run() returns. LitServe's forked children inherit this handler, and Ctrl-C or a cgroup-wide
            stop (systemd) signals them all at once."""
            if os.getpid() == main_pid:
                if self.stopping.is_set():
                    return  # already stopping: let the drain finish
                if not self.started.is_set():
                    self.stop_pending = True  # LitServe is still forking: interrupting it would leave debris
                    return
                self.stopping.set()
                for pid in self.running():  # LitServe stops them one after another, 7 s each at worst
                    os.kill(pid, signal.SIGTERM)
                raise KeyboardInterrupt
            if os.getpid() not in self.running():
                return  # LitServe's queue manager (forked before any HTTP process started): stopped last
            # An HTTP process: uvicorn caught the signal, drained, and raised it again. End quietly (the
            # default prints a KeyboardInterrupt traceback) and ignore the SIGTERM the main process may
            # still send, which would cut asyncio's own clean-up short.
            for name in (signal.SIGTERM, signal.SIGINT):
                signal.signal(name, signal.SIG_IGN)
            sys.exit(0)

        def forward_reload(signum, frame):  # `kill -HUP` to the server, or POST /models/reload anywhere
            if os.getpid() == main_pid:
                self.forward_reload()

        os.register_at_fork(before=before_fork, after_in_child=after_fork)
        signal.signal(signal.SIGTERM, stop_gracefully)
        signal.signal(signal.SIGINT, stop_gracefully)
        # Ignored until LitServe's worker is spawned (it keeps an ignored signal across exec, not a
        # handler): a SIGHUP before then must not kill it, which would hang LitServe's start-up.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        allow_many_connections(connections)
        return_freed_memory()  # before LitServe forks: the HTTP processes inherit it
        self.watch()

    def watch(self, every: float = 0.5) -> None:
        """Start a thread that says what the HTTP processes report, notes when every one is up,
        delivers a stop that arrived earlier, and stops the server when one has died."""
        gathering = announcements.Gathering(len(self.pids))

        def loop():
            announced = False
            while not self.stopping.is_set():
                while self.reports.poll(every):
                    gathering.add(json.loads(self.reports.recv_bytes()), time.monotonic())
                gathering.flush(time.monotonic())
                if not announced and (models := gathering.all_ready()) is not None:
                    log.info("ready: %s serves %s (%d HTTP processes)", self.url, ", ".join(models) or "no model",
                             len(self.pids))
                    announced = True
                if not self.started.is_set() and all(self.pids):
                    self.started.set()
                    if self.stop_pending:
                        os.kill(os.getpid(), signal.SIGTERM)
                dead = [pid for pid in self.running() if not alive(pid)]
                if dead and not self.failed.is_set() and not self.stopping.is_set():  # not those a stop ends
                    log.error("HTTP process %s died and LitServe does not replace it: stopping the server (exit 1) "
                              "so that its supervisor restarts it", dead[0])
                    self.failed.set()
                    # The graceful path: the other processes drain. Before every HTTP process is up the
                    # stop waits for them (stop_pending), and this loop goes on to deliver it.
                    os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=loop, name="http-process-watch", daemon=True).start()


def alive(pid: int) -> bool:
    """Running: not gone, and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def return_freed_memory() -> None:
    """glibc: allocations of 1 MiB and more are mapped and unmapped, so that memory comes back when
    freed. By default glibc raises that threshold (to 32 MB) after the first such free and keeps later
    blocks in its per-thread arenas: decoding a few of the largest uploads (up to 64 MB of temporaries
    each) in the decoder threads then held hundreds of MB for good (bench/soak.py)."""
    if sys.platform == "linux":
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; setting it also stops its adjustment


def allow_many_connections(connections: int) -> None:
    """Raise the open-files limit (often 1024) to what --max-connections in each of the processes
    needs, within the hard limit (which config.check_open_files made sure is enough)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = open_files_needed(connections)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
