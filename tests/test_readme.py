"""The README's quick start, run as it is written, against QEMU: the README cannot drift.

The commands come from README.md itself, never copied here:

- the daemon: the README's first command, less its ``scripts/setup &&``
  (the set-up it names is what this suite runs after);
- ``<!-- quick-start: tokens -->``: a line of shell variables (QEMU's
  ports), QEMU started in the background, three ``token create``;
- ``<!-- quick-start: telnet -->``: telnet to the raw serial door.

They run in a directory laid out as the checkout is for them: ``etc/consoled.conf``
(the checkout's, with each door port replaced by a free one),
``.venv/bin/{twistd,consoled-manage}`` (this interpreter on this checkout's
code) and ``node_modules`` (the checkout's).  The only other change is the
values of the block's first line, QEMU's ports, again free ones.  The test
then does what the README tells a person to do: open each printed URL (the
page answers 200, and its websocket reaches QEMU: RFB, a SPICE link reply),
and type the serial token at telnet's prompt (QEMU's monitor answers).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer, protocol, reactor, utils
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.daemon import PORT_TAKEN, READY, START_TIMEOUT, Twistd
from tests.peers import (
    HOST,
    QEMU,
    QEMU_HINT,
    VNC_BASE_PORT,
    PeerStartError,
    QemuProcess,
    free_port,
    require_executable,
    require_peer,
    spice_link_header,
    spice_link_message,
    spice_link_reply_complete,
    until_accepting,
)
from tests.rfb import rfb_handshake
from tests.wsclient import http_request, ws_connect

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(CHECKOUT, "README.md")
#: The doors' ports as etc/consoled.conf sets them: novnc, xvp, spice, serial, serial-tcp.
DOOR_PORTS = (6080, 6081, 6082, 6083, 6084)
#: The variables the tokens block starts with, each a port of QEMU's.
QEMU_VARIABLES = ("VNC_DISPLAY", "SPICE_PORT", "MONITOR_PORT")
ATTEMPTS = 5


def readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def daemon_command(text: str) -> str:
    """The README's first command, after ``scripts/setup && ``."""
    first = re.search(r"^    (scripts/setup.*)$", text, re.MULTILINE)
    assert first is not None, "README.md has no indented scripts/setup command"
    setup, _, run = first.group(1).partition(" && ")
    assert setup == "scripts/setup", first.group(1)
    return run


def quick_start_block(text: str, name: str) -> list[str]:
    """The commands of the fenced block after ``<!-- quick-start: NAME ... -->``,
    continuation lines joined."""
    found = re.search(
        rf"<!-- quick-start: {re.escape(name)}\b[^>]*-->\s*```sh\n(.*?)```", text, re.DOTALL
    )
    assert found is not None, f"README.md has no quick-start block {name!r}"
    return found.group(1).replace("\\\n", " ").strip().splitlines()


def assignments(line: str) -> dict[str, str]:
    """``A=1 B=2`` as a dict; anything else fails."""
    pairs = dict(word.split("=", 1) for word in shlex.split(line))
    assert tuple(pairs) == QEMU_VARIABLES, line
    return pairs


class Terminal(protocol.ProcessProtocol):
    """A command with its stdin ours: everything it printed, a wait for text, its end."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[BaseException] = defer.Deferred()
        self._waiting: list[tuple[bytes, defer.Deferred[None]]] = []

    def outReceived(self, data: bytes) -> None:
        self.output += data
        waiting, self._waiting = self._waiting, []
        for marker, d in waiting:
            if d.called:
                continue
            if marker in self.output:
                d.callback(None)
            else:
                self._waiting.append((marker, d))

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        for marker, d in self._waiting:
            if not d.called:
                d.errback(RuntimeError(f"ended before {marker!r}: {self.output!r}"))
        self._waiting = []
        self.ended.callback(reason.value)

    def when_printed(self, marker: bytes, timeout: float = 10) -> defer.Deferred[None]:
        if marker in self.output:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((marker, d))
        return d.addTimeout(timeout, reactor)


class QuickStartTests(TestCase):
    """The README's quick start, run from README.md against QEMU."""

    timeout = 120

    def setUp(self) -> None:
        require_executable(self, QEMU, QEMU_HINT)
        self.telnet = require_executable(self, "telnet", "apt-get install telnet")
        for what, path, hint in [
            ("noVNC", "/usr/share/novnc/vnc_lite.html", "apt-get install novnc"),
            (
                "spice-html5",
                "/usr/share/spice-html5/spice_auto.html",
                "apt-get install spice-html5",
            ),
            ("xterm.js", os.path.join(CHECKOUT, "node_modules", "@xterm", "xterm"), "npm install"),
        ]:
            require_peer(self, what, os.path.exists(path), hint)
        self.text = readme()
        self.workdir = os.path.abspath(self.mktemp())
        bin_dir = os.path.join(self.workdir, ".venv", "bin")
        os.makedirs(bin_dir)
        os.makedirs(os.path.join(self.workdir, "etc"))
        os.symlink(
            os.path.join(CHECKOUT, "node_modules"), os.path.join(self.workdir, "node_modules")
        )
        python = shlex.quote(sys.executable)
        twistd = "from twisted.scripts.twistd import run; run()"
        for name, body in [
            ("twistd", f'exec {python} -c "{twistd}" "$@"'),
            ("consoled-manage", f'exec {python} -m consoled.manage "$@"'),
        ]:
            path = os.path.join(bin_dir, name)
            with open(path, "w") as f:
                f.write(f"#!/bin/sh\n{body}\n")
            os.chmod(path, 0o755)
        self.env = {**os.environ, "PYTHONPATH": CHECKOUT}

    def run_shell(self, proto: protocol.ProcessProtocol, script: str) -> Any:
        """Run ``script`` with bash in the work directory; returns the transport."""
        return reactor.spawnProcess(
            proto, "/bin/bash", ["bash", "-c", script], env=self.env, path=self.workdir
        )

    @defer.inlineCallbacks
    def start_daemon(self) -> Any:
        """The README's first command, on free door ports; fires with the door ports."""
        with open(os.path.join(CHECKOUT, "etc", "consoled.conf"), encoding="utf-8") as f:
            config = f.read()
        for port in DOOR_PORTS:
            self.assertIn(f"_port = {port}\n", config)
        for _attempt in range(ATTEMPTS):
            ports = {port: free_port() for port in DOOR_PORTS}
            rewritten = re.sub(r"\b608[0-4]\b", lambda m, p=ports: str(p[int(m.group())]), config)
            with open(os.path.join(self.workdir, "etc", "consoled.conf"), "w") as f:
                f.write(rewritten)
            twistd = Twistd()
            self.run_shell(twistd, "exec " + daemon_command(self.text))
            self.addCleanup(twistd.stop)
            try:
                yield twistd.when_logged(READY, START_TIMEOUT)
            except RuntimeError:
                if PORT_TAKEN in twistd.output:
                    continue
                raise
            self.daemon = twistd
            return ports
        self.fail("consoled found a door port taken on every attempt")

    @defer.inlineCallbacks
    def start_qemu(self, commands: list[str]) -> Any:
        """The block's background command (QEMU) on free ports; fires with the variables."""
        (background,) = [command for command in commands if command.endswith("&")]
        for _attempt in range(ATTEMPTS):
            vnc = free_port()
            while vnc <= VNC_BASE_PORT:
                vnc = free_port()
            values = {
                "VNC_DISPLAY": str(vnc - VNC_BASE_PORT),
                "SPICE_PORT": str(free_port()),
                "MONITOR_PORT": str(free_port()),
            }
            line = " ".join(f"{name}={value}" for name, value in values.items())
            qemu = QemuProcess([background])
            self.run_shell(qemu, f"{line}\nexec {background.removesuffix('&')}")
            self.addCleanup(qemu.stop)
            try:
                for port in (vnc, int(values["SPICE_PORT"]), int(values["MONITOR_PORT"])):
                    yield defer.Deferred.fromCoroutine(until_accepting(qemu, HOST, port))
            except PeerStartError:
                if b"in use" in qemu.stderr:
                    yield qemu.when_ended()
                    continue
                raise
            return line
        self.fail("QEMU found a port taken on every attempt")

    @defer.inlineCallbacks
    def test_quick_start(self) -> Any:
        """Every URL the quick start prints opens its page and reaches QEMU through
        consoled, and telnet to the raw serial door reaches QEMU's monitor."""
        ports = yield self.start_daemon()
        commands = quick_start_block(self.text, "tokens")
        assignments(commands[0])
        line = yield self.start_qemu(commands)
        foreground = [command for command in commands[1:] if not command.endswith("&")]
        script = "\n".join(["set -e", line, *foreground])
        out, err, code = yield utils.getProcessOutputAndValue(
            "/bin/bash", ["-c", script], env=self.env, path=self.workdir
        )
        self.assertEqual(code, 0, err)
        urls = out.decode().split()
        self.assertEqual(len(urls), 3, out)
        novnc, spice, serial = (urlsplit(url) for url in urls)

        # noVNC: the page, then RFB from QEMU over the websocket the page opens.
        self.assertEqual(novnc.netloc, f"{HOST}:{ports[6080]}")
        self.assertEqual(novnc.path, "/vnc_lite.html")
        yield self.assertPage(ports[6080], urls[0], b"noVNC")
        (path,) = parse_qs(novnc.query)["path"]
        token = parse_qs(urlsplit(path).query)["token"][0]
        client = yield ws_connect(ports[6080], token)
        width, height = yield defer.Deferred.fromCoroutine(rfb_handshake(client))
        self.assertGreater(width * height, 0)
        client.dropConnection()

        # spice-html5: the page, then QEMU's SPICE link reply over the websocket.
        self.assertEqual((spice.netloc, spice.path), (f"{HOST}:{ports[6082]}", "/spice_auto.html"))
        yield self.assertPage(ports[6082], urls[1], b"Spice")
        client = yield ws_connect(ports[6082], parse_qs(spice.query)["token"][0])
        client.send(spice_link_message())
        reply = yield client.read(16)
        header = spice_link_header(reply)
        self.assertIsNotNone(header)
        self.assertEqual(header[0], b"REDQ")
        rest = yield client.read(header[3])
        self.assertTrue(spice_link_reply_complete(reply + rest))
        client.dropConnection()

        # The serial page and the xterm.js it loads.
        self.assertEqual((serial.netloc, serial.path), (f"{HOST}:{ports[6083]}", "/serial.html"))
        yield self.assertPage(ports[6083], urls[2], b"xterm")
        yield self.assertPage(ports[6083], "/xterm/lib/xterm.js", b"Terminal")

        # telnet to the raw serial door: the serial token at its prompt, then QEMU's monitor.
        serial_token = parse_qs(serial.query)["token"][0]
        (telnet,) = quick_start_block(self.text, "telnet")
        self.assertEqual(telnet, "telnet 127.0.0.1 6084")
        terminal = Terminal()
        transport = self.run_shell(terminal, "exec " + telnet.replace("6084", str(ports[6084])))
        yield terminal.when_printed(b"token:")
        transport.write(serial_token.encode() + b"\r\n")
        yield terminal.when_printed(b"monitor - type 'help' for more information")
        yield terminal.when_printed(b"(qemu)")
        transport.write(b"info status\r\n")
        yield terminal.when_printed(b"VM status: running")
        self.assertNotIn(serial_token.encode(), terminal.output)
        transport.closeStdin()
        try:
            yield terminal.ended.addTimeout(10, reactor)
        except defer.TimeoutError:
            transport.signalProcess("KILL")
            yield terminal.ended
        # The daemon logged each session, and no token with any.
        for door in (b"websocket/novnc", b"websocket/spice", b"serial-tcp"):
            yield self.daemon.when_logged(b" started: " + door + b" from ")
        for each in (token, parse_qs(spice.query)["token"][0], serial_token):
            self.assertNotIn(each.encode(), self.daemon.output)

    @defer.inlineCallbacks
    def assertPage(self, port: int, url: str, needle: bytes) -> Any:
        """GET the URL's path and query from the door: 200 and ``needle`` in the body."""
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        request = f"GET {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
        status, _headers, body = yield http_request(port, request.encode())
        self.assertEqual(status, 200, body[:200])
        self.assertIn(needle, body)


class DocsIndexTests(TestCase):
    def test_every_docs_page_is_linked(self) -> None:
        """The README's list of documentation names every page in docs/."""
        text = readme()
        docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
        pages = sorted(name for name in os.listdir(docs) if name.endswith(".md"))
        missing = [page for page in pages if f"(docs/{page})" not in text]
        self.assertEqual(missing, [])
