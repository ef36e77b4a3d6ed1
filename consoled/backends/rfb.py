"""The RFB security proxy: consoled negotiates security with the VNC server itself.

Used for ``novnc`` and ``xvpvnc`` rows when ``[vnc] auth_schemes`` lists
``vencrypt``, as nova's RFB security proxy (``nova/console/securityproxy/rfb.py``)
does; with ``auth_schemes = none`` alone RFB is relayed untouched and the
viewer negotiates with the server.  The handshake, with the VNC server
(:class:`ServerSide`, a connector :class:`~consoled.backends.tcp.Handshake`)::

    server   "RFB 003.008\\n" (3.8 or later; older is refused)
    consoled "RFB 003.008\\n"
    server   n, then n security types; n = 0: a reason (u32 length, text)
    consoled the first of auth_schemes the server offers: VeNCrypt (19) or None (1);
             none in common: refused, never a downgrade
      VeNCrypt: server 0.2; consoled 0.2; server 0 (ok); server n, n u32 sub-types;
                consoled X509None (260); server 1 (accepted); then TLS on the
                socket: our client certificate ([vnc] vencrypt_client_cert/key),
                the server's verified against [vnc] vencrypt_ca_certs
    server   SecurityResult, u32 0 (over the TLS for VeNCrypt); else a reason

and then with the user (:class:`UserSide`, the backend's front), consoled
plays a VNC server that offers security type None::

    consoled "RFB 003.008\\n"      user "RFB 003.00x\\n" (3.3, 3.7 or 3.8)
    3.3      consoled u32 1 (None)
    3.7, 3.8 consoled 1, [1]; user 1; 3.8: consoled SecurityResult u32 0

after which the relay carries the user's ClientInit, the server's ServerInit
and the rest.  A reason the server gives is read to at most
:data:`MAX_REASON` bytes (nova bug 2155052: nova read any length it was told).
Both halves are transport-free step readers; their tests feed bytes split
and dripped.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.python.failure import Failure

from consoled.backends.tcp import BackendProtocol, connect_backend
from consoled.config import VncSettings
from consoled.endings import Kind, Refusal
from consoled.tls import TLSError, client_options
from consoled.tokens import ConnectInfo

log = Logger()

#: Console types whose console speaks RFB.
RFB_CONSOLE_TYPES = frozenset({"novnc", "xvpvnc"})

VERSION_3_8 = b"RFB 003.008\n"
NONE = 1
VENCRYPT = 19
X509_NONE = 260
SCHEMES = {"none": NONE, "vencrypt": VENCRYPT}
_NAMES = {0: "Invalid", 1: "None", 2: "VNC password", 16: "Tight", 19: "VeNCrypt"}

#: The most of a server's failure reason that is read (the rest is never waited for).
MAX_REASON = 256

_VERSION = re.compile(rb"RFB (\d{3})\.(\d{3})\n")

Steps = Generator[int, bytes, None]


def _names(types: Any) -> str:
    return ", ".join(f"{_NAMES.get(t, 'type')} ({t})" for t in types) or "none"


class StepReader:
    """Runs steps that yield how many bytes they need next and are sent them.

    :meth:`feed` returns None while the steps want more, and the bytes left
    over once they end.  A step may raise (a Refusal); the caller handles it.
    """

    def __init__(self, steps: Steps) -> None:
        self._steps = steps
        self._buffer = b""
        self._want: int | None = next(steps)

    def feed(self, data: bytes) -> bytes | None:
        self._buffer += data
        while self._want is not None and len(self._buffer) >= self._want:
            chunk, self._buffer = self._buffer[: self._want], self._buffer[self._want :]
            try:
                self._want = self._steps.send(chunk)
            except StopIteration:
                self._want = None
        if self._want is not None:
            return None
        rest, self._buffer = self._buffer, b""
        return rest


def _reason(kind: Kind, what: str) -> Generator[int, bytes, Refusal]:
    """Read an RFB failure reason (u32 length, text) to at most MAX_REASON bytes."""
    (length,) = struct.unpack("!I", (yield 4))
    text = (yield min(length, MAX_REASON)).decode("utf-8", "replace")
    if length > MAX_REASON:
        text += f"… ({length} bytes, {MAX_REASON} read)"
    return Refusal(kind, f"{what}: {text!r}")


@dataclass(frozen=True)
class RfbSecurity:
    """What the security proxy may use with VNC servers ([vnc] auth_schemes and certificates)."""

    #: security types in order of preference
    schemes: tuple[int, ...]
    #: VeNCrypt's TLS towards the server (client certificate, CA)
    tls: CertificateOptions | None

    @classmethod
    def from_settings(cls, vnc: VncSettings) -> RfbSecurity | None:
        """None when auth_schemes is ``none`` alone; TLSError (one line) for bad files."""
        if "vencrypt" not in vnc.auth_schemes:
            return None
        if not vnc.vencrypt_ca_certs:
            raise TLSError(
                "[vnc] auth_schemes lists vencrypt but [vnc] vencrypt_ca_certs is not set"
                " (the CA that signed the VNC servers' certificates)"
            )
        if bool(vnc.vencrypt_client_cert) != bool(vnc.vencrypt_client_key):
            raise TLSError("[vnc] vencrypt_client_cert and vencrypt_client_key go together")
        tls = client_options(
            ca=vnc.vencrypt_ca_certs,
            cert=vnc.vencrypt_client_cert,
            key=vnc.vencrypt_client_key,
            option="[vnc] vencrypt_*",
        )
        return cls(tuple(SCHEMES[name] for name in vnc.auth_schemes), tls)

    def choose(self, offered: bytes) -> int:
        for scheme in self.schemes:
            if scheme in offered:
                return scheme
        raise Refusal(
            Kind.BACKEND_INSECURE,
            f"the VNC server offers {_names(offered)}; [vnc] auth_schemes allows"
            f" {_names(self.schemes)}",
        )


class ServerSide:
    """consoled as the VNC server's client, up to its SecurityResult (a Handshake)."""

    def __init__(self, security: RfbSecurity) -> None:
        self._security = security
        self._backend: Any = None
        self._reader: StepReader | None = None
        self._tls = False

    def start(self, backend: BackendProtocol) -> None:
        self._backend = backend
        self._reader = StepReader(self._steps())

    def data_received(self, data: bytes) -> None:
        assert self._reader is not None
        try:
            rest = self._reader.feed(data)
        except Refusal as refusal:
            self._backend.handshake_failed(refusal)
            return
        if rest is not None:
            self._backend.handshake_done(rest, front=lambda relay: UserSide(self._backend, relay))

    def tls_up(self) -> None:
        pass  # the SecurityResult that follows, read over the TLS, says more

    def closed(self, reason: Failure) -> Refusal:
        if self._tls:
            # QEMU drops a client whose certificate its CA did not sign, no alert sent.
            return Refusal(
                Kind.BACKEND_TLS,
                "the VNC server closed the connection in TLS (does it trust"
                " [vnc] vencrypt_client_cert?)",
            )
        return Refusal(Kind.BACKEND_REFUSED, "the VNC server closed during the RFB handshake")

    def _send(self, data: bytes) -> None:
        self._backend.transport.write(data)

    def _steps(self) -> Steps:
        version = yield 12
        match = _VERSION.fullmatch(version)
        if match is None:
            raise Refusal(Kind.BACKEND_REFUSED, f"not an RFB server: it sent {version!r}")
        major, minor = int(match[1]), int(match[2])
        if (major, minor) < (3, 8):
            raise Refusal(
                Kind.BACKEND_REFUSED,
                f"the VNC server speaks RFB {major}.{minor}; the security proxy needs 3.8",
            )
        self._send(VERSION_3_8)
        count = (yield 1)[0]
        if count == 0:
            raise (yield from _reason(Kind.BACKEND_REFUSED, "the VNC server refused"))
        offered = yield count
        scheme = self._security.choose(offered)
        self._send(bytes((scheme,)))
        if scheme == VENCRYPT:
            yield from self._vencrypt()
        if (yield 4) != b"\0\0\0\0":
            raise (yield from _reason(Kind.BACKEND_REFUSED, "the VNC server's security failed"))

    def _vencrypt(self) -> Steps:
        version = yield 2
        if version != b"\x00\x02":
            raise Refusal(
                Kind.BACKEND_REFUSED,
                f"the VNC server speaks VeNCrypt {version[0]}.{version[1]}; consoled speaks 0.2",
            )
        self._send(b"\x00\x02")
        if (yield 1) != b"\x00":
            raise Refusal(Kind.BACKEND_REFUSED, "the VNC server refused VeNCrypt 0.2")
        count = (yield 1)[0]
        subtypes = struct.unpack(f"!{count}I", (yield 4 * count))
        if X509_NONE not in subtypes:
            raise Refusal(
                Kind.BACKEND_INSECURE,
                f"the VNC server's VeNCrypt sub-types are {list(subtypes)}; consoled needs"
                f" X509None ({X509_NONE})",
            )
        self._send(struct.pack("!I", X509_NONE))
        if (yield 1) == b"\x00":
            raise Refusal(Kind.BACKEND_REFUSED, "the VNC server did not accept X509None")
        self._tls = True
        self._backend.transport.startTLS(self._security.tls)


class UserSide:
    """The user's half: consoled plays a VNC server offering security type None.

    The front of a VeNCrypt backend: it takes the user's bytes until the
    user chose None, then hands the user to the relay and the relay the
    console's bytes.
    """

    def __init__(self, backend: BackendProtocol, relay: Any) -> None:
        self._backend = backend
        self._relay = relay
        self._reader = StepReader(self._steps())
        relay.client.send(VERSION_3_8)

    def from_client(self, data: bytes) -> None:
        try:
            rest = self._reader.feed(data)
        except Refusal as refusal:
            self._relay.end(refusal.ending)
            return
        if rest is None:
            return
        relay = self._relay
        relay.client.rebind(relay)
        self._backend.relay_to(relay)
        if rest:
            relay.from_client(rest)

    def client_lost(self, detail: str = "") -> None:
        self._relay.client_lost(detail)

    def _steps(self) -> Steps:
        version = yield 12
        match = _VERSION.fullmatch(version)
        if match is None or match[1] != b"003":
            raise Refusal(Kind.BAD_REQUEST, f"not an RFB 3.x viewer: it sent {version[:12]!r}")
        minor = int(match[2])
        if minor < 7:  # 3.3, and the 3.4/3.5/3.6 some viewers send (the RFB spec: treat as 3.3)
            self._relay.client.send(struct.pack("!I", NONE))
            return
        self._relay.client.send(bytes((1, NONE)))
        choice = (yield 1)[0]
        if choice != NONE:
            message = f"this proxy offers security type None ({NONE}) only".encode()
            if minor >= 8:
                self._relay.client.send(struct.pack("!II", 1, len(message)) + message)
            raise Refusal(Kind.BAD_REQUEST, f"the viewer chose security type {choice}, not None")
        if minor >= 8:
            self._relay.client.send(b"\0\0\0\0")


def connect_rfb(security: RfbSecurity, reactor: Any, info: ConnectInfo, *, timeout: float) -> Any:
    """The security proxy's connector (over XVP's CONNECT when the row has a path)."""
    handshake: Callable[[], ServerSide] = lambda: ServerSide(security)  # noqa: E731
    return connect_backend(
        reactor,
        info.host,
        info.port,
        timeout=timeout,
        connect_path=info.internal_access_path,
        handshake=handshake,
    )
