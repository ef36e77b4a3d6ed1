"""Hypothesis against the websocket doors' whole front: head reader, upgrade, Autobahn, gate.

Each example is one connection to the real ``DoorFactory`` (the request
head reader of consoled/doors/web.py, then Autobahn's upgrade through
``ConsoleServerProtocol``, or the static Site) with a real store and gate:
upgrade heads valid, refused and mutated, oversized heads, frames of every
kind and broken ones, random bytes, cut anywhere, with or without the
timeouts.  Whatever happens, nothing raises, nothing is logged as an
error, and once the user has gone no session is live, no row open, no
lease held and no timer left.  The WebMKS door is the same door with
another console type, so it runs too.  ``benchmarks/fuzz.py`` runs the same
feed for 100,000 inputs per door.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.fuzzing import DoorRig, pieces_for


def inputs(door: str) -> st.SearchStrategy[bytes]:
    piece = st.one_of(st.sampled_from(pieces_for(door)), st.binary(max_size=60))
    return st.lists(piece, max_size=8).map(b"".join)


EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
SIZES = st.lists(st.integers(1, 70), max_size=40)


class WebsocketDoorFuzzTests(SynchronousTestCase):
    def check(self, rig: DoorRig, data: bytes, sizes: list[int], wait: bool) -> None:
        self.assertIsNone(rig.feed(data, sizes, wait))

    @EXAMPLES
    @given(inputs("novnc"), SIZES, st.booleans())
    def test_novnc(self, data: bytes, sizes: list[int], wait: bool) -> None:
        """The noVNC door: any input ends cleanly and leaves nothing behind."""
        self.check(self.rig("novnc"), data, sizes, wait)

    @EXAMPLES
    @given(inputs("serial"), SIZES, st.booleans())
    def test_serial(self, data: bytes, sizes: list[int], wait: bool) -> None:
        """The serial websocket door (a leased console): nothing left behind."""
        self.check(self.rig("serial"), data, sizes, wait)

    @EXAMPLES
    @given(inputs("webmks"), SIZES, st.booleans())
    def test_webmks(self, data: bytes, sizes: list[int], wait: bool) -> None:
        """The WebMKS door: nothing left behind."""
        self.check(self.rig("webmks"), data, sizes, wait)

    def rig(self, door: str) -> DoorRig:
        # One rig (store, door) per test method, reused by its examples.
        rigs = self.__dict__.setdefault("_rigs", {})
        if door not in rigs:
            rigs[door] = DoorRig(door, self)
        return rigs[door]

    def test_valid_upgrade_then_frames(self) -> None:
        """A valid upgrade with frames after it starts a session that the user's leaving ends
        (the feed's checks are not vacuous: a session does start here)."""
        rig = DoorRig("serial", self)
        started: list[object] = []
        real_start = rig.core.sessions.start
        rig.core.sessions.start = lambda *a, **k: started.append(a) or real_start(*a, **k)  # type: ignore[method-assign]
        data = pieces_for("serial")[0] + pieces_for("serial")[11]
        self.assertIsNone(rig.feed(data, [], False))
        self.assertEqual(len(started), 1)
