"""Capped logs of serial console output, one file per console port.

With ``[consoled] record_dir`` (or nova's ``[DEFAULT] record``, read as a
directory), everything a serial console prints is appended to
``<dir>/<host>_<port>.log`` through Twisted's ``LogFile``: rotated at
``record_max_bytes``, keeping ``record_max_files`` old files, so the logs never
grow without bound.  Attach, detach, kick and takeover are written into the
same file with the user's address and the time.  What users type is not
recorded (it may hold passwords).

Writes are small appends to a buffered file on the reactor thread; the buffer
is flushed on every event line and when a session detaches.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from twisted.logger import Logger
from twisted.python.logfile import LogFile

log = Logger()

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class Recorder:
    """Opens one rotating file per console host:port and shares it between sessions."""

    def __init__(self, directory: str, max_bytes: int, max_files: int, clock: Any) -> None:
        self.directory = directory
        self._max_bytes = max_bytes
        self._max_files = max_files
        self._clock = clock
        self._files: dict[tuple[str, int], tuple[LogFile, int]] = {}
        os.makedirs(directory, exist_ok=True)

    def open(self, host: str, port: int) -> Recording:
        key = (host, port)
        if key in self._files:
            logfile, users = self._files[key]
        else:
            name = _UNSAFE.sub("_", f"{host}_{port}") + ".log"
            logfile = LogFile(
                name,
                self.directory,
                rotateLength=self._max_bytes,
                maxRotatedFiles=self._max_files,
            )
            users = 0
        self._files[key] = (logfile, users + 1)
        return Recording(self, key, logfile)

    def _release(self, key: tuple[str, int]) -> None:
        logfile, users = self._files[key]
        if users <= 1:
            del self._files[key]
            logfile.close()
        else:
            self._files[key] = (logfile, users - 1)

    def stamp(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self._clock.seconds()))


class Recording:
    """One session's view of its console's log file."""

    def __init__(self, recorder: Recorder, key: tuple[str, int], logfile: LogFile) -> None:
        self._cap = recorder._max_bytes
        self._recorder = recorder
        self._key = key
        self._file: LogFile | None = logfile

    def output(self, data: bytes) -> None:
        """Console output, as it is."""
        logfile = self._file
        while logfile is not None and data:
            # Fill the current file up to the cap exactly; LogFile rotates
            # before the next write once it is full.
            room = self._cap - logfile.size
            if room <= 0:
                room = self._cap
            logfile.write(data[:room])
            data = data[room:]

    def event(self, text: str) -> None:
        """A line of its own: ``[consoled <time>] <text>``."""
        if self._file is not None:
            self.output(f"\r\n[consoled {self._recorder.stamp()}] {text}\r\n".encode())
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._file = None
            self._recorder._release(self._key)
