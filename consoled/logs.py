"""twistd's text log lines, made faster without changing a character of them.

twistd writes each event through ``textFileLogObserver``, whose formatter
(``formatEventAsClassicLogText``) formats the message with a pure-Python
``string.Formatter`` and builds the time stamp through a time zone object for
every line: about 38 µs a line here, and a session logs two (started, ended),
7 % of a session's set-up under a reconnect storm (issue 16).

`ClassicText` makes the same line (``"{time} [{system}] {message}\\n"``,
continuation lines tab-indented) with ``str.format_map`` and a time stamp
kept for the current second: about 3 µs.  Whatever it does not handle the
same way for certain (a format that calls ``{name()}``, a ``log_failure``'s
traceback, bytes formats, flattened events, any formatting error) goes to
Twisted's own formatter, so the text is Twisted's in every case.

`speed_up_text_logs` gives the formatter to the text file observers twistd
installed (``--logfile``, or standard output with ``-n``); a JSON or syslog
observer, or one a test installs, is left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import FileLogObserver, LogPublisher, formatTime, globalLogPublisher

__all__ = ["ClassicText", "speed_up_text_logs"]


class ClassicText:
    """A text file observer's formatter: Twisted's line, with a fast path."""

    def __init__(
        self, fallback: Callable[[dict[str, Any]], str | None], time_format: str | None
    ) -> None:
        self.fallback = fallback
        self._time_format = time_format
        self._second: int | None = None
        self._stamp = "-"

    def _time(self, when: float | None) -> str:
        if when is None or self._time_format is None:
            return "-"
        if "%f" in self._time_format:  # a stamp with fractions is made each time
            return formatTime(when, self._time_format)
        second = int(when)
        if second != self._second:  # the format has no fraction: one stamp a second
            self._second, self._stamp = second, formatTime(second, self._time_format)
        return self._stamp

    def __call__(self, event: dict[str, Any]) -> str | None:
        fmt = event.get("log_format")
        if (
            type(fmt) is not str
            or "()" in fmt
            or "log_failure" in event
            or "log_flattened" in event
        ):
            return self.fallback(event)
        try:
            text = fmt.format_map(event)
        except Exception:  # Twisted's formatter says what went wrong, in its words
            return self.fallback(event)
        if not text:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        elif type(system) is not str:
            return self.fallback(event)
        line = f"{self._time(event.get('log_time'))} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"


def _text_time_format(format_event: Any) -> tuple[bool, str | None]:
    """Whether ``format_event`` is ``textFileLogObserver``'s, and its time format."""
    code = getattr(format_event, "__code__", None)
    if getattr(format_event, "__qualname__", "") != "textFileLogObserver.<locals>.formatEvent":
        return False, None
    names = code.co_freevars if code is not None else ()
    if "timeFormat" not in names or format_event.__closure__ is None:
        return False, None
    return True, format_event.__closure__[names.index("timeFormat")].cell_contents


def speed_up_text_logs(publisher: LogPublisher = globalLogPublisher) -> int:
    """Give the publisher's text file observers `ClassicText`; how many were given it.

    Only observers ``textFileLogObserver`` made are changed, each keeping its
    own time format; a JSON file observer is a FileLogObserver too, and keeps
    its formatter.
    """
    given = 0
    for observer in getattr(publisher, "_observers", ()):
        if not isinstance(observer, FileLogObserver):
            continue
        is_text, time_format = _text_time_format(observer.formatEvent)
        if is_text:
            observer.formatEvent = ClassicText(observer.formatEvent, time_format)
            given += 1
    return given
