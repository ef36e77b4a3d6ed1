"""Writing to a TCP transport straight to the kernel: the relay's fast path.

It lives apart from the relay so that the TLS layer (`consoled.tls`) can hand
its records to the kernel the same way without importing the sessions.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["write_now"]

#: Transports whose socket write_now may use: plain TCP only.  Checked by
#: type, because a TLS wrapper forwards unknown attributes (``socket`` too) to
#: the TCP transport beneath it, and writing there would skip TLS; and by
#: ``TLS``, because ``startTLS`` (a backend's handshake) keeps the TCP type.
_PLAIN_TCP = (tcp.Server, tcp.Client)


def write_now(transport: Any, data: bytes | memoryview, header: bytes = b"") -> None:
    """Write ``header + data`` to a transport, straight to the kernel when it can.

    Twisted queues every write until the reactor's next pass.  When nothing
    is queued ahead on a plain TCP socket that is not closing, handing the
    bytes to the kernel now spares that pass (a hop of the one-byte round
    trip) and the join of Twisted's write buffer (a copy of every byte);
    ``sendmsg`` takes a frame header and its payload without joining them
    either.  What the kernel does not take is queued on the transport as
    usual, with its flow control.  (The test is inline, not a helper: this
    runs once per relayed chunk.)

    ``data`` may be a memoryview of a buffer its caller reuses (the TLS
    doors' ciphertext, `consoled.tls`): what is queued is copied out first.
    """
    if (
        type(transport) not in _PLAIN_TCP
        or transport.TLS  # startTLS keeps the TCP type and routes writes through TLS
        or transport._tempDataBuffer
        or len(transport.dataBuffer) != transport.offset
        or transport.disconnecting
        or not transport.connected
    ):
        if type(data) is not bytes:
            data = bytes(data)
        if header:
            transport.writeSequence((header, data))
        else:
            transport.write(data)
        return
    try:
        sent = transport.socket.sendmsg((header, data)) if header else transport.socket.send(data)
    except OSError:
        sent = 0  # EAGAIN, or an error the transport's own write reports
    if sent < len(header):
        transport.writeSequence((header[sent:], bytes(data)))
    elif sent < len(header) + len(data):
        transport.write(bytes(data[sent - len(header) :]))
