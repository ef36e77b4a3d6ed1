"""The one shape of every HTTP refusal consoled writes itself (websocket and XVP doors)."""

from __future__ import annotations

from http import HTTPStatus


def plain_response(code: int, text: str) -> bytes:
    """A status line and a one-line plain-text body, then the connection closes.

    The text is cut to 200 characters and kept on one line: it may quote
    what a client sent.
    """
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "Error"
    body = (text.replace("\r", " ").replace("\n", " ")[:200] + "\n").encode("utf-8")
    head = (
        f"HTTP/1.1 {code} {phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def empty_response(code: int) -> bytes:
    """A refused websocket upgrade: a status line and no body, then the connection closes."""
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "Error"
    return f"HTTP/1.1 {code} {phrase}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
