"""The vSphere driver asks a vCenter simulator for WebMKS tickets through pyvmomi.

The simulator (tests/vcsim/main.go, govmomi 0.24's ``simulator.VPX()``) is
built in the set-up and started per test; each test gives one of its VMs an
instance UUID with a real ``ReconfigVM_Task`` and asks the driver for that
instance's console.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from consoled.drivers import HypervisorUnreachable, NoSuchConsole, NoSuchInstance
from consoled.tokens import ConnectInfo
from tests import peers, vsphere

NOVA_THUMBPRINT = vsphere.THUMBPRINT.replace(":", "").lower()


def _prepare(simulator: vsphere.Vcsim, instance_uuid: str) -> tuple[Any, Any]:
    """(admin session, VM) with the VM's instanceUuid set; the second VM powered off."""
    from pyVim.task import WaitForTask
    from pyVmomi import vim

    service = simulator.connect()
    content = service.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    machines = sorted(view.view, key=lambda vm: vm.name)
    machine = machines[0]
    WaitForTask(machine.ReconfigVM_Task(spec=vim.vm.ConfigSpec(instanceUuid=instance_uuid)))
    return service, machine


class VsphereDriverTests(unittest.TestCase):
    """Tickets from a simulated vCenter, in the fields nova writes."""

    # The first test may build the simulator (about 20-40 s on a cold Go cache).
    timeout = 240

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.simulator = yield vsphere.start_vcsim(self)
        from consoled.drivers import vmware

        self.vmware = vmware
        self.instance = str(uuid.uuid4())
        self.admin, self.machine = yield threads.deferToThread(
            _prepare, self.simulator, self.instance
        )
        self.vmx, self.esx = yield threads.deferToThread(
            lambda: (self.machine.config.files.vmPathName, self.machine.runtime.host.name)
        )
        self.driver = self.make_driver(self.simulator.password)

    def make_driver(self, password: str, port: int | None = None) -> Any:
        from twisted.internet import reactor

        made = self.vmware.VsphereDriver(
            reactor,
            self.simulator.host,
            self.simulator.port if port is None else port,
            self.simulator.user,
            password,
            protocol="http",
            insecure=True,
        )
        self.addCleanup(made.close)
        return made

    @defer.inlineCallbacks
    def test_mks_ticket_as_nova_writes_it(self) -> Any:
        """An mks ticket gives a webmks row as nova's get_mks_console: the ticket's host and port, JSON ticket/cfgFile/thumbprint in that order."""
        (found,) = yield self.driver.consoles(self.instance)
        self.assertEqual((found.console_type, found.host, found.port), ("webmks", self.esx, 902))
        self.assertIsNone(found.tls_port)
        fields = json.loads(found.internal_access_path)
        self.assertEqual(list(fields), ["ticket", "cfgFile", "thumbprint"])
        self.assertEqual(fields["cfgFile"], self.vmx)
        self.assertEqual(fields["thumbprint"], NOVA_THUMBPRINT)
        self.assertRegex(fields["ticket"], "^[0-9a-f]{32}$")
        # Byte for byte what nova's jsonutils.dumps writes.
        self.assertEqual(found.internal_access_path, json.dumps(fields))
        # consoled's own WebMKS door reads it as an authd ticket.
        from consoled.backends.webmks import MksTicket

        row = ConnectInfo(1, "0" * 64, "webmks", found.host, found.port, None,
                          found.internal_access_path, self.instance, None, 0)  # fmt: skip
        ticket = MksTicket.from_row(row)
        self.assertEqual((ticket.cfg_file, ticket.direct), (self.vmx, False))

    @defer.inlineCallbacks
    def test_webmks_ticket_direct_form(self) -> Any:
        """A webmks ticket gives the direct form (ticket, thumbprint, direct) on the ticket's port 443."""
        (found,) = yield self.driver.consoles(self.instance, "webmks", ticket_type="webmks")
        self.assertEqual((found.host, found.port), (self.esx, 443))
        fields = json.loads(found.internal_access_path)
        self.assertEqual(list(fields), ["ticket", "thumbprint", "direct"])
        self.assertEqual((fields["thumbprint"], fields["direct"]), (NOVA_THUMBPRINT, True))

    @defer.inlineCallbacks
    def test_no_such_instance(self) -> Any:
        """An instance UUID no VM has, and text that is no UUID, fail with NoSuchInstance."""
        for wrong in (str(uuid.uuid4()), "vm-57"):
            with self.assertRaises(NoSuchInstance) as caught:
                yield self.driver.consoles(wrong)
            self.assertIn(wrong, str(caught.exception))

    @defer.inlineCallbacks
    def test_no_such_console(self) -> Any:
        """A powered-off VM (InvalidState from AcquireTicket) and a console type other than webmks: NoSuchConsole."""
        from pyVim.task import WaitForTask

        yield threads.deferToThread(lambda: WaitForTask(self.machine.PowerOffVM_Task()))
        with self.assertRaises(NoSuchConsole) as caught:
            yield self.driver.consoles(self.instance)
        self.assertIn("not powered on", str(caught.exception))
        with self.assertRaises(NoSuchConsole) as caught:
            yield self.driver.consoles(self.instance, "novnc")
        self.assertIn("WebMKS only", str(caught.exception))

    @defer.inlineCallbacks
    def test_unreachable(self) -> Any:
        """A refused login and a refused connection fail with HypervisorUnreachable."""
        with self.assertRaises(HypervisorUnreachable) as caught:
            yield self.make_driver("wrong").consoles(self.instance)
        self.assertIn("login was refused", str(caught.exception))
        closed = peers.free_port()
        with self.assertRaises(HypervisorUnreachable) as caught:
            yield self.make_driver(self.simulator.password, port=closed).consoles(self.instance)
        self.assertIn(f":{closed}", str(caught.exception))

    @defer.inlineCallbacks
    def test_logs_in_again_after_session_ends(self) -> Any:
        """When vCenter ends the driver's session (TerminateSession), the next call logs in again."""
        yield self.driver.consoles(self.instance)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        def terminate_others() -> int:
            manager = self.admin.content.sessionManager
            mine = manager.currentSession.key
            others = [s.key for s in manager.sessionList if s.key != mine]
            manager.TerminateSession(sessionId=others)
            return len(others)

        ended = yield threads.deferToThread(terminate_others)
        self.assertGreaterEqual(ended, 1)
        (found,) = yield self.driver.consoles(self.instance)
        self.assertEqual(found.port, 902)
        said = [e["log_format"] for e in events if e.get("log_namespace") == self.vmware.__name__]
        self.assertEqual(said, ["{where}: session ended; logging in again"])
