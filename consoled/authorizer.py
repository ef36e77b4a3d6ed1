"""Token to console: validate against the store and refuse with one log line."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from consoled.endings import Kind, Refusal
from consoled.store import Store
from consoled.tokens import ConnectInfo, hash_prefix, hash_token

log = Logger()

#: Longer than any token nova or consoled issues; longer input is not hashed.
MAX_TOKEN_LENGTH = 255


class Authorizer:
    def __init__(self, store: Store) -> None:
        self._store = store

    def validate(self, token: str | None) -> defer.Deferred[ConnectInfo]:
        """Where the token leads; fails with a :class:`Refusal` that says why not."""
        if not token:
            return defer.fail(Refusal(Kind.NO_TOKEN))
        prefix = hash_prefix(hash_token(token))
        if len(token) > MAX_TOKEN_LENGTH or not token.isprintable():
            return defer.fail(Refusal(Kind.INVALID_TOKEN, "malformed token", prefix))

        def found(info: ConnectInfo | None) -> ConnectInfo:
            if info is None:
                raise Refusal(Kind.INVALID_TOKEN, hash_prefix=prefix)
            return info

        def store_failed(failure: Failure) -> None:
            log.failure("the console store is unavailable", failure)
            raise Refusal(Kind.STORE_UNAVAILABLE, hash_prefix=prefix)

        return self._store.validate(token).addCallbacks(found, store_failed)


def log_refusal(door: str, client: str, refusal: Refusal, **fields: Any) -> None:
    """The one log line of a refused connection: reason and hash prefix, never the token."""
    log.info(
        "refused {door} connection from {client}: {reason} (token {hash_prefix})",
        door=door,
        client=client,
        reason=str(refusal.ending),
        hash_prefix=refusal.hash_prefix or "-",
        **fields,
    )
