"""``consoled-manage check``: one line per finding, the daemon's own refusals, exit 1 only for errors.

Each finding has its test: a door's port taken (a real listener on
127.0.0.1), a certificate or key that does not load and one that expires
soon or has expired (certificates made here with ``cryptography``), a
database that cannot be reached and one whose schema is behind (real SQLite
files; a PostgreSQL URL to a closed port), a web directory missing, and a
door on a wildcard address without TLS (on a memory reactor: nothing binds
0.0.0.0 here).  The configuration is read from INI files, as the command reads
them.
"""

from __future__ import annotations

import datetime
import io
import os
import sys
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, utils
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoled.check import EXPIRY_WARNING_DAYS, run_check
from consoled.config import load_settings
from consoled.store import schema
from consoled.store.engine import make_engine
from tests.daemon import CHECKOUT, write_config
from tests.peers import HOST, free_port

#: When the certificates made here end; checks pass their own "now" before it.
NOT_AFTER = datetime.datetime(2031, 6, 1, 12, 0, tzinfo=datetime.UTC)


def _seconds(moment: datetime.datetime) -> float:
    return moment.timestamp()


def make_certificate(
    testcase: SynchronousTestCase, not_after: datetime.datetime = NOT_AFTER
) -> tuple[str, str]:
    """A self-signed certificate and its key in two PEM files; returns (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "console.test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - datetime.timedelta(days=365))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.abspath(testcase.mktemp())
    key_path = os.path.abspath(testcase.mktemp())
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


class CheckBase(TestCase):
    """run_check in process, on the real reactor, against INI files in the test's directory."""

    timeout = 60

    def setUp(self) -> None:
        self.state = os.path.abspath(self.mktemp())
        self.web = os.path.abspath(self.mktemp())
        os.makedirs(self.web)
        self.novnc = free_port()

    def config(self, extra: str = "", *, default: str = "", consoled: str = "") -> str:
        """One novnc door on 127.0.0.1 (its pages in a directory made here), no other
        door, the embedded database in the test's directory; ``extra`` appended."""
        return write_config(
            self,
            f"[DEFAULT]\nstate_path = {self.state}\nweb = {self.web}\n{default}"
            f"[vnc]\nnovncproxy_host = {HOST}\nnovncproxy_port = {self.novnc}\n"
            f"[consoled]\nxvp_enabled = false\n{consoled}{extra}",
        )

    @defer.inlineCallbacks
    def check(self, *config_files: str, now: float | None = None) -> Any:
        """(exit status, output lines) of a check of these files."""
        out = io.StringIO()
        settings = load_settings(list(config_files))
        status = yield run_check(settings, reactor, out, now=now)
        return status, out.getvalue().splitlines()

    def assertFinding(self, lines: list[str], prefix: str, *parts: str) -> str:
        """Exactly one line starts with ``prefix`` and holds every part; return it."""
        found = [
            line for line in lines if line.startswith(prefix) and all(p in line for p in parts)
        ]
        self.assertEqual(len(found), 1, lines)
        return found[0]


class CheckTests(CheckBase):
    @defer.inlineCallbacks
    def test_nothing_found(self) -> Any:
        """A configuration that starts: one ok line that names the database, the
        doors and TLS; exit 0; the embedded database is not created by the check."""
        status, lines = yield self.check(self.config())
        database = os.path.join(self.state, "consoled.sqlite")
        self.assertEqual(status, 0, lines)
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("ok: consoled would start: "), lines)
        self.assertIn(f"database sqlite:///{database} (embedded, not there yet", lines[0])
        self.assertIn(f"doors novnc {HOST}:{self.novnc}; TLS off", lines[0])
        self.assertFalse(os.path.exists(self.state))

    @defer.inlineCallbacks
    def test_port_taken(self) -> Any:
        """A door's port held by another listener: the daemon's own refusal line, exit 1,
        and the door bound before it is closed again."""
        holder = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface=HOST)
        self.addCleanup(holder.stopListening)
        taken = holder.getHost().port
        config = self.config(
            consoled=f"xvp_enabled = true\nxvp_host = {HOST}\nxvp_port = {taken}\n"
        )
        status, lines = yield self.check(config)
        self.assertEqual(status, 1, lines)
        self.assertFinding(
            lines,
            "error: xvp door: ",
            f"[consoled] xvp_port {taken} on {HOST}: address already in use",
            "set another [consoled] xvp_port",
        )
        self.assertTrue(lines[-1].startswith("consoled would not start (1 error, 0 warnings)"))
        # Nothing of the check is left listening: the novnc door's port binds again.
        again = reactor.listenTCP(self.novnc, Factory.forProtocol(Protocol), interface=HOST)
        yield again.stopListening()

    @defer.inlineCallbacks
    def test_two_doors_on_one_port(self) -> Any:
        """Two doors configured on one port: the second is refused, as at start-up."""
        config = self.config(
            consoled=f"xvp_enabled = true\nxvp_host = {HOST}\nxvp_port = {self.novnc}\n"
        )
        status, lines = yield self.check(config)
        self.assertEqual(status, 1, lines)
        self.assertFinding(lines, "error: xvp door: ", f"xvp_port {self.novnc}", "in use")

    @defer.inlineCallbacks
    def test_certificate_does_not_load(self) -> Any:
        """A certificate file with no certificate in it: the TLS layer's line, exit 1."""
        cert = os.path.abspath(self.mktemp())
        with open(cert, "w") as f:
            f.write("not a certificate\n")
        status, lines = yield self.check(self.config(default=f"ssl_only = true\ncert = {cert}\n"))
        self.assertEqual(status, 1, lines)
        self.assertFinding(lines, "error: ", f"no PEM certificate in TLS certificate file {cert}")
        self.assertIn("TLS not loaded", lines[-1])

    @defer.inlineCallbacks
    def test_key_does_not_load(self) -> Any:
        """A good certificate whose key file is missing: one error naming the key, exit 1."""
        cert, _ = make_certificate(self)
        key = os.path.abspath(self.mktemp())
        config = self.config(default=f"ssl_only = true\ncert = {cert}\nkey = {key}\n")
        status, lines = yield self.check(config)
        self.assertEqual(status, 1, lines)
        self.assertFinding(lines, "error: ", f"cannot read TLS key {key}")

    @defer.inlineCallbacks
    def test_certificate_expires_soon(self) -> Any:
        """A certificate ending within 30 days is a warning (exit 0); one ending later is not."""
        cert, key = make_certificate(self)
        config = self.config(default=f"ssl_only = true\ncert = {cert}\nkey = {key}\n")
        soon = NOT_AFTER - datetime.timedelta(days=12, hours=1)
        status, lines = yield self.check(config, now=_seconds(soon))
        self.assertEqual(status, 0, lines)
        self.assertFinding(
            lines,
            "warning: ",
            f"TLS certificate {cert} CN=console.test expires on 2031-06-01T12:00:00Z (in 12 days)",
        )
        self.assertTrue(lines[-1].startswith("consoled would start (0 errors, 1 warning)"), lines)
        later = NOT_AFTER - datetime.timedelta(days=EXPIRY_WARNING_DAYS + 1)
        status, lines = yield self.check(config, now=_seconds(later))
        self.assertEqual((status, len(lines)), (0, 1), lines)
        self.assertTrue(lines[0].startswith("ok: "), lines)
        self.assertIn(f"TLS from {cert}", lines[0])

    @defer.inlineCallbacks
    def test_certificate_expired(self) -> Any:
        """An expired certificate still loads (start-up goes on): a warning that says so."""
        cert, key = make_certificate(self)
        config = self.config(default=f"ssl_only = true\ncert = {cert}\nkey = {key}\n")
        after = NOT_AFTER + datetime.timedelta(days=2)
        status, lines = yield self.check(config, now=_seconds(after))
        self.assertEqual(status, 0, lines)
        self.assertFinding(lines, "warning: ", f"{cert}", "expired on 2031-06-01T12:00:00Z")

    @defer.inlineCallbacks
    def test_vencrypt_material_does_not_load(self) -> Any:
        """VeNCrypt asked for without its CA: the backends' start-up line, exit 1."""
        status, lines = yield self.check(self.config("[vnc]\nauth_schemes = vencrypt\n"))
        self.assertEqual(status, 1, lines)
        self.assertFinding(
            lines, "error: [vnc] auth_schemes lists vencrypt but [vnc] vencrypt_ca_certs is not set"
        )

    @defer.inlineCallbacks
    def test_vencrypt_client_certificate_expires_soon(self) -> Any:
        """consoled's VeNCrypt client certificate ending within 30 days: a warning, exit 0."""
        cert, key = make_certificate(self)
        config = self.config(
            f"[vnc]\nauth_schemes = vencrypt\nvencrypt_ca_certs = {cert}\n"
            f"vencrypt_client_cert = {cert}\nvencrypt_client_key = {key}\n"
        )
        soon = NOT_AFTER - datetime.timedelta(days=3, hours=1)
        status, lines = yield self.check(config, now=_seconds(soon))
        self.assertEqual(status, 0, lines)
        self.assertFinding(
            lines,
            f"warning: [vnc] vencrypt_client_cert {cert} CN=console.test expires on",
            "(in 3 days); replace it and restart consoled",
        )

    @defer.inlineCallbacks
    def test_database_unreachable(self) -> Any:
        """A database where nothing listens: start-up's line, the password hidden, exit 1."""
        port = free_port()
        url = f"postgresql://consoled:s3cret@{HOST}:{port}/consoled"
        status, lines = yield self.check(self.config(f"[database]\nconnection = {url}\n"))
        self.assertEqual(status, 1, lines)
        self.assertFinding(
            lines,
            "error: ",
            f"cannot use the database postgresql+psycopg://consoled:***@{HOST}:{port}/",
        )
        self.assertNotIn("s3cret", "\n".join(lines))

    @defer.inlineCallbacks
    def test_database_url_unparsable(self) -> Any:
        """A [database] connection that is no URL: the daemon's line naming the option."""
        status, lines = yield self.check(self.config("[database]\nconnection = not a url\n"))
        self.assertEqual(status, 1, lines)
        self.assertFinding(lines, "error: [database] connection: cannot open the database")

    @defer.inlineCallbacks
    def test_schema_behind(self) -> Any:
        """A configured database behind head: the line naming `consoled-manage db upgrade`, exit 1."""
        path = os.path.abspath(self.mktemp()) + ".sqlite"
        engine = make_engine(f"sqlite:///{path}")
        schema.upgrade(engine, "001")
        engine.dispose()
        status, lines = yield self.check(
            self.config(f"[database]\nconnection = sqlite:///{path}\n")
        )
        self.assertEqual(status, 1, lines)
        self.assertFinding(
            lines, "error: database schema is at revision 001", "consoled-manage db upgrade"
        )
        self.assertIn(f"database sqlite:///{path}", lines[-1])

    @defer.inlineCallbacks
    def test_embedded_schema_behind_is_no_finding(self) -> Any:
        """The embedded default behind head is upgraded by start-up: no finding, the
        summary says so, and the check itself leaves it as it was."""
        os.makedirs(self.state)
        engine = make_engine(f"sqlite:///{os.path.join(self.state, 'consoled.sqlite')}")
        schema.upgrade(engine, "001")
        status, lines = yield self.check(self.config())
        self.assertEqual((status, len(lines)), (0, 1), lines)
        head = schema.head_revision()
        self.assertIn(f"(embedded, schema 001: start-up upgrades it to {head})", lines[0])
        self.assertEqual(schema.current_revision(engine), "001")
        engine.dispose()

    @defer.inlineCallbacks
    def test_web_directory_missing(self) -> Any:
        """An enabled door's web directory missing: the daemon's refusal line, exit 1."""
        os.rmdir(self.web)
        status, lines = yield self.check(self.config())
        self.assertEqual(status, 1, lines)
        self.assertFinding(
            lines,
            "error: novnc door: ",
            f"[DEFAULT] web {self.web}: no such directory",
            "apt-get install novnc",
        )

    @defer.inlineCallbacks
    def test_xterm_missing_for_the_serial_page(self) -> Any:
        """The serial door with consoled's own page needs xterm.js: its option is named."""
        xterm = os.path.abspath(self.mktemp())
        serial = free_port()
        config = self.config(
            f"[serial_console]\nenabled = true\nserialproxy_host = {HOST}\n"
            f"serialproxy_port = {serial}\n[consoled]\nxterm_dir = {xterm}\n"
        )
        status, lines = yield self.check(config)
        self.assertEqual(status, 1, lines)
        self.assertFinding(lines, "error: serial door: ", f"[consoled] xterm_dir {xterm}", "npm")

    @defer.inlineCallbacks
    def test_serial_web_missing(self) -> Any:
        """A serial page directory of the operator's that is missing: its option is named,
        and xterm.js is not asked for (the page is the operator's)."""
        serial_web = os.path.abspath(self.mktemp())
        config = self.config(
            f"[serial_console]\nenabled = true\nserialproxy_host = {HOST}\n"
            f"serialproxy_port = {free_port()}\n[consoled]\nserial_web = {serial_web}\n"
            f"xterm_dir = {os.path.abspath(self.mktemp())}\n"
        )
        status, lines = yield self.check(config)
        self.assertEqual(status, 1, lines)
        self.assertFinding(lines, "error: serial door: ", f"[consoled] serial_web {serial_web}")
        self.assertEqual([line for line in lines if "xterm_dir" in line], [])


class WildcardTests(SynchronousTestCase):
    """Doors on 0.0.0.0 or :: without TLS, bound on a memory reactor (nothing really binds)."""

    def check(self, text: str) -> tuple[int, list[str], MemoryReactorClock]:
        memory = MemoryReactorClock()
        state = os.path.abspath(self.mktemp())
        web = os.path.abspath(self.mktemp())
        os.makedirs(web)
        config = write_config(self, f"[DEFAULT]\nstate_path = {state}\nweb = {web}\n{text}")
        out = io.StringIO()
        status = self.successResultOf(run_check(load_settings([config]), memory, out))
        return status, out.getvalue().splitlines(), memory

    def test_wildcard_without_tls(self) -> None:
        """A door on 0.0.0.0 (and one on ::) serving no TLS: a warning each, exit 0."""
        status, lines, memory = self.check(
            "[vnc]\nnovncproxy_host = 0.0.0.0\nnovncproxy_port = 16080\n"
            "[consoled]\nxvp_host = ::\nxvp_port = 16081\n"
        )
        self.assertEqual(status, 0, lines)
        self.assertEqual([(port, iface) for port, _, _, iface in memory.tcpServers],
                         [(16080, "0.0.0.0"), (16081, "::")])  # fmt: skip
        self.assertFinding(
            lines,
            "warning: novnc door listens on 0.0.0.0:16080 without TLS",
            "set [DEFAULT] cert and key for TLS, or set [vnc] novncproxy_host",
        )
        self.assertFinding(lines, "warning: xvp door listens on :::16081 without TLS")
        self.assertTrue(lines[-1].startswith("consoled would start (0 errors, 2 warnings)"))

    def test_wildcard_with_tls(self) -> None:
        """With TLS the websocket and XVP doors on 0.0.0.0 are no finding; the raw serial
        door, plain unless ssl_only, is, with ssl_only as its remedy."""
        cert, key = make_certificate(
            self, datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365)
        )
        status, lines, _ = self.check(
            f"cert = {cert}\nkey = {key}\n"
            "[vnc]\nnovncproxy_port = 16080\n"
            "[consoled]\nxvp_port = 16081\nserial_tcp_enabled = true\nserial_tcp_port = 16084\n"
        )
        self.assertEqual(status, 0, lines)
        self.assertEqual(len(lines), 2, lines)
        self.assertFinding(
            lines,
            "warning: serial-tcp door listens on 0.0.0.0:16084 without TLS",
            "ssl_only = true",
        )

    def assertFinding(self, lines: list[str], prefix: str, *parts: str) -> None:
        found = [
            line for line in lines if line.startswith(prefix) and all(p in line for p in parts)
        ]
        self.assertEqual(len(found), 1, lines)


class CommandLineTests(TestCase):
    """``consoled-manage check`` as a process: its exit status and output."""

    timeout = 60

    @defer.inlineCallbacks
    def manage(self, *argv: str, cwd: str = CHECKOUT) -> Any:
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable,
            ["-m", "consoled.manage", *argv],
            env={**os.environ, "PYTHONPATH": CHECKOUT},
            path=cwd,
        )
        return out.decode(), err.decode(), code

    @defer.inlineCallbacks
    def test_exit_status(self) -> Any:
        """Exit 1 when start-up would refuse (a port taken), 0 with nothing found; the
        ok line names the embedded database below the working directory."""
        holder = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface=HOST)
        self.addCleanup(holder.stopListening)
        web = os.path.abspath(self.mktemp())
        os.makedirs(web)
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        base = f"[DEFAULT]\nweb = {web}\n[consoled]\nxvp_enabled = false\n[vnc]\nnovncproxy_host = {HOST}\n"
        taken = write_config(self, f"{base}novncproxy_port = {holder.getHost().port}\n")
        out, err, code = yield self.manage("--config-file", taken, "check", cwd=cwd)
        self.assertEqual(code, 1, (out, err))
        self.assertIn("error: novnc door: [vnc] novncproxy_port", out)
        free = write_config(self, f"{base}novncproxy_port = {free_port()}\n")
        out, err, code = yield self.manage("--config-file", free, "check", cwd=cwd)
        self.assertEqual((code, err), (0, ""), out)
        database = os.path.join(cwd, "var", "consoled.sqlite")
        self.assertTrue(
            out.startswith(
                f"ok: consoled would start: database sqlite:///{database} (embedded, relative "
                f"to the working directory {cwd}, not there yet: start-up creates it"
            ),
            out,
        )
        self.assertFalse(os.path.exists(os.path.join(cwd, "var")))
