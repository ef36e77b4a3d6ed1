"""A vCenter simulator for tests: tests/vcsim/main.go, built and started here.

The binary is built once per test run (the first test that asks), offline,
from Debian's govmomi 0.24 source into a temporary directory, and started per
test on a free port; a cleanup stops it.  pyvmomi reaches it over plain HTTP
(``SmartConnect(protocol="http", …)``).  With CI=true a missing Go toolchain,
govmomi source or pyvmomi fails the test instead of skipping it.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests import peers

SOURCE = Path(__file__).resolve().parent / "vcsim" / "main.go"
GOCODE = "/usr/share/gocode"
GOVMOMI = Path(GOCODE) / "src/github.com/vmware/govmomi/simulator"
GO_HINT = "apt-get install -y --no-install-recommends golang-go golang-github-vmware-govmomi-dev"
PYVMOMI_HINT = ".venv/bin/pip install pyvmomi"
USER, PASSWORD = "consoled", "vcsim-password"
START_TIMEOUT = 30.0
#: The sslThumbprint every simulated ticket carries (tests/vcsim/main.go).
THUMBPRINT = "6F:E1:3A:0C:52:9D:44:B7:21:8E:A0:33:7C:19:D5:E2:90:4B:6A:1F"

_build: Deferred[str] | None = None


class BuildFailed(Exception):
    """go build failed; the message holds its output."""


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def build_vcsim(testcase: unittest.TestCase) -> Deferred[str]:
    """The simulator binary's path, built on first use (about 20-40 s cold)."""
    global _build
    go = peers.require_executable(testcase, "go", GO_HINT)
    peers.require_peer(testcase, "govmomi's source", GOVMOMI.is_dir(), GO_HINT)
    available = importlib.util.find_spec("pyVmomi") is not None
    peers.require_peer(testcase, "pyvmomi", available, PYVMOMI_HINT)
    if _build is None:
        _build = Deferred.fromCoroutine(_go_build(go))
    # Every caller gets its own Deferred with the result; a failed build is retried.
    mine: Deferred[str] = Deferred()

    def share(result: Any) -> Any:
        global _build
        if isinstance(result, Failure):
            _build = None
            mine.errback(result)
            return None
        mine.callback(result)
        return result

    _build.addBoth(share)
    return mine


async def _go_build(go: str) -> str:
    directory = tempfile.mkdtemp(prefix="consoled-vcsim-")
    atexit.register(shutil.rmtree, directory, True)
    binary = os.path.join(directory, "vcsim")
    env = dict(os.environ, GO111MODULE="off", GOPATH=f"{directory}/gopath:{GOCODE}")
    env.setdefault("GOCACHE", os.path.join(os.path.expanduser("~"), ".cache", "go-build"))
    out, err, code = await getProcessOutputAndValue(
        go, ["build", "-o", binary, str(SOURCE)], env=env, path=str(SOURCE.parent)
    )
    if code != 0:
        shutil.rmtree(directory, ignore_errors=True)
        raise BuildFailed(f"go build exited {code}: {(out + err).decode(errors='replace')}")
    return binary


@dataclass(frozen=True)
class Vcsim:
    """A running simulator: where pyvmomi finds it and the one login it accepts."""

    host: str
    port: int
    user: str
    password: str

    def connect(self) -> Any:
        """A pyvmomi ServiceInstance (blocking: call it in a thread)."""
        from pyVim.connect import SmartConnect

        return SmartConnect(
            protocol="http", host=self.host, port=self.port, user=self.user,
            pwd=self.password, disableSslCertValidation=True,
        )  # fmt: skip


class _VcsimProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred[str] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for line in self.output.splitlines():
            if line.startswith(b"LISTENING ") and not self.listening.called:
                self.listening.callback(line.split(b" ", 1)[1].decode())

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        if not self.listening.called:
            self.listening.errback(peers.PeerStartError(f"vcsim exited: {self.output!r}"))
        self.ended.callback(None)

    def stop(self) -> Deferred[None]:
        try:
            assert self.transport is not None
            self.transport.signalProcess("TERM")
        except ProcessExitedAlready:
            pass
        return self.ended


def start_vcsim(testcase: unittest.TestCase) -> Deferred[Vcsim]:
    """Build (once) and start the simulator; a cleanup stops it."""
    return Deferred.fromCoroutine(_start(testcase))


async def _start(testcase: unittest.TestCase) -> Vcsim:
    binary = await build_vcsim(testcase)
    process = _VcsimProcess()
    argv = [binary, "-listen", f"{peers.HOST}:0", "-login", f"{USER}:{PASSWORD}"]
    _reactor().spawnProcess(process, binary, argv, env=dict(os.environ))
    testcase.addCleanup(process.stop)
    try:
        url = await process.listening.addTimeout(START_TIMEOUT, _reactor())
    except defer.TimeoutError:
        raise peers.PeerStartError(f"vcsim said nothing within {START_TIMEOUT}s") from None
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return Vcsim(parts.hostname, parts.port, USER, PASSWORD)
