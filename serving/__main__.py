"""`python -m serving` (or `digitserve`): serve every model in the exports folder over HTTP.

Every flag can also be set by an environment variable (DIGITSERVE_<FLAG>), for containers; a flag
on the command line wins over the variable.
"""
import argparse
import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path

from serving.app import Config, StartupError, build_server

ENV_PREFIX = "DIGITSERVE_"


def env_default(name: str, default, convert=str):
    value = os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"))
    return default if value is None or value == "" else convert(value)


def positive(convert):
    def check(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return check


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    p = Parser(prog="python -m serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exports", type=Path, default=env_default("exports", defaults.exports, Path),
                   help="folder of exported models (DIGITSERVE_EXPORTS; default exports/)")
    p.add_argument("--host", default=env_default("host", defaults.host), help="DIGITSERVE_HOST (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=env_default("port", defaults.port, int), help="DIGITSERVE_PORT (8000)")
    p.add_argument("--backend", choices=["onnx", "torchscript"], default=env_default("backend", defaults.backend),
                   help="DIGITSERVE_BACKEND: ONNX Runtime (default) or TorchScript (needs torch)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=env_default("device", defaults.device),
                   help="DIGITSERVE_DEVICE: auto takes the GPU when one is usable")
    p.add_argument("--max-batch-size", type=positive(int), default=env_default("max_batch_size", defaults.max_batch_size, int),
                   help="DIGITSERVE_MAX_BATCH_SIZE: images batched into one inference call (64)")
    p.add_argument("--batch-timeout", type=non_negative_float,
                   default=env_default("batch_timeout", defaults.batch_timeout, float),
                   help="DIGITSERVE_BATCH_TIMEOUT: extra seconds a batch waits to fill (0: it holds whatever "
                        "arrived while the previous batch ran)")
    p.add_argument("--workers", type=positive(int), default=env_default("workers", defaults.workers, int),
                   help="DIGITSERVE_WORKERS: HTTP processes, each with its own warm models and batcher (2)")
    p.add_argument("--max-payload-bytes", type=positive(int),
                   default=env_default("max_payload_bytes", defaults.max_payload_bytes, int),
                   help="DIGITSERVE_MAX_PAYLOAD_BYTES: larger request bodies get 413 (1 MiB)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ValueError as err:  # a malformed DIGITSERVE_* variable
        print(f"python -m serving: error: bad environment variable: {err}", file=sys.stderr)
        return 2
    config = Config(exports=args.exports, host=args.host, port=args.port, backend=args.backend, device=args.device,
                    max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, workers=args.workers,
                    api_key=os.environ.get(ENV_PREFIX + "API_KEY") or None, max_payload_bytes=args.max_payload_bytes)
    try:
        server, service = build_server(config)
    except StartupError as err:
        print(f"python -m serving: error: {err}", file=sys.stderr)
        return 1
    unavailable = {n: e.error for n, e in service.entries.items() if not e.available}
    for name, reason in unavailable.items():
        print(f"model {name} unavailable: {reason}", file=sys.stderr)
    print(f"serving {', '.join(sorted(service.ready_models))} with {config.backend} on http://{config.host}:{config.port}",
          file=sys.stderr)
    main_pid = os.getpid()

    def stop_gracefully(signum, frame):
        """SIGTERM (docker stop, Kubernetes) and SIGINT (Ctrl-C) take LitServe's graceful path: the HTTP
        processes stop accepting and finish in-flight requests, then the workers stop, then we exit 0.

        LitServe's forked children inherit this handler, and Ctrl-C or a cgroup-wide stop (systemd)
        signals them all at once. Its spawned worker does not: see serving.api.LitServeWorkerAPI."""
        if os.getpid() == main_pid:
            raise KeyboardInterrupt
        if multiprocessing.current_process().name.startswith("SyncManager"):
            return  # LitServe's queue manager: needed while the HTTP side drains, shut down last by message
        # An HTTP process: uvicorn caught the signal, drained, and raised it again. End quietly (the
        # default prints a KeyboardInterrupt traceback) and ignore the SIGTERM the main process may
        # still send, which would cut asyncio's own clean-up short.
        for name in (signal.SIGTERM, signal.SIGINT):
            signal.signal(name, signal.SIG_IGN)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop_gracefully)
    signal.signal(signal.SIGINT, stop_gracefully)
    try:
        server.run(host=config.host, port=config.port, num_api_servers=config.workers, generate_client_file=False,
                   log_level="warning")
    finally:
        shutil.rmtree(service.metrics.folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
