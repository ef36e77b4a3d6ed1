"""Backend connectors: how a session reaches its console, chosen by what the token row says.

A connector is ``connector(reactor, info, timeout=…) -> Deferred[BackendProtocol]``:
it fires once the console is ready to relay, or fails with a Refusal whose
kind says why (unreachable, timed out, refused).  No connector knows which
door its user came through.

- ``plain_tcp``: TCP to ``host:port``;
- ``xvp_connect``: TCP, then ``CONNECT internal_access_path`` (XenServer style),
  when the row carries an ``internal_access_path``.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import defer

from consoled.backends.tcp import BackendProtocol, connect_backend
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


def connector_for(info: ConnectInfo) -> Connector:
    """The connector a token row asks for."""
    return xvp_connect if info.internal_access_path else plain_tcp
