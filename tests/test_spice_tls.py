"""SPICE over TLS: a spice-html5 token with a tls_port reaches the SPICE server's TLS port.

Unit level: the connector against Twisted TLS servers on real sockets, with
certificates the test makes (a CA, a server certificate, a second CA that
trusts nothing here).  Integration: QEMU's SPICE server on a TLS port only
(``-spice tls-port=P,x509-dir=DIR``), through consoled's spice door, with a
SpiceLinkMess, and spice-html5 in headless Chromium drawing SeaBIOS's screen.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoled.backends import Backends, plain_tcp, xvp_connect
from consoled.backends.spice import SpiceTLS, connect_spice, parse_subject
from consoled.backends.tcp import BackendProtocol
from consoled.config import Settings, SpiceSettings, load_settings
from consoled.endings import ANSWERS, Kind, Refusal
from consoled.tls import TLSError
from consoled.tokens import ConnectInfo
from tests import test_startup
from tests.browser import launch_browser, wait_for_canvas
from tests.harness import Consoled, test_settings
from tests.hypervisors import closed_port
from tests.peers import (
    HOST,
    free_port,
    require_peer,
    spice_link_message,
    spice_link_reply_complete,
    start_qemu,
)
from tests.pki import Pki, make_pki
from tests.wsclient import ws_connect

SPICE_HTML5_DIR = "/usr/share/spice-html5"
SPICE_HTML5_HINT = "apt-get install -y --no-install-recommends spice-html5"
#: The subject tests.pki gives every server certificate, in host_subject's form.
SERVER_SUBJECT = "O=consoled tests,CN=localhost"
#: What a SPICE server sends before a link result: its link reply (header, the
#: RSA-1024 public key, capabilities) is about 200 bytes (206 from QEMU 7.2).
SPICE_LINK_REPLY_MAX = 512
#: SPICE channel types (spice-protocol's enums.h).
MAIN, DISPLAY, INPUTS, CURSOR = 1, 2, 3, 4


def row(tls_port: int | None, port: int = 5900, **extra: Any) -> ConnectInfo:
    values: dict[str, Any] = {
        "id": 1,
        "token_hash": "ab" * 32,
        "console_type": "spice-html5",
        "host": HOST,
        "port": port,
        "tls_port": tls_port,
        "internal_access_path": None,
        "instance_uuid": "9b2c4f0e-3d1a-4c5b-8e7f-0a1b2c3d4e5f",
        "access_url_base": None,
        "expires": 0,
    }
    return ConnectInfo(**{**values, **extra})


def spice_tls(pki: Pki | None, **options: Any) -> SpiceTLS:
    return SpiceTLS.from_settings(SpiceSettings(ca_certs=pki.ca_cert if pki else None, **options))


# --- host_subject --------------------------------------------------------------


class HostSubjectTests(SynchronousTestCase):
    """[spice] host_subject reads as libvirt's and remote-viewer's host-subject."""

    def test_parse(self) -> None:
        """Keys in any case, spaces around parts, values folded as OpenSSL compares them."""
        self.assertEqual(
            parse_subject(" c=XX, L=Some  City,O=Org,cn=Name "),
            parse_subject("C=xx,L=some city,O=org,CN=name"),
        )
        self.assertEqual(len(parse_subject("C=XX,L=city,O=org,CN=name")), 4)

    def test_escapes(self) -> None:
        """'\\,' is a comma inside a value and '\\\\' a backslash; other escapes are refused."""
        (only,) = parse_subject(r"O=Acme\, Inc\\eu")
        self.assertEqual(only[1], "acme, inc\\eu")
        for bad in (r"O=a\b", "O=a\\", "O=", "CN", "XX=1", "O=a,,CN=b"):
            self.assertRaises(ValueError, parse_subject, bad)

    def test_bad_option_is_one_line(self) -> None:
        """A host_subject that does not parse stops start-up with one line naming it."""
        error = self.assertRaises(TLSError, spice_tls, None, host_subject="CN=a,ZZ=b")
        self.assertTrue(str(error).startswith("[spice] host_subject: 'ZZ=b' is not KEY=value"))
        self.assertNotIn("\n", str(error))


# --- configuration and the registry ---------------------------------------------


class SettingsTests(SynchronousTestCase):
    """The [spice] options, and which connector a spice-html5 row gets."""

    def test_defaults(self) -> None:
        """No CA, no subject, require_secure false (nova's default)."""
        spice = Settings().spice
        self.assertEqual(
            (spice.ca_certs, spice.host_subject, spice.require_secure), (None,) * 2 + (False,)
        )

    def test_read_from_file(self) -> None:
        """The three options are read from [spice] in an INI file."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                "[spice]\nenabled = true\nrequire_secure = true\nca_certs = /etc/pki/spice-ca.pem\n"
                "host_subject = C=XX,O=org,CN=compute\\, one\n"
            )
        spice = load_settings([path]).spice
        self.assertTrue(spice.require_secure)
        self.assertEqual(spice.ca_certs, "/etc/pki/spice-ca.pem")
        self.assertEqual(spice.host_subject, "C=XX,O=org,CN=compute\\, one")

    def test_missing_ca_file_is_one_line(self) -> None:
        """A ca_certs file that cannot be read stops start-up with one line naming the option."""
        settings = dataclasses.replace(
            test_settings(), spice=SpiceSettings(enabled=True, ca_certs="/nonexistent/ca.pem")
        )
        error = self.assertRaises(TLSError, Backends.from_settings, settings)
        self.assertEqual(
            str(error),
            "[spice] ca_certs: cannot read TLS CA bundle /nonexistent/ca.pem: No such file or directory",
        )

    def test_no_spice_door_loads_nothing(self) -> None:
        """With the SPICE door off nothing of [spice] is loaded (a bad CA path is not even read)."""
        settings = dataclasses.replace(
            test_settings(), spice=SpiceSettings(enabled=False, ca_certs="/nonexistent/ca.pem")
        )
        self.assertIsNone(Backends.from_settings(settings).spice)

    def test_connector_per_row(self) -> None:
        """tls_port: the SPICE TLS connector; none: plain TCP (or CONNECT), as before."""
        backends = Backends(spice=spice_tls(None))
        chosen = backends.connector_for(row(tls_port=5901))
        self.assertIs(chosen.func, connect_spice)  # type: ignore[attr-defined]
        self.assertIs(backends.connector_for(row(tls_port=None)), plain_tcp)
        self.assertIs(
            backends.connector_for(row(tls_port=None, internal_access_path="/x")), xvp_connect
        )
        # Other console types never get it, whatever their row says.
        self.assertIs(backends.connector_for(row(5901, console_type="serial")), plain_tcp)

    def test_require_secure_takes_every_row(self) -> None:
        """With require_secure a row without tls_port goes to the SPICE connector, which refuses it."""
        backends = Backends(spice=spice_tls(None, require_secure=True))
        chosen = backends.connector_for(row(tls_port=None))
        failure = self.failureResultOf(chosen(reactor, row(tls_port=None), timeout=1), Refusal)
        self.assertEqual(failure.value.ending.kind, Kind.BACKEND_INSECURE)
        self.assertIn("[spice] require_secure", failure.value.ending.detail)


# --- the connector against Twisted TLS servers ------------------------------------


class Console(Protocol):
    """A stand-in SPICE server: echoes (or, silent, says nothing); records its connections."""

    def connectionMade(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.factory.connected.append(self)
        self.received = b""
        if self.factory.hang_up:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.factory.silent:
            self.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)


def serve(testcase: TestCase, pki: Pki | None, hang_up: bool = False, silent: bool = False) -> Any:
    """Listen on 127.0.0.1 port 0: TLS with pki's server certificate, or plain TCP if None."""
    factory = Factory.forProtocol(Console)
    factory.connected, factory.hang_up, factory.silent = [], hang_up, silent
    if pki is None:
        port = reactor.listenTCP(0, factory, interface=HOST)
    else:
        with open(os.path.join(pki.dir, "server-cert.pem"), "rb") as f:
            pem = f.read()
        with open(os.path.join(pki.dir, "server-key.pem"), "rb") as f:
            pem += f.read()
        options = PrivateCertificate.loadPEM(pem).options()
        port = reactor.listenSSL(0, factory, options, interface=HOST)
    factory.port = port.getHost().port

    def stop() -> defer.Deferred[Any]:
        for each in factory.connected:
            if not each.lost.called:
                each.transport.abortConnection()
        return defer.gatherResults(
            [defer.maybeDeferred(port.stopListening)] + [c.lost for c in factory.connected]
        )

    testcase.addCleanup(stop)
    return factory


class Relay:
    """What the relay gets from a BackendProtocol; ``got`` fires once ``want`` bytes came."""

    def __init__(self, want: int) -> None:
        self.received = b""
        self.want = want
        self.got: defer.Deferred[bytes] = defer.Deferred()

    def from_backend(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= self.want and not self.got.called:
            self.got.callback(self.received)

    def backend_lost(self, detail: str = "") -> None:
        pass


class ConnectorTests(TestCase):
    """connect_spice against a TLS server on a real socket: verified, or BACKEND_TLS."""

    timeout = 20

    def setUp(self) -> None:
        self.pki = make_pki(os.path.abspath(self.mktemp()))
        self.stranger = make_pki(os.path.abspath(self.mktemp()))  # another CA

    async def refused(self, spice: SpiceTLS, port: int, timeout: float = 5) -> Refusal:
        d = connect_spice(spice, reactor, row(tls_port=port, port=closed_port()), timeout=timeout)
        refusal: Refusal = await self.assertFailure(d, Refusal)
        return refusal

    async def test_verified_and_relayed_inside_tls(self) -> None:
        """A server our CA signed: ready, and bytes go to the TLS port and back inside the TLS."""
        server = serve(self, self.pki)
        info = row(tls_port=server.port, port=closed_port())  # the plain port would be refused
        backend = await connect_spice(spice_tls(self.pki), reactor, info, timeout=5)
        self.assertIsInstance(backend, BackendProtocol)
        subject = backend.transport.getPeerCertificate().to_cryptography().subject
        self.assertEqual(subject.rfc4514_string(), "CN=localhost,O=consoled tests")
        link = spice_link_message()
        relay = Relay(len(link))
        backend.attach(relay)
        backend.transport.write(link)
        self.assertEqual(await relay.got, link)
        (console,) = server.connected
        self.assertEqual(console.received, link)
        backend.transport.loseConnection()
        await console.lost

    async def test_host_subject_matches(self) -> None:
        """host_subject equal to the certificate's subject (case and spacing aside): ready."""
        server = serve(self, self.pki)
        spice = spice_tls(self.pki, host_subject="o=Consoled  Tests, cn=LOCALHOST")
        backend = await connect_spice(spice, reactor, row(tls_port=server.port), timeout=5)
        backend.transport.loseConnection()
        await server.connected[0].lost

    async def test_host_subject_mismatch(self) -> None:
        """Another subject: BACKEND_TLS naming both subjects; nothing reaches the server."""
        server = serve(self, self.pki)
        for expected in ("O=consoled tests,CN=compute-2", "CN=localhost,O=consoled tests"):
            spice = spice_tls(self.pki, host_subject=expected)
            refusal = await self.refused(spice, server.port)
            self.assertEqual(refusal.ending.kind, Kind.BACKEND_TLS)
            self.assertEqual(
                refusal.ending.detail,
                f"the SPICE server's certificate subject is {SERVER_SUBJECT!r},"
                f" not [spice] host_subject {expected!r}",
            )
        await defer.gatherResults([console.lost for console in server.connected])
        self.assertEqual([console.received for console in server.connected], [b"", b""])

    async def test_untrusted_certificate(self) -> None:
        """A server another CA signed: BACKEND_TLS, OpenSSL's reason and the CA option named."""
        server = serve(self, self.stranger)
        refusal = await self.refused(spice_tls(self.pki), server.port)
        self.assertEqual(refusal.ending.kind, Kind.BACKEND_TLS)
        # Both test CAs share one name: OpenSSL tries our CA's key on it first.
        self.assertTrue(
            refusal.ending.detail.endswith(
                f"certificate verify failed (SPICE server {HOST}:{server.port};"
                f" trusted: [spice] ca_certs {self.pki.ca_cert})"
            ),
            refusal.ending.detail,
        )
        self.assertEqual(ANSWERS[refusal.ending.kind].close, 4508)

    async def test_no_ca_uses_system_trust(self) -> None:
        """No [spice] ca_certs: the system trust store, which refuses a private CA, saying so."""
        server = serve(self, self.pki)
        refusal = await self.refused(spice_tls(None), server.port)
        self.assertEqual(refusal.ending.kind, Kind.BACKEND_TLS)
        self.assertIn("certificate verify failed", refusal.ending.detail)
        self.assertIn(
            "trusted: the system trust store ([spice] ca_certs is not set)", refusal.ending.detail
        )

    async def test_plain_server_at_tls_port(self) -> None:
        """A server that does not speak TLS at tls_port: BACKEND_TLS, never relayed in the clear."""
        server = serve(self, None)
        refusal = await self.refused(spice_tls(self.pki), server.port)
        self.assertEqual(refusal.ending.kind, Kind.BACKEND_TLS)
        self.assertIn(f"SPICE server {HOST}:{server.port}", refusal.ending.detail)

    async def test_server_hangs_up_in_handshake(self) -> None:
        """A server that closes at once: BACKEND_TLS, not a relayed empty session."""
        server = serve(self, self.pki, hang_up=True)
        refusal = await self.refused(spice_tls(self.pki), server.port)
        self.assertEqual(refusal.ending.kind, Kind.BACKEND_TLS)
        self.assertEqual(
            refusal.ending.detail,
            f"closed during the TLS handshake (SPICE server {HOST}:{server.port};"
            f" trusted: [spice] ca_certs {self.pki.ca_cert})",
        )

    async def test_silent_server_times_out(self) -> None:
        """A server that never answers the ClientHello: the connect timeout covers the TLS."""
        server = serve(self, None, silent=True)  # accepts, and never says a word
        refusal = await self.refused(spice_tls(self.pki), server.port, timeout=0.3)
        self.assertEqual(refusal.ending.kind, Kind.BACKEND_TIMEOUT)


# --- against QEMU ------------------------------------------------------------------


def start_qemu_spice_tls(testcase: TestCase, pki: Pki, *, screen: bool = False) -> Any:
    """QEMU whose SPICE server has a TLS port only (no plain port), with pki's certificate.

    ``screen``: a PC with standard VGA whose SeaBIOS draws text (SPICE then
    has a display channel), instead of a machine with no display at all.
    """

    def arguments(port: int) -> list[str]:
        spice = f"tls-port={port},addr={HOST},x509-dir={pki.dir},disable-ticketing=on"
        machine = ["-machine", "pc", "-m", "32", "-vga", "std"] if screen else ["-machine", "none"]
        return [*machine, "-nodefaults", "-display", "none", "-spice", spice]

    return start_qemu(testcase, arguments)


def tls_settings(pki: Pki, **spice: Any) -> Settings:
    base = test_settings()
    return dataclasses.replace(
        base, spice=dataclasses.replace(base.spice, ca_certs=pki.ca_cert, **spice)
    )


class QemuTests(TestCase):
    """Through consoled's spice door to QEMU's SPICE TLS port."""

    timeout = 60

    def setUp(self) -> None:
        self.pki = make_pki(os.path.abspath(self.mktemp()))

    @defer.inlineCallbacks
    def link(self, consoled: Consoled, token: str, channel: int = MAIN) -> Any:
        client = yield ws_connect(consoled.port("spice"), token)
        client.send(spice_link_message(channel_type=channel))
        reply = yield client._wait(
            lambda b: len(b) if spice_link_reply_complete(bytes(b)) else None, 10
        )
        client.sendClose(1000)
        yield client.closed
        return reply

    @defer.inlineCallbacks
    def test_link_reply_over_tls(self) -> Any:
        """A SpiceLinkMess through the spice door gets QEMU's REDQ reply from its TLS port."""
        consoled = Consoled(self, tls_settings(self.pki))
        spice = yield start_qemu_spice_tls(self, self.pki)
        # nova's row has both ports; QEMU has no plain port here, so only TLS can answer.
        issued = yield consoled.authorize(
            "spice-html5", spice.host, closed_port(), tls_port=spice.port
        )
        reply = yield self.link(consoled, issued.token)
        self.assertEqual(reply[:4], b"REDQ")
        self.assertEqual(struct.unpack("<I", reply[4:8])[0], 2)
        # SpiceLinkReply: error 0 (OK) first in the body.
        self.assertEqual(struct.unpack("<I", reply[16:20])[0], 0)
        yield consoled.wait_sessions_ended()
        (session,) = consoled.session_rows()
        self.assertEqual(session["end_reason"], "client closed the connection: close code 1000")

    @defer.inlineCallbacks
    def test_every_channel_to_the_tls_port(self) -> Any:
        """Main, display, inputs and cursor channels, one websocket each with one token, all
        at once: each is its own connection to the TLS port, each gets a link reply."""
        consoled = Consoled(self, tls_settings(self.pki))
        spice = yield start_qemu_spice_tls(self, self.pki, screen=True)
        issued = yield consoled.authorize(
            "spice-html5", spice.host, closed_port(), tls_port=spice.port
        )
        channels = (MAIN, DISPLAY, INPUTS, CURSOR)
        replies = yield defer.gatherResults(
            [self.link(consoled, issued.token, c) for c in channels]
        )
        self.assertEqual([reply[:4] for reply in replies], [b"REDQ"] * 4)
        yield consoled.wait_sessions_ended()
        self.assertEqual(len(consoled.session_rows()), 4)

    @defer.inlineCallbacks
    def test_wrong_ca_is_4508(self) -> Any:
        """consoled trusting another CA: the websocket closes 4508 'TLS with the console failed'."""
        other = make_pki(os.path.abspath(self.mktemp()))
        consoled = Consoled(self, tls_settings(other))
        spice = yield start_qemu_spice_tls(self, self.pki)
        issued = yield consoled.authorize(
            "spice-html5", spice.host, closed_port(), tls_port=spice.port
        )
        client = yield ws_connect(consoled.port("spice"), issued.token)
        code, reason = yield client.closed
        self.assertEqual(code, 4508)
        self.assertTrue(reason.startswith("TLS with the console failed: "), reason)
        self.assertIn("certificate verify failed", reason)
        yield consoled.wait_sessions_ended()
        (session,) = consoled.session_rows()
        # The row keeps 255 characters: the CA's path (under trial's temporary
        # directory, of any length) may be cut there.
        expected = f"trusted: [spice] ca_certs {other.ca_cert}"
        reason = session["end_reason"]
        self.assertIn("certificate verify failed", reason)
        self.assertTrue(
            expected.startswith(reason[reason.index("trusted: ") :].rstrip(")")), reason
        )

    @defer.inlineCallbacks
    def test_host_subject_mismatch_is_4508(self) -> Any:
        """QEMU's certificate verifies but its subject is not host_subject: 4508."""
        consoled = Consoled(self, tls_settings(self.pki, host_subject="O=consoled tests,CN=other"))
        spice = yield start_qemu_spice_tls(self, self.pki)
        issued = yield consoled.authorize(
            "spice-html5", spice.host, closed_port(), tls_port=spice.port
        )
        client = yield ws_connect(consoled.port("spice"), issued.token)
        code, reason = yield client.closed
        self.assertEqual(code, 4508)
        self.assertIn("certificate subject is 'O=consoled tests,CN=localhost'", reason)

    @defer.inlineCallbacks
    def test_require_secure_refuses_plain_row_4507(self) -> Any:
        """require_secure and a row without tls_port: 4507, no SPICE in the clear."""
        consoled = Consoled(self, tls_settings(self.pki, require_secure=True))
        issued = yield consoled.authorize("spice-html5", HOST, closed_port())
        client = yield ws_connect(consoled.port("spice"), issued.token)
        code, reason = yield client.closed
        self.assertEqual(code, 4507)
        self.assertIn("[spice] require_secure", reason)


class SpiceHtml5Tests(TestCase):
    """Debian's spice-html5 in headless Chromium, through consoled, from a TLS-only QEMU."""

    timeout = 90

    @defer.inlineCallbacks
    def test_spice_html5_draws_tls_qemu(self) -> Any:
        """spice_auto.html draws SeaBIOS's screen; its channels all went through the TLS port."""
        require_peer(self, "spice-html5", os.path.isdir(SPICE_HTML5_DIR), SPICE_HTML5_HINT)
        pki = make_pki(os.path.abspath(self.mktemp()))
        consoled = Consoled(self, tls_settings(pki))
        spice = yield start_qemu_spice_tls(self, pki, screen=True)
        base = f"http://{HOST}:{consoled.port('spice')}/spice_auto.html"
        issued = yield consoled.authorize(
            "spice-html5", spice.host, closed_port(), tls_port=spice.port, access_url_base=base
        )
        browser = yield launch_browser(self)
        stats = yield browser.call(
            lambda tab: wait_for_canvas(tab, "#spice-screen canvas"), url=issued.access_url
        )
        self.assertGreater(stats["nonblank"], 0)
        self.assertEqual((stats["width"], stats["height"]), (720, 400))  # VGA text mode
        rows = consoled.session_rows()
        # main, then display and inputs (and cursor) on their own websockets, all live.
        live = [row for row in rows if row["end_reason"] is None]
        self.assertGreaterEqual(len(live), 3, rows)
        # spice-html5 writes its RSA-encrypted ticket with toString(16)
        # (ticket.js rsa_encrypt), which drops a leading zero byte: about one
        # link in 256 sends a short ticket, QEMU hangs up before its link
        # result, and spice_auto.html connects again.  Such a row is the
        # console's refusal during the link, relayed as it came; any other end
        # is a failure.
        refused = [
            row
            for row in rows
            if row["end_reason"] is not None
            and row["end_reason"].startswith("console closed the connection")
            and row["bytes_to_client"] <= SPICE_LINK_REPLY_MAX
        ]
        self.assertEqual(len(live) + len(refused), len(rows), rows)
        yield browser.close()
        yield consoled.wait_sessions_ended()


class SpiceStartTests(TestCase):
    """A real ``twistd consoled`` whose [spice] TLS options cannot be used refuses to start."""

    timeout = 60
    config = test_startup.RefusedStartTests.config
    refused = test_startup.RefusedStartTests.refused
    assertOneLine = test_startup.RefusedStartTests.assertOneLine

    def spice(self, options: str) -> str:
        door = f"enabled = true\nhtml5proxy_host = {HOST}\nhtml5proxy_port = {free_port()}\n"
        return self.config(f"[spice]\n{door}{options}")

    @defer.inlineCallbacks
    def test_ca_certs_missing(self) -> Any:
        """A ca_certs file that does not exist: one line naming the option and the file."""
        absent = os.path.join(os.path.abspath(self.mktemp()), "ca.pem")
        twistd = yield self.refused(self.spice(f"ca_certs = {absent}\n"))
        self.assertOneLine(twistd, f"[spice] ca_certs: cannot read TLS CA bundle {absent}")

    @defer.inlineCallbacks
    def test_ca_certs_not_pem(self) -> Any:
        """A ca_certs file with no certificate in it (a key, say): one line naming it."""
        pki = make_pki(os.path.abspath(self.mktemp()))
        twistd = yield self.refused(self.spice(f"ca_certs = {pki.client_key}\n"))
        self.assertOneLine(
            twistd, f"[spice] ca_certs: no PEM certificate in TLS certificate file {pki.client_key}"
        )

    @defer.inlineCallbacks
    def test_host_subject_bad(self) -> Any:
        """A host_subject with an unknown key: one line naming the option and the part."""
        twistd = yield self.refused(self.spice("host_subject = CN=a,XX=b\n"))
        self.assertOneLine(twistd, "[spice] host_subject: 'XX=b' is not KEY=value")
