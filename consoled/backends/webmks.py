"""WebMKS (VMware): a vSphere VM's console, through ESXi's authd or a secure websocket.

nova's VMware driver (``get_mks_console``) writes a ``webmks`` row whose
``host``/``port`` are the ticket's (authd, 902) and whose
``internal_access_path`` is JSON ``{"ticket": T, "cfgFile": F, "thumbprint": P}``,
P being the SHA-1 of authd's certificate in hex (colons and case are ignored;
64 hex digits pin a SHA-256 instead).  consoled speaks authd as
openstack-archive/nova-mksproxy does (``novaproxy/authd.py``)::

    authd    "220 <banner>\\r\\n"                     in the clear
    consoled TLS; authd's certificate must hash to P  (else 4508, nothing sent)
    consoled "USER T\\r\\n"            authd "331 …"   (else 4506: ticket refused)
    consoled "PASS T\\r\\n"            authd "230 …"   (else 4506: ticket refused)
    consoled "THUMBPRINT N\\r\\n"      authd "200 Q"   N: base64 of 12 random bytes
    consoled "CONNECT F mks\\r\\n"     authd "200 …"   (else 4506: cfgFile refused)
    consoled a new TLS session on the same TCP connection (the first one is
             abandoned, not shut down); its certificate must hash to Q
    consoled N (its 16 base64 characters, no line end)
    then the console's own stream, relayed both ways as it is.

Every answer line is read to at most :data:`MAX_LINE` bytes (a longer one is
refused) and the whole exchange must end within ``[consoled]
connect_timeout`` (else 4504).  Bytes authd sends after a line that precedes a
TLS start are dropped, as nova-mksproxy's ``recv(1024)`` drops them.

The exchange (:class:`AuthdExchange`) is transport-free;
:class:`~consoled.backends.tls_sessions.TlsSessions` runs its TLS sessions one after the other over the raw TCP connection (Twisted's
``startTLS`` runs one per connection), so the relay ends up writing through
the second session, with its flow control.

The direct form, ``{"ticket": T, "thumbprint": P, "direct": true}``, is a
secure websocket to ``wss://host:port/ticket/T`` (the ESXi host, 443) with
subprotocol ``binary`` and the certificate pinned to P before the ticket is
sent (:mod:`consoled.backends.webmks_direct`); it is relayed frame to frame.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from consoled.backends.tcp import BackendProtocol, connect_backend
from consoled.backends.tls_sessions import TlsSessions
from consoled.endings import Kind, Refusal
from consoled.redaction import redact
from consoled.tls import client_options
from consoled.tokens import ConnectInfo

log = Logger()

#: The longest answer line read from authd (nova-mksproxy reads 1024 bytes).
MAX_LINE = 1024
#: Random bytes behind the THUMBPRINT nonce.
NONCE_BYTES = 12

_HASHES = {40: hashlib.sha1, 64: hashlib.sha256}


def normal_thumbprint(text: str) -> str | None:
    """``AB:CD:…`` or ``abcd…`` as lower-case hex, or None if it is no SHA-1/SHA-256."""
    digits = text.replace(":", "").strip().lower()
    if len(digits) not in _HASHES or any(c not in "0123456789abcdef" for c in digits):
        return None
    return digits


def thumbprint_of(der: bytes, like: str) -> str:
    """The certificate's thumbprint with the hash that ``like`` (a pin) was made with."""
    return _HASHES[len(like)](der).hexdigest()


def peer_der(transport: Any) -> bytes:
    """The DER of a TLS transport's peer certificate (b'' when there is none)."""
    certificate = transport.getPeerCertificate()
    if certificate is None:
        return b""
    return certificate.to_cryptography().public_bytes(Encoding.DER)


def check_pin(der: bytes, pin: str, whose: str) -> None:
    """Refuse (4508, logged) a certificate whose thumbprint is not ``pin``."""
    got = thumbprint_of(der, pin) if der else "none"
    if got != pin:
        log.warn(
            "WebMKS: {whose} has thumbprint {got}; expected {pin}", whose=whose, got=got, pin=pin
        )
        raise Refusal(
            Kind.BACKEND_TLS, f"{whose} does not match the pinned thumbprint ({got}, not {pin})"
        )


def _clean(value: Any, name: str) -> str:
    """A string of the ticket that goes on a command line: no line end, no control character."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} missing")
    if any(c < " " or c == "\x7f" for c in value):
        raise ValueError(f"{name} holds characters a command line cannot carry")
    return value


@dataclass(frozen=True)
class MksTicket:
    """What a ``webmks`` row's internal_access_path holds."""

    ticket: str
    thumbprint: str
    cfg_file: str | None
    direct: bool = False

    @classmethod
    def from_row(cls, info: ConnectInfo) -> MksTicket:
        """The row's ticket, or a 4506 refusal saying what is wrong with it (never the ticket)."""
        try:
            data = json.loads(info.internal_access_path or "")
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            direct = data.get("direct", False) is True
            thumbprint = normal_thumbprint(str(data.get("thumbprint", "")))
            if thumbprint is None:
                raise ValueError("thumbprint is not SHA-1 (or SHA-256) hex")
            ticket = _clean(data.get("ticket"), "ticket")
            cfg_file = None if direct else _clean(data.get("cfgFile"), "cfgFile")
        except ValueError as e:  # json.JSONDecodeError is one
            raise Refusal(
                Kind.BACKEND_REFUSED,
                f"the webmks token's internal_access_path is not a WebMKS ticket: {e}",
                info.hash_prefix,
            ) from None
        return cls(ticket, thumbprint, cfg_file, direct)


#: What the steps of :class:`AuthdExchange` ask for next.
LINE = "line"  # an answer line, without its line end
TLS = "tls"  # a new TLS session up: its peer certificate (DER)

Steps = Generator[str, bytes, None]


class AuthdExchange:
    """consoled's side of the authd exchange, without a transport.

    :meth:`feed` takes authd's bytes (in the clear, then decrypted) and
    :meth:`tls_up` a new TLS session's peer certificate; both raise a
    Refusal when authd says no.  ``send`` writes a command; ``start_tls``
    starts a new TLS session on the connection.  :attr:`done` once the
    console's stream may be relayed.
    """

    def __init__(
        self,
        ticket: MksTicket,
        nonce: bytes,
        send: Callable[[bytes], None],
        start_tls: Callable[[], None],
    ) -> None:
        self._ticket = ticket
        self._nonce = base64.b64encode(nonce)
        self._send = send
        self._start_tls = start_tls
        self._buffer = b""
        self._steps = self._exchange()
        self._want: str | None = next(self._steps)
        #: what the exchange was doing, for a refusal when authd hangs up
        self.step = "banner"

    @property
    def done(self) -> bool:
        return self._want is None

    @property
    def in_tls_handshake(self) -> bool:
        return self._want == TLS

    def feed(self, data: bytes) -> None:
        if self._want != LINE:
            return  # bytes after the stream began, or before a TLS session is up: not ours
        self._buffer += data
        while self._want == LINE:
            end = self._buffer.find(b"\n", 0, MAX_LINE + 1)
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    raise Refusal(
                        Kind.BACKEND_REFUSED,
                        f"authd's answer to {self.step} is longer than {MAX_LINE} bytes",
                    )
                return
            line, self._buffer = self._buffer[:end].rstrip(b"\r"), self._buffer[end + 1 :]
            self._advance(line)
        if self._want == TLS:
            self._buffer = b""  # what followed the line belongs to no TLS session

    def tls_up(self, der: bytes) -> None:
        if self._want == TLS:
            self._advance(der)

    def _advance(self, value: bytes) -> None:
        try:
            self._want = self._steps.send(value)
        except StopIteration:
            self._want = None
        if self._want == TLS:
            self._start_tls()

    def _command(self, step: str, line: str) -> None:
        self.step = step
        self._send(line.encode("utf-8") + b"\r\n")

    def _exchange(self) -> Steps:
        ticket = self._ticket
        banner = yield LINE
        if _code(banner) != "220":
            raise Refusal(Kind.BACKEND_REFUSED, f"not an authd banner: {_quote(banner)}")
        self.step = "TLS"
        check_pin((yield TLS), ticket.thumbprint, "authd's certificate")
        self._command("USER", f"USER {ticket.ticket}")
        _expect((yield LINE), "331", "the ticket (USER)")
        self._command("PASS", f"PASS {ticket.ticket}")
        _expect((yield LINE), "230", "the ticket (PASS)")
        self._command("THUMBPRINT", f"THUMBPRINT {self._nonce.decode('ascii')}")
        answer = _expect((yield LINE), "200", "THUMBPRINT")
        second = normal_thumbprint(answer.split(" ", 1)[0])
        if second is None:
            raise Refusal(
                Kind.BACKEND_TLS, f"authd's THUMBPRINT answer has no thumbprint: {answer[:80]!r}"
            )
        self._command("CONNECT", f"CONNECT {ticket.cfg_file} mks")
        _expect((yield LINE), "200", "the VM's cfgFile (CONNECT)")
        self.step = "the second TLS session"
        check_pin((yield TLS), second, "the console's certificate (second TLS session)")
        self._send(self._nonce)


def _code(line: bytes) -> str:
    return line.split(b" ", 1)[0].decode("latin-1")


def _quote(line: bytes) -> str:
    return repr(redact(line[:80].decode("latin-1")))


def _expect(line: bytes, code: str, what: str) -> str:
    """The rest of an answer line whose code is ``code``; else authd refused ``what``."""
    if _code(line) != code:
        raise Refusal(Kind.BACKEND_REFUSED, f"authd refused {what}: it answered {_quote(line)}")
    return line[len(code) :].strip().decode("latin-1")


class AuthdHandshake:
    """The authd exchange as a backend's :class:`~consoled.backends.tcp.Handshake`."""

    def __init__(self, ticket: MksTicket, options: Any, nonce: bytes | None = None) -> None:
        self._ticket = ticket
        self._options = options
        self._nonce = nonce if nonce is not None else os.urandom(NONCE_BYTES)
        self.link: TlsSessions | None = None
        self._backend: Any = None
        self._exchange: AuthdExchange | None = None

    def start(self, backend: BackendProtocol) -> None:
        self._backend = backend
        self._exchange = AuthdExchange(
            self._ticket, self._nonce, self._write, lambda: self._start_tls()
        )

    def _write(self, data: bytes) -> None:
        self._backend.transport.write(data)

    def _start_tls(self) -> None:
        assert self.link is not None
        self.link.start_tls(self._options)

    def data_received(self, data: bytes) -> None:
        self._step(lambda exchange: exchange.feed(data))

    def tls_up(self) -> None:
        self._step(lambda exchange: exchange.tls_up(peer_der(self._backend.transport)))

    def _step(self, step: Callable[[AuthdExchange], None]) -> None:
        assert self._exchange is not None
        try:
            step(self._exchange)
        except Refusal as refusal:
            self._backend.handshake_failed(refusal)
            return
        if self._exchange.done:
            self._backend.handshake_done()

    def closed(self, reason: Failure) -> Refusal:
        step = self._exchange.step if self._exchange is not None else "banner"
        if self._exchange is not None and self._exchange.in_tls_handshake:
            return Refusal(Kind.BACKEND_TLS, f"authd closed the connection during {step}")
        return Refusal(Kind.BACKEND_REFUSED, f"authd closed the connection at {step}")


@functools.cache
def pinned_options() -> Any:
    """TLS towards authd and ESXi: no chain to verify (self-signed hosts), the pin decides."""
    return client_options(ca=None, option="[mks]")


def connect_authd(
    reactor: Any, info: ConnectInfo, ticket: MksTicket, *, timeout: float
) -> defer.Deferred[BackendProtocol]:
    """The authd connector: fires with a backend relaying the second TLS session."""
    handshake = AuthdHandshake(ticket, pinned_options())

    def wrap(backend: BackendProtocol) -> TlsSessions:
        handshake.link = TlsSessions(backend)
        return handshake.link

    return connect_backend(
        reactor, info.host, info.port, timeout=timeout, handshake=lambda: handshake, wrap=wrap
    )


def connect_webmks(reactor: Any, info: ConnectInfo, *, timeout: float) -> Any:
    """The ``webmks`` connector: authd, or the direct wss form when the ticket says so."""
    try:
        ticket = MksTicket.from_row(info)
    except Refusal as refusal:
        return defer.fail(refusal)
    if ticket.direct:
        # Imported here: the direct form uses this module's ticket and pins.
        from consoled.backends.webmks_direct import connect_direct

        return connect_direct(reactor, info, ticket, timeout=timeout)
    return connect_authd(reactor, info, ticket, timeout=timeout)
