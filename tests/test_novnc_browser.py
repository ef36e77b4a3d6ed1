"""The real noVNC (Debian's) in headless Chromium, through consoled, to QEMU."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from consoled.tokens import access_url
from tests.browser import open_novnc, require_browser
from tests.harness import Consoled, test_settings
from tests.peers import require_peer, start_qemu_vnc


class NoVNCTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_novnc_draws_qemu_screen(self) -> Any:
        """noVNC loaded from consoled, opened with nova's URL form, draws QEMU's screen."""
        import os

        require_browser(self)
        require_peer(
            self, "noVNC", os.path.exists("/usr/share/novnc/vnc_lite.html"), "apt-get install novnc"
        )
        consoled = Consoled(self, test_settings())
        vnc = yield start_qemu_vnc(self)
        port = consoled.port("novnc")
        base = f"http://127.0.0.1:{port}/vnc_lite.html"
        issued = yield consoled.authorize("novnc", vnc.host, vnc.port, access_url_base=base)
        url = access_url("novnc", base, issued.token)
        self.assertEqual(url, issued.access_url)
        result = yield open_novnc(self, url)
        self.assertIn("Connected to QEMU", result.status_text)
        self.assertGreater(result.nonblank_pixels, 0)
        self.assertGreater(result.distinct_colors, 1)
        with open(result.screenshot_path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
