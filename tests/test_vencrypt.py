"""The RFB security proxy against QEMU with VeNCrypt x509 (verify-peer=on).

QEMU offers only VeNCrypt; consoled negotiates it with its client
certificate and offers the user security type None, so the same RFB client
that reaches a plain QEMU reaches this one, through the noVNC and XVP doors.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from consoled.config import Settings
from consoled.endings import Kind
from tests import test_refusals, test_startup, test_tempest
from tests.browser import open_novnc, require_browser
from tests.harness import Consoled, test_settings
from tests.peers import (
    HOST,
    VNC_BASE_PORT,
    _free_vnc_port,
    require_peer,
    start_qemu,
    start_qemu_vnc,
)
from tests.pki import Pki, make_pki
from tests.rfb import rfb_handshake
from tests.wsclient import ws_connect
from tests.xvpclient import xvp_connect


def start_qemu_vencrypt(testcase: TestCase, pki: Pki) -> defer.Deferred[Any]:
    """QEMU whose VNC server requires VeNCrypt x509 and a client certificate from pki's CA."""

    def arguments(port: int) -> list[str]:
        creds = f"tls-creds-x509,id=tls0,dir={pki.dir},endpoint=server,verify-peer=on"
        vnc = f"{HOST}:{port - VNC_BASE_PORT},tls-creds=tls0"
        machine = ["-machine", "none", "-nodefaults", "-display", "none"]
        return [*machine, "-object", creds, "-vnc", vnc]

    return start_qemu(testcase, arguments, pick_port=_free_vnc_port)


def vencrypt_settings(pki: Pki, schemes: tuple[str, ...] = ("vencrypt",)) -> Settings:
    base = test_settings()
    vnc = dataclasses.replace(
        base.vnc,
        auth_schemes=schemes,
        vencrypt_client_cert=pki.client_cert,
        vencrypt_client_key=pki.client_key,
        vencrypt_ca_certs=pki.ca_cert,
    )
    return dataclasses.replace(base, vnc=vnc)


class VeNCryptTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.pki = make_pki(os.path.abspath(self.mktemp()))

    @defer.inlineCallbacks
    def test_novnc_door_reaches_vencrypt_qemu(self) -> Any:
        """An RFB client offered None through the noVNC door gets QEMU's screen."""
        consoled = Consoled(self, vencrypt_settings(self.pki))
        vnc = yield start_qemu_vencrypt(self, self.pki)
        issued = yield consoled.authorize("novnc", vnc.host, vnc.port)
        client = yield ws_connect(consoled.port("novnc"), issued.token)
        width, height = yield defer.Deferred.fromCoroutine(rfb_handshake(client))
        self.assertGreater(width * height, 0)
        client.sendClose()
        yield client.closed
        yield consoled.wait_sessions_ended()

    @defer.inlineCallbacks
    def test_xvp_door_reaches_vencrypt_qemu(self) -> Any:
        """The same connector behind the XVP door: the Java viewer's request, then RFB with None."""
        consoled = Consoled(self, vencrypt_settings(self.pki))
        vnc = yield start_qemu_vencrypt(self, self.pki)
        issued = yield consoled.authorize("xvpvnc", vnc.host, vnc.port)
        client = yield xvp_connect(consoled.port("xvp"), issued.token)
        self.assertEqual(client.status, 200)
        width, height = yield defer.Deferred.fromCoroutine(rfb_handshake(client))
        self.assertGreater(width * height, 0)
        client.close()
        yield client.closed

    @defer.inlineCallbacks
    def test_none_allowed_after_vencrypt_reaches_plain_qemu(self) -> Any:
        """auth_schemes = vencrypt, none: a QEMU without TLS is served with None."""
        consoled = Consoled(self, vencrypt_settings(self.pki, ("vencrypt", "none")))
        vnc = yield start_qemu_vnc(self)
        issued = yield consoled.authorize("novnc", vnc.host, vnc.port)
        client = yield ws_connect(consoled.port("novnc"), issued.token)
        width, height = yield defer.Deferred.fromCoroutine(rfb_handshake(client))
        self.assertGreater(width * height, 0)
        client.sendClose()
        yield client.closed


class VeNCryptRefusalTests(TestCase):
    """Each failure with the VNC server is its row of the refusal table on both RFB doors."""

    timeout = 60
    answers = test_refusals.RefusalTableTests.answers
    expected = test_refusals.RefusalTableTests.expected

    def setUp(self) -> None:
        self.pki = make_pki(os.path.abspath(self.mktemp()))

    @defer.inlineCallbacks
    def check(self, vnc: Any, kind: Kind, detail: str) -> Any:
        for door, console_type in (("novnc", "novnc"), ("xvp", "xvpvnc")):
            issued = yield self.consoled.authorize(console_type, vnc.host, vnc.port)
            told = yield self.answers(door, issued.token)
            self.assertEqual(told, self.expected(door, kind, after_upgrade=True), door)
        yield self.consoled.wait_sessions_ended()
        reasons = [row["end_reason"] for row in self.consoled.session_rows()]
        # noVNC's door was asked twice (the upgrade's status alone, whose client
        # hangs up at once, maybe before the console answered; then with
        # explain), XVP's once.
        met = [reason for reason in reasons if detail in reason]
        self.assertGreaterEqual(len(met), 2, reasons)
        self.assertEqual(
            len(reasons) - len(met), reasons.count("client closed the connection: close code 1006")
        )

    @defer.inlineCallbacks
    def test_plain_qemu_is_not_downgraded(self) -> Any:
        """auth_schemes = vencrypt and a QEMU offering only None: 502 / 4507, never relayed."""
        self.consoled = Consoled(self, vencrypt_settings(self.pki))
        vnc = yield start_qemu_vnc(self)
        yield self.check(vnc, Kind.BACKEND_INSECURE, "offers None (1)")

    @defer.inlineCallbacks
    def test_client_certificate_from_another_ca(self) -> Any:
        """QEMU refuses a client certificate its CA did not sign: 502 / 4508."""
        other = make_pki(os.path.abspath(self.mktemp()))
        mixed = dataclasses.replace(
            self.pki, client_cert=other.client_cert, client_key=other.client_key
        )
        self.consoled = Consoled(self, vencrypt_settings(mixed))
        vnc = yield start_qemu_vencrypt(self, self.pki)
        yield self.check(vnc, Kind.BACKEND_TLS, "vencrypt_client_cert")

    @defer.inlineCallbacks
    def test_server_certificate_not_trusted(self) -> Any:
        """A QEMU whose certificate another CA signed: 'certificate verify failed', 502 / 4508."""
        other = make_pki(os.path.abspath(self.mktemp()))
        self.consoled = Consoled(self, vencrypt_settings(self.pki))
        vnc = yield start_qemu_vencrypt(self, other)
        yield self.check(vnc, Kind.BACKEND_TLS, "certificate verify failed")


class VeNCryptViewerTests(TestCase):
    """The viewers users and clouds run, unchanged, in front of a VeNCrypt QEMU."""

    timeout = 90

    @defer.inlineCallbacks
    def test_novnc_in_chromium_draws_vencrypt_qemu(self) -> Any:
        """Debian's noVNC in headless Chromium, through consoled, draws that QEMU's screen."""
        require_browser(self)
        require_peer(self, "noVNC", os.path.isdir(test_tempest.NOVNC_DIR), test_tempest.NOVNC_HINT)
        pki = make_pki(os.path.abspath(self.mktemp()))
        consoled = Consoled(self, vencrypt_settings(pki))
        vnc = yield start_qemu_vencrypt(self, pki)
        base = f"http://127.0.0.1:{consoled.port('novnc')}/vnc_lite.html"
        issued = yield consoled.authorize("novnc", vnc.host, vnc.port, access_url_base=base)
        result = yield open_novnc(self, issued.access_url)
        self.assertIn("Connected to QEMU", result.status_text)
        self.assertGreater(result.nonblank_pixels, 0)

    async def test_tempest_novnc_through_the_security_proxy(self) -> None:
        """Tempest's own test_novnc (RFB 3.8 with None up to ServerInit) passes in front of it."""
        require_peer(self, "noVNC", os.path.isdir(test_tempest.NOVNC_DIR), test_tempest.NOVNC_HINT)
        pki = make_pki(os.path.abspath(self.mktemp()))
        settings = vencrypt_settings(pki)
        consoled = Consoled(self, settings)
        vnc = await start_qemu_vencrypt(self, pki)
        base = test_tempest.door_url(settings.vnc.novncproxy_base_url, consoled.port("novnc"))
        issued = await consoled.authorize("novnc", vnc.host, vnc.port, access_url_base=base)
        api = test_tempest.NovaConsoleAPI(issued.access_url)
        case = test_tempest.TempestNoVNC("novnc", api)
        result = await threads.deferToThread(test_tempest.run_case, case)
        problems = [text for _case, text in result.errors + result.failures]
        self.assertEqual((result.testsRun, problems, result.skip_reasons), (1, [], {}))


class VeNCryptStartTests(TestCase):
    """A real ``twistd consoled`` told to use VeNCrypt without what it needs refuses to start."""

    timeout = 60
    config = test_startup.RefusedStartTests.config
    refused = test_startup.RefusedStartTests.refused
    assertOneLine = test_startup.RefusedStartTests.assertOneLine

    @defer.inlineCallbacks
    def test_no_ca(self) -> Any:
        """auth_schemes = vencrypt without vencrypt_ca_certs: one line naming the option."""
        twistd = yield self.refused(self.config("[vnc]\nauth_schemes = vencrypt\n"))
        self.assertOneLine(twistd, "[vnc] vencrypt_ca_certs is not set")

    @defer.inlineCallbacks
    def test_client_key_missing(self) -> Any:
        """A client key file that does not exist: one line naming it."""
        pki = make_pki(os.path.abspath(self.mktemp()))
        key = os.path.join(pki.dir, "absent-key.pem")
        text = (
            f"[vnc]\nauth_schemes = vencrypt\nvencrypt_ca_certs = {pki.ca_cert}\n"
            f"vencrypt_client_cert = {pki.client_cert}\nvencrypt_client_key = {key}\n"
        )
        twistd = yield self.refused(self.config(text))
        self.assertOneLine(twistd, f"[vnc] vencrypt_*: cannot read TLS key {key}")
