"""How each option's text in a configuration file becomes a typed value.

Each parser takes the text and returns the value, or raises
``ValueError("expected ...")``; consoled.config names the file, group and
option around that message.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from dataclasses import field
from typing import Any

from consoled.tokens import CONSOLE_TYPES

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

Parse = Callable[[str], Any]


def _shown(text: str) -> str:
    # A wrong value goes into an error message; keep that message one short line.
    return repr(text if len(text) <= 60 else text[:57] + "...")


_INVALID = object()


def _checked(wanted: str, convert: Callable[[str], Any], ok: Callable[[Any], bool]) -> Parse:
    """A parser: convert the text, then check the value, else 'expected ...'."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except (ValueError, KeyError):
            value = _INVALID
        if value is _INVALID or not ok(value):
            raise ValueError(f"expected {wanted}, got {_shown(text)}")
        return value

    return parse


def _always(value: Any) -> bool:
    return True


def integer(low: int | None = None, high: int | None = None) -> Parse:
    if low is not None and high is not None:
        wanted = f"an integer from {low} to {high}"
    else:
        wanted = "an integer" if low is None else f"an integer of at least {low}"
    return _checked(
        wanted,
        int,
        lambda value: (low is None or value >= low) and (high is None or value <= high),
    )


port = integer(1, 65535)


def seconds(*, zero_ok: bool = False) -> Parse:
    wanted = "a number of seconds" + (", 0 or more" if zero_ok else " above 0")
    return _checked(
        wanted,
        float,
        lambda value: math.isfinite(value) and (value > 0 or zero_ok and value == 0),
    )


_BOOLEANS = {
    "true": True, "yes": True, "on": True, "1": True,
    "false": False, "no": False, "off": False, "0": False,
}  # fmt: skip
boolean = _checked(
    "true/false, yes/no, on/off or 1/0",
    lambda text: _BOOLEANS[text.lower()],
    _always,
)


def choice(*allowed: str) -> Parse:
    return _checked(f"one of {', '.join(allowed)}", str, lambda v: v in allowed)


port_range = _checked(
    "'low:high' with 1 <= low < high <= 65535",
    lambda text: tuple(int(part) for part in text.split(":")),
    lambda pair: len(pair) == 2 and 1 <= pair[0] < pair[1] <= 65535,
)


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.replace("\n", ",").split(",") if item.strip()]


def each(parse_item: Parse, *, at_least_one: bool = False) -> Parse:
    """A parser for a comma-separated list (nova's ListOpt) of one item type."""

    def parse(text: str) -> tuple[Any, ...]:
        items = tuple(parse_item(item) for item in _items(text))
        if at_least_one and not items:
            raise ValueError("expected at least one value")
        return items

    return parse


_ttl_pair = _checked(
    f"'type:seconds', seconds >= 1, type one of {', '.join(CONSOLE_TYPES)}",
    lambda text: (text.rpartition(":")[0].strip(), int(text.rpartition(":")[2])),
    lambda pair: pair[0] in CONSOLE_TYPES and pair[1] >= 1,
)


def ttl_by_type(text: str) -> tuple[tuple[str, int], ...]:
    pairs = each(_ttl_pair)(text)
    kinds = [kind for kind, _ in pairs]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"expected each console type once, got {_shown(text)}")
    return pairs


networks = each(
    _checked(
        "IP addresses or networks (a.b.c.d/nn)",
        lambda text: ipaddress.ip_network(text, strict=False),
        _always,
    )
)


def opt(default: Any, parse: Parse) -> Any:
    """One option: its default and the parser for its text in a file."""
    return field(default=default, metadata={"parse": parse})
