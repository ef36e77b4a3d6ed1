"""The telnet layer of the raw serial door (RFC 854, 857, 858, 1143 in short)."""

from __future__ import annotations

import re
from collections.abc import Callable

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240  # RFC 854
ECHO, SGA = 1, 3  # RFC 857, 858
CR, LF, NUL = 13, 10, 0

#: What the door offers first: we echo (nothing, the token is a secret) and suppress go-ahead.
OFFER = bytes([IAC, WILL, ECHO, IAC, WILL, SGA])
_NVT_NEWLINE = re.compile(b"\r[\n\x00]")


class TelnetCodec:
    """The telnet layer of one connection: IAC parsing, option replies, NVT newlines.

    Not ``twisted.conch.telnet.TelnetTransport``: its parser raises on an
    unknown IAC command (dropping the data parsed before it), holds a trailing
    CR until the next byte (an Enter would wait for the next key), its
    ``write`` turns every ``\\n`` into ``\\r\\n``, and it has no raw mode for
    ``nc`` nor producer methods for the relay.  ``feed`` never raises; it
    returns the user's data, drops commands (BRK, IP, AYT, ...) and
    subnegotiations, and answers negotiation through ``reply``: we do ECHO
    and SGA, the client may do SGA, every other option is refused.
    """

    _OURS = frozenset({ECHO, SGA})
    _THEIRS = frozenset({SGA})

    def __init__(self, reply: Callable[[bytes], None]) -> None:
        self._reply = reply
        self._state = "data"
        self._verb = 0
        self._after_cr = False
        self.local: set[int] = set()  # options in effect on our side
        self.remote: set[int] = set()  # and on the client's
        self._offered = set(self._OURS)  # our WILLs not answered yet

    def feed(self, data: bytes) -> bytes:
        text = bytearray()
        at, end = 0, len(data)
        while at < end:
            state = self._state
            if state in ("data", "sub"):
                iac = data.find(b"\xff", at)
                if state == "data":
                    self._text(data[at : end if iac < 0 else iac], text)
                if iac < 0:
                    break
                self._state, at = ("iac" if state == "data" else "sub-iac"), iac + 1
                continue
            byte, at = data[at], at + 1
            if state == "iac":
                self._state = "data"
                if byte == IAC:
                    text.append(IAC)
                    self._after_cr = False
                elif byte in (WILL, WONT, DO, DONT):
                    self._verb, self._state = byte, "option"
                elif byte == SB:
                    self._state = "sub"
            elif state == "option":
                self._state = "data"
                self._negotiate(self._verb, byte)
            else:  # "sub-iac": IAC SE ends it; IAC IAC or anything else stays inside
                self._state = "data" if byte == SE else "sub"
        return bytes(text)

    def _text(self, chunk: bytes, text: bytearray) -> None:
        # NVT: CR LF is a newline, CR NUL a bare CR; to a serial console both
        # are the Enter key, one CR (a CR LF would be two Enters at a login).
        if not chunk:
            return
        if self._after_cr and chunk[0] in (LF, NUL):
            chunk = chunk[1:]
        text += _NVT_NEWLINE.sub(b"\r", chunk)
        self._after_cr = chunk.endswith(b"\r")

    def _negotiate(self, verb: int, option: int) -> None:
        # RFC 1143 in short: answer only a change of an option's state, so no loops.
        ours, wanted = verb in (DO, DONT), verb in (DO, WILL)
        options, allowed = (self.local, self._OURS) if ours else (self.remote, self._THEIRS)
        yes, no = (WILL, WONT) if ours else (DO, DONT)
        answered = ours and option in self._offered  # the client's answer to OFFER
        if ours:
            self._offered.discard(option)
        if wanted == (option in options):
            return
        if wanted and option not in allowed:
            self._reply(bytes([IAC, no, option]))
            return
        (options.add if wanted else options.discard)(option)
        if not answered:
            self._reply(bytes([IAC, yes if wanted else no, option]))
