"""Why a console session ends or is refused: one vocabulary for every door.

Each kind has one row in :data:`ANSWERS`: the HTTP status of a refused
websocket upgrade and of the XVP door's answer, and the websocket close code
after an upgrade; the raw serial door prints the kind's text.  The same
cause gives the same row on every door (docs/refusals.md has the table).
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
    TOO_MANY_FAILURES = "too many failed token checks"
    TOO_MANY_CONNECTIONS = "too many connections from this address"
    TOO_MANY_SESSIONS = "too many sessions"
    # Endings of a session that started.
    BACKEND_UNREACHABLE = "console unreachable"
    BACKEND_TIMEOUT = "console did not answer in time"
    BACKEND_REFUSED = "console refused the connection"
    BACKEND_INSECURE = "console offers no security type allowed"
    BACKEND_TLS = "TLS with the console failed"
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

    def __init__(
        self, kind: Kind, detail: str = "", hash_prefix: str | None = None, cause: str = ""
    ) -> None:
        super().__init__(str(Ending(kind, detail)))
        self.ending = Ending(kind, detail)
        self.hash_prefix = hash_prefix
        #: for the log line only, never the client (a database error names hosts)
        self.cause = cause


@dataclass(frozen=True, slots=True)
class Answer:
    """How doors put a kind on their wire."""

    #: the status of a refused websocket upgrade, and of the XVP door's answer
    http: int
    #: the websocket close code once upgraded (4000 + HTTP status where one fits)
    close: int


ANSWERS: dict[Kind, Answer] = {
    Kind.NO_TOKEN: Answer(401, 4401),
    Kind.INVALID_TOKEN: Answer(401, 4401),
    Kind.WRONG_CONSOLE_TYPE: Answer(403, 4403),
    Kind.ORIGIN_REFUSED: Answer(403, 4403),
    Kind.BAD_REQUEST: Answer(400, 4400),
    Kind.STORE_UNAVAILABLE: Answer(503, 4503),
    Kind.PORT_BUSY: Answer(409, 4409),
    Kind.TOO_MANY_FAILURES: Answer(429, 4429),
    Kind.TOO_MANY_CONNECTIONS: Answer(429, 4429),
    Kind.TOO_MANY_SESSIONS: Answer(429, 4429),
    Kind.BACKEND_UNREACHABLE: Answer(502, 4502),
    Kind.BACKEND_TIMEOUT: Answer(504, 4504),
    Kind.BACKEND_REFUSED: Answer(502, 4506),
    Kind.BACKEND_INSECURE: Answer(502, 4507),
    Kind.BACKEND_TLS: Answer(502, 4508),
    Kind.BACKEND_CLOSED: Answer(502, 1000),
    Kind.CLIENT_CLOSED: Answer(400, 1000),
    Kind.IDLE: Answer(408, 4408),
    Kind.TOKEN_EXPIRED: Answer(401, 4401),
    Kind.KICKED: Answer(409, 4409),
    # 1012 Service Restart (IANA registry): this proxy is restarting, connect again.
    Kind.SHUTDOWN: Answer(503, 1012),
    Kind.INTERNAL: Answer(500, 1011),
}
