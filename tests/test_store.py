"""The Store on every backend: SQLite, and real PostgreSQL and MariaDB servers."""

from __future__ import annotations

import dataclasses
import datetime
import os
import uuid
from typing import Any

import sqlalchemy as sa
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoled.store import Store
from consoled.store.engine import make_engine
from consoled.store.runner import InlineRunner, ThreadRunner
from consoled.store.sessions import Opening
from consoled.store.tables import console_auth_tokens, serial_leases, sessions
from consoled.tokens import hash_token
from tests.databases import fresh_database, upgraded_engine
from tests.test_policy import INFO

NOW = 1_800_000_000
INSTANCE = "9b2c4f0e-3d1a-4c5b-8e7f-0a1b2c3d4e5f"
OTHER = "1e2d3c4b-5a69-4788-9a0b-c1d2e3f4a5b6"


class StoreTestsMixin:
    """One body of store tests; a subclass per backend sets ``backend``."""

    backend: str

    def setUp(self: Any) -> None:
        self.engine = upgraded_engine(self, fresh_database(self, self.backend))
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = Store(self.engine, InlineRunner(), self.clock)

    def authorize(self: Any, **overrides: Any) -> Any:
        values = dict(
            console_type="novnc",
            host="compute-1",
            port=5901,
            instance_uuid=INSTANCE,
            access_url_base="http://proxy:6080/vnc_auto.html",
            ttl=600,
        )
        values.update(overrides)
        return self.successResultOf(self.store.authorize(**values))

    def rows(self: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(sa.select(console_auth_tokens))]

    def test_a_touch_never_rewrites_an_ended_row(self: Any) -> None:
        """A touch that lands after a session's end (one under way when the
        database went away) leaves the end's final counters alone."""
        session_id = self.successResultOf(
            self.store.open_session(
                info=INFO, door="websocket", client_address="10.0.0.1", proxy="a"
            )
        )
        self.successResultOf(
            self.store.end_session(
                session_id,
                reason="client",
                bytes_to_client=1007,
                bytes_to_server=1007,
                release_lease=False,
            )
        )
        self.successResultOf(self.store.touch([(session_id, 7, 7)], proxy="a", lease_seconds=30))
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(sessions).where(sessions.c.id == session_id)).one()
        self.assertEqual((row.bytes_to_client, row.bytes_to_server), (1007, 1007))

    def test_authorize_stores_only_the_digest(self: Any) -> None:
        """The row holds sha256(token) and expires = now + ttl; the token is nowhere in it."""
        issued = self.authorize(internal_access_path="/console?ref=1", tls_port=5902)
        (row,) = self.rows()
        self.assertEqual(row["token_hash"], hash_token(issued.token))
        self.assertEqual(row["expires"], NOW + 600)
        self.assertEqual(row["tls_port"], 5902)
        self.assertEqual(row["internal_access_path"], "/console?ref=1")
        self.assertEqual(row["created_at"], datetime.datetime(2027, 1, 15, 8, 0))
        self.assertNotIn(issued.token, repr(row))

    def test_validate(self: Any) -> None:
        """A live token leads to its console; the answer carries no token."""
        issued = self.authorize()
        info = self.successResultOf(self.store.find_token(hash_token(issued.token)))
        self.assertEqual((info.host, info.port, info.console_type), ("compute-1", 5901, "novnc"))
        self.assertEqual(info, issued.connect_info)

    def test_expired_and_unknown_are_one_answer(self: Any) -> None:
        """An unknown token and one at or past its expiry both validate to None."""
        issued = self.authorize(ttl=10)
        self.assertIsNone(
            self.successResultOf(self.store.find_token(hash_token(str(uuid.uuid4()))))
        )
        self.clock.advance(9)
        self.assertIsNotNone(self.successResultOf(self.store.find_token(hash_token(issued.token))))
        self.clock.advance(1)
        self.assertIsNone(self.successResultOf(self.store.find_token(hash_token(issued.token))))

    def test_nova_written_row_validates(self: Any) -> None:
        """A row inserted the way nova's console_auth_token_create does validates here."""
        token = "2f6a4bd5-7e0b-4c8e-9a55-1f0c3f2d8e61"
        with self.engine.begin() as connection:
            connection.execute(
                console_auth_tokens.insert().values(
                    token_hash="795f320804ab28ff224cb5b96f54635e7c4bd802ce7dbe943ef14e5dbe2da809",
                    console_type="serial",
                    host="10.0.0.5",
                    port=10000,
                    internal_access_path=None,
                    instance_uuid=INSTANCE,
                    expires=NOW + 30,
                    access_url_base="ws://proxy:6083/",
                    created_at=datetime.datetime(2027, 1, 15, 8, 0),
                )
            )
        info = self.successResultOf(self.store.find_token(hash_token(token)))
        self.assertEqual((info.console_type, info.host, info.port), ("serial", "10.0.0.5", 10000))
        self.assertIsNone(info.tls_port)

    def test_look_up_writes_the_session_row_it_is_asked_for(self: Any) -> None:
        """With an Opening, a found token's session row is written in the same
        unit when ``wanted`` says so (on the row it found); never for an
        unknown token, and not when unwanted."""
        issued = self.authorize()
        seen: list[Any] = []

        def wanted(info: Any) -> bool:
            seen.append(info.instance_uuid)
            return True

        opening = Opening("websocket/novnc", "192.0.2.7", "proxy-a", wanted)
        info = self.successResultOf(self.store.find_token(hash_token(issued.token), opening))
        self.assertEqual((seen, info.port), ([INSTANCE], 5901))
        with self.engine.connect() as connection:
            row = connection.execute(
                sa.select(sessions).where(sessions.c.id == opening.session_id)
            ).one()
        self.assertEqual(
            (row.door, row.client_address, row.proxy, row.mode, row.port, row.ended_at),
            ("websocket/novnc", "192.0.2.7", "proxy-a", "writer", 5901, None),
        )
        self.assertEqual((row.instance_uuid, row.token_hash_prefix), (INSTANCE, info.hash_prefix))
        unwanted = Opening("websocket/novnc", "192.0.2.7", "proxy-a", lambda info: False)
        self.successResultOf(self.store.find_token(hash_token(issued.token), unwanted))
        unknown = Opening("websocket/novnc", "192.0.2.7", "proxy-a", wanted)
        self.assertIsNone(
            self.successResultOf(self.store.find_token(hash_token("unknown"), unknown))
        )
        self.assertEqual((unwanted.session_id, unknown.session_id, len(seen)), (None, None, 1))
        with self.engine.connect() as connection:
            count = connection.execute(sa.select(sa.func.count()).select_from(sessions))
            self.assertEqual(count.scalar_one(), 1)

    def test_end_sessions_ends_each_row(self: Any) -> None:
        """Several ends in one unit: each row gets its own time, reason and bytes;
        an ended row is not ended again."""
        issued = self.authorize()
        info = self.successResultOf(self.store.find_token(hash_token(issued.token)))
        ids = [
            self.successResultOf(
                self.store.open_session(
                    info=info, door="websocket/novnc", client_address="c", proxy="p"
                )
            )
            for _ in range(3)
        ]
        endings = []
        for n, session_id in enumerate(ids):
            self.clock.advance(1)
            endings.append(
                self.store.ending(
                    session_id, reason=f"r{n}", bytes_to_client=n, bytes_to_server=10 * n
                )
            )
        self.successResultOf(self.store.end_sessions(endings))
        again = self.store.ending(ids[0], reason="again", bytes_to_client=9, bytes_to_server=9)
        self.successResultOf(self.store.end_sessions([again]))
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(
                    sessions.c.ended_at,
                    sessions.c.end_reason,
                    sessions.c.bytes_to_client,
                    sessions.c.bytes_to_server,
                ).order_by(sessions.c.id)
            ).all()
        self.assertEqual(
            [tuple(row) for row in rows],
            [(NOW + 1, "r0", 0, 0), (NOW + 2, "r1", 1, 10), (NOW + 3, "r2", 2, 20)],
        )

    def test_lookup_shows_expired(self: Any) -> None:
        """lookup finds a token's row even after expiry, for `token show`."""
        issued = self.authorize(ttl=5)
        self.clock.advance(60)
        self.assertEqual(
            self.successResultOf(self.store.lookup(issued.token)).id, issued.connect_info.id
        )

    def test_list_filters(self: Any) -> None:
        """list_tokens filters by instance and by host, ordered by expiry."""
        first = self.authorize(ttl=100)
        second = self.authorize(ttl=50, host="compute-2")
        self.authorize(instance_uuid=OTHER)
        every = self.successResultOf(self.store.list_tokens())
        self.assertEqual(len(every), 3)
        self.assertEqual(every[0].id, second.connect_info.id)
        by_instance = self.successResultOf(self.store.list_tokens(instance_uuid=INSTANCE))
        self.assertEqual(
            {i.id for i in by_instance}, {first.connect_info.id, second.connect_info.id}
        )
        by_host = self.successResultOf(self.store.list_tokens(host="compute-2"))
        self.assertEqual([i.id for i in by_host], [second.connect_info.id])

    def test_revoke_instance(self: Any) -> None:
        """Revoking an instance deletes its tokens and only its tokens."""
        issued = [self.authorize() for _ in range(3)]
        kept = self.authorize(instance_uuid=OTHER)
        self.assertEqual(self.successResultOf(self.store.revoke_instance(INSTANCE)), 3)
        for each in issued:
            self.assertIsNone(self.successResultOf(self.store.find_token(hash_token(each.token))))
        self.assertIsNotNone(self.successResultOf(self.store.find_token(hash_token(kept.token))))

    def test_clean_expired_in_bounded_batches(self: Any) -> None:
        """Seven expired tokens go in batches of three (three DELETEs); live ones stay."""
        for _ in range(7):
            self.authorize(ttl=1)
        live = [self.authorize(ttl=1000) for _ in range(2)]
        self.clock.advance(2)
        deletes: list[str] = []

        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.lstrip().upper().startswith("DELETE"):
                deletes.append(statement)

        sa.event.listen(self.engine, "before_cursor_execute", count)
        self.addCleanup(sa.event.remove, self.engine, "before_cursor_execute", count)
        self.assertEqual(self.successResultOf(self.store.clean_expired(batch=3)), 7)
        self.assertEqual(len(deletes), 3)
        self.assertEqual(
            {r["token_hash"] for r in self.rows()}, {hash_token(i.token) for i in live}
        )


class SQLiteStoreTests(StoreTestsMixin, SynchronousTestCase):
    backend = "sqlite"

    def test_wal_mode(self) -> None:
        """The SQLite file runs in write-ahead-log mode."""
        with self.engine.connect() as connection:
            mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
        self.assertEqual(mode, "wal")


class PostgreSQLStoreTests(StoreTestsMixin, SynchronousTestCase):
    backend = "postgresql"


class MariaDBStoreTests(StoreTestsMixin, SynchronousTestCase):
    backend = "mariadb"


class ThreadRunnerTests(TestCase):
    """The daemon's runner: a real thread pool under the real reactor."""

    def test_calls_run_off_the_reactor_thread(self) -> None:
        """Work handed to the runner runs in a pool thread, and its result comes back."""
        import threading

        runner = ThreadRunner(reactor, 2)
        runner.start()
        self.addCleanup(runner.stop)
        main = threading.get_ident()
        d = runner.run(lambda: threading.get_ident() != main)
        return d.addCallback(self.assertTrue)

    @defer.inlineCallbacks
    def test_stop_waits_for_calls_in_flight(self) -> Any:
        """stop() fires only after a call already running has finished and delivered."""
        import threading

        runner = ThreadRunner(reactor, 1)
        runner.start()
        release = threading.Event()
        results: list[str] = []
        d = runner.run(lambda: release.wait(10) and "done")
        d.addCallback(results.append)
        stopped = runner.stop()
        self.assertFalse(stopped.called)
        reactor.callLater(0, release.set)
        yield stopped
        self.assertEqual(results, ["done"])

    def test_results_finished_together_come_back_in_one_wake_up(self) -> None:
        """Results finished while a delivery is pending ride with it: one
        callFromThread for many units (the set-up storm's look-ups and rows)."""
        import threading

        class Reactor:
            def __init__(self) -> None:
                self.calls: list[Any] = []

            def callFromThread(self, f: Any, *args: Any) -> None:
                self.calls.append((f, args))

        fake = Reactor()
        runner = ThreadRunner(fake, 1)  # type: ignore[arg-type]
        go, done = threading.Event(), threading.Event()
        results: list[int] = []
        first = runner.run(go.wait, 10)
        units = [runner.run(lambda n=n: n) for n in range(10)]
        last = runner.run(done.set)
        go.set()
        self.assertTrue(done.wait(10))
        for d in units:
            d.addCallback(results.append)
        self.assertEqual(len(fake.calls), 1)  # the first result's; the rest waited for it
        f, args = fake.calls.pop()
        f(*args)
        self.assertEqual(results, list(range(10)))
        self.assertTrue(first.called)
        # done.set's own result may finish after that delivery: a second wake-up.
        runner._work.put(None)
        runner._threads[0].join(10)
        while fake.calls:
            f, args = fake.calls.pop()
            f(*args)
        self.assertTrue(last.called)


class StoreThreadsTests(SynchronousTestCase):
    """How many database threads open_store gives the daemon's store."""

    def threads(self, url: str) -> int:
        from consoled.store import open_store

        store, _ = open_store(url, reactor, threads=4)
        self.addCleanup(store.engine.dispose)
        runner = store._runner._runner  # the breaker's ThreadRunner
        assert isinstance(runner, ThreadRunner)
        return runner._size

    def test_sqlite_gets_one_writer_thread(self) -> None:
        """SQLite: one thread, whatever db_threads says (a second only waits
        in SQLite's busy handler; under a storm that tripped the breaker)."""
        self.assertEqual(self.threads(f"sqlite:///{self.mktemp()}.sqlite"), 1)

    def test_servers_get_db_threads(self) -> None:
        """PostgreSQL and MariaDB get db_threads (no connection is made here)."""
        self.assertEqual(self.threads("postgresql://nobody@127.0.0.1:1/none"), 4)
        self.assertEqual(self.threads("mysql+pymysql://nobody@127.0.0.1:1/none"), 4)


class KeptConnectionTests(SynchronousTestCase):
    """The daemon's SQLite store keeps its database thread's connection."""

    def checkouts(self, keep: bool) -> tuple[int, int]:
        """(pool checkouts, check-ins) for three look-ups and a stop."""
        engine = upgraded_engine(self, f"sqlite:///{os.path.abspath(self.mktemp())}.sqlite")
        counted = {"checkout": 0, "checkin": 0}
        for name in counted:
            sa.event.listen(engine, name, lambda *a, n=name: counted.__setitem__(n, counted[n] + 1))
        store = Store(engine, InlineRunner(), Clock(), keep_connection=keep)
        for _ in range(3):
            self.assertIsNone(self.successResultOf(store.find_token("0" * 64)))
        store.stop()
        return counted["checkout"], counted["checkin"]

    def test_one_checkout_for_every_unit(self) -> None:
        """Kept: one checkout for three units, checked in at stop."""
        self.assertEqual(self.checkouts(keep=True), (1, 1))

    def test_pooled_checks_out_each_unit(self) -> None:
        """Not kept (servers, tests): one checkout per unit, as before."""
        self.assertEqual(self.checkouts(keep=False), (3, 3))

    def test_a_closed_kept_connection_is_replaced(self) -> None:
        """A kept connection that was closed (or invalidated) is not reused."""
        engine = upgraded_engine(self, f"sqlite:///{os.path.abspath(self.mktemp())}.sqlite")
        store = Store(engine, InlineRunner(), Clock(), keep_connection=True)
        self.successResultOf(store.find_token("0" * 64))
        first = store._kept.connection
        first.invalidate()
        self.successResultOf(store.find_token("0" * 64))
        self.assertIsNot(store._kept.connection, first)
        store.stop()


class LeaseTestsMixin:
    """The serial port lease on every backend."""

    backend: str

    def setUp(self: Any) -> None:
        self.engine = upgraded_engine(self, fresh_database(self, self.backend))
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = Store(self.engine, InlineRunner(), self.clock)

    def acquire(self: Any, session_id: int, proxy: str = "a") -> Any:
        """A writer's row (the ``session_id``-th) and the lease of compute-1:10000; the holder."""
        row, holder = self.successResultOf(take_lease(self.store, "compute-1", 10000, proxy, 30))
        self.assertEqual(row, session_id)
        return holder

    def test_one_holder(self: Any) -> None:
        """The first taker holds the port; the second learns who holds it since when."""
        self.assertIsNone(self.acquire(1))
        self.clock.advance(5)
        holder = self.acquire(2, proxy="b")
        self.assertEqual((holder["session_id"], holder["proxy"]), (1, "a"))
        self.assertEqual(holder["acquired_at"], NOW)

    def test_open_writer(self: Any) -> None:
        """A writer's row and lease in one trip; a second writer gets its row and the holder."""
        info = dataclasses.replace(INFO, console_type="serial", host="compute-1", port=10000)
        writer = dict(info=info, door="serial-tcp", proxy="a", lease_seconds=30)
        first, holder = self.successResultOf(
            self.store.open_writer(client_address="192.0.2.1", **writer)
        )
        self.assertIsNone(holder)
        second, holder = self.successResultOf(
            self.store.open_writer(client_address="192.0.2.2", **writer)
        )
        self.assertNotEqual(first, second)
        self.assertEqual(holder["session_id"], first)
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(sessions.c.id, sessions.c.client_address, sessions.c.mode)
            ).all()
        self.assertEqual(
            sorted(rows), [(first, "192.0.2.1", "writer"), (second, "192.0.2.2", "writer")]
        )

    def test_holder_gone_before_it_is_named(self: Any) -> None:
        """A lease released between a taker's failed insert and its look-up of
        the holder is taken on the next try, not answered "held" by nobody."""
        self.assertIsNone(self.acquire(1))
        self.store.engine = _ReleasedBeforeLookUp(self.engine)
        self.assertIsNone(self.acquire(2, proxy="b"))
        self.assertEqual(self.store.engine.released, 1)
        self.store.engine = self.engine
        self.assertEqual(self.acquire(3)["session_id"], 2)

    def test_lapsed_lease_is_taken_over(self: Any) -> None:
        """A lease not renewed within its period (a proxy that died) is free again."""
        self.assertIsNone(self.acquire(1))
        self.clock.advance(31)
        self.assertIsNone(self.acquire(2, proxy="b"))
        self.assertEqual(self.acquire(3)["session_id"], 2)

    def test_touch_renews_and_end_releases(self: Any) -> None:
        """Upkeep renews a proxy's leases; ending the row releases its lease at once."""
        self.assertIsNone(self.acquire(1))
        self.clock.advance(25)
        self.successResultOf(self.store.touch([(1, 0, 0)], proxy="a", lease_seconds=30))
        self.clock.advance(25)
        self.assertIsNotNone(self.acquire(2, proxy="b"))  # renewed: still held
        self.successResultOf(
            self.store.end_session(1, reason="x", bytes_to_client=0, bytes_to_server=0)
        )
        self.assertIsNone(self.acquire(3, proxy="b"))

    def test_janitor_ends_silent_rows_but_keeps_a_renewed_lease(self: Any) -> None:
        """A row silent past ``silent_for`` is ended, but its lease, renewed on its
        own, still keeps the port's one writer until it lapses."""
        self.assertIsNone(self.acquire(1))
        self.clock.advance(20)
        self.assertEqual(self.successResultOf(self.store.end_lost_sessions(15)), 1)
        self.assertIsNotNone(self.acquire(2, proxy="b"))  # the lease (30 s) holds
        self.clock.advance(11)
        self.successResultOf(self.store.end_lost_sessions(15))
        self.assertIsNone(self.acquire(3, proxy="b"))  # lapsed: dropped and free

    def test_reclaim_gives_back_only_its_own(self: Any) -> None:
        """A proxy starting again under its name ends its old rows and drops its
        old leases; another proxy's stay."""
        self.assertIsNone(self.acquire(1, proxy="a"))
        self.assertIsNone(
            self.successResultOf(take_lease(self.store, "compute-2", 10000, "b", 30))[1]
        )
        self.assertEqual(self.successResultOf(self.store.reclaim("a")), (1, 1))
        self.assertIsNone(self.acquire(3, proxy="c"))  # a's port is free at once
        self.assertIsNotNone(
            self.successResultOf(take_lease(self.store, "compute-2", 10000, "c", 30))[1]
        )
        live = self.successResultOf(self.store.list_sessions())
        self.assertNotIn("a", {row["proxy"] for row in live})
        self.assertIn("b", {row["proxy"] for row in live})

    def test_concurrent_takers_one_wins(self: Any) -> None:
        """Eight threads racing for a free port: exactly one gets it."""
        import threading

        results: list[Any] = []
        barrier = threading.Barrier(8)
        engine = make_engine(str(self.engine.url.render_as_string(hide_password=False)))
        self.addCleanup(engine.dispose)
        racer = Store(engine, InlineRunner(), self.clock)

        def take(session_id: int) -> None:
            barrier.wait()
            d = take_lease(racer, "h", 1, f"p{session_id}", 30)
            d.addCallbacks(lambda opened: results.append(opened[1]), results.append)

        threads = [threading.Thread(target=take, args=(i,)) for i in range(1, 9)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(len(results), 8, results)
        winners = [r for r in results if r is None]
        self.assertEqual(len(winners), 1, results)


class _ReleasedBeforeLookUp:
    """An engine whose first ``connect()`` (a taker looking up the holder)
    finds the lease just released, as by a session ending on another thread."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.released = 0

    def begin(self) -> Any:
        return self.engine.begin()

    def connect(self) -> Any:
        if not self.released:
            self.released += 1
            with self.engine.begin() as connection:
                connection.execute(serial_leases.delete())
        return self.engine.connect()


class SQLiteLeaseTests(LeaseTestsMixin, SynchronousTestCase):
    backend = "sqlite"


class PostgreSQLLeaseTests(LeaseTestsMixin, SynchronousTestCase):
    backend = "postgresql"


class MariaDBLeaseTests(LeaseTestsMixin, SynchronousTestCase):
    backend = "mariadb"


class RestartedProxyLeaseTests(SynchronousTestCase):
    def test_restarted_proxy_does_not_renew_a_dead_sessions_lease(self) -> None:
        """A proxy restarted under the same name renews only its live sessions' leases."""
        engine = upgraded_engine(self, fresh_database(self, "sqlite"))
        clock = Clock()
        clock.advance(NOW)
        store = Store(engine, InlineRunner(), clock)
        self.assertIsNone(self.successResultOf(take_lease(store, "h", 1, "A", 30))[1])
        for _ in range(4):  # "A" again, after a SIGKILL and restart, with no live session
            clock.advance(10)
            self.successResultOf(store.touch([], proxy="A", lease_seconds=30))
        self.assertIsNone(self.successResultOf(take_lease(store, "h", 1, "B", 30))[1])


def take_lease(
    store: Store, host: str, port: int, proxy: str, lease_seconds: float
) -> defer.Deferred[tuple[int, dict[str, Any] | None]]:
    """A serial writer of host:port through ``proxy``: its row id, and the holder if taken."""
    info = dataclasses.replace(INFO, console_type="serial", host=host, port=port)
    return store.open_writer(
        info=info,
        door="serial-tcp",
        client_address="192.0.2.1",
        proxy=proxy,
        lease_seconds=lease_seconds,
    )
