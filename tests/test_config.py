"""Tests for consoled.config: nova.conf read as it is, typed and frozen."""

from __future__ import annotations

import dataclasses
import ipaddress
import textwrap

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from consoled.config import CONSOLE_TYPES, ConfigError, Settings, load_settings

SECRET = "s3cr3t-Pa55w0rd"

NOVA_CONF = f"""\
[DEFAULT]
transport_url = rabbit://nova:{SECRET}@rabbit.example:5672/
my_ip = 192.0.2.10
debug = True
state_path = /var/lib/nova
ssl_only = false
web = /usr/share/novnc

[api_database]
connection = mysql+pymysql://nova_api:{SECRET}@db.example/nova_api

[database]
connection = mysql+pymysql://nova:{SECRET}@db.example/nova_cell1
max_pool_size = 20

[keystone_authtoken]
auth_url = https://keystone.example:5000/v3
password = {SECRET}
username = nova

[vnc]
enabled = true
server_listen = 0.0.0.0
server_proxyclient_address = 192.0.2.10
novncproxy_host = 192.0.2.5
novncproxy_base_url = https://cloud.example:6080/vnc_lite.html
auth_schemes = vencrypt, none
vencrypt_client_key = /etc/pki/nova-novncproxy/client-key.pem
vencrypt_client_cert = /etc/pki/nova-novncproxy/client-cert.pem
vencrypt_ca_certs = /etc/pki/nova-novncproxy/ca-cert.pem

[serial_console]
enabled = true
base_url = wss://cloud.example:6083/
port_range = 10000:10100
proxyclient_address = 192.0.2.10

[consoleauth]
token_ttl = 900

[console]
allowed_origins = cloud.example, dashboard.example
ssl_minimum_version = tlsv1_2
"""


class ConfigTestsMixin:
    """Writing INI text to temporary files and capturing log events."""

    def write(self: SynchronousTestCase, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))
        return path

    def load(self, *texts: str) -> tuple[Settings, list[dict]]:
        events: list[dict] = []
        paths = [self.write(text) for text in texts]
        return load_settings(paths, Logger(observer=events.append)), events

    def loadError(self: SynchronousTestCase, text: str) -> tuple[ConfigError, str]:
        path = self.write(text)
        return self.assertRaises(ConfigError, load_settings, [path]), path


class DefaultsTests(SynchronousTestCase):
    """Settings() is nova's defaults, and so is reading no file at all."""

    def test_novaDefaults(self) -> None:
        """Every option nova has defaults to nova's own default."""
        s = Settings()
        self.assertIsNone(s.database.connection)
        self.assertEqual(s.database.connection_recycle_time, 3600)
        self.assertEqual(s.consoleauth.token_ttl, 600)
        self.assertFalse(s.consoleauth.enforce_session_timeout)
        self.assertEqual(s.console.allowed_origins, ())
        self.assertIsNone(s.console.ssl_ciphers)
        self.assertEqual(s.console.ssl_minimum_version, "default")
        self.assertTrue(s.vnc.enabled)
        self.assertEqual((s.vnc.novncproxy_host, s.vnc.novncproxy_port), ("0.0.0.0", 6080))
        self.assertEqual(s.vnc.novncproxy_base_url, "http://127.0.0.1:6080/vnc_lite.html")
        self.assertEqual(s.vnc.auth_schemes, ("none",))
        self.assertFalse(s.serial_console.enabled)
        self.assertEqual(s.serial_console.serialproxy_port, 6083)
        self.assertEqual(s.serial_console.base_url, "http://127.0.0.1:6083/serial.html")
        self.assertEqual(s.serial_console.port_range, (10000, 20000))
        self.assertFalse(s.spice.enabled)
        self.assertEqual(s.spice.html5proxy_port, 6082)
        self.assertEqual(s.spice.html5proxy_base_url, "http://127.0.0.1:6082/spice_auto.html")
        self.assertFalse(s.mks.enabled)
        self.assertEqual(s.mks.mksproxy_base_url, "http://127.0.0.1:6090/")
        self.assertFalse(s.default.ssl_only)
        self.assertEqual(s.default.cert, "self.pem")
        self.assertIsNone(s.default.key)
        self.assertEqual(s.default.web, "/usr/share/novnc")
        self.assertIsNone(s.default.record)
        self.assertFalse(s.default.source_is_ipv6)
        self.assertFalse(s.workarounds.enable_consoleauth)

    def test_consoledDefaults(self) -> None:
        """consoled's own options default to the documented values."""
        c = Settings().consoled
        self.assertEqual((c.db_threads, c.workers), (4, 1))
        self.assertEqual((c.xvp_host, c.xvp_port), ("0.0.0.0", 6081))
        self.assertEqual((c.serial_tcp_enabled, c.serial_tcp_port), (False, 6084))
        self.assertEqual((c.touch_interval, c.lease_seconds), (10.0, 30.0))
        self.assertEqual(c.token_ttl_by_type, ())
        self.assertEqual(c.trusted_proxies, ())

    def test_noFilesIsDefaults(self) -> None:
        """load_settings([]) equals Settings()."""
        self.assertEqual(load_settings([]), Settings())

    def test_frozen(self) -> None:
        """Neither Settings nor a group can be changed once made."""
        s = Settings()
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, s, "vnc", None)
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, s.vnc, "novncproxy_port", 1)


class ReadingTests(ConfigTestsMixin, SynchronousTestCase):
    """How files are read and combined."""

    def test_realNovaConf(self) -> None:
        """A realistic nova.conf loads as it is: known options typed, the rest
        ignored."""
        s, _ = self.load(NOVA_CONF)
        self.assertEqual(
            s.database.connection,
            f"mysql+pymysql://nova:{SECRET}@db.example/nova_cell1",
        )
        self.assertEqual(s.database.max_pool_size, 20)
        self.assertTrue(s.default.debug)
        self.assertEqual(s.default.state_path, "/var/lib/nova")
        self.assertEqual(s.vnc.novncproxy_host, "192.0.2.5")
        self.assertEqual(s.vnc.auth_schemes, ("vencrypt", "none"))
        self.assertEqual(s.vnc.vencrypt_ca_certs, "/etc/pki/nova-novncproxy/ca-cert.pem")
        self.assertTrue(s.serial_console.enabled)
        self.assertEqual(s.serial_console.port_range, (10000, 10100))
        self.assertEqual(s.consoleauth.token_ttl, 900)
        self.assertEqual(s.console.allowed_origins, ("cloud.example", "dashboard.example"))
        self.assertEqual(s.console.ssl_minimum_version, "tlsv1_2")

    def test_unknownIgnoredWithDebug(self) -> None:
        """Unknown groups and options each give a debug event naming group and
        option."""
        _, events = self.load(NOVA_CONF)
        named = {(e["group"], e["option"]) for e in events}
        self.assertIn(("keystone_authtoken", "password"), named)
        self.assertIn(("api_database", "connection"), named)
        self.assertIn(("DEFAULT", "transport_url"), named)
        self.assertIn(("vnc", "server_listen"), named)
        self.assertEqual({e["log_level"].name for e in events}, {"debug"})

    def test_secretsNeverLogged(self) -> None:
        """No captured log event, raw or formatted, holds a secret value."""
        _, events = self.load(NOVA_CONF)
        self.assertTrue(events)
        for event in events:
            self.assertNotIn(SECRET, repr(event))
            self.assertNotIn(SECRET, formatEvent(event))

    def test_laterFileWins(self) -> None:
        """A later file overrides an earlier one option by option; options it
        does not name keep the earlier value."""
        s, _ = self.load(
            "[vnc]\nnovncproxy_host = 10.0.0.1\nnovncproxy_port = 7000\n",
            "[vnc]\nnovncproxy_port = 7001\n",
        )
        self.assertEqual(s.vnc.novncproxy_host, "10.0.0.1")
        self.assertEqual(s.vnc.novncproxy_port, 7001)

    def test_dashesInNames(self) -> None:
        """'-' in option and group names reads as '_'."""
        s, _ = self.load("[serial-console]\nserialproxy-port = 7083\nenabled = on\n")
        self.assertEqual(s.serial_console.serialproxy_port, 7083)
        self.assertTrue(s.serial_console.enabled)

    def test_defaultDoesNotLeak(self) -> None:
        """Keys in [DEFAULT] are [DEFAULT]'s only: they do not set the option of
        the same name in another group."""
        s, events = self.load(
            """\
            [DEFAULT]
            enabled = true
            token_ttl = 5
            base_url = ws://wrong/
            [spice]
            html5proxy_port = 7082
            [serial_console]
            """
        )
        self.assertFalse(s.spice.enabled)
        self.assertFalse(s.serial_console.enabled)
        self.assertEqual(s.consoleauth.token_ttl, 600)
        self.assertEqual(s.serial_console.base_url, "http://127.0.0.1:6083/serial.html")
        self.assertIn(("DEFAULT", "enabled"), {(e["group"], e["option"]) for e in events})

    def test_booleanSpellings(self) -> None:
        """Booleans accept true/false, yes/no, on/off, 1/0 in any case."""
        for text, value in [
            ("TRUE", True), ("Yes", True), ("on", True), ("1", True),
            ("False", False), ("NO", False), ("Off", False), ("0", False),
        ]:  # fmt: skip
            s, _ = self.load(f"[spice]\nenabled = {text}\n")
            self.assertIs(s.spice.enabled, value, text)

    def test_listsAndQuotes(self) -> None:
        """Lists are comma-separated with blanks dropped; one pair of quotes
        around a value is removed, as oslo.config does."""
        s, _ = self.load(
            '[console]\nallowed_origins = a.example , ,b.example,\n[DEFAULT]\nweb = "/srv/novnc"\n'
        )
        self.assertEqual(s.console.allowed_origins, ("a.example", "b.example"))
        self.assertEqual(s.default.web, "/srv/novnc")

    def test_emptyMeansUnset(self) -> None:
        """An empty value sets an option whose default is None back to None."""
        s, _ = self.load("[database]\nconnection = sqlite:///a.db\n", "[database]\nconnection =\n")
        self.assertIsNone(s.database.connection)

    def test_consoledOptions(self) -> None:
        """[consoled]'s custom types parse: TTL pairs, networks, seconds."""
        s, _ = self.load(
            """\
            [consoled]
            token_ttl_by_type = serial:60, novnc : 120
            trusted_proxies = 10.1.2.3/8, 2001:db8::1
            ping_interval = 0
            idle_timeout = 2.5
            """
        )
        c = s.consoled
        self.assertEqual(c.token_ttl_by_type, (("serial", 60), ("novnc", 120)))
        self.assertEqual(
            c.trusted_proxies,
            (
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("2001:db8::1/128"),
            ),
        )
        self.assertEqual((c.ping_interval, c.idle_timeout), (0.0, 2.5))

    @given(st.integers(1, 65535), st.booleans())
    def test_roundTrip(self, port: int, enabled: bool) -> None:
        """Any valid port and boolean written to a file reads back the same."""
        s, _ = self.load(f"[spice]\nhtml5proxy_port = {port}\nenabled = {enabled}\n")
        self.assertEqual((s.spice.html5proxy_port, s.spice.enabled), (port, enabled))


class ErrorTests(ConfigTestsMixin, SynchronousTestCase):
    """Every error names the file, the group and the option."""

    def assertBad(self, group: str, option: str, value: str, wanted: str) -> None:
        err, path = self.loadError(f"[{group}]\n{option} = {value}\n")
        self.assertEqual((err.path, err.group, err.option), (path, group, option))
        self.assertIn(wanted, err.message)
        self.assertEqual(str(err), f"{path}: [{group}] {option}: {err.message}")
        self.assertNotIn("\n", str(err))

    def test_exactMessage(self) -> None:
        """A bad port reads as one line naming file, group, option and range."""
        err, path = self.loadError("[vnc]\nnovncproxy_port = abc\n")
        self.assertEqual(
            str(err),
            f"{path}: [vnc] novncproxy_port: expected an integer from 1 to 65535, got 'abc'",
        )

    def test_badValues(self) -> None:
        """Each kind of value is checked and its error says what was expected."""
        self.assertBad("consoleauth", "token_ttl", "0", "at least 1")
        self.assertBad("consoleauth", "token_ttl", "ten", "an integer")
        self.assertBad("spice", "enabled", "maybe", "yes/no")
        self.assertBad("spice", "html5proxy_port", "70000", "1 to 65535")
        self.assertBad("console", "ssl_minimum_version", "sslv3", "tlsv1_2")
        self.assertBad("vnc", "auth_schemes", "none, vnc", "vencrypt")
        self.assertBad("vnc", "auth_schemes", "", "at least one")
        self.assertBad("serial_console", "port_range", "20000:10000", "low < high")
        self.assertBad("serial_console", "port_range", "10000", "low:high")
        self.assertBad("serial_console", "port_range", "0:10", "low:high")
        self.assertBad("consoled", "token_ttl_by_type", "rdp:60", "type:seconds")
        self.assertBad("consoled", "token_ttl_by_type", "serial:0", "seconds >= 1")
        self.assertBad("consoled", "token_ttl_by_type", "novnc", "type:seconds")
        self.assertBad("consoled", "token_ttl_by_type", "serial:1,serial:2", "once")
        self.assertBad("consoled", "trusted_proxies", "10.0.0.1, proxy", "networks")
        self.assertBad("consoled", "connect_timeout", "0", "above 0")
        self.assertBad("consoled", "idle_timeout", "-1", "0 or more")
        self.assertBad("consoled", "ping_interval", "inf", "seconds")
        self.assertBad("consoled", "workers", "65", "1 to 64")

    def test_leaseMustOutlastTouch(self) -> None:
        """lease_seconds not above touch_interval is an error naming the file."""
        self.assertBad("consoled", "lease_seconds", "10", "touch_interval")

    def test_ruleNamesFileOfOtherOption(self) -> None:
        """A rule broken by the option it does not name still names the file
        that broke it."""
        err, path = self.loadError("[consoled]\ntouch_interval = 40\n")
        self.assertEqual((err.path, err.option), (path, "lease_seconds"))

    def test_sslOnly(self) -> None:
        """ssl_only with the default cert loads (existence is the TLS layer's
        job); ssl_only with cert emptied is an error."""
        s, _ = self.load("[DEFAULT]\nssl_only = true\n")
        self.assertEqual((s.default.ssl_only, s.default.cert), (True, "self.pem"))
        err, path = self.loadError("[DEFAULT]\nssl_only = true\ncert =\n")
        self.assertEqual((err.path, err.group, err.option), (path, "DEFAULT", "cert"))
        self.assertIn("ssl_only", str(err))
        self.assertBad("DEFAULT", "ssl_only", "sure", "true/false")

    def test_missingFile(self) -> None:
        """A file that cannot be read is an error naming it."""
        path = self.mktemp()
        err = self.assertRaises(ConfigError, load_settings, [path])
        self.assertEqual((err.path, err.group, err.option), (path, None, None))
        self.assertTrue(str(err).startswith(f"{path}: "))

    def test_syntaxErrors(self) -> None:
        """INI syntax errors name the file and line but never quote the line,
        which may hold a secret."""
        for text, line in [
            (f"password = {SECRET}\n", 1),
            (f"[keystone_authtoken]\nusername = nova\npassword {SECRET}\n", 3),
        ]:
            err, path = self.loadError(text)
            self.assertEqual(err.path, path)
            self.assertIn(f"line {line}", str(err))
            self.assertNotIn(SECRET, str(err))

    def test_notUtf8(self) -> None:
        """A file that is not UTF-8 text is an error naming it."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"[vnc]\nnovncproxy_host = \xff\xfe\n")
        err = self.assertRaises(ConfigError, load_settings, [path])
        self.assertEqual(err.path, path)


class DerivedTests(ConfigTestsMixin, SynchronousTestCase):
    """Values worked out from several options."""

    def test_accessUrlBase(self) -> None:
        """Each console type maps to its own base URL option."""
        s, _ = self.load(
            """\
            [vnc]
            novncproxy_base_url = https://c/vnc_lite.html
            [spice]
            html5proxy_base_url = https://c/spice_auto.html
            [serial_console]
            base_url = wss://c/serial/
            [mks]
            mksproxy_base_url = https://c/mks/
            [consoled]
            xvp_base_url = https://c/xvp
            """
        )
        self.assertEqual(
            [s.access_url_base(t) for t in CONSOLE_TYPES],
            [
                "https://c/vnc_lite.html",
                "https://c/spice_auto.html",
                "wss://c/serial/",
                "https://c/mks/",
                "https://c/xvp",
            ],
        )
        self.assertRaises(ValueError, s.access_url_base, "rdp-html5")

    def test_accessUrlBaseSslOnly(self) -> None:
        """With ssl_only the built-in defaults are handed out as https (the
        doors speak TLS only); a base URL the operator set is kept as set."""
        s, _ = self.load("[DEFAULT]\nssl_only = true\n[spice]\nhtml5proxy_base_url = http://c/s\n")
        self.assertEqual(
            [s.access_url_base(t) for t in CONSOLE_TYPES],
            [
                "https://127.0.0.1:6080/vnc_lite.html",
                "http://c/s",
                "https://127.0.0.1:6083/serial.html",
                "https://127.0.0.1:6090/",
                "https://127.0.0.1:6081/console",
            ],
        )
        plain, _ = self.load("[DEFAULT]\nssl_only = false\n")
        self.assertEqual(plain.access_url_base("novnc"), "http://127.0.0.1:6080/vnc_lite.html")

    def test_tokenTtl(self) -> None:
        """token_ttl_by_type overrides [consoleauth] token_ttl for its types
        only."""
        s, _ = self.load(
            "[consoleauth]\ntoken_ttl = 300\n",
            "[consoled]\ntoken_ttl_by_type = serial:30\n",
        )
        self.assertEqual(s.token_ttl("serial"), 30)
        self.assertEqual(s.token_ttl("novnc"), 300)
        self.assertEqual(Settings().token_ttl("xvpvnc"), 600)
        self.assertRaises(ValueError, s.token_ttl, "rdp-html5")

    def test_xvpFallback(self) -> None:
        """nova's old [vnc] xvpvncproxy_* options fill [consoled] xvp_* unless
        those are set, in any file."""
        s, _ = self.load(
            "[consoled]\nxvp_port = 7081\n",
            """\
            [vnc]
            xvpvncproxy_host = 10.0.0.9
            xvpvncproxy_port = 6999
            xvpvncproxy_base_url = https://c/console
            """,
        )
        self.assertEqual(s.consoled.xvp_host, "10.0.0.9")
        self.assertEqual(s.consoled.xvp_port, 7081)
        self.assertEqual(s.consoled.xvp_base_url, "https://c/console")
        self.assertEqual(s.access_url_base("xvpvnc"), "https://c/console")

    def test_doorsFollowNova(self) -> None:
        """The noVNC, SPICE and serial doors follow nova's enabled flags unless
        [consoled] sets them."""
        s, _ = self.load("[spice]\nenabled = true\n[serial_console]\nenabled = yes\n")
        self.assertEqual(
            (s.novnc_door_enabled, s.spice_door_enabled, s.serial_door_enabled),
            (True, True, True),
        )
        s, _ = self.load(
            "[spice]\nenabled = true\n[consoled]\nspice_enabled = false\nnovnc_enabled = false\n"
        )
        self.assertEqual(
            (s.novnc_door_enabled, s.spice_door_enabled, s.serial_door_enabled),
            (False, False, False),
        )
