"""The directories the enabled websocket doors serve their pages from.

A door whose pages are missing would answer every page URL that
``consoled-manage token create`` prints with 404 while it accepts websockets,
so start-up refuses instead, in one line naming the option and what to
install (`refusal`).  ``consoled-manage check`` reports the same lines.

| door | option | holds | comes from |
| --- | --- | --- | --- |
| novnc | ``[DEFAULT] web`` | noVNC (vnc_lite.html, vnc.html) | Debian's ``novnc`` |
| spice | ``[consoled] spice_web`` | spice-html5 (spice_auto.html) | Debian's ``spice-html5`` |
| serial | ``[consoled] serial_web`` | a serial page of the operator's | the operator |
| serial | ``[consoled] xterm_dir`` | xterm.js, for consoled's own serial.html | ``npm install`` |
| webmks | ``[consoled] mks_web`` | the WebMKS SDK page (when set) | the operator (VMware's SDK) |

The serial door's own page (``consoled/web/serial.html``) ships in the
package; xterm.js is required only while ``serial_web`` is unset, because
that page loads it.  Its fit add-on is optional (the terminal is then not
resized to the window) and is not checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from consoled.config import Settings


@dataclass(frozen=True)
class WebDirectory:
    """One directory a door serves, the option that names it, and its remedy."""

    door: str
    option: str
    path: str
    remedy: str

    @property
    def missing(self) -> bool:
        return not os.path.isdir(self.path)

    def refusal(self) -> str:
        """One line for an operator: door, option, the path (absolute too) and the remedy."""
        shown = self.path
        if not os.path.isabs(shown):
            shown += f" ({os.path.abspath(shown)})"
        return f"{self.door} door: {self.option} {shown}: no such directory; {self.remedy}"


def web_directories(settings: Settings) -> list[WebDirectory]:
    """Every directory the doors that ``settings`` enable need, in door order."""
    wanted = []
    if settings.novnc_door_enabled:
        wanted.append(
            WebDirectory(
                "novnc",
                "[DEFAULT] web",
                settings.default.web,
                "install noVNC (apt-get install novnc) or point the option at it",
            )
        )
    if settings.spice_door_enabled:
        wanted.append(
            WebDirectory(
                "spice",
                "[consoled] spice_web",
                settings.consoled.spice_web,
                "install spice-html5 (apt-get install spice-html5) or point the option at it",
            )
        )
    if settings.serial_door_enabled:
        c = settings.consoled
        if c.serial_web:
            wanted.append(
                WebDirectory(
                    "serial",
                    "[consoled] serial_web",
                    c.serial_web,
                    "create it with your serial page, or unset the option for consoled's own",
                )
            )
        else:
            wanted.append(
                WebDirectory(
                    "serial",
                    "[consoled] xterm_dir",
                    c.xterm_dir,
                    "install xterm.js (`npm install` in the consoled checkout, or "
                    "`npm install @xterm/xterm @xterm/addon-fit`) and point the option "
                    "at node_modules/@xterm/xterm",
                )
            )
    if settings.mks.enabled and settings.consoled.mks_web:
        wanted.append(
            WebDirectory(
                "webmks",
                "[consoled] mks_web",
                settings.consoled.mks_web,
                "put your WebMKS SDK page there, or unset the option for consoled's own page",
            )
        )
    return wanted


def missing_web_directories(settings: Settings) -> list[WebDirectory]:
    """The directories of `web_directories` that do not exist."""
    return [each for each in web_directories(settings) if each.missing]
