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
from twisted.trial.unittest import SkipTest, TestCase

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

        issued = yield self.consoled.authorize("novnc", "192.0.2.5", 5901)

        def validate() -> Any:
            connection = sdk(self.port)
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

        from tests.peers import start_qemu_vnc
        from tests.rfb import rfb_handshake

        vnc = yield start_qemu_vnc(self)
        graphics = f"<graphics type='vnc' port='{vnc.port}' autoport='no' listen='{vnc.host}'/>"
        consoled, instance = yield self.consoled_for(graphics)

        def create() -> Any:
            connection = sdk(consoled.port("api"))
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


def call(
    port: int, method: str, path: str, body: Any = None, key: str | None = KEY
) -> defer.Deferred[tuple[int, dict[bytes, bytes], bytes]]:
    data = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if key is not None:
        lines.append(f"X-Auth-Token: {key}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    return http_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + data)


def sdk(port: int) -> Any:
    import openstack

    base = f"http://127.0.0.1:{port}/v2.1"
    return openstack.connect(
        auth_type="admin_token",
        auth={"token": KEY, "endpoint": base},
        compute_endpoint_override=base,
        compute_api_version="2.99",
    )


class ManagementCallTests(TestCase):
    """Console output, sessions, connection details, touch and token deletion (issue 14.4)."""

    timeout = 30

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.consoled = Consoled(
            self,
            test_settings(api_key_hashes=(KEY_HASH,), api_port=0, record_dir=self.directory),
        )
        self.port = self.consoled.port("api")
        self.echo = hypervisors.serve(self, hypervisors.Echo)

    @defer.inlineCallbacks
    def serial_session(self, data: bytes) -> Any:
        issued = yield self.consoled.authorize("serial", "127.0.0.1", self.echo.port)
        client = yield ws_connect(self.consoled.port("serial"), issued.token)
        self.addCleanup(client.transport.abortConnection)
        client.send(data)
        yield client.read(len(data))
        return issued, client

    def fault(self, answer: tuple[int, Any, bytes], code: int, name: str, words: str) -> None:
        status, _, body = answer
        fault = json.loads(body)[name]
        self.assertEqual((status, fault["code"]), (code, code), body)
        self.assertIn(words, fault["message"])

    @defer.inlineCallbacks
    def test_console_output(self) -> Any:
        """os-getConsoleOutput: the last N lines of the instance's serial console log, found
        through its session row; openstacksdk as the client; 400 naming length, 404 none."""
        yield self.serial_session(b"line one\r\nline two\r\nline three\r\n")

        def output(length: Any) -> Any:
            connection = sdk(self.port)
            try:
                return connection.compute.get_server_console_output(INSTANCE, length=length)
            finally:
                connection.close()

        answer = yield threads.deferToThread(output, 2)
        self.assertEqual(answer["output"], "line two\r\nline three\r\n")
        answer = yield threads.deferToThread(output, None)
        self.assertIn("line one\r\n", answer["output"])
        self.assertIn("attach 127.0.0.1 via websocket/serial", answer["output"])
        path = f"/v2.1/servers/{INSTANCE}/action"
        status, _, body = yield call(self.port, "POST", path, {"os-getConsoleOutput": {}})
        self.assertEqual(json.loads(body)["output"], answer["output"])
        for bad in (-3, "two", 1.5, True):
            answer = yield call(self.port, "POST", path, {"os-getConsoleOutput": {"length": bad}})
            self.fault(answer, 400, "badRequest", "length")
        answer = yield call(self.port, "POST", path, {"os-start": None})
        self.fault(answer, 400, "badRequest", "no such action")
        answer = yield call(
            self.port,
            "POST",
            f"/v2.1/servers/{uuid.uuid4()}/action",
            {"os-getConsoleOutput": {"length": 1}},
        )
        self.fault(answer, 404, "itemNotFound", "no serial console port")

    @defer.inlineCallbacks
    def test_console_output_through_the_allocator_and_rotated_files(self) -> Any:
        """An instance's allocated port leads to its log; rotated files are read too."""
        instance = str(uuid.uuid4())
        yield self.consoled.store.allocate_serial_ports(
            host="192.0.2.9",
            instance_uuid=instance,
            count=1,
            port_range=(10000, 10001),
            probe=lambda host, port: defer.succeed(True),
        )
        (allocated,) = yield self.consoled.store.serial_ports(instance_uuid=instance)
        os.makedirs(self.directory, exist_ok=True)
        name = os.path.join(self.directory, f"192.0.2.9_{allocated.port}.log")
        with open(name + ".1", "w") as f:
            f.write("old 1\nold 2\n")
        with open(name, "w") as f:
            f.write("new 1\nnew 2\n")
        path = f"/v2.1/servers/{instance}/action"
        status, _, body = yield call(
            self.port, "POST", path, {"os-getConsoleOutput": {"length": 3}}
        )
        self.assertEqual((status, json.loads(body)["output"]), (200, "old 2\nnew 1\nnew 2\n"))

    @defer.inlineCallbacks
    def test_sessions_listed_and_kicked(self) -> Any:
        issued, client = yield self.serial_session(b"hi")
        status, _, body = yield call(
            self.port, "GET", f"/v2.1/os-consoled-sessions?instance_uuid={INSTANCE}"
        )
        (session,) = json.loads(body)["sessions"]
        self.assertEqual((status, session["port"]), (200, self.echo.port))
        self.assertEqual(session["token_hash_prefix"], issued.connect_info.hash_prefix)
        self.assertNotIn(issued.token, body.decode())
        self.assertNotIn(issued.connect_info.token_hash, body.decode())
        status, _, body = yield call(self.port, "GET", "/v2.1/os-consoled-sessions?host=192.0.2.1")
        self.assertEqual(json.loads(body), {"sessions": []})
        action = f"/v2.1/os-consoled-sessions/{session['id']}/action"
        answer = yield call(self.port, "POST", action, {"kick": {"reason": 5}})
        self.fault(answer, 400, "badRequest", "reason")
        answer = yield call(self.port, "POST", action, {"shout": {}})
        self.fault(answer, 400, "badRequest", "no such action")
        for unknown in ("999999", "99999999999999999999", "x"):
            answer = yield call(
                self.port, "POST", f"/v2.1/os-consoled-sessions/{unknown}/action", {"takeover": {}}
            )
            self.fault(answer, 404, "itemNotFound", "could not be found")
        status, _, _ = yield call(self.port, "POST", action, {"kick": {"reason": "maintenance"}})
        self.assertEqual(status, 202)
        yield self.consoled.sessions.touch()
        yield client.closed
        yield self.consoled.wait_sessions_ended()
        (row,) = self.consoled.session_rows()
        self.assertIn("maintenance", row["end_reason"])
        answer = yield call(self.port, "POST", action, {"kick": {}})
        self.fault(answer, 404, "itemNotFound", "could not be found")

    @defer.inlineCallbacks
    def test_connections_touch_and_delete(self) -> Any:
        first = yield self.consoled.authorize("novnc", "192.0.2.5", 5901, ttl=60)
        yield self.consoled.authorize("spice-html5", "192.0.2.6", 5900, tls_port=5901)
        status, _, body = yield call(
            self.port, "GET", f"/v2.1/os-consoled-connections?instance_uuid={INSTANCE}"
        )
        connections = json.loads(body)["connections"]
        self.assertEqual([c["host"] for c in connections], ["192.0.2.5", "192.0.2.6"])
        self.assertEqual(connections[1]["tls_port"], 5901)
        self.assertEqual(connections[0]["token_hash_prefix"], first.connect_info.hash_prefix)
        self.assertNotIn(first.token, body.decode())
        self.assertNotIn(first.connect_info.token_hash, body.decode())
        status, _, body = yield call(
            self.port, "GET", "/v2.1/os-consoled-connections?host=192.0.2.6"
        )
        self.assertEqual([c["port"] for c in json.loads(body)["connections"]], [5900])
        answer = yield call(self.port, "GET", "/v2.1/os-consoled-connections")
        self.fault(answer, 400, "badRequest", "instance_uuid")

        touch = f"/v2.1/os-console-auth-tokens/{first.token}/action"
        status, _, body = yield call(self.port, "POST", touch, {"touch": {}})
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["console"]["port"], 5901)
        info = yield self.consoled.store.find_token(first.connect_info.token_hash)
        ttl = self.consoled.settings.token_ttl("novnc")
        self.assertGreaterEqual(info.expires, first.connect_info.expires - 60 + ttl)
        answer = yield call(
            self.port, "POST", "/v2.1/os-console-auth-tokens/nope/action", {"touch": {}}
        )
        self.fault(answer, 404, "itemNotFound", "invalid or has expired")

        status, _, body = yield call(
            self.port, "DELETE", f"/v2.1/servers/{INSTANCE}/os-consoled-tokens"
        )
        self.assertEqual((status, body), (204, b""))
        status, _, body = yield call(
            self.port, "GET", f"/v2.1/os-consoled-connections?instance_uuid={INSTANCE}"
        )
        self.assertEqual(json.loads(body), {"connections": []})
        answer = yield call(self.port, "POST", touch, {"touch": None})
        self.fault(answer, 404, "itemNotFound", "invalid or has expired")
        answer = yield call(
            self.port, "PUT", f"/v2.1/servers/{INSTANCE}/os-consoled-tokens", key=KEY
        )
        self.fault(answer, 405, "badMethod", "not allowed")


class OpenAPITests(TestCase):
    """/openapi.json describes every route; schemathesis finds no 500 and no answer off it."""

    timeout = 600

    def setUp(self) -> None:
        base = test_settings(api_key_hashes=(KEY_HASH,), api_port=0)
        # libvirt's own test driver (a "test" domain), so remote-consoles is answered quickly.
        settings = dataclasses.replace(
            base, libvirt=dataclasses.replace(base.libvirt, connection_uri="test:///default")
        )
        self.consoled = Consoled(self, settings)
        self.port = self.consoled.port("api")

    @defer.inlineCallbacks
    def test_every_route_is_described(self) -> Any:
        from consoled.api import ROUTES

        status, _, body = yield call(self.port, "GET", "/openapi.json", key=None)
        document = json.loads(body)
        self.assertEqual((status, document["openapi"]), (200, "3.1.0"))
        self.assertEqual(
            document["components"]["securitySchemes"]["X-Auth-Token"],
            {"type": "apiKey", "in": "header", "name": "X-Auth-Token"},
        )
        described = {
            (method.upper(), path)
            for path, item in document["paths"].items()
            for method in item
            if method != "parameters"
        }
        answered = set(ROUTES) | {
            ("GET", "/"),
            ("GET", "/healthz"),
            ("GET", "/metrics"),
            ("GET", "/openapi.json"),
        }
        self.assertEqual(described, answered)
        for path, item in document["paths"].items():
            for method, operation in item.items():
                if method == "parameters" or not path.startswith("/v2.1/"):
                    continue
                self.assertEqual(operation["security"], [{"X-Auth-Token": []}], path)
                self.assertIn("401", operation["responses"], path)

    @defer.inlineCallbacks
    def test_schemathesis(self) -> Any:
        """Every operation, 25 examples each: no 500, status, content type and body as described."""
        try:
            import hypothesis
            import schemathesis
            from schemathesis.checks import not_a_server_error
            from schemathesis.specs.openapi.checks import (
                content_type_conformance,
                response_schema_conformance,
                status_code_conformance,
            )
        except ImportError:
            raise SkipTest("schemathesis is not installed (pip install -e .[test])")
        from consoled.api.openapi import document

        yield self.consoled.authorize("novnc", "192.0.2.5", 5901)
        base = f"http://127.0.0.1:{self.port}"
        checks = [
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ]

        def run() -> list[str]:
            schema = schemathesis.openapi.from_dict(document())
            ran = []
            for result in schema.get_all_operations():
                operation = result.ok()

                @hypothesis.settings(
                    max_examples=25,
                    deadline=None,
                    database=None,
                    derandomize="CONSOLED_SCHEMATHESIS_RANDOM" not in os.environ,
                    suppress_health_check=list(hypothesis.HealthCheck),
                    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                )
                @hypothesis.given(case=operation.as_strategy())
                def examples(case: Any) -> None:
                    response = case.call(base_url=base, headers={"X-Auth-Token": KEY}, timeout=10)
                    case.validate_response(response, checks=checks)

                examples()
                ran.append(f"{operation.method.upper()} {operation.path}")
            return ran

        ran = yield threads.deferToThread(run)
        self.assertEqual(len(ran), 13)
