"""The management listener: /healthz, /metrics and nova's console API shapes, over real sockets."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer, threads
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from tests import hypervisors
from tests.harness import INSTANCE, Consoled, test_settings
from tests.test_drivers_libvirt import domain as libvirt_domain
from tests.test_drivers_libvirt import serial_tcp as libvirt_serial
from tests.wsclient import http_request, ws_connect

KEY = "consoled-test-key"
KEY_HASH = hashlib.sha256(KEY.encode()).hexdigest()


def get(path: str, key: str | None = KEY, **headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if key is not None:
        lines.append(f"X-Auth-Token: {key}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class ManagementTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)
        self.consoled = Consoled(self, test_settings(api_key_hashes=(KEY_HASH,), api_port=0))
        self.port = self.consoled.port("api")

    @defer.inlineCallbacks
    def call(self, path: str, key: str | None = KEY, **headers: str) -> Any:
        status, response_headers, body = yield http_request(self.port, get(path, key, **headers))
        return status, body

    @defer.inlineCallbacks
    def test_health(self) -> Any:
        """Store reachable and every door listening: 200; a door stopped: 503 naming it."""
        status, body = yield self.call("/healthz", key=None)
        report = json.loads(body)
        self.assertEqual((status, report["status"], report["store"]), (200, "ok", "ok"))
        self.assertEqual(report["doors"]["novnc"], "listening")
        yield self.consoled.top.getServiceNamed("xvp").stopService()
        status, body = yield self.call("/healthz", key=None)
        report = json.loads(body)
        self.assertEqual(
            (status, report["status"], report["doors"]["xvp"]), (503, "failing", "not listening")
        )

    @defer.inlineCallbacks
    def test_metrics_count_sessions_refusals_and_bytes(self) -> Any:
        echo = hypervisors.serve(self, hypervisors.Echo)
        issued = yield self.consoled.authorize("novnc", "127.0.0.1", echo.port)
        client = yield ws_connect(self.consoled.port("novnc"), issued.token)
        client.send(b"hello")
        self.assertEqual((yield client.read(5)), b"hello")
        refused = yield ws_connect(self.consoled.port("novnc"), "0b1c-nope", explain=True)
        yield refused.closed
        status, body = yield self.call("/metrics", key=None)
        text = body.decode()
        self.assertEqual(status, 200)
        self.assertIn(
            'consoled_sessions_live{console_type="novnc",door="websocket/novnc"} 1.0', text
        )
        self.assertIn(
            'consoled_sessions_started_total{console_type="novnc",door="websocket/novnc"} 1.0', text
        )
        self.assertIn(
            'consoled_refusals_total{door="novnc",reason="invalid or expired token"} 1.0', text
        )
        self.assertIn('consoled_bytes_total{direction="to_server"} 5.0', text)
        self.assertIn('consoled_bytes_total{direction="to_client"} 5.0', text)
        self.assertIn("consoled_token_lookup_seconds_count 2.0", text)
        self.assertIn("consoled_setup_seconds_count 1.0", text)
        client.sendClose()
        yield client.closed
        yield self.consoled.wait_sessions_ended()
        status, body = yield self.call("/metrics", key=None)
        self.assertIn('consoled_bytes_total{direction="to_server"} 5.0', body.decode())
        self.assertNotIn("consoled_sessions_live{", body.decode())

    @defer.inlineCallbacks
    def test_api_needs_the_key(self) -> Any:
        """Every call but version discovery: 401 in nova's shape without a known key."""
        for key in (None, "wrong"):
            status, body = yield self.call("/v2.1/os-console-auth-tokens/x", key=key)
            self.assertEqual(status, 401)
            self.assertEqual(json.loads(body)["unauthorized"]["code"], 401)
        status, body = yield self.call("/v2.1", key=None)
        version = json.loads(body)["version"]
        self.assertEqual((status, version["min_version"], version["version"]), (200, "2.1", "2.99"))

    @defer.inlineCallbacks
    def test_openstacksdk_validates_a_token(self) -> Any:
        """openstacksdk, as a real client (admin token, endpoint override, 2.99), looks a token up."""
        import openstack

        issued = yield self.consoled.authorize("novnc", "192.0.2.5", 5901)
        base = f"http://127.0.0.1:{self.port}/v2.1"

        def validate() -> Any:
            connection = openstack.connect(
                auth_type="admin_token",
                auth={"token": KEY, "endpoint": base},
                compute_endpoint_override=base,
                compute_api_version="2.99",
            )
            try:
                return connection.compute.validate_console_auth_token(issued.token)
            finally:
                connection.close()

        console = yield threads.deferToThread(validate)
        self.assertEqual((console.host, console.port), ("192.0.2.5", 5901))
        self.assertEqual(console.instance_uuid, INSTANCE)

    @defer.inlineCallbacks
    def test_token_look_up(self) -> Any:
        """nova's GET /os-console-auth-tokens/{token}: the console, tls_port at 2.99; 404 unknown."""
        issued = yield self.consoled.authorize(
            "spice-html5", "192.0.2.5", 5900, tls_port=5901, internal_access_path=None
        )
        status, body = yield self.call(f"/v2.1/os-console-auth-tokens/{issued.token}")
        self.assertEqual(status, 200)
        console = json.loads(body)["console"]
        self.assertEqual((console["host"], console["port"]), ("192.0.2.5", 5900))
        self.assertNotIn("tls_port", console)
        status, body = yield self.call(
            f"/v2.1/os-console-auth-tokens/{issued.token}",
            OpenStack_API_Version="compute 2.99",
        )
        self.assertEqual(json.loads(body)["console"]["tls_port"], 5901)
        status, body = yield self.call("/v2.1/os-console-auth-tokens/0b1c-unknown")
        self.assertEqual((status, json.loads(body)["itemNotFound"]["code"]), (404, 404))
        logged = "".join(str(event) for event in self.events)
        self.assertNotIn(issued.token, logged)


class OffByDefaultTests(TestCase):
    def test_no_listener_without_keys(self) -> None:
        consoled = Consoled(self, test_settings())
        self.assertRaises(KeyError, consoled.top.getServiceNamed, "api")


class RemoteConsoleTests(TestCase):
    """POST /servers/{id}/remote-consoles: libvirt's test driver finds QEMU's console, the
    store mints the token, and the URL it answers opens that console through consoled."""

    timeout = 60

    def setUp(self) -> None:
        from tests.peers import require_peer

        available = importlib.util.find_spec("libvirt") is not None
        require_peer(self, "libvirt-python", available, "pip install libvirt-python")

    @defer.inlineCallbacks
    def consoled_for(self, devices: str) -> Any:
        instance = str(uuid.uuid4())
        node = os.path.abspath(self.mktemp()) + ".xml"
        with open(node, "w") as f:
            f.write("<node>" + libvirt_domain(instance, "vm1", devices) + "</node>")
        base = test_settings(api_key_hashes=(KEY_HASH,), api_port=0)
        settings = dataclasses.replace(
            base, libvirt=dataclasses.replace(base.libvirt, connection_uri=f"test://{node}")
        )
        consoled = Consoled(self, settings)
        yield None
        return consoled, instance

    def post(self, port: int, instance: str, body: bytes, key: str = KEY) -> Any:
        request = (
            f"POST /v2.1/servers/{instance}/remote-consoles HTTP/1.1\r\nHost: x\r\n"
            f"X-Auth-Token: {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        return http_request(port, request)

    @defer.inlineCallbacks
    def test_openstacksdk_opens_a_novnc_console(self) -> Any:
        import openstack

        from tests.peers import start_qemu_vnc
        from tests.rfb import rfb_handshake

        vnc = yield start_qemu_vnc(self)
        graphics = f"<graphics type='vnc' port='{vnc.port}' autoport='no' listen='{vnc.host}'/>"
        consoled, instance = yield self.consoled_for(graphics)
        base = f"http://127.0.0.1:{consoled.port('api')}/v2.1"

        def create() -> Any:
            connection = openstack.connect(
                auth_type="admin_token",
                auth={"token": KEY, "endpoint": base},
                compute_endpoint_override=base,
                compute_api_version="2.99",
            )
            try:
                return connection.compute.create_console(instance, console_type="novnc")
            finally:
                connection.close()

        console = yield threads.deferToThread(create)
        self.assertEqual((console["type"], console["protocol"]), ("novnc", "vnc"))
        token = parse_qs(urlsplit(parse_qs(urlsplit(console["url"]).query)["path"][0]).query)[
            "token"
        ][0]
        client = yield ws_connect(consoled.port("novnc"), token)
        width, height = yield defer.Deferred.fromCoroutine(rfb_handshake(client))
        self.assertGreater(width * height, 0)
        client.sendClose()
        yield client.closed

    @defer.inlineCallbacks
    def test_refusals_in_novas_shapes(self) -> Any:
        consoled, instance = yield self.consoled_for("")
        port = consoled.port("api")
        good = b'{"remote_console": {"protocol": "vnc", "type": "novnc"}}'
        cases = [
            (instance, b"{}", 400, "badRequest", "remote_console"),
            (
                instance,
                b'{"remote_console": {"protocol": "rdp", "type": "x"}}',
                400,
                "badRequest",
                "protocol",
            ),
            (
                instance,
                b'{"remote_console": {"protocol": "vnc", "type": "serial"}}',
                400,
                "badRequest",
                "type",
            ),
            (str(uuid.uuid4()), good, 404, "itemNotFound", "could not be found"),
            (instance, good, 409, "conflictingRequest", "no novnc console"),
        ]
        for target, body, code, name, words in cases:
            status, _, answer = yield self.post(port, target, body)
            fault = json.loads(answer)[name]
            self.assertEqual((status, fault["code"]), (code, code), answer)
            self.assertIn(words, fault["message"])
        status, _, _ = yield self.post(port, instance, good, key="wrong")
        self.assertEqual(status, 401)

    @defer.inlineCallbacks
    def test_serial_next_free_port(self) -> Any:
        """nova bug 1425640: each serial console asked for is the first port no user holds;
        with every port held, 409 naming how many and since when."""
        echoes = [hypervisors.serve(self, hypervisors.Echo) for _ in range(2)]
        devices = "".join(libvirt_serial("127.0.0.1", echo.port) for echo in echoes)
        consoled, instance = yield self.consoled_for(devices)
        body = b'{"remote_console": {"protocol": "serial", "type": "serial"}}'
        ports = []
        for _ in echoes:
            status, _, answer = yield self.post(consoled.port("api"), instance, body)
            self.assertEqual(status, 200, answer)
            url = json.loads(answer)["remote_console"]["url"]
            token = parse_qs(urlsplit(url).query)["token"][0]
            holder = yield ws_connect(consoled.port("serial"), token)
            self.addCleanup(holder.transport.abortConnection)
            holder.send(b"x")
            yield holder.read(1)
            (row,) = [r for r in consoled.session_rows() if r["ended_at"] is None][-1:]
            ports.append(row["port"])
        self.assertEqual(ports, [echo.port for echo in echoes])
        status, _, answer = yield self.post(consoled.port("api"), instance, body)
        fault = json.loads(answer)["conflictingRequest"]
        self.assertEqual(status, 409)
        self.assertIn("all 2 port(s)", fault["message"])
        self.assertIn("since", fault["message"])
