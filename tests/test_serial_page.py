"""consoled's serial page (xterm.js) in headless Chromium, typing into QEMU's monitor."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.browser import BrowserTab, open_page, require_browser, wait_for_text
from tests.harness import XTERM_DIR, Consoled, test_settings
from tests.peers import require_peer, start_qemu_monitor
from tests.wsclient import ws_connect


def type_command_and_read(tab: BrowserTab) -> str:
    """In the browser thread: wait for the prompt, type a command, read the answer."""
    wait_for_text(tab, "#status", ["Connected"])
    wait_for_text(tab, ".xterm-rows", ["(qemu)"])
    tab.page.keyboard.type("info status")
    tab.page.keyboard.press("Enter")
    return wait_for_text(tab, ".xterm-rows", ["VM status: running"])


class SerialPageTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_typing_reaches_the_console(self) -> Any:
        """Keys typed in serial.html reach the serial port and its answer is drawn."""
        require_browser(self)
        require_peer(
            self,
            "xterm.js",
            os.path.exists(os.path.join(XTERM_DIR, "lib", "xterm.js")),
            "npm install (scripts/setup does it)",
        )
        consoled = Consoled(self, test_settings())
        monitor = yield start_qemu_monitor(self)
        issued = yield consoled.authorize("serial", monitor.host, monitor.port)
        port = consoled.port("serial")
        url = f"http://127.0.0.1:{port}/serial.html?token={issued.token}"
        screen = yield open_page(self, url, type_command_and_read, timeout=20)
        self.assertIn("VM status: running", screen)

    @defer.inlineCallbacks
    def test_refusal_says_why(self) -> Any:
        """A wrong token and a port in use are shown with their reason, not as 1006."""
        require_browser(self)
        consoled = Consoled(self, test_settings())
        monitor = yield start_qemu_monitor(self)
        port = consoled.port("serial")

        def status(tab: BrowserTab) -> str:
            return wait_for_text(tab, "#status", ["Refused", "Disconnected"])

        shown = yield open_page(self, f"http://127.0.0.1:{port}/serial.html?token=nope", status)
        self.assertEqual(shown, "Refused (4401: invalid or expired token)")
        first = yield consoled.authorize("serial", monitor.host, monitor.port)
        writer = yield ws_connect(port, first.token)
        self.addCleanup(writer.transport.abortConnection)
        second = yield consoled.authorize("serial", monitor.host, monitor.port)
        url = f"http://127.0.0.1:{port}/serial.html?token={second.token}"
        shown = yield open_page(self, url, status)
        self.assertTrue(shown.startswith("Refused (4409: console port in use: held since "), shown)
