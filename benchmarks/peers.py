"""Processes the benchmarks run: the backends and each proxy, and /proc accounting.

Every process is started here in its own process group and ended by that
group's id, so a forking proxy (websockify forks per connection) leaves
nothing behind.  Readiness is read from ``/proc/net/tcp`` (a listening
socket on the port) rather than by connecting, which a forking proxy would
count as a session.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

CHECKOUT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
PROXIES = ("consoled", "websockify", "websocat")
#: the certificates a TLS run makes: RSA-2048 and ECDSA P-256
CERTIFICATES = ("rsa", "ec")
#: what a TLS target's name ends with: "consoled+rsa", "direct+ec"
TLS_SEPARATOR = "+"
#: what a consoled target on another store than SQLite ends with: "consoled@pg"
STORE_SEPARATOR = "@"
#: the stores consoled can run on here, and the suffix of their targets' names
STORES = {"sqlite": None, "postgresql": "pg"}
#: a dedicated database, dropped and created afresh at the start of each run
POSTGRESQL_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/consoled_bench"
#: Long enough for a full run: one token serves every session of a run.
TOKEN_TTL = 6 * 3600
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- /proc --------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants, from each process's parent id."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass  # it exited meanwhile
    return total


def cpu_seconds(root: int) -> float:
    """User+system seconds of ``root``, its reaped children, and its live descendants."""
    total = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if pid == root:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / CLK_TCK


def cpu_ns(root: int) -> int:
    """Nanoseconds on a CPU of every thread of ``root``'s live process tree (schedstat)."""
    total = 0
    for pid in process_tree(root):
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # it exited meanwhile
    return total


def machine_jiffies(cpus: set[int] | None = None) -> tuple[int, int]:
    """(busy, total) CPU time so far, from /proc/stat: the whole machine's
    line, or the sum of the lines of ``cpus``."""
    busy = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu"):
            break  # the CPU lines come first
        if (name == "cpu") if cpus is None else (name[3:].isdigit() and int(name[3:]) in cpus):
            values = [int(v) for v in fields]
            busy += sum(values) - values[3] - values[4]  # less idle and iowait
            total += sum(values)
    return busy, total


def fd_limit(pid: int) -> int | str:
    """The process's soft RLIMIT_NOFILE."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    except (OSError, ValueError):
        pass
    return "?"


def busy_cpus(seconds: float = 1.0) -> float:
    """How many CPUs' worth of work the machine does over ``seconds`` (before a run)."""

    busy0, total0 = machine_jiffies()
    time.sleep(seconds)
    busy1, total1 = machine_jiffies()
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0)


def listen_drops() -> int:
    """Connections this network namespace's listeners dropped (accept queue full)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            counters = dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=True))
            return counters.get("ListenOverflows", 0) + counters.get("ListenDrops", 0)
    return 0


def listeners(port: int) -> int:
    """Listening sockets on ``port``: one per consoled worker (``SO_REUSEPORT``)."""
    wanted = f":{port:04X}"
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[1].endswith(wanted) and parts[3] == "0A":
                count += 1
    return count


def listening(port: int) -> bool:
    return listeners(port) > 0


def socket_fds(pid: int) -> int:
    """How many of the process's file descriptors are sockets."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    count = 0
    for name in names:
        try:
            count += os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")
        except OSError:
            pass  # closed meanwhile
    return count


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes ----------------------------------------------------------------


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise RLIMIT_NOFILE as far as allowed (root may lift the hard limit); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (wanted, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit), max(hard, limit)))
            return max(soft, limit)
        except (ValueError, OSError):
            continue
    return soft


def _preexec(cpus: set[int] | None) -> Callable[[], None]:
    def setup() -> None:
        raise_fd_limit()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


@contextmanager
def running(
    argv: list[str],
    log_path: Path,
    *,
    cpus: set[int] | None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdout: int | IO[Any] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` in its own process group; end the group on exit."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv,
            stdout=log if stdout is None else stdout,
            stderr=log,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_preexec(cpus),
        )
        try:
            yield process
        finally:
            _end_group(process)


def _end_group(process: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_listening(
    port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 30, count: int = 1
) -> None:
    """Until ``count`` sockets listen on ``port`` (one per worker of a consoled)."""
    deadline = time.monotonic() + timeout
    while listeners(port) < count:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} did not listen on {port} {count} time(s) within {timeout:g}s"
            )
        time.sleep(0.02)


@contextmanager
def backends(
    workdir: Path, cpus: set[int] | None, **options: int | float
) -> Iterator[dict[str, int]]:
    """The backends process; yields each behaviour's port."""
    argv = [sys.executable, str(HERE / "backends.py")]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    with running(argv, workdir / "backends.log", cpus=cpus, stdout=subprocess.PIPE) as process:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"backends did not start: see {workdir / 'backends.log'}")
        ports = json.loads(line)
        ports["pid"] = process.pid  # for a step that re-places it on the CPUs
        yield ports


# -- TLS ----------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """One self-signed server certificate for 127.0.0.1, in the forms the proxies read."""

    kind: str
    cert: Path
    key: Path
    #: for websocat (native-tls reads a PKCS#12 archive)
    pkcs12: Path
    pkcs12_password: str = "bench"


def make_certificate(workdir: Path, kind: str) -> Certificate:
    """A fresh self-signed certificate: ``rsa`` (2048 bits) or ``ec`` (P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import pkcs12
    from cryptography.x509.oid import NameOID

    if kind == "rsa":
        key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(kind)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    made = Certificate(
        kind, workdir / f"{kind}.crt", workdir / f"{kind}.key", workdir / f"{kind}.p12"
    )
    made.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    made.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    made.pkcs12.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"bench",
            key,
            certificate,
            None,
            # One KDF round: websocat reads the archive again for every connection
            # (67 ms per TLS set-up with the default 50,000 rounds).
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(1)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
            .build(made.pkcs12_password.encode()),
        )
    )
    return made


def client_context() -> ssl.SSLContext:
    """The reader's TLS: what a browser offers (ALPN http/1.1), no verification.

    The certificate is self-signed and the client's verification cost is the
    same for every proxy, so it is left out.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def split_tls(name: str) -> tuple[str, str | None]:
    """``consoled+rsa`` -> (``consoled``, ``rsa``); a plain name -> (name, None)."""
    base, _, kind = name.partition(TLS_SEPARATOR)
    return base, kind or None


def split_store(name: str) -> tuple[str, str | None]:
    """``consoled@pg`` -> (``consoled``, ``pg``); any other name -> (name, None)."""
    base, _, store = name.partition(STORE_SEPARATOR)
    return base, store or None


# -- the proxies --------------------------------------------------------------


@dataclass
class Target:
    """Where the client connects for one proxy (or directly to the backend)."""

    name: str
    port: int
    path: str = "/"
    websocket: bool = True
    #: the proxy's main process; None for direct TCP
    pid: int | None = None
    #: a raw door's opening exchange before console bytes flow:
    #: ("send", bytes) or ("expect", marker, what the bytes before it must start with)
    preamble: tuple[tuple[Any, ...], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    #: the client's TLS context for a wss:// (or direct TLS) target; None for plain
    tls: ssl.SSLContext | None = None

    def pids(self) -> list[int]:
        return [] if self.pid is None else process_tree(self.pid)


#: HAProxy's TLS column: one thread, TCP mode, TLS ended with the browser's
#: ALPN; 256 KiB buffers, as consoled reads 256 KiB at a time (HAProxy's
#: default 16 KiB made it 0.75x as fast here, 2026-12-03).
HAPROXY_CONFIG = """\
global
    nbthread 1
    tune.bufsize 262144
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend door
    bind 127.0.0.1:{port} ssl crt {pem} alpn http/1.1
    default_backend console
backend console
    server framed {backend}
"""


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.path.exists(p)), None
    )


def websocat_binary() -> str | None:
    beside = Path(sys.executable).parent / "websocat"
    return str(beside) if beside.exists() else shutil.which("websocat")


def fresh_postgresql(url: str = POSTGRESQL_URL) -> str:
    """Drop and create the database ``url`` names; return the server's version.

    Through the server's ``postgres`` database; raises when the server cannot
    be reached (the caller skips the PostgreSQL column).
    """
    sys.path.insert(0, str(CHECKOUT))
    import sqlalchemy as sa

    from consoled.store.engine import normalise_url

    parsed = normalise_url(url)
    name = parsed.database
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"{url}: name a plain database to drop and create")
    admin = sa.create_engine(
        parsed.set(database="postgres"),
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 5},
        poolclass=sa.NullPool,
    )
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
            return str(connection.execute(sa.text("SHOW server_version")).scalar()).split()[0]
    finally:
        admin.dispose()


class ConsoledSetup:
    """consoled's database (upgraded once) and a token per backend port.

    SQLite in ``workdir`` by default; ``url`` names another database (which
    must exist: :func:`fresh_postgresql` makes PostgreSQL's).
    """

    def __init__(self, workdir: Path, url: str | None = None) -> None:
        sys.path.insert(0, str(CHECKOUT))
        from consoled.store import Store, schema
        from consoled.store.engine import make_engine
        from consoled.store.runner import InlineRunner

        self.workdir = workdir
        self.url = url or f"sqlite:///{workdir / 'consoled.sqlite'}"
        engine = make_engine(self.url)
        schema.upgrade(engine)
        self.store = Store(engine, InlineRunner(), _WallClock())
        self._tokens: dict[int, str] = {}

    def token(self, backend_port: int, console_type: str = "novnc") -> str:
        if (backend_port, console_type) not in self._tokens:
            issued: list[Any] = []
            self.store.authorize(
                console_type=console_type,
                host="127.0.0.1",
                port=backend_port,
                instance_uuid="9b2c4f0e-3d1a-4c5b-8e7f-0a1b2c3d4e5f",
                access_url_base="http://127.0.0.1/vnc_auto.html",
                ttl=TOKEN_TTL,
            ).addCallback(issued.append)
            self._tokens[backend_port, console_type] = issued[0].token
        return self._tokens[backend_port, console_type]

    def config(
        self,
        port: int,
        door: str = "consoled",
        workers: int = 1,
        certificate: Certificate | None = None,
    ) -> Path:
        """One listener per run: the websocket door, or the XVP or raw serial door.

        With ``certificate`` the listener is TLS only (``[DEFAULT] ssl_only``).
        """
        path = self.workdir / f"consoled-{port}.conf"
        tls = ""
        if certificate is not None:
            tls = (
                f"[DEFAULT]\nssl_only = true\ncert = {certificate.cert}\nkey = {certificate.key}\n"
            )
        doors = {
            "consoled": "",
            "consoled-xvp": f"xvp_enabled = true\nxvp_host = 127.0.0.1\nxvp_port = {port}\n",
            "consoled-serial": (
                "serial_tcp_enabled = true\nserial_tcp_host = 127.0.0.1\n"
                f"serial_tcp_port = {port}\n"
            ),
        }
        path.write_text(
            tls + "[database]\n"
            f"connection = {self.url}\n"
            "[vnc]\n"
            f"enabled = {str(door == 'consoled').lower()}\n"
            "novncproxy_host = 127.0.0.1\n"
            f"novncproxy_port = {port}\n"
            f"novncproxy_base_url = http://127.0.0.1:{port}/vnc_auto.html\n"
            "[spice]\nenabled = false\n"
            "[serial_console]\nenabled = false\n"
            "[consoled]\n"
            "proxy_name = bench\n"
            "xvp_enabled = false\n"
            "ping_interval = 0\n"
            # Every benchmark client comes from 127.0.0.1, many with one token.
            "max_connections_per_address = 0\n"
            "max_sessions_per_token = 0\n"
            "max_sessions_per_instance = 0\n"
            f"workers = {workers}\n" + doors[door]
        )
        return path


class _WallClock:
    def seconds(self) -> float:
        return time.time()


@contextmanager
def proxy(
    name: str,
    backend_port: int,
    workdir: Path,
    consoled: ConsoledSetup,
    cpus: set[int] | None,
    profile: Path | None = None,
    workers: int = 1,
    wrapper: tuple[str, ...] = (),
    start_timeout: float = 30,
    certificates: dict[str, Certificate] | None = None,
    behaviour: tuple[str, int] | None = None,
) -> Iterator[Target]:
    """Start one proxy in front of ``backend_port``; ``direct`` starts nothing.

    ``profile``: run consoled under twistd's cProfile, stats written there on exit.
    ``wrapper``: a command the proxy runs under (valgrind, for instructions.py).
    A name ending in ``+rsa`` or ``+ec`` is that proxy serving TLS only with
    that one of ``certificates``; ``direct+KIND`` is ``tls_direct.py``, a TLS
    server that plays the backend ``behaviour`` itself ((name, bytes)).
    """
    base, kind = split_tls(name)
    if kind is not None:
        if certificates is None or kind not in certificates:
            raise ValueError(f"{name}: no {kind} certificate made")
        with _tls_proxy(
            name,
            base,
            certificates[kind],
            backend_port,
            workdir,
            consoled,
            cpus,
            workers,
            behaviour,
            wrapper,
            start_timeout,
        ) as target:
            yield target
        return
    if name == "direct":
        yield Target("direct", backend_port, websocket=False)
        return
    # consoled@pg: the websocket door with ``consoled`` on that store
    door, _ = split_store(name)
    port = free_port()
    path = "/"
    env: dict[str, str] = {}
    backend = f"127.0.0.1:{backend_port}"
    websocket, preamble = True, ()
    if door.startswith("consoled"):
        path = f"/?token={consoled.token(backend_port)}"
        if name == "consoled-xvp":  # exactly what the Java viewer sends
            connect = f"CONNECT /console?token={consoled.token(backend_port)} HTTP/1.0\r\n\r\n"
            preamble = (("send", connect.encode()), ("expect", b"\r\n\r\n", b"HTTP/1.1 200 "))
        elif name == "consoled-serial":  # a raw terminal client (nc)
            line = consoled.token(backend_port, "serial").encode() + b"\r\n"
            preamble = (
                ("expect", b"token: ", b""),
                ("send", line),
                ("expect", b"? for help)\r\n", b"\r\nconnected"),
            )
        websocket = door == "consoled"
        run = "from twisted.scripts.twistd import run; run()"
        argv = [sys.executable, "-c", run, "-n", "--pidfile="]
        if profile is not None:
            argv += ["--profile", str(profile), "--profiler", "cprofile", "--savestats"]
        argv += ["consoled", "--config-file", str(consoled.config(port, door, workers))]
        env["PYTHONPATH"] = str(CHECKOUT)
    elif name == "bare-python":
        argv = [sys.executable, str(Path(__file__).with_name("bare_relay.py")), str(port)]
        argv.append(str(backend_port))
        websocket = False
    elif name == "bare-autobahn":
        argv = [sys.executable, str(Path(__file__).with_name("bare_autobahn.py")), str(port)]
        argv.append(str(backend_port))
    elif name == "websockify":
        argv = [sys.executable, "-m", "websockify", f"127.0.0.1:{port}", backend]
    elif name == "websocat":
        binary = websocat_binary()
        assert binary is not None
        argv = [binary, "-q", "--binary", "--server-protocol", "binary"]
        argv += [f"ws-l:127.0.0.1:{port}", f"tcp:{backend}"]
    else:
        raise ValueError(name)
    argv = [*wrapper, *argv]
    # every worker of a consoled listens on the port itself (SO_REUSEPORT)
    listens = workers if door.startswith("consoled") else 1
    with running(argv, workdir / f"{name}.log", cpus=cpus, env=env, cwd=workdir) as process:
        wait_listening(port, process, name, start_timeout, listens)
        yield Target(name, port, path, websocket=websocket, pid=process.pid, preamble=preamble)


@contextmanager
def _tls_proxy(
    name: str,
    base: str,
    certificate: Certificate,
    backend_port: int,
    workdir: Path,
    consoled: ConsoledSetup,
    cpus: set[int] | None,
    workers: int,
    behaviour: tuple[str, int] | None,
    wrapper: tuple[str, ...] = (),
    start_timeout: float = 30,
) -> Iterator[Target]:
    port = free_port()
    path, env, websocket = "/", {}, True
    backend = f"127.0.0.1:{backend_port}"
    if base == "direct":
        if behaviour is None:
            raise ValueError("direct TLS needs the backend behaviour")
        argv = [sys.executable, str(HERE / "tls_direct.py"), str(port), behaviour[0]]
        argv += [str(behaviour[1]), str(certificate.cert), str(certificate.key)]
        websocket = False
    elif base == "consoled":
        path = f"/?token={consoled.token(backend_port)}"
        run = "from twisted.scripts.twistd import run; run()"
        config = consoled.config(port, "consoled", workers, certificate)
        argv = [sys.executable, "-c", run, "-n", "--pidfile=", "consoled", "--config-file"]
        argv.append(str(config))
        env["PYTHONPATH"] = str(CHECKOUT)
    elif base == "websockify":
        argv = [sys.executable, "-m", "websockify", "--ssl-only"]
        argv += ["--cert", str(certificate.cert), "--key", str(certificate.key)]
        argv += [f"127.0.0.1:{port}", backend]
    elif base == "haproxy":
        # A C relay that only ends TLS: the backend (``framed``) frames its
        # bytes itself, so HAProxy does no websocket work at all.
        pem = workdir / f"{certificate.kind}.pem"
        pem.write_bytes(certificate.cert.read_bytes() + certificate.key.read_bytes())
        config = workdir / f"{name}.cfg"
        config.write_text(HAPROXY_CONFIG.format(port=port, pem=pem, backend=backend))
        argv = [haproxy_binary() or "haproxy", "-f", str(config), "-db"]
    elif base == "websocat":
        binary = websocat_binary()
        assert binary is not None
        argv = [binary, "-q", "--binary", "--server-protocol", "binary"]
        argv += ["--pkcs12-der", str(certificate.pkcs12)]
        argv += ["--pkcs12-passwd", certificate.pkcs12_password]
        argv += [f"wss-listen:127.0.0.1:{port}", f"tcp:{backend}"]
    else:
        raise ValueError(f"{name}: no TLS variant of {base}")
    argv = [*wrapper, *argv]
    with running(argv, workdir / f"{name}.log", cpus=cpus, env=env, cwd=workdir) as process:
        wait_listening(port, process, name, start_timeout)
        yield Target(name, port, path, websocket=websocket, pid=process.pid, tls=client_context())
