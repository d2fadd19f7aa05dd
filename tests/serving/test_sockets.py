"""serving/sockets.py on loopback, in this process: an HTTP process's own listening socket. The real
server's processes each holding one: tests/serving/test_processes.py."""
import os
import socket

import pytest

from bench.harness import free_port
from serving.errors import StartupError
from serving.sockets import LISTEN, listen_apart, socket_inodes, tcp_inodes


def bound_as_litserve_binds(port: int) -> socket.socket:
    shared = socket.socket()
    shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # uvicorn's Config.bind_socket
    shared.bind(("127.0.0.1", port))
    return shared


def reuseport_listener(port: int, host: str = "127.0.0.1") -> socket.socket:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((host, port))
    listener.listen()
    return listener


def test_the_shared_socket_becomes_one_of_the_processes_own_beside_its_siblings():
    port = free_port()
    with bound_as_litserve_binds(port) as shared, reuseport_listener(port) as sibling:
        before = socket_inodes(os.getpid())
        listen_apart(port, [os.getpid()])  # the sibling's listener is this server's own
        assert shared.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        shared.listen()  # as uvicorn then does, on the descriptor it was handed
        assert socket_inodes(os.getpid()) != before and len(tcp_inodes(LISTEN, port)) == 2
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
            # The kernel's hash sends each of the 64 either way: none to one of them is 1 in 10^19.
            assert sum(accepted.values()) == 64 and min(accepted.values()) >= 8, accepted
        finally:
            for client in clients:
                client.close()


def test_a_listener_that_is_not_the_servers_own_is_refused():
    """Another server of the same user that started in the same seconds, already listening with
    SO_REUSEPORT: joining it would split the port's connections between two servers."""
    port = free_port()
    with bound_as_litserve_binds(port) as shared, reuseport_listener(port):
        before = socket_inodes(os.getpid())
        with pytest.raises(StartupError, match=f"another program listens on port {port}"):
            listen_apart(port, [])  # the listener above belongs to no process of this server
        assert socket_inodes(os.getpid()) == before  # nothing swapped
        assert shared.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0


def test_a_listener_on_another_address_of_the_port_is_left_alone():
    """127.0.0.2:PORT is another socket's business (Linux routes all of 127/8 to loopback): it shares
    no group with 127.0.0.1:PORT, and the bind checks let both be."""
    port = free_port()
    with bound_as_litserve_binds(port) as shared, reuseport_listener(port, "127.0.0.2"):
        listen_apart(port, [])
        assert shared.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1


def test_a_process_without_the_shared_socket_says_what_changed():
    with pytest.raises(RuntimeError, match="LitServe no longer binds it"):
        listen_apart(free_port(), [os.getpid()])
