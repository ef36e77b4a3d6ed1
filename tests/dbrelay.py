"""A TCP relay in front of a database server that a test can blackhole or make refuse.

There is no iptables/nft on the test machines, so the outage is made at the
socket level, in userspace, between consoled and PostgreSQL:

- ``blackhole()``: packets dropped.  Connections open stay open but nothing
  is forwarded either way (both sides stop being read); new connections are
  accepted and never answered.  consoled sees what a dropped route gives: a
  statement or a connect that never returns.
- ``refuse()``: the server is gone.  Open connections are reset and the port
  is closed, so a new connect is refused at once.
- ``restore()``: forwarding again; connections held during a blackhole go on
  where they stopped.

One difference from a real blackhole: the relay's kernel still acknowledges
what consoled sends, so ``tcp_user_timeout`` never fires; a statement in
flight hangs until ``restore()`` (a real one is cut after 5 s).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IListeningPort


class _ServerSide(protocol.Protocol):
    """The relay's connection to the database server."""

    def __init__(self, client: _ClientSide) -> None:
        self.client = client

    def connectionMade(self) -> None:
        self.client.server_ready(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        self.client.transport.loseConnection()


class _ClientSide(protocol.Protocol):
    """consoled's connection to the relay."""

    def __init__(self, relay: DatabaseRelay) -> None:
        self.relay = relay
        self.server: _ServerSide | None = None
        self.pending = b""

    def connectionMade(self) -> None:
        self.relay.connections.add(self)
        if self.relay.mode == "blackhole":
            self.transport.pauseProducing()
            return
        self.dial()

    def dial(self) -> None:
        host, port = self.relay.target
        factory = protocol.ClientFactory()
        factory.protocol = lambda: _ServerSide(self)  # type: ignore[assignment]
        reactor.connectTCP(host, port, factory)

    def server_ready(self, server: _ServerSide) -> None:
        self.server = server
        if self.pending:
            server.transport.write(self.pending)
            self.pending = b""
        if self.relay.mode == "blackhole":
            server.transport.pauseProducing()
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.server is None:
            self.pending += data
        else:
            self.server.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        self.relay.connections.discard(self)
        if self.server is not None:
            self.server.transport.loseConnection()


class DatabaseRelay(protocol.Factory):
    """Listens on 127.0.0.1 (``port`` once started) and relays to ``target``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode = "pass"
        self.connections: set[_ClientSide] = set()
        self.port = 0
        self._listening: IListeningPort | None = None

    def buildProtocol(self, addr: Any) -> _ClientSide:
        return _ClientSide(self)

    def start(self) -> None:
        self._listening = reactor.listenTCP(self.port, self, interface="127.0.0.1")
        self.port = self._listening.getHost().port

    def url(self, admin_url: str, database: str) -> str:
        """``admin_url`` (a SQLAlchemy URL) sent through the relay to ``database``."""
        import sqlalchemy as sa

        url = sa.make_url(admin_url).set(host="127.0.0.1", port=self.port, database=database)
        return url.render_as_string(hide_password=False)

    def blackhole(self) -> None:
        self.mode = "blackhole"
        for each in self.connections:
            each.transport.pauseProducing()
            if each.server is not None:
                each.server.transport.pauseProducing()

    @defer.inlineCallbacks
    def refuse(self) -> Any:
        self.mode = "refuse"
        for each in list(self.connections):
            each.transport.abortConnection()
            if each.server is not None:
                each.server.transport.abortConnection()
        if self._listening is not None:
            yield self._listening.stopListening()
            self._listening = None

    def restore(self) -> None:
        was, self.mode = self.mode, "pass"
        if self._listening is None:
            self.start()
        if was != "blackhole":
            return
        for each in list(self.connections):
            each.transport.resumeProducing()
            if each.server is not None:
                each.server.transport.resumeProducing()
            else:
                each.dial()

    def stop(self) -> Any:
        """At a test's end: as a refusal, every connection cut and the port closed."""
        return self.refuse()
