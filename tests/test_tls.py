"""TLS for the listeners: start-up checks, TLS-only and mixed ports, versions, ciphers, reload.

Certificates are made here with `cryptography` (EC P-256, so it is fast): a
CA, an intermediate, and server certificates for localhost/127.0.0.1. The
integration tests listen on 127.0.0.1 port 0 and talk to an echo protocol
with real Twisted TLS clients.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from consoled.config import ConsoleSettings, DefaultSettings, Settings
from consoled.tls import (
    FirstByteDetector,
    ReloadableServerTLS,
    TLSError,
    TLSOrPlainFactory,
    reload_on_sighup,
    server_tls_from_settings,
    tls_factory,
)

HOST = "127.0.0.1"
_DAY = datetime.timedelta(days=1)


# --- certificates ------------------------------------------------------------


def _make_cert(
    name: str, issuer: tuple[x509.Certificate, Any] | None, *, ca: bool
) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signing_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + _DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signing_key, hashes.SHA256()), key


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


CA = _make_cert("consoled test CA", None, ca=True)
INTERMEDIATE = _make_cert("consoled test intermediate", CA, ca=True)
SERVER_A = _make_cert("localhost", CA, ca=False)
SERVER_B = _make_cert("localhost", CA, ca=False)
SERVER_VIA_INTERMEDIATE = _make_cert("localhost", INTERMEDIATE, ca=False)


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
    return write(testcase, _cert_pem(pair[0]), cert_path), write(
        testcase, _key_pem(pair[1]), key_path
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

    def listen(self: Any, tls: ReloadableServerTLS | None, ssl_only: bool) -> int:
        echo = EchoFactory()
        port = reactor.listenTCP(0, tls_factory(echo, tls, ssl_only), interface=HOST)
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


def trusting_ca() -> Any:
    return optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(_cert_pem(CA[0])))


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
        self.assertRaises(ValueError, tls_factory, EchoFactory(), None, True)


class FirstByteDetectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        cert, key = write_pair(self, SERVER_A)
        self.echo = EchoFactory()
        self.factory = TLSOrPlainFactory(self.echo, ReloadableServerTLS(cert, key))

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
        cert = write(self, _cert_pem(leaf) + _cert_pem(INTERMEDIATE[0]) + _key_pem(key))
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

    async def test_bad_reload_keeps_old_cert(self) -> None:
        """A garbage key file fails the reload: an error is logged and cert A is still served."""
        write(self, b"garbage\n", self.files[1])
        self.assertFalse(self.tls.reload())
        errors = [e for e in self.events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertIn(self.files[1], str(errors[0]["error"]))
        client = await self.connect(self.port, trusting_ca())
        self.assertEqual((await client.handshake)[0], fingerprint(SERVER_A[0]))


class FirstByteTimeoutTests(SynchronousTestCase):
    def test_silent_client_is_closed(self) -> None:
        """On a shared port a client that sends nothing is aborted after the timeout."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from consoled.tls import TLSOrPlainFactory

        clock = Clock()
        tls = ReloadableServerTLS(*write_pair(self, SERVER_A))
        factory = TLSOrPlainFactory(EchoFactory(), tls, first_byte_timeout=5, clock=clock)
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
