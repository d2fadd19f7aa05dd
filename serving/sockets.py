"""The listening socket, from the main process's side: is the port free before anything loads, and
letting go of copies of it that no process will accept on."""
import os
import socket

from serving.errors import StartupError


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
