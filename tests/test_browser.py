"""The browser harness in `tests.browser`, proven against the reference peer.

noVNC (Debian's vnc_lite.html) in headless Chromium talks to websockify,
nova's own websocket engine, in front of QEMU's VNC server.  If these pass,
the harness tells a live console from a dead one, and a later test can point
the same page at consoled's websocket door instead.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import threading

from twisted.trial import unittest

from tests import browser, peers

WEBSOCKIFY_HINT = "pip install websockify"
NOVNC_HINT = "apt-get install -y --no-install-recommends novnc"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _WebsockifyProcess(peers.QemuProcess):
    """websockify logs on stdout and stderr; keep both for the failure message."""

    def outReceived(self, data: bytes) -> None:
        self.errReceived(data)


async def _start_websockify(testcase: unittest.TestCase, target_port: int) -> int:
    """websockify serving noVNC and proxying to 127.0.0.1:target_port; its port.

    Ready once its port accepts a connection; retried on a new port if the
    one picked was taken meanwhile.  Stopped (and reaped) at cleanup.
    """
    peers.require_peer(
        testcase, "websockify", importlib.util.find_spec("websockify") is not None, WEBSOCKIFY_HINT
    )
    peers.require_peer(testcase, "noVNC", os.path.isdir(browser.NOVNC_DIR), NOVNC_HINT)
    from twisted.internet import reactor

    for _attempt in range(peers.PORT_ATTEMPTS):
        port = peers.free_port()
        argv = [
            sys.executable,
            *("-m", "websockify", "--web", browser.NOVNC_DIR),
            f"{peers.HOST}:{port}",
            f"{peers.HOST}:{target_port}",
        ]
        process = _WebsockifyProcess(argv)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        reactor.spawnProcess(process, sys.executable, argv, env=env)
        testcase.addCleanup(process.stop)
        try:
            await peers.until_accepting(process, peers.HOST, port)
        except peers.PeerStartError:
            if b"Address already in use" in process.stderr:
                await process.when_ended()
                continue
            raise
        return port
    raise peers.PeerStartError("websockify found every port taken")


def _novnc_page(ws_port: int) -> str:
    return browser.novnc_url(f"http://{peers.HOST}:{ws_port}", peers.HOST, ws_port)


def _closed_port() -> int:
    # free_port() closes its socket: nothing listens there now.
    return peers.free_port()


class NoVncThroughWebsockifyTests(unittest.TestCase):
    """noVNC -> websockify -> QEMU VNC in a real headless Chromium."""

    def setUp(self) -> None:
        browser.require_browser(self)

    async def test_connects_and_draws(self) -> None:
        """noVNC reports Connected, the canvas shows QEMU's non-uniform screen,
        and a PNG screenshot is saved."""
        peer = await peers.start_qemu_vnc(self)
        ws_port = await _start_websockify(self, peer.port)

        result = await browser.open_novnc(self, _novnc_page(ws_port))

        self.assertIn("Connected", result.status_text)
        self.assertIn("QEMU", result.status_text)
        self.assertGreater(result.nonblank_pixels, 0)
        self.assertGreater(result.distinct_colors, 1)
        self.assertGreater(result.canvas_width, 0)
        self.assertGreater(result.canvas_height, 0)
        with open(result.screenshot_path, "rb") as shot:
            self.assertEqual(shot.read(len(PNG_SIGNATURE)), PNG_SIGNATURE)

    async def test_closed_backend_shows_failure(self) -> None:
        """With nothing listening behind websockify, noVNC's status ends in a
        closed-connection state instead of Connected."""
        ws_port = await _start_websockify(self, _closed_port())

        status = await browser.open_page(
            self, _novnc_page(ws_port), browser.wait_for_novnc_settled, timeout=10
        )

        self.assertIn(status, browser.NOVNC_CLOSED)

    async def test_open_novnc_fails_fast_on_closed_backend(self) -> None:
        """open_novnc fails (not hangs) when noVNC reports a closed connection,
        naming the status and the page's console in its message."""
        ws_port = await _start_websockify(self, _closed_port())

        opened = browser.open_novnc(self, _novnc_page(ws_port), timeout=10)
        failure = await self.assertFailure(opened, browser.BrowserWaitFailed)

        message = str(failure)
        self.assertIn("noVNC status is", message)
        self.assertTrue(any(text in message for text in browser.NOVNC_CLOSED), message)
        self.assertIn("page log:", message)
        self.assertIn("websocket: open", message)

    async def test_silent_backend_times_out_with_diagnostics(self) -> None:
        """A backend that accepts TCP but never speaks RFB leaves noVNC
        Connecting; open_novnc gives up at its timeout, saying so."""
        # Listening but never accepting: the kernel completes the handshake,
        # so websockify connects and then hears nothing.
        silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(silent.close)
        silent.bind((peers.HOST, 0))
        silent.listen(4)
        ws_port = await _start_websockify(self, silent.getsockname()[1])

        opened = browser.open_novnc(self, _novnc_page(ws_port), timeout=3)
        failure = await self.assertFailure(opened, browser.BrowserWaitFailed)

        message = str(failure)
        self.assertIn("'Connecting' after 3s", message)
        self.assertIn("screenshot:", message)


class BrowserSessionTests(unittest.TestCase):
    """A session runs jobs on its own thread, in order, and closes cleanly."""

    def setUp(self) -> None:
        browser.require_browser(self)

    async def test_jobs_share_one_thread_off_the_reactor(self) -> None:
        """Every job runs on the same non-reactor thread, so Playwright's sync
        objects are always used from the thread that made them."""
        session = await browser.launch_browser(self)
        first = await session.call(lambda tab: threading.get_ident())
        second = await session.call(lambda tab: threading.get_ident())

        self.assertEqual(first, second)
        self.assertNotEqual(first, threading.get_ident())

    async def test_close_twice(self) -> None:
        """close() may be called again (by a test and by its cleanup)."""
        session = await browser.launch_browser(self)
        await session.close()
        await session.close()
