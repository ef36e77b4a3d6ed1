"""Stand-ins for VMware's authd (ESXi port 902) and ESXi's WebMKS websocket (443).

No ESXi runs here.  :class:`Authd` speaks authd's wire as nova-mksproxy's
client expects it: a ``220`` banner in the clear, a TLS session (server side,
Python's ``ssl`` over memory BIOs, so a second session can start on the same
socket), ``USER``/``PASS``/``THUMBPRINT``/``CONNECT``, then a *new* TLS
session with another certificate, the client's nonce, and the console: a
greeting and then an echo, or a flood that records when TCP pushed back.
Each way it can go wrong is a factory attribute (a bad banner, another
ticket, a cfgFile refused, a wrong second thumbprint, silence at a step).
"""

from __future__ import annotations

import hashlib
import os
import ssl
from dataclasses import dataclass
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import crypto
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.hypervisors import listen
from tests.pki import cert_pem, key_pem, make_cert

BANNER = b"220 VMware Authentication Daemon Version 1.10: SSL Required, MKSDisplayProtocol:VNC\r\n"
GREETING = b"RFB 003.008\n"


@dataclass(frozen=True)
class Identity:
    """A self-signed server certificate: its ssl context and its SHA-1 thumbprint."""

    context: ssl.SSLContext
    thumbprint: str
    der: bytes
    options: CertificateOptions


def identity(directory: str, name: str) -> Identity:
    """A new self-signed certificate for ``name``, as authd and ESXi have."""
    cert, key = make_cert(name, None)
    os.makedirs(directory, exist_ok=True)
    cert_path = os.path.join(directory, f"{name}-cert.pem")
    key_path = os.path.join(directory, f"{name}-key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert_pem(cert))
    with open(key_path, "wb") as f:
        f.write(key_pem(key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    der = cert.public_bytes(Encoding.DER)
    options = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(cert),
    )
    return Identity(context, hashlib.sha1(der).hexdigest(), der, options)


class ServerTls:
    """One server-side TLS session over memory BIOs: bytes in, plaintext and bytes out."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=True)
        self.up = False

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """(plaintext received, bytes to send); raises ssl.SSLError on a failed handshake."""
        self._in.write(data)
        plain = b""
        if not self.up:
            try:
                self._tls.do_handshake()
                self.up = True
            except ssl.SSLWantReadError:
                pass
        while self.up:
            try:
                chunk = self._tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            if not chunk:
                break
            plain += chunk
        return plain, self._out.read()

    def wrap(self, data: bytes) -> bytes:
        self._tls.write(data)
        return self._out.read()


class Authd(Protocol):
    """One connection to the stand-in; the factory holds its script and records."""

    def connectionMade(self) -> None:
        f = self.factory
        f.connections.append(self)
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.lines: list[bytes] = []
        self.nonce: bytes | None = None
        self.nonce_sent: bytes | None = None
        self.sent = 0
        self.paused: defer.Deferred[None] = defer.Deferred()
        self._tls: ServerTls | None = None
        self._buffer = b""
        self._streaming = False
        if f.silent_at != "banner":
            self.transport.write(f.banner)
            self._tls = ServerTls(f.first.context)

    def dataReceived(self, data: bytes) -> None:
        if self._tls is None:
            return
        try:
            plain, out = self._tls.feed(data)
        except ssl.SSLError as e:
            self.factory.tls_errors.append(str(e))
            self.transport.abortConnection()
            return
        self.transport.write(out)
        self._buffer += plain
        if self._streaming:
            self._console(plain)
            return
        while not self._streaming and self._tls is not None:
            if self._tls is self._second:
                if len(self._buffer) < 16:
                    return
                self.nonce, rest = self._buffer[:16], self._buffer[16:]
                self._buffer = b""
                self._begin_console(rest)
                return
            end = self._buffer.find(b"\r\n")
            if end < 0:
                return
            line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            self._answer(line)

    _second: ServerTls | None = None

    def _say(self, line: bytes) -> None:
        assert self._tls is not None
        self.transport.write(self._tls.wrap(line + b"\r\n"))

    def _answer(self, line: bytes) -> None:
        f = self.factory
        self.lines.append(line)
        verb, _, argument = line.partition(b" ")
        if f.silent_at == verb.decode():
            return
        if verb == b"USER":
            self._say(b"331 Password required" if argument == f.ticket.encode() else b"530 No")
        elif verb == b"PASS":
            ok = argument == f.ticket.encode()
            self._say(b"230 User authenticated" if ok else b"530 Login incorrect")
        elif verb == b"THUMBPRINT":
            self.nonce_sent = argument
            self._say(b"200 " + f.second_answer.encode())
        elif verb == b"CONNECT":
            if argument != f.cfg_file.encode() + b" mks":
                self._say(b"500 VM not found")
                return
            self._say(b"200 Connect /vmfs/volumes/ds/vm/vm.vmx mks")
            # A new TLS session on the same socket; the first is abandoned.
            self._tls = self._second = ServerTls(f.second.context)
            self._buffer = b""
        else:
            self._say(b"500 Unknown command")

    def _begin_console(self, rest: bytes) -> None:
        self._streaming = True
        f = self.factory
        if not f.ready.called:
            f.ready.callback(self)
        if f.console == "flood":
            self.transport.registerProducer(self, True)
            self.resumeProducing()
            return
        self.transport.write(self._second.wrap(GREETING))  # type: ignore[union-attr]
        self._console(rest)

    def _console(self, data: bytes) -> None:
        if data and self.factory.console == "echo":
            self.transport.write(self._second.wrap(data))  # type: ignore[union-attr]

    # -- a flood, as a producer of its TCP transport --------------------------

    def resumeProducing(self) -> None:
        self._running = True
        while self._running and self.transport.connected:
            self.transport.write(self._second.wrap(b"x" * 65536))  # type: ignore[union-attr]
            self.sent += 65536

    def pauseProducing(self) -> None:
        self._running = False
        if not self.paused.called:
            self.paused.callback(None)

    def stopProducing(self) -> None:
        self._running = False

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)


def serve_authd(
    testcase: TestCase,
    *,
    ticket: str = "52 9b 3c-ticket",
    cfg_file: str = "/vmfs/volumes/ds1/my vm/my vm.vmx",
    **script: Any,
) -> Any:
    """Listen on 127.0.0.1 port 0; returns the factory (``port``, ``first``, ``ready``…).

    ``script``: ``banner``, ``silent_at`` ("banner", "USER", "PASS",
    "THUMBPRINT", "CONNECT"), ``second_answer`` (the THUMBPRINT answer,
    default the second certificate's thumbprint), ``console`` ("echo" or
    "flood").
    """
    directory = testcase.mktemp()
    factory = Factory.forProtocol(Authd)
    factory.first = identity(directory, "authd")
    factory.second = identity(directory, "mks")
    factory.ticket = ticket
    factory.cfg_file = cfg_file
    factory.banner = BANNER
    factory.silent_at = None
    factory.second_answer = factory.second.thumbprint
    factory.console = "echo"
    factory.connections = []
    factory.tls_errors = []
    factory.ready = defer.Deferred()
    for name, value in script.items():
        setattr(factory, name, value)
    listen(testcase, factory, factory.connections)
    return factory


class Esxi(WebSocketServerProtocol):
    """ESXi's WebMKS websocket: ``/ticket/<ticket>`` with subprotocol ``binary``, then echo.

    Each message it receives is recorded and sent back as one message; its
    first message is answered with the greeting split in two messages.
    """

    def onConnect(self, request: Any) -> str:
        self.factory.requests.append(request.path)
        if request.path != f"/ticket/{self.factory.ticket}":
            raise ConnectionDeny(403, "Forbidden")
        if "binary" not in request.protocols:
            raise ConnectionDeny(400, "binary subprotocol required")
        return "binary"

    def onOpen(self) -> None:
        self.messages: list[bytes] = []
        if not self.factory.ready.called:
            self.factory.ready.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not self.messages:
            self.sendMessage(GREETING[:4], isBinary=True)
            self.sendMessage(GREETING[4:], isBinary=True)
        self.messages.append(payload)
        self.sendMessage(payload, isBinary=True)


def serve_esxi(testcase: TestCase, *, ticket: str = "cst-52b5-ticket") -> Any:
    """A wss ESXi on 127.0.0.1 port 0 with a self-signed certificate; returns its factory."""
    factory = WebSocketServerFactory()
    factory.protocol = Esxi
    factory.identity = identity(testcase.mktemp(), "esxi")
    factory.ticket = ticket
    factory.requests = []
    factory.ready = defer.Deferred()
    port = reactor.listenSSL(0, factory, factory.identity.options, interface="127.0.0.1")
    factory.port = port.getHost().port
    testcase.addCleanup(port.stopListening)
    return factory
