"""LitServe runs the service: the HTTP processes sharing the port, start-up, graceful shutdown.

This is the only module that imports litserve (pinned to LITSERVE_CHECKED). It is used through its
constructor parameters (`healthcheck_path`, `info_path`, `middlewares`, `restart_workers`) and
run()'s uvicorn keyword arguments; the digitserve routes are a FastAPI router included in the app
LitServe builds. What LitServe offers no parameter for: its own `/` and `/predict` routes and the
drain time (`litserve_workarounds()`, which fails loudly if they are not as expected), and, in
`run()`, the process handling around it: its queue manager inherits the listening socket (found
when it is forked), its main loop ends with EOFError when that manager dies, and it stops the HTTP
processes one after another. tests/test_server.py exercises each of these on a real server.

LitServe also always starts a worker process for its LitAPI, fed by a multiprocessing.Manager
queue. digitserve's requests never take that path (serving/batcher.py says why), so the LitAPI
here loads nothing: that worker holds no model and no GPU memory.
"""
import asyncio
import ctypes
import logging
import multiprocessing
import os
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import asynccontextmanager
from pathlib import Path

import litserve as ls
from fastapi import APIRouter
from starlette.routing import Route

from serving import routes
from serving.config import Config, open_files_needed
from serving.connections import Limits, guarded_protocol
from serving.metrics import RequestMetrics
from serving.service import Service, StartupError

log = logging.getLogger("digitserve")

LITSERVE_CHECKED = "0.2.19"
GRACEFUL_SHUTDOWN_SECONDS = 7  # in-flight requests get this long after SIGTERM; orchestrators wait 10 s or more
API_PATH = "/predict"


class IdleLitAPI(ls.LitAPI):
    """LitServe's model hook, in LitServe's own worker process, which receives no requests."""

    def setup(self, device):
        # Ctrl-C signals the whole process group; if this spawned worker died of it first, LitServe
        # would report a crash and race the main process's orderly shutdown, which ends it by SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the HTTP processes' business
        die_with_parent()

    def predict(self, x):
        raise NotImplementedError("digitserve answers /predict in its HTTP processes (serving/batcher.py)")


def die_with_parent(parent: int | None = None) -> None:
    """Linux: be killed when the main process dies, even by SIGKILL (the OOM killer), instead of
    living on as an orphan that holds the port or a GPU. `parent`: exit at once if it is already gone."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if parent is not None and os.getppid() != parent:
            os._exit(1)


class HttpProcesses:
    """The HTTP processes LitServe forks, watched from the main process.

    LitServe 0.2.19 replaces a dead worker of its own (restart_workers) but not a dead HTTP process:
    the port would stay open with less capacity, or none. So a dead one stops the whole server, which
    exits 1 within seconds for its supervisor (Kubernetes, Docker, systemd) to restart it. Each HTTP
    process records its pid at start-up, through a router whose only job is that lifespan, and
    reloads its models on SIGHUP (which the main process forwards to every one)."""

    def __init__(self, count: int, reload):
        self.reload = reload               # coroutine function: follow the exports folder now
        self.pids = multiprocessing.get_context("fork").Array("i", count)  # shared before LitServe forks
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

    def watch(self, every: float = 0.5) -> None:
        """Start a thread that notes when every HTTP process is up, delivers a stop that arrived
        earlier, and stops the server when one has died."""
        def loop():
            while not self.stopping.is_set():
                time.sleep(every)
                if not self.started.is_set() and all(self.pids):
                    self.started.set()
                    if self.stop_pending:
                        os.kill(os.getpid(), signal.SIGTERM)
                dead = [pid for pid in self.running() if not alive(pid)]
                if dead and not self.stopping.is_set():
                    log.error("HTTP process %s died and LitServe does not replace it: stopping the server (exit 1) "
                              "so that its supervisor restarts it", dead[0])
                    self.failed.set()
                    os.kill(os.getpid(), signal.SIGTERM)  # the graceful path: the other processes drain
                    return
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


def release_listening_socket(port: int) -> None:
    """Let go of this process's copy of the listening socket (the main process when the stop begins,
    LitServe's queue manager at once).

    LitServe binds the socket in the main process and the HTTP processes accept on copies of it.
    They stop accepting as they drain; while any other process still held a copy, the kernel would
    keep completing new connections into a queue no one reads, and reset them at exit. Without
    those copies the socket closes with the last HTTP process, and later connections are refused,
    never cut off. The descriptor is pointed at /dev/null, not closed, so that LitServe's own close
    of it finds a valid one."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        for name in os.listdir("/proc/self/fd"):
            if server_socket(int(name), port):
                os.dup2(devnull, int(name))
    finally:
        os.close(devnull)


def server_socket(fd: int, port: int) -> bool:
    """`fd` is a socket bound to `port` and connected to nobody: the one LitServe bound (listening once
    uvicorn starts), not an accepted connection."""
    try:
        copy = os.dup(fd)
    except OSError:
        return False  # closed since it was listed (listdir's own descriptor)
    try:
        candidate = socket.socket(fileno=copy)
    except OSError:
        os.close(copy)
        return False  # not a socket
    with candidate:
        try:
            bound = candidate.getsockname()
        except OSError:
            return False
        try:
            candidate.getpeername()
            return False
        except OSError:
            return isinstance(bound, tuple) and len(bound) >= 2 and bound[1] == port


def build(config: Config) -> tuple[ls.LitServer, Service, HttpProcesses]:
    """The LitServer with the digitserve routes; raises service.StartupError."""
    service = Service(config)
    processes = HttpProcesses(config.workers, lambda: service.lifecycle.reload(retry=True))
    main_pid = os.getpid()
    service.notify_other_processes = lambda: os.kill(main_pid, signal.SIGHUP)  # which forwards it to them all
    server = ls.LitServer(
        IdleLitAPI(api_path=API_PATH),
        accelerator="cpu",  # LitServe's worker does nothing: no device of its own, no CUDA context
        healthcheck_path="/litserve/health", info_path="/litserve/info",  # ours are /health, /ready
        middlewares=[(RequestMetrics, {"metrics": service.metrics})],
        restart_workers=True,  # a killed LitServe worker is replaced rather than taking the server down
    )
    litserve_workarounds(server)
    routes.install(server.app, service)
    server.app.include_router(processes.router)
    return server, service, processes


def limits(config: Config) -> Limits:
    return Limits(config.read_timeout, config.send_timeout, config.max_url_bytes, config.max_header_count,
                  config.max_header_bytes)


def check_can_listen(host: str, port: int) -> None:
    """A busy port, said before anything is loaded (LitServe binds it only after forking its processes)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as err:
            raise StartupError(f"cannot listen on {host}:{port}: {err.strerror} (is another server there? choose "
                               "another --port)") from None


def litserve_workarounds(server: ls.LitServer) -> None:
    """What LitServe 0.2.19 has no parameter for.

    - It always registers `GET /` ("litserve running") and `POST API_PATH` (its queue path to the
      worker); digitserve serves its page at / and /predict itself, so both routes go.
    - Its FastAPI app keeps FastAPI's /docs and /redoc, which load their scripts from a CDN (blank
      offline); digitserve serves /docs from local files, so these go too.
    - The drain time after SIGTERM is an attribute, not a constructor parameter.
    """
    page = frozenset({"GET", "HEAD"})
    theirs = {("/", frozenset({"GET"})), (API_PATH, frozenset({"POST"})), ("/docs", page),
              ("/docs/oauth2-redirect", page), ("/redoc", page)}
    found = [route for route in server.app.router.routes
             if isinstance(route, Route) and (route.path, frozenset(route.methods)) in theirs]
    if len(found) != len(theirs) or not hasattr(server, "uvicorn_graceful_timeout"):
        raise RuntimeError(f"litserve {ls.__version__} differs from {LITSERVE_CHECKED}, which serving/server.py "
                           f"was written against: check litserve_workarounds()")
    for route in found:
        server.app.router.routes.remove(route)
    server.uvicorn_graceful_timeout = GRACEFUL_SHUTDOWN_SECONDS


def run(server: ls.LitServer, service: Service, processes: HttpProcesses) -> int:
    """Serve until SIGTERM or SIGINT (exit status 0) or an HTTP process dies (1), then drain."""
    main_pid, config = os.getpid(), service.config
    forking = {}

    def before_fork():  # in this process, about to fork
        forking["manager"] = any(frame.filename.endswith(os.path.join("multiprocessing", "managers.py"))
                                 for frame in traceback.extract_stack())
        # Forking an HTTP process: LitServe has spawned its worker (which kept SIGHUP ignored), so from
        # now on SIGHUP reloads. (The queue manager is forked before the worker is spawned.)
        if not forking["manager"] and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, forward_reload)

    def after_fork():  # in the child
        die_with_parent(main_pid)
        if forking["manager"]:
            # LitServe forks its queue manager after binding the port: the manager would hold the
            # listening socket until the very end, and the kernel would keep completing connections
            # that no process accepts, then reset them.
            release_listening_socket(config.port)

    # LitServe's forks: its queue manager and the HTTP processes.
    os.register_at_fork(before=before_fork, after_in_child=after_fork)

    def stop_gracefully(signum, frame):
        """SIGTERM (docker stop, Kubernetes) and SIGINT (Ctrl-C) take LitServe's graceful path: the HTTP
        processes stop accepting and finish in-flight requests, then the workers stop, then we return.

        LitServe's forked children inherit this handler, and Ctrl-C or a cgroup-wide stop (systemd)
        signals them all at once."""
        if os.getpid() == main_pid:
            if processes.stopping.is_set():
                return  # already stopping: let the drain finish
            if not processes.started.is_set():
                processes.stop_pending = True  # LitServe is still forking: interrupting it would leave debris
                return
            processes.stopping.set()
            release_listening_socket(config.port)
            for pid in processes.running():  # LitServe stops them one after another, 7 s each at worst
                os.kill(pid, signal.SIGTERM)
            raise KeyboardInterrupt
        if os.getpid() not in processes.running():
            return  # LitServe's queue manager (forked before any HTTP process started): LitServe stops it last
        # An HTTP process: uvicorn caught the signal, drained, and raised it again. End quietly (the
        # default prints a KeyboardInterrupt traceback) and ignore the SIGTERM the main process may
        # still send, which would cut asyncio's own clean-up short.
        for name in (signal.SIGTERM, signal.SIGINT):
            signal.signal(name, signal.SIG_IGN)
        sys.exit(0)

    def forward_reload(signum, frame):  # `kill -HUP` to the server, or POST /models/reload in any HTTP process
        if os.getpid() == main_pid:
            processes.forward_reload()

    signal.signal(signal.SIGTERM, stop_gracefully)
    signal.signal(signal.SIGINT, stop_gracefully)
    # Ignored until LitServe's worker is spawned (it keeps an ignored signal across exec, not a
    # handler): a SIGHUP before then must not kill it, which would hang LitServe's start-up.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    allow_many_connections(config.max_connections)
    return_freed_memory()  # before LitServe forks: the HTTP processes inherit it
    processes.watch()
    try:
        # The keyword arguments after LitServe's own go to uvicorn: our connection guards, and its cap.
        server.run(host=config.host, port=config.port, num_api_servers=config.workers, generate_client_file=False,
                   log_level="warning", http=guarded_protocol(limits(config), service.metrics.refused, service.admission),
                   limit_concurrency=config.max_connections)
    except KeyboardInterrupt:
        pass  # a stop that arrived while LitServe was already draining
    except (EOFError, ConnectionError):  # LitServe's run() waits on its queue manager, which is gone
        log.error("LitServe's queue manager process died: stopping the server (exit 1) so that its supervisor "
                  "restarts it")
        return 1
    finally:
        processes.stopping.set()  # from here on a signal only ends what is ending anyway
    return 1 if processes.failed.is_set() else 0
