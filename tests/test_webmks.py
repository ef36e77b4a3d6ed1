"""WebMKS: the authd exchange without a transport, and through the WebMKS door end to end.

The end-to-end tests run a stand-in authd (tests/authd.py) over real sockets
with two self-signed certificates made here, and a websocket client at
consoled's WebMKS door; each refusal is read as the page reads it
(``explain``: the close code and reason).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoled.backends.webmks import MAX_LINE, AuthdExchange, MksTicket, normal_thumbprint
from consoled.endings import ANSWERS, Kind, Refusal
from consoled.tokens import ConnectInfo
from consoled.web_directories import missing_web_directories
from tests.authd import GREETING, serve_authd, serve_esxi
from tests.harness import Consoled, test_settings
from tests.hypervisors import Hypervisor, serve
from tests.wsclient import http_request, ws_connect

FIRST_DER = b"first certificate"
SECOND_DER = b"second certificate"
FIRST = hashlib.sha1(FIRST_DER).hexdigest()
SECOND = hashlib.sha1(SECOND_DER).hexdigest()
NONCE = bytes(range(12))
NONCE_B64 = base64.b64encode(NONCE)


def row(path: Any, console_type: str = "webmks") -> ConnectInfo:
    text = path if isinstance(path, str) else json.dumps(path)
    return ConnectInfo(
        id=1,
        token_hash="ab" * 32,
        console_type=console_type,
        host="192.0.2.9",
        port=902,
        tls_port=None,
        internal_access_path=text,
        instance_uuid="u",
        access_url_base="http://h:6090/",
        expires=0,
    )


TICKET = MksTicket("tkt-1", FIRST, "/vmfs/volumes/ds/vm 1/vm 1.vmx")


class Exchange:
    """An AuthdExchange with its commands and TLS starts recorded."""

    def __init__(self, ticket: MksTicket = TICKET) -> None:
        self.sent: list[bytes] = []
        self.tls_starts = 0
        self.exchange = AuthdExchange(ticket, NONCE, self.sent.append, self._start_tls)

    def _start_tls(self) -> None:
        self.tls_starts += 1


#: authd's side of a good exchange, after each of consoled's steps.
GOOD = [
    b"220 VMware Authentication Daemon Version 1.10: SSL Required\r\n",
    FIRST_DER,
    b"331 Password required for tkt-1.\r\n",
    b"230 User tkt-1 logged in.\r\n",
    ("200 " + ":".join(SECOND[i : i + 2].upper() for i in range(0, 40, 2)) + "\r\n").encode(),
    b"200 Connect /vmfs/volumes/ds/vm 1/vm 1.vmx mks\r\n",
    SECOND_DER,
]


def play(exchange: Exchange, answers: list[bytes], chunk: int | None = None) -> None:
    """Give authd's answers, lines fed ``chunk`` bytes at a time (None: whole)."""
    for answer in answers:
        if answer in (FIRST_DER, SECOND_DER) or answer.startswith(b"bad "):
            exchange.exchange.tls_up(answer)
            continue
        step = chunk or len(answer)
        for at in range(0, len(answer), step):
            exchange.exchange.feed(answer[at : at + step])


class ExchangeTests(SynchronousTestCase):
    def test_good_exchange(self) -> None:
        """The commands nova-mksproxy sends, two TLS starts, then the nonce, and done."""
        e = Exchange()
        play(e, GOOD)
        self.assertTrue(e.exchange.done)
        self.assertEqual(e.tls_starts, 2)
        self.assertEqual(
            e.sent,
            [
                b"USER tkt-1\r\n",
                b"PASS tkt-1\r\n",
                b"THUMBPRINT " + NONCE_B64 + b"\r\n",
                b"CONNECT /vmfs/volumes/ds/vm 1/vm 1.vmx mks\r\n",
                NONCE_B64,
            ],
        )

    def test_dripped_and_split(self) -> None:
        """Answers a byte at a time, or in 3-byte pieces, give the same exchange."""
        for chunk in (1, 3):
            e = Exchange()
            play(e, GOOD, chunk)
            self.assertTrue(e.exchange.done, chunk)
            self.assertEqual(e.sent[-1], NONCE_B64)

    def test_nothing_before_its_turn(self) -> None:
        """Nothing is sent before the first TLS session is up and pinned."""
        e = Exchange()
        play(e, GOOD[:1])
        self.assertEqual((e.sent, e.tls_starts), ([], 1))
        self.assertTrue(e.exchange.in_tls_handshake)

    def refusal(self, answers: list[bytes], chunk: int | None = None) -> Refusal:
        e = Exchange()
        with self.assertRaises(Refusal) as raised:
            play(e, answers, chunk)
        return raised.exception

    def test_bad_banner(self) -> None:
        """A first line that is not 220 is refused (4506) before any TLS."""
        refusal = self.refusal([b"SSH-2.0-OpenSSH_9.2\r\n"])
        self.assertEqual(refusal.ending.kind, Kind.BACKEND_REFUSED)
        self.assertIn("not an authd banner", refusal.ending.detail)

    def test_first_thumbprint_mismatch(self) -> None:
        """authd's certificate not hashing to the token's thumbprint: 4508, logged, no USER sent."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        e = Exchange()
        with self.assertRaises(Refusal) as raised:
            play(e, [GOOD[0], b"bad certificate"])
        self.assertEqual(raised.exception.ending.kind, Kind.BACKEND_TLS)
        self.assertIn(FIRST, raised.exception.ending.detail)
        self.assertEqual(e.sent, [])
        got = hashlib.sha1(b"bad certificate").hexdigest()
        logged = [ev for ev in events if ev.get("got") == got and ev.get("pin") == FIRST]
        self.assertEqual(len(logged), 1)

    def test_second_thumbprint_mismatch(self) -> None:
        """The second session's certificate not hashing to authd's answer: 4508, no nonce."""
        e = Exchange()
        with self.assertRaises(Refusal) as raised:
            play(e, GOOD[:-1] + [b"bad certificate"])
        self.assertEqual(raised.exception.ending.kind, Kind.BACKEND_TLS)
        self.assertNotIn(NONCE_B64, e.sent)

    def test_ticket_refused(self) -> None:
        """USER not answered 331, or PASS not 230: the ticket is refused (4506)."""
        for at, answer in ((2, b"530 No such ticket\r\n"), (3, b"530 Login incorrect\r\n")):
            refusal = self.refusal(GOOD[:at] + [answer])
            self.assertEqual(refusal.ending.kind, Kind.BACKEND_REFUSED)
            self.assertIn("the ticket", refusal.ending.detail)
            self.assertNotIn("tkt-1", refusal.ending.detail)

    def test_cfg_file_refused(self) -> None:
        """CONNECT not answered 200: the VM's cfgFile is refused (4506)."""
        refusal = self.refusal(GOOD[:5] + [b"500 VM not found\r\n"])
        self.assertEqual(refusal.ending.kind, Kind.BACKEND_REFUSED)
        self.assertIn("cfgFile", refusal.ending.detail)

    def test_thumbprint_answer_without_thumbprint(self) -> None:
        """A THUMBPRINT answer of 200 with no thumbprint cannot pin the second session."""
        refusal = self.refusal(GOOD[:4] + [b"200 OK\r\n"])
        self.assertEqual(refusal.ending.kind, Kind.BACKEND_TLS)

    def test_long_line(self) -> None:
        """A line longer than MAX_LINE without its end is refused, dripped or whole."""
        for chunk in (None, 100):
            refusal = self.refusal([b"220" + b"x" * (MAX_LINE + 1)], chunk)
            self.assertIn(str(MAX_LINE), refusal.ending.detail)

    def test_line_of_max_length(self) -> None:
        """A line of exactly MAX_LINE bytes before its end is read."""
        e = Exchange()
        play(e, [b"220 " + b"x" * (MAX_LINE - 4) + b"\n"])
        self.assertEqual(e.tls_starts, 1)

    def test_bytes_after_banner_dropped(self) -> None:
        """Bytes after the banner in the same read are not taken for an answer."""
        e = Exchange()
        play(e, [GOOD[0] + b"331 early\r\n", FIRST_DER, GOOD[2], GOOD[3]])
        self.assertEqual(e.sent[-1], b"THUMBPRINT " + NONCE_B64 + b"\r\n")


class TicketTests(SynchronousTestCase):
    def test_nova_shape(self) -> None:
        """nova's JSON (lower-case hex thumbprint) reads as an authd ticket."""
        ticket = MksTicket.from_row(
            row({"ticket": "t", "cfgFile": "/a b.vmx", "thumbprint": FIRST})
        )
        self.assertEqual(ticket, MksTicket("t", FIRST, "/a b.vmx", False))

    def test_colons_and_case(self) -> None:
        """vCenter's AA:BB:… form is accepted and normalised; SHA-256 pins too."""
        upper = ":".join(FIRST[i : i + 2] for i in range(0, 40, 2)).upper()
        self.assertEqual(normal_thumbprint(upper), FIRST)
        self.assertEqual(normal_thumbprint("ab" * 32), "ab" * 32)
        self.assertIsNone(normal_thumbprint("ab" * 19))
        self.assertIsNone(normal_thumbprint("zz" * 20))

    def test_direct_shape(self) -> None:
        """``direct: true`` needs no cfgFile."""
        ticket = MksTicket.from_row(row({"ticket": "t", "thumbprint": FIRST, "direct": True}))
        self.assertTrue(ticket.direct)

    def test_bad_rows(self) -> None:
        """Malformed rows are refused (4506) and the detail never quotes the ticket."""
        for path in (
            "not json",
            "[1]",
            {"ticket": "secret-t", "cfgFile": "/x"},
            {"ticket": "secret-t", "cfgFile": "/x", "thumbprint": "abc"},
            {"ticket": "secret\r\nt", "cfgFile": "/x", "thumbprint": FIRST},
            {"ticket": "secret\x00t", "cfgFile": "/x", "thumbprint": FIRST},
            {"ticket": "secret-t", "cfgFile": "/x\r\nQUIT", "thumbprint": FIRST},
            {"ticket": "secret-t", "thumbprint": FIRST},
        ):
            with self.assertRaises(Refusal) as raised:
                MksTicket.from_row(row(path))
            self.assertEqual(raised.exception.ending.kind, Kind.BACKEND_REFUSED, path)
            self.assertNotIn("secret", str(raised.exception))


def mks_settings(**consoled: Any) -> Any:
    base = test_settings(mks_host="127.0.0.1", mks_port=0, **consoled)
    return dataclasses.replace(base, mks=dataclasses.replace(base.mks, enabled=True))


class WebDirectoryTests(SynchronousTestCase):
    def test_mks_web_missing(self) -> None:
        """A named mks_web that does not exist stops start-up; unset, the shipped page serves."""
        settings = mks_settings(mks_web="/nonexistent/wmks")
        self.assertEqual(
            [each.option for each in missing_web_directories(settings)], ["[consoled] mks_web"]
        )
        self.assertEqual(missing_web_directories(mks_settings()), [])


class WebMksDoorTests(TestCase):
    """Through consoled's WebMKS door to the stand-in authd, over real sockets."""

    timeout = 30

    def setUp(self) -> None:
        self.consoled = Consoled(self, mks_settings(connect_timeout=3.0))

    @defer.inlineCallbacks
    def open(self, authd: Any, **ticket: Any) -> Any:
        path = {
            "ticket": authd.ticket,
            "cfgFile": authd.cfg_file,
            "thumbprint": authd.first.thumbprint,
            **ticket,
        }
        issued = yield self.consoled.authorize(
            "webmks", "127.0.0.1", authd.port, internal_access_path=json.dumps(path)
        )
        client = yield ws_connect(self.consoled.port("webmks"), issued.token, explain=True)
        return client

    @defer.inlineCallbacks
    def refused(self, authd: Any, kind: Kind, **ticket: Any) -> Any:
        client = yield self.open(authd, **ticket)
        code, reason = yield client.closed
        self.assertEqual((code, reason.split(":")[0]), (ANSWERS[kind].close, kind.value))
        self.assertEqual(bytes(client.buffer), b"")  # nothing of the console reached the user
        yield self.consoled.wait_sessions_ended()
        return reason

    @defer.inlineCallbacks
    def test_relays_both_ways(self) -> Any:
        """The console's greeting reaches the user and the user's bytes come back.

        The stand-in takes the nonce only over a second TLS session with its
        second certificate, started after a CONNECT answer over the first: the
        echo proves consoled wrote through the second session (and never shut
        the first down: its close alert would have broken the second).
        """
        authd = serve_authd(self)
        client = yield self.open(authd)
        self.assertEqual((yield client.read(len(GREETING))), GREETING)
        client.send(b"\x03keys\x00")
        self.assertEqual((yield client.read(6)), b"\x03keys\x00")
        server = yield authd.ready
        self.assertEqual(base64.b64decode(server.nonce_sent), base64.b64decode(server.nonce))
        self.assertEqual(len(base64.b64decode(server.nonce)), 12)
        self.assertEqual(
            server.lines[:2], [f"USER {authd.ticket}".encode(), f"PASS {authd.ticket}".encode()]
        )
        self.assertEqual(server.lines[3], f"CONNECT {authd.cfg_file} mks".encode())
        client.sendClose()
        yield client.closed
        yield self.consoled.wait_sessions_ended()

    @defer.inlineCallbacks
    def test_flow_control_through_second_session(self) -> Any:
        """A user who stops reading pauses authd's flood through the second TLS session."""
        authd = serve_authd(self, console="flood")
        client = yield self.open(authd)
        client.transport.pauseProducing()
        server = yield authd.ready
        yield server.paused
        self.assertLess(server.sent, 64 * 1024 * 1024)
        client.transport.resumeProducing()
        yield client.read(1024 * 1024)  # the console flows again once the user reads
        client.sendClose()
        yield client.closed
        yield self.consoled.wait_sessions_ended()

    def test_bad_banner(self) -> Any:
        """A peer whose first line is not 220 is refused (4506)."""
        return self.refused(serve_authd(self, banner=b"500 go away\r\n"), Kind.BACKEND_REFUSED)

    @defer.inlineCallbacks
    def test_wrong_first_thumbprint(self) -> Any:
        """A token pinning another certificate: 4508, and authd never sees the ticket."""
        authd = serve_authd(self)
        yield self.refused(authd, Kind.BACKEND_TLS, thumbprint="00" * 20)
        self.assertEqual(authd.connections[0].lines, [])

    @defer.inlineCallbacks
    def test_wrong_second_thumbprint(self) -> Any:
        """authd naming a thumbprint the second session's certificate lacks: 4508, no nonce."""
        authd = serve_authd(self, second_answer="11" * 20)
        yield self.refused(authd, Kind.BACKEND_TLS)
        self.assertIsNone(authd.connections[0].nonce)

    def test_ticket_refused(self) -> Any:
        """authd refusing the ticket (USER answered 530): 4506."""
        return self.refused(serve_authd(self), Kind.BACKEND_REFUSED, ticket="expired-ticket")

    @defer.inlineCallbacks
    def test_cfg_file_refused(self) -> Any:
        """authd refusing CONNECT for the VM's cfgFile: 4506."""
        reason = yield self.refused(
            serve_authd(self), Kind.BACKEND_REFUSED, cfgFile="/vmfs/volumes/gone.vmx"
        )
        self.assertIn("cfgFile", reason)

    @defer.inlineCallbacks
    def test_slow_peer(self) -> Any:
        """authd going silent after PASS: the exchange times out (4504) as a whole."""
        self.consoled = Consoled(self, mks_settings(connect_timeout=0.3))
        authd = serve_authd(self, silent_at="PASS")
        yield self.refused(authd, Kind.BACKEND_TIMEOUT)
        yield authd.connections[0].lost  # consoled closed the connection

    @defer.inlineCallbacks
    def test_endless_line(self) -> Any:
        """A banner that never ends is refused once it passes MAX_LINE bytes."""
        yield self.refused(serve_authd(self, banner=b"220 " + b"x" * 5000), Kind.BACKEND_REFUSED)

    @defer.inlineCallbacks
    def test_page(self) -> Any:
        """nova's default URL (``/?token=``) gets consoled's own WebMKS page, which asks to explain."""
        request = b"GET /?token=x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        status, _, body = yield http_request(self.consoled.port("webmks"), request)
        self.assertEqual(status, 200)
        self.assertIn(b'new WebSocket(url, ["binary"])', body)
        self.assertIn(b"explain=1", body)

    @defer.inlineCallbacks
    def test_other_types_refused_at_the_door(self) -> Any:
        """A novnc token at the WebMKS door is refused (4403) before any connection."""
        issued = yield self.consoled.authorize("novnc", "127.0.0.1", 1)
        client = yield ws_connect(self.consoled.port("webmks"), issued.token, explain=True)
        code, _ = yield client.closed
        self.assertEqual(code, ANSWERS[Kind.WRONG_CONSOLE_TYPE].close)


class DirectFormTests(TestCase):
    """The direct form: a pinned wss to a stand-in ESXi, through the WebMKS door."""

    timeout = 30

    def setUp(self) -> None:
        self.consoled = Consoled(self, mks_settings(connect_timeout=3.0))

    @defer.inlineCallbacks
    def open(self, esxi: Any, port: int | None = None, **ticket: Any) -> Any:
        path = {"ticket": esxi.ticket, "thumbprint": esxi.identity.thumbprint, "direct": True}
        path.update(ticket)
        issued = yield self.consoled.authorize(
            "webmks", "127.0.0.1", port or esxi.port, internal_access_path=json.dumps(path)
        )
        client = yield ws_connect(self.consoled.port("webmks"), issued.token, explain=True)
        return client

    @defer.inlineCallbacks
    def test_frame_to_frame(self) -> Any:
        """Each of the user's frames is one message to ESXi, and each of ESXi's one frame back."""
        esxi = serve_esxi(self)
        client = yield self.open(esxi)
        frames: list[bytes] = []
        original = client.onMessage
        client.onMessage = lambda payload, binary: (
            frames.append(payload),
            original(payload, binary),
        )
        client.send(b"ab")
        client.send(b"cd")
        self.assertEqual((yield client.read(len(GREETING) + 4)), GREETING + b"abcd")
        server = yield esxi.ready
        self.assertEqual(server.messages, [b"ab", b"cd"])
        self.assertEqual(frames, [GREETING[:4], GREETING[4:], b"ab", b"cd"])
        self.assertEqual(esxi.requests, [f"/ticket/{esxi.ticket}"])
        client.sendClose()
        yield client.closed
        yield self.consoled.wait_sessions_ended()

    @defer.inlineCallbacks
    def test_wrong_thumbprint(self) -> Any:
        """An ESXi certificate that is not the pinned one: 4508, and the ticket is never sent."""
        esxi = serve_esxi(self)
        client = yield self.open(esxi, thumbprint="ab" * 20)
        code, reason = yield client.closed
        self.assertEqual(code, ANSWERS[Kind.BACKEND_TLS].close)
        self.assertIn("ESXi's certificate does not match the pinned thumbprint", reason)
        self.assertEqual(esxi.requests, [])
        yield self.consoled.wait_sessions_ended()

    @defer.inlineCallbacks
    def test_ticket_refused(self) -> Any:
        """ESXi refusing the upgrade for an unknown ticket: 4506, the ticket not in the reason."""
        esxi = serve_esxi(self)
        client = yield self.open(esxi, ticket="stale-ticket")
        code, reason = yield client.closed
        self.assertEqual(code, ANSWERS[Kind.BACKEND_REFUSED].close)
        self.assertNotIn("stale-ticket", reason)
        self.assertEqual(esxi.requests, ["/ticket/stale-ticket"])
        yield self.consoled.wait_sessions_ended()

    @defer.inlineCallbacks
    def test_slow_peer(self) -> Any:
        """A peer that accepts TCP and never speaks TLS: 4504 within connect_timeout."""
        self.consoled = Consoled(self, mks_settings(connect_timeout=0.3))
        silent = serve(self, Hypervisor)
        esxi = serve_esxi(self)
        client = yield self.open(esxi, port=silent.port)
        code, _ = yield client.closed
        self.assertEqual(code, ANSWERS[Kind.BACKEND_TIMEOUT].close)
        yield self.consoled.wait_sessions_ended()
