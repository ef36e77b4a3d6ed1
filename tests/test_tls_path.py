"""The server TLS data path (`consoled.tls.ServerTLSProtocol`), driven in memory.

A pyOpenSSL client on memory BIOs talks to the doors' TLS protocol over a
`StringTransport`: every byte each way is shuttled by the test, so the
number of writes and deliveries is exact.  What is checked is what the path
exists for (issue 16): one application write is one write to the TCP
transport whatever its size, the records of one read reach the door in one
call, and nothing is lost or reordered on the way, on TLS 1.2 and 1.3, before
and after the handshake, and at a close_notify.
"""

from __future__ import annotations

import os
from typing import Any

from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from consoled import malloc
from consoled.tls import (
    RENEW_AFTER,
    ReloadableServerTLS,
    ServerTLSFactory,
    ServerTLSProtocol,
    renew_bios,
)
from tests.pki import cert_pem, key_pem, make_cert

CA = make_cert("consoled test CA", None, ca=True)
SERVER = make_cert("localhost", CA, ca=False)


class Door(Protocol):
    """Records each delivery and its end."""

    def __init__(self) -> None:
        self.deliveries: list[bytes] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.deliveries.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason


class CountingTransport(StringTransport):
    """A StringTransport that counts the writes it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class CountingSSLWrite:
    """pyOpenSSL's ``_lib`` with its ``SSL_write`` calls counted."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.calls = 0

    def SSL_write(self, *args: Any) -> Any:  # noqa: N802 (OpenSSL's name)
        self.calls += 1
        return self._lib.SSL_write(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)


def server_factory(testcase: SynchronousTestCase) -> ServerTLSFactory:
    cert = testcase.mktemp()
    key = testcase.mktemp()
    with open(cert, "wb") as f:
        f.write(cert_pem(SERVER[0]))
    with open(key, "wb") as f:
        f.write(key_pem(SERVER[1]))
    factory = ServerTLSFactory(ReloadableServerTLS(cert, key), Factory.forProtocol(Door))
    factory._clock = Clock()  # the idle sweep's (ServerTLSFactory.grew)
    return factory


class Pair:
    """A doors' TLS protocol and a pyOpenSSL client, joined by the test."""

    def __init__(
        self,
        testcase: SynchronousTestCase,
        version: int,
        handshake: bool = True,
        factory: ServerTLSFactory | None = None,
    ) -> None:
        self.door = Door()
        if factory is None:
            factory = server_factory(testcase)
        self.server = factory.buildProtocol(None)
        assert isinstance(self.server, ServerTLSProtocol)
        self.server.wrappedProtocol = self.door
        self.door.makeConnection(self.server)
        self.wire = CountingTransport()
        self.server.makeConnection(self.wire)
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
        self.client = SSL.Connection(context, None)
        self.client.set_connect_state()
        if handshake:
            self.shuttle()

    def to_client(self) -> None:
        data = self.wire.value()
        self.wire.clear()
        if data:
            self.client.bio_write(data)

    def from_client(self) -> bytes:
        try:
            return self.client.bio_read(1 << 22)
        except SSL.WantReadError:
            return b""

    def shuttle(self, server_too: bool = True) -> None:
        """Run the handshake to its end, both ways; or, without ``server_too``,
        until the client's is done, its last flight (Finished) not yet sent."""
        for _ in range(10):
            try:
                self.client.do_handshake()
                if not server_too:
                    return
            except SSL.WantReadError:
                pass
            out = self.from_client()
            if out:
                self.server.dataReceived(out)
            self.to_client()
            if self.server._handshakeDone and not out:
                try:
                    self.client.do_handshake()
                    return
                except SSL.WantReadError:
                    pass
        raise AssertionError("the handshake did not finish")

    def bios(self) -> tuple[Any, Any]:
        """The server connection's receive and send BIOs (pyOpenSSL's cdata)."""
        connection = self.server._tlsConnection
        return connection._into_ssl, connection._from_ssl

    def client_reads(self) -> bytes:
        self.to_client()
        received = b""
        while True:
            try:
                received += self.client.recv(65536)
            except SSL.WantReadError:
                return received


class ServerTLSPathTests(SynchronousTestCase):
    versions = {"TLS 1.2": SSL.TLS1_2_VERSION, "TLS 1.3": SSL.TLS1_3_VERSION}

    def each_version(self) -> Any:
        for name, version in self.versions.items():
            yield name, Pair(self, version)

    def test_a_large_write_is_one_transport_write(self) -> None:
        """256 KiB written by the door reaches the TCP transport as one write
        (Twisted's own TLS transport makes one per 16 KiB record), intact."""
        for name, pair in self.each_version():
            payload = os.urandom(256 * 1024)
            pair.wire.writes = 0
            pair.server.write(payload)
            self.assertEqual(pair.wire.writes, 1, name)
            self.assertEqual(pair.client_reads(), payload, name)

    def test_a_large_write_is_one_ssl_write(self) -> None:
        """After the handshake OpenSSL takes a 256 KiB write in one SSL_write
        (pyOpenSSL's partial-write mode would return after each of its 16
        records, each a turn of sendall's Python loop); before it the
        connection keeps the mode Twisted's own path expects."""
        counted = CountingSSLWrite(SSL._lib)
        self.patch(SSL, "_lib", counted)
        for name, version in self.versions.items():
            early = Pair(self, version, handshake=False)
            mode = SSL._lib.SSL_set_mode(early.server._tlsConnection._ssl, 0)
            self.assertTrue(mode & SSL._lib.SSL_MODE_ENABLE_PARTIAL_WRITE, name)
            pair = Pair(self, version)
            payload = os.urandom(256 * 1024)
            counted.calls = 0
            pair.server.write(payload)
            self.assertEqual(counted.calls, 1, name)
            self.assertEqual(pair.client_reads(), payload, name)

    def test_a_frame_header_and_payload_are_one_write(self) -> None:
        """writeSequence (the websocket frame's header and payload) is one write too."""
        for name, pair in self.each_version():
            pair.wire.writes = 0
            pair.server.writeSequence([b"\x82\x7e\x10\x00", b"x" * 4096])
            self.assertEqual(pair.wire.writes, 1, name)
            self.assertEqual(pair.client_reads(), b"\x82\x7e\x10\x00" + b"x" * 4096, name)

    def test_a_large_frame_is_one_write_without_joining(self) -> None:
        """A frame header with a 100 KiB payload: one transport write, intact,
        the header in the first record with the payload's start."""
        for name, pair in self.each_version():
            payload = os.urandom(100 * 1024)
            header = b"\x82\x7f" + (100 * 1024).to_bytes(8, "big")
            pair.wire.writes = 0
            pair.server.writeSequence([header, payload])
            self.assertEqual(pair.wire.writes, 1, name)
            self.assertEqual(pair.client_reads(), header + payload, name)
            pair.server.loseConnection()  # sends close_notify
            sent = pair.wire.value()
            pair.server.writeSequence([header, payload])  # after loseConnection: dropped
            self.assertEqual(pair.wire.value(), sent, name)

    def test_records_of_one_read_are_one_delivery(self) -> None:
        """Five records arriving together reach the door in one call, in order."""
        for name, pair in self.each_version():
            pieces = [os.urandom(16384) for _ in range(4)] + [b"tail"]
            for piece in pieces:
                pair.client.sendall(piece)
            before = len(pair.door.deliveries)
            pair.server.dataReceived(pair.from_client())
            self.assertEqual(pair.door.deliveries[before:], [b"".join(pieces)], name)

    def test_a_record_split_across_reads(self) -> None:
        """A record cut anywhere is held until it is whole; nothing is delivered early."""
        for name, pair in self.each_version():
            pair.client.sendall(b"hello, console")
            wire = pair.from_client()
            before = len(pair.door.deliveries)
            for i in range(len(wire)):
                pair.server.dataReceived(wire[i : i + 1])
            self.assertEqual(b"".join(pair.door.deliveries[before:]), b"hello, console", name)

    def test_writes_before_the_handshake_wait_for_it(self) -> None:
        """A write made while the handshake runs is sent once it is done, in order."""
        pair = Pair(self, SSL.TLS1_3_VERSION, handshake=False)
        pair.server.write(b"first")
        pair.shuttle()
        pair.server.write(b" second")
        self.assertEqual(pair.client_reads(), b"first second")

    def test_close_notify_delivers_what_came_before_it(self) -> None:
        """Data and the client's close_notify in one read: the data first, then the end."""
        for name, pair in self.each_version():
            pair.client.sendall(b"last words")
            pair.client.shutdown()
            before = len(pair.door.deliveries)
            pair.server.dataReceived(pair.from_client())
            self.assertEqual(pair.door.deliveries[before:], [b"last words"], name)
            self.assertTrue(pair.wire.disconnecting, name)

    def test_idle_connections_release_their_buffers(self) -> None:
        """The doors' context frees record buffers while idle (memory per session)
        and refuses renegotiation (a write never waits for the client)."""
        cert, key = self.mktemp(), self.mktemp()
        with open(cert, "wb") as f:
            f.write(cert_pem(SERVER[0]))
        with open(key, "wb") as f:
            f.write(key_pem(SERVER[1]))
        context = ReloadableServerTLS(cert, key).getContext()
        mode = SSL.MODE_RELEASE_BUFFERS
        self.assertEqual(context.set_mode(0) & mode, mode)  # set_mode answers the mode
        renegotiation = SSL.OP_NO_RENEGOTIATION
        self.assertEqual(context.set_options(0) & renegotiation, renegotiation)
        # No session kept per client: resumption is by ticket (test_tls.test_sessions_resume).
        self.assertEqual(context.get_session_cache_mode(), SSL.SESS_CACHE_OFF)

    def test_the_handshake_leaves_no_grown_bio_behind(self) -> None:
        """When the handshake is over the server connection starts on two new
        memory BIOs (the handshake grew the old ones to the ClientHello and
        the server's flight, ~2.4 KiB a session with RSA), and bytes go both
        ways on them."""
        for name, version in self.versions.items():
            pair = Pair(self, version, handshake=False)
            before = pair.bios()
            pair.shuttle()
            after = pair.bios()
            self.assertIsNot(after[0], before[0], name)
            self.assertIsNot(after[1], before[1], name)
            pair.server.write(b"to the client")
            self.assertEqual(pair.client_reads(), b"to the client", name)
            pair.client.sendall(b"to the door")
            pair.server.dataReceived(pair.from_client())
            self.assertEqual(pair.door.deliveries[-1], b"to the door", name)

    def test_data_behind_the_clients_finished_moves_to_the_new_bio(self) -> None:
        """TLS 1.3: the client's first request in the same read as its
        Finished waits in the receive BIO when the handshake ends; it moves to
        the new BIO and reaches the door whole."""
        pair = Pair(self, SSL.TLS1_3_VERSION, handshake=False)
        pair.shuttle(server_too=False)
        request = b"GET /?token=x HTTP/1.1\r\n" + b"x" * 3000 + b"\r\n\r\n"
        pair.client.sendall(request)
        before = pair.bios()
        pair.server.dataReceived(pair.from_client())  # Finished and the request
        self.assertTrue(pair.server._handshakeDone)
        self.assertIsNot(pair.bios()[0], before[0])
        self.assertEqual(b"".join(pair.door.deliveries), request)

    def test_renew_bios_frees_a_grown_send_bio_only_when_empty(self) -> None:
        """renew_bios swaps in empty BIOs when there is nothing left to send
        and leaves the connection alone while there is."""
        pair = Pair(self, SSL.TLS1_3_VERSION)
        connection = pair.server._tlsConnection
        connection.sendall(b"not read out yet")
        held = pair.bios()
        self.assertFalse(renew_bios(connection))
        self.assertEqual(pair.bios(), held)
        pair.server._flushSendBIO()
        self.assertTrue(renew_bios(connection))
        self.assertEqual(pair.client_reads(), b"not read out yet")
        pair.server.write(b"after")
        self.assertEqual(pair.client_reads(), b"after")

    def test_a_burst_of_handshakes_gives_the_heap_back_when_over(self) -> None:
        """With release_after handshakes in flight at once, the heap is given
        back (malloc.release) once, when the last of them is over, finished
        or failed; fewer at once, or some still in flight, give nothing back."""
        released: list[bool] = []
        self.patch(malloc, "release", lambda: released.append(True) or True)
        factory = server_factory(self)
        burst = [
            Pair(self, SSL.TLS1_3_VERSION, handshake=False, factory=factory)
            for _ in range(factory.release_after)
        ]
        self.assertEqual(factory.handshaking, factory.release_after)
        for pair in burst[:-2]:
            pair.shuttle()
        burst[-2].server.connectionLost(Failure(ConnectionDone()))  # a failed handshake
        self.assertEqual((factory.handshaking, released), (1, []))
        burst[-1].shuttle()
        self.assertEqual((factory.handshaking, released), (0, [True]))
        # then one at a time: no burst, nothing more to give back
        for _ in range(3):
            Pair(self, SSL.TLS1_3_VERSION, factory=factory)
        self.assertEqual((factory.handshaking, factory.burst, released), (0, 1, [True]))
        # a closed session is not counted twice
        burst[0].server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory.handshaking, 0)

    def test_a_grown_session_is_renewed_once_quiet(self) -> None:
        """A 256 KiB write grows the send BIO; once the session has been quiet
        for RENEW_AFTER its BIOs are renewed, and it goes on working."""
        factory = server_factory(self)
        pair = Pair(self, SSL.TLS1_3_VERSION, factory=factory)
        small = pair.bios()
        pair.server.write(b"s" * 1024)  # small writes grow nothing
        self.assertEqual(pair.client_reads(), b"s" * 1024)
        self.assertEqual(factory._grown, {})
        payload = os.urandom(256 * 1024)
        pair.server.write(payload)
        self.assertEqual(pair.client_reads(), payload)
        self.assertIn(pair.server, factory._grown)
        grown = pair.bios()
        clock = factory._clock
        clock.advance(RENEW_AFTER / 2)
        pair.server.write(payload)  # still streaming: kept
        self.assertEqual(pair.client_reads(), payload)
        clock.advance(RENEW_AFTER / 2)
        self.assertEqual(pair.bios(), grown)
        clock.advance(RENEW_AFTER)
        self.assertNotEqual(pair.bios(), grown)
        self.assertNotEqual(pair.bios(), small)
        self.assertEqual(factory._grown, {})
        self.assertEqual(clock.getDelayedCalls(), [])  # the sweep stops when none is left
        pair.server.write(b"after")
        self.assertEqual(pair.client_reads(), b"after")

    def test_a_large_read_grows_too(self) -> None:
        """What the client sends in a large burst grows the receive BIO: renewed alike."""
        factory = server_factory(self)
        pair = Pair(self, SSL.TLS1_3_VERSION, factory=factory)
        pair.client.sendall(os.urandom(64 * 1024))
        pair.server.dataReceived(pair.from_client())
        self.assertIn(pair.server, factory._grown)
        factory._clock.advance(RENEW_AFTER)
        self.assertEqual(factory._grown, {})

    def test_a_lost_session_is_forgotten(self) -> None:
        """A grown session that ends is dropped at once, not renewed."""
        factory = server_factory(self)
        pair = Pair(self, SSL.TLS1_3_VERSION, factory=factory)
        pair.server.write(os.urandom(64 * 1024))
        pair.server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory._grown, {})

    def test_buffer_size_reaches_the_tcp_transport(self) -> None:
        """A door's write buffer size (how much waits for a slow browser before
        the console pauses) is the TCP transport's, as on a plain door."""
        pair = Pair(self, SSL.TLS1_3_VERSION)
        pair.wire.bufferSize = 65536
        pair.server.bufferSize = 256 * 1024
        self.assertEqual(pair.wire.bufferSize, 256 * 1024)
        self.assertEqual(pair.server.bufferSize, 256 * 1024)
