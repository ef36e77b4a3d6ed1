"""The raw TCP serial door: ``telnet``, ``nc``, ``socat``, ``openssl s_client`` users.

The exchange (docs/serial.md has the whole of it)::

    server:  IAC WILL ECHO IAC WILL SUPPRESS-GO-AHEAD   (6 bytes, the telnet offer)
             consoled serial console: type your token and press Enter\\r\\n
             token:
    client:  TOKEN and CR, LF, CR LF or CR NUL (backspace edits; no echo but \\r\\n)
    server:  connected to the serial console of instance UUID; escape is Ctrl-] (then ? for help)
             console bytes both ways; Ctrl-] then . q w ? or Ctrl-] for the escape commands

A client that sends an IAC before its session starts has answered the offer
and speaks telnet for good (IAC escaping both ways, negotiation answered
here, CR LF and CR NUL sent on as one CR, commands such as BRK consumed);
any other client is raw and its bytes pass as they are.  Last lines: a
refusal's text (3 tries), ``token too long``, ``too many tries, goodbye``,
``no token within Ns, goodbye``, ``console unavailable: ENDING`` before the
session starts, ``[ENDING]`` after, ``disconnected`` after the escape.

States: ``prompting``, ``admitting`` (token check, then the session layer
connecting), ``relaying`` (or ``watching``: a read-only spectator of a busy
port), ``closed``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from consoled.authorizer import MAX_TOKEN_LENGTH, Authorizer, log_refusal
from consoled.endings import Ending, Kind, Refusal
from consoled.policy import check_console_type
from consoled.relay import Relay
from consoled.sessions import Sessions
from consoled.tokens import ConnectInfo

log = Logger()

DOOR = "serial-tcp"

# Telnet (RFC 854, 857, 858) bytes.
IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
IP, EC, EL = 244, 247, 248
ECHO, SGA = 1, 3
CR, LF, NUL = 13, 10, 0
ESCAPE = 0x1D  # Ctrl-]
BACKSPACES = (0x08, 0x7F)
QUITS = (0x03, 0x04)  # Ctrl-C, Ctrl-D: leave the prompt (socat raw has no other way out)

OFFER = bytes([IAC, WILL, ECHO, IAC, WILL, SGA])
BANNER = b"consoled serial console: type your token and press Enter\r\n"
PROMPT = b"token: "

MAX_TRIES = 3
#: Bytes typed while the token is checked, kept for the console; reading pauses past it.
MAX_EARLY = 4 * 1024
#: Refusals after which the user may type another token; any other ends the connection.
RETRY = frozenset({Kind.NO_TOKEN, Kind.INVALID_TOKEN, Kind.WRONG_CONSOLE_TYPE, Kind.BAD_REQUEST})

HELP = (
    "\r\n{proxy}: escape commands, typed after Ctrl-]:\r\n"
    "  . or q   disconnect\r\n"
    "  w        who uses this console\r\n"
    "  ?        this help\r\n"
    "  Ctrl-]   send one Ctrl-] to the console\r\n"
    "  anything else goes to the console, after its Ctrl-]\r\n"
)

_NVT_NEWLINE = re.compile(b"\r[\n\x00]")


class TelnetCodec:
    """The telnet layer of one connection: IAC parsing, option replies, NVT newlines.

    Not ``twisted.conch.telnet.TelnetTransport``: its parser raises on an
    unknown IAC command (losing the data parsed before it), holds a trailing
    CR until the next byte arrives (an Enter would wait for the next key), and
    its ``write`` turns every ``\\n`` into ``\\r\\n`` (corrupting console
    output); it also has no raw mode for ``nc`` nor producer methods for the
    relay.  This class is small and never raises on any input.

    ``feed`` returns the user's data and one-byte commands (ints) in order;
    negotiation is answered through ``reply`` and goes no further.  We do ECHO
    and SGA (offered at connect); the client may do SGA; every other option
    is refused.  A reply is sent only when an option's state changes, so two
    peers cannot loop.  Subnegotiations are skipped up to IAC SE, unstored.
    """

    _OURS = frozenset({ECHO, SGA})
    _THEIRS = frozenset({SGA})

    def __init__(self, reply: Callable[[bytes], None]) -> None:
        self._reply = reply
        self._state = "data"
        self._verb = 0
        self._after_cr = False
        #: options in effect on our side, and on the client's
        self.local: set[int] = set()
        self.remote: set[int] = set()
        #: our WILLs not answered yet (OFFER is sent at connect)
        self._offered = set(self._OURS)

    def feed(self, data: bytes) -> list[bytes | int]:
        out: list[bytes | int] = []
        text = bytearray()
        at, end = 0, len(data)
        while at < end:
            state = self._state
            if state in ("data", "sub"):
                iac = data.find(b"\xff", at)
                stop = end if iac < 0 else iac
                if state == "data":
                    self._text(data[at:stop], text)
                if iac < 0:
                    break
                self._state, at = ("iac" if state == "data" else "sub-iac"), iac + 1
                continue
            byte = data[at]
            at += 1
            if state == "iac":
                self._state = "data"
                if byte == IAC:
                    text.append(IAC)
                    self._after_cr = False
                elif byte in (WILL, WONT, DO, DONT):
                    self._verb, self._state = byte, "option"
                elif byte == SB:
                    self._state = "sub"
                else:
                    if text:
                        out.append(bytes(text))
                        text.clear()
                    out.append(byte)
            elif state == "option":
                self._state = "data"
                self._negotiate(self._verb, byte)
            else:  # "sub-iac": IAC SE ends it; IAC IAC or anything else stays inside
                self._state = "data" if byte == SE else "sub"
        if text:
            out.append(bytes(text))
        return out

    def _text(self, chunk: bytes, text: bytearray) -> None:
        # NVT: CR LF is a newline, CR NUL a bare CR; to a serial console both
        # are the Enter key, one CR (a CR LF would be two Enters at a login).
        if not chunk:
            return
        if self._after_cr and chunk[0] in (LF, NUL):
            chunk = chunk[1:]
        text += _NVT_NEWLINE.sub(b"\r", chunk)
        self._after_cr = chunk.endswith(b"\r")

    def _negotiate(self, verb: int, option: int) -> None:
        # RFC 1143 in short: answer only a change of an option's state.
        ours, wanted = verb in (DO, DONT), verb in (DO, WILL)
        options, allowed = (self.local, self._OURS) if ours else (self.remote, self._THEIRS)
        yes, no = (WILL, WONT) if ours else (DO, DONT)
        answered = ours and option in self._offered  # the client's answer to OFFER
        if ours:
            self._offered.discard(option)
        if wanted == (option in options):
            return
        if wanted and option not in allowed:
            self._reply(bytes([IAC, no, option]))
            return
        (options.add if wanted else options.discard)(option)
        if not answered:
            self._reply(bytes([IAC, yes if wanted else no, option]))


class SerialTCPProtocol(Protocol):
    """One terminal user's connection."""

    factory: SerialTCPFactory
    state = "prompting"
    relay: Relay | None = None
    info: ConnectInfo | None = None

    def connectionMade(self) -> None:
        self.client_address = getattr(self.transport.getPeer(), "host", "?")
        # Real telnet (netkit, inetutils) negotiates nothing on a port other
        # than 23 unless the server does: without this offer it would stay in
        # line mode and echo the token on the screen.  nc and socat show the
        # 6 bytes as a little noise before the banner, as any telnet server's.
        self.telnet = TelnetCodec(self.transport.write)
        self.speaks_telnet = False
        self._line = bytearray()
        self._too_long = False
        self._swallow_newline = False  # an LF or NUL right after the CR that ended a line
        self._tries = 0
        self._early: list[bytes] = []
        self._early_size = 0
        self._ready = False
        self._escaped = False
        self._stop_watching: Callable[[], Any] | None = None
        self._deadline: IDelayedCall | None = self.factory.clock.callLater(
            self.factory.prompt_timeout, self._timed_out
        )
        self.transport.write(OFFER + BANNER + PROMPT)

    # -- input --------------------------------------------------------------

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
        for part in self.telnet.feed(data):
            if self.state == "closed":
                return
            if isinstance(part, bytes):
                self._input(part)
            else:
                self._command(part)

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
        if self.relay is not None or self.state == "watching":
            self._relay_input(data)
        else:
            self._hold(data)

    def _command(self, command: int) -> None:
        # In a session every command is consumed: BRK on purpose, as a break
        # on the serial line is a magic SysRq that can reboot a Linux guest.
        if self.state != "prompting":
            return
        if command == EC:
            del self._line[-1:]
        elif command == EL:
            self._line.clear()
        elif command == IP:
            self._goodbye("goodbye")

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
                self._too_long = True  # kept bounded; reported at the end of the line

    def _line_ended(self) -> None:
        line, too_long = bytes(self._line), self._too_long
        self._line.clear()
        self._too_long = False
        self.transport.write(b"\r\n")  # the only echo: the token is a secret
        if too_long:
            self._refused(Refusal(Kind.BAD_REQUEST, "token too long"), "token too long")
            return
        token = line.decode("utf-8", "replace").strip()
        if not token:
            self.transport.write(PROMPT)
            return
        self.state = "admitting"
        self._check(token)

    def _check(self, token: str) -> None:
        def admitted(info: ConnectInfo) -> None:
            check_console_type(info, DOOR)
            if self.state == "admitting" and self.relay is None:
                self._start(info)

        def refused(failure: Failure) -> None:
            if not failure.check(Refusal):
                log.failure("serial-tcp admission failed", failure)
                failure = Failure(Refusal(Kind.INTERNAL))
            if self.state == "admitting" and self.relay is None:
                self._refused(failure.value)
            else:  # the user left, or the deadline passed, during the check
                log_refusal(DOOR, self.client_address, failure.value)

        self.factory.authorizer.validate(token).addCallback(admitted).addErrback(refused)

    def _refused(self, refusal: Refusal, text: str | None = None) -> None:
        log_refusal(DOOR, self.client_address, refusal)
        text = text or str(refusal.ending)
        if refusal.ending.kind not in RETRY:
            self._goodbye(text)
            return
        self._tries += 1
        if self._tries >= MAX_TRIES:
            self._goodbye(f"{text}\r\ntoo many tries, goodbye")
            return
        self.state = "prompting"
        self.transport.write(text.encode("utf-8") + b"\r\n" + PROMPT)
        early, self._early, self._early_size = self._early, [], 0
        self.transport.resumeProducing()
        for chunk in early:  # what was typed meanwhile is the next try
            self._input(chunk)

    def _hold(self, data: bytes) -> None:
        """Keep what the user types while the token is checked; pause past a bound."""
        self._early.append(data)
        self._early_size += len(data)
        if self._early_size > MAX_EARLY:
            self.transport.pauseProducing()

    def _timed_out(self) -> None:
        self._deadline = None
        seconds = f"{self.factory.prompt_timeout:g}s"
        if self.state == "prompting":
            log_refusal(DOOR, self.client_address, Refusal(Kind.NO_TOKEN, f"none within {seconds}"))
            self._goodbye(f"no token within {seconds}, goodbye")
        elif self.state == "admitting" and self.relay is None:
            refusal = Refusal(Kind.STORE_UNAVAILABLE, f"no answer within {seconds}")
            log_refusal(DOOR, self.client_address, refusal)
            self._goodbye(f"token not checked within {seconds}, goodbye")

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _goodbye(self, text: str) -> None:
        """A last line, then close."""
        if self.state == "closed":
            return
        self.state = "closed"
        self._cancel_deadline()
        self.transport.write(text.encode("utf-8") + b"\r\n")
        self.transport.loseConnection()

    # -- the session --------------------------------------------------------

    def _start(self, info: ConnectInfo) -> None:
        self.info = info
        self._cancel_deadline()  # the session layer's connect timeout takes over
        try:
            started: Any = self.factory.sessions.start(info, DOOR, self.client_address, self)
        except Refusal as refusal:
            started = refusal
        if isinstance(started, Refusal):
            self._unavailable(started.ending)
            return
        self.relay = started
        early, self._early, self._early_size = self._early, [], 0
        self.transport.resumeProducing()  # the relay pauses reading until the console is up
        for chunk in early:
            self._input(chunk)

    def _relay_input(self, data: bytes) -> None:
        """The escape, Ctrl-] and one more byte, even across chunks; the rest goes on."""
        out = bytearray()
        at = 0
        if self._escaped:
            self._escaped, at = False, 1
            if not self._escape_command(data[0], out):
                return
        while True:
            found = data.find(b"\x1d", at)
            if found < 0:
                out += data[at:]
                break
            out += data[at:found]
            if found + 1 == len(data):
                self._escaped = True
                break
            at = found + 2
            if not self._escape_command(data[found + 1], out):
                return
        self._forward(bytes(out))

    def _escape_command(self, byte: int, out: bytearray) -> bool:
        """Act on Ctrl-] then ``byte``; False once the user has left."""
        if byte in b".q":
            self._forward(bytes(out))
            self._disconnect()
            return False
        if byte == ord("w"):
            self.transport.write(f"\r\n{self.factory.who()}\r\n".encode())
        elif byte == ord("?"):
            self.transport.write(HELP.format(proxy=self.factory.proxy_name).encode())
        elif byte == ESCAPE:
            out.append(ESCAPE)
        else:
            out += bytes([ESCAPE, byte])
        return True

    def _forward(self, data: bytes) -> None:
        if data and self.state != "watching" and self.relay is not None:
            self.relay.from_client(data)

    def _disconnect(self) -> None:
        self.state = "closed"
        self.transport.write(b"\r\ndisconnected\r\n")
        self.transport.loseConnection()
        if self.relay is not None:
            self.relay.client_lost("escape")

    def _unavailable(self, ending: Ending) -> None:
        """The session layer refused: a spectator if the port is busy and that is on."""
        if ending.kind is Kind.PORT_BUSY:
            prefix = self.info.hash_prefix if self.info is not None else None
            log_refusal(DOOR, self.client_address, Refusal(ending.kind, ending.detail, prefix))
            watch = getattr(self.factory, "watch", None)
            if self.factory.spectators and watch is not None and self.info is not None:
                self.state = "watching"
                self.transport.write(
                    f"{ending}; watching read-only, escape is Ctrl-] (then ? for help)\r\n".encode()
                )
                self.transport.resumeProducing()
                self._stop_watching = watch(self.info, self)
                return
        self._goodbye(f"console unavailable: {ending}")

    # -- ClientSide, for the relay -------------------------------------------

    @property
    def consumer(self) -> Any:
        return self.transport

    @property
    def producer(self) -> Any:
        return self.transport

    def ready(self) -> None:
        if self.state == "closed":
            return
        assert self.info is not None
        self._ready = True
        self.state = "relaying"
        self.transport.write(
            f"connected to the serial console of instance {self.info.instance_uuid}; "
            "escape is Ctrl-] (then ? for help)\r\n".encode()
        )
        self.transport.resumeProducing()

    def send(self, data: bytes) -> None:
        self.transport.write(data.replace(b"\xff", b"\xff\xff") if self.speaks_telnet else data)

    def close(self, ending: Ending) -> None:
        if self.state == "closed":
            return
        if self._ready or self.state == "watching":
            self._goodbye(f"\r\n[{ending}]")
        else:
            self._unavailable(ending)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        previous, self.state = self.state, "closed"
        self._cancel_deadline()
        stop, self._stop_watching = self._stop_watching, None
        if stop is not None:
            stop()
        if self.relay is not None:
            self.relay.client_lost("connection lost" if previous != "closed" else "")


class SerialTCPFactory(Factory):
    """The door's settings and collaborators.

    Spectators are a hook only: with ``spectators`` on and a ``watch``
    attribute set (``watch(info, protocol)``, returning a callable to stop
    watching, or None), a user refused with ``PORT_BUSY`` stays connected in
    the ``watching`` state: console output may be sent to it through
    ``protocol.send`` and it ends with ``protocol.close(ending)``; its input
    is dropped, except the escape commands.
    """

    protocol = SerialTCPProtocol

    def __init__(
        self,
        authorizer: Authorizer,
        sessions: Sessions,
        clock: Any,
        prompt_timeout: float,
        proxy_name: str,
        *,
        spectators: bool = False,
    ) -> None:
        self.authorizer = authorizer
        self.sessions = sessions
        self.clock = clock
        self.prompt_timeout = prompt_timeout
        self.proxy_name = proxy_name
        self.spectators = spectators

    def who(self) -> str:
        """The answer to the escape command ``w``; replace it to list real users."""
        return "you are the only user of this port"
