"""consoled.logs: twistd's text lines, character for character, faster."""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.logger import (
    FileLogObserver,
    LogLevel,
    LogPublisher,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from consoled.logs import ClassicText, speed_up_text_logs

NOW = 1_764_770_000.25


class Thing:
    name = "door"

    def __repr__(self) -> str:
        return "<Thing>"


def failure() -> Failure:
    try:
        raise ZeroDivisionError("an example")
    except ZeroDivisionError:
        return Failure()


EVENTS: list[dict[str, Any]] = [
    {"log_format": "session {n} started", "n": 7},
    {
        "log_format": "{a.name} {b!r} {c:.1f}s {d[k]}",
        "a": Thing(),
        "b": "x",
        "c": 1.25,
        "d": {"k": 3},
    },
    {"log_format": "two\nlines"},
    {"log_format": "missing {nothing}"},
    {"log_format": "called {f()}", "f": lambda: "yes"},
    {"log_format": "failed", "log_failure": failure()},
    {"log_format": "with system", "log_system": "consoled#9"},
    {"log_format": "system not text", "log_system": 5},
    {"log_format": b"bytes format"},
    {"log_format": ""},
    {"no": "format"},
    {"log_format": "no level", "log_level": None},
    {"log_format": "no namespace"},
    {"log_format": "braces {{literal}} {n:>4}", "n": 3},
]


def text_of(observer_of: Any, event: dict[str, Any]) -> str:
    out = io.StringIO()
    observer = observer_of(out)
    observer(event)
    return out.getvalue()


class ClassicTextTests(SynchronousTestCase):
    def base(self, event: dict[str, Any], **extra: Any) -> dict[str, Any]:
        full = {"log_time": NOW, "log_namespace": "consoled.sessions", "log_level": LogLevel.info}
        full.update(event)
        full.update(extra)
        return full

    def fast(self, out: io.StringIO) -> FileLogObserver:
        observer = textFileLogObserver(out)
        publisher = LogPublisher(observer)
        self.assertEqual(speed_up_text_logs(publisher), 1)
        self.assertIsInstance(observer.formatEvent, ClassicText)
        return observer

    def test_same_text_as_twisted(self) -> None:
        """Every kind of event comes out exactly as Twisted's observer writes it."""
        for event in EVENTS:
            for extra in ({}, {"log_time": None}, {"log_level": LogLevel.warn}):
                if "no namespace" in str(event.get("log_format")):
                    full = {"log_time": NOW, **event, **extra}
                else:
                    full = self.base(event, **extra)
                self.assertEqual(
                    text_of(self.fast, full), text_of(textFileLogObserver, full), repr(full)
                )

    def test_time_stamp_follows_the_second(self) -> None:
        """The stamp kept for one second changes with the next, as Twisted's does."""
        for when in (NOW, NOW + 0.5, NOW + 1, NOW + 3600.9, NOW - 86400):
            event = self.base({"log_format": "tick"}, log_time=when)
            out = io.StringIO()
            observer = self.fast(out)
            observer(self.base({"log_format": "first"}))  # fills the kept stamp
            observer(event)
            self.assertEqual(
                out.getvalue().splitlines(keepends=True)[-1],
                text_of(textFileLogObserver, event),
            )

    def test_custom_time_format_is_kept(self) -> None:
        """An observer made with another time format keeps it, fractions of a second too."""
        for time_format in ("%H:%M", "%H:%M:%S.%f"):
            out = io.StringIO()
            observer = textFileLogObserver(out, timeFormat=time_format)
            speed_up_text_logs(LogPublisher(observer))
            for when in (NOW, NOW + 0.5):
                event = self.base({"log_format": "hi"}, log_time=when)
                observer(event)
                twisted = text_of(
                    lambda o, f=time_format: textFileLogObserver(o, timeFormat=f), event
                )
                self.assertEqual(out.getvalue().splitlines(keepends=True)[-1], twisted)

    def test_json_observers_are_left_alone(self) -> None:
        """A JSON file observer is a FileLogObserver too: its lines stay JSON."""
        out = io.StringIO()
        observer = jsonFileLogObserver(out)
        self.assertEqual(speed_up_text_logs(LogPublisher(observer)), 0)
        observer(self.base({"log_format": "hello"}))
        self.assertEqual(json.loads(out.getvalue().strip("\x1e\n"))["log_format"], "hello")

    def test_given_once(self) -> None:
        """A second call finds the observer done and changes nothing."""
        publisher = LogPublisher(textFileLogObserver(io.StringIO()))
        self.assertEqual(speed_up_text_logs(publisher), 1)
        self.assertEqual(speed_up_text_logs(publisher), 0)
