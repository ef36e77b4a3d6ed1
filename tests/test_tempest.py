"""OpenStack Tempest's own noVNC console checks, run against consoled and QEMU.

Tempest checks a cloud's noVNC proxy with two tests in
``tempest/api/compute/servers/test_novnc.py`` (``NoVNCConsoleTestJSON``):

* ``test_novnc`` asks nova for a console, GETs the URL nova hands out and
  wants a noVNC page back (``validate_novnc_html``: ``<html…>``, ``</html>``,
  ``noVNC`` and ``<script`` in the body), upgrades to a websocket with the
  token (``validate_websocket_upgrade``: a ``101 Switching Protocols`` head
  holding ``upgrade: websocket``; the token travels in the request path and
  again, as noVNC < 1.1 sent it, in a ``Cookie`` header) and speaks
  RFB 3.8 to the VNC server behind it up to ServerInit
  (``validate_rfb_negotiation``; security type None).
* ``test_novnc_bad_token`` upgrades with ``token=bad…`` and reads one
  websocket frame: it must get nothing.  Tempest reads every byte after the
  refused response head as a frame, so a refusal must carry an empty body
  (``Content-Length: 0``) and close.

Here the test bodies are Tempest's own functions, borrowed onto a small
`NoVNCValidateMixin` case whose ``servers_client`` answers
``get_vnc_console`` the way nova's API does, with the URL consoled builds for
a token (``[vnc] novncproxy_base_url``, consoled's default
``http://127.0.0.1:6080/vnc_lite.html``, pointed at the door's bound port).
Debian's novnc package ships ``vnc_auto.html`` as a link to ``vnc.html``; both
it and ``vnc_lite.html`` pass Tempest's page check.

Tempest's client is blocking (``socket`` and ``urllib3``), so the case runs in
a reactor pool thread while the reactor serves consoled and relays to QEMU.
Tempest's test class is only ever named through its module: trial collects
every TestCase class bound to a name in this module, and would run Tempest's
class as it stands (it needs a cloud).
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import testtools
from tempest.api.compute.servers import test_novnc as tempest_novnc
from tempest.common import compute
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from consoled.config import Settings
from tests.harness import INSTANCE, Consoled, test_settings
from tests.peers import require_peer, start_qemu_vnc

NOVNC_DIR = "/usr/share/novnc"
NOVNC_HINT = "apt-get install -y --no-install-recommends novnc"
#: Tempest's sockets have no timeout; every blocking call of its client gives
#: up after this, so a consoled that never answers fails the test instead of
#: leaving a pool thread stuck (and the reactor unable to stop).
CLIENT_TIMEOUT = 10.0


class NovaConsoleAPI:
    """Stands in for Tempest's ``servers_client``: nova's answer to
    ``os-getVNCConsole``, carrying the URL consoled built for the token."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.asked: list[tuple[str, str]] = []

    def get_vnc_console(self, server_id: str, type: str) -> dict[str, Any]:
        self.asked.append((server_id, type))
        return {"console": {"type": "novnc", "url": self.url}}


class RecordingSockets:
    """``tempest.common.compute``'s view of the socket module: every socket
    Tempest opens is recorded, so the case can close it even when Tempest
    fails before it holds the socket itself (a refused or silent upgrade
    raises inside ``create_websocket``, and that socket would stay open and
    keep consoled's side of the connection in the reactor)."""

    def __init__(self) -> None:
        self.opened: list[socket.socket] = []

    def socket(self, *args: Any) -> socket.socket:
        opened = socket.socket(*args)
        self.opened.append(opened)
        return opened

    def close_all(self) -> None:
        for opened in self.opened:
            opened.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)


class TempestNoVNC(compute.NoVNCValidateMixin):
    """Tempest's two test bodies with consoled in place of nova's proxy.

    A testtools case, as in Tempest.  The method names lack the ``test``
    prefix so that trial does not collect this class itself.
    """

    novnc = tempest_novnc.NoVNCConsoleTestJSON.test_novnc
    novnc_bad_token = tempest_novnc.NoVNCConsoleTestJSON.test_novnc_bad_token
    # Nova API 2.1 (below 2.6): the console comes from get_vnc_console.
    use_get_remote_console = False
    server = {"id": INSTANCE}

    def __init__(self, method: str, console_api: NovaConsoleAPI) -> None:
        super().__init__(method)
        self.servers_client = console_api

    # What NoVNCConsoleTestJSON's setUp and tearDown do, less the cloud's
    # server_check_teardown.
    def setUp(self) -> None:
        super().setUp()
        self.websocket: Any = None
        sockets = RecordingSockets()
        self.patch(compute, "socket", sockets)
        self.addCleanup(sockets.close_all)

    def tearDown(self) -> None:
        super().tearDown()
        if self.websocket is not None:
            self.websocket.close()


def run_case(case: testtools.TestCase) -> testtools.TestResult:
    """Run a testtools case with a socket timeout on every blocking call; in a pool thread."""
    result = testtools.TestResult()
    # The default applies to sockets made from now on: Tempest's and urllib3's.
    # The reactor's own sockets are non-blocking, so the default never touches them.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(CLIENT_TIMEOUT)
    try:
        case.run(result)
    finally:
        socket.setdefaulttimeout(previous)
    return result


def door_url(configured: str, port: int, page: str | None = None) -> str:
    """The configured base URL on 127.0.0.1 and the door's bound port (another page if given)."""
    parts = urlsplit(configured)
    if page is not None:
        parts = parts._replace(path=f"/{page}")
    return urlunsplit(parts._replace(netloc=f"127.0.0.1:{port}"))


class TempestNoVNCTests(TestCase):
    """Tempest's test_novnc and test_novnc_bad_token, through consoled, to QEMU."""

    timeout = 60

    async def tempest(self, method: str, page: str | None = None) -> NovaConsoleAPI:
        """Run Tempest's `method` against consoled's novnc door in front of QEMU's VNC.

        The console URL is the one consoled builds from ``[vnc]
        novncproxy_base_url`` (on another page if `page` is given).  Fails
        this test with Tempest's own tracebacks if Tempest's test fails.
        """
        require_peer(self, "noVNC", os.path.isdir(NOVNC_DIR), NOVNC_HINT)
        settings: Settings = test_settings()
        consoled = Consoled(self, settings)
        vnc = await start_qemu_vnc(self)
        base = door_url(settings.vnc.novncproxy_base_url, consoled.port("novnc"), page)
        issued = await consoled.authorize("novnc", vnc.host, vnc.port, access_url_base=base)
        console_api = NovaConsoleAPI(issued.access_url)
        result = await threads.deferToThread(run_case, TempestNoVNC(method, console_api))
        self.assertEqual((result.testsRun, result.skip_reasons), (1, {}))
        problems = [text for _case, text in result.errors + result.failures]
        if problems:
            self.fail(f"Tempest's {method} failed:\n" + "\n".join(problems))
        self.assertEqual(console_api.asked, [(INSTANCE, "novnc")])
        return console_api

    async def test_novnc(self) -> None:
        """Tempest's test_novnc passes on the URL consoled prints by default:
        /vnc_lite.html (consoled's default base URL, the noVNC page that
        connects by itself) serves noVNC's page, the websocket upgrade with
        the token is accepted, and RFB 3.8 with QEMU reaches ServerInit."""
        console_api = await self.tempest("novnc")
        url = urlsplit(console_api.url)
        self.assertEqual(url.path, "/vnc_lite.html")
        self.assertTrue(url.query.startswith("path=%3Ftoken%3D"), url.query)

    async def test_novnc_auto_page(self) -> None:
        """Tempest's test_novnc also passes with ``[vnc] novncproxy_base_url``
        on nova's default, vnc_auto.html (Debian's noVNC 1.3 links it to
        vnc.html), as a nova.conf left at nova's default gives it."""
        console_api = await self.tempest("novnc", page="vnc_auto.html")
        self.assertEqual(urlsplit(console_api.url).path, "/vnc_auto.html")

    async def test_novnc_bad_token(self) -> None:
        """Tempest's test_novnc_bad_token passes: an upgrade with ``token=bad…``
        is refused with a head and no body, then closed, so Tempest's frame
        reader gets no bytes at all."""
        await self.tempest("novnc_bad_token")
