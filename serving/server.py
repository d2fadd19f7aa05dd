"""LitServe runs the service: the HTTP processes sharing the port, start-up, graceful shutdown.

This is the only module that imports litserve. It is used through its constructor parameters
(`healthcheck_path`, `info_path`, `middlewares`, `restart_workers`); the digitserve routes are a
FastAPI router included in the app LitServe builds. What LitServe offers no parameter for sits in
`litserve_workarounds()`, checked against LITSERVE_CHECKED, and tests/test_server.py fails loudly
if an upgrade changes it.

LitServe also always starts a worker process for its LitAPI, fed by a multiprocessing.Manager
queue. digitserve's requests never take that path (serving/batcher.py says why), so the LitAPI
here loads nothing: that worker holds no model and no GPU memory.
"""
import os
import signal
import sys

import litserve as ls
from fastapi.routing import APIRoute

from serving import routes
from serving.config import Config
from serving.metrics import RequestMetrics
from serving.service import Service

LITSERVE_CHECKED = "0.2.19"
GRACEFUL_SHUTDOWN_SECONDS = 7  # in-flight requests get this long after SIGTERM; orchestrators wait 10 s or more
API_PATH = "/predict"


class IdleLitAPI(ls.LitAPI):
    """LitServe's model hook, in LitServe's own worker process, which receives no requests."""

    def setup(self, device):
        # Ctrl-C signals the whole process group; if this spawned worker died of it first, LitServe
        # would report a crash and race the main process's orderly shutdown, which ends it by SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def predict(self, x):
        raise NotImplementedError("digitserve answers /predict in its HTTP processes (serving/batcher.py)")


def build(config: Config) -> tuple[ls.LitServer, Service]:
    """The LitServer with the digitserve routes; raises service.StartupError."""
    service = Service(config)
    server = ls.LitServer(
        IdleLitAPI(api_path=API_PATH),
        accelerator="cpu",  # LitServe's worker does nothing: no device of its own, no CUDA context
        healthcheck_path="/litserve/health", info_path="/litserve/info",  # ours are /health, /ready
        middlewares=[(RequestMetrics, {"metrics": service.metrics})],
        restart_workers=True,  # a killed LitServe worker is replaced rather than taking the server down
    )
    litserve_workarounds(server)
    routes.install(server.app, service)
    return server, service


def litserve_workarounds(server: ls.LitServer) -> None:
    """What LitServe 0.2.19 has no parameter for.

    - It always registers `GET /` ("litserve running") and `POST API_PATH` (its queue path to the
      worker); digitserve serves its page at / and /predict itself, so both routes go.
    - The drain time after SIGTERM is an attribute, not a constructor parameter.
    """
    theirs = {("/", frozenset({"GET"})), (API_PATH, frozenset({"POST"}))}
    found = [route for route in server.app.router.routes
             if isinstance(route, APIRoute) and (route.path, frozenset(route.methods)) in theirs]
    if len(found) != len(theirs) or not hasattr(server, "uvicorn_graceful_timeout"):
        raise RuntimeError(f"litserve {ls.__version__} differs from {LITSERVE_CHECKED}, which serving/server.py "
                           f"was written against: check litserve_workarounds()")
    for route in found:
        server.app.router.routes.remove(route)
    server.uvicorn_graceful_timeout = GRACEFUL_SHUTDOWN_SECONDS


def run(server: ls.LitServer, service: Service) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return."""
    main_pid = os.getpid()

    def stop_gracefully(signum, frame):
        """SIGTERM (docker stop, Kubernetes) and SIGINT (Ctrl-C) take LitServe's graceful path: the HTTP
        processes stop accepting and finish in-flight requests, then the workers stop, then we return.

        LitServe's forked children inherit this handler, and Ctrl-C or a cgroup-wide stop (systemd)
        signals them all at once."""
        if os.getpid() == main_pid:
            raise KeyboardInterrupt
        if service.classifier is None:
            return  # LitServe's queue manager (forked before any HTTP process started): LitServe stops it last
        # An HTTP process: uvicorn caught the signal, drained, and raised it again. End quietly (the
        # default prints a KeyboardInterrupt traceback) and ignore the SIGTERM the main process may
        # still send, which would cut asyncio's own clean-up short.
        for name in (signal.SIGTERM, signal.SIGINT):
            signal.signal(name, signal.SIG_IGN)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop_gracefully)
    signal.signal(signal.SIGINT, stop_gracefully)
    config = service.config
    server.run(host=config.host, port=config.port, num_api_servers=config.workers, generate_client_file=False,
               log_level="warning")
