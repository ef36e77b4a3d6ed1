"""Session ends written together under load (consoled.sessions.Ends), on a store that answers when told."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from consoled import sessions
from consoled.sessions import Ends


class HeldStore:
    """Records each end_sessions call and answers it when the test fires it."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], defer.Deferred[None]]] = []

    def ending(self, session_id: int, **values: Any) -> dict[str, Any]:
        return {"session_id": session_id, **values}

    def end_sessions(self, endings: list[dict[str, Any]]) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.calls.append(([e["session_id"] for e in endings], d))
        return d


class EndsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = HeldStore()
        self.ends = Ends(self.store)  # type: ignore[arg-type]

    def end(self, session_id: int) -> defer.Deferred[None]:
        return self.ends.end(session_id, reason="r", bytes_to_client=1, bytes_to_server=2)

    def test_alone_at_once_then_together(self) -> None:
        """The first end goes at once; those that come while it is written go
        together when it is, each firing with its batch."""
        first = self.end(1)
        rest = [self.end(n) for n in (2, 3, 4)]
        self.assertEqual([ids for ids, _ in self.store.calls], [[1]])
        self.assertNoResult(first)
        self.store.calls[0][1].callback(None)
        self.successResultOf(first)
        self.assertEqual([ids for ids, _ in self.store.calls], [[1], [2, 3, 4]])
        for d in rest:
            self.assertNoResult(d)
        self.store.calls[1][1].callback(None)
        for d in rest:
            self.successResultOf(d)
        self.end(5)  # nothing in flight: at once again
        self.assertEqual(self.store.calls[2][0], [5])

    def test_batches_are_bounded(self) -> None:
        """Never more than MAX_ENDS_AT_ONCE in one unit of work."""
        self.patch(sessions, "MAX_ENDS_AT_ONCE", 3)
        waiting = [self.end(n) for n in range(8)]
        while any(not d.called for d in waiting):
            self.store.calls[-1][1].callback(None)
        self.assertEqual([ids for ids, _ in self.store.calls], [[0], [1, 2, 3], [4, 5, 6], [7]])

    def test_a_failed_batch_fails_each_end(self) -> None:
        """A batch that fails (not an outage: the breaker keeps those) fails every
        end in it with the error, and the next batch still goes."""
        first = self.end(1)
        second, third = self.end(2), self.end(3)
        self.store.calls[0][1].callback(None)
        self.store.calls[1][1].errback(ValueError("bad statement"))
        for d in (second, third):
            self.failureResultOf(d, ValueError)
        self.successResultOf(first)
        later = self.end(4)
        self.store.calls[2][1].callback(None)
        self.successResultOf(later)
