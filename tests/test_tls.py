"""TLS for the listeners: start-up checks, TLS-only and mixed ports, versions, ciphers,
reload, and ALPN as browsers offer it.

Certificates are made here with `cryptography` (EC P-256, so it is fast): a
CA, an intermediate, and server certificates for localhost/127.0.0.1. The
integration tests listen on 127.0.0.1 port 0 and talk to an echo protocol
with real Twisted TLS clients; the door tests run a whole consoled in the
test's reactor and reach it with clients that offer ALPN as browsers and curl
do: Twisted's, Python's `ssl` (blocking, so in a thread) and `openssl s_client`.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import socket
import ssl
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL
from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from consoled.config import ConsoleSettings, DefaultSettings, Settings
from consoled.doors.serial_tcp import PROMPT
from consoled.tls import (
    HTTP_ALPN,
    MAX_PEM_BYTES,
    FirstByteDetector,
    ReloadableServerTLS,
    TLSError,
    TLSOrPlainFactory,
    reload_on_sighup,
    server_tls_from_settings,
    tls_factory,
)
from tests import hypervisors
from tests.harness import Consoled, test_settings
from tests.peers import require_executable
from tests.pki import cert_pem, key_pem, make_cert
from tests.wsclient import ws_connect
from tests.xvpclient import java_request

HOST = "127.0.0.1"
_DAY = datetime.timedelta(days=1)


# --- certificates ------------------------------------------------------------


CA = make_cert("consoled test CA", None, ca=True)
INTERMEDIATE = make_cert("consoled test intermediate", CA, ca=True)
SERVER_A = make_cert("localhost", CA, ca=False)
SERVER_B = make_cert("localhost", CA, ca=False)
SERVER_VIA_INTERMEDIATE = make_cert("localhost", INTERMEDIATE, ca=False)


def fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


def write(testcase: SynchronousTestCase, data: bytes, path: str | None = None) -> str:
    path = path or os.path.abspath(testcase.mktemp())
    with open(path, "wb") as f:
        f.write(data)
    return path


def write_pair(
    testcase: SynchronousTestCase,
    pair: tuple[x509.Certificate, Any],
    at: tuple[str, str] | None = None,
) -> tuple[str, str]:
    """Write pair's certificate and key to two files (over the ones at `at`)."""
    cert_path, key_path = at or (None, None)
    return write(testcase, cert_pem(pair[0]), cert_path), write(
        testcase, key_pem(pair[1]), key_path
    )


# --- peers -------------------------------------------------------------------


class Echo(Protocol):
    def connectionMade(self) -> None:
        self.closed: Deferred[None] = Deferred()
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:
        self.closed.callback(None)


class EchoFactory(Factory):
    protocol = Echo

    def __init__(self) -> None:
        self.connections: list[Echo] = []


@implementer(IHandshakeListener)
class Client(Protocol):
    """Records what it receives, its handshake (peer fingerprint, version) and its end."""

    def __init__(self) -> None:
        self.received = b""
        self.handshake: Deferred[tuple[bytes, str]] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self._waiting: list[tuple[int, Deferred[bytes]]] = []

    def handshakeCompleted(self) -> None:
        connection = self.transport.getHandle()
        cert = connection.get_peer_certificate(as_cryptography=True)
        self.handshake.callback((fingerprint(cert), connection.get_protocol_version_name()))

    def exchange(self, data: bytes) -> Deferred[bytes]:
        """Send data; fires with everything received once as much came back."""
        d: Deferred[bytes] = Deferred()
        self._waiting.append((len(self.received) + len(data), d))
        self.transport.write(data)
        return d

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        done = [(n, d) for n, d in self._waiting if len(self.received) >= n]
        for entry in done:
            self._waiting.remove(entry)
            entry[1].callback(self.received)

    def connectionLost(self, reason: Failure) -> None:
        if not self.handshake.called:
            self.handshake.errback(reason)
        for _, d in self._waiting:
            d.errback(reason)
        self._waiting = []
        self.reason = reason
        self.lost.callback(None)


@implementer(IOpenSSLClientConnectionCreator)
class RawClientTLS:
    """A client with a hand-made context: TLS versions and ciphers a real client would not pick."""

    def __init__(self, max_version: int, ciphers: bytes = b"DEFAULT:@SECLEVEL=0") -> None:
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.set_min_proto_version(SSL.TLS1_VERSION)
        self.context.set_max_proto_version(max_version)
        self.context.set_cipher_list(ciphers)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_tlsext_host_name(b"localhost")
        return connection


class ListenerMixin:
    """Listen on 127.0.0.1:0 behind tls_factory; connect clients; clean everything up."""

    def listen(
        self: Any, tls: ReloadableServerTLS | None, ssl_only: bool, alpn: tuple[bytes, ...] = ()
    ) -> int:
        echo = EchoFactory()
        factory = tls_factory(echo, tls, ssl_only, clock=reactor, alpn=alpn)
        port = reactor.listenTCP(0, factory, interface=HOST)
        self.addCleanup(port.stopListening)
        self.addCleanup(self._close_server_side, echo)
        return port.getHost().port

    def _close_server_side(self, echo: EchoFactory) -> Deferred[Any]:
        for connection in echo.connections:
            if not connection.closed.called:
                connection.transport.abortConnection()
        return DeferredList([c.closed for c in echo.connections])

    async def connect(self: Any, port: int, creator: Any = None) -> Client:
        """A client on port: plain if creator is None, else TLS through creator."""
        endpoint: Any = TCP4ClientEndpoint(reactor, HOST, port)
        if creator is not None:
            endpoint = wrapClientTLS(creator, endpoint)
        client = await connectProtocol(endpoint, Client())
        self.addCleanup(self._close_client, client)
        return client

    def _close_client(self, client: Client) -> Deferred[None]:
        if not client.lost.called:
            client.transport.abortConnection()
        # Plain clients, and tests that do not look, leave the handshake unwatched.
        client.handshake.addErrback(lambda _: None)
        return client.lost

    async def refused(self: Any, port: int, creator: Any) -> None:
        """Assert the TLS handshake through creator fails and nothing is echoed."""
        client = await self.connect(port, creator)
        client.transport.write(b"secret")
        await self.assertFailure(client.handshake, SSL.Error)
        await client.lost
        self.assertEqual(client.received, b"")


def trusting_ca(alpn: tuple[bytes, ...] = ()) -> Any:
    """Twisted client options trusting the test CA, offering alpn (if any) over ALPN."""
    return optionsForClientTLS(
        "localhost",
        trustRoot=Certificate.loadPEM(cert_pem(CA[0])),
        acceptableProtocols=list(alpn) or None,
    )


BROWSER_ALPN = (b"h2", b"http/1.1")  # what Chromium, Firefox and curl offer


def stdlib_exchange(
    port: int, alpn: list[str], request: bytes, until: bytes
) -> tuple[str | None, bytes]:
    """Python's ssl, blocking (run it in a thread): offer alpn, send request, read
    until `until` arrives or the server closes; return (selected ALPN, bytes read)."""
    context = ssl.create_default_context(cadata=cert_pem(CA[0]).decode())
    context.set_alpn_protocols(alpn)
    with (
        socket.create_connection((HOST, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        selected = tls.selected_alpn_protocol()
        tls.sendall(request)
        received = b""
        while until not in received and (chunk := tls.recv(65536)):
            received += chunk
        return selected, received


class _Output(ProcessProtocol):
    def __init__(self, ended: Deferred[tuple[bytes, int | None]], stdin: bytes) -> None:
        self.ended, self.stdin, self.output = ended, stdin, b""

    def connectionMade(self) -> None:
        self.transport.write(self.stdin)
        self.transport.closeStdin()  # -ign_eof: s_client still reads until the server closes

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback((self.output, reason.value.exitCode))


def s_client(
    testcase: TestCase, port: int, alpn: str, stdin: bytes
) -> Deferred[tuple[bytes, int | None]]:
    """openssl s_client offering alpn: sends stdin, reads until the server closes;
    fires with (stdout and stderr, exit code). Killed after 15 s."""
    openssl = require_executable(testcase, "openssl", "apt-get install -y openssl")
    ended: Deferred[tuple[bytes, int | None]] = Deferred()
    argv = [openssl, "s_client", "-connect", f"{HOST}:{port}", "-servername", "localhost"]
    argv += ["-alpn", alpn, "-ign_eof", "-CAfile", write(testcase, cert_pem(CA[0]))]
    process = reactor.spawnProcess(_Output(ended, stdin), openssl, argv, env={})
    killer = reactor.callLater(15, process.signalProcess, "KILL")
    return ended.addBoth(lambda result: (killer.active() and killer.cancel(), result)[1])


# --- tests -------------------------------------------------------------------


class StartupTests(SynchronousTestCase):
    def test_missing_cert_names_the_file(self) -> None:
        """A certificate file that is not there is a TLSError naming it."""
        missing = os.path.abspath(self.mktemp())
        e = self.assertRaises(TLSError, ReloadableServerTLS, missing)
        self.assertIn(missing, str(e))

    def test_missing_key_names_the_file(self) -> None:
        """A key file that is not there is a TLSError naming it."""
        cert, _ = write_pair(self, SERVER_A)
        missing = os.path.abspath(self.mktemp())
        e = self.assertRaises(TLSError, ReloadableServerTLS, cert, missing)
        self.assertIn(missing, str(e))

    def test_key_not_matching_cert(self) -> None:
        """Server B's key with server A's certificate is refused, naming both files."""
        cert, _ = write_pair(self, SERVER_A)
        _, key = write_pair(self, SERVER_B)
        e = self.assertRaises(TLSError, ReloadableServerTLS, cert, key)
        self.assertIn("does not match", str(e))
        self.assertIn(cert, str(e))
        self.assertIn(key, str(e))

    def test_cert_file_without_key(self) -> None:
        """With key unset, a certificate file holding no key is refused, naming it."""
        cert, _ = write_pair(self, SERVER_A)
        e = self.assertRaises(TLSError, ReloadableServerTLS, cert, None)
        self.assertIn(cert, str(e))

    def test_fifo_certificate_refused_without_blocking(self) -> None:
        """A certificate path that is a FIFO is refused at once (an open() would wait
        for a writer forever): one line naming the file, "not a regular file"."""
        fifo = os.path.abspath(self.mktemp())
        os.mkfifo(fifo)
        e = self.assertRaises(TLSError, ReloadableServerTLS, fifo)
        self.assertIn(fifo, str(e))
        self.assertIn("not a regular file", str(e))
        self.assertNotIn("\n", str(e))

    def test_fifo_key_refused(self) -> None:
        """A key path that is a FIFO is refused the same way, naming the key file."""
        cert, _ = write_pair(self, SERVER_A)
        fifo = os.path.abspath(self.mktemp())
        os.mkfifo(fifo)
        e = self.assertRaises(TLSError, ReloadableServerTLS, cert, fifo)
        self.assertIn(f"TLS key {fifo}: not a regular file", str(e))

    def test_directory_and_device_refused(self) -> None:
        """A directory or a character device (which would read forever) is not a certificate."""
        for path in (os.path.abspath(os.path.dirname(self.mktemp()) or "."), "/dev/zero"):
            e = self.assertRaises(TLSError, ReloadableServerTLS, path)
            self.assertIn(f"{path}: not a regular file", str(e))

    def test_oversized_file_refused(self) -> None:
        """A certificate file over MAX_PEM_BYTES is refused without parsing it."""
        cert = write(self, cert_pem(SERVER_A[0]) + b"\n" * MAX_PEM_BYTES)
        e = self.assertRaises(TLSError, ReloadableServerTLS, cert)
        self.assertIn(f"{cert}: larger than", str(e))

    def test_bogus_cipher_string(self) -> None:
        """A cipher string that matches no cipher is a TLSError at construction."""
        cert, key = write_pair(self, SERVER_A)
        e = self.assertRaises(TLSError, ReloadableServerTLS, cert, key, "NO-SUCH-CIPHER")
        self.assertIn("no cipher matches", str(e))

    def test_settings_without_cert_mean_plain(self) -> None:
        """ssl_only false, key unset and no cert file: no TLS at all."""
        settings = Settings(default=DefaultSettings(cert=os.path.abspath(self.mktemp())))
        self.assertIsNone(server_tls_from_settings(settings))

    def test_settings_ssl_only_without_cert(self) -> None:
        """ssl_only true with the cert file absent refuses to start, naming the file."""
        missing = os.path.abspath(self.mktemp())
        settings = Settings(default=DefaultSettings(ssl_only=True, cert=missing))
        e = self.assertRaises(TLSError, server_tls_from_settings, settings)
        self.assertIn(missing, str(e))

    def test_settings_with_cert_present(self) -> None:
        """An existing cert file turns TLS on, with the [console] options applied."""
        cert, key = write_pair(self, SERVER_A)
        settings = Settings(
            default=DefaultSettings(cert=cert, key=key),
            console=ConsoleSettings(ssl_minimum_version="tlsv1_3"),
        )
        tls = server_tls_from_settings(settings)
        assert tls is not None
        self.assertEqual((tls.cert_path, tls.key_path, tls.minimum_version), (cert, key, "tlsv1_3"))

    def test_ssl_only_without_tls_is_a_programming_error(self) -> None:
        """tls_factory refuses to serve plain when told ssl_only."""
        self.assertRaises(ValueError, tls_factory, EchoFactory(), None, True, clock=Clock())


class FirstByteDetectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        cert, key = write_pair(self, SERVER_A)
        self.echo = EchoFactory()
        self.factory = TLSOrPlainFactory(self.echo, ReloadableServerTLS(cert, key), Clock())

    def test_lost_before_first_byte(self) -> None:
        """A connection that ends before any byte builds no inner protocol and raises nothing."""
        detector = self.factory.buildProtocol(None)
        detector.makeConnection(StringTransport())
        detector.connectionLost(Failure(ConnectionError("gone")))
        self.assertIsNone(detector.inner)
        self.assertEqual(self.echo.connections, [])

    def test_plain_bytes_reach_the_wrapped_protocol(self) -> None:
        """Plain bytes go to the wrapped protocol, which writes to the real transport."""
        detector: FirstByteDetector = self.factory.buildProtocol(None)
        transport = StringTransport()
        detector.makeConnection(transport)
        detector.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertIsInstance(detector.inner, Echo)
        self.assertIs(detector.inner.transport, transport)
        self.assertEqual(transport.value(), b"GET / HTTP/1.1\r\n")


class ServingTests(ListenerMixin, TestCase):
    def setUp(self) -> None:
        cert, key = write_pair(self, SERVER_A)
        self.tls = ReloadableServerTLS(cert, key)

    async def test_ssl_only(self) -> None:
        """ssl_only: a TLS client is echoed; a plain client is disconnected, nothing echoed."""
        port = self.listen(self.tls, ssl_only=True)
        client = await self.connect(port, trusting_ca())
        self.assertEqual(await client.exchange(b"hello"), b"hello")
        plain = await self.connect(port)
        plain.transport.write(b"hello plain\r\n")
        await plain.lost
        self.assertNotIn(b"hello", plain.received)

    async def test_mixed_port(self) -> None:
        """ssl_only false with a certificate: plain and TLS clients both echo on one port."""
        port = self.listen(self.tls, ssl_only=False)
        plain = await self.connect(port)
        secure = await self.connect(port, trusting_ca())
        self.assertEqual(await plain.exchange(b"plain"), b"plain")
        self.assertEqual(await secure.exchange(b"secure"), b"secure")
        self.assertEqual((await secure.handshake)[0], fingerprint(SERVER_A[0]))

    async def test_sessions_resume(self) -> None:
        """A client that offers its last session (a browser's reconnect) resumes it:
        no full handshake, on TLS 1.2 and 1.3 alike."""
        port = self.listen(self.tls, ssl_only=True)

        def reconnect(version: ssl.TLSVersion) -> tuple[bool, bool]:
            context = ssl.create_default_context(cadata=cert_pem(CA[0]).decode())
            context.maximum_version = version
            reused = []
            session = None
            for _ in range(2):
                with (
                    socket.create_connection((HOST, port), timeout=10) as raw,
                    context.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
                ):
                    tls.sendall(b"ping")
                    tls.recv(4)  # TLS 1.3 tickets arrive after the handshake
                    reused.append(tls.session_reused)
                    session = tls.session
            return reused[0], reused[1]

        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            first, second = await deferToThread(reconnect, version)
            self.assertEqual((first, second), (False, True), version)

    async def test_plain_only(self) -> None:
        """No TLS: the wrapped factory serves as it is."""
        port = self.listen(None, ssl_only=False)
        plain = await self.connect(port)
        self.assertEqual(await plain.exchange(b"plain"), b"plain")

    async def test_default_negotiates_at_least_tls12(self) -> None:
        """A modern client gets TLS 1.2 or 1.3 by default."""
        port = self.listen(self.tls, ssl_only=True)
        client = await self.connect(port, trusting_ca())
        _, version = await client.handshake
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))

    async def test_default_refuses_tls11(self) -> None:
        """By default a client that can do no better than TLS 1.1 fails to handshake."""
        port = self.listen(self.tls, ssl_only=True)
        await self.refused(port, RawClientTLS(SSL.TLS1_1_VERSION))

    async def test_tls12_client_accepted_by_default(self) -> None:
        """A TLS 1.2-only client is served by default (the raw client itself works)."""
        port = self.listen(self.tls, ssl_only=True)
        client = await self.connect(port, RawClientTLS(SSL.TLS1_2_VERSION))
        self.assertEqual(await client.exchange(b"twelve"), b"twelve")

    async def test_tlsv1_3_minimum_refuses_tls12(self) -> None:
        """ssl_minimum_version tlsv1_3 refuses a client limited to TLS 1.2."""
        tls = ReloadableServerTLS(self.tls.cert_path, self.tls.key_path, None, "tlsv1_3")
        port = self.listen(tls, ssl_only=True)
        await self.refused(port, RawClientTLS(SSL.TLS1_2_VERSION))

    async def test_cipher_string_applied(self) -> None:
        """With one TLS 1.2 cipher allowed, a client offering only another one fails."""
        allowed, other = b"ECDHE-ECDSA-AES256-GCM-SHA384", b"ECDHE-ECDSA-AES128-GCM-SHA256"
        tls = ReloadableServerTLS(self.tls.cert_path, self.tls.key_path, allowed.decode())
        port = self.listen(tls, ssl_only=True)
        await self.refused(port, RawClientTLS(SSL.TLS1_2_VERSION, other))
        client = await self.connect(port, RawClientTLS(SSL.TLS1_2_VERSION, allowed))
        self.assertEqual(await client.exchange(b"allowed"), b"allowed")

    async def test_key_and_chain_in_cert_file(self) -> None:
        """key unset: a cert file with leaf, intermediate and key serves a CA-trusting client."""
        leaf, key = SERVER_VIA_INTERMEDIATE
        cert = write(self, cert_pem(leaf) + cert_pem(INTERMEDIATE[0]) + key_pem(key))
        port = self.listen(ReloadableServerTLS(cert), ssl_only=True)
        client = await self.connect(port, trusting_ca())
        self.assertEqual(await client.exchange(b"chain"), b"chain")
        self.assertEqual((await client.handshake)[0], fingerprint(leaf))


class ReloadTests(ListenerMixin, TestCase):
    def setUp(self) -> None:
        self.files = write_pair(self, SERVER_A)
        self.tls = ReloadableServerTLS(*self.files)
        self.port = self.listen(self.tls, ssl_only=False)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    async def _live_then_reload(self, reload: Any) -> None:
        live = await self.connect(self.port, trusting_ca())
        self.assertEqual((await live.handshake)[0], fingerprint(SERVER_A[0]))
        self.assertEqual(await live.exchange(b"before"), b"before")
        write_pair(self, SERVER_B, at=self.files)
        self.assertTrue(await reload())
        self.assertEqual(await live.exchange(b"after"), b"beforeafter")
        new = await self.connect(self.port, trusting_ca())
        self.assertEqual((await new.handshake)[0], fingerprint(SERVER_B[0]))
        self.assertEqual(await new.exchange(b"new"), b"new")

    async def test_reload(self) -> None:
        """After reload() a new connection sees cert B; a live one keeps working."""

        async def reload() -> bool:
            return self.tls.reload()

        await self._live_then_reload(reload)
        messages = [e["log_format"] for e in self.events]
        self.assertIn("TLS certificate reloaded from {cert}", messages)

    async def test_sighup_reloads_and_chains(self) -> None:
        """SIGHUP reloads (live connections untouched), calls the previous handler, uninstalls."""
        original = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        calls: list[int] = []
        previous = lambda signum, frame: calls.append(signum)  # noqa: E731
        signal.signal(signal.SIGHUP, previous)
        uninstall = reload_on_sighup([self.tls], reactor)

        async def reload() -> bool:
            d = self.tls.when_reloaded()
            os.kill(os.getpid(), signal.SIGHUP)
            return await d

        await self._live_then_reload(reload)
        self.assertEqual(calls, [signal.SIGHUP])
        uninstall()
        self.assertIs(signal.getsignal(signal.SIGHUP), previous)

    async def test_reload_from_fifo_keeps_old_cert(self) -> None:
        """A key path replaced by a FIFO fails the reload at once (the reactor is not
        stuck waiting for a writer): one error naming it, cert A still served."""
        os.unlink(self.files[1])
        os.mkfifo(self.files[1])
        self.assertFalse(self.tls.reload())
        errors = [e for e in self.events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertIn(f"{self.files[1]}: not a regular file", str(errors[0]["error"]))
        client = await self.connect(self.port, trusting_ca())
        self.assertEqual((await client.handshake)[0], fingerprint(SERVER_A[0]))

    async def test_bad_reload_keeps_old_cert(self) -> None:
        """A garbage key file fails the reload: an error is logged and cert A is still served."""
        write(self, b"garbage\n", self.files[1])
        self.assertFalse(self.tls.reload())
        errors = [e for e in self.events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertIn(self.files[1], str(errors[0]["error"]))
        client = await self.connect(self.port, trusting_ca())
        self.assertEqual((await client.handshake)[0], fingerprint(SERVER_A[0]))


class ALPNMixin(ListenerMixin):
    """ALPN on an echo listener; subclasses set ssl_only (TLS only, or a shared port)."""

    ssl_only: bool

    def setUp(self) -> None:
        self.tls = ReloadableServerTLS(*write_pair(self, SERVER_A))

    async def negotiated(self: Any, port: int, offer: tuple[bytes, ...]) -> bytes | None:
        """Connect offering `offer`; assert the handshake completes and data is echoed;
        return the protocol the server selected (None: no ALPN)."""
        client = await self.connect(port, trusting_ca(offer))
        await client.handshake
        self.assertEqual(await client.exchange(b"after handshake"), b"after handshake")
        selected: bytes | None = client.transport.negotiatedProtocol
        return selected

    async def test_http_door_selects_http11_from_browser_list(self) -> None:
        """A door naming http/1.1 selects it from a browser's h2,http/1.1, never h2."""
        port = self.listen(self.tls, self.ssl_only, HTTP_ALPN)
        self.assertEqual(await self.negotiated(port, BROWSER_ALPN), b"http/1.1")

    async def test_no_overlap_goes_on_without_alpn(self) -> None:
        """A client offering only h2 to an http/1.1 door: no ALPN, no abort."""
        port = self.listen(self.tls, self.ssl_only, HTTP_ALPN)
        self.assertIsNone(await self.negotiated(port, (b"h2",)))

    async def test_door_without_protocols_ignores_offers(self) -> None:
        """A door naming no protocols (XVP, raw serial) completes handshakes offering
        h2,http/1.1 or foo, selecting nothing (before the fix: alert 80)."""
        port = self.listen(self.tls, self.ssl_only)
        self.assertIsNone(await self.negotiated(port, BROWSER_ALPN))
        self.assertIsNone(await self.negotiated(port, (b"foo",)))

    async def test_client_without_alpn(self) -> None:
        """A client that offers no ALPN (the Java viewer, Python's default) is served."""
        port = self.listen(self.tls, self.ssl_only, HTTP_ALPN)
        self.assertIsNone(await self.negotiated(port, ()))

    async def test_reloaded_certificate_keeps_alpn(self) -> None:
        """After a reload (new options, new context) the rules hold: http/1.1 is
        selected, and a non-overlapping list still completes on a protocol-less door."""
        http_port = self.listen(self.tls, self.ssl_only, HTTP_ALPN)
        bare_port = self.listen(self.tls, self.ssl_only)
        write_pair(self, SERVER_B, at=(self.tls.cert_path, self.tls.key_path or ""))
        self.assertTrue(self.tls.reload())
        client = await self.connect(http_port, trusting_ca(BROWSER_ALPN))
        self.assertEqual((await client.handshake)[0], fingerprint(SERVER_B[0]))
        self.assertEqual(client.transport.negotiatedProtocol, b"http/1.1")
        self.assertIsNone(await self.negotiated(bare_port, (b"h2",)))


class ALPNTLSOnlyTests(ALPNMixin, TestCase):
    ssl_only = True


class ALPNSharedPortTests(ALPNMixin, TestCase):
    ssl_only = False


class FirstByteTimeoutTests(SynchronousTestCase):
    def test_silent_client_is_closed(self) -> None:
        """On a shared port a client that sends nothing is aborted after the timeout."""
        clock = Clock()
        tls = ReloadableServerTLS(*write_pair(self, SERVER_A))
        factory = TLSOrPlainFactory(EchoFactory(), tls, clock, first_byte_timeout=5)
        silent, talking = StringTransport(), StringTransport()
        protocols = []
        for transport in (silent, talking):
            protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
            protocol.makeConnection(transport)
            protocols.append(protocol)
        protocols[1].dataReceived(b"hello")
        clock.advance(5)
        self.assertTrue(silent.disconnecting or getattr(silent, "aborting", False))
        self.assertFalse(getattr(talking, "aborting", False))
        self.assertEqual(clock.getDelayedCalls(), [])


# --- ALPN at the doors of a whole consoled --------------------------------------


def tls_settings(testcase: SynchronousTestCase, ssl_only: bool) -> Settings:
    """test_settings with TLS on every door: TLS only, or shared with plain."""
    cert, key = write_pair(testcase, SERVER_A)
    base = test_settings()
    default = dataclasses.replace(base.default, ssl_only=ssl_only, cert=cert, key=key)
    return dataclasses.replace(base, default=default)


class DoorMixin:
    """A consoled with TLS; `relay` and `exchange` drive one of its doors."""

    timeout = 30
    door: str
    ssl_only = True

    def setUp(self: Any) -> None:
        self.consoled = Consoled(self, tls_settings(self, self.ssl_only))
        self.port = self.consoled.port(self.door)

    async def token_for_echo(self: Any, console_type: str) -> str:
        """A token for console_type whose console echoes what it is sent."""
        echo = hypervisors.serve(self, hypervisors.Echo)
        issued = await self.consoled.authorize(console_type, "127.0.0.1", echo.port)
        token: str = issued.token
        return token

    async def stdlib(self: Any, alpn: list[str], request: bytes, until: bytes) -> Any:
        """stdlib_exchange with this door, in a thread; waits for sessions to end."""
        result = await threads.deferToThread(stdlib_exchange, self.port, alpn, request, until)
        await self.consoled.wait_sessions_ended()
        return result


class WebsocketDoorALPN(DoorMixin):
    """A websocket door behind TLS, reached by clients offering ALPN as browsers do."""

    console_type: str
    page: str  # a path and the status it is answered with
    status: bytes

    async def test_wss_selects_http11(self) -> None:
        """wss offering h2,http/1.1: http/1.1 is selected, the console's bytes go both ways."""
        token = await self.token_for_echo(self.console_type)
        client = await ws_connect(self.port, token, tls=trusting_ca(BROWSER_ALPN))
        self.assertEqual(client.transport.negotiatedProtocol, b"http/1.1")
        client.send(b"ping")
        self.assertEqual(await client.read(4), b"ping")
        client.sendClose(1000)
        await client.closed
        await self.consoled.wait_sessions_ended()

    async def test_python_ssl_client_gets_a_page(self) -> None:
        """Python's ssl offering h2,http/1.1: http/1.1 is selected and the page request
        is answered."""
        request = f"GET {self.page} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        selected, answer = await self.stdlib(["h2", "http/1.1"], request.encode(), b"\r\n\r\n")
        self.assertEqual(selected, "http/1.1")
        self.assertTrue(answer.startswith(b"HTTP/1.1 " + self.status + b" "), answer[:80])

    async def test_openssl_s_client(self) -> None:
        """openssl s_client -alpn h2,http/1.1 (curl's and browsers' list): http/1.1 is
        selected and the page request is answered."""
        request = f"GET {self.page} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode()
        output, code = await s_client(self, self.port, "h2,http/1.1", request)
        self.assertIn(b"ALPN protocol: http/1.1", output)
        self.assertIn(b"HTTP/1.0 " + self.status + b" ", output)
        self.assertEqual(code, 0, output)


class NoVNCDoorALPNTests(WebsocketDoorALPN, TestCase):
    door, console_type, page, status = "novnc", "novnc", "/", b"404"  # no directory listings


class SpiceDoorALPNTests(WebsocketDoorALPN, TestCase):
    door, console_type, page, status = "spice", "spice-html5", "/", b"404"


class SerialDoorALPNTests(WebsocketDoorALPN, TestCase):
    door, console_type, page, status = "serial", "serial", "/serial.html", b"200"


class XVPDoorALPNTests(DoorMixin, TestCase):
    """The XVP door speaks no ALPN protocol: an offer that does not overlap is ignored."""

    door = "xvp"

    async def test_python_ssl_h2_only_connect(self) -> None:
        """Python's ssl offering only h2: no ALPN, and a CONNECT reaches the console."""
        token = await self.token_for_echo("xvpvnc")
        request = java_request(token) + b"ping"
        selected, answer = await self.stdlib(["h2"], request, b"\r\n\r\nping")
        self.assertIsNone(selected)
        self.assertEqual(answer, b"HTTP/1.1 200 OK\r\n\r\nping")

    async def test_openssl_s_client_foo(self) -> None:
        """openssl s_client -alpn foo: handshake completes with no ALPN; a CONNECT with
        an unknown token gets its 401 answer."""
        request = b"CONNECT /console?token=nope HTTP/1.0\r\n\r\n"
        output, code = await s_client(self, self.port, "foo", request)
        self.assertIn(b"No ALPN negotiated", output)
        self.assertIn(b"HTTP/1.1 401 ", output)
        self.assertEqual(code, 0, output)


class SerialTCPDoorALPNTests(DoorMixin, TestCase):
    """The raw serial door (TLS with ssl_only) ignores ALPN; its prompt arrives."""

    door = "serial-tcp"

    async def test_python_ssl_browser_list_gets_prompt(self) -> None:
        """Python's ssl offering h2,http/1.1: no ALPN, the token prompt arrives."""
        selected, received = await self.stdlib(["h2", "http/1.1"], b"", PROMPT)
        self.assertIsNone(selected)
        self.assertTrue(received.endswith(PROMPT), received)

    async def test_openssl_s_client_gets_prompt(self) -> None:
        """openssl s_client -alpn h2,http/1.1: no ALPN, the prompt arrives, Ctrl-D leaves."""
        output, code = await s_client(self, self.port, "h2,http/1.1", b"\x04")
        self.assertIn(b"No ALPN negotiated", output)
        self.assertIn(PROMPT, output)
        self.assertEqual(code, 0, output)


class SharedPortDoorALPNTests(DoorMixin, TestCase):
    """ssl_only false with a certificate: the first byte decides, ALPN as with TLS only."""

    door = "novnc"
    ssl_only = False

    async def test_websocket_door_selects_http11(self) -> None:
        """On a shared port wss offering h2,http/1.1 gets http/1.1; plain HTTP still works."""
        token = await self.token_for_echo("novnc")
        client = await ws_connect(self.port, token, tls=trusting_ca(BROWSER_ALPN))
        self.assertEqual(client.transport.negotiatedProtocol, b"http/1.1")
        client.send(b"ping")
        self.assertEqual(await client.read(4), b"ping")
        client.sendClose(1000)
        await client.closed
        plain = await ws_connect(self.port, token)
        plain.sendClose(1000)
        await plain.closed
        await self.consoled.wait_sessions_ended()

    async def test_xvp_door_h2_only(self) -> None:
        """On a shared port the XVP door completes a handshake offering only h2."""
        self.port = self.consoled.port("xvp")
        token = await self.token_for_echo("xvpvnc")
        selected, answer = await self.stdlib(["h2"], java_request(token) + b"ping", b"ping")
        self.assertIsNone(selected)
        self.assertEqual(answer, b"HTTP/1.1 200 OK\r\n\r\nping")


def plain_exchange(port: int, request: bytes) -> bytes:
    """A plain TCP client, blocking (run it in a thread): send request, read until closed."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


class PlainOnTLSOnlyTests(DoorMixin, TestCase):
    """ssl_only: a plain client is told the port speaks TLS only, in its door's
    words, and the refusal is logged; nothing reaches the door."""

    door = "novnc"

    def refusals(self, events: Any) -> list[str]:
        return [
            e["log_format"].format(**e)
            for e in events
            if e.get("log_format", "").startswith("refused {door} connection")
        ]

    async def test_http_door_answers_400(self) -> None:
        """A browser sent to http:// on a TLS-only websocket door gets a 400 saying so."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        request = b"GET /vnc_lite.html HTTP/1.1\r\nHost: localhost\r\n\r\n"
        answer = await deferToThread(plain_exchange, self.port, request)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:80])
        self.assertIn(b"this port speaks TLS only", answer)
        self.assertEqual(
            self.refusals(events),
            [
                "refused novnc connection from 127.0.0.1: bad request: "
                "this port speaks TLS only: use https://, wss:// or a TLS client"
            ],
        )
        self.assertEqual(self.consoled.session_rows(), [])

    async def test_raw_serial_door_answers_a_line(self) -> None:
        """nc on the TLS-only raw serial door gets a line instead of a bare hang-up."""
        self.port = self.consoled.port("serial-tcp")
        answer = await deferToThread(plain_exchange, self.port, b"hello\r\n")
        self.assertEqual(
            answer,
            b"console unavailable: bad request: "
            b"this port speaks TLS only: use https://, wss:// or a TLS client\r\n",
        )

    async def test_tls_still_served(self) -> None:
        """The same port still serves TLS (the detector sends the handshake to TLS)."""
        request = b"GET /serial.html HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        self.port = self.consoled.port("serial")
        selected, answer = await self.stdlib(["http/1.1"], request, b"\r\n\r\n")
        self.assertEqual(selected, "http/1.1")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:80])
