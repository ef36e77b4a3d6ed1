"""The raw serial door's escape: Ctrl-] then one byte, even across reads.

``Ctrl-] Ctrl-]`` sends one Ctrl-] to the console; Ctrl-] and a byte that is
not a command sends both; a command (``.``, ``q``, ``w``, ``?``) goes to the
door, after the console bytes before it.
"""

from __future__ import annotations

from collections.abc import Callable

ESCAPE = 0x1D  # Ctrl-]
COMMANDS = frozenset(b".qw?")
HELP = (
    "\r\n{proxy}: escape commands, typed after Ctrl-]:\r\n"
    "  . or q   disconnect\r\n"
    "  w        who uses this console\r\n"
    "  ?        this help\r\n"
    "  Ctrl-]   send one Ctrl-] to the console\r\n"
    "  anything else goes to the console, after its Ctrl-]\r\n"
)


class EscapeReader:
    """Splits a user's bytes into console bytes (``forward``) and commands
    (``command(byte)``, which answers False once the user has left)."""

    def __init__(self, forward: Callable[[bytes], None], command: Callable[[int], bool]) -> None:
        self._forward = forward
        self._command = command
        self._escaped = False  # the last read ended with Ctrl-]

    def feed(self, data: bytes) -> None:
        out = bytearray()
        at = 0
        if self._escaped:
            self._escaped, at = False, 1
            if not self._after_escape(data[0], out):
                return
        while (found := data.find(b"\x1d", at)) >= 0:
            out += data[at:found]
            if found + 1 == len(data):
                self._escaped = True
                break
            at = found + 2
            if not self._after_escape(data[found + 1], out):
                return
        else:
            out += data[at:]
        if out:
            self._forward(bytes(out))

    def _after_escape(self, byte: int, out: bytearray) -> bool:
        if byte not in COMMANDS:
            out += b"\x1d" if byte == ESCAPE else bytes([ESCAPE, byte])
            return True
        if out:
            self._forward(bytes(out))
            out.clear()
        return self._command(byte)
