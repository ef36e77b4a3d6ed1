"""The real peers in `tests.peers` start, answer as documented, and go away."""

from __future__ import annotations

import os
import socket
import struct

from twisted.trial import unittest

from tests import peers

RFB_VERSION = b"RFB 003.008\n"


def _security_types_complete(reply: bytes) -> bool:
    # RFB 3.8 security types: one count byte, then that many type bytes.
    return len(reply) >= 1 and len(reply) >= 1 + reply[0]


class RequirePeerTests(unittest.SynchronousTestCase):
    """require_peer skips locally and fails in CI."""

    def setUp(self) -> None:
        self.saved_ci = os.environ.pop("CI", None)

    def tearDown(self) -> None:
        os.environ.pop("CI", None)
        if self.saved_ci is not None:
            os.environ["CI"] = self.saved_ci

    def test_available_does_nothing(self) -> None:
        """An available peer neither skips nor fails the test."""
        peers.require_peer(self, "thing", True, "install thing")

    def test_missing_skips_outside_ci(self) -> None:
        """A missing peer raises SkipTest naming the hint when CI is not 'true'."""
        with self.assertRaises(unittest.SkipTest) as caught:
            peers.require_peer(self, "thing", False, "install thing")
        self.assertIn("install thing", str(caught.exception))

    def test_missing_fails_in_ci(self) -> None:
        """A missing peer fails the test when CI=true, so CI never skips silently."""
        os.environ["CI"] = "true"
        with self.assertRaises(self.failureException) as caught:
            peers.require_peer(self, "thing", False, "install thing")
        self.assertEqual(str(caught.exception), "thing is required in CI: install thing")

    def test_missing_executable(self) -> None:
        """require_executable skips for a name that is not on PATH."""
        with self.assertRaises(unittest.SkipTest):
            peers.require_executable(self, "no-such-binary-consoled", "hint")


class SpiceLinkMessageTests(unittest.SynchronousTestCase):
    """spice_link_message lays out the SPICE link handshake as the protocol says."""

    def test_layout(self) -> None:
        """Header REDQ 2.2 with size 18, then an 18-byte SpiceLinkMess for main."""
        message = peers.spice_link_message()
        self.assertEqual(len(message), 16 + 18)
        self.assertEqual(peers.spice_link_header(message), (b"REDQ", 2, 2, 18))
        self.assertEqual(struct.unpack("<IBBIII", message[16:]), (0, 1, 0, 0, 0, 18))


class QemuPeerTests(unittest.TestCase):
    """Real QEMU peers on 127.0.0.1, cleaned up after each test."""

    async def test_vnc_answers_rfb(self) -> None:
        """QEMU's VNC server greets a client with the RFB 3.8 version line."""
        peer = await peers.start_qemu_vnc(self)
        greeting = await peers.connect_and_read(peer.host, peer.port, RFB_VERSION)
        self.assertEqual(greeting, RFB_VERSION)

    async def test_vnc_password_offers_vnc_auth(self) -> None:
        """With a password QEMU offers exactly security type 2 (VNC auth)."""
        peer = await peers.start_qemu_vnc(self, password="s3cret")
        transcript = await peers.tcp_exchange(
            peer.host,
            peer.port,
            RFB_VERSION,
            _security_types_complete,
            after=RFB_VERSION,
        )
        self.assertTrue(transcript.startswith(RFB_VERSION))
        security = transcript[len(RFB_VERSION) :]
        self.assertEqual(list(security[1 : 1 + security[0]]), [2])

    async def test_spice_link_reply(self) -> None:
        """QEMU's SPICE server answers a SpiceLinkMess with a REDQ 2.x reply."""
        peer = await peers.start_qemu_spice(self)
        reply = await peers.tcp_exchange(
            peer.host,
            peer.port,
            peers.spice_link_message(),
            peers.spice_link_reply_complete,
        )
        header = peers.spice_link_header(reply)
        assert header is not None
        magic, major, _minor, size = header
        self.assertEqual((magic, major), (b"REDQ", 2))
        # SpiceLinkReply: error (0 = OK) comes first in the body.
        self.assertGreater(size, 4)
        self.assertEqual(struct.unpack_from("<I", reply, 16), (0,))

    async def test_serial_bios_banner(self) -> None:
        """The first client of a wait=on serial chardev sees SeaBIOS's banner."""
        peer = await peers.start_qemu_serial_bios(self)
        # The UART delivers a byte at a time: wait for the whole banner line.
        output = await peers.connect_and_read(peer.host, peer.port, b")\r\n")
        self.assertRegex(output, rb"SeaBIOS \(version [^)]+\)\r\n")

    async def test_monitor_serves_sequential_clients(self) -> None:
        """The HMP monitor shows banner and prompt and answers `info status`,
        to one client and then to the next once the first has gone (so the
        readiness probe did not keep the chardev's only client slot)."""
        peer = await peers.start_qemu_monitor(self)
        for _client in range(2):
            transcript = await peers.tcp_exchange(
                peer.host,
                peer.port,
                b"info status\r\n",
                b"VM status: ",
                after=b"(qemu) ",
            )
            self.assertRegex(transcript, rb"^QEMU [\d.]+ monitor ")
            self.assertIn(b"\r\n(qemu) ", transcript)
            self.assertIn(b"VM status: ", transcript)

    async def test_read_timeout_reports_received(self) -> None:
        """connect_and_read gives up after its timeout with what it got, and
        closes its connection so the monitor serves the next client."""
        peer = await peers.start_qemu_monitor(self)
        with self.assertRaises(peers.ExchangeFailed) as caught:
            await peers.connect_and_read(peer.host, peer.port, b"never", timeout=0.3)
        self.assertIn(b"(qemu) ", caught.exception.received)
        again = await peers.connect_and_read(peer.host, peer.port, b"(qemu) ")
        self.assertIn(b" monitor ", again)

    async def test_cleanup_reaps_qemu(self) -> None:
        """Stopping a peer's process (what the registered cleanup does) leaves
        no QEMU process behind; trial's dirty-reactor check covers the rest."""
        peer = await peers.start_qemu_monitor(self)
        pid = peer.process.pid
        assert pid is not None
        self.assertTrue(os.path.exists(f"/proc/{pid}"))
        await peer.process.stop()
        self.assertTrue(peer.process.has_ended)
        self.assertFalse(os.path.exists(f"/proc/{pid}"))
        # The cleanup trial runs later is then a no-op.
        await peer.process.stop()

    async def test_start_failure_reports_stderr(self) -> None:
        """A QEMU that exits during start fails with its stderr in the error."""
        starting = peers.start_qemu(self, lambda port: ["-machine", "no-such-machine"])
        with self.assertRaises(peers.PeerStartError) as caught:
            await starting
        self.assertIn("no-such-machine", str(caught.exception))

    async def test_port_taken_retries(self) -> None:
        """When QEMU finds its port taken it exits, and the starter retries on
        a new port and serves there (the free_port race is survivable)."""
        # Bound but not listening: QEMU's bind fails, and a probe is refused
        # rather than reaching this socket, so the outcome is deterministic.
        squatter = socket.socket()
        self.addCleanup(squatter.close)
        squatter.bind((peers.HOST, 0))
        taken = squatter.getsockname()[1]
        ports = iter([taken, peers.free_port()])

        def monitor(port: int) -> list[str]:
            chardev = f"socket,id=mon,host={peers.HOST},port={port},server=on,wait=off"
            return [
                *("-machine", "none", "-nodefaults", "-display", "none"),
                *("-chardev", chardev, "-mon", "chardev=mon,mode=readline"),
            ]

        peer = await peers.start_qemu(self, monitor, pick_port=lambda: next(ports))
        self.assertNotEqual(peer.port, taken)
        banner = await peers.connect_and_read(peer.host, peer.port, b"(qemu) ")
        self.assertIn(b" monitor ", banner)
