"""Backend connectors: how a session reaches its console, chosen by what the token row says.

A connector is ``connector(reactor, info, timeout=…) -> Deferred[BackendProtocol]``:
it fires once the console is ready to relay, or fails with a Refusal whose
kind says why (unreachable, timed out, refused, insecure, TLS failed).  No
connector knows which door its user came through.

- ``plain_tcp``: TCP to ``host:port``;
- ``xvp_connect``: TCP, then ``CONNECT internal_access_path`` (XenServer style),
  when the row carries an ``internal_access_path``;
- ``rfb``: the RFB security proxy (``consoled.backends.rfb``) for ``novnc``
  and ``xvpvnc`` rows when ``[vnc] auth_schemes`` lists ``vencrypt``, over
  either of the above;
- ``spice``: SPICE over TLS (``consoled.backends.spice``) for ``spice-html5``
  rows with a ``tls_port``, and for every one when ``[spice] require_secure``;
- ``webmks``: VMware's authd exchange, or a pinned secure websocket to the
  ESXi host (``consoled.backends.webmks``), for ``webmks`` rows.

:class:`Backends` holds what the connectors need from the configuration
(TLS material loaded once, at start-up) and picks one per row.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Protocol

from twisted.internet import defer

from consoled.backends.rfb import RFB_CONSOLE_TYPES, RfbSecurity, connect_rfb
from consoled.backends.spice import SPICE_CONSOLE_TYPES, SpiceTLS, connect_spice
from consoled.backends.tcp import BackendProtocol, connect_backend
from consoled.backends.webmks import connect_webmks
from consoled.config import Settings
from consoled.tokens import ConnectInfo


class Connector(Protocol):
    def __call__(
        self, reactor: Any, info: ConnectInfo, *, timeout: float
    ) -> defer.Deferred[BackendProtocol]: ...


def plain_tcp(
    reactor: Any, info: ConnectInfo, *, timeout: float
) -> defer.Deferred[BackendProtocol]:
    return connect_backend(reactor, info.host, info.port, timeout=timeout)


def xvp_connect(
    reactor: Any, info: ConnectInfo, *, timeout: float
) -> defer.Deferred[BackendProtocol]:
    return connect_backend(
        reactor, info.host, info.port, timeout=timeout, connect_path=info.internal_access_path
    )


class Backends:
    """The connectors of one proxy, with what they need from its configuration."""

    def __init__(self, *, rfb: RfbSecurity | None = None, spice: SpiceTLS | None = None) -> None:
        #: the RFB security proxy, when [vnc] auth_schemes asks for one
        self.rfb = rfb
        #: SPICE over TLS, when the SPICE door is on (else spice rows stay plain TCP)
        self.spice = spice

    @classmethod
    def from_settings(cls, settings: Settings) -> Backends:
        """Loads the connectors' TLS material; TLSError (one line) if a file is bad."""
        spice = SpiceTLS.from_settings(settings.spice) if settings.spice_door_enabled else None
        return cls(rfb=RfbSecurity.from_settings(settings.vnc), spice=spice)

    def connector_for(self, info: ConnectInfo) -> Connector:
        """The connector a token row asks for."""
        if info.console_type == "webmks":
            return connect_webmks
        if self.rfb is not None and info.console_type in RFB_CONSOLE_TYPES:
            return partial(connect_rfb, self.rfb)
        if self.spice and info.console_type in SPICE_CONSOLE_TYPES and self.spice.wanted(info):
            return partial(connect_spice, self.spice)
        return xvp_connect if info.internal_access_path else plain_tcp
