"""What may be logged of text that quotes a request: never a token."""

from __future__ import annotations

import re

#: What may hold a token in text that quotes a request: a ``token=`` value (in
#: a query, a fragment, a ``;`` parameter, a cookie; its ``=`` maybe
#: URL-encoded), whatever follows a ``#`` (Autobahn quotes a fragment without
#: it), and anything shaped like a token, a uuid (dashes encoded or left out).
_TOKENISH = re.compile(
    r"(token\s*(?:=|%3D|%253D)\s*\"?)[^&;,\s\"']*"
    r"|(#|%23|fragment identifier \")[^\s\"]+"
    r"|[0-9a-f]{8}(?:-|%2D)?(?:[0-9a-f]{4}(?:-|%2D)?){3}[0-9a-f]{12}",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """Text that quotes a request (a request line, a header, Autobahn's own
    reasons) with every place that may hold a token replaced by ``<redacted>``."""
    return _TOKENISH.sub(lambda found: (found[1] or found[2] or "") + "<redacted>", text)
