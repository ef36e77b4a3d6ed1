"""The gate: every door's one path from a token to a started session or a refusal.

::

    door ─► Gate.admit(door, token, facts) ─► Deferred[Pass], or a Refusal
              0. the client address is not banned for failed token checks
              1. the token: present, printable, not absurdly long; hashed once
              2. its row: one store look-up (a thread hop), which also writes
                 the session's row when steps 3-5 pass there; with no row and
                 [workarounds] enable_consoleauth, nova's legacy consoleauth
                 entry in memcached (consoled/consoleauth.py), logged as legacy
              3. the console type fits the door
              4. the Origin (browsers send one; other clients pass)
              5. live sessions of this token and of its instance under their caps
              6. a serial console: the writer's lease, else a spectator's seat
              all of it within ``timeout``, or STORE_UNAVAILABLE
    door ─► Pass.start(client) ─► the Endpoint that takes the client's bytes
              (a Relay to the backend connector the row chose, or a Spectator)

A door pulls the token out of its wire, says what it knows of the client
(:class:`Facts`), and renders the outcome with :data:`consoled.endings.ANSWERS`.
Nothing here knows which door it serves but by name.  A door whose client
leaves while admission is under way cancels the Deferred; what the gate took
meanwhile (a session row, a lease) is given back when it arrives, and no timer
is left behind.  Every refusal is logged here, once, with the first 8 hex of
the token's hash and never the token.  An invalid token counts against its
client address (:class:`consoled.limits.FailureThrottle`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from consoled.backends import Backends, Connector
from consoled.endings import Ending, Kind, Refusal
from consoled.limits import FailureThrottle
from consoled.metrics import Metrics
from consoled.policy import Network, check_console_type, check_origin, is_trusted
from consoled.sessions import LEASED_TYPES, Admission, Sessions
from consoled.sessions.relay import ClientSide
from consoled.store import Store
from consoled.store.breaker import brief_error, is_outage
from consoled.store.sessions import Opening
from consoled.tokens import ConnectInfo, hash_prefix, hash_token

log = Logger()

#: Longer than any token nova or consoled issues; longer input is not looked up.
MAX_TOKEN_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Facts:
    """What a door knows of its client besides the token (headers only from HTTP doors)."""

    peer: str
    origin: str | None = None
    host: str | None = None
    forwarded_for: str | None = None
    forwarded_proto: str | None = None


class LegacyLookup(Protocol):
    """Where a token with no row leads by nova's legacy consoleauth store."""

    def find_legacy(self, token: str) -> defer.Deferred[ConnectInfo | None]: ...


class Endpoint(Protocol):
    """Where a door sends its client's bytes once a session started: a writer's
    Relay or a Spectator (whose bytes are dropped); both end the same way."""

    def from_client(self, data: bytes) -> None: ...

    def client_lost(self, detail: str = "") -> None: ...


class _Closed:
    """The Endpoint of a session that ended as it started (a seat whose writer left)."""

    def from_client(self, data: bytes) -> None:
        pass

    def client_lost(self, detail: str = "") -> None:
        pass


def row_door(door: str) -> str:
    """The door as session rows and log lines name it."""
    return door if door in ("xvp", "serial-tcp") else f"websocket/{door}"


class Pass:
    """An admitted connection, not yet started: its row, lease or seat, and its backend."""

    def __init__(
        self,
        sessions: Sessions,
        door: str,
        info: ConnectInfo,
        client_address: str,
        connector: Connector,
        admission: Admission | None = None,
        seat: bool = False,
    ) -> None:
        self.info = info
        self.door = door
        self.client_address = client_address
        #: a serial writer's row and lease, taken at the gate
        self.admission = admission
        #: admitted read-only beside this proxy's writer of the same console
        self.seat = seat
        #: how the session reaches its console (the gate's Backends chose it)
        self.connector = connector
        self._sessions = sessions
        self._used = False

    def start(self, client: ClientSide) -> Endpoint:
        """Start the session for ``client``; the door hands it the client's bytes."""
        self._used = True
        label = row_door(self.door)
        if self.seat:
            spectator = self._sessions.watch(self.info, label, self.client_address, client)
            if spectator is None:  # the writer left between the gate and here
                client.close(Ending(Kind.PORT_BUSY, "the writer left; connect again"))
                return _Closed()
            return spectator
        return self._sessions.start(
            self.info, label, self.client_address, client, self.admission, self.connector
        )

    def release(self, reason: str) -> None:
        """Give back what was taken for a pass that will never start."""
        if not self._used:
            self._used = True
            if self.admission is not None:
                self._sessions.release(self.admission, reason)

    def who(self) -> str:
        """Who uses this console through this proxy (the serial escape ``w``)."""
        return self._sessions.who(self.info)


class Gate:
    """Admission for every door of one proxy."""

    def __init__(
        self,
        store: Store,
        sessions: Sessions,
        clock: IReactorTime,
        *,
        timeout: float,
        allowed_origins: Iterable[str] = (),
        trusted_proxies: Iterable[Network] = (),
        backends: Backends | None = None,
        throttle: FailureThrottle | None = None,
        max_sessions_per_token: int = 0,
        max_sessions_per_instance: int = 0,
        legacy: LegacyLookup | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._legacy = legacy
        self._backends = backends or Backends()
        self._throttle = throttle
        self._max_per_token = max_sessions_per_token
        self._max_per_instance = max_sessions_per_instance
        self._metrics = metrics
        self._sessions = sessions
        self._clock = clock
        self._timeout = timeout
        self._allowed_origins = tuple(allowed_origins)
        self._trusted_proxies = tuple(trusted_proxies)

    def client_address(self, facts: Facts) -> str:
        """The user's address: X-Forwarded-For's last hop, believed only from a trusted proxy."""
        if facts.forwarded_for and is_trusted(facts.peer, self._trusted_proxies):
            return facts.forwarded_for.split(",")[-1].strip() or facts.peer
        return facts.peer

    def admit(self, door: str, token: str | None, facts: Facts) -> defer.Deferred[Pass]:
        """A Pass for ``token`` at ``door``, or a :class:`Refusal` that says why not.

        Cancel the Deferred when the client leaves: it fails at once with
        CancelledError, and whatever arrives later is given back.
        """
        address = self.client_address(facts)
        timer: list[IDelayedCall] = []
        outcome: defer.Deferred[Pass] = defer.Deferred(lambda _: _stop(timer))
        try:
            self._not_banned(address)
            token_hash = _hashed(token)
        except Refusal as refusal:
            self._refused(door, address, refusal)
            outcome.errback(refusal)
            return outcome
        prefix = hash_prefix(token_hash)
        timer.append(
            self._clock.callLater(self._timeout, self._too_slow, outcome, door, address, prefix)
        )
        # One trip for the token's row and the session's: the checks of steps
        # 3-5 run on the database thread too, so a connection they refuse
        # gets no row; they run again here, where they answer.
        opening = Opening(
            row_door(door),
            address,
            self._sessions.proxy,
            lambda info: self._wanted(info, door, facts),
        )
        work = self._store.find_token(token_hash, opening)
        if self._metrics is not None:
            work.addBoth(self._looked_up, self._clock.seconds())
        if self._legacy is not None:
            work.addCallback(self._or_legacy, token, door, prefix)

        def checked(info: ConnectInfo | None, *facts_of: Any) -> Any:
            written = _written(info, opening)
            if outcome.called:
                # The client left during the look-up (or the deadline passed):
                # take no lease that its own reconnect would find held, and
                # end the row the look-up wrote.
                if written is not None:
                    self._sessions.release(written, "client gone before its session started")
                return None
            return self._checked(info, *facts_of, written)

        work.addCallbacks(checked, _store_failed, (door, facts, address, prefix), None, (prefix,))

        def settle(result: Pass | Failure) -> None:
            _stop(timer)
            if outcome.called:  # the client left, or the deadline passed
                if isinstance(result, Pass):
                    result.release("client gone before its session started")
                return None
            if isinstance(result, Pass):
                outcome.callback(result)
                return None
            if result.check(Refusal):
                refusal = result.value
                if refusal.ending.kind is Kind.INVALID_TOKEN and self._throttle is not None:
                    self._throttle.failed(address)
            else:
                log.failure("admission at the {door} door failed", result, door=door)
                refusal = Refusal(Kind.INTERNAL, hash_prefix=prefix)
            self._refused(door, address, refusal)
            outcome.errback(refusal)
            return None

        work.addBoth(settle)
        self._sessions.admitting(work)
        return outcome

    def _or_legacy(
        self, info: ConnectInfo | None, token: str, door: str, prefix: str
    ) -> ConnectInfo | None | defer.Deferred[ConnectInfo | None]:
        """Step 2 again, for a token with no row: the legacy consoleauth store."""
        if info is not None or self._legacy is None:
            return info

        def found(legacy: ConnectInfo | None) -> ConnectInfo | None:
            if legacy is not None:
                log.info(
                    "legacy consoleauth token {hash_prefix} for a {console_type} console "
                    "at the {door} door",
                    hash_prefix=prefix,
                    console_type=legacy.console_type,
                    door=door,
                    legacy=True,
                )
            return legacy

        return self._legacy.find_legacy(token).addCallback(found)

    def _checked(
        self,
        info: ConnectInfo | None,
        door: str,
        facts: Facts,
        address: str,
        prefix: str,
        written: Admission | None,
    ) -> Pass | defer.Deferred[Pass]:
        if info is None:
            raise Refusal(Kind.INVALID_TOKEN, hash_prefix=prefix)
        try:
            self._check(info, door, facts)
            connector = self._backends.connector_for(info)
        except BaseException as error:
            # Refused here though the look-up's run of the checks passed
            # (a session of the token started meanwhile): end its row.
            if written is not None:
                reason = str(error.ending) if isinstance(error, Refusal) else "internal error"
                self._sessions.release(written, reason)
            raise
        if info.console_type not in LEASED_TYPES:
            return Pass(self._sessions, door, info, address, connector, written)

        def seat(failure: Failure) -> Pass | Failure:
            # A held port: a seat beside its writer, where this proxy has one and allows it.
            busy = failure.check(Refusal) and failure.value.ending.kind is Kind.PORT_BUSY
            if busy and self._sessions.can_watch(info):
                return Pass(self._sessions, door, info, address, connector, seat=True)
            return failure

        leasing = self._sessions.admit(info, row_door(door), address)
        leasing.addCallbacks(
            lambda admission: Pass(self._sessions, door, info, address, connector, admission),
            seat,
        )
        return leasing

    def _wanted(self, info: ConnectInfo, door: str, facts: Facts) -> bool:
        """Whether the look-up writes the session's row (on a database thread).

        Not for a console of one writer (its row comes with its lease, after
        the look-up), nor for a connection steps 3-5 refuse: the reactor's
        run of the same checks answers it.  They read only the row, the
        facts, settings and this proxy's session counts.
        """
        if info.console_type in LEASED_TYPES:
            return False
        try:
            self._check(info, door, facts)
        except Exception:
            return False
        return True

    def _check(self, info: ConnectInfo, door: str, facts: Facts) -> None:
        """Steps 3-5: a Refusal, or nothing."""
        check_console_type(info, door)
        check_origin(
            info,
            origin=facts.origin,
            host_header=facts.host,
            forwarded_proto=facts.forwarded_proto,
            peer=facts.peer,
            allowed_origins=self._allowed_origins,
            trusted_proxies=self._trusted_proxies,
        )
        self._under_caps(info)

    def _refused(self, door: str, address: str, refusal: Refusal) -> None:
        log_refusal(door, address, refusal)
        if self._metrics is not None:
            self._metrics.refusals.labels(door, refusal.ending.kind.value).inc()

    def _looked_up(self, result: Any, since: float) -> Any:
        assert self._metrics is not None
        self._metrics.lookup.observe(self._clock.seconds() - since)
        if isinstance(result, Failure):
            self._metrics.store_errors.inc()
        return result

    def _not_banned(self, address: str) -> None:
        """Step 0: answered without touching the store."""
        until = None if self._throttle is None else self._throttle.banned_until(address)
        if until is not None:
            left = until - self._clock.seconds()
            raise Refusal(Kind.TOO_MANY_FAILURES, f"this address may try again in {left:.0f}s")

    def _under_caps(self, info: ConnectInfo) -> None:
        """Step 5: OSSN-0008's caps, on this proxy's live sessions."""
        per_token, per_instance = self._sessions.open_for(info)
        if self._max_per_token and per_token >= self._max_per_token:
            raise Refusal(
                Kind.TOO_MANY_SESSIONS,
                f"{per_token} live sessions of this token",
                hash_prefix=info.hash_prefix,
            )
        if self._max_per_instance and per_instance >= self._max_per_instance:
            raise Refusal(
                Kind.TOO_MANY_SESSIONS,
                f"{per_instance} live sessions of instance {info.instance_uuid}",
                hash_prefix=info.hash_prefix,
            )

    def _too_slow(
        self, outcome: defer.Deferred[Pass], door: str, address: str, prefix: str
    ) -> None:
        if outcome.called:
            return
        refusal = Refusal(
            Kind.STORE_UNAVAILABLE, f"no answer within {self._timeout:g}s", hash_prefix=prefix
        )
        self._refused(door, address, refusal)
        outcome.errback(refusal)


def _hashed(token: str | None) -> str:
    """The token's digest, computed once; a refusal for a missing or malformed one."""
    if not token:
        raise Refusal(Kind.NO_TOKEN)
    token_hash = hash_token(token)
    if len(token) > MAX_TOKEN_LENGTH or not token.isprintable():
        raise Refusal(Kind.INVALID_TOKEN, "malformed token", hash_prefix(token_hash))
    return token_hash


def _written(info: ConnectInfo | None, opening: Opening) -> Admission | None:
    """The session row the look-up wrote, as the admission it is."""
    if info is None or opening.session_id is None:
        return None
    return Admission(opening.session_id, info, holds_lease=False)


def _store_failed(failure: Failure, prefix: str) -> None:
    # The database is down: the store's breaker logged the outage (with its
    # one traceback); this connection's refusal line names the error.
    if not is_outage(failure):
        log.failure("the console store is unavailable", failure)
    raise Refusal(Kind.STORE_UNAVAILABLE, hash_prefix=prefix, cause=brief_error(failure.value))


def _stop(timer: list[IDelayedCall]) -> None:
    while timer:
        call = timer.pop()
        if call.active():
            call.cancel()


def log_refusal(door: str, client: str, refusal: Refusal, **fields: Any) -> None:
    """The one log line of a refused connection: reason and hash prefix, never the token."""
    log.info(
        "refused {door} connection from {client}: {reason} (token {hash_prefix})",
        door=door,
        client=client,
        reason=f"{refusal.ending} ({refusal.cause})" if refusal.cause else str(refusal.ending),
        hash_prefix=refusal.hash_prefix or "-",
        **fields,
    )
