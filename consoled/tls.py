"""TLS for the listeners: options from nova's settings, mixed ports, SIGHUP reload.

- `server_tls_from_settings` decides whether there is TLS at all and loads the
  certificate at start-up; a bad file is a `TLSError`, one line naming it.
- `ReloadableServerTLS` hands every new connection the options loaded last;
  `reload` re-reads the files and keeps the old options if they are bad.
- `tls_factory` wraps a listener's factory: plain, TLS only (`ssl_only`), or
  both on one port, told apart by the first byte the client sends: 0x16 (a
  TLS handshake record) means TLS, anything else plain, as websockify does.
  On a TLS-only port a plain client is told so in the door's words (an HTTP
  400, a line) and logged (`PlainRefused`), instead of a bare hang-up.
- ALPN: each door's TLS factory (`ServerTLSFactory`) names the protocols it
  may select (`HTTP_ALPN` for the websocket doors, none for XVP and the raw
  serial door). The server picks the first of them the client offers, and
  when none is offered it goes on without ALPN instead of aborting the
  handshake (OpenSSL 3 sends alert 80 if the callback finds no overlap, and
  every browser offers `h2,http/1.1`).
- `reload_on_sighup` reloads on SIGHUP, chaining to a handler already there.

Semantics, defaults and examples: docs/tls.md.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorFromThreads,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from consoled import malloc
from consoled.config import Settings
from consoled.endings import Ending, Kind
from consoled.limits import Refuser
from consoled.wire import write_now

log = Logger()

TLS_HANDSHAKE_RECORD = 0x16

#: What the websocket doors may select: they speak HTTP/1.1 only (never h2,
#: which every browser offers first).
HTTP_ALPN: tuple[bytes, ...] = (b"http/1.1",)

#: A certificate or key file larger than this is refused: it is read on the
#: reactor thread, at start-up and on SIGHUP.
MAX_PEM_BYTES = 1024 * 1024

# ssl_minimum_version -> CertificateOptions arguments (the two are mutually exclusive).
_MINIMUM_VERSIONS: dict[str, dict[str, Any]] = {
    "default": {"raiseMinimumTo": TLSVersion.TLSv1_2},
    "tlsv1_2": {"raiseMinimumTo": TLSVersion.TLSv1_2},
    "tlsv1_3": {"raiseMinimumTo": TLSVersion.TLSv1_3},
    # Only on the operator's explicit word; OpenSSL 3's security level may still refuse it.
    "tlsv1_1": {"insecurelyLowerMinimumTo": TLSVersion.TLSv1_1},
}


class TLSError(Exception):
    """The TLS certificate, key or options cannot be used; the message is one line."""


def _read(path: str, what: str) -> bytes:
    # Blocking reads, at start-up and on SIGHUP only: the files are a few kB.
    # O_NONBLOCK makes opening a FIFO return at once (a plain open waits for a
    # writer, forever, on the reactor thread); fstat then refuses anything but
    # a regular file, judged on the file actually opened.
    why = None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                why = "not a regular file"
            elif info.st_size > MAX_PEM_BYTES:
                why = f"larger than {MAX_PEM_BYTES} bytes"
            else:
                with os.fdopen(fd, "rb", closefd=False) as f:
                    return f.read(MAX_PEM_BYTES)
        finally:
            os.close(fd)
    except OSError as e:
        why = e.strerror or str(e)
    raise TLSError(f"cannot read TLS {what} {path}: {why}")


def _certificates(path: str, data: bytes) -> list[x509.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        raise TLSError(f"no PEM certificate in TLS certificate file {path}")
    return found


def _private_key(path: str, data: bytes) -> Any:
    # load_pem_private_key skips the CERTIFICATE blocks of a combined file.
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSError(f"TLS key in {path} is encrypted; a passphrase is not supported") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSError(f"no usable PEM private key in {path}") from None


def select_alpn(connection: SSL.Connection, offered: list[bytes]) -> Any:
    """The ALPN select callback of every context consoled serves with.

    Picks the first protocol of the connection's door (its `ServerTLSFactory`'s
    ``alpn``) that the client offered; with none in common the handshake goes on
    with no protocol selected. Twisted's own callback answers b"" then, and
    OpenSSL 3 aborts the handshake (alert 80, "no application protocol"): every
    browser's handshake with a door that named no protocols.
    """
    protocol: TLSMemoryBIOProtocol | None = connection.get_app_data()
    factory = getattr(protocol, "factory", None)
    for candidate in getattr(factory, "alpn", ()):
        if candidate in offered:
            return candidate
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _acceptable_ciphers(ciphers: str | None) -> AcceptableCiphers | None:
    if ciphers is None:
        return None
    try:
        acceptable = AcceptableCiphers.fromOpenSSLCipherString(ciphers)
        CertificateOptions(acceptableCiphers=acceptable)  # ValueError if none is usable
    except (ValueError, SSL.Error):
        raise TLSError(f"[console] ssl_ciphers {ciphers!r}: no cipher matches") from None
    return acceptable


def load_options(
    cert_path: str,
    key_path: str | None,
    ciphers: AcceptableCiphers | None,
    minimum_version: str,
) -> CertificateOptions:
    """CertificateOptions from the PEM files, or TLSError naming the bad file."""
    if minimum_version not in _MINIMUM_VERSIONS:
        raise TLSError(f"[console] ssl_minimum_version {minimum_version!r} is not known")
    cert_data = _read(cert_path, "certificate")
    chain = _certificates(cert_path, cert_data)
    key_file = cert_path if key_path is None else key_path
    key_data = cert_data if key_path is None else _read(key_path, "key")
    key = _private_key(key_file, key_data)
    if key.public_key() != chain[0].public_key():
        raise TLSError(f"TLS key in {key_file} does not match the certificate in {cert_path}")
    try:
        options = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=crypto.X509.from_cryptography(chain[0]),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
            acceptableCiphers=ciphers,
            enableSessionTickets=True,
            **_MINIMUM_VERSIONS[minimum_version],
        )
        # Builds the context now, so OpenSSL's own checks run here. Options
        # cache it and make every server Connection from it, so the ALPN
        # callback set on it here replaces Twisted's for all of them.
        context = options.getContext()
        context.set_alpn_select_callback(select_alpn)
        # OpenSSL frees a connection's record buffers while it has nothing
        # in flight: an idle console session holds ~34 KiB less.
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        # No TLS 1.2 renegotiation (TLS 1.3 has none): ServerTLSProtocol
        # relies on a write never having to wait for the client.
        context.set_options(SSL.OP_NO_RENEGOTIATION)
    except (ValueError, SSL.Error) as e:
        raise TLSError(f"TLS certificate {cert_path} is not usable: {e}") from None
    return options


def client_options(
    *, ca: str | None, cert: str | None = None, key: str | None = None, option: str
) -> CertificateOptions:
    """TLS towards a console server, from PEM files, or TLSError naming ``option``.

    With ``ca`` the server's chain must verify against it (no host name check:
    consoles are reached by address, as nova does); without it nothing is
    verified here and the connector must pin the peer itself (authd's
    thumbprints).  ``cert``/``key`` are the client certificate the server may
    ask for (VeNCrypt x509 with verify-peer).
    """
    kwargs: dict[str, Any] = {}
    try:
        if cert:
            cert_data = _read(cert, "certificate")
            chain = _certificates(cert, cert_data)
            key_file = key or cert
            private = _private_key(key_file, _read(key_file, "key") if key else cert_data)
            if private.public_key() != chain[0].public_key():
                raise TLSError(f"TLS key in {key_file} does not match the certificate in {cert}")
            kwargs.update(
                privateKey=crypto.PKey.from_cryptography_key(private),
                certificate=crypto.X509.from_cryptography(chain[0]),
                extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
            )
        if ca:
            authorities = _certificates(ca, _read(ca, "CA bundle"))
            kwargs.update(
                verify=True, caCerts=[crypto.X509.from_cryptography(c) for c in authorities]
            )
        options = CertificateOptions(raiseMinimumTo=TLSVersion.TLSv1_2, **kwargs)
        options.getContext()
    except TLSError as e:
        raise TLSError(f"{option}: {e}") from None
    except (ValueError, SSL.Error) as e:
        raise TLSError(f"{option}: not usable: {e}") from None
    return options


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ReloadableServerTLS:
    """Server TLS whose certificate can be re-read while the daemon runs.

    Each new connection asks for a Connection (or, through the older API, the
    context) and gets the options loaded last; a connection already made keeps
    its own Connection, so a reload never touches a live session.
    """

    def __init__(
        self,
        cert_path: str,
        key_path: str | None = None,
        ciphers: str | None = None,
        minimum_version: str = "default",
    ) -> None:
        self.cert_path, self.key_path = cert_path, key_path
        self.minimum_version = minimum_version
        self._ciphers = _acceptable_ciphers(ciphers)
        if minimum_version == "tlsv1_1":
            log.warn(
                "[console] ssl_minimum_version = tlsv1_1: TLS 1.1 is obsolete"
                " (and OpenSSL 3 at its default security level refuses it anyway)"
            )
        self._options = self._load()
        self._waiting: list[Deferred[bool]] = []

    def _load(self) -> CertificateOptions:
        return load_options(self.cert_path, self.key_path, self._ciphers, self.minimum_version)

    @property
    def options(self) -> CertificateOptions:
        """The options new connections get now."""
        return self._options

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self._options.serverConnectionForTLS(tlsProtocol)

    def getContext(self) -> SSL.Context:
        return self._options.getContext()

    def reload(self) -> bool:
        """Re-read the files; True if new connections now use them, else keep the old."""
        try:
            options = self._load()
        except TLSError as e:
            log.error("TLS certificate reload failed, keeping the previous one: {error}", error=e)
            ok = False
        except Exception:
            log.failure(
                "TLS certificate reload from {cert} failed, keeping the previous one",
                cert=self.cert_path,
            )
            ok = False
        else:
            self._options = options
            log.info("TLS certificate reloaded from {cert}", cert=self.cert_path)
            ok = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(ok)
        return ok

    def when_reloaded(self) -> Deferred[bool]:
        """A Deferred that fires with the result of the next reload attempt."""
        d: Deferred[bool] = Deferred()
        self._waiting.append(d)
        return d


def server_tls_from_settings(settings: Settings) -> ReloadableServerTLS | None:
    """The listeners' TLS, or None for plain only; TLSError if the files are bad.

    TLS is on when [DEFAULT] ssl_only is true, or key is set, or the cert file
    exists (websockify's rule, decided once at start-up here): then the files
    must load. Otherwise (the default self.pem absent) the listeners are plain.
    """
    default, console = settings.default, settings.console
    if not (default.ssl_only or default.key or os.path.exists(default.cert)):
        log.info("TLS off: certificate {cert} not found and ssl_only is false", cert=default.cert)
        return None
    return ReloadableServerTLS(
        default.cert, default.key, console.ssl_ciphers, console.ssl_minimum_version
    )


def reload_on_sighup(
    reloaders: Sequence[ReloadableServerTLS], reactor: IReactorFromThreads
) -> Callable[[], None]:
    """Reload every one of reloaders on SIGHUP; returns a function that uninstalls.

    twistd uses SIGUSR1 (log rotation), not SIGHUP; a Python handler that is
    already installed for SIGHUP is still called after ours, not replaced.
    """
    if not hasattr(signal, "SIGHUP"):
        return lambda: None
    previous = signal.getsignal(signal.SIGHUP)

    def reload_all() -> None:
        log.info("SIGHUP: reloading {count} TLS certificate(s)", count=len(reloaders))
        for reloader in reloaders:
            reloader.reload()

    def on_sighup(signum: int, frame: Any) -> None:
        # A signal handler may interrupt the reactor anywhere: only hand it work.
        reactor.callFromThread(reload_all)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGHUP, on_sighup)

    def uninstall() -> None:
        if signal.getsignal(signal.SIGHUP) is on_sighup:
            signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)

    return uninstall


class FirstByteDetector(Protocol):
    """Waits for the client's first byte, builds the inner protocol, then forwards.

    The inner protocol (TLS or plain) talks to the real transport itself, so
    writes, producers and pauseProducing need no help from here; only
    dataReceived and connectionLost pass through. A client that connects and
    sends nothing is closed after the factory's ``first_byte_timeout``: no
    door protocol exists yet to time it out.
    """

    inner: IProtocol | None = None
    _timer: Any = None

    def __init__(self, factory: TLSOrPlainFactory, addr: IAddress) -> None:
        self.factory, self.addr = factory, addr

    def connectionMade(self) -> None:
        if self.factory.first_byte_timeout:
            self._timer = self.factory.clock.callLater(
                self.factory.first_byte_timeout, self.transport.abortConnection
            )

    def dataReceived(self, data: bytes) -> None:
        if self.inner is None:
            if not data:
                return
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            chosen = self.factory.tls if data[0] == TLS_HANDSHAKE_RECORD else self.factory.plain
            self.inner = chosen.buildProtocol(self.addr)
            if self.inner is None:
                self.transport.loseConnection()
                return
            self.inner.makeConnection(self.transport)
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.inner is not None:
            self.inner.connectionLost(reason)


def renew_bios(connection: SSL.Connection) -> bool:
    """Give a memory-BIO ``connection`` two new, empty BIOs; False if it cannot now.

    A memory BIO never shrinks: each keeps the largest size it ever held (the
    handshake's ~2 KiB flight and ClientHello, or a relayed write's whole
    ciphertext) until it is freed.  The bytes still waiting in the receive
    BIO move to the new one; with bytes still to send nothing is changed.
    pyOpenSSL has no call for this, so it is done on its private attributes
    (`Connection._ssl`, ``_into_ssl``, ``_from_ssl``, as pyOpenSSL 24 to 26
    name them) and answers False if they are not there.
    """
    ssl = getattr(connection, "_ssl", None)
    into = getattr(connection, "_into_ssl", None)
    out = getattr(connection, "_from_ssl", None)
    if ssl is None or into is None or out is None or _lib.BIO_get_mem_data(out, _ffi.NULL):
        return False
    new_into = _lib.BIO_new(_lib.BIO_s_mem())
    new_out = _lib.BIO_new(_lib.BIO_s_mem())
    waiting = _ffi.new("char **")
    pending = _lib.BIO_get_mem_data(into, waiting)
    if (
        new_into == _ffi.NULL
        or new_out == _ffi.NULL
        or (pending and _lib.BIO_write(new_into, waiting[0], pending) != pending)
    ):
        for bio in (new_into, new_out):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        return False
    _lib.SSL_set_bio(ssl, new_into, new_out)  # and frees the two old ones
    connection._into_ssl, connection._from_ssl = new_into, new_out  # type: ignore[attr-defined]
    return True


def whole_writes(connection: SSL.Connection) -> None:
    """Let one ``SSL_write`` on ``connection`` take a whole relayed chunk.

    pyOpenSSL turns on ``SSL_MODE_ENABLE_PARTIAL_WRITE`` for every
    connection, so ``SSL_write`` returns after each 16 KiB record and
    ``sendall`` goes round its Python loop (and pyOpenSSL's error checks) 17
    times for a 256 KiB chunk.  Into a memory BIO, which never refuses a
    write, nothing is gained by stopping early: after the handshake (no
    renegotiation, `OP_NO_RENEGOTIATION`) one call encrypts the chunk's
    records in OpenSSL's own loop.  Measured on 256 KiB writes with their
    ciphertext read out, on one CPU: 49.5 -> 37 µs a chunk, 0.20 -> 0.15 s
    a GiB.  Twisted's own write path, used before the handshake is done,
    keeps the mode it expects.  Without pyOpenSSL's ``_ssl`` (as
    `renew_bios`) nothing changes.
    """
    ssl = getattr(connection, "_ssl", None)
    if ssl is not None:
        _lib.SSL_clear_mode(ssl, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)


class _Ciphertext:
    """Where `ServerTLSProtocol._send_out` reads ciphertext (reactor thread only):
    a relayed chunk is at most 256 KiB (consoled.backends.tcp.READ_SIZE).  One
    per process, made by the first TLS door's factory: a process without TLS
    doors never holds its half MiB."""

    SIZE = 512 * 1024

    def __init__(self) -> None:
        self.buffer = bytearray(self.SIZE)
        self.view = memoryview(self.buffer)
        self.pointer = _ffi.from_buffer(self.buffer)


#: A write or read larger than this grows a session's memory BIOs past what
#: an idle session should keep (`ServerTLSFactory.grew`).
GROWN = 32 * 1024

#: Seconds without such a write or read before a session's BIOs are renewed.
RENEW_AFTER = 1.0


class ServerTLSProtocol(TLSMemoryBIOProtocol):
    """Twisted's memory-BIO TLS with a shorter path for the relayed bytes.

    Twisted's own (`BufferingTLSTransport`) holds small writes until the
    reactor's next pass, hands OpenSSL 16 KiB at a time and moves each
    record's ciphertext through the TCP transport's queue, whose 64 KiB limit
    a 64 KiB chunk's records always pass: every relayed chunk paused the
    console's socket and woke the reactor again to write (an epoll change
    each way).  Once the handshake is done this one gives OpenSSL a whole
    write at once (OpenSSL cuts the records), reads all the ciphertext out in
    one call and hands it to the kernel as the plain relay does
    (`consoled.wire.write_now`), queueing only what the kernel does not take;
    received records are decrypted in a loop and handed up in one call.  On
    the benchmark's wss:// downstream (one session, 1 GiB, RSA) that alone
    took consoled from 696 to 985 MB/s and its CPU from 1.56 to 1.03 s per
    GiB; with the frame's header no longer joined to its payload and the
    ciphertext read into one buffer (`_send_out`) it spends 1.04-1.06 s per
    GiB where websockify spends 1.18 (benchmarks/reports/2026-12-03-c.txt,
    issue 16).  What is left is the cipher, the kernel's copies and epoll.

    Before the handshake is done, and for the shutdown, Twisted's code runs
    unchanged: writes wait for the handshake as they always did.

    Memory: when its handshake is over a connection starts on new, empty
    memory BIOs (`renew_bios`; the handshake grew the old ones) and tells its
    factory, which gives the heap back after a burst of handshakes
    (`ServerTLSFactory.handshake_over`).  docs/tls.md, "Memory per session".
    """

    factory: ServerTLSFactory

    #: the process's one ciphertext buffer, made by the first ServerTLSFactory
    ciphertext: _Ciphertext | None = None

    def _checkHandshakeStatus(self) -> None:
        done = self._handshakeDone
        super()._checkHandshakeStatus()
        if self._handshakeDone and not done:
            # The handshake grew both BIOs (ClientHello in, the server's
            # flight out); send what is left (the session tickets) and start
            # the session on empty ones.
            if self._tlsConnection is not None and not self._lostTLSConnection:
                self._flushSendBIO()
                renew_bios(self._tlsConnection)
                whole_writes(self._tlsConnection)
            self.factory.handshake_over()

    @property
    def bufferSize(self) -> int:
        """The TCP transport's: how much may wait for the client before the
        console is paused.  A door sets it (USER_WRITE_BUFFER) as it would on
        a plain transport; as an attribute of this wrapper it stayed here,
        and the TCP transport's 64 KiB default paused the console around
        every relayed chunk."""
        return int(self.transport.bufferSize)

    @bufferSize.setter
    def bufferSize(self, size: int) -> None:
        self.transport.bufferSize = size

    def writeSequence(self, iovec: Any) -> None:
        # A websocket frame (header, payload): Twisted joins them, a copy of
        # the payload; here only the first record's worth is joined (so the
        # header shares a record) and the rest goes to OpenSSL as it is.
        if len(iovec) != 2 or len(iovec[1]) <= 16384 or not self._fast():
            super().writeSequence(iovec)
            return
        if self.disconnecting and self._producer is None:
            return  # as TLSMemoryBIOProtocol.write: nothing after loseConnection
        header, payload = iovec
        first = 16384 - len(header)
        self._encrypt(header + payload[:first], memoryview(payload)[first:])

    def _fast(self) -> bool:
        """Whether a write may take the short path now (else Twisted's)."""
        return self._handshakeDone and not self._appSendBuffer and not self._lostTLSConnection

    def _write(self, data: bytes) -> None:
        if not self._fast():
            if not self._lostTLSConnection:
                super()._write(data)
            return
        self._encrypt(data)

    def _encrypt(self, *pieces: Any) -> None:
        size = 0
        try:
            for piece in pieces:
                # sendall loops over OpenSSL's partial writes inside one call.
                # After the handshake a memory BIO never wants to read or
                # write here (renegotiation is off: OP_NO_RENEGOTIATION), so
                # nothing is left half written.
                self._tlsConnection.sendall(piece)
                size += len(piece)
        except Error:
            self._tlsShutdownFinished(Failure())
            return
        # A record adds at most 5 bytes of header and 17 of content type and
        # tag (TLS 1.3; 29 with TLS 1.2's explicit nonce): one read takes it all.
        self._send_out(size + (size // 16384 + len(pieces)) * 64)
        if size > GROWN:
            self.factory.grew(self)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if len(data) > GROWN and self._handshakeDone:
            self.factory.grew(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.shrunk(self)
        super().connectionLost(reason)

    def _flushSendBIO(self) -> None:
        self._send_out(2**15)

    def _send_out(self, size: int) -> None:
        """Everything in the send BIO to the transport, read ``size`` bytes at a time.

        Up to `_Ciphertext.SIZE` it is read straight into that one buffer and handed
        to the kernel from there (pyOpenSSL's ``bio_read`` copies twice, into
        a fresh buffer and then into bytes): a copy of every relayed byte and
        an allocation of its size fewer.  The buffer is the reactor thread's
        alone, and write_now copies out whatever it must queue.
        """
        out = getattr(self._tlsConnection, "_from_ssl", None)
        into = self.ciphertext
        if out is not None and into is not None and size <= into.SIZE:
            n = _lib.BIO_read(out, into.pointer, into.SIZE)
            if 0 < n < into.SIZE:
                write_now(self.transport, into.view[:n])
                return
            if n <= 0:
                return  # nothing to send
            # a full buffer: there may be more; it goes the general way
            write_now(self.transport, bytes(into.view))
        read = self._tlsConnection.bio_read
        chunks: list[bytes] = []
        try:
            while not chunks or len(chunks[-1]) == size:  # a full read: there may be more
                chunks.append(read(size))
        except WantReadError:  # the BIO is empty
            pass
        if chunks:
            write_now(self.transport, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _flushReceiveBIO(self) -> None:
        if not self._handshakeDone:
            super()._flushReceiveBIO()
            return
        # OpenSSL hands out one record (at most 16 KiB) per call: gather what
        # the bytes just received decrypt to and hand it up once.
        received: list[bytes] = []
        recv = self._tlsConnection.recv
        while not self._lostTLSConnection:
            try:
                received.append(recv(65536))
            except WantReadError:
                break
            except ZeroReturnError:  # the client's close_notify: as Twisted does
                self._deliver(received)
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                failure = Failure()
                self._deliver(received)
                self._tlsShutdownFinished(failure)
        self._deliver(received)
        self._flushSendBIO()

    def _deliver(self, received: list[bytes]) -> None:
        """Hand what was decrypted to the door in one call, and forget it."""
        if received and not self._aborted:
            ProtocolWrapper.dataReceived(
                self, received[0] if len(received) == 1 else b"".join(received)
            )
            received.clear()


class ServerTLSFactory(TLSMemoryBIOFactory):
    """Server-side TLS around one door's factory; ``alpn`` is what it may select.

    `select_alpn` reads ``alpn`` through each connection. An empty tuple (the
    XVP and raw serial doors) selects nothing, whatever the client offers.

    It counts the handshakes in flight.  Each holds ~30 KiB that OpenSSL frees
    when it ends (a 21 KiB handshake message buffer, 8 KiB of write
    buffering), and what each session keeps is allocated between them: a
    burst of handshakes leaves free holes in the heap that glibc keeps.  When
    the last handshake of a burst of at least ``release_after`` at once is
    over, `consoled.malloc.release` gives them back: 3-4 KiB per session held
    after 200 set-ups 50 at a time, for 0.15-0.3 ms of ``malloc_trim``.
    Handshakes one at a time leave almost nothing (0.4 KiB a session) and
    never trigger it.
    """

    protocol = ServerTLSProtocol

    #: a burst with at least this many handshakes in flight at once gives the
    #: heap back when the last of them is over (`consoled.malloc.release`)
    release_after = 16

    def __init__(
        self, tls: ReloadableServerTLS, wrapped: IProtocolFactory, alpn: Sequence[bytes] = ()
    ) -> None:
        super().__init__(tls, False, wrapped)
        self.alpn = tuple(alpn)
        if ServerTLSProtocol.ciphertext is None:
            ServerTLSProtocol.ciphertext = _Ciphertext()
        #: handshakes in flight, and the most at once since the heap was last given back
        self.handshaking = self.burst = 0
        #: sessions whose BIOs grew past GROWN, and when they last did (see grew)
        self._grown: dict[ServerTLSProtocol, float] = {}
        self._sweep_call: Any = None

    def registerProtocol(self, p: Any) -> None:
        if p in self.protocols:  # ProtocolWrapper.makeConnection registers it again
            return
        super().registerProtocol(p)
        self.handshaking += 1
        if self.handshaking > self.burst:
            self.burst = self.handshaking

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not p._handshakeDone:
            self.handshake_over()

    def grew(self, protocol: ServerTLSProtocol) -> None:
        """``protocol`` moved more than `GROWN` bytes through a BIO in one go.

        A memory BIO keeps the largest size it ever held: 306 KB after one
        256 KiB write (the largest read of a console), for the rest of the
        session.  Once such a session has been quiet for `RENEW_AFTER`
        seconds its BIOs are renewed (`renew_bios`), so a cell of mostly
        idle consoles does not keep each one's largest screen update; a
        session that streams keeps its working buffer, renewed once it rests.
        """
        self._grown[protocol] = self._clock.seconds()
        if self._sweep_call is None:
            self._sweep_call = self._clock.callLater(RENEW_AFTER, self._sweep)

    def shrunk(self, protocol: ServerTLSProtocol) -> None:
        """``protocol`` is gone (or renewed): nothing to give back for it."""
        self._grown.pop(protocol, None)

    def _sweep(self) -> None:
        self._sweep_call = None
        now = self._clock.seconds()
        for protocol, last in list(self._grown.items()):
            if now - last < RENEW_AFTER:
                continue
            if protocol._lostTLSConnection or renew_bios(protocol._tlsConnection):
                del self._grown[protocol]
        if self._grown:
            self._sweep_call = self._clock.callLater(RENEW_AFTER, self._sweep)

    def doStop(self) -> None:
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        super().doStop()

    def handshake_over(self) -> None:
        """One handshake finished or failed; after a burst, give the heap back."""
        self.handshaking -= 1
        if not self.handshaking and self.burst >= self.release_after:
            self.burst = 0
            malloc.release()


#: What a plain client on a TLS-only port is told (the door renders it).
TLS_ONLY = Ending(
    Kind.BAD_REQUEST, "this port speaks TLS only: use https://, wss:// or a TLS client"
)


class PlainRefused(Factory):
    """A TLS-only port's answer to a client whose first byte starts no TLS
    handshake: ``answer`` (the door's refusal on its wire: an HTTP 400, a
    line) and a log line, then the connection closes.  Without it a browser
    sent to http:// got an empty reply and the log said nothing."""

    noisy = False

    def __init__(self, door: str, answer: Callable[[Ending], bytes]) -> None:
        self.door = door
        self.answer = answer

    def buildProtocol(self, addr: IAddress) -> Refuser:
        log.info(
            "refused {door} connection from {address}: {ending}",
            door=self.door,
            address=getattr(addr, "host", addr),
            ending=TLS_ONLY,
        )
        return Refuser(self.answer(TLS_ONLY))


class TLSOrPlainFactory(Factory):
    """One port for both: TLS when the first byte starts a handshake, else
    ``plain`` (the wrapped factory itself unless told otherwise)."""

    def __init__(
        self,
        wrapped: IProtocolFactory,
        tls: ReloadableServerTLS,
        clock: IReactorTime,
        first_byte_timeout: float = 0,
        alpn: Sequence[bytes] = (),
        plain: IProtocolFactory | None = None,
    ) -> None:
        self.plain = wrapped if plain is None else plain
        self.tls = ServerTLSFactory(tls, wrapped, alpn)
        self.first_byte_timeout = first_byte_timeout
        self.clock = clock

    def buildProtocol(self, addr: IAddress) -> FirstByteDetector:
        return FirstByteDetector(self, addr)

    def startFactory(self) -> None:
        self.tls.doStart()  # and so the wrapped factory's

    def stopFactory(self) -> None:
        self.tls.doStop()


def tls_factory(
    wrapped: IProtocolFactory,
    tls: ReloadableServerTLS | None,
    ssl_only: bool,
    *,
    clock: IReactorTime,
    first_byte_timeout: float = 0,
    alpn: Sequence[bytes] = (),
    door: str = "",
    answer: Callable[[Ending], bytes] | None = None,
) -> IProtocolFactory:
    """wrapped behind TLS as configured: plain (tls None), TLS only, or either.

    A client that sends nothing is closed after ``first_byte_timeout``
    seconds on ``clock`` (0: never). ``alpn`` is what the door may select
    from a client's ALPN list (see `select_alpn`).  On a TLS-only port a
    plain client gets ``answer`` (`PlainRefused`, logged as ``door``);
    without one it is disconnected.
    """
    if tls is None:
        if ssl_only:
            raise ValueError("ssl_only needs TLS: server_tls_from_settings never gives None then")
        return wrapped
    if ssl_only and answer is None:
        return ServerTLSFactory(tls, wrapped, alpn)
    plain = PlainRefused(door, answer) if ssl_only and answer is not None else None
    return TLSOrPlainFactory(wrapped, tls, clock, first_byte_timeout, alpn, plain)
