"""Typed, frozen settings read from INI files with nova's names and defaults.

The file format is nova.conf's (oslo.config's INI dialect), so an existing
nova.conf can be passed as it is, alone or followed by a consoled-only file:

- ``[group]`` headers; ``option = value`` (or ``option: value``) lines; ``#``
  and ``;`` start comment lines (there are no inline comments); an indented
  line continues the previous value; one pair of matching quotes around a
  value is removed, as oslo.config does.
- ``[DEFAULT]`` is a group like any other: its keys are never seen by other
  groups. Other group names are case-insensitive; ``-`` in group and option
  names reads as ``_``.
- Files are read in order and a later file wins, option by option.
- Groups and options consoled does not know are ignored (with a debug log
  line naming them, never their value: values can be secrets).
- Lists are comma-separated; booleans are true/false, yes/no, on/off, 1/0.
  An empty value means "unset" for options whose default is ``None``.

Every option, its type, default and meaning: docs/configuration.md.
"""

from __future__ import annotations

import configparser
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from twisted.logger import Logger

from consoled.option_types import (
    IPNetwork,
    boolean,
    choice,
    each,
    integer,
    networks,
    opt,
    port,
    port_range,
    seconds,
    ttl_by_type,
)
from consoled.tokens import CONSOLE_TYPES

_log = Logger()


class ConfigError(Exception):
    """A configuration file cannot be read, or one of its values is wrong."""

    def __init__(
        self, path: str | None, group: str | None, option: str | None, message: str
    ) -> None:
        super().__init__(path, group, option, message)
        self.path, self.group, self.option = path, group, option
        self.message = message

    def __str__(self) -> str:
        where = "" if self.group is None else f"[{self.group}] "
        where += "" if self.option is None else f"{self.option}: "
        if self.path is not None:
            where = f"{self.path}: {where}"
        return where + self.message


# --- the option table: one frozen dataclass per group ------------------------


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    """[database]: None for connection means the embedded SQLite default."""

    connection: str | None = opt(None, str)
    max_pool_size: int | None = opt(None, integer(0))
    connection_recycle_time: int = opt(3600, integer())


@dataclass(frozen=True, slots=True)
class ConsoleAuthSettings:
    """[consoleauth]"""

    token_ttl: int = opt(600, integer(1))
    enforce_session_timeout: bool = opt(False, boolean)


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    """[console]"""

    allowed_origins: tuple[str, ...] = opt((), each(str))
    ssl_ciphers: str | None = opt(None, str)
    ssl_minimum_version: str = opt("default", choice("default", "tlsv1_1", "tlsv1_2", "tlsv1_3"))


@dataclass(frozen=True, slots=True)
class VncSettings:
    """[vnc], with nova's removed xvpvncproxy_* names kept as fallbacks."""

    enabled: bool = opt(True, boolean)
    novncproxy_host: str = opt("0.0.0.0", str)
    novncproxy_port: int = opt(6080, port)
    # Not nova's vnc_auto.html: noVNC >= 1.0 has no such page (Debian links it
    # to vnc.html, which waits for a Connect click); vnc_lite.html connects at once.
    novncproxy_base_url: str = opt("http://127.0.0.1:6080/vnc_lite.html", str)
    auth_schemes: tuple[str, ...] = opt(
        ("none",), each(choice("none", "vencrypt"), at_least_one=True)
    )
    vencrypt_client_key: str | None = opt(None, str)
    vencrypt_client_cert: str | None = opt(None, str)
    vencrypt_ca_certs: str | None = opt(None, str)
    xvpvncproxy_host: str | None = opt(None, str)
    xvpvncproxy_port: int | None = opt(None, port)
    xvpvncproxy_base_url: str | None = opt(None, str)
    # Where the compute host's VNC servers are reached when libvirt's XML says
    # they listen on every address (consoled.drivers.libvirt).
    server_proxyclient_address: str = opt("127.0.0.1", str)


@dataclass(frozen=True, slots=True)
class SerialConsoleSettings:
    """[serial_console]: port_range is read from 'low:high'."""

    enabled: bool = opt(False, boolean)
    serialproxy_host: str = opt("0.0.0.0", str)
    serialproxy_port: int = opt(6083, port)
    # Not nova's ws://127.0.0.1:6083/: a browser opens consoled's serial page,
    # which opens the websocket on the same host and port with the same token.
    base_url: str = opt("http://127.0.0.1:6083/serial.html", str)
    port_range: tuple[int, int] = opt((10000, 20000), port_range)
    proxyclient_address: str = opt("127.0.0.1", str)


@dataclass(frozen=True, slots=True)
class SpiceSettings:
    """[spice]"""

    enabled: bool = opt(False, boolean)
    html5proxy_host: str = opt("0.0.0.0", str)
    html5proxy_port: int = opt(6082, port)
    html5proxy_base_url: str = opt("http://127.0.0.1:6082/spice_auto.html", str)
    # nova's (libvirt: every SPICE channel secure); here: no SPICE in the clear.
    require_secure: bool = opt(False, boolean)
    # consoled's own: how a token's tls_port is verified (docs/websocket.md).
    ca_certs: str | None = opt(None, str)
    host_subject: str | None = opt(None, str)
    server_proxyclient_address: str = opt("127.0.0.1", str)


@dataclass(frozen=True, slots=True)
class MksSettings:
    """[mks]"""

    enabled: bool = opt(False, boolean)
    mksproxy_base_url: str = opt("http://127.0.0.1:6090/", str)


@dataclass(frozen=True, slots=True)
class DefaultSettings:
    """[DEFAULT]: the websockify-era TLS and web options nova keeps here."""

    ssl_only: bool = opt(False, boolean)
    cert: str = opt("self.pem", str)
    key: str | None = opt(None, str)
    web: str = opt("/usr/share/novnc", str)
    record: str | None = opt(None, str)
    source_is_ipv6: bool = opt(False, boolean)
    debug: bool = opt(False, boolean)
    state_path: str | None = opt(None, str)

    def __post_init__(self) -> None:
        # Only that a certificate is named: whether it exists is the TLS layer's job.
        if self.ssl_only and not self.cert:
            wanted = "a certificate file because ssl_only is true"
            raise ConfigError(None, "DEFAULT", "cert", f"expected {wanted}, got ''")


def _memcache_server(text: str) -> tuple[str, int]:
    """One of nova's [cache] memcache_servers: host:port, [v6]:port or inet6:[v6]:port."""
    wanted = "host:port"
    rest = text[len("inet6:") :] if text.startswith("inet6:") else text
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        number = tail[1:] if tail.startswith(":") else ("" if not tail else "x")
    else:
        host, _, number = rest.rpartition(":") if ":" in rest else (rest, "", "")
    try:
        value = int(number) if number else 11211
    except ValueError:
        value = 0
    if not host or not 0 < value < 65536 or "/" in host:
        raise ValueError(f"expected {wanted}, got {text!r}")
    return host, value


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """[cache]: oslo.cache's names and defaults, read only for the legacy consoleauth store."""

    enabled: bool = opt(False, boolean)
    backend: str = opt("dogpile.cache.null", str)
    memcache_servers: tuple[tuple[str, int], ...] = opt(
        (("localhost", 11211),), each(_memcache_server)
    )
    memcache_socket_timeout: float = opt(1.0, seconds())


@dataclass(frozen=True, slots=True)
class LibvirtSettings:
    """[libvirt]: where consoled.drivers.libvirt reads domains' consoles."""

    connection_uri: str = opt("qemu:///system", str)


@dataclass(frozen=True, slots=True)
class VmwareSettings:
    """[vmware]: the vCenter (or ESXi) consoled.drivers.vmware asks for tickets."""

    host_ip: str | None = opt(None, str)
    host_port: int = opt(443, port)
    host_username: str | None = opt(None, str)
    host_password: str | None = opt(None, str)
    ca_file: str | None = opt(None, str)
    insecure: bool = opt(False, boolean)


@dataclass(frozen=True, slots=True)
class WorkaroundsSettings:
    """[workarounds]"""

    enable_consoleauth: bool = opt(False, boolean)


def _sha256_hex(text: str) -> str:
    """A key's SHA-256 digest as 64 hex digits (``consoled-manage api-key create``)."""
    digest = text.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError("expected SHA-256 hex digests (64 hex digits each)")
    return digest


@dataclass(frozen=True, slots=True)
class ConsoledSettings:
    """[consoled]: consoled's own options; nova has none of these.

    novnc_enabled, spice_enabled and serial_enabled are None unless set:
    None follows nova's own [vnc]/[spice]/[serial_console] enabled flag (see
    the Settings.*_door_enabled properties).
    """

    proxy_name: str | None = opt(None, str)
    db_threads: int = opt(4, integer(1, 64))
    token_clean_interval: float = opt(300.0, seconds())
    token_clean_batch: int = opt(500, integer(1))
    token_ttl_by_type: tuple[tuple[str, int], ...] = opt((), ttl_by_type)
    novnc_enabled: bool | None = opt(None, boolean)
    spice_enabled: bool | None = opt(None, boolean)
    serial_enabled: bool | None = opt(None, boolean)
    spice_web: str = opt("/usr/share/spice-html5", str)
    serial_web: str | None = opt(None, str)
    xterm_dir: str = opt("node_modules/@xterm/xterm", str)
    # The WebMKS door ([mks] enabled): nova-mksproxy's address; None: consoled's own page.
    mks_host: str = opt("0.0.0.0", str)
    mks_port: int = opt(6090, port)
    mks_web: str | None = opt(None, str)
    trusted_proxies: tuple[IPNetwork, ...] = opt((), networks)
    # Doors that read a PROXY protocol header first (HAProxy send-proxy): docs/deployment.md.
    proxy_protocol: tuple[str, ...] = opt(
        (), each(choice("novnc", "spice", "serial", "webmks", "xvp", "serial-tcp"))
    )
    connect_timeout: float = opt(10.0, seconds())
    admission_timeout: float = opt(10.0, seconds())
    ping_interval: float = opt(25.0, seconds(zero_ok=True))
    idle_timeout: float = opt(0.0, seconds(zero_ok=True))
    handshake_timeout: float = opt(30.0, seconds())
    xvp_enabled: bool = opt(True, boolean)
    xvp_host: str = opt("0.0.0.0", str)
    xvp_port: int = opt(6081, port)
    xvp_base_url: str = opt("http://127.0.0.1:6081/console", str)
    xvp_request_timeout: float = opt(15.0, seconds())
    serial_tcp_enabled: bool = opt(False, boolean)
    serial_tcp_host: str = opt("0.0.0.0", str)
    serial_tcp_port: int = opt(6084, port)
    serial_prompt_timeout: float = opt(60.0, seconds())
    serial_spectators: bool = opt(False, boolean)
    touch_interval: float = opt(10.0, seconds())
    lease_seconds: float = opt(30.0, seconds())
    record_dir: str | None = opt(None, str)
    record_max_bytes: int = opt(10_000_000, integer(1))
    record_max_files: int = opt(5, integer(1))
    workers: int = opt(1, integer(1, 64))
    # Abuse limits (0 turns one off); docs/configuration.md, docs/refusals.md.
    failed_token_limit: int = opt(30, integer(0))
    failed_token_window: float = opt(60.0, seconds())
    failed_token_ban: float = opt(300.0, seconds())
    max_connections_per_address: int = opt(200, integer(0))
    max_sessions_per_token: int = opt(16, integer(0))
    max_sessions_per_instance: int = opt(32, integer(0))
    http_connection_max: float = opt(60.0, seconds(zero_ok=True))
    # The management listener (health, metrics, the API): off unless keys are set.
    api_host: str = opt("127.0.0.1", str)
    api_port: int = opt(6089, port)
    api_key_hashes: tuple[str, ...] = opt((), each(_sha256_hex))

    def __post_init__(self) -> None:
        # A lease renewed no more often than it lasts would lapse between touches.
        if self.lease_seconds <= self.touch_interval:
            wanted = f"more than touch_interval ({self.touch_interval:g})"
            got = f"{self.lease_seconds:g}"
            raise ConfigError(None, "consoled", "lease_seconds", f"expected {wanted}, got {got}")


@dataclass(frozen=True, slots=True)
class Settings:
    """Every group's settings; Settings() is nova's (and consoled's) defaults."""

    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    consoleauth: ConsoleAuthSettings = field(default_factory=ConsoleAuthSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    vnc: VncSettings = field(default_factory=VncSettings)
    serial_console: SerialConsoleSettings = field(default_factory=SerialConsoleSettings)
    spice: SpiceSettings = field(default_factory=SpiceSettings)
    mks: MksSettings = field(default_factory=MksSettings)
    default: DefaultSettings = field(default_factory=DefaultSettings)
    workarounds: WorkaroundsSettings = field(default_factory=WorkaroundsSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    libvirt: LibvirtSettings = field(default_factory=LibvirtSettings)
    vmware: VmwareSettings = field(default_factory=VmwareSettings)
    consoled: ConsoledSettings = field(default_factory=ConsoledSettings)

    def access_url_base(self, console_type: str) -> str:
        """The URL a token for console_type is appended to for the user.

        The built-in defaults name consoled's own pages over plain HTTP; with
        ``ssl_only`` those doors speak TLS only, so an unchanged default is
        handed out as https (a user given the http URL reached nothing, and
        the origin check would refuse the https page's upgrade: 403).
        """
        places = {
            "novnc": (self.vnc, "novncproxy_base_url"),
            "spice-html5": (self.spice, "html5proxy_base_url"),
            "serial": (self.serial_console, "base_url"),
            "webmks": (self.mks, "mksproxy_base_url"),
            "xvpvnc": (self.consoled, "xvp_base_url"),
        }
        try:
            section, name = places[console_type]
        except KeyError:
            raise ValueError(f"unknown console type {console_type!r}") from None
        base: str = getattr(section, name)
        default = {f.name: f.default for f in fields(section)}[name]
        if self.default.ssl_only and base == default and base.startswith("http://"):
            return "https://" + base.removeprefix("http://")
        return base

    def token_ttl(self, console_type: str) -> int:
        """Seconds a new token of console_type lives."""
        if console_type not in CONSOLE_TYPES:
            raise ValueError(f"unknown console type {console_type!r}")
        return dict(self.consoled.token_ttl_by_type).get(console_type, self.consoleauth.token_ttl)

    @property
    def novnc_door_enabled(self) -> bool:
        """[consoled] novnc_enabled if set, else [vnc] enabled."""
        return _either(self.consoled.novnc_enabled, self.vnc.enabled)

    @property
    def spice_door_enabled(self) -> bool:
        """[consoled] spice_enabled if set, else [spice] enabled."""
        return _either(self.consoled.spice_enabled, self.spice.enabled)

    @property
    def serial_door_enabled(self) -> bool:
        """[consoled] serial_enabled if set, else [serial_console] enabled."""
        return _either(self.consoled.serial_enabled, self.serial_console.enabled)


def _either(explicit: bool | None, nova: bool) -> bool:
    return nova if explicit is None else explicit


# Group name in a file -> (attribute of Settings, that group's dataclass).
_GROUPS: dict[str, tuple[str, Any]] = {
    ("DEFAULT" if f.name == "default" else f.name): (f.name, f.default_factory)
    for f in fields(Settings)
}
_OPTIONS = {group: {f.name for f in fields(cls)} for group, (_, cls) in _GROUPS.items()}

# [consoled] option -> the removed nova [vnc] option it falls back to.
_XVP_FALLBACKS = {
    "xvp_host": "xvpvncproxy_host",
    "xvp_port": "xvpvncproxy_port",
    "xvp_base_url": "xvpvncproxy_base_url",
}


# --- reading -----------------------------------------------------------------

# (group, option) -> (text, path of the file that set it last)
_Raw = dict[tuple[str, str], tuple[str, str]]


def load_settings(paths: Sequence[str], log: Logger | None = None) -> Settings:
    """Read the INI files at paths in order (a later file wins per option)."""
    log = _log if log is None else log
    raw: _Raw = {}
    for path in paths:
        for group, option, text in _read(path):
            known = _OPTIONS.get(group)
            if known is not None and option in known:
                raw[(group, option)] = (text, path)
            else:
                what = "group" if known is None else "option"
                log.debug(
                    "{path}: ignoring [{group}] {option}: unknown {what}",
                    path=path, group=group, option=option, what=what,
                )  # fmt: skip
    groups = {attr: _build(group, cls, raw) for group, (attr, cls) in _GROUPS.items()}
    fallbacks = {
        mine: getattr(groups["vnc"], nova)
        for mine, nova in _XVP_FALLBACKS.items()
        if ("consoled", mine) not in raw and getattr(groups["vnc"], nova) is not None
    }
    if fallbacks:
        groups["consoled"] = replace(groups["consoled"], **fallbacks)
    return Settings(**groups)


def _build(group: str, cls: type, raw: _Raw) -> Any:
    """One group's dataclass from the texts given for it, or ConfigError."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in fields(cls):
        if (group, f.name) not in raw:
            continue
        text, path = raw[(group, f.name)]
        sources[f.name] = path
        if text == "" and f.default is None:
            values[f.name] = None
            continue
        try:
            values[f.name] = f.metadata["parse"](text)
        except ValueError as e:
            raise ConfigError(path, group, f.name, str(e)) from None
    try:
        return cls(**values)
    except ConfigError as e:
        # A rule across options: name the file that set the option the error
        # names, else the last file that set anything in this group.
        last = list(sources.values())[-1] if sources else None
        path = sources.get(e.option or "", last)
        raise ConfigError(path, e.group, e.option, e.message) from None


def _read(path: str) -> list[tuple[str, str, str]]:
    """(group, option, text) for every option in one file, in file order."""
    # No default section: nova's [DEFAULT] must not leak into other groups.
    parser = configparser.RawConfigParser(
        interpolation=None, strict=False, default_section="__nodefault__"
    )
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except OSError as e:
        raise ConfigError(path, None, None, f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, None, "not UTF-8 text") from None
    except configparser.Error as e:
        # configparser's own message quotes the bad line, which may hold a secret.
        raise ConfigError(path, None, None, _syntax_error(e)) from None
    found = []
    for section in parser.sections():
        group = section if section == "DEFAULT" else section.lower().replace("-", "_")
        for option, text in parser.items(section):
            found.append((group, option.replace("-", "_"), _unquote(text or "")))
    return found


def _syntax_error(e: configparser.Error) -> str:
    if isinstance(e, configparser.MissingSectionHeaderError):
        return f"INI syntax error at line {e.lineno}: an option before any [group]"
    if isinstance(e, configparser.ParsingError) and e.errors:
        return f"INI syntax error at line {e.errors[0][0]}: expected 'option = value'"
    return f"INI syntax error ({type(e).__name__})"


def _unquote(text: str) -> str:
    # oslo.config drops one pair of matching quotes around a value.
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text
