"""Start-up never half-starts: each refusal is one line, a non-zero exit, and nothing left listening.

Each daemon test runs a real ``twistd -n --pidfile= consoled`` whose start-up
must fail, and checks what an operator sees: the process ends within seconds
with a non-zero status, prints one line that names the option to fix (and
how), and no traceback.  Every address is on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import errno
import os
import re
import socket
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.application.service import MultiService
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoled.listeners import NOVNC, XVP, DoorService
from consoled.store import schema
from consoled.store.engine import CONNECT_TIMEOUT, make_engine
from tests.daemon import START_TIMEOUT, Twistd, spawn_consoled, write_config
from tests.databases import fresh_database
from tests.peers import HOST, free_port

#: Slack over the database's connect timeout: interpreter start, imports, exit.
EXIT_SLACK = 10.0


def _failing_endpoint(port: int, code: int) -> Any:
    """An endpoint whose listen fails as the kernel would, with errno ``code``."""

    class Refusing:
        def listen(self, factory: Any) -> defer.Deferred[Any]:
            cause = OSError(code, os.strerror(code))
            return defer.fail(error.CannotListenError(HOST, port, cause))

    return Refusing()


class DoorRefusalTests(SynchronousTestCase):
    """DoorService under twistd's privilegedStartService, on a memory reactor."""

    def doors(self, code: int) -> tuple[MultiService, DoorService, DoorService]:
        top = MultiService()
        bound = DoorService(
            "novnc", "websocket novnc", serverFromString(MemoryReactor(), "tcp:0"), Factory(), NOVNC
        )
        taken = DoorService("xvp", "XVP", _failing_endpoint(6081, code), Factory(), XVP)
        bound.setServiceParent(top)
        taken.setServiceParent(top)
        return top, bound, taken

    def test_taken_port_exits_with_one_line_and_closes_bound_doors(self) -> None:
        """A door whose port is taken raises SystemExit naming its option; the doors bound before it close."""
        top, bound, _ = self.doors(errno.EADDRINUSE)
        exit_ = self.assertRaises(SystemExit, top.privilegedStartService)
        self.assertEqual(
            exit_.code,
            "consoled: xvp door: [consoled] xvp_port 6081 on 127.0.0.1: address already in use;"
            " stop what holds it, or set another [consoled] xvp_port",
        )
        self.assertIsNone(bound.port)
        self.assertFalse(top.running)

    def test_remedy_follows_the_cause(self) -> None:
        """A privileged port and an address of no interface each get their own remedy."""
        top, _, _ = self.doors(errno.EACCES)
        exit_ = self.assertRaises(SystemExit, top.privilegedStartService)
        self.assertIn("permission denied; a port below 1024 needs root", str(exit_.code))
        top, _, _ = self.doors(errno.EADDRNOTAVAIL)
        exit_ = self.assertRaises(SystemExit, top.privilegedStartService)
        self.assertIn("cannot assign requested address; check [consoled] xvp_host", str(exit_.code))

    def test_bound_early_door_listens_once_started(self) -> None:
        """A door bound in privilegedStartService keeps that port in startService (no second bind)."""
        memory = MemoryReactor()
        door = DoorService(
            "novnc", "websocket novnc", serverFromString(memory, "tcp:0"), Factory(), NOVNC
        )
        door.privilegedStartService()
        first = door.port
        door.startService()
        self.assertIs(door.port, first)
        self.assertEqual(len(memory.tcpServers), 1)


def _self_signed(testcase: SynchronousTestCase) -> str:
    """A PEM file with a self-signed certificate and no key; returns its path."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path = os.path.abspath(testcase.mktemp())
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _blackhole(testcase: SynchronousTestCase) -> int:
    """A port on 127.0.0.1 that takes no connection and never answers; returns it.

    The socket listens with a backlog of 0 and never accepts; one connection
    of our own fills its accept queue, so the kernel drops every later SYN,
    as a firewalled address does.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    testcase.addCleanup(listener.close)
    listener.bind((HOST, 0))
    listener.listen(0)
    port: int = listener.getsockname()[1]
    # A loopback connect to a queue with room completes at once.
    filler = socket.create_connection((HOST, port), timeout=5)
    testcase.addCleanup(filler.close)
    return port


class RefusedStartTests(TestCase):
    """A real ``twistd consoled`` refusing to start: one line, non-zero, nothing listening."""

    timeout = 60

    def config(self, text: str) -> str:
        """An INI file with ``text`` whose embedded database (if any) is in the test's directory."""
        state = os.path.abspath(self.mktemp())
        return write_config(self, f"[DEFAULT]\nstate_path = {state}\n{text}")

    @defer.inlineCallbacks
    def refused(self, *config_files: str, within: float = START_TIMEOUT) -> Any:
        """Run consoled until it exits (at most ``within`` seconds); its `Twistd` after a refusal."""
        twistd = spawn_consoled(self, *config_files)
        reason = yield twistd.when_ended().addTimeout(within, reactor)
        text = twistd.text()
        self.assertIsInstance(reason, error.ProcessTerminated, text)
        self.assertIsNone(reason.signal, text)
        self.assertNotEqual(reason.exitCode, 0, text)
        self.assertNotIn("Traceback", text)
        self.assertNotIn("consoled ready", text)
        self.assertNotIn("door listening on", text)
        return twistd

    def assertOneLine(self, twistd: Twistd, *parts: str) -> str:
        """The output has exactly one line holding every one of ``parts``, and it says consoled; return it."""
        lines = [line for line in twistd.text().splitlines() if all(p in line for p in parts)]
        self.assertEqual(len(lines), 1, twistd.text())
        self.assertIn("consoled: ", lines[0])
        return lines[0]

    @defer.inlineCallbacks
    def assertRefused(self, port: int) -> Any:
        """Nothing listens on 127.0.0.1:``port``: a connection is refused."""
        connecting = connectProtocol(TCP4ClientEndpoint(reactor, HOST, port), Protocol())
        yield self.assertFailure(connecting, error.ConnectionRefusedError)

    @defer.inlineCallbacks
    def test_door_port_taken(self) -> Any:
        """(a) The XVP door's port is held: one line naming [consoled] xvp_port, and the
        noVNC door, bound just before it, is not left listening."""
        holder = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface=HOST)
        self.addCleanup(holder.stopListening)
        taken = holder.getHost().port
        novnc = free_port()
        config = self.config(
            f"[vnc]\nnovncproxy_host = {HOST}\nnovncproxy_port = {novnc}\n"
            f"[consoled]\nxvp_host = {HOST}\nxvp_port = {taken}\n"
        )
        twistd = yield self.refused(config)
        self.assertOneLine(
            twistd,
            f"xvp door: [consoled] xvp_port {taken} on {HOST}: address already in use",
            "set another [consoled] xvp_port",
        )
        yield self.assertRefused(novnc)

    @defer.inlineCallbacks
    def test_certificate_missing(self) -> Any:
        """(b) ssl_only with a certificate file that does not exist: one line naming the file."""
        cert = os.path.abspath(self.mktemp())
        twistd = yield self.refused(self.config(f"ssl_only = true\ncert = {cert}\n"))
        self.assertOneLine(twistd, f"cannot read TLS certificate {cert}")

    @defer.inlineCallbacks
    def test_certificate_unreadable(self) -> Any:
        """(b) A certificate path that is a directory cannot be read: one line naming it."""
        cert = os.path.abspath(self.mktemp())
        os.mkdir(cert)
        twistd = yield self.refused(self.config(f"ssl_only = true\ncert = {cert}\n"))
        self.assertOneLine(twistd, f"cannot read TLS certificate {cert}")

    @defer.inlineCallbacks
    def test_key_missing(self) -> Any:
        """(b) A good certificate with a key file that does not exist: one line naming the key."""
        key = os.path.abspath(self.mktemp())
        config = self.config(f"ssl_only = true\ncert = {_self_signed(self)}\nkey = {key}\n")
        twistd = yield self.refused(config)
        self.assertOneLine(twistd, f"cannot read TLS key {key}")

    @defer.inlineCallbacks
    def test_database_refuses(self) -> Any:
        """(c) A PostgreSQL URL to a port where nothing listens: one line, the password hidden."""
        port = free_port()  # bound and released: nothing listens there
        config = self.config(
            f"[database]\nconnection = postgresql://consoled:s3cret@{HOST}:{port}/consoled\n"
        )
        twistd = yield self.refused(config)
        self.assertOneLine(
            twistd, f"cannot use the database postgresql+psycopg://consoled:***@{HOST}:{port}/"
        )
        self.assertNotIn("s3cret", twistd.text())

    @defer.inlineCallbacks
    def check_never_answers(self, scheme: str) -> Any:
        """A database URL of ``scheme`` to an address that drops SYNs gives up after CONNECT_TIMEOUT."""
        port = _blackhole(self)
        config = self.config(
            f"[database]\nconnection = {scheme}://consoled@{HOST}:{port}/consoled\n"
        )
        started = reactor.seconds()
        twistd = yield self.refused(config, within=CONNECT_TIMEOUT + EXIT_SLACK)
        self.assertGreaterEqual(reactor.seconds() - started, CONNECT_TIMEOUT - 1)
        line = self.assertOneLine(twistd, "cannot use the database", f"{HOST}:{port}")
        self.assertTrue(re.search("timeout|timed out", line), line)

    def test_postgresql_never_answers(self) -> Any:
        """(c) A blackholed PostgreSQL address ends start-up after the connect timeout, not minutes."""
        return self.check_never_answers("postgresql")

    def test_mariadb_never_answers(self) -> Any:
        """(c) A blackholed MariaDB address ends start-up after the connect timeout, not minutes."""
        return self.check_never_answers("mysql")

    @defer.inlineCallbacks
    def test_database_url_unparsable(self) -> Any:
        """(c) A [database] connection that is no URL: one line naming the option."""
        twistd = yield self.refused(self.config("[database]\nconnection = not a url\n"))
        self.assertOneLine(twistd, "[database] connection: cannot open the database")

    @defer.inlineCallbacks
    def test_schema_behind(self) -> Any:
        """(d) A configured database behind head: one line naming the upgrade command."""
        url = fresh_database(self, "sqlite")
        engine = make_engine(url)
        schema.upgrade(engine, "001")
        engine.dispose()
        twistd = yield self.refused(self.config(f"[database]\nconnection = {url}\n"))
        self.assertOneLine(
            twistd, "database schema is at revision 001", "consoled-manage db upgrade"
        )

    @defer.inlineCallbacks
    def test_web_directory_missing(self) -> Any:
        """(f) An enabled door whose pages are missing: one line naming each option
        and what to install, instead of a door that answers its page URLs with 404."""
        web = os.path.abspath(self.mktemp())
        spice_web = os.path.abspath(self.mktemp())
        novnc = free_port()
        config = self.config(
            f"web = {web}\n[vnc]\nnovncproxy_host = {HOST}\nnovncproxy_port = {novnc}\n"
            f"[spice]\nenabled = true\n[consoled]\nxvp_enabled = false\nspice_web = {spice_web}\n"
        )
        twistd = yield self.refused(config)
        line = self.assertOneLine(
            twistd,
            f"novnc door: [DEFAULT] web {web}: no such directory; install noVNC (apt-get install novnc)",
            f"spice door: [consoled] spice_web {spice_web}: no such directory",
            "apt-get install spice-html5",
        )
        self.assertTrue(line.startswith("consoled: "), line)
        yield self.assertRefused(novnc)

    @defer.inlineCallbacks
    def test_config_file_missing(self) -> Any:
        """(e) A --config-file that does not exist is refused, not served on the defaults."""
        path = os.path.abspath(self.mktemp())
        twistd = yield self.refused(path)
        self.assertOneLine(twistd, f"consoled: --config-file {path}: cannot read: No such file")
