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

from collections.abc import Callable
from typing import Any

from twisted.web.http import _escape, combinedLogFormatter
from twisted.web.iweb import IAccessLogFormatter
from zope.interface import provider

__all__ = [
    "RequestLog",
    "access_log_formatter",
    "address_text",
    "client_uri",
    "printable",
    "remember_client_uri",
    "request_id_of",
]

_CLIENT_URI = "_httpwasm_client_uri"


# Kept as attributes of the request through getattr/setattr, not through request.__dict__: reading
# an instance's __dict__ makes CPython (3.11+) move its attributes out of the object's inline values
# into a dict for the rest of its life, and every later attribute access on the request misses its
# specialised fast path (about 15k instructions over a request).


def remember_client_uri(request: Any) -> None:
    """Keep ``request.uri`` as the client's, if none is kept yet (call it before any guest runs)."""
    if getattr(request, _CLIENT_URI, None) is None:
        setattr(request, _CLIENT_URI, request.uri)


def client_uri(request: Any) -> bytes:
    """The URI the client sent, if it was remembered; else the request's URI now."""
    uri: bytes | None = getattr(request, _CLIENT_URI, None)
    return request.uri if uri is None else uri


def printable(data: bytes | str | None) -> str:
    """``data`` as text for a log message: printable ASCII as is, other bytes as ``\\xNN``."""
    if data is None:
        return "-"
    if isinstance(data, str):
        data = data.encode("utf-8", "backslashreplace")
    return "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in data)


def address_text(address: Any) -> str:
    """A connection's address for a log line: ``127.0.0.1:37254``, ``[::1]:37254``, a UNIX path, or ``-``."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    name = getattr(address, "name", None)  # UNIXAddress
    if name:
        return printable(name)
    return "-"


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


# -- one structured event per request and guest (--log-format json) ----------------------------


def after_response(request: Any, then: Callable[[], object]) -> None:
    """Call ``then`` once ``request``'s response is decided: now if it is over, else when it ends.

    A guest's part may end before the response's status is set (a trap answers 500 after).
    """
    if getattr(request, "finished", True) or getattr(request, "_disconnected", False):
        then()
    else:
        request.notifyFinish().addBoth(lambda _: then())


_REQUEST_ID = "_httpwasm_request_id"


def request_id_of(request: Any) -> str | None:
    """The id :class:`RequestLog` gave ``request`` when it arrived, if any."""
    value: str | None = getattr(request, _REQUEST_ID, None)
    return value


class RequestLog:
    """An observer that logs one event per request and guest, with fields a log shipper can index.

    ``request_id`` (given to each request as it arrives, once :meth:`install` ran
    on the site), ``guest``, ``phase`` (where the guest's part ended: the call
    that failed, else its last call), ``outcome``, ``status``, ``method``,
    ``uri`` (the client's) and ``duration_ms``.
    """

    def __init__(self) -> None:
        from twisted.logger import Logger

        self.log = Logger(namespace="httpwasm.request")

    def watch(self, guest: Any) -> None:
        from ..runtime.observe import add_observer

        add_observer(guest, self)

    def install(self, site: Any) -> None:
        """Give every request ``site`` receives a request id (a :class:`GuestSite`)."""
        site.request_hooks = (*getattr(site, "request_hooks", ()), self.request_arrived)

    def request_arrived(self, request: Any) -> None:
        import os

        if getattr(request, _REQUEST_ID, None) is None:
            setattr(request, _REQUEST_ID, os.urandom(8).hex())

    def request_finished(self, guest: Any, request: Any, state: Any, outcome: str, started: float) -> None:
        import time

        ended = time.monotonic()
        after_response(request, lambda: self._log_request(guest, request, state, outcome, ended - started))

    def _log_request(self, guest: Any, request: Any, state: Any, outcome: str, duration: float) -> None:
        calls = list(getattr(state, "calls", ()))
        failed = [call for call in calls if call[3] is not None]
        last = failed[0] if failed else calls[-1] if calls else None
        phase = getattr(last[0], "value", str(last[0])) if last is not None else "none"
        self.log.info(
            "guest {guest}: {outcome} in {phase}, {status} for {method} {uri} ({duration_ms} ms)",
            request_id=request_id_of(request),
            guest=guest.name,
            phase=phase,
            outcome=outcome,
            status=int(getattr(request, "code", 0) or 0),
            method=printable(getattr(request, "method", b"")),
            uri=printable(client_uri(request)),
            duration_ms=round(duration * 1000, 3),
        )
