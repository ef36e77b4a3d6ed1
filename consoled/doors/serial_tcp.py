"""The raw TCP serial door: ``telnet``, ``nc``, ``socat``, ``openssl s_client`` users.

The exchange (docs/serial.md has the whole of it)::

    server:  IAC WILL ECHO IAC WILL SUPPRESS-GO-AHEAD   (6 bytes, the telnet offer)
             consoled serial console: type your token and press Enter\\r\\n
             token:
    client:  TOKEN and CR, LF, CR LF or CR NUL (backspace edits; no echo but \\r\\n)
    server:  connected to the serial console of instance UUID; escape is Ctrl-] (then ? for help)
             console bytes both ways; Ctrl-] then . q w ? or Ctrl-] for the escape commands

A client that sends an IAC before its session starts has answered the offer
and speaks telnet for good; any other client is raw, its bytes untouched.
Last lines: a refusal's text (3 tries), ``too many tries, goodbye``, ``no
token within Ns, goodbye``, ``console unavailable: ENDING`` before the
session starts, ``[ENDING]`` after it, ``disconnected`` after the escape.
States: ``prompting``, ``admitting`` (the gate: consoled/gate.py), then
``relaying`` (a writer, or a spectator seat of a busy port, whose keys the
session drops), ``closed``.  Refusals are the gate's, printed as their kind's
text (docs/refusals.md).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from consoled.doors.escape import HELP, EscapeReader
from consoled.doors.stream import GatedStream
from consoled.doors.telnet import CR, LF, NUL, OFFER, TelnetCodec
from consoled.endings import Ending, Kind, Refusal
from consoled.gate import MAX_TOKEN_LENGTH, Gate, Pass, log_refusal
from consoled.sessions.relay import write_now

log = Logger()

DOOR = "serial-tcp"
BACKSPACES = (0x08, 0x7F)
QUITS = (0x03, 0x04)  # Ctrl-C, Ctrl-D leave the prompt: socat raw has no other way out

BANNER = b"consoled serial console: type your token and press Enter\r\n"
PROMPT = b"token: "
MAX_TRIES = 3
#: Bytes typed while the token is checked, kept for the console; reading pauses past it.
MAX_EARLY = 4 * 1024
#: Refusals after which the user may type another token; any other ends the connection.
RETRY = frozenset({Kind.NO_TOKEN, Kind.INVALID_TOKEN, Kind.WRONG_CONSOLE_TYPE, Kind.BAD_REQUEST})


class SerialTCPProtocol(GatedStream):
    """One terminal user's connection; the relay's ClientSide."""

    factory: SerialTCPFactory
    door = DOOR
    state = "prompting"
    #: the admitted session (it answers the escape ``w``)
    _pass: Pass | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.consumer = self.producer = self.transport
        # Real telnet (inetutils, netkit) negotiates nothing on a port other
        # than 23 unless the server does: without this offer it would stay in
        # line mode and show the token as it is typed.  nc and socat show the
        # 6 bytes as a little noise before the banner, as with any telnet server.
        self.telnet = TelnetCodec(self.transport.write)
        self.speaks_telnet = False
        self._line = bytearray()
        self._too_long = False
        self._swallow_newline = False  # an LF or NUL right after the CR that ended a line
        self._tries = 0
        self._early: list[bytes] = []
        self._early_size = 0
        self._ready = False
        self._escape = EscapeReader(self._forward, self._escape_command)
        self.wait(self.factory.prompt_timeout, self._timed_out)
        self.transport.write(OFFER + BANNER + PROMPT)

    def dataReceived(self, data: bytes) -> None:
        if self.state == "closed":
            return
        if not self.speaks_telnet:
            before_session = self.relay is None and self.state in ("prompting", "admitting")
            iac = data.find(b"\xff") if before_session else -1
            if iac < 0:
                self._input(data)
                return
            # An IAC before the session starts answers our offer: telnet for good.
            self.speaks_telnet = True
            self._input(data[:iac])
            if self.state == "closed":
                return
            data = data[iac:]
        # Telnet commands are consumed here, BREAK on purpose: a break on the
        # serial line is a magic SysRq prefix that can reboot a Linux guest.
        self._input(self.telnet.feed(data))

    def _input(self, data: bytes) -> None:
        if self.state == "prompting":
            self._prompt_input(data)
            return
        if self._swallow_newline and data:
            self._swallow_newline = False
            if data[0] in (LF, NUL):
                data = data[1:]
        if not data or self.state == "closed":
            return
        if self.relay is not None:
            self._escape.feed(data)
        else:
            self._early.append(data)
            self._early_size += len(data)
            if self._early_size > MAX_EARLY:
                self.transport.pauseProducing()

    def _replay_early(self) -> None:
        early, self._early, self._early_size = self._early, [], 0
        self.transport.resumeProducing()
        for chunk in early:
            self._input(chunk)

    # -- the prompt ---------------------------------------------------------

    def _prompt_input(self, data: bytes) -> None:
        for at, byte in enumerate(data):
            swallow, self._swallow_newline = self._swallow_newline, False
            if swallow and byte in (LF, NUL):
                continue
            if byte in (CR, LF):
                # (the telnet layer already turns CR LF and CR NUL into one CR)
                self._swallow_newline = byte == CR and not self.speaks_telnet
                self._line_ended()
                if self.state != "prompting":
                    self._input(data[at + 1 :])
                    return
            elif byte in BACKSPACES:
                del self._line[-1:]
            elif byte in QUITS:
                self._goodbye("goodbye")
                return
            elif len(self._line) < MAX_TOKEN_LENGTH:
                self._line.append(byte)
            else:
                self._too_long = True  # kept bounded; told at the end of the line

    def _line_ended(self) -> None:
        line, too_long = bytes(self._line), self._too_long
        self._line.clear()
        self._too_long = False
        self.transport.write(b"\r\n")  # the only echo: the token is a secret
        token = line.decode("utf-8", "replace").strip()
        if too_long:
            refusal = Refusal(Kind.BAD_REQUEST, "token too long")
            log_refusal(DOOR, self.client_address, refusal)
            self.refused(refusal)
        elif not token:
            self.transport.write(PROMPT)
        else:
            self.state = "admitting"
            self.admit(token)

    def admitted(self, admitted: Pass) -> None:
        self._pass = admitted
        self.stop_waiting()  # the session's connect timeout takes over
        self.relay = admitted.start(self)
        self._replay_early()  # the relay pauses reading again until the console is up

    def refused(self, refusal: Refusal) -> None:
        text = str(refusal.ending)
        if refusal.ending.kind not in RETRY:
            self._goodbye(text)
            return
        self._tries += 1
        if self._tries >= MAX_TRIES:
            self._goodbye(f"{text}\r\ntoo many tries, goodbye")
            return
        self.state = "prompting"
        self.transport.write(text.encode("utf-8") + b"\r\n" + PROMPT)
        self._replay_early()  # what was typed meanwhile is the next try

    def _timed_out(self) -> None:
        """No token admitted within the prompt timeout (typed too late, or never)."""
        if self.relay is not None:
            return
        seconds = f"{self.factory.prompt_timeout:g}s"
        log_refusal(DOOR, self.client_address, Refusal(Kind.NO_TOKEN, f"none within {seconds}"))
        self._goodbye(f"no token within {seconds}, goodbye")

    def _goodbye(self, text: str) -> None:
        """A last line, then close."""
        if self.state == "closed":
            return
        self.state = "closed"
        self.give_up()
        self.transport.write(text.encode("utf-8") + b"\r\n")
        self.transport.loseConnection()

    # -- the session --------------------------------------------------------

    def _escape_command(self, byte: int) -> bool:
        """Act on Ctrl-] then ``byte``; False once the user has left."""
        if byte in b".q":
            self.state = "closed"
            self.transport.write(b"\r\ndisconnected\r\n")
            self.transport.loseConnection()
            if self.relay is not None:
                self.relay.client_lost("escape")
            return False
        if byte == ord("w"):
            who = self._pass.who() if self._pass is not None else "nobody"
            self.transport.write(f"\r\n{who}\r\n".encode())
        else:
            self.transport.write(HELP.format(proxy=self.factory.proxy_name).encode())
        return True

    def _forward(self, data: bytes) -> None:
        if data and self.relay is not None:
            self.relay.from_client(data)

    # -- ClientSide, for the relay (consumer and producer: the transport) ---

    def ready(self) -> None:
        assert self._pass is not None
        self._ready = True
        self.state = "relaying"
        self.transport.write(
            f"connected to the serial console of instance {self._pass.info.instance_uuid}; "
            "escape is Ctrl-] (then ? for help)\r\n".encode()
        )
        self.transport.resumeProducing()

    def send(self, data: bytes) -> None:
        write_now(
            self.transport, data.replace(b"\xff", b"\xff\xff") if self.speaks_telnet else data
        )

    def close(self, ending: Ending) -> None:
        if self._ready:
            self._goodbye(f"\r\n[{ending}]")
        else:
            self._goodbye(f"console unavailable: {ending}")


class SerialTCPFactory(Factory):
    """The door's settings and its gate."""

    protocol = SerialTCPProtocol

    def __init__(self, gate: Gate, clock: Any, prompt_timeout: float, proxy_name: str) -> None:
        self.gate = gate
        self.clock = clock
        self.prompt_timeout = prompt_timeout
        self.proxy_name = proxy_name
