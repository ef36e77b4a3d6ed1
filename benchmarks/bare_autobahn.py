"""A bare Autobahn websocket relay on Twisted: the set-up floor for consoled's doors.

    python bare_autobahn.py LISTEN_PORT BACKEND_PORT

It does what every consoled websocket session does that is not consoled's
own: Twisted accepts, Autobahn reads the upgrade, a TCP connection to the
console is made before the upgrade is answered, the console's bytes go back
as binary messages, and both ends close.  No token, no database, no session
row, no log line, no limits.  Its set-up rate is the most a consoled on
Autobahn and Twisted could reach on this machine, so the set-up table can
tell consoled's own cost per session from the framework's.
"""

from __future__ import annotations

import sys
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import protocol, reactor  # noqa: E402


class Console(protocol.Protocol):
    front: Front

    def dataReceived(self, data: bytes) -> None:
        self.front.sendMessage(data, isBinary=True)

    def connectionLost(self, reason: Any = None) -> None:
        if self.front.transport is not None:
            self.front.transport.loseConnection()


class Front(WebSocketServerProtocol):
    console: Console | None = None
    backend_port = 0

    def onConnect(self, request: Any) -> Any:
        creator = protocol.ClientCreator(reactor, Console)
        d = creator.connectTCP("127.0.0.1", self.backend_port)

        def connected(console: Console) -> str:
            self.console, console.front = console, self
            return "binary"

        return d.addCallback(connected)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if self.console is not None and self.console.transport is not None:
            self.console.transport.loseConnection()


def main() -> None:
    listen_port, backend_port = int(sys.argv[1]), int(sys.argv[2])
    Front.backend_port = backend_port
    factory = WebSocketServerFactory()
    factory.protocol = Front
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=5)
    reactor.listenTCP(listen_port, factory, interface="127.0.0.1", backlog=1024)
    reactor.run()


if __name__ == "__main__":
    main()
