"""RFC 6455 frames as the websocket door writes and reads them on its fast path.

A server's data frame is a header in front of the payload (no masking, no
extensions negotiated here); a client's binary frame is unmasked here when
the door takes it without Autobahn (see ``ConsoleServerProtocol.dataReceived``).
"""

from __future__ import annotations

import struct

from autobahn.websocket.xormasker import create_xor_masker

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
