"""RFC 6455 frames as the websocket door writes and reads them on its fast path.

A server's data frame is a header in front of the payload (no masking, no
extensions negotiated here); a client's binary frame is unmasked here when
the door takes it without Autobahn (see ``ConsoleServerProtocol.dataReceived``).
"""

from __future__ import annotations

import struct
from typing import Any

from autobahn.websocket.xormasker import create_xor_masker
from twisted.logger import Logger

from consoled.endings import Ending, Kind
from consoled.sessions.relay import write_now

log = Logger()

#: A server frame's header for each payload size under 126 (a keystroke's
#: echo, a cursor update): a list index instead of building the two bytes.
_SMALL = [bytes((0x82, size)) for size in range(126)]
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")


def binary_header(size: int) -> bytes:
    """The header of one unmasked, final binary frame of ``size`` bytes."""
    if size < 126:
        return _SMALL[size]
    if size < 65536:
        return _HEADER_16.pack(0x82, 126, size)
    return _HEADER_64.pack(0x82, 127, size)


#: The largest websocket message accepted from a user.
MAX_MESSAGE = 4 * 1024 * 1024

#: header size -> the smallest payload length that encoding may carry (RFC 6455 5.2)
MIN_EXTENDED = {8: 126, 14: 65536}


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR a client frame's payload with its mask.

    Autobahn's native masker costs about 5 µs to set up; big integers take
    about 0.5 µs for a keystroke and fall behind it past about 1 KiB.
    """
    size = len(payload)
    if size > 1024:
        return create_xor_masker(mask, size).process(payload)
    key = (mask * ((size >> 2) + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        size, "little"
    )


class FastFrames:
    """The websocket door's data path beside Autobahn, both ways: a mixin for
    its protocol (an Autobahn WebSocketServerProtocol whose ``relay`` takes
    the user's bytes and whose ``close`` ends the session)."""

    # Autobahn's and the door's, as this path reads them.
    relay: Any
    state: int
    STATE_OPEN: int
    data: bytes
    inside_message: bool
    transport: Any
    autoPingTimeoutCall: Any
    autoPingRestartOnAnyTraffic: bool
    _cancelAutoPingTimeoutCall: Any
    close: Any

    def dataReceived(self, data: bytes) -> None:
        """Relay whole unfragmented binary frames here; Autobahn parses the rest.

        Autobahn walks every frame through a dozen callbacks (frame begin,
        data, end, message begin, data, end) before ``onMessage``: most of
        what a keystroke costs in consoled.  What browsers send a console is
        one masked binary frame per message, so between frames, with nothing
        buffered in Autobahn, those are unmasked and relayed here.  Anything
        else (control and text frames, fragments, a frame split across reads,
        reserved bits, an unmasked or oversized frame) and everything after it
        in this read goes to Autobahn, which answers as the RFC says.

        Autobahn's own ``dataReceived`` is never called: its Twisted adapter
        builds a debug line there on every read, on or off (the caller's
        qualified name, looked up and coloured), about a tenth of what a
        keystroke costs consoled.
        """
        if self.relay is None or self.state != self.STATE_OPEN or self.data or self.inside_message:
            super()._dataReceived(data)
            return
        taken = 0
        try:
            taken = self._take_frames(data)
        except Exception:
            log.failure("relaying a frame from the user failed")
            self.close(Ending(Kind.INTERNAL))
            return
        if taken < len(data):
            super()._dataReceived(data[taken:] if taken else data)

    def _take_frames(self, data: bytes) -> int:
        """Relay the complete binary frames at the start of ``data``; how far it got."""
        end = len(data)
        at = 0
        while self.state == self.STATE_OPEN and self.relay is not None:
            if end - at < 6 or data[at] != 0x82:  # FIN, binary, no reserved bits
                break
            size = data[at + 1] ^ 0x80  # the mask bit must be set
            start = at + 6
            if size >= 126:
                if size == 126:
                    start = at + 8
                    size = int.from_bytes(data[at + 2 : at + 4], "big")
                elif size == 127:
                    start = at + 14
                    size = int.from_bytes(data[at + 2 : at + 10], "big")
                else:  # unmasked: a protocol error Autobahn reports
                    break
                if not MIN_EXTENDED[start - at] <= size <= MAX_MESSAGE or start > end:
                    break  # over-long length encoding, or too big: Autobahn closes
            stop = start + size
            if stop > end:
                break
            payload = unmask(data[start:stop], data[start - 4 : start])
            at = stop
            self.relay.from_client(payload)
        if at and self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
            self._cancelAutoPingTimeoutCall()
        return at

    def send(self, data: bytes) -> None:
        """One unmasked binary frame per chunk, written without copying the payload.

        Autobahn's sendMessage costs more per message than the bytes cost to
        move; a server's data frame is just a header in front of the payload
        (no masking, no extensions negotiated here).
        """
        if self.state != self.STATE_OPEN:
            return
        write_now(self.transport, data, binary_header(len(data)))
