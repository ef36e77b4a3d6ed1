"""The RFB security proxy's two halves, driven byte by byte without sockets."""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from consoled.backends.rfb import (
    MAX_REASON,
    NONE,
    VENCRYPT,
    X509_NONE,
    RfbSecurity,
    ServerSide,
    StepReader,
    UserSide,
)
from consoled.backends.tcp import BackendProtocol
from consoled.config import Settings
from consoled.endings import Ending, Kind, Refusal
from consoled.tls import TLSError
from tests.pki import make_pki

OPTIONS = object()  # stands for the TLS options; the fake transport only records them
VENCRYPT_ONLY = RfbSecurity((VENCRYPT,), OPTIONS)  # type: ignore[arg-type]


class TLSRecordingTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.tls: list[Any] = []

    def startTLS(self, options: Any) -> None:
        self.tls.append(options)


class FakeBackend:
    """What ServerSide calls on its BackendProtocol."""

    def __init__(self) -> None:
        self.transport = TLSRecordingTransport()
        self.done: list[tuple[bytes, Any]] = []
        self.failed: list[Refusal] = []

    def handshake_done(self, rest: bytes = b"", front: Any = None) -> None:
        self.done.append((rest, front))

    def handshake_failed(self, refusal: Refusal) -> None:
        self.failed.append(refusal)


def vencrypt_server(subtypes: tuple[int, ...] = (X509_NONE,)) -> list[bytes]:
    """What a VeNCrypt server says, message by message, up to its SecurityResult."""
    return [
        b"RFB 003.008\n",
        bytes((1, VENCRYPT)),
        b"\x00\x02",
        b"\x00",
        bytes((len(subtypes),)) + struct.pack(f"!{len(subtypes)}I", *subtypes),
        b"\x01",
        b"\x00\x00\x00\x00",  # over the TLS, in a real session
    ]


class StepReaderTests(SynchronousTestCase):
    def test_split_and_dripped(self) -> None:
        """Steps get exactly the bytes they asked for however the input is cut."""

        def steps() -> Any:
            seen.append((yield 3))
            seen.append((yield 0))
            seen.append((yield 2))

        for cuts in ([b"abcdeXY"], [b"a", b"b", b"c", b"d", b"e", b"XY"], [b"abcd", b"eXY"]):
            seen: list[bytes] = []
            reader = StepReader(steps())
            results = [reader.feed(chunk) for chunk in cuts]
            self.assertEqual(seen, [b"abc", b"", b"de"])
            self.assertEqual(b"".join(r for r in results if r is not None), b"XY")


class ServerSideTests(SynchronousTestCase):
    def negotiate(
        self, messages: list[bytes], security: RfbSecurity = VENCRYPT_ONLY
    ) -> FakeBackend:
        backend = FakeBackend()
        server = ServerSide(security)
        server.start(backend)  # type: ignore[arg-type]
        for message in messages:
            if backend.done or backend.failed:
                break
            server.data_received(message)
        return backend

    def refusal(self, backend: FakeBackend) -> Ending:
        self.assertEqual(backend.done, [])
        self.assertEqual(len(backend.failed), 1)
        return backend.failed[0].ending

    def test_vencrypt_x509none(self) -> None:
        """Version, VeNCrypt, 0.2, X509None, TLS with our options, then SecurityResult OK."""
        backend = self.negotiate(vencrypt_server(subtypes=(256, X509_NONE, 261)))
        self.assertEqual(
            backend.transport.value(),
            b"RFB 003.008\n" + bytes((VENCRYPT,)) + b"\x00\x02" + struct.pack("!I", X509_NONE),
        )
        self.assertEqual(backend.transport.tls, [OPTIONS])
        self.assertEqual(len(backend.done), 1)
        rest, front = backend.done[0]
        self.assertEqual(rest, b"")
        self.assertTrue(callable(front))

    def test_dripped_byte_by_byte(self) -> None:
        """The same exchange one byte per read."""
        stream = b"".join(vencrypt_server())
        backend = self.negotiate([stream[i : i + 1] for i in range(len(stream))])
        self.assertEqual(backend.transport.tls, [OPTIONS])
        self.assertEqual(len(backend.done), 1)

    def test_none_when_allowed(self) -> None:
        """auth_schemes listing none: a server offering None gets None, no TLS."""
        security = RfbSecurity((VENCRYPT, NONE), OPTIONS)  # type: ignore[arg-type]
        backend = self.negotiate([b"RFB 003.008\n\x01\x01\x00\x00\x00\x00"], security)
        self.assertEqual(backend.transport.value(), b"RFB 003.008\n\x01")
        self.assertEqual(backend.transport.tls, [])
        self.assertEqual(len(backend.done), 1)

    def test_preference_order(self) -> None:
        """Both offered: the first of auth_schemes wins (VeNCrypt here)."""
        security = RfbSecurity((VENCRYPT, NONE), OPTIONS)  # type: ignore[arg-type]
        backend = self.negotiate([b"RFB 003.008\n\x02\x01\x13"], security)
        self.assertEqual(backend.transport.value(), b"RFB 003.008\n\x13")

    def test_no_downgrade(self) -> None:
        """vencrypt only and a server offering None (and a password): refused, nothing chosen."""
        backend = self.negotiate([b"RFB 003.008\n\x02\x01\x02"])
        ending = self.refusal(backend)
        self.assertEqual(ending.kind, Kind.BACKEND_INSECURE)
        self.assertIn("None (1), VNC password (2)", ending.detail)
        self.assertEqual(backend.transport.value(), b"RFB 003.008\n")

    def test_bad_versions(self) -> None:
        """Not RFB, or older than 3.8: refused before anything is sent."""
        for version, words in (
            (b"HTTP/1.1 200", "not an RFB server"),
            (b"RFB 003.003\n", "RFB 3.3"),
            (b"RFB 03.008\n\n", "not an RFB server"),
        ):
            backend = self.negotiate([version])
            ending = self.refusal(backend)
            self.assertEqual(ending.kind, Kind.BACKEND_REFUSED)
            self.assertIn(words, ending.detail)
            self.assertEqual(backend.transport.value(), b"")

    def test_later_version_answered_with_3_8(self) -> None:
        backend = self.negotiate([b"RFB 003.889\n"])
        self.assertEqual(backend.transport.value(), b"RFB 003.008\n")

    def test_failure_reason_is_capped(self) -> None:
        """A server's reason claiming 4 GiB: refused after MAX_REASON bytes, without waiting."""
        reason = b"x" * MAX_REASON
        backend = self.negotiate([b"RFB 003.008\n\x00" + struct.pack("!I", 2**32 - 1), reason])
        ending = self.refusal(backend)
        self.assertEqual(ending.kind, Kind.BACKEND_REFUSED)
        self.assertIn(f"{MAX_REASON} read", ending.detail)
        self.assertIn("xxxx", ending.detail)

    def test_short_reason(self) -> None:
        backend = self.negotiate([b"RFB 003.008\n\x00\x00\x00\x00\x08too many"])
        self.assertIn("'too many'", self.refusal(backend).detail)

    def test_security_result_failed(self) -> None:
        """SecurityResult 1 with a reason, read over the TLS: refused with the reason."""
        messages = vencrypt_server()[:-1] + [b"\x00\x00\x00\x01\x00\x00\x00\x06denied"]
        ending = self.refusal(self.negotiate(messages))
        self.assertEqual(ending.kind, Kind.BACKEND_REFUSED)
        self.assertIn("'denied'", ending.detail)

    def test_vencrypt_refusals(self) -> None:
        """Each step of VeNCrypt that goes wrong has its refusal."""
        head = [b"RFB 003.008\n", bytes((1, VENCRYPT))]
        cases = [
            ([b"\x00\x01"], Kind.BACKEND_REFUSED, "VeNCrypt 0.1"),
            ([b"\x00\x02", b"\x01"], Kind.BACKEND_REFUSED, "refused VeNCrypt 0.2"),
            (
                [b"\x00\x02", b"\x00", b"\x01" + struct.pack("!I", 257)],
                Kind.BACKEND_INSECURE,
                "[257]",
            ),
            ([b"\x00\x02", b"\x00", b"\x00"], Kind.BACKEND_INSECURE, "[]"),
            (
                [b"\x00\x02", b"\x00", b"\x01" + struct.pack("!I", X509_NONE), b"\x00"],
                Kind.BACKEND_REFUSED,
                "did not accept X509None",
            ),
        ]
        for tail, kind, words in cases:
            ending = self.refusal(self.negotiate(head + tail))
            self.assertEqual((ending.kind, words in ending.detail), (kind, True), ending)

    def test_absurd_subtype_count(self) -> None:
        """255 sub-types (1020 bytes) are read, and X509None among them is found."""
        subtypes = tuple(range(1000, 1254)) + (X509_NONE,)
        backend = self.negotiate(vencrypt_server(subtypes))
        self.assertEqual(len(backend.done), 1)

    def test_closed_in_tls_names_the_client_certificate(self) -> None:
        """The server hanging up after TLS started: TLS failed, our certificate named."""
        backend = FakeBackend()
        server = ServerSide(VENCRYPT_ONLY)
        server.start(backend)  # type: ignore[arg-type]
        server.data_received(b"".join(vencrypt_server()[:-1]))
        refusal = server.closed(Failure(ConnectionDone()))
        self.assertEqual(refusal.ending.kind, Kind.BACKEND_TLS)
        self.assertIn("vencrypt_client_cert", refusal.ending.detail)


class FakeClient:
    def __init__(self) -> None:
        self.sent = b""
        self.bound: Any = None

    def send(self, data: bytes) -> None:
        self.sent += data

    def rebind(self, endpoint: Any) -> None:
        self.bound = endpoint


class FakeRelay:
    def __init__(self) -> None:
        self.client = FakeClient()
        self.ended: list[Ending] = []
        self.to_server: list[bytes] = []
        self.lost: list[str] = []

    def end(self, ending: Ending) -> None:
        self.ended.append(ending)

    def from_client(self, data: bytes) -> None:
        self.to_server.append(data)

    def client_lost(self, detail: str = "") -> None:
        self.lost.append(detail)


class FakeConsole:
    def __init__(self) -> None:
        self.relaying_to: Any = None

    def relay_to(self, relay: Any) -> None:
        self.relaying_to = relay


class UserSideTests(SynchronousTestCase):
    def front(self) -> tuple[UserSide, FakeRelay, FakeConsole]:
        relay, console = FakeRelay(), FakeConsole()
        return UserSide(console, relay), relay, console  # type: ignore[arg-type]

    def test_rfb_3_8(self) -> None:
        """Version, [None], the viewer's None, SecurityResult OK; then ClientInit goes to the console."""
        front, relay, console = self.front()
        self.assertEqual(relay.client.sent, b"RFB 003.008\n")
        front.from_client(b"RFB 003.008\n")
        self.assertEqual(relay.client.sent, b"RFB 003.008\n\x01\x01")
        self.assertIsNone(console.relaying_to)
        front.from_client(b"\x01\x01")  # its choice, and ClientInit (shared) in the same read
        self.assertEqual(relay.client.sent, b"RFB 003.008\n\x01\x01\x00\x00\x00\x00")
        self.assertIs(relay.client.bound, relay)
        self.assertIs(console.relaying_to, relay)
        self.assertEqual(relay.to_server, [b"\x01"])
        self.assertEqual(relay.ended, [])

    def test_dripped(self) -> None:
        front, relay, console = self.front()
        for byte in b"RFB 003.008\n\x01":
            front.from_client(bytes((byte,)))
        self.assertIs(console.relaying_to, relay)
        self.assertEqual(relay.to_server, [])

    def test_rfb_3_7_has_no_security_result(self) -> None:
        front, relay, console = self.front()
        front.from_client(b"RFB 003.007\n\x01")
        self.assertEqual(relay.client.sent, b"RFB 003.008\n\x01\x01")
        self.assertIs(console.relaying_to, relay)

    def test_rfb_3_3_is_told_none(self) -> None:
        """3.3 (and the 3.5 some viewers send): the server names the type, u32 1."""
        for version in (b"RFB 003.003\n", b"RFB 003.005\n"):
            front, relay, console = self.front()
            front.from_client(version)
            self.assertEqual(relay.client.sent, b"RFB 003.008\n\x00\x00\x00\x01")
            self.assertIs(console.relaying_to, relay)

    def test_not_rfb(self) -> None:
        front, relay, console = self.front()
        front.from_client(b"GET / HTTP/1.1\r\n")
        self.assertEqual([e.kind for e in relay.ended], [Kind.BAD_REQUEST])
        self.assertIsNone(console.relaying_to)

    def test_other_security_type_is_told_why(self) -> None:
        """A 3.8 viewer choosing VNC password gets SecurityResult failed and a reason."""
        front, relay, console = self.front()
        front.from_client(b"RFB 003.008\n\x02")
        message = b"this proxy offers security type None (1) only"
        expected = b"RFB 003.008\n\x01\x01" + struct.pack("!II", 1, len(message)) + message
        self.assertEqual(relay.client.sent, expected)
        self.assertEqual([e.kind for e in relay.ended], [Kind.BAD_REQUEST])
        self.assertIsNone(console.relaying_to)

    def test_client_lost_ends_the_relay(self) -> None:
        front, relay, _ = self.front()
        front.client_lost("gone")
        self.assertEqual(relay.lost, ["gone"])


class BackendProtocolTests(SynchronousTestCase):
    def test_connect_answer_then_handshake(self) -> None:
        """XVP's CONNECT, then the RFB handshake on what follows the answer's blank line."""
        protocol = BackendProtocol("/console?x", ServerSide(RfbSecurity((NONE,), None)))
        transport = StringTransport()
        protocol.makeConnection(transport)
        ready: list[Any] = []
        protocol.ready.addBoth(ready.append)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nRFB 003.008\n")
        self.assertEqual(transport.value(), b"CONNECT /console?x HTTP/1.1\r\n\r\nRFB 003.008\n")
        protocol.dataReceived(b"\x01\x01\x00\x00\x00\x00")
        self.assertEqual(ready, [protocol])

    def test_closed_during_handshake(self) -> None:
        protocol = BackendProtocol(None, ServerSide(VENCRYPT_ONLY))
        protocol.makeConnection(StringTransport())
        failures: list[Failure] = []
        protocol.ready.addErrback(failures.append)
        protocol.dataReceived(b"RFB 003.008\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        refusal = failures[0].value
        self.assertEqual(refusal.ending.kind, Kind.BACKEND_REFUSED)
        self.assertIn("during the RFB handshake", refusal.ending.detail)


class SettingsTests(SynchronousTestCase):
    def vnc(self, **options: Any) -> Any:
        return dataclasses.replace(Settings().vnc, **options)

    def test_none_alone_is_no_proxy(self) -> None:
        self.assertIsNone(RfbSecurity.from_settings(self.vnc()))

    def test_vencrypt_needs_a_ca(self) -> None:
        error = self.assertRaises(
            TLSError, RfbSecurity.from_settings, self.vnc(auth_schemes=("vencrypt",))
        )
        self.assertIn("[vnc] vencrypt_ca_certs is not set", str(error))

    def test_unreadable_client_key_is_one_line(self) -> None:
        pki = make_pki(os.path.abspath(self.mktemp()))
        vnc = self.vnc(
            auth_schemes=("vencrypt", "none"),
            vencrypt_ca_certs=pki.ca_cert,
            vencrypt_client_cert=pki.client_cert,
            vencrypt_client_key=pki.dir + "/missing.pem",
        )
        error = self.assertRaises(TLSError, RfbSecurity.from_settings, vnc)
        self.assertIn("missing.pem", str(error))
        self.assertNotIn("\n", str(error))

    def test_loads(self) -> None:
        pki = make_pki(os.path.abspath(self.mktemp()))
        vnc = self.vnc(
            auth_schemes=("vencrypt", "none"),
            vencrypt_ca_certs=pki.ca_cert,
            vencrypt_client_cert=pki.client_cert,
            vencrypt_client_key=pki.client_key,
        )
        security = RfbSecurity.from_settings(vnc)
        assert security is not None
        self.assertEqual(security.schemes, (VENCRYPT, NONE))
