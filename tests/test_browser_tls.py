"""The real noVNC in headless Chromium over https:// and wss://, through a TLS-only
consoled, to QEMU.

Chromium offers ALPN ``h2,http/1.1`` in every handshake; before the websocket
doors named ``http/1.1`` (and no-overlap stopped aborting), every consoled
page failed with ERR_SSL_PROTOCOL_ERROR here.  The test certificate is for
localhost/127.0.0.1, signed by the test CA of tests/test_tls.py, which Chromium
does not know: ``--ignore-certificate-errors``.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from consoled.tokens import access_url
from tests import browser
from tests.browser import NOVNC_DIR, open_novnc, require_browser
from tests.harness import Consoled
from tests.peers import require_peer, start_qemu_vnc
from tests.test_tls import tls_settings


class NoVNCOverTLSTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_novnc_over_https_draws_qemu_screen(self) -> Any:
        """With ssl_only, noVNC loads over https://, connects over wss:// (Chromium
        offering h2,http/1.1) and draws QEMU's screen: the canvas is not blank."""
        require_browser(self)
        page = os.path.join(NOVNC_DIR, "vnc_lite.html")
        require_peer(self, "noVNC", os.path.exists(page), "apt-get install novnc")
        self.patch(
            browser, "CHROMIUM_ARGS", [*browser.CHROMIUM_ARGS, "--ignore-certificate-errors"]
        )
        consoled = Consoled(self, tls_settings(self, ssl_only=True))
        vnc = yield start_qemu_vnc(self)
        port = consoled.port("novnc")
        base = f"https://127.0.0.1:{port}/vnc_lite.html"
        issued = yield consoled.authorize("novnc", vnc.host, vnc.port, access_url_base=base)
        result = yield open_novnc(self, access_url("novnc", base, issued.token))
        self.assertIn("Connected to QEMU", result.status_text)
        self.assertIn(
            f"websocket: open wss://127.0.0.1:{port}/", "\n".join(result.console_messages)
        )
        self.assertGreater(result.nonblank_pixels, 0)
        self.assertGreater(result.distinct_colors, 1)
        with open(result.screenshot_path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
