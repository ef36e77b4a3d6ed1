"""consoled-manage: the commands, and one clear line for every bad input."""

from __future__ import annotations

import io
import os
import sys
import uuid
from typing import Any

from twisted.internet import defer, utils
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoled.config import Settings, load_settings
from consoled.manage import CommandError, build_parser, run
from consoled.store import Store, schema
from consoled.store.engine import make_engine
from consoled.store.runner import InlineRunner
from consoled.tokens import hash_token
from tests.databases import fresh_database, upgraded_engine

INSTANCE = "9b2c4f0e-3d1a-4c5b-8e7f-0a1b2c3d4e5f"
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CommandBase(SynchronousTestCase):
    """The commands against a real SQLite store, in process."""

    def setUp(self) -> None:
        self.engine = upgraded_engine(self, fresh_database(self, "sqlite"))
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = Store(self.engine, InlineRunner(), self.clock)
        self.settings = Settings()

    def manage(self, *argv: str) -> str:
        out = io.StringIO()
        args = build_parser().parse_args(list(argv))
        self.successResultOf(run(args, self.settings, self.store, False, out))
        return out.getvalue()

    def create(self, *extra: str) -> str:
        return self.manage(
            "token",
            "create",
            "--instance",
            INSTANCE,
            "--host",
            "10.1.2.3",
            "--port",
            "5901",
            *extra,
        ).strip()


class CommandTests(CommandBase):
    def test_create_prints_novnc_url(self) -> None:
        """token create prints nova's noVNC access URL built on [vnc] novncproxy_base_url."""
        url = self.create("--type", "novnc")
        prefix = "http://127.0.0.1:6080/vnc_lite.html?path=%3Ftoken%3D"
        self.assertTrue(url.startswith(prefix), url)
        token = url[len(prefix) :]
        info = self.successResultOf(self.store.find_token(hash_token(token)))
        self.assertEqual((info.host, info.port, info.expires), ("10.1.2.3", 5901, 1_800_000_600))

    def test_create_xvp_with_ttl_and_path(self) -> None:
        """--ttl and --internal-access-path are stored; xvpvnc gets the /console URL."""
        url = self.create("--type", "xvpvnc", "--ttl", "30", "--internal-access-path", "/c?ref=9")
        self.assertTrue(url.startswith("http://127.0.0.1:6081/console?token="), url)
        info = self.successResultOf(self.store.find_token(hash_token(url.split("token=")[1])))
        self.assertEqual((info.expires, info.internal_access_path), (1_800_000_030, "/c?ref=9"))

    def test_show_never_prints_the_token(self) -> None:
        """token show prints the connection details and the hash prefix, not the token."""
        token = self.create("--type", "serial").split("token=")[1]
        shown = self.manage("token", "show", token)
        self.assertNotIn(token, shown)
        self.assertIn(hash_token(token)[:8], shown)
        self.assertIn("10.1.2.3", shown)
        self.assertIn("in 600s", shown)

    def test_show_unknown(self) -> None:
        """token show of an unknown token fails with a CommandError."""
        args = build_parser().parse_args(["token", "show", str(uuid.uuid4())])
        failure = self.failureResultOf(run(args, self.settings, self.store, False, io.StringIO()))
        failure.trap(CommandError)

    def test_list_revoke_clean(self) -> None:
        """list shows hash prefixes; revoke removes an instance's; clean removes the expired."""
        token = self.create("--type", "novnc", "--ttl", "5").split("%3D")[1]
        self.create("--type", "spice-html5")
        listing = self.manage("token", "list", "--instance", INSTANCE)
        self.assertIn(hash_token(token)[:8], listing)
        self.assertNotIn(token, listing)
        self.assertEqual(len(listing.strip().splitlines()), 3)
        self.clock.advance(10)
        self.assertIn("(expired)", self.manage("token", "list"))
        self.assertEqual(self.manage("token", "clean"), "deleted 1 expired token(s)\n")
        self.assertIn("revoked 1 token(s)", self.manage("token", "revoke", "--instance", INSTANCE))

    def test_schema_behind_is_refused(self) -> None:
        """Token commands refuse a database that is not at head (it is not the embedded one)."""
        schema.downgrade(self.engine, "001")
        args = build_parser().parse_args(["token", "list"])
        failure = self.failureResultOf(run(args, self.settings, self.store, False, io.StringIO()))
        failure.trap(schema.SchemaBehind)


class CommandLineTests(TestCase):
    """consoled-manage as a process: exit codes and one-line errors, never a traceback."""

    timeout = 60

    def config(self, connection: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(f"[database]\nconnection = {connection}\n")
        return path

    @defer.inlineCallbacks
    def manage(self, *argv: str) -> Any:
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable,
            ["-m", "consoled.manage", *argv],
            env={**os.environ, "PYTHONPATH": CHECKOUT},
            path=CHECKOUT,
        )
        return out.decode(), err.decode(), code

    @defer.inlineCallbacks
    def assertOneLineError(self, argv: list[str], code: int, *needles: str) -> Any:
        out, err, status = yield self.manage(*argv)
        self.assertEqual(status, code, (out, err))
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertNotIn("Traceback", err)
        for needle in needles:
            self.assertIn(needle, err)

    @defer.inlineCallbacks
    def test_upgrade_version_create(self) -> Any:
        """db upgrade then token create on a fresh SQLite file, as an operator does."""
        config = self.config(f"sqlite:///{os.path.abspath(self.mktemp())}")
        out, err, code = yield self.manage("--config-file", config, "db", "version")
        self.assertEqual((out.split()[0], code), ("none", 0), err)
        out, err, code = yield self.manage("--config-file", config, "db", "upgrade")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(schema.head_revision()), out)
        out, err, code = yield self.manage(
            "--config-file",
            config,
            "token",
            "create",
            "--instance",
            INSTANCE,
            "--type",
            "serial",
            "--host",
            "h",
            "--port",
            "10000",
        )
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith("http://127.0.0.1:6083/serial.html?token="), out)

    @defer.inlineCallbacks
    def test_bad_inputs(self) -> Any:
        """Malformed UUID, bad port, unknown type: one line each, exit 2."""
        base = ["token", "create", "--host", "h"]
        yield self.assertOneLineError(
            [*base, "--instance", "nope", "--type", "novnc", "--port", "1"], 2, "not a UUID"
        )
        yield self.assertOneLineError(
            [*base, "--instance", INSTANCE, "--type", "novnc", "--port", "70000"], 2, "1 to 65535"
        )
        yield self.assertOneLineError(
            [*base, "--instance", INSTANCE, "--type", "rdp", "--port", "1"], 2, "rdp"
        )

    @defer.inlineCallbacks
    def test_database_unreachable(self) -> Any:
        """A database that cannot be reached: one line naming it, password hidden, exit 1."""
        config = self.config("postgresql://consoled:s3cret@127.0.0.1:1/nova")
        out, err, code = yield self.manage("--config-file", config, "token", "list")
        self.assertEqual(code, 1, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("127.0.0.1:1/nova", err)
        self.assertNotIn("s3cret", err)

    @defer.inlineCallbacks
    def test_schema_behind(self) -> Any:
        """A database behind head: one line naming `consoled-manage db upgrade`, exit 1."""
        url = f"sqlite:///{os.path.abspath(self.mktemp())}"
        engine = make_engine(url)
        schema.upgrade(engine, "001")
        engine.dispose()
        yield self.assertOneLineError(
            ["--config-file", self.config(url), "token", "list"], 1, "consoled-manage db upgrade"
        )

    @defer.inlineCallbacks
    def test_bad_config(self) -> Any:
        """A bad value in a config file: one line naming file, group and option, exit 2."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("[consoleauth]\ntoken_ttl = soon\n")
        yield self.assertOneLineError(
            ["--config-file", path, "token", "list"], 2, path, "[consoleauth]", "token_ttl"
        )


class EmbeddedDefaultTests(SynchronousTestCase):
    def test_embedded_default_upgrades_itself(self) -> None:
        """With no [database] connection the CLI creates the embedded SQLite file at head."""
        state = os.path.abspath(self.mktemp())
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"[DEFAULT]\nstate_path = {state}\n")
        settings = load_settings([path])
        from twisted.internet import reactor

        from consoled.store import open_store

        store, embedded = open_store(None, reactor, state_path=settings.default.state_path)
        self.assertTrue(embedded)
        self.assertEqual(store.engine.url.database, os.path.join(state, "consoled.sqlite"))
        store.engine.dispose()


class SessionCommandTests(CommandBase):
    """session list and kick, against rows a proxy wrote."""

    def open_row(self, instance: str = INSTANCE) -> int:
        info = self.successResultOf(
            self.store.lookup(self.create("--type", "serial").split("token=")[1])
        )
        return self.successResultOf(
            self.store.open_session(
                info=info, door="serial-tcp", client_address="192.0.2.7", proxy="px"
            )
        )

    def test_list_and_kick(self) -> None:
        """list shows live sessions; kick by id marks one; kick of nothing is an error."""
        first, second = self.open_row(), self.open_row()
        listing = self.manage("session", "list")
        self.assertIn("192.0.2.7", listing)
        self.assertEqual(len(listing.strip().splitlines()), 3)
        self.assertIn(
            "asked 1 session(s)", self.manage("session", "kick", str(first), "--reason", "x")
        )
        kicks = self.successResultOf(self.store.touch([], proxy="px", lease_seconds=30))
        self.assertEqual([(k["id"], k["kick_reason"]) for k in kicks], [(first, "x")])
        self.assertIn("asked 2 session(s)", self.manage("session", "kick", "--instance", INSTANCE))
        self.successResultOf(
            self.store.end_session(second, reason="done", bytes_to_client=1, bytes_to_server=2)
        )
        self.assertEqual(len(self.manage("session", "list").strip().splitlines()), 2)
        self.assertIn("done", self.manage("session", "list", "--all"))
        args = build_parser().parse_args(["session", "kick", "999"])
        failure = self.failureResultOf(run(args, self.settings, self.store, False, io.StringIO()))
        failure.trap(CommandError)
