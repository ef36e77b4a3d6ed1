"""The client half of an RFB 3.8 session, enough to prove a VNC console is there."""

from __future__ import annotations

import struct
from typing import Any


async def rfb_handshake(client: Any) -> tuple[int, int]:
    """RFB 3.8 with security None up to a FramebufferUpdate; returns the screen size."""
    assert await client.read(12) == b"RFB 003.008\n"
    client.send(b"RFB 003.008\n")
    (count,) = struct.unpack("!B", await client.read(1))
    types = await client.read(count)
    assert 1 in types, types
    client.send(b"\x01")
    assert await client.read(4) == b"\x00\x00\x00\x00"  # SecurityResult OK
    client.send(b"\x01")  # ClientInit: shared
    width, height = struct.unpack("!HH", await client.read(4))
    await client.read(16)  # pixel format
    (name_length,) = struct.unpack("!I", await client.read(4))
    await client.read(name_length)
    client.send(struct.pack("!BBHHHH", 3, 0, 0, 0, width, height))  # full update request
    message_type, _, rectangles = struct.unpack("!BBH", await client.read(4))
    assert message_type == 0 and rectangles >= 1, (message_type, rectangles)
    return width, height
