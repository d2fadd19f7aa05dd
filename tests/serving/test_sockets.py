"""serving/sockets.py on loopback, in this process: an HTTP process's own listening socket. The real
server's processes each holding one: tests/serving/test_processes.py."""
import os
import socket
import subprocess
import sys
from contextlib import contextmanager

import pytest

from bench.harness import free_port
from serving.errors import StartupError
from serving.sockets import LISTEN, listen_apart, proc_address, socket_inodes, tcp_inodes


def bound_as_litserve_binds(port: int, host: str = "127.0.0.1") -> socket.socket:
    shared = socket.socket()
    shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # uvicorn's Config.bind_socket
    shared.bind((host, port))
    return shared


def reuseport_listener(port: int) -> socket.socket:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    return listener


def test_the_shared_socket_becomes_one_of_the_processes_own_beside_its_siblings():
    port = free_port()
    with bound_as_litserve_binds(port) as shared, reuseport_listener(port) as sibling:
        before = socket_inodes(os.getpid())
        listen_apart(port, lambda: [os.getpid()])  # the sibling's listener is this server's own
        assert shared.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        shared.listen()  # as uvicorn then does, on the descriptor it was handed
        assert socket_inodes(os.getpid()) != before
        assert len(tcp_inodes(LISTEN, local=proc_address(("127.0.0.1", port)))) == 2
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
        try:
            accepted = {}
            for name, listener in (("own", shared), ("sibling", sibling)):
                listener.setblocking(False)
                while True:
                    try:
                        listener.accept()[0].close()
                    except BlockingIOError:
                        break
                    accepted[name] = accepted.get(name, 0) + 1
            # The kernel hashes each of the 64 to one or the other: 7 or fewer to one is about 1 in 10^10.
            assert sum(accepted.values()) == 64 and min(accepted.values()) >= 8, accepted
        finally:
            for client in clients:
                client.close()


@contextmanager
def listener_elsewhere(port: int, host: str):
    """Another program (another process) listening on host:port with SO_REUSEPORT."""
    code = ("import socket, sys\nlistener = socket.socket()\n"
            "listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
            f"listener.bind(({host!r}, {port}))\nlistener.listen()\nprint('listening', flush=True)\nsys.stdin.read()")
    other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "listening\n"
        yield
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("server_host, other_host", [
    ("127.0.0.1", "127.0.0.1"),  # the same address: it would share the group
    ("0.0.0.0", "127.0.0.1"),    # a more specific address takes that address's connections from a wildcard
])
def test_a_listener_that_is_not_the_servers_own_is_refused(server_host, other_host):
    """Another server of the same user that started in the same seconds, already listening with
    SO_REUSEPORT: joining it would split the port's connections between two servers."""
    port = free_port()
    with bound_as_litserve_binds(port, server_host) as shared, listener_elsewhere(port, other_host):
        before = socket_inodes(os.getpid())
        with pytest.raises(StartupError, match=f"another program listens on port {port}"):
            listen_apart(port, lambda: [os.getpid()])
        assert socket_inodes(os.getpid()) == before  # nothing swapped, nothing left listening
        assert shared.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0


def test_a_listener_on_another_address_of_the_port_is_left_alone():
    """127.0.0.2:PORT is another socket's business (Linux routes all of 127/8 to loopback): it shares
    no group with 127.0.0.1:PORT and takes none of its connections."""
    port = free_port()
    with bound_as_litserve_binds(port) as shared, listener_elsewhere(port, "127.0.0.2"):
        listen_apart(port, lambda: [os.getpid()])
        assert shared.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1


def test_a_udp_socket_on_the_port_is_not_taken_for_litserves():
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", port))  # a lower descriptor than the TCP socket's: found first
        with bound_as_litserve_binds(port) as shared:
            listen_apart(port, lambda: [os.getpid()])
            assert shared.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1


def test_a_process_without_the_shared_socket_says_what_changed():
    with pytest.raises(RuntimeError, match="LitServe no longer binds it"):
        listen_apart(free_port(), lambda: [os.getpid()])
