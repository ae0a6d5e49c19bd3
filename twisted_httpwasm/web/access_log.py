"""The access log: the URI as the client sent it, and the one a guest rewrote it to.

Twisted's ``combinedLogFormatter`` writes ``request.uri`` when the request is
over, which behind a guest that rewrote it is the guest's URI, not what the
client asked for.  :func:`remember_client_uri` keeps the client's (a
:class:`~twisted_httpwasm.web.site.GuestSite` calls it before any resource
runs) and :func:`access_log_formatter` logs it in the request field; when a
guest changed it, the URI the downstream got follows as one more quoted
field at the end of the line::

    "127.0.0.1" - - [26/Nov/2026:12:00:00 +0000] "GET /old HTTP/1.1" 200 5 "-" "curl/8" "/new"

so that a Combined Log Format parser still reads the first nine fields as
they are (most ignore what follows, or take it as an extra field).
"""

from __future__ import annotations

from typing import Any

from twisted.web.http import _escape, combinedLogFormatter
from twisted.web.iweb import IAccessLogFormatter
from zope.interface import provider

__all__ = ["access_log_formatter", "client_uri", "printable", "remember_client_uri"]

_CLIENT_URI = "_httpwasm_client_uri"


def remember_client_uri(request: Any) -> None:
    """Keep ``request.uri`` as the client's, if none is kept yet (call it before any guest runs)."""
    request.__dict__.setdefault(_CLIENT_URI, request.uri)


def client_uri(request: Any) -> bytes:
    """The URI the client sent, if it was remembered; else the request's URI now."""
    uri: bytes = request.__dict__.get(_CLIENT_URI, request.uri)
    return uri


def printable(data: bytes | str | None) -> str:
    """``data`` as text for a log message: printable ASCII as is, other bytes as ``\\xNN``."""
    if data is None:
        return "-"
    if isinstance(data, str):
        data = data.encode("utf-8", "backslashreplace")
    return "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in data)


@provider(IAccessLogFormatter)  # type: ignore[untyped-decorator]
def access_log_formatter(timestamp: str, request: Any) -> str:
    """Combined Log Format with the client's URI; a guest's rewritten URI as one more field at the end."""
    rewritten = request.uri
    original = client_uri(request)
    if original == rewritten:
        line: str = combinedLogFormatter(timestamp, request)
        return line
    request.uri = original
    try:
        line = combinedLogFormatter(timestamp, request)
    finally:
        request.uri = rewritten
    return f'{line} "{_escape(rewritten)}"'
