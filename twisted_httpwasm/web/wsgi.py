"""Request headers a WSGI (or CGI) application cannot tell apart, dropped before it sees them.

A WSGI server hands request headers to the application as ``HTTP_*`` environ
keys, upper-cased with ``-`` turned into ``_`` (PEP 3333, after CGI).
``X-User`` and ``X_User`` both become ``HTTP_X_USER``: a guest in front that
removes ``x-user`` is bypassed by a client sending ``X_User: admin``.  As
nginx (``underscores_in_headers off``) and Apache do, :class:`UnderscoreHeaderGuard`
drops every request header whose name contains ``_`` before the application
sees the request.  Put it directly around the ``WSGIResource``, behind the
guests (it must run after them)::

    app = UnderscoreHeaderGuard(WSGIResource(reactor, threadpool, application))
    site = Site(GuestResource(guest, app))

``twistd httpwasm --wsgi`` does this unless ``--wsgi-keep-underscore-headers``.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from .access_log import printable

__all__ = ["UnderscoreHeaderGuard", "drop_underscore_headers"]

_log = Logger(namespace="httpwasm.wsgi")


def drop_underscore_headers(request: Request) -> list[bytes]:
    """Remove every request header whose name contains ``_``; the names removed."""
    headers = request.requestHeaders
    dropped = [name for name, _ in headers.getAllRawHeaders() if b"_" in name]
    for name in dropped:
        headers.removeHeader(name)
    if dropped:
        _log.debug(
            "dropped request headers {names} of {uri}: a WSGI application would read them as their hyphenated twins",
            names=printable(b", ".join(dropped)),
            uri=printable(request.uri),
        )
    return dropped


class UnderscoreHeaderGuard(Resource):
    """Wraps ``resource`` (a ``WSGIResource``, say): requests reach it without ``_`` headers.

    Headers are dropped when the request is traversed through the guard and
    again when the guard renders it, so ``resource`` may be a leaf or a tree.
    The headers a guest set count too: a guest that means a header for the
    application names it with ``-``.
    """

    def __init__(self, resource: Any):
        """``resource`` provides ``IResource`` (``WSGIResource`` does, without subclassing ``Resource``)."""
        super().__init__()  # type: ignore[no-untyped-call]
        self.resource: Any = resource
        self.isLeaf = bool(getattr(resource, "isLeaf", False))

    def __repr__(self) -> str:
        return f"<UnderscoreHeaderGuard around {self.resource!r}>"

    def getChildWithDefault(self, path: bytes, request: Request) -> Any:
        drop_underscore_headers(request)
        return self.resource.getChildWithDefault(path, request)

    def putChild(self, path: bytes, child: Any) -> None:
        self.resource.putChild(path, child)

    def render(self, request: Request) -> Any:
        drop_underscore_headers(request)
        return self.resource.render(request)
