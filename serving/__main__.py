"""`python -m serving` (or `digitserve`): serve every model in the exports folder over HTTP.

Settings come from flags and DIGITSERVE_* variables (serving/config.py); --help lists them.
"""
import logging
import shutil
import sys

from serving import config as settings
from serving import metrics_files
from serving.errors import StartupError
from serving.request_ids import RequestIdFilter

PROG = "python -m serving"


def main(argv: list[str] | None = None) -> int:
    try:
        config = settings.parse(argv)
    except settings.ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    # digitserve's own lines from INFO (which model version each process serves, on which device);
    # the libraries' from WARNING.
    # A line about a request carries its ID (serving/request_ids.py); other lines "-".
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s",
                        level=logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
    logging.getLogger("digitserve").setLevel(logging.INFO)
    # Every HTTP process counts into files here and /metrics sums them (prometheus_client's
    # multiprocess mode); it must be set before prometheus_client is first imported.
    metrics_dir = metrics_files.open_folder(config.workers + 1)
    try:
        from serving import server, sockets
        try:
            sockets.check_can_listen(config.host, config.port)
            litserver, service, http_processes = server.build(config)
        except StartupError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 1
        print(f"starting {config.workers} HTTP processes for {server.url(config)} ({config.backend} on "
              f"{service.device}): each verifies {', '.join(sorted(service.entries))} before serving it; a line "
              f"says when they are ready", file=sys.stderr)
        return server.run(litserver, service, http_processes)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
