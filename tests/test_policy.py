"""Who may open which console: cookies, token extraction, console types, nova's Origin rules."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from consoled.endings import Kind, Refusal
from consoled.policy import (
    DOOR_TYPES,
    check_console_type,
    check_origin,
    host_name,
    parse_cookies,
    token_from,
)
from consoled.tokens import ConnectInfo

INFO = ConnectInfo(
    id=1,
    token_hash="795f320804ab28ff224cb5b96f54635e7c4bd802ce7dbe943ef14e5dbe2da809",
    console_type="novnc",
    host="10.0.0.5",
    port=5900,
    tls_port=None,
    internal_access_path=None,
    instance_uuid="0b4c2f0e-0000-4000-8000-000000000001",
    access_url_base="http://proxy.example:6080/vnc_auto.html",
    expires=2_000_000_000,
)
PROXIES = [ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/8")]


class CookieTests(SynchronousTestCase):
    def test_malformed_parts_skipped(self) -> None:
        """Parts without a name or an '=' are skipped; the rest of the header still counts."""
        cookies = parse_cookies('junk; =x; a=b=c; q="quoted" ;  token=t1; token=t2; ;')
        self.assertEqual(cookies, {"a": "b=c", "q": "quoted", "token": "t1"})

    def test_absent_header(self) -> None:
        """No Cookie header is no cookies."""
        self.assertEqual(parse_cookies(None), {})
        self.assertEqual(parse_cookies(""), {})

    @given(st.text())
    def test_any_text_parses(self, header: str) -> None:
        """Whatever a browser or an attacker sends, parsing gives a str->str dict, never raises."""
        cookies = parse_cookies(header)
        self.assertIsInstance(cookies, dict)
        for name, value in cookies.items():
            self.assertTrue(name and name == name.strip())
            self.assertIn(name, header)
            self.assertIsInstance(value, str)


class TokenFromTests(SynchronousTestCase):
    def test_query_wins(self) -> None:
        """The token query parameter wins over the token cookie."""
        self.assertEqual(token_from({"token": ["q"]}, "token=c"), "q")

    def test_empty_query_falls_back_to_cookie(self) -> None:
        """An empty token parameter is no token parameter: the cookie is used."""
        self.assertEqual(token_from({"token": [""]}, "x=1; token=c"), "c")
        self.assertEqual(token_from({}, "token=c"), "c")

    def test_none(self) -> None:
        """Neither parameter nor (non-empty) cookie gives None."""
        self.assertIsNone(token_from({}, None))
        self.assertIsNone(token_from({"token": []}, "token="))
        self.assertIsNone(token_from({"other": ["x"]}, "other=y"))


class ConsoleTypeTests(SynchronousTestCase):
    def test_each_door(self) -> None:
        """Every door admits exactly its console types and refuses the others by kind."""
        every = {"novnc", "spice-html5", "serial", "webmks", "xvpvnc"}
        for door, types in DOOR_TYPES.items():
            for console_type in every:
                info = replace(INFO, console_type=console_type)
                if console_type in types:
                    check_console_type(info, door)
                    continue
                refusal = self.assertRaises(Refusal, check_console_type, info, door)
                self.assertEqual(refusal.ending.kind, Kind.WRONG_CONSOLE_TYPE)
                self.assertEqual(refusal.hash_prefix, "795f3208")

    def test_named_cases(self) -> None:
        """A novnc token is refused at the spice door; the xvp door takes xvpvnc and novnc."""
        self.assertRaises(Refusal, check_console_type, INFO, "spice")
        check_console_type(INFO, "xvp")
        check_console_type(replace(INFO, console_type="xvpvnc"), "xvp")
        self.assertRaises(
            Refusal, check_console_type, replace(INFO, console_type="xvpvnc"), "novnc"
        )


class OriginTests(SynchronousTestCase):
    def check(self, origin: str | None, host: str | None = "proxy.example:6080", **kw: Any) -> None:
        check_origin(
            kw.pop("info", INFO),
            origin=origin,
            host_header=host,
            forwarded_proto=kw.pop("proto", None),
            peer=kw.pop("peer", "192.0.2.7"),
            allowed_origins=kw.pop("allowed", ()),
            trusted_proxies=kw.pop("trusted", PROXIES),
        )

    def refused(self, origin: str | None, **kw: Any) -> Refusal:
        refusal = self.assertRaises(Refusal, self.check, origin, **kw)
        self.assertEqual(refusal.ending.kind, Kind.ORIGIN_REFUSED)
        return refusal

    def test_no_origin_passes(self) -> None:
        """A non-browser client (no Origin) passes even with no Host and no access_url_base."""
        self.check(None, host=None, info=replace(INFO, access_url_base=None))

    def test_host_forms(self) -> None:
        """The Origin's hostname matches the Host header given as host:port, bare host or IPv6."""
        self.check("http://proxy.example:6080")
        self.check("http://PROXY.example", host="proxy.EXAMPLE")
        self.check("http://[::1]:6080", host="[::1]:6080")
        self.check("http://[::1]", host="[::1]")
        self.assertEqual(host_name("[::1]:6080"), "::1")
        self.assertEqual(host_name("::1"), "::1")
        self.assertIsNone(host_name(""))

    def test_other_host_refused(self) -> None:
        """A page on another host is refused and the detail names that host."""
        refusal = self.refused("http://evil.example:6080")
        self.assertIn("evil.example", refusal.ending.detail)
        self.refused("http://proxy.example.evil:6080")
        self.refused("http://proxy.example", host=None)

    def test_allowed_origins(self) -> None:
        """An Origin host listed in allowed_origins passes, compared case-insensitively."""
        self.check("https://Portal.Example", allowed=["portal.example"], info=self.https())
        self.check("http://portal.example", allowed=["PORTAL.EXAMPLE"])
        self.refused("http://other.example", allowed=["portal.example"])

    def test_allowed_origins_not_mutated(self) -> None:
        """The configured list is never modified (nova appended the Host to its config list)."""
        allowed = ["portal.example"]
        for n in range(50):
            self.check(f"http://h{n}.example", host=f"h{n}.example", allowed=allowed)
        self.assertEqual(allowed, ["portal.example"])
        self.refused("http://h1.example", host="h2.example", allowed=allowed)

    def https(self) -> ConnectInfo:
        return replace(INFO, access_url_base="https://proxy.example/vnc_auto.html")

    def test_scheme_family(self) -> None:
        """The Origin's scheme must be in the http/ws or https/wss family of access_url_base."""
        refusal = self.refused("http://proxy.example", info=self.https())
        self.assertIn("'http'", refusal.ending.detail)
        self.check("https://proxy.example", info=self.https())
        wss = replace(INFO, access_url_base="wss://proxy.example/")
        self.check("https://proxy.example", info=wss)
        self.refused("http://proxy.example", info=wss)
        self.check("ws://proxy.example:6080")
        self.check("http://proxy.example:6080")
        self.refused("https://proxy.example:6080")
        self.refused("ftp://proxy.example:6080")

    def test_token_without_base_refused(self) -> None:
        """A browser with a token that has no access_url_base cannot be checked, so it is refused."""
        self.refused("http://proxy.example", info=replace(INFO, access_url_base=None))

    def test_null_or_garbage_refused(self) -> None:
        """Origin: null (sandboxed pages, file:) and unparseable values are refused."""
        for origin in ["null", "", "proxy.example", "http://", "://proxy.example", "http:///x"]:
            self.refused(origin)

    def test_forwarded_proto_from_trusted_proxy(self) -> None:
        """X-Forwarded-Proto replaces the Origin's scheme only when the peer is a trusted proxy."""
        https = self.https()
        self.check("http://proxy.example", info=https, proto="https", peer="10.1.2.3")
        self.check("http://proxy.example", info=https, proto="HTTPS, http", peer="fd00::1")
        self.refused("http://proxy.example", info=https, proto="https", peer="192.0.2.7")
        self.refused("http://proxy.example", info=https, proto="https", peer="not-an-ip")
        self.refused("http://proxy.example", info=https, proto="https", peer="10.1.2.3", trusted=[])
        self.refused("http://proxy.example", proto="https", peer="10.1.2.3")

    def test_malformed_ipv6_origin_refused(self) -> None:
        """An Origin with a broken IPv6 literal is an ORIGIN_REFUSED, not a ValueError."""
        for origin in ["http://[::1", "http://[zzz]", "http://]", "https://a]:443"]:
            self.refused(origin, host="[::1]:6080")

    @given(
        st.one_of(
            st.text(max_size=40),
            st.builds("{}://{}".format, st.sampled_from(["http", "https", "ws"]), st.text()),
        )
    )
    def test_any_origin_passes_or_is_refused(self, origin: str) -> None:
        """Whatever the Origin header holds, the check either passes or raises a Refusal."""
        try:
            self.check(origin)
        except Refusal as refusal:
            self.assertEqual(refusal.ending.kind, Kind.ORIGIN_REFUSED)
