"""The port: is it free before anything loads, and a listening socket of its own for each HTTP process."""
import os
import socket

from serving.errors import StartupError


def listen_apart(port: int) -> None:
    """In an HTTP process, before uvicorn listens: turn the socket LitServe handed it into one of this
    process's own, in a SO_REUSEPORT group on the port (Linux), so that the kernel spreads new
    connections over the HTTP processes.

    LitServe (checked against 0.2.19) binds one socket in the main process, and every HTTP process
    listened on a copy of it. uvloop accepts every waiting connection each time it wakes, so
    connections opened together (a load balancer's pool, a benchmark's) went to whichever process
    woke first: 31 of 32 in one of two processes was common, its core doing the work of two while the
    other idled (bench/RESULTS.md, "CPU serving"). With a socket each, the kernel picks a process for
    each new connection by a hash of its addresses.

    uvicorn (checked against 0.54.0) starts the application's lifespan before it listens on the
    sockets it was given, so pointing the shared socket's descriptor at a new socket here makes
    uvicorn listen on the new one. The shared socket itself then never listens: no connection is
    queued where no process accepts. A process that stops closes its own queue, and a connection the
    kernel completed in that instant is reset, as it was at the last close of the shared socket."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if not server_socket(fd, port):
            continue
        with socket.socket(fileno=os.dup(fd)) as shared, socket.socket(shared.family, socket.SOCK_STREAM) as own:
            shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # every socket bound to the port needs it
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if shared.family == socket.AF_INET6:  # "::" takes IPv4 too, or not, as the shared one
                v6only = shared.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                own.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
            own.bind(shared.getsockname())
            os.dup2(own.fileno(), fd)
        return
    raise RuntimeError(f"no socket bound to port {port} in this HTTP process: LitServe no longer binds it as "
                       "serving/sockets.py expects")


def server_socket(fd: int, port: int) -> bool:
    """`fd` is a socket bound to `port` and connected to nobody: the one LitServe bound, not an accepted
    connection."""
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
