"""Graceful shutdown: a site's requests in flight finish before the process stops.

:class:`InFlight` follows the requests of one :class:`~twisted_httpwasm.web.site.GuestSite`
(the connections it built, and from a drain on, every request on them, from its
first line to its end, HTTP/1 and HTTP/2 alike).  :meth:`InFlight.drain`
stops new requests on the open connections (``Connection: close`` on the
responses still to come, idle keep-alive connections closed), lets the requests
in flight finish up to a deadline, and cuts the ones still running then.

This is what a twisted.web embedder uses (through ``GuestSite.drain``); the
process's side - the service that drains on stop, and the stop signals - is
:mod:`twisted_httpwasm.service.stopping`.
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.iweb import INonQueuedRequestFactory
from zope.interface import directlyProvides

from .access_log import address_text
from .request_context import context_of, existing_context
from .twisted_internals import channel_of, request_disconnected, stream_requests

__all__ = ["DEFAULT_SHUTDOWN_TIMEOUT", "InFlight", "cut_by_host"]

#: Seconds the requests in flight have to finish once the server stops (what process managers commonly allow).
DEFAULT_SHUTDOWN_TIMEOUT = 30.0

_log = Logger(namespace="httpwasm")


class InFlight:
    """The connections of one site, and the drain that waits for their requests in flight.

    Serving costs one weak reference per connection and nothing per request:
    the requests in flight are looked up when a drain begins (HTTP/1 channels
    list theirs, HTTP/2 connections their streams), and the requests that start
    during the drain are seen through a request factory installed then.
    """

    #: Seconds between two looks at the connections a drain closes.
    POLL_INTERVAL = 0.02

    def __init__(self, reactor: Any):
        self.reactor = reactor
        #: During a drain, each request in flight: the channel it came on (HTTPChannel or HTTP/2 stream), and when.
        self.requests: dict[Any, tuple[Any, float]] = {}
        self.draining = False
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()  # what Site.buildProtocol built
        self._closing: set[Any] = set()  # the connections a drain closes and waits for
        self._drained: list[Deferred[bool]] = []
        self._deadline: Any = None  # IDelayedCall
        self._poll: LoopingCall | None = None
        self._outcome: bool | None = None  # once a drain ended: True if nothing had to be cut

    def track(self, protocol: Any) -> Any:
        """Remember ``protocol`` (what ``Site.buildProtocol`` built) for a drain; returns it."""
        if protocol is not None:
            self._connections.add(protocol)
        return protocol

    def started(self, request: Any, channel: Any) -> None:
        """During a drain: ``request`` (on ``channel``) is in flight until it finishes or its connection is lost."""
        if request in self.requests or request.finished or request_disconnected(request):
            return  # a request that ended will not notify again
        self.requests[request] = (channel, self.reactor.seconds())
        request.notifyFinish().addBoth(self._ended, request)
        if isinstance(channel, HTTPChannel):
            # This response closes its connection, so the client sends nothing more on it.
            channel.persistent = False
            if not request.startedWriting:
                request.setHeader(b"connection", b"close")

    def _ended(self, result: object, request: Any) -> None:
        if self.requests.pop(request, None) is not None:
            self._progress()

    def drain(self, timeout: float | None) -> Deferred[bool]:
        """Let the requests in flight finish, and take no more on the connections open now.

        Responses still to be sent say ``Connection: close`` (HTTP/1) and every
        connection is closed once it has no request left (idle keep-alive
        connections at once), after its last bytes are sent.  After ``timeout``
        seconds (None: no limit) the requests still running are cut (their
        connection or HTTP/2 stream is aborted) and logged.  Fires with True
        when every request finished, False when some were cut.  Listening
        ports are not this object's: stop them first (``DrainService`` runs
        beside the services that own them).
        """
        if not self.draining:
            self.draining = True
            for connection in list(self._connections):
                self._closing.add(connection)
                connection.requestFactory = _TrackedRequests(self, connection.requestFactory)
                for request, channel in _requests_on(channel_of(connection)):
                    self.started(request, channel)
            if self.requests:
                _log.info(
                    "httpwasm: waiting for {count} request(s) in flight to finish (up to {timeout} s)",
                    count=len(self.requests),
                    timeout=timeout,
                )
            if timeout is not None:
                self._deadline = self.reactor.callLater(timeout, self._cut, timeout)
            self._poll = LoopingCall(self._progress)
            self._poll.clock = self.reactor
            self._poll.start(self.POLL_INTERVAL, now=False)
            self._progress()
        if self._outcome is not None:
            return succeed(self._outcome)
        drained: Deferred[bool] = Deferred()
        self._drained.append(drained)
        return drained

    def _progress(self) -> None:
        """Close the connections that have no request left; done once none is open."""
        for connection in list(self._closing):
            if _close_if_idle(channel_of(connection)):
                self._closing.discard(connection)
        if not (self.requests or self._closing) and self._outcome is None:
            self._done(True)

    def _cut(self, timeout: float) -> None:
        self._deadline = None
        now = self.reactor.seconds()
        requests, self.requests = self.requests, {}
        for request, (channel, since) in requests.items():
            _log.warn(
                "httpwasm: shutdown timeout ({timeout} s): cutting {method} {uri} from {client}"
                " after {age:.1f} s in flight",
                timeout=timeout,
                method=_text(getattr(request, "method", b"?")),
                uri=_text(getattr(request, "uri", b"?")),
                client=address_text(request.getClientAddress()),
                age=now - since,
            )
            context_of(request).cut_by_host = f"the shutdown timeout ({timeout} s)"
            _abort(channel)
        for connection in self._closing:
            transport: Any = getattr(channel_of(connection), "transport", None)
            if transport is not None and getattr(transport, "connected", False):
                transport.abortConnection()
        self._closing.clear()
        self._done(not requests)

    def _done(self, finished: bool) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        self._outcome = finished
        if finished:
            _log.info("httpwasm: drained: every request finished, every connection closed")
        drained, self._drained = self._drained, []
        for waiting in drained:
            waiting.callback(finished)


class _TrackedRequests:
    """A request factory that tells a draining :class:`InFlight` about every request it makes."""

    def __init__(self, in_flight: InFlight, factory: Any):
        self.in_flight = in_flight
        self.factory = factory
        if INonQueuedRequestFactory.providedBy(factory):
            directlyProvides(self, INonQueuedRequestFactory)

    def __call__(self, channel: Any, *args: Any, **kwargs: Any) -> Any:
        request = self.factory(channel, *args, **kwargs)
        self.in_flight.started(request, channel)
        return request


def _requests_on(channel: Any) -> list[tuple[Any, Any]]:
    """The requests ``channel`` has started, with the channel each came on (HTTP/2: its stream)."""
    if isinstance(channel, HTTPChannel):
        return [(request, channel) for request in channel.requests]
    return list(stream_requests(channel))  # an H2Connection: one H2Stream per request


def _close_if_idle(channel: Any) -> bool:
    """Close ``channel`` once it has no request left (in progress, pipelined, HTTP/2 stream); True once closed."""
    transport: Any = getattr(channel, "transport", None)
    if transport is None or not getattr(transport, "connected", False):
        return True
    busy = channel.requests if isinstance(channel, HTTPChannel) else getattr(channel, "streams", ())
    if not busy and not transport.disconnecting:
        transport.loseConnection()  # sends what is buffered first
    return False


#: Set on a request the host cut itself: what cut it (for whoever else logs about that request).
def cut_by_host(request: Any) -> str | None:
    """What cut ``request`` if the host itself did (``the shutdown timeout (30 s)``), else None.

    A downstream that sees its work end (a ``--proxy`` backend connection
    torn down with the process) logs it as that, not as its own failure.
    """
    context = existing_context(request)
    return context.cut_by_host if context is not None else None


def _abort(channel: Any) -> None:
    """End a request now: its HTTP/1 connection, or its HTTP/2 stream (the stream's own abort)."""
    if isinstance(channel, HTTPChannel):
        transport: Any = channel.transport
        if transport is not None:
            transport.abortConnection()
    else:
        channel.abortConnection()


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value
