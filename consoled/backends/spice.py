"""SPICE over TLS: a ``spice-html5`` token with a ``tls_port`` reaches the SPICE server's TLS port.

A SPICE server's TLS port speaks TLS from its first byte; there is no
in-band upgrade, and the SPICE link (the client's ``REDQ`` SpiceLinkMess,
the server's reply, the ticket) runs inside the TLS exactly as it does on
the plain port.  So the handshake, with the SPICE server (:class:`ServerTLS`,
a connector :class:`~consoled.backends.tcp.Handshake`), is TLS alone::

    consoled  TCP to host:tls_port; a TLS ClientHello at once (TLS 1.2 or later)
    server    its certificate chain, verified against [spice] ca_certs, or the
              system trust store when that is unset; no host name check
              (consoles are reached by address, as nova reaches them)
    consoled  the certificate's subject compared with [spice] host_subject,
              when set ('C=XX,L=city,O=org,CN=name', libvirt's and
              remote-viewer's host-subject); a mismatch is refused
    then      the relay: spice-html5's link message and all after it, inside the TLS

Which port a ``spice-html5`` row is connected to:

- with ``tls_port`` (nova writes it, beside ``port``, whenever libvirt gave
  the SPICE server a TLS port): TLS to ``tls_port``, always;
- without: plain TCP to ``port`` as before, unless ``[spice] require_secure``
  (nova's option: console traffic must be protected by TLS), which refuses
  it (4507) instead of connecting in the clear.

spice-html5 opens its main channel and then the display, inputs and cursor
channels, each a websocket of its own with the same token: each is one
connector call, and each goes to the TLS port.  Every failure of the TLS is
``Kind.BACKEND_TLS`` (4508) with OpenSSL's reason and what the certificate
was checked against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.internet import defer
from twisted.internet.ssl import CertificateOptions, TLSVersion, platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure

from consoled.backends.tcp import BackendProtocol, connect_backend
from consoled.config import SpiceSettings
from consoled.endings import Kind, Refusal
from consoled.tls import TLSError, client_options
from consoled.tokens import ConnectInfo

log = Logger()

#: Console types whose console speaks SPICE through this connector.
SPICE_CONSOLE_TYPES = frozenset({"spice-html5"})

#: Subject attributes a host_subject may name (OpenSSL's short names, any case).
_ATTRIBUTES: dict[str, x509.ObjectIdentifier] = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "STREET": NameOID.STREET_ADDRESS,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
    "DC": NameOID.DOMAIN_COMPONENT,
    "UID": NameOID.USER_ID,
    "EMAILADDRESS": NameOID.EMAIL_ADDRESS,
}
_SHORT_NAMES = {oid: name for name, oid in _ATTRIBUTES.items()} | {
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.SERIAL_NUMBER: "serialNumber",
}

#: A subject as compared: (attribute, value folded as OpenSSL's X509_NAME_cmp
#: folds it: case and runs of white space ignored), in the certificate's order.
Subject = tuple[tuple[x509.ObjectIdentifier, str], ...]


def _fold(value: str) -> str:
    return " ".join(value.split()).casefold()


def parse_subject(text: str) -> Subject:
    """'C=XX,L=city,O=org,CN=name' as compared; ``\\,`` and ``\\\\`` escape; ValueError if bad."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            if char not in ",\\":
                raise ValueError(f"'\\{char}': only '\\,' and '\\\\' are escapes")
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        raise ValueError("it ends in a lone '\\'")
    parts.append("".join(current))
    subject = []
    for part in parts:
        key, equals, value = part.partition("=")
        oid = _ATTRIBUTES.get(key.strip().upper())
        if not equals or oid is None or not value.strip():
            raise ValueError(
                f"{part.strip()!r} is not KEY=value with KEY one of {', '.join(_ATTRIBUTES)}"
            )
        subject.append((oid, _fold(value)))
    return tuple(subject)


def _attributes(name: x509.Name) -> list[x509.NameAttribute]:
    return [attribute for rdn in name.rdns for attribute in rdn]


def subject_of(certificate: x509.Certificate) -> Subject:
    return tuple((a.oid, _fold(str(a.value))) for a in _attributes(certificate.subject))


def show_subject(certificate: x509.Certificate) -> str:
    """The subject in host_subject's own form and order, to copy into the option."""
    shown = []
    for attribute in _attributes(certificate.subject):
        key = _SHORT_NAMES.get(attribute.oid, attribute.oid.dotted_string)
        value = str(attribute.value).replace("\\", "\\\\").replace(",", "\\,")
        shown.append(f"{key}={value}")
    return ",".join(shown)


@dataclass(frozen=True)
class SpiceTLS:
    """What the connector needs from [spice]: TLS towards SPICE servers, and require_secure."""

    #: verifies the server's chain ([spice] ca_certs, or the system trust store)
    tls: CertificateOptions
    #: what the chain is verified against, for refusals
    trust: str
    #: the expected certificate subject ([spice] host_subject), if any
    host_subject: Subject | None = None
    #: the option's own text, for refusals
    host_subject_text: str | None = None
    #: [spice] require_secure: a row without tls_port is refused
    require_secure: bool = False

    @classmethod
    def from_settings(cls, spice: SpiceSettings) -> SpiceTLS:
        """Loads the CA bundle once, at start-up; TLSError (one line) if it or host_subject is bad."""
        if spice.ca_certs:
            tls = client_options(ca=spice.ca_certs, option="[spice] ca_certs")
            trust = f"[spice] ca_certs {spice.ca_certs}"
        else:
            tls = CertificateOptions(trustRoot=platformTrust(), raiseMinimumTo=TLSVersion.TLSv1_2)
            trust = "the system trust store ([spice] ca_certs is not set)"
            log.info(
                "[spice] ca_certs is not set: SPICE servers' TLS certificates are verified"
                " against the system trust store"
            )
        subject = None
        if spice.host_subject:
            try:
                subject = parse_subject(spice.host_subject)
            except ValueError as e:
                raise TLSError(f"[spice] host_subject: {e}") from None
        return cls(tls, trust, subject, spice.host_subject, spice.require_secure)

    def wanted(self, info: ConnectInfo) -> bool:
        """Whether this connector serves the row: it has a TLS port, or TLS is required."""
        return info.tls_port is not None or self.require_secure


class ServerTLS:
    """consoled as the SPICE server's TLS client, up to a verified session (a Handshake)."""

    def __init__(self, spice: SpiceTLS) -> None:
        self._spice = spice
        self._backend: Any = None
        self._early = b""

    def start(self, backend: BackendProtocol) -> None:
        self._backend = backend
        backend.transport.startTLS(self._spice.tls)

    def data_received(self, data: bytes) -> None:
        # A SPICE server waits for the client's link message; hold anything anyway.
        self._early += data

    def tls_up(self) -> None:
        """The chain verified (OpenSSL refused the handshake otherwise); the subject next."""
        expected = self._spice.host_subject
        if expected is not None:
            certificate = self._backend.transport.getPeerCertificate().to_cryptography()
            if subject_of(certificate) != expected:
                self._backend.handshake_failed(
                    Refusal(
                        Kind.BACKEND_TLS,
                        f"the SPICE server's certificate subject is"
                        f" {show_subject(certificate)!r}, not [spice] host_subject"
                        f" {self._spice.host_subject_text!r}",
                    )
                )
                return
        self._backend.handshake_done(self._early)

    def closed(self, reason: Failure) -> Refusal:
        # The server sent no alert, so no reason: say when; explain() adds which server.
        return Refusal(Kind.BACKEND_TLS, "closed during the TLS handshake")


def connect_spice(spice: SpiceTLS, reactor: Any, info: ConnectInfo, *, timeout: float) -> Any:
    """TLS to the row's tls_port; without one, refused ([spice] require_secure)."""
    if info.tls_port is None:
        return defer.fail(
            Refusal(
                Kind.BACKEND_INSECURE,
                "the token has no tls_port and [spice] require_secure is true:"
                " no SPICE connection in the clear",
            )
        )
    where = f"{info.host}:{info.tls_port}"

    def explain(failure: Failure) -> Failure:
        # OpenSSL's own words ('certificate verify failed') say what, not against what.
        refusal = failure.value
        if (
            isinstance(refusal, Refusal)
            and refusal.ending.kind is Kind.BACKEND_TLS
            and "[spice]" not in refusal.ending.detail
        ):
            detail = f"{refusal.ending.detail} (SPICE server {where}; trusted: {spice.trust})"
            raise Refusal(Kind.BACKEND_TLS, detail)
        return failure

    handshake: Callable[[], ServerTLS] = lambda: ServerTLS(spice)  # noqa: E731
    connecting = connect_backend(
        reactor,
        info.host,
        info.tls_port,
        timeout=timeout,
        connect_path=info.internal_access_path,
        handshake=handshake,
    )
    return connecting.addErrback(explain)
