"""Who may open which console: token extraction, console type, websocket Origin.

The Origin rules are nova's (``nova.console.websocketproxy``): a request
without an Origin header is a non-browser client and passes; otherwise the
Origin's hostname must be the Host header's hostname or one of
``[console] allowed_origins``, and its scheme must belong to the family of
the token's ``access_url_base`` (http/ws, or https/wss).  Unlike nova,
``X-Forwarded-Proto`` is believed only from ``[consoled] trusted_proxies``,
and the configured list is never modified.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import urlparse

from consoled.endings import Kind, Refusal
from consoled.redaction import redact
from consoled.tokens import ConnectInfo

#: The console types each door serves.
DOOR_TYPES: Mapping[str, frozenset[str]] = {
    "novnc": frozenset({"novnc"}),
    "spice": frozenset({"spice-html5"}),
    "serial": frozenset({"serial"}),
    "xvp": frozenset({"xvpvnc", "novnc"}),
    "serial-tcp": frozenset({"serial"}),
    "webmks": frozenset({"webmks"}),
}

_FAMILIES = ({"http", "ws"}, {"https", "wss"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_cookies(header: str | None) -> dict[str, str]:
    """Cookie pairs; a malformed part is skipped, never fatal (unlike SimpleCookie)."""
    cookies: dict[str, str] = {}
    for part in (header or "").split(";"):
        name, sep, value = part.partition("=")
        name = name.strip()
        if sep and name:
            cookies.setdefault(name, value.strip().strip('"'))
    return cookies


def token_from(params: Mapping[str, Sequence[str]], cookie_header: str | None) -> str | None:
    """The ``token`` query parameter, else the ``token`` cookie, else None."""
    values = params.get("token") or ()
    if values and values[0]:
        return values[0]
    return parse_cookies(cookie_header).get("token") or None


def check_console_type(info: ConnectInfo, door: str) -> None:
    if info.console_type not in DOOR_TYPES[door]:
        raise Refusal(
            Kind.WRONG_CONSOLE_TYPE,
            f"{info.console_type} token at the {door} door",
            info.hash_prefix,
        )


def is_trusted(address: str, trusted: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def host_name(host_header: str | None) -> str | None:
    """The hostname of a Host header: without port, IPv6 brackets removed."""
    if not host_header:
        return None
    host = host_header.strip()
    if host.startswith("["):
        return host[1:].split("]", 1)[0].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


def check_origin(
    info: ConnectInfo,
    *,
    origin: str | None,
    host_header: str | None,
    forwarded_proto: str | None,
    peer: str,
    allowed_origins: Iterable[str],
    trusted_proxies: Iterable[Network],
) -> None:
    """Refuse a browser whose Origin does not belong to this proxy."""
    if origin is None:
        return
    try:
        parsed = urlparse(origin)
        scheme, hostname = parsed.scheme.lower(), (parsed.hostname or "").lower()
    except ValueError:  # e.g. a malformed IPv6 literal
        raise Refusal(Kind.ORIGIN_REFUSED, "Origin header not valid", info.hash_prefix) from None
    if forwarded_proto and is_trusted(peer, trusted_proxies):
        scheme = forwarded_proto.split(",")[0].strip().lower()
    if not scheme or not hostname:
        raise Refusal(Kind.ORIGIN_REFUSED, "Origin header not valid", info.hash_prefix)
    expected = {name.lower() for name in allowed_origins}
    own = host_name(host_header)
    if own:
        expected.add(own)
    if hostname not in expected:
        raise Refusal(
            Kind.ORIGIN_REFUSED,
            f"Origin {redact(hostname)!r} does not match this host",
            info.hash_prefix,
        )
    base_scheme = urlparse(info.access_url_base or "").scheme.lower()
    family = next((f for f in _FAMILIES if base_scheme in f), None)
    if family is None:
        raise Refusal(
            Kind.ORIGIN_REFUSED, "token has no access_url_base to check against", info.hash_prefix
        )
    if scheme not in family:
        raise Refusal(
            Kind.ORIGIN_REFUSED,
            f"Origin scheme {scheme!r} does not match {base_scheme!r}",
            info.hash_prefix,
        )
