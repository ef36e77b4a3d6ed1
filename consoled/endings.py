"""Why a console session ends or is refused: one vocabulary for every door.

Each door maps these to its own wire form (an HTTP status before a websocket
upgrade, a websocket close code after it, a line on a terminal); the table of
wire forms is in docs/websocket.md and at the top of each door's module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.Enum):
    # Refusals, decided before a session starts.
    NO_TOKEN = "no token"
    INVALID_TOKEN = "invalid or expired token"
    WRONG_CONSOLE_TYPE = "token is for another console type"
    ORIGIN_REFUSED = "origin not allowed"
    BAD_REQUEST = "bad request"
    STORE_UNAVAILABLE = "token store unavailable"
    PORT_BUSY = "console port in use"
    # Endings of a session that started.
    BACKEND_UNREACHABLE = "console unreachable"
    BACKEND_TIMEOUT = "console did not answer in time"
    BACKEND_REFUSED = "console refused the connection"
    BACKEND_CLOSED = "console closed the connection"
    CLIENT_CLOSED = "client closed the connection"
    IDLE = "idle timeout"
    TOKEN_EXPIRED = "token expired"
    KICKED = "disconnected by an operator"
    SHUTDOWN = "proxy shutting down"
    INTERNAL = "internal error"


@dataclass(frozen=True, slots=True)
class Ending:
    """A kind and an operator-readable detail (never a token)."""

    kind: Kind
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}" if self.detail else self.kind.value


class Refusal(Exception):
    """A connection refused before its session started."""

    def __init__(self, kind: Kind, detail: str = "", hash_prefix: str | None = None) -> None:
        super().__init__(str(Ending(kind, detail)))
        self.ending = Ending(kind, detail)
        self.hash_prefix = hash_prefix
