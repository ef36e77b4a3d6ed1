"""The "direct" column over TLS: a TLS server that plays one backend behaviour itself.

    python benchmarks/tls_direct.py PORT BEHAVIOUR BYTES CERT KEY

There is no proxy: the client reads TLS straight from the server that makes
the bytes, so this column is the client's own TLS ceiling.  One thread per
connection, each a blocking ``ssl`` socket: ``sendall`` of a 1 MiB buffer
lets OpenSSL cut it into full 16 KiB records with no copy in Python.
Behaviours as in ``backends.py``: ``source`` (BYTES, then close), ``sink``
(``!`` once BYTES came), ``echo``, ``greeter`` (``RFB 003.008\\n``, then hold).
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import sys

CHUNK = memoryview(bytes(1 << 20))
GREETING = b"RFB 003.008\n"


class Handler(socketserver.BaseRequestHandler):
    behaviour = "source"
    total = 0

    def handle(self) -> None:
        sock: ssl.SSLSocket = self.request
        try:
            sock.do_handshake()
            getattr(self, self.behaviour)(sock)
        except OSError:
            pass  # the client went away: its business

    def source(self, sock: ssl.SSLSocket) -> None:
        left = self.total
        while left > 0:
            take = min(left, len(CHUNK))
            sock.sendall(CHUNK[:take])
            left -= take

    def sink(self, sock: ssl.SSLSocket) -> None:
        buffer = memoryview(bytearray(1 << 20))
        got = 0
        while got < self.total:
            n = sock.recv_into(buffer)
            if not n:
                return
            got += n
        sock.sendall(b"!")

    def echo(self, sock: ssl.SSLSocket) -> None:
        while data := sock.recv(65536):
            sock.sendall(data)

    def greeter(self, sock: ssl.SSLSocket) -> None:
        sock.sendall(GREETING)
        while sock.recv(65536):
            pass


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.context = context
        super().__init__(("127.0.0.1", port), Handler)

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The handshake runs on the connection's thread, not the accepting one.
        wrapped = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return wrapped, address


def main() -> None:
    port, behaviour, total, cert, key = sys.argv[1:6]
    if behaviour not in ("source", "sink", "echo", "greeter"):
        raise SystemExit(f"unknown behaviour {behaviour!r}")
    Handler.behaviour, Handler.total = behaviour, int(total)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    with Server(int(port), context) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
