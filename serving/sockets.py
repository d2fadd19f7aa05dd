"""The port: is it free before anything loads, and a listening socket of its own for each HTTP process."""
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from serving.errors import StartupError

LISTEN, ESTABLISHED = "0A", "01"  # TCP states as /proc/net/tcp writes them


def listen_apart(port: int, server_pids: Callable[[], list[int]]) -> None:
    """In an HTTP process, before uvicorn listens: turn the socket LitServe handed it into one of this
    process's own, in a SO_REUSEPORT group on the port (Linux), so that the kernel spreads new
    connections over the HTTP processes. `server_pids()`: this server's HTTP processes known so far.

    LitServe (checked against 0.2.19) binds one socket in the main process, and every HTTP process
    listened on a copy of it. uvloop accepts every waiting connection each time it wakes, so
    connections opened together (a load balancer's pool, a benchmark's) went to whichever process
    woke first: 31 of 32 in one of two processes was common, its core doing the work of two while the
    other idled (bench/RESULTS.md, "CPU serving"). With a socket each, the kernel picks a process for
    each new connection by a hash of its addresses.

    uvicorn (checked against 0.54.0) starts the application's lifespan before it listens on the
    sockets it was given, so pointing the shared socket's descriptor at a new socket here makes
    uvicorn listen on the new one. The shared socket itself then never listens: no connection is
    queued where no process accepts. A process that stops closes its own queue: a connection the
    kernel completed there in that instant is reset, even while other HTTP processes still listen
    (they all stop together; Linux's net.ipv4.tcp_migrate_req would hand such connections on).

    SO_REUSEPORT would also let another program of the same user listen on the port beside this
    server and take a share of its connections. check_can_listen refuses to start while another
    program listens there; here, a listener on this address that is not this server's own, or on
    any address of the port where this server listens on all of them, is refused too (a second
    server that started in the same seconds). This socket listens before it looks, so that of two
    servers that look at once, each sees the other."""
    shared = next((int(name) for name in os.listdir("/proc/self/fd") if server_socket(int(name), port)), None)
    if shared is None:
        raise RuntimeError(f"no socket bound to port {port} in this HTTP process: LitServe no longer binds it as "
                           "serving/sockets.py expects")
    with socket.socket(fileno=os.dup(shared)) as bound, socket.socket(bound.family, socket.SOCK_STREAM) as own:
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if bound.family == socket.AF_INET6:  # "::" takes IPv4 too, or not, as the shared one
            own.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                           bound.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
        address = bound.getsockname()
        own.bind(address)
        own.listen()  # uvicorn listens again, with its backlog
        # A listener on another address takes only that address's connections, unless this one is a wildcard.
        listening = (tcp_inodes(LISTEN, port) if address[0] in ("0.0.0.0", "::")
                     else tcp_inodes(LISTEN, local=proc_address(address)))
        # Read after the listeners: a sibling registers its pid before it listens, so each one seen is known.
        if listening - set().union(*map(socket_inodes, server_pids())):
            raise StartupError(f"another program listens on port {port} (is another server there? choose another "
                               "--port)")
        os.dup2(own.fileno(), shared)


def tcp_inodes(state: str, port: int | None = None, local: str | None = None) -> set[str]:
    """The inodes of this network namespace's TCP sockets in `state`: on local `port`, or at the local
    address `local` (as proc_address writes it), or all."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:  # no IPv6
            continue
        for row in rows:
            fields = row.split()
            if (fields[3] == state and (port is None or int(fields[1].rsplit(":", 1)[1], 16) == port)
                    and (local is None or fields[1] == local)):
                inodes.add(fields[9])
    return inodes


def proc_address(address: tuple) -> str:
    """A socket's address as /proc/net/tcp and tcp6 write a local one: each 32-bit word of the IP
    address in hex, in the machine's byte order, then the port in hex."""
    host, port = address[0], address[1]
    packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{word:08X}" for word in words) + f":{port:04X}"


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` holds (none once it is gone, or not ours to read)."""
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def server_socket(fd: int, port: int) -> bool:
    """`fd` is a socket bound to `port`, neither listening nor connected: the one LitServe bound, not an
    accepted connection."""
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
        if candidate.type != socket.SOCK_STREAM or candidate.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
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
