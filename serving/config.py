"""The server's settings: command-line flags and their DIGITSERVE_* environment variables.

Every flag has a variable (`--max-batch-size` <-> DIGITSERVE_MAX_BATCH_SIZE), both go through the
same checks, and the flag wins. Bad values are refused here, before anything starts, as one line.
"""
import argparse
import os
import resource
from dataclasses import dataclass, fields
from pathlib import Path

from serving.backends import BACKENDS

ENV_PREFIX = "DIGITSERVE_"
# LitServe binds only these (checked in its run(), after start-up output); say so up front instead.
HOSTS = ("127.0.0.1", "0.0.0.0", "::")


@dataclass(frozen=True)
class Config:
    exports: Path = Path("exports")
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "onnx"
    device: str = "auto"
    max_batch_size: int = 64
    batch_timeout: float = 0.0
    workers: int = 2
    max_payload_bytes: int = 16 << 20  # a phone's photo (5 MB at 12 MP); bodies over 1 MB are read a few at a time
    max_queue: int = 64  # bench/overload.py: accepted p99 92-128 ms at 512 connections on 2 cores
    max_connections: int = 4096
    read_timeout: float = 15.0
    send_timeout: float = 15.0
    max_url_bytes: int = 8 << 10
    max_header_count: int = 100
    max_header_bytes: int = 32 << 10  # browsers' cookies stay far below; nginx's default buffers hold 32 KB
    data_dir: Path | None = None  # SVHN-layout test files named by manifests, for /evaluate
    reload_interval: float = 5.0
    prediction_log: Path | None = None  # folder of the prediction log and the feedback store; None: neither
    prediction_sample: float = 1.0
    log_inputs: str = "none"
    prediction_log_mb: int = 100
    prediction_log_files: int = 10
    feedback_days: float = 7.0
    api_key: str | None = None  # only from DIGITSERVE_API_KEY: a flag would show in `ps`


class ConfigError(Exception):
    """A flag or DIGITSERVE_* variable with a value the server cannot use."""


def integer(low: int, high: int | None = None):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {low}..{high}, got {value}" if high is not None
                                             else f"must be at least {low}, got {value}")
        return value
    return check


def number(low: float, high: float, unit: str = "seconds"):
    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low:g}..{high:g} {unit}, got {text}")
        return value
    return check


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def folder(text: str) -> Path:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return Path(text)


def reload_interval(text: str) -> float:
    value = number(0, 3600)(text)
    if 0 < value < 0.5:  # a look reads every model folder's file list
        raise argparse.ArgumentTypeError(f"must be 0 (no polling) or 0.5..3600 seconds, got {text}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage dump), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    p = Parser(prog="python -m serving", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--exports", type=Path, default=defaults.exports, help="folder of exported models")
    p.add_argument("--host", choices=HOSTS, default=defaults.host,
                   help="address to listen on (0.0.0.0 or :: for every interface)")
    p.add_argument("--port", type=integer(1024, 65535), default=defaults.port)
    p.add_argument("--backend", choices=list(BACKENDS), default=defaults.backend,
                   help=", ".join(f"{name}: {backend.description}" for name, backend in BACKENDS.items()))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=defaults.device,
                   help="auto: the GPU when one is usable")
    p.add_argument("--max-batch-size", type=integer(1, 4096), default=defaults.max_batch_size,
                   help="images batched into one inference call")
    p.add_argument("--batch-timeout", type=number(0, 1), default=defaults.batch_timeout,
                   help="extra seconds a batch waits to fill (0: it holds what arrived while the previous one ran)")
    p.add_argument("--workers", type=integer(1, 256), default=defaults.workers,
                   help="HTTP processes, each with its own warm models and batcher")
    p.add_argument("--max-payload-bytes", type=integer(1), default=defaults.max_payload_bytes,
                   help="larger request bodies get 413")
    p.add_argument("--max-queue", type=integer(1), default=defaults.max_queue,
                   help="inference requests in progress per HTTP process; beyond it they get 503 at once")
    p.add_argument("--max-connections", type=integer(1), default=defaults.max_connections,
                   help="open connections per HTTP process; beyond it requests get 503 (default: 4096, or what "
                        "the open-files limit allows)")
    p.add_argument("--read-timeout", type=number(0.1, 600), default=defaults.read_timeout,
                   help="seconds a request may take to arrive whole (headers and body); then 408")
    p.add_argument("--send-timeout", type=number(0.1, 600), default=defaults.send_timeout,
                   help="seconds a client may leave an answer untaken (its buffers full) before its connection is "
                        "aborted")
    p.add_argument("--max-url-bytes", type=integer(256, 1 << 20), default=defaults.max_url_bytes,
                   help="longer request URLs get 414")
    p.add_argument("--max-header-count", type=integer(8, 10_000), default=defaults.max_header_count,
                   help="requests with more header lines get 431")
    p.add_argument("--max-header-bytes", type=integer(1024, 1 << 24), default=defaults.max_header_bytes,
                   help="requests whose header lines hold more bytes get 431")
    p.add_argument("--reload-interval", type=reload_interval, default=defaults.reload_interval,
                   help="seconds between looks at the exports folder for new, changed and removed models (0: only "
                        "on POST /models/reload or SIGHUP)")
    p.add_argument("--data-dir", type=folder, default=defaults.data_dir,
                   help="folder holding the test files (test_32x32.mat) that models trained on SVHN name, for "
                        "/models/NAME/evaluate (MD5-checked; needs digitserve[svhn])")
    p.add_argument("--prediction-log", type=Path, default=defaults.prediction_log,
                   help="folder for a JSON-lines log of predictions (rotated by size) and the store that POST "
                        "/feedback needs; off when not given")
    p.add_argument("--prediction-sample", type=share, default=defaults.prediction_sample,
                   help="share of predictions logged (0 < share <= 1); only logged ones take feedback")
    p.add_argument("--log-inputs", choices=["none", "model", "upload"], default=defaults.log_inputs,
                   help="also log the array the model took (model), and the uploaded bytes (upload)")
    p.add_argument("--prediction-log-mb", type=integer(1, 1 << 20), default=defaults.prediction_log_mb,
                   help="megabytes a log file reaches before it is rotated")
    p.add_argument("--prediction-log-files", type=integer(1, 1000), default=defaults.prediction_log_files,
                   help="rotated files kept per HTTP process")
    p.add_argument("--feedback-days", type=number(0.001, 3650, "days"), default=defaults.feedback_days,
                   help="days a logged prediction takes feedback")
    for action in p._actions:
        if action.dest != "help":
            action.help = f"{action.help or ''} [{env_name(action.dest)}]".strip()
    return p


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def parse(argv: list[str] | None = None, environ: dict | None = None) -> Config:
    """Flags, then DIGITSERVE_* variables for the flags not given, then the defaults. A variable
    goes through its flag's own type and choices. Raises ConfigError (variables); argparse exits 2
    on a bad flag."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    given = parser.parse_args(argv)
    # Parsed again over a namespace of Nones, which argparse leaves alone: what the flags set.
    explicit = parser.parse_args(argv, namespace=argparse.Namespace(**{a.dest: None for a in parser._actions}))
    values = vars(given)
    for action in parser._actions:
        name = env_name(action.dest)
        if action.dest == "help" or getattr(explicit, action.dest) is not None or not environ.get(name):
            continue
        text = environ[name]
        try:
            value = action.type(text) if action.type else text
        except argparse.ArgumentTypeError as err:
            raise ConfigError(f"{name}={text}: {err}") from None
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"{name}={text}: choose from {', '.join(map(str, action.choices))}")
        values[action.dest] = value
    api_key = environ.get(env_name("api_key")) or None
    if explicit.max_connections is None and not environ.get(env_name("max_connections")):
        values["max_connections"] = default_connections(values["max_connections"])
    config = Config(**{f.name: values[f.name] for f in fields(Config) if f.name in values}, api_key=api_key)
    check_open_files(config.max_connections)
    return config


RESERVED_FILES = 256  # one HTTP process's own descriptors: models, metrics files, logs, its sockets


def open_files_needed(connections: int) -> int:
    """Descriptors one HTTP process needs for `connections` connections, with room for its own files."""
    return connections + RESERVED_FILES


def default_connections(wanted: int) -> int:
    """The default --max-connections where the open-files hard limit allows it, else what it allows:
    a container run with `ulimit -Hn 1024` starts with 768, and an explicit value too high is an error."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, hard - RESERVED_FILES))


def check_open_files(connections: int) -> None:
    """Refuse --max-connections that this process could never hold open (clients would be reset, not
    answered 503): the server raises the soft limit up to the
    hard one, not beyond."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and open_files_needed(connections) > hard:
        raise ConfigError(f"--max-connections {connections} needs {open_files_needed(connections)} open files, and "
                          f"this process may open at most {hard} (ulimit -Hn): lower it, or raise the limit")
