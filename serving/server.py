"""LitServe runs the service: it launches the HTTP processes sharing the port, and drains them.

The decision, stated once: LitServe is digitserve's launcher, not its request path. LitServe's own
path hands every request to a separate worker process through a multiprocessing.Manager queue (an
IPC round trip per request, and a worker polling that queue every millisecond); on the 2-core
development VM that ran at 0.21x the throughput of a plain FastAPI + ONNX Runtime endpoint
(bench/RESULTS.md, "Serving"). So requests are answered inside the HTTP processes LitServe forks:
the digitserve routes (serving/api/) are included in the FastAPI app LitServe builds, and the models
run in each process's dynamic batcher (serving/batcher.py). LitServe still starts its worker process
for its LitAPI; the LitAPI here loads nothing, so that worker holds no model and no GPU memory.

This is the only module that imports litserve (pinned to LITSERVE_CHECKED). It is used through its
constructor parameters (`healthcheck_path`, `info_path`, `middlewares`, `restart_workers`) and
run()'s uvicorn keyword arguments (the protocol class of serving/connections.py, the connection
cap). What it offers no parameter for is in `litserve_workarounds()`, which fails loudly if LitServe
is not as expected; the process handling around it is serving/processes.py's.
tests/serving/test_processes.py exercises each of these on a real server.
"""
import logging
import os
import signal

import litserve as ls
from starlette.middleware.gzip import GZipMiddleware
from starlette.routing import Route

from serving import api
from serving.config import Config
from serving.connections import guarded_protocol
from serving.processes import HttpProcesses, die_with_parent
from serving.service import Service

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


def build(config: Config) -> tuple[ls.LitServer, Service, HttpProcesses]:
    """The LitServer with the digitserve routes; raises errors.StartupError."""
    service = Service(config)
    processes = HttpProcesses(config.workers, config.port, lambda: service.lifecycle.reload(retry=True),
                              lambda: sorted(service.catalog.served), url(config))
    service.lifecycle.announce = processes.report  # in each HTTP process: the main process says it once
    main_pid = os.getpid()
    service.notify_other_processes = lambda: os.kill(main_pid, signal.SIGHUP)  # which forwards it to them all
    server = ls.LitServer(
        IdleLitAPI(api_path=API_PATH),
        accelerator="cpu",  # LitServe's worker does nothing: no device of its own, no CUDA context
        healthcheck_path="/litserve/health", info_path="/litserve/info",  # ours are /health, /ready
        middlewares=api.middlewares(service),
        restart_workers=True,  # a killed LitServe worker is replaced rather than taking the server down
    )
    litserve_workarounds(server)
    api.install(server.app, service)
    server.app.include_router(processes.router)
    return server, service, processes


def url(config: Config) -> str:
    return f"http://{f'[{config.host}]' if ':' in config.host else config.host}:{config.port}"


def litserve_workarounds(server: ls.LitServer) -> None:
    """What LitServe 0.2.19 has no parameter for.

    - It always registers `GET /` ("litserve running") and `POST API_PATH` (its queue path to the
      worker); digitserve serves its page at / and /predict itself, so both routes go.
    - Its FastAPI app keeps FastAPI's /docs and /redoc, which load their scripts from a CDN (blank
      offline); digitserve serves /docs from local files, so these go too.
    - The drain time after SIGTERM is an attribute, not a constructor parameter.
    - It always adds GZipMiddleware (for non-streaming APIs), one more layer around every request;
      digitserve's answers are a few hundred bytes of JSON, which gzip does not pay for.
    """
    page = frozenset({"GET", "HEAD"})
    theirs = {("/", frozenset({"GET"})), (API_PATH, frozenset({"POST"})), ("/docs", page),
              ("/docs/oauth2-redirect", page), ("/redoc", page)}
    found = [route for route in server.app.router.routes
             if isinstance(route, Route) and (route.path, frozenset(route.methods)) in theirs]
    gzip = [m for m in server.app.user_middleware if m.cls is GZipMiddleware]
    if len(found) != len(theirs) or not hasattr(server, "uvicorn_graceful_timeout") or len(gzip) != 1:
        raise RuntimeError(f"litserve {ls.__version__} differs from {LITSERVE_CHECKED}, which serving/server.py "
                           f"was written against: check litserve_workarounds()")
    for route in found:
        server.app.router.routes.remove(route)
    server.app.user_middleware.remove(gzip[0])  # the middleware stack is built at the first request
    server.uvicorn_graceful_timeout = GRACEFUL_SHUTDOWN_SECONDS


def run(server: ls.LitServer, service: Service, processes: HttpProcesses) -> int:
    """Serve until SIGTERM or SIGINT (exit status 0) or an HTTP process dies (1), then drain."""
    config = service.config
    processes.supervise(config.max_connections)
    try:
        # The keyword arguments after LitServe's own go to uvicorn: our protocol, and its connection cap.
        server.run(host=config.host, port=config.port, num_api_servers=config.workers, generate_client_file=False,
                   log_level="warning", http=guarded_protocol(config, service.metrics.refused, service.admission),
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
