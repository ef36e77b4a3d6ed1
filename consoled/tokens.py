"""Console tokens: generation, hashing and the access URLs users are given.

A token is a uuid4 string that only the user holds.  The database keeps
``sha256(token).hexdigest()`` in ``console_auth_tokens.token_hash``, exactly
as nova does (``nova.utils.get_sha256_str``), so a row nova wrote validates
here and a row written here validates in nova.  Logs and tools show only the
first eight hex characters of the digest (:func:`hash_prefix`).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode, urlparse, urlunparse

#: Console types nova issues, and the front door that serves each.
CONSOLE_TYPES: tuple[str, ...] = ("novnc", "spice-html5", "serial", "webmks", "xvpvnc")


def new_token() -> str:
    """A fresh token: a random uuid4 string, as nova's ``generate_uuid``."""
    return str(uuid.uuid4())


def hash_token(token: str) -> str:
    """The SHA-256 hex digest stored for ``token`` (nova's ``get_sha256_str``)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def hash_prefix(token_hash: str) -> str:
    """What may be logged of a token: the first 8 hex of its digest."""
    return token_hash[:8]


def access_url(console_type: str, base: str, token: str) -> str:
    """Build the URL a user opens, the way nova's ``ConsoleAuthToken.access_url`` does.

    noVNC (>= 1.1) takes the websocket path in its ``path`` parameter, so the
    token travels inside it: ``?path=%3Ftoken%3D…``.  When the base URL already
    has a ``path`` parameter the token is appended to it (nova's behaviour).
    When the base has another query, the parameter is merged into it with
    ``&``; nova writes a second ``?`` there, which noVNC cannot parse.
    Every other console type gets ``?token=…`` appended to the base as is.
    """
    if console_type != "novnc":
        return f"{base}?token={token}"
    parsed = urlparse(base)
    query = parse_qs(parsed.query, keep_blank_values=True)
    if "path" in query:
        params = {key: values[0] for key, values in query.items()}
        params["path"] = f"{params['path']}?token={token}"
        return urlunparse(parsed._replace(query=urlencode(params)))
    extra = urlencode({"path": f"?token={token}"})
    if parsed.query:
        return urlunparse(parsed._replace(query=f"{parsed.query}&{extra}"))
    return f"{base}?{extra}"


@dataclass(frozen=True, slots=True)
class ConnectInfo:
    """Where a validated token leads: one row of ``console_auth_tokens``.

    Never holds the token itself, only its digest.
    """

    id: int
    token_hash: str
    console_type: str
    host: str
    port: int
    tls_port: int | None
    internal_access_path: str | None
    instance_uuid: str
    access_url_base: str | None
    expires: int

    @property
    def hash_prefix(self) -> str:
        return hash_prefix(self.token_hash)


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """What :meth:`Store.authorize` hands back: the one place the token exists."""

    token: str
    connect_info: ConnectInfo

    @property
    def access_url(self) -> str:
        base = self.connect_info.access_url_base or ""
        return access_url(self.connect_info.console_type, base, self.token)

    def __repr__(self) -> str:
        # Keep the token out of tracebacks and debug output.
        return f"IssuedToken(token=<redacted>, connect_info={self.connect_info!r})"
