"""Graceful shutdown: a site's requests in flight finish before the process stops.

:class:`InFlight` follows the requests of one :class:`~twisted_httpwasm.web.site.GuestSite`
(the connections it built, and from a drain on, every request on them, from its
first line to its end, HTTP/1 and HTTP/2 alike).  :meth:`InFlight.drain`
stops new requests on the open connections (``Connection: close`` on the
responses still to come, idle keep-alive connections closed), lets the requests
in flight finish up to a deadline, and cuts the ones still running then.

:class:`DrainService` drains its site when the service tree stops, which is
how ``twistd`` stops on SIGTERM or SIGINT.  It also takes over those two
signals from the reactor: Twisted's own handlers stop the reactor a second
time on a second signal (a ``ReactorNotRunning`` traceback, logged critical)
and make ``twistd`` exit with the signal, so a clean shutdown looked like a
crash to process managers.  With these handlers, a repeated signal is only
logged, and ``twistd`` exits with status 0 once the drain is over.
"""

from __future__ import annotations

import signal
import threading
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.iweb import INonQueuedRequestFactory
from zope.interface import directlyProvides

from .access_log import address_text

__all__ = ["DEFAULT_SHUTDOWN_TIMEOUT", "DrainService", "InFlight", "cut_by_host", "stop_reactor"]

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
        if request in self.requests or request.finished or getattr(request, "_disconnected", False):
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
                for request, channel in _requests_on(_channel_of(connection)):
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
            if _close_if_idle(_channel_of(connection)):
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
            setattr(request, _CUT_BY_HOST, f"the shutdown timeout ({timeout} s)")
            _abort(channel)
        for connection in self._closing:
            transport: Any = getattr(_channel_of(connection), "transport", None)
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


def _channel_of(connection: Any) -> Any:
    """The channel behind what ``Site.buildProtocol`` built: an ``HTTPChannel``, or an ``H2Connection``.

    Twisted's ``_GenericHTTPChannelProtocol`` swaps it when TLS negotiates h2, so it is read each time.
    """
    return getattr(connection, "_channel", connection)


def _requests_on(channel: Any) -> list[tuple[Any, Any]]:
    """The requests ``channel`` has started, with the channel each came on (HTTP/2: its stream)."""
    if isinstance(channel, HTTPChannel):
        return [(request, channel) for request in channel.requests]
    streams = getattr(channel, "streams", {})  # an H2Connection: one H2Stream per request
    return [(stream._request, stream) for stream in list(streams.values()) if hasattr(stream, "_request")]


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
_CUT_BY_HOST = "_httpwasm_cut_by_host"


def cut_by_host(request: Any) -> str | None:
    """What cut ``request`` if the host itself did (``the shutdown timeout (30 s)``), else None.

    A downstream that sees its work end (a ``--proxy`` backend connection
    torn down with the process) logs it as that, not as its own failure.
    """
    why: str | None = getattr(request, _CUT_BY_HOST, None)
    return why


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


# -- stopping: the service, and the signals -----------------------------------------


class DrainService(service.Service):
    """Drains ``site`` (a :class:`~twisted_httpwasm.web.site.GuestSite`) when the service stops.

    Put it in the same service collection as the services that listen for
    ``site``: they stop listening while this one waits, up to ``timeout``
    seconds, for the requests in flight.  With ``stop_signals`` (the default),
    SIGTERM and SIGINT stop the reactor once (a repeated signal is logged, not a
    critical ``ReactorNotRunning``), and ``twistd`` exits with status 0.
    """

    def __init__(
        self,
        site: Any,
        timeout: float | None = DEFAULT_SHUTDOWN_TIMEOUT,
        *,
        reactor: Any = None,
        stop_signals: bool = True,
    ):
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.site = site
        self.timeout = timeout
        self.reactor = reactor
        self.stop_signals = stop_signals

    def startService(self) -> None:
        service.Service.startService(self)  # type: ignore[no-untyped-call]
        if self.stop_signals:
            self.reactor.callWhenRunning(take_over_stop_signals, self.reactor)

    def stopService(self) -> Deferred[None]:
        service.Service.stopService(self)  # type: ignore[no-untyped-call]
        drained: Deferred[bool] = self.site.drain(self.timeout)
        return drained.addCallback(lambda _: None)


def stop_reactor(reactor: Any, why: str) -> None:
    """Stop ``reactor`` unless it is stopping already (then only log ``why``)."""
    try:
        reactor.stop()
    except ReactorNotRunning:
        _log.info("{why}; already stopping", why=why)
        return
    _log.info("{why}; stopping", why=why)


def take_over_stop_signals(reactor: Any) -> None:
    """SIGTERM and SIGINT stop ``reactor`` through :func:`stop_reactor`, wherever the reactor handled them.

    Only the handlers the reactor installed are replaced (not SIG_IGN, not an
    application's own), and only from the main thread, where signals are handled.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for number in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(number)
        if getattr(current, "__self__", None) is not reactor:
            continue
        signal.signal(number, _stop_handler(reactor, f"Received {signal.Signals(number).name}"))


def _stop_handler(reactor: Any, why: str) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        reactor.callFromThread(stop_reactor, reactor, why)

    return handler
