"""A reverse-proxy downstream: forward each request to an HTTP backend.

:class:`ProxyResource` is an ordinary ``twisted.web`` resource, so a guest can
sit in front of it like in front of any other::

    proxy = ProxyResource("http://127.0.0.1:8081")
    site = Site(GuestResource(guest, proxy))

The request the backend receives is the one the guest left: its method, URI
(appended to the backend's base path, kept below it), headers (as reverse
proxies send them, see :mod:`twisted_httpwasm.web.backend_request`) and body.
The backend's answer
is streamed back as it arrives, with back-pressure: a slow client pauses the
backend connection.  A backend that cannot be reached, or that fails before it
answered, makes a ``502 Bad Gateway``; a guest in front sees ``is_error=1``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from typing import Protocol as TypingProtocol
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .access_log import printable
from .backend_request import (
    HOP_BY_HOP_HEADERS,
    NotOriginForm,
    PathOutsideBase,
    backend_headers,
    connection_tokens,
    is_hop_by_hop,
    origin_form,
    path_inside_base,
)
from .drain import cut_by_host

__all__ = [
    "HOP_BY_HOP_HEADERS",
    "BadGateway",
    "HTTPAgent",
    "NotOriginForm",
    "PathOutsideBase",
    "ProxyResource",
    "end_to_end_headers",
]

_log = Logger(namespace="httpwasm.proxy")

_BAD_GATEWAY_BODY = b"Bad Gateway\n"
_BAD_REQUEST_BODY = b"Bad Request\n"

#: Idle connections to the backend kept open for reuse.
MAX_IDLE_CONNECTIONS = 10


class _QuietClientFactory(_HTTP11ClientFactory):
    """A backend connection's factory that does not log its start and stop (two lines per request)."""

    noisy = False


class HTTPAgent(TypingProtocol):
    """What the proxy needs of an agent: ``twisted.web.iweb.IAgent.request``."""

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> Deferred[Any]: ...


class BadGateway(Exception):
    """The backend could not be reached or failed before it answered.

    ``http_status`` is the status the client should get; a wrapper that is told
    of the failure through ``request.processingFailed`` may answer with it.
    """

    http_status = http.BAD_GATEWAY


def end_to_end_headers(headers: Headers) -> Iterable[tuple[bytes, list[bytes]]]:
    """``(lowercase name, values)`` of ``headers`` without the hop-by-hop ones."""
    named = connection_tokens(headers)
    for name, values in headers.getAllRawHeaders():
        lowered = name.lower()
        if lowered.startswith(b":") or is_hop_by_hop(lowered, named):
            continue
        yield lowered, list(values)


def _local_authority(request: Request) -> bytes:
    """``host:port`` of the local end of the request's connection (what a target without Host names)."""
    address = request.getHost()
    host = getattr(address, "host", "")
    port = getattr(address, "port", 0)
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode("ascii", "replace")


def _describe(reason: Failure) -> str:
    """``reason`` as one line of text: the reasons inside a ResponseFailed (a list of Failures) each as theirs."""
    inner = getattr(reason.value, "reasons", None)
    if inner:
        return "; ".join(dict.fromkeys(_describe(each) for each in inner if isinstance(each, Failure)))
    if reason.check(CancelledError, TimeoutError):
        return "no answer in time"
    text = reason.getErrorMessage() or getattr(reason.type, "__name__", "error")
    return " ".join(text.split())


def _timed_out(reason: Failure) -> bool:
    inner = getattr(reason.value, "reasons", None)
    if inner:
        return any(isinstance(each, Failure) and _timed_out(each) for each in inner)
    return bool(reason.check(CancelledError, TimeoutError))


def _cut(request: Request) -> None:
    """End a response abruptly: reset its HTTP/2 stream, or abort its HTTP/1.x connection."""
    channel = request.channel
    abort = getattr(channel, "abortConnection", None)  # H2Stream: a RST_STREAM for this stream only
    if abort is None:
        transport = getattr(channel, "transport", None)
        abort = getattr(transport, "abortConnection", None) or getattr(transport, "loseConnection", None)
    if abort is not None:
        abort()


class _Borrowed:
    """A read-only view of ``request.content`` that FileBodyProducer may not close."""

    def __init__(self, content: Any):
        self._content = content

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._content.read(size)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        position: int = self._content.seek(offset, whence)
        return position

    def tell(self) -> int:
        position: int = self._content.tell()
        return position

    def close(self) -> None:
        """The request owns the file; Twisted closes it when the request ends."""


class ProxyResource(Resource):
    """Forwards every request to the HTTP backend at ``base_url``.

    The request's URI (path and query, as the guest may have rewritten it) is
    appended to the path of ``base_url``, its dot segments removed: a path that
    would climb above the base path gets ``400 Bad Request`` and never reaches
    the backend, and so does a target that is not origin-form (``a:1/``,
    ``host:443``, a URL for another authority): the backend's scheme, host and
    port are ``base_url``'s only.  Hop-by-hop headers are dropped both ways (of the names the
    client's ``Connection`` lists, only the client's values); ``Host`` becomes
    the backend's, and ``Forwarded``, ``X-Forwarded-For``, ``X-Forwarded-Host``
    and ``X-Forwarded-Proto`` tell the backend about the client.  The client's
    own forwarding headers (and ``X-Real-IP``) are dropped, unless
    ``trust_forwarded`` says the client side is a proxy you trust: then they
    are kept and appended to.  Behind guests, the outermost ``GuestResource``
    remembers the client's headers, so that the proxy can tell them from a
    guest's.

    Without an ``agent``, the resource makes one over a persistent
    connection pool of its own; :meth:`close` closes that pool's connections.

    ``timeout`` bounds the wait for the backend's response headers (connect
    included); the body may take as long as it takes.
    """

    isLeaf = True

    def __init__(
        self,
        base_url: bytes | str,
        *,
        reactor: Any = None,
        agent: HTTPAgent | None = None,
        timeout: float | None = 30.0,
        trust_forwarded: bool = False,
    ):
        super().__init__()  # type: ignore[no-untyped-call]
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        url = base_url.decode("ascii") if isinstance(base_url, bytes) else base_url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url must be an http:// or https:// URL, not {url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"base_url must have no query or fragment: {url!r}")
        self.reactor = reactor
        self.timeout = timeout
        self.trust_forwarded = trust_forwarded
        self.scheme = parts.scheme.encode("ascii")
        self.netloc = parts.netloc.encode("ascii")
        self.base_path = parts.path.rstrip("/").encode("ascii")
        self.pool: HTTPConnectionPool | None = None
        if agent is None:
            self.pool = HTTPConnectionPool(reactor, persistent=True)
            self.pool.maxPersistentPerHost = MAX_IDLE_CONNECTIONS
            self.pool._factory = _QuietClientFactory
            agent = Agent(reactor, pool=self.pool)
        self.agent: HTTPAgent = agent

    def __repr__(self) -> str:
        return f"<ProxyResource to {(self.scheme + b'://' + self.netloc + self.base_path).decode()}>"

    def close(self) -> Deferred[None]:
        """Close the idle backend connections this resource keeps; fires when closed."""
        if self.pool is None:
            return succeed(None)
        closed: Deferred[None] = self.pool.closeCachedConnections()
        return closed

    def backend_url(self, request: Request) -> bytes:
        """The URL the backend is asked for: base path + the request's path and query.

        Only the request's origin-form target (``/path?query``) is appended: an
        absolute-form URL naming this server is reduced to it, any other form
        raises :class:`NotOriginForm`, so the scheme, host and port are always
        the backend's own.  The path's dot segments are removed (``%2e`` is a
        dot, ``%2f`` stays data); raises :class:`PathOutsideBase` if it would
        climb above the base path.
        """
        uri = request.uri
        if uri[:1] != b"/":
            host = request.getHeader(b"host")
            uri = origin_form(
                uri,
                method=request.method,
                host=host,
                secure=bool(getattr(request, "isSecure", bool)()),  # DummyRequest has none
                local=_local_authority(request) if host is None else b"",
            )
            if uri[:1] != b"/":  # OPTIONS *: answered by render, never forwarded
                raise NotOriginForm("OPTIONS * is not forwarded")
        path, question, query = uri.partition(b"?")
        return self.scheme + b"://" + self.netloc + self.base_path + path_inside_base(path) + question + query

    def backend_headers(self, request: Request) -> Headers:
        """The headers the backend gets (see :func:`~twisted_httpwasm.web.backend_request.backend_headers`)."""
        return backend_headers(request, self.netloc, trust_forwarded=self.trust_forwarded)

    def render(self, request: Request) -> object:
        if request.uri == b"*" and request.method == b"OPTIONS":
            # About this server, not a resource of the backend's (RFC 9110 9.3.7): answered here.
            request.setHeader(b"content-length", b"0")
            return b""
        try:
            url = self.backend_url(request)
        except (PathOutsideBase, NotOriginForm) as error:
            _log.info(
                "refused {method} {uri}: {reason}; answering 400",
                method=printable(request.method),
                uri=printable(request.uri),
                reason=error,
            )
            request.setResponseCode(http.BAD_REQUEST)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return _BAD_REQUEST_BODY
        _ProxiedRequest(self, request, url).start()
        return NOT_DONE_YET


class _ProxiedRequest:
    """One request's trip to the backend and back."""

    def __init__(self, proxy: ProxyResource, request: Request, url: bytes):
        self.proxy = proxy
        self.request = request
        self.url = url
        self.client_gone = False
        self.pending: Deferred[Any] | None = None
        self.relay: _BodyRelay | None = None

    def start(self) -> None:
        request = self.request
        request.notifyFinish().addErrback(self._client_gone)
        body = None
        content = request.content
        if content is not None:
            start = content.tell()
            size = content.seek(0, 2) - start
            content.seek(start)
            if size > 0:
                body = FileBodyProducer(_Borrowed(content))
        pending = self.proxy.agent.request(request.method, self.url, self.proxy.backend_headers(request), body)
        if self.proxy.timeout is not None:
            pending.addTimeout(self.proxy.timeout, self.proxy.reactor)
        self.pending = pending
        pending.addCallbacks(self._answer, self._unreachable)
        pending.addErrback(self._internal_error)

    def _answer(self, response: Any) -> None:
        self.pending = None
        if self.client_gone:
            response.deliverBody(_Abandon())
            return
        request = self.request
        request.setResponseCode(response.code, response.phrase)
        for name, values in end_to_end_headers(response.headers):
            request.responseHeaders.setRawHeaders(name, values)
        self.relay = _BodyRelay(self)
        response.deliverBody(self.relay)

    def _ended_by_host(self, what: str) -> bool:
        """True (after a debug line) when the host itself cut this request: not the backend's failure."""
        cut = cut_by_host(self.request)
        if cut is None:
            return False
        _log.debug(
            "{method} {uri}: {what} ended: {cut} cut the request",
            method=printable(self.request.method),
            uri=printable(self.request.uri),
            what=what,
            cut=cut,
        )
        return True

    def _unreachable(self, reason: Failure) -> None:
        self.pending = None
        if self.client_gone or self._ended_by_host("the backend request"):
            return
        if _timed_out(reason) and self.proxy.timeout is not None:
            _log.warn(
                "backend {url} did not answer {method} {uri} within {timeout} s",
                url=printable(self.url),
                method=printable(self.request.method),
                uri=printable(self.request.uri),
                timeout=self.proxy.timeout,
            )
            self.fail()
            return
        _log.warn(
            "backend {url} unreachable for {method} {uri}: {error}",
            url=printable(self.url),
            method=printable(self.request.method),
            uri=printable(self.request.uri),
            error=_describe(reason),
        )
        self.fail()

    def _internal_error(self, reason: Failure) -> None:
        _log.failure("proxying {uri} failed", failure=reason, uri=printable(self.request.uri))
        if not self.client_gone and not self.request.finished:
            self.fail()

    def fail(self) -> None:
        """The backend failed: answer 502, or cut a response already under way."""
        request = self.request
        if request.startedWriting:
            # Part of the backend's response is on the wire: cutting it is the only honest signal.
            _cut(request)
            return
        if "processingFailed" in vars(request):
            # A wrapper (a GuestResource's filter) watches this request: tell it the
            # next handler failed, so that its guest runs handle_response with
            # is_error=1; the wrapper then answers the request.
            request.processingFailed(Failure(BadGateway(f"backend {self.url.decode('ascii', 'replace')} failed")))
            return
        request.setResponseCode(http.BAD_GATEWAY)
        request.responseHeaders = Headers(
            {
                b"content-type": [b"text/plain; charset=utf-8"],
                b"content-length": [b"%d" % len(_BAD_GATEWAY_BODY)],
            }
        )
        request.cookies = []
        request.write(_BAD_GATEWAY_BODY)
        request.finish()

    def _client_gone(self, reason: Failure) -> None:
        self.client_gone = True
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.cancel()
        if self.relay is not None:
            self.relay.stop()


class _BodyRelay(Protocol):
    """Writes the backend's body to the client as it arrives."""

    def __init__(self, proxied: _ProxiedRequest):
        self.proxied = proxied
        self.registered = False
        self.stopped = False

    def connectionMade(self) -> None:
        if self.proxied.client_gone:
            self.stop()
            return
        # Back-pressure: when the client cannot keep up, its channel pauses the backend.
        self.proxied.request.registerProducer(self.transport, True)
        self.registered = True

    def dataReceived(self, data: bytes) -> None:
        if not self.proxied.client_gone:
            self.proxied.request.write(data)

    def stop(self) -> None:
        if not self.stopped and self.transport is not None:
            self.stopped = True
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        proxied = self.proxied
        request = proxied.request
        if self.registered:
            self.registered = False
            if not proxied.client_gone:
                request.unregisterProducer()
        if proxied.client_gone:
            return
        if reason.check(ResponseDone, http.PotentialDataLoss):
            request.finish()
            return
        if proxied._ended_by_host("the backend's response"):
            return
        _log.warn(
            "backend {url} failed while sending its response to {method} {uri}: {error}",
            url=printable(proxied.url),
            method=printable(request.method),
            uri=printable(request.uri),
            error=_describe(reason),
        )
        proxied.fail()


class _Abandon(Protocol):
    """Drops the connection of a body nobody will read (it may be long, or endless)."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.stopProducing()
