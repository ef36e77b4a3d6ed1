"""A bare TCP relay in plain Python (epoll, no Twisted, no websocket): a floor.

    python bare_relay.py LISTEN_PORT BACKEND_PORT

It shows what any CPython process pays per hop on this machine (wake-up,
system calls, interpreter), so the latency table can tell consoled's own
cost from the cost of being a Python process at all.  It relays raw TCP
only; it does no framing, no tokens and no flow control.
"""

from __future__ import annotations

import select
import socket
import sys


def main() -> None:
    listen_port, backend_port = int(sys.argv[1]), int(sys.argv[2])
    listener = socket.create_server(("127.0.0.1", listen_port), backlog=128)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    sockets: dict[int, socket.socket] = {}
    other: dict[int, socket.socket] = {}
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                user, _ = listener.accept()
                backend = socket.create_connection(("127.0.0.1", backend_port))
                for sock in (user, backend):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.setblocking(False)
                    sockets[sock.fileno()] = sock
                    poller.register(sock.fileno(), select.EPOLLIN)
                other[user.fileno()], other[backend.fileno()] = backend, user
                continue
            data = sockets[fd].recv(65536)
            if data:
                other[fd].sendall(data)  # ping-pong sized: never blocks here
                continue
            pair = other.pop(fd)
            for sock in (sockets.pop(fd), pair):
                poller.unregister(sock.fileno())
                sockets.pop(sock.fileno(), None)
                other.pop(sock.fileno(), None)
                sock.close()


if __name__ == "__main__":
    main()
