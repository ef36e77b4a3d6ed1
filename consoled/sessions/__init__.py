"""Live sessions: the one path every door takes after the token is accepted.

``Sessions.start`` takes the session's row the gate wrote with its token's
look-up (``Admission``), connects to the hypervisor, then relays; whatever
ends the relay ends the row (reason, duration, bytes each way; under load
several ends in one write, ``Ends``) and logs one line.  The service touches
live rows on a timer and, on shut-down, ends every session and waits for the
rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from consoled.backends import Connector, plain_tcp
from consoled.backends.tcp import BackendProtocol
from consoled.endings import Ending, Kind, Refusal
from consoled.sessions.recording import Recorder, Recording
from consoled.sessions.relay import ClientSide, Relay
from consoled.sessions.spectators import Seats, readable_utc
from consoled.store import Store
from consoled.store.breaker import brief_error, is_outage
from consoled.store.runner import observe
from consoled.tokens import ConnectInfo

log = Logger()


class Session:
    """One user's console session, from acceptance to its row's end."""

    __slots__ = (
        "holds_lease",
        "recording",
        "id",
        "info",
        "door",
        "client_address",
        "started",
        "relay",
        "connecting",
        "finished",
        "connector",
    )

    def __init__(
        self,
        info: ConnectInfo,
        door: str,
        client_address: str,
        started: float,
        connector: Connector = plain_tcp,
    ) -> None:
        #: how this session reaches its console (chosen at the gate from the token row)
        self.connector = connector
        self.id: int | None = None
        self.info = info
        self.door = door
        self.client_address = client_address
        self.started = started
        self.relay: Relay | None = None
        #: a serial session's one-writer lease, released with its row
        self.holds_lease = False
        #: the console's capped log, for recorded (serial) sessions
        self.recording: Recording | None = None
        #: the hypervisor connection being made, cancelled if the session ends first
        self.connecting: defer.Deferred[Any] | None = None
        #: fires when the row has been ended (or ending it failed and was logged)
        self.finished: defer.Deferred[None] = defer.Deferred()


#: Console types with one writer at a time (a serial chardev serves one client).
LEASED_TYPES = frozenset({"serial"})


@dataclass(frozen=True)
class Admission:
    """A session decided before its door answers: its row, and its lease if leased."""

    session_id: int
    info: ConnectInfo
    holds_lease: bool


#: How long an admission waits for this proxy's own session holding the port to end.
LOCAL_HOLDER_GRACE = 1.0


def _within(d: defer.Deferred[Any], seconds: float, clock: IReactorTime) -> defer.Deferred[None]:
    """Fires when ``d`` does or after ``seconds``, whichever is first; ``d`` is left as it is."""
    waiter: defer.Deferred[None] = defer.Deferred()

    def fire(result: Any = None) -> Any:
        if not waiter.called:
            if timer.active():
                timer.cancel()
            waiter.callback(None)
        return result

    timer = clock.callLater(seconds, fire)
    d.addBoth(fire)
    return waiter


#: At most this many session ends in one unit of database work (well inside
#: the store breaker's 0.8 s for a unit, on any backend).
MAX_ENDS_AT_ONCE = 100


class Ends:
    """Session rows' ends, written together while an earlier batch is being written.

    The first end is written at once; ends that come while it is on a
    database thread wait and go together in one unit (one transaction, one
    hand-off to the thread), at most `MAX_ENDS_AT_ONCE`.  Under a reconnect
    storm, or a shut-down's 10,000 ends, that is one hand-off for many ends;
    alone, an end is written as before.  Each ``end`` fires when its row's
    batch was written (or kept by the breaker), or fails with its error.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._waiting: list[tuple[dict[str, Any], defer.Deferred[None]]] = []
        self._writing = False

    def end(
        self, session_id: int, *, reason: str, bytes_to_client: int, bytes_to_server: int
    ) -> defer.Deferred[None]:
        ended: defer.Deferred[None] = defer.Deferred()
        ending = self._store.ending(
            session_id,
            reason=reason,
            bytes_to_client=bytes_to_client,
            bytes_to_server=bytes_to_server,
        )
        self._waiting.append((ending, ended))
        if not self._writing:
            self._write()
        return ended

    def _write(self) -> None:
        batch = self._waiting[:MAX_ENDS_AT_ONCE]
        del self._waiting[:MAX_ENDS_AT_ONCE]
        self._writing = True

        def written(result: Any) -> None:
            self._writing = False
            for _, ended in batch:
                if isinstance(result, Failure):
                    ended.errback(result)
                else:
                    ended.callback(None)
            if self._waiting and not self._writing:
                self._write()

        self._store.end_sessions([ending for ending, _ in batch]).addBoth(written)


class Sessions(Seats, Service):
    name = "sessions"

    def __init__(
        self,
        store: Store,
        reactor: Any,
        proxy: str,
        *,
        connect_timeout: float = 10,
        idle_timeout: float = 0,
        enforce_session_timeout: bool = False,
        lease_seconds: float = 30,
        recorder: Recorder | None = None,
        spectators: bool = False,
        clock: IReactorTime | None = None,
    ) -> None:
        self.spectators = spectators
        #: this proxy's serial writers, by console host:port (spectators join them)
        self._writers: dict[tuple[str, int], Session] = {}
        #: spectators' rows not yet ended
        self._watching: set[defer.Deferred[Any]] = set()
        self._recorder = recorder
        self._lease_seconds = lease_seconds
        self._store = store
        self._reactor = reactor
        self._clock = clock or reactor
        self.proxy = proxy
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._enforce_session_timeout = enforce_session_timeout
        self.live: set[Session] = set()
        #: live sessions per token digest and per instance (the gate's session limits)
        self._per_token: Counter[str] = Counter()
        self._per_instance: Counter[str] = Counter()
        #: ended sessions whose rows are still being written
        self._closing: set[Session] = set()
        #: admissions given back (their user left before the session started),
        #: by session id, with their console port, while the lease's release is in flight
        self._giving_back: dict[int, tuple[tuple[str, int], defer.Deferred[None]]] = {}
        #: admissions whose row and lease are being written: fires when each is
        #: answered, with its console port
        self._admissions: dict[defer.Deferred[None], tuple[str, int]] = {}
        #: the gate's admissions under way, whose look-up may write a session's row
        self._looking_up: set[defer.Deferred[Any]] = set()
        #: consoled.metrics.Metrics, when the management listener reports them
        self.metrics: Any = None
        #: rows of sessions holding no lease, ended together under load
        self._ends = Ends(store)
        #: what this proxy's previous life left behind, given back at start
        self._reclaimed: defer.Deferred[Any] = defer.succeed(None)

    def admit(self, info: ConnectInfo, door: str, client_address: str) -> defer.Deferred[Admission]:
        """Write the row and take the lease of a leased console, before the door answers.

        Fails with a :class:`Refusal` (``PORT_BUSY``, naming since when the
        port is held) when another session writes to the port; that attempt's
        row is ended as refused.  Other console types need no admission.
        """

        def open_writer(_: object = None) -> defer.Deferred[tuple[int, dict[str, Any] | None]]:
            return self._store.open_writer(
                info=info,
                door=door,
                client_address=client_address,
                proxy=self.proxy,
                lease_seconds=self._lease_seconds,
            )

        # A user who reconnects at once finds the port still held by their
        # own session's release, in flight on a database thread: wait for it
        # rather than race it and be refused as busy.  Likewise for the
        # leases of this proxy's previous life, given back at start.
        releasing = self._releasing(info)
        if releasing or not self._reclaimed.called:
            waits = [*releasing, observe(self._reclaimed)]
            opening = defer.DeferredList(waits).addCallback(open_writer)
        else:
            opening = open_writer()

        def decide(opened: tuple[int, dict[str, Any] | None], again: bool = False) -> Any:
            session_id, holder = opened
            if holder is None:
                return Admission(session_id, info, True)
            ending = None if again else self._local_holder(holder, (info.host, info.port))
            if ending is not None:
                # Held by a session of this proxy: the same user's, whose reset
                # this reactor has not read yet, or is reading now.  Give it a
                # moment to end, then try the lease once more.
                def retry(_: object) -> Any:
                    taking = self._store.take_lease(
                        session_id=session_id,
                        info=info,
                        proxy=self.proxy,
                        lease_seconds=self._lease_seconds,
                    )
                    return taking.addCallback(lambda holder: decide((session_id, holder), True))

                return _within(ending, LOCAL_HOLDER_GRACE, self._clock).addCallback(retry)
            since = readable_utc(holder["acquired_at"])
            # The holder, for the operator who would force it off (never shown to the user).
            log.info(
                "serial port {host}:{port} is held by session {holder} of {proxy}"
                " since {since} (session {session_id} refused{retried})",
                host=info.host,
                port=info.port,
                holder=holder.get("session_id"),
                proxy=holder.get("proxy"),
                since=since,
                session_id=session_id,
                retried=", after waiting for it" if again else "",
            )
            refusal = Refusal(Kind.PORT_BUSY, f"held since {since}", info.hash_prefix)
            ended = self._store.end_session(
                session_id, reason=str(refusal.ending), bytes_to_client=0, bytes_to_server=0
            )
            return ended.addCallback(lambda _: defer.fail(refusal))

        def unavailable(failure: Failure) -> Failure:
            if not failure.check(Refusal):
                # An outage is logged once by the store's breaker; the refusal's line names it.
                if not is_outage(failure):
                    log.failure("cannot admit a session", failure)
                refusal = Refusal(
                    Kind.STORE_UNAVAILABLE,
                    hash_prefix=info.hash_prefix,
                    cause=brief_error(failure.value),
                )
                return Failure(refusal)
            return failure

        admitting = opening.addCallback(decide).addErrback(unavailable)
        # ``answered`` fires after the door's own callbacks on the answer: by
        # then a door whose user left has given the admission back.
        answered: defer.Deferred[None] = defer.Deferred()
        self._admissions[answered] = (info.host, info.port)
        answer: defer.Deferred[Admission] = defer.Deferred()

        def done(result: Any) -> None:
            del self._admissions[answered]
            if not answer.called:
                answer.callback(result)
            answered.callback(None)

        admitting.addBoth(done)
        return answer

    def _local_holder(
        self, holder: dict[str, Any], port: tuple[str, int]
    ) -> defer.Deferred[Any] | None:
        """When ``holder`` (a lease row) is a session of this proxy: its ``finished``.

        A holder that is no session here yet may be an admission of this
        proxy whose row a database thread has written and whose answer the
        reactor has not read (its user reset the connection meanwhile and
        reconnected): then, once this port's admissions under way are
        answered, the holder's end (its admission given back, or its session).
        """
        if holder.get("proxy") != self.proxy:
            return None
        known = self._known_holder(holder)
        if known is not None:
            return known
        under_way = [observe(d) for d, at in self._admissions.items() if at == port]
        if not under_way:
            return None

        def then(_: object) -> Any:
            return self._known_holder(holder)

        return defer.DeferredList(under_way).addCallback(then)

    def _known_holder(self, holder: dict[str, Any]) -> defer.Deferred[None] | None:
        """The end of ``holder``'s admission being given back, or of its session here."""
        giving_back = self._giving_back.get(holder.get("session_id"))  # type: ignore[arg-type]
        if giving_back is not None:
            return observe(giving_back[1])
        for session in self.live | self._closing:
            if session.id is not None and session.id == holder.get("session_id"):
                return session.finished
        return None

    def _releasing(self, info: ConnectInfo) -> list[defer.Deferred[None]]:
        """The lease releases of this console's port still in flight on this proxy."""
        port = (info.host, info.port)
        return [
            observe(session.finished)
            for session in self._closing
            if session.holds_lease and (session.info.host, session.info.port) == port
        ] + [observe(d) for held, d in self._giving_back.values() if held == port]

    def admitting(self, work: defer.Deferred[Any]) -> None:
        """The gate's admission under way: ``settled`` waits for it, since its
        look-up may write a session's row, given back if the session does not start."""
        self._looking_up.add(work)
        work.addBoth(lambda result: (self._looking_up.discard(work), result)[1])

    def release(self, admission: Admission, reason: str) -> defer.Deferred[None]:
        """Give back an admission whose session never started (the user left)."""
        d = self._store.end_session(
            admission.session_id,
            reason=reason,
            bytes_to_client=0,
            bytes_to_server=0,
            release_lease=admission.holds_lease,
        )
        d.addErrback(lambda f: log.failure("releasing an admission failed", f))
        # A user whose reset ended an admission reconnects at once: their next
        # admission waits for this release instead of finding the port held
        # (and a shut-down, ``settled``, waits for every release).
        key = admission.session_id
        self._giving_back[key] = ((admission.info.host, admission.info.port), d)
        return d.addBoth(lambda result: (self._giving_back.pop(key, None), result)[1])

    def start(
        self,
        info: ConnectInfo,
        door: str,
        client_address: str,
        client: ClientSide,
        admission: Admission | None = None,
        connector: Connector = plain_tcp,
    ) -> Relay:
        """Relay ``client`` to the console ``info`` names; returns the relay at once.

        The gate wrote the session's row, and a serial console's lease
        (``admission``); a session it wrote none for (a legacy consoleauth
        token's) writes its row here, beside connecting.
        """
        session = Session(info, door, client_address, self._clock.seconds(), connector)
        deadline = float(info.expires) if self._enforce_session_timeout else None
        relay = Relay(
            client,
            self._clock,
            lambda ending: self._ended(session, ending),
            idle_timeout=self._idle_timeout,
            deadline=deadline,
        )
        session.relay = relay
        if not self.running:  # shutting down: no row, no connection, nothing to wait for
            if admission is not None:
                self.release(admission, Ending(Kind.SHUTDOWN).kind.value)
            relay.end(Ending(Kind.SHUTDOWN))
            return relay
        self._add_live(session)
        if admission is not None:
            self._admitted(admission, session)
        else:
            # The row and the hypervisor connection proceed side by side; each
            # settles on its own, so a row written after the session already
            # ended is still ended, and relaying starts without waiting for it.
            row = self._store.open_session(
                info=info, door=door, client_address=client_address, proxy=self.proxy
            )
            row.addCallbacks(self._row_written, self._row_failed, (session,), None, (session,))
            self._connect(session)
        return relay

    def open_for(self, info: ConnectInfo) -> tuple[int, int]:
        """Live sessions of this proxy for ``info``'s token, and for its instance."""
        return self._per_token[info.token_hash], self._per_instance[info.instance_uuid]

    def _add_live(self, session: Session) -> None:
        self.live.add(session)
        self._per_token[session.info.token_hash] += 1
        self._per_instance[session.info.instance_uuid] += 1

    def leases_held(self) -> int:
        """Serial ports whose writer is a session of this proxy."""
        return len(self._writers)

    def _drop_live(self, session: Session) -> None:
        if session not in self.live:
            return
        self.live.discard(session)
        if self.metrics is not None:
            self.metrics.session_ended(session.relay)
        for counter, key in (
            (self._per_token, session.info.token_hash),
            (self._per_instance, session.info.instance_uuid),
        ):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    def _admitted(self, admission: Admission, session: Session) -> None:
        session.holds_lease = admission.holds_lease
        if admission.holds_lease:
            self._writers[(session.info.host, session.info.port)] = session
        self._row_written(admission.session_id, session)
        assert session.relay is not None
        if session.relay.ending is None:
            self._connect(session)

    def _connect(self, session: Session) -> None:
        info = session.info
        backend = session.connector(self._reactor, info, timeout=self._connect_timeout)
        session.connecting = backend
        backend.addCallbacks(
            self._backend_ready, self._backend_failed, (session,), None, (session,)
        )

    def _row_written(self, session_id: int, session: Session) -> None:
        session.id = session_id
        assert session.relay is not None
        self._announce(session)
        if session.relay.ending is not None:
            self._finish(session, session.relay.ending)

    def _row_failed(self, failure: Failure, session: Session) -> None:
        if is_outage(failure):
            log.warn("cannot record a session: {cause}", cause=brief_error(failure.value))
        else:
            log.failure("cannot record a session", failure)
        assert session.relay is not None
        session.relay.end(Ending(Kind.STORE_UNAVAILABLE))
        self._drop_live(session)
        session.finished.callback(None)

    def _backend_ready(self, protocol: BackendProtocol, session: Session) -> None:
        assert session.relay is not None
        session.relay.attach_backend(protocol)
        if session.relay.ending is None:
            self._announce(session)
            self._record(session)

    def _record(self, session: Session) -> None:
        info, relay = session.info, session.relay
        if self._recorder is None or info.console_type not in LEASED_TYPES or relay is None:
            return
        recording = self._recorder.open(info.host, info.port)
        recording.event(
            f"attach {session.client_address} via {session.door} "
            f"(session {session.id if session.id is not None else '?'})"
        )
        session.recording = recording
        relay.tap = recording.output

    def _backend_failed(self, failure: Failure, session: Session) -> None:
        assert session.relay is not None
        if failure.check(Refusal):
            session.relay.end(failure.value.ending)
        else:
            log.failure("could not connect to the console", failure)
            session.relay.end(Ending(Kind.INTERNAL))

    def _announce(self, session: Session) -> None:
        """The start line, once the row is written and the console connected."""
        relay, info = session.relay, session.info
        if session.id is None or relay is None or relay.backend is None:
            return
        if self.metrics is not None:
            self.metrics.started.labels(session.door, info.console_type).inc()
            self.metrics.setup.observe(self._clock.seconds() - session.started)
        log.info(
            "session {session_id} started: {door} from {client} to {console_type} "
            "{host}:{port} of instance {instance}, token {hash_prefix}",
            session_id=session.id,
            door=session.door,
            client=session.client_address,
            console_type=info.console_type,
            host=info.host,
            port=info.port,
            instance=info.instance_uuid,
            hash_prefix=info.hash_prefix,
        )

    def _ended(self, session: Session, ending: Ending) -> None:
        if session.connecting is not None and not session.connecting.called:
            session.connecting.cancel()
        if session.id is not None:
            self._finish(session, ending)
        # else: the row is still being written; _row_written finishes it.

    def _finish(self, session: Session, ending: Ending) -> None:
        if session.finished.called or session not in self.live:
            return
        self._drop_live(session)
        self._closing.add(session)
        key = (session.info.host, session.info.port)
        if self._writers.get(key) is session:
            del self._writers[key]
        if session.relay is not None:
            for watcher in list(session.relay.watchers):
                watcher.end(Ending(Kind.BACKEND_CLOSED, "the writer's session ended"))
        if session.recording is not None:
            session.recording.event(
                f"detach {session.client_address} (session {session.id}): {ending}"
            )
            session.recording.close()
            session.recording = None
        relay = session.relay
        assert relay is not None and session.id is not None
        seconds = self._clock.seconds() - session.started
        log.info(
            "session {session_id} ended ({ending}) after {seconds:.1f}s: "
            "{to_client} bytes to client, {to_server} bytes to console, token {hash_prefix}",
            session_id=session.id,
            ending=str(ending),
            seconds=seconds,
            to_client=relay.bytes_to_client,
            to_server=relay.bytes_to_server,
            hash_prefix=session.info.hash_prefix,
        )
        # A writer's end releases its lease, alone; others may go together.
        end = self._store.end_session if session.holds_lease else self._ends.end
        d = end(
            session.id,
            reason=str(ending),
            bytes_to_client=relay.bytes_to_client,
            bytes_to_server=relay.bytes_to_server,
        )
        d.addErrback(
            lambda f: log.failure(
                "could not end the row of session {session_id}", f, session_id=session.id
            )
        )
        d.addBoth(lambda _: self._closed(session))

    def _closed(self, session: Session) -> None:
        self._closing.discard(session)
        session.finished.callback(None)

    def settled(self) -> defer.Deferred[None]:
        """Fires once every session alive or ending now has its row ended, and
        every admission under way has been started or given back."""
        under_way = [*self._admissions, *self._looking_up]
        admissions = defer.DeferredList([observe(d) for d in under_way])

        def rest(_: object) -> defer.Deferred[Any]:
            waiting = [s.finished for s in self.live | self._closing]
            waiting += [observe(d) for d in self._watching]
            waiting += [observe(d) for _, d in self._giving_back.values()]
            return defer.DeferredList(waiting)

        return admissions.addCallback(rest).addCallback(lambda _: None)

    # -- timers and shut-down ----------------------------------------------

    def touch(self) -> defer.Deferred[None]:
        """Renew this proxy's rows and leases; close the sessions an operator kicked."""
        counters = [
            (s.id, s.relay.bytes_to_client, s.relay.bytes_to_server)
            for s in self.live
            if s.id is not None and s.relay is not None
        ]
        d = self._store.touch(counters, proxy=self.proxy, lease_seconds=self._lease_seconds)
        d.addCallback(self._act_on_kicks)
        return d.addErrback(lambda f: log.failure("touching live sessions failed", f))

    def _act_on_kicks(self, kicks: list[dict[str, Any]]) -> None:
        by_id = {s.id: s for s in self.live}
        for kick in kicks:
            session = by_id.get(kick["id"])
            if session is None or session.relay is None:
                continue
            reason = kick["kick_reason"] or ""
            if kick["kick_takeover"] and self.takeover(session):
                continue
            log.info(
                "session {session_id} kicked by an operator: {reason}",
                session_id=session.id,
                reason=reason or "-",
            )
            session.relay.end(Ending(Kind.KICKED, reason))

    def startService(self) -> None:
        super().startService()
        self._reclaimed = self._store.reclaim(self.proxy).addCallbacks(
            self._reported_reclaim,
            lambda f: log.failure("giving back this proxy's stale leases failed", f),
        )

    def _reported_reclaim(self, counts: tuple[int, int]) -> None:
        ended, dropped = counts
        if ended or dropped:
            log.info(
                "proxy {proxy} restarted: ended {ended} session row(s) and gave back"
                " {dropped} serial lease(s) its previous process left",
                proxy=self.proxy,
                ended=ended,
                dropped=dropped,
            )

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        sessions = list(self.live)
        if sessions:
            log.info("ending {count} live session(s)", count=len(sessions))
        for session in sessions:
            if session.relay is not None:
                session.relay.end(Ending(Kind.SHUTDOWN))
        return self.settled()
