"""The ``Site`` that ``twistd httpwasm`` serves: twisted.web's, with the bounds an operator needs.

:class:`GuestSite` is an ordinary :class:`twisted.web.server.Site` (embedders may
use it or not).  It adds two things on top, each in its own section below:

- **limits** on what one connection or request may make the server hold
  (time to send the request headers, idle keep-alive time, request body size,
  HTTP/2 streams per connection and nothing read after a GOAWAY: see
  :mod:`.http2`), and a request target that is origin-form (or 400) before
  any resource sees it;
- **draining**: on shutdown, stop taking requests, let the ones in flight
  finish up to a deadline, close idle keep-alive connections.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site
from zope.interface import implementer

from .. import _optional
from .access_log import access_log_formatter, address_text, printable, remember_client_uri
from .backend_request import NotOriginForm, origin_form
from .drain import DEFAULT_SHUTDOWN_TIMEOUT, InFlight
from .http2 import DEFAULT_MAX_STREAMS_PER_CONNECTION, GuardedChannelProtocol, refuse_stream, too_many_streams
from .twisted_internals import (
    ContinueVetoChannel,
    channel_of,
    flush_h2_control_data,
    receiving_headers,
    request_disconnected,
    reset_h2_stream_after_cleanup,
)

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_REQUEST_BODY",
    "DEFAULT_MAX_STREAMS_PER_CONNECTION",
    "HOUSEKEEPING_INTERVAL",
    "GuestSite",
]

_log = Logger(namespace="httpwasm")

# -- limits: the request and channel classes GuestSite serves with -------------------

#: Largest request body accepted (bytes); None: no limit.
DEFAULT_MAX_REQUEST_BODY = 1024**3
#: Seconds a connection may stay silent (between requests, or mid-request) before it is closed.
DEFAULT_IDLE_TIMEOUT = 60.0
#: Seconds from the first byte of a request to the end of its headers.
DEFAULT_HEADER_TIMEOUT = 30.0
#: Seconds between two runs of a GuestSite's housekeeping.
HOUSEKEEPING_INTERVAL = 5.0
#: Longest time a connection may get past the header deadline (the sweep looks twice as often).
HEADER_SWEEP_INTERVAL = 1.0

_TOO_LARGE = b"Request Entity Too Large\n"
_HTTP1_TOO_LARGE = (
    b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_TOO_LARGE), _TOO_LARGE)
)
_HTTP1_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_BAD_REQUEST = b"Bad Request\n"


def _not_processed(command: bytes, path: bytes, version: bytes) -> None:
    """A refused request's ``requestReceived``: it was answered (413) or reset, and goes no further."""


# Declared here so that the class has its own ``__provides__``: without it, the
# ``INonQueuedRequestFactory.providedBy(requestFactory)`` HTTPChannel asks on
# every request line takes zope.interface's slow path (about 3k instructions).
@implementer()
class _LimitedRequest(Request):
    """A request whose body may not grow past the site's ``max_request_body``.

    Refused with 413 as soon as the declared Content-Length says so, or as soon
    as a chunked (or HTTP/2) body crosses the limit: before the rest is read,
    and before any guest or resource sees the request.
    """

    _body_limit: int | None = None
    _body_received = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        channel: Any = self.channel
        site = getattr(channel, "site", None)  # a channel without a GuestSite (as Request.gotLength allows)
        limit = getattr(site, "max_request_body", None)
        http1 = isinstance(channel, HTTPChannel)
        if not http1:
            max_streams = getattr(site, "max_streams_per_connection", None)
            if max_streams is not None and too_many_streams(channel, max_streams):
                # An HTTP/2 stream past --max-streams-per-connection (opened before the client took the
                # setting, or ignoring it): reset unprocessed (REFUSED_STREAM), once the stream is made.
                self._refuse()
                channel.site.reactor.callLater(0, self._refuse_stream)
                Request.gotLength(self, 0)
                return
        if limit is not None:
            if length is not None and length > limit:
                self._refuse_body(f"declares a {length}-byte body", limit)
                return
            if length is None or not http1:
                # Counted as it comes: chunked, or HTTP/2. An HTTP/1 body of a declared length never
                # passes it (Twisted reads no further), so that request keeps one attribute fewer: a
                # Request with more than 30 attribute names moves them into a dict (see request_context).
                self._body_limit = limit
        Request.gotLength(self, length)

    def _refuse(self) -> None:
        """This request gets no further: its body is dropped, and it is never processed.

        The request's own ``requestReceived`` is replaced, on this request alone:
        an override on the class would be one more Python frame for every request.
        """
        self._refused = True
        self.requestReceived = _not_processed  # type: ignore[method-assign]

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        limit = self._body_limit
        if limit is not None:
            self._body_received += len(data)
            if self._body_received > limit:
                self._refuse_body("sent a body past the limit", limit)
                return
        Request.handleContentChunk(self, data)

    def process(self) -> None:
        # Before any guest runs: the access log's client URI, and the site's hooks (a trace's server span).
        remember_client_uri(self)
        channel: Any = self.channel
        hooks = getattr(channel.site, "request_hooks", None)  # Request.process needs channel.site too
        if hooks:
            for hook in hooks:
                hook(self)
        if self.uri[:1] != b"/" and not self._to_origin_form():
            return
        Request.process(self)

    def _to_origin_form(self) -> bool:
        """Reduce an absolute-form target naming this server to its path; else answer 400 (False).

        Before any guest or resource: what they see (and a ``--proxy`` backend
        gets) is always origin-form, or ``*`` for ``OPTIONS`` (see
        :func:`~twisted_httpwasm.web.backend_request.origin_form`).
        """
        request: Any = self  # Request's methods are untyped
        host = request.getHeader(b"host")
        if host is None:
            address = request.getHost()
            local = f"[{address.host}]:{address.port}" if ":" in address.host else f"{address.host}:{address.port}"
        try:
            target = origin_form(
                self.uri,
                method=self.method,
                host=host,
                secure=request.isSecure(),
                local=local.encode("ascii") if host is None else b"",
            )
        except NotOriginForm as error:
            _log.info(
                "refusing {method} {uri} from {client}: {reason}; answering 400",
                method=printable(self.method),
                uri=printable(self.uri),
                client=address_text(request.getClientAddress()),
                reason=error,
            )
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"content-length", b"%d" % len(_BAD_REQUEST))
            request.write(_BAD_REQUEST)
            request.finish()
            return False
        self.uri = target
        self.path = target.partition(b"?")[0]
        return True

    def _refuse_body(self, what: str, limit: int) -> None:
        """Answer 413 now; HTTP/1 closes the connection, HTTP/2 ends the stream."""
        self._refuse()
        if self.content is not None:
            self.content.close()
        self.content = io.BytesIO()
        channel: Any = self.channel
        _log.info(
            "413 for {client}: the request {what} (--max-request-body {limit})",
            client=address_text(self.getClientAddress()),  # type: ignore[no-untyped-call]
            what=what,
            limit=limit,
        )
        if isinstance(channel, HTTPChannel):
            channel.persistent = False
            transport: Any = channel.transport
            transport.write(_HTTP1_TOO_LARGE)
            channel.loseConnection()
        else:  # an HTTP/2 stream, which may still be in the making (gotLength runs in its constructor)
            channel.site.reactor.callLater(0, self._answer_too_large_on_stream)

    def _refuse_stream(self) -> None:
        if request_disconnected(self):
            return
        _log.debug(
            "refusing an HTTP/2 stream from {client}: --max-streams-per-connection reached",
            client=address_text(self.getClientAddress()),  # type: ignore[no-untyped-call]
        )
        refuse_stream(self.channel)
        # Over for this request: whoever waits on notifyFinish (the shutdown drain) need not wait on.
        self.connectionLost(Failure(ConnectionDone("HTTP/2 stream refused")))  # type: ignore[no-untyped-call]

    def _answer_too_large_on_stream(self) -> None:
        """HTTP/2: the 413 ends this stream; the connection and its other streams go on.

        If the client is still sending the body, the stream is then reset with
        NO_ERROR, which asks it to stop (RFC 9113, 8.1) and makes the connection
        ignore what it still sends (Twisted would fail the whole connection on
        DATA for a stream it has ended).
        """
        if request_disconnected(self):
            return
        stream: Any = self.channel
        headers = Headers({b"content-type": [b"text/plain; charset=utf-8"]})
        headers.setRawHeaders(b"content-length", [b"%d" % len(_TOO_LARGE)])
        stream.writeHeaders(b"HTTP/2", b"413", b"Request Entity Too Large", headers)
        stream.write(_TOO_LARGE)
        reset_h2_stream_after_cleanup(stream, _reset_if_still_receiving)
        stream.requestDone(self)
        # Over for this request: whoever waits on notifyFinish (the shutdown drain) need not wait on.
        self.connectionLost(Failure(ConnectionDone("answered 413 Request Entity Too Large")))  # type: ignore[no-untyped-call]


def _reset_if_still_receiving(stream_id: int, connection: Any) -> int:
    """After Twisted ended a stream: RST_STREAM(NO_ERROR) if the client has not finished sending."""
    h2_exceptions = _optional.require("h2.exceptions", "http2", "HTTP/2")  # loaded already: this is an h2 stream

    try:
        connection.conn.reset_stream(stream_id, 0)
    except h2_exceptions.StreamClosedError:
        return stream_id  # the client had sent all of it
    flush_h2_control_data(connection)
    return stream_id


class _GuardedChannel(ContinueVetoChannel):
    """HTTP/1 with a deadline for the request headers, from their first byte (slowloris).

    Nothing is done for it per request or per read: the site's sweep
    (:meth:`GuestSite._sweep_headers`) looks at its connections and closes
    the ones that have been receiving the same request's headers for too long.
    """

    _gone = False  # lost, or closed by the header deadline: the sweep leaves it alone

    def continue_refused(self) -> bool:
        # Answered 413 already: the client must not send the body.
        return bool(self.requests and getattr(self.requests[-1], "_refused", False))

    def connectionLost(self, reason: Any = None) -> None:
        self._gone = True
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _headers_too_slow(self, timeout: float) -> None:
        self._gone = True
        transport: Any = self.transport
        _log.info(
            "closing the connection from {peer}: request headers not complete within {timeout} s (--header-timeout)",
            peer=address_text(transport.getPeer()) if transport is not None else "-",
            timeout=timeout,
        )
        self.persistent = False
        if transport is not None:
            transport.write(_HTTP1_TIMEOUT)
        self.loseConnection()  # type: ignore[no-untyped-call]


def _guarded_protocol(factory: Any) -> Any:
    """What ``Site.protocol`` builds, with :class:`_GuardedChannel` for HTTP/1 and the HTTP/2 bounds."""
    protocol = GuardedChannelProtocol(_GuardedChannel())  # type: ignore[no-untyped-call]
    protocol.max_streams = getattr(factory, "max_streams_per_connection", None)
    return protocol


class GuestSite(Site):
    """A ``Site`` with connection/request limits and a graceful drain.

    Its access log shows the URI as the client sent it (and a guest's rewrite,
    see :mod:`~twisted_httpwasm.web.access_log`).  ``request_hooks`` are called
    with each request before it is processed (tracing starts its span there).
    """

    request_hooks: tuple[Callable[[Request], object], ...] = ()

    def __init__(
        self,
        resource: Any,
        *args: Any,
        max_request_body: int | None = DEFAULT_MAX_REQUEST_BODY,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        header_timeout: float | None = DEFAULT_HEADER_TIMEOUT,
        housekeeping: Callable[[], object] | None = None,
        max_streams_per_connection: int | None = DEFAULT_MAX_STREAMS_PER_CONNECTION,
        **kwargs: Any,
    ):
        kwargs.setdefault("timeout", idle_timeout)
        kwargs.setdefault("logFormatter", access_log_formatter)  # the client's URI, and a guest's rewrite
        super().__init__(resource, *args, **kwargs)  # type: ignore[no-untyped-call]
        #: HTTP/2 streams one connection may have open at once (None: h2's own 100); see :mod:`.http2`.
        self.max_streams_per_connection = max_streams_per_connection
        self._init_limits(max_request_body, header_timeout, housekeeping)

    # -- limits ---------------------------------------------------------------------

    protocol = _guarded_protocol

    def _init_limits(
        self, max_request_body: int | None, header_timeout: float | None, housekeeping: Callable[[], object] | None
    ) -> None:
        """``max_request_body`` bytes at most (None: no limit), headers within ``header_timeout`` s.

        The idle timeout is Twisted's own ``timeout``.  The body limit needs the
        default request class (a ``requestFactory`` passed in is kept as it is).
        ``housekeeping`` runs every HOUSEKEEPING_INTERVAL seconds while the site
        listens (from the first port's start, so after ``twistd`` forked): what
        gives memory back, such as retiring idle guest instances.
        """
        self.max_request_body = max_request_body
        self.header_timeout = header_timeout
        #: HTTP/1 channels seen receiving a request's headers: since when, and that request (see _sweep_headers).
        self.awaiting_headers: dict[_GuardedChannel, tuple[float, object]] = {}
        self._header_sweep: LoopingCall | None = None
        if header_timeout is not None:
            self._header_sweep = LoopingCall(self._sweep_headers, header_timeout)
            self._header_sweep.clock = self.reactor
        if self.requestFactory is Request:
            self.requestFactory = _LimitedRequest
        self._housekeeping: LoopingCall | None = None
        if housekeeping is not None:
            self._housekeeping = LoopingCall(housekeeping)
            self._housekeeping.clock = self.reactor

    def _sweep_headers(self, timeout: float) -> None:
        """Close the connections whose request headers took longer than ``timeout`` seconds.

        A channel is receiving a request's headers when it parses lines (not a
        body), handles no request, and has bytes of the next request: a partial
        line buffered, or the request line (or the one empty line HTTP/1
        tolerates before it) parsed.  That request is told from the next by the
        channel's list of bytes held back while a request is handled, which
        ``HTTPChannel.requestDone`` replaces after each request (the tests pin
        the private state read here).

        Headers are timed from the first sweep that saw them coming, so from at
        most one sweep after their first byte; sweeping every min(0.5 s,
        deadline/8) keeps a late connection's close to within min(1 s,
        deadline/4) past the deadline, as a timer per request did.
        """
        reactor: Any = self.reactor
        now = reactor.seconds()
        late = now - timeout
        seen = self.awaiting_headers
        awaiting: dict[_GuardedChannel, tuple[float, object]] = {}
        too_slow = []
        for connection in self.in_flight._connections:  # most idle or busy: the cheap tests first
            channel = channel_of(connection)
            if not isinstance(channel, _GuardedChannel) or channel._gone:
                continue  # HTTP/2, or not a channel of ours
            request = receiving_headers(channel)
            if request is None:
                continue
            since, seen_request = seen.get(channel, (now, request))
            if seen_request is not request:
                since = now  # the request seen before was done: this is the next one
            if since <= late:
                too_slow.append(channel)
            else:
                awaiting[channel] = (since, request)
        self.awaiting_headers = awaiting
        for channel in too_slow:
            channel._headers_too_slow(timeout)

    def doStart(self) -> None:
        """A port starts listening: housekeeping and the header deadline's sweep start with the first."""
        super().doStart()  # type: ignore[no-untyped-call]
        sweep = self._header_sweep
        if sweep is not None and not sweep.running and self.header_timeout is not None:
            # A deadline is kept to within a quarter of itself (at most a second late): see _sweep_headers.
            sweep.start(min(HEADER_SWEEP_INTERVAL, self.header_timeout / 4) / 2, now=False).addErrback(
                lambda failure: _log.failure("the header deadline's sweep failed", failure)
            )
        housekeeping = self._housekeeping
        if housekeeping is not None and not housekeeping.running:
            housekeeping.start(HOUSEKEEPING_INTERVAL, now=False).addErrback(
                lambda failure: _log.failure("site housekeeping failed", failure)
            )

    def doStop(self) -> None:
        """A port stops listening: housekeeping and the sweep stop with the last."""
        super().doStop()  # type: ignore[no-untyped-call]
        sweep = self._header_sweep
        if not self.numPorts and sweep is not None and sweep.running:
            sweep.stop()
        housekeeping = self._housekeeping
        if not self.numPorts and housekeeping is not None and housekeeping.running:
            housekeeping.stop()

    # -- draining -------------------------------------------------------------------

    _in_flight: InFlight | None = None

    @property
    def in_flight(self) -> InFlight:
        """The requests in flight on the connections this site built (made on first use)."""
        if self._in_flight is None:
            self._in_flight = InFlight(self.reactor)
        return self._in_flight

    def buildProtocol(self, addr: Any) -> Any:
        return self.in_flight.track(super().buildProtocol(addr))  # type: ignore[no-untyped-call]

    def drain(self, timeout: float | None = DEFAULT_SHUTDOWN_TIMEOUT) -> Deferred[bool]:
        """Finish the requests in flight and take no more on open connections; see :meth:`InFlight.drain`.

        Fires with True when every request finished, False when some were still
        running after ``timeout`` seconds and were cut.  Stop listening first.
        """
        # Held open like a port until the drain ends, so that the requests it waits for are still access-logged.
        holding = not self.in_flight.draining and self.numPorts > 0
        if holding:
            self.doStart()
        drained = self.in_flight.drain(timeout)
        if holding:
            drained.addBoth(self._drained)
        return drained

    def _drained(self, result: bool) -> bool:
        self.doStop()
        return result
